"""Image synthesis of the generated domains: clutter backgrounds, glyphs and shapes pasted on them.

Rendering is vectorised numpy in float32 over chunks of images; every function takes its randomness from the
generator it is given, so a domain depends only on its seed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .columns import IMAGE_SIZE

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
_INK_THRESHOLD = 0.5  # a pixel belongs to the object when it is more object than background
_RENDER_CHUNK = 1000  # images rendered per vectorised step: bounds memory, keeps arrays cache-sized
_MARGIN = 1.0  # pixels kept free around generated objects: masks never touch the border, nothing is cut off


class _Arrays(NamedTuple):
    """One split in numpy: ``images`` uint8 (N, 32, 32, 3), ``labels`` int64 (N,), ``masks`` bool (N, 32, 32)."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


# --- generated domains -------------------------------------------------------------------------------------

# Pixel-centre coordinates of the 32x32 canvas, shaped to broadcast against (N, 1, 1) parameters. Rendering
# is float32 throughout: it halves the time of the (N, 32, 32, 3) array arithmetic that dominates it.
_YY, _XX = np.meshgrid(*(2 * [np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5]), indexing="ij")


def _uniform(rng: np.random.Generator, low: float, high: float, size: int | tuple[int, ...]) -> np.ndarray:
    return np.float32(low) + np.float32(high - low) * rng.random(size, dtype=np.float32)


def _render_on_clutter(rng: np.random.Generator, labels: np.ndarray, alphas: np.ndarray) -> _Arrays:
    """Paint objects with coverage ``alphas`` (N, 32, 32) in [0, 1] over fresh clutter, chunk by chunk."""
    images = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start in range(0, len(labels), _RENDER_CHUNK):
        alpha = alphas[start : start + _RENDER_CHUNK, ..., None]
        background = _clutter(rng, len(alpha))
        colour = _contrasting_colour(rng, background, alpha)
        image = background + alpha * (colour[:, None, None, :] - background)
        images[start : start + len(alpha)] = _to_uint8(image)
    return _Arrays(images, labels.astype(np.int64), alphas > _INK_THRESHOLD)


def _clutter(rng: np.random.Generator, n: int, num_blobs: int = 3, num_lines: int = 4) -> np.ndarray:
    """Random textured backgrounds (N, 32, 32, 3) in [0, 1]: colour gradient, soft blobs, thin lines, noise.

    Blobs are soft (Gaussian) so that they do not look like the hard-edged shapes; the thin lines are
    stroke-like distractors in random colours, including ones close to the object's.
    """
    coarse = _uniform(rng, -0.3, 0.3, (n, 4, 4, 3))
    upsample = _linear_upsample_matrix(4, IMAGE_SIZE)
    image = _uniform(rng, 0, 1, (n, 1, 1, 3)) + np.einsum(
        "yi,nijc,xj->nyxc", upsample, coarse, upsample, optimize=True
    )
    for _ in range(num_blobs):
        centre = _uniform(rng, 0, IMAGE_SIZE, (n, 2, 1, 1))
        sigma = _uniform(rng, 2, 6, (n, 1, 1))
        weight = _uniform(rng, 0.4, 0.9, (n, 1, 1)) * np.exp(
            -((_YY - centre[:, 0]) ** 2 + (_XX - centre[:, 1]) ** 2) / (2 * sigma**2)
        )
        image += weight[..., None] * (_uniform(rng, 0, 1, (n, 1, 1, 3)) - image)
    for _ in range(num_lines):
        start, end = _uniform(rng, -4, IMAGE_SIZE + 4, (2, n, 2, 1, 1))
        width = _uniform(rng, 0.5, 1.5, (n, 1, 1))
        coverage = np.clip(width + 0.5 - _distance_to_segment(start, end), 0.0, 1.0)
        image += coverage[..., None] * (_uniform(rng, 0, 1, (n, 1, 1, 3)) - image)
    image += np.float32(0.03) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0)


def _linear_upsample_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) bilinear interpolation weights with edge clamping, aligned on pixel centres."""
    position = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    return np.clip(1 - np.abs(position[:, None] - np.arange(src)[None, :]), 0.0, None).astype(np.float32)


def _distance_to_segment(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of every pixel centre to the segments ``start``-``end`` (each (N, 2, 1, 1), y then x)."""
    dy, dx = end[:, 0] - start[:, 0], end[:, 1] - start[:, 1]
    py, px = _YY - start[:, 0], _XX - start[:, 1]
    t = np.clip((py * dy + px * dx) / np.maximum(dy**2 + dx**2, 1e-6), 0.0, 1.0)
    return np.hypot(py - t * dy, px - t * dx)


def _contrasting_colour(
    rng: np.random.Generator, background: np.ndarray, alpha: np.ndarray, candidates: int = 8
) -> np.ndarray:
    """A random colour per image, at least 0.6 (RGB distance) from the mean background under the object.

    Of ``candidates`` random colours the first far enough is taken (the farthest if none is), so the object
    stays visible while its colour still varies from image to image.
    """
    under = (background * alpha).sum(axis=(1, 2)) / np.maximum(alpha.sum(axis=(1, 2)), 1e-6)
    options = _uniform(rng, 0, 1, (len(background), candidates, 3))
    distance = np.linalg.norm(options - under[:, None, :], axis=-1)
    far = distance >= 0.6
    choice = np.where(far.any(axis=1), far.argmax(axis=1), distance.argmax(axis=1))
    return options[np.arange(len(options)), choice]


def _place_glyphs(
    rng: np.random.Generator, glyphs: np.ndarray, min_height: float = 14.0, max_height: float = 26.0
) -> np.ndarray:
    """Crop each glyph (N, h, w) to its ink, scale it to a random height and put it at a random position.

    Resampling is separable (one (32, h) and one (32, w) weight matrix per glyph), so the whole batch is
    two batched matrix products. Returns coverage (N, 32, 32) in [0, 1].
    """
    ink = glyphs > 0.1
    top, bottom = _ink_extent(ink.any(axis=2))
    left, right = _ink_extent(ink.any(axis=1))
    height, width = bottom - top, right - left
    scale = rng.uniform(min_height, max_height, size=len(glyphs)) / height
    scale = np.minimum(scale, (IMAGE_SIZE - 2 * _MARGIN) / width)  # wide glyphs must still fit
    y0 = _MARGIN + rng.uniform(0, 1, size=len(glyphs)) * (IMAGE_SIZE - 2 * _MARGIN - height * scale)
    x0 = _MARGIN + rng.uniform(0, 1, size=len(glyphs)) * (IMAGE_SIZE - 2 * _MARGIN - width * scale)
    rows = _resampling_weights(top, y0, scale, glyphs.shape[1])
    cols = _resampling_weights(left, x0, scale, glyphs.shape[2])
    return np.clip(rows @ glyphs @ cols.transpose(0, 2, 1), 0.0, 1.0)


def _ink_extent(occupied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last True index along axis 1 of (N, L) booleans."""
    first = occupied.argmax(axis=1)
    last = occupied.shape[1] - occupied[:, ::-1].argmax(axis=1)
    return first, last


def _resampling_weights(
    src_start: np.ndarray, dst_start: np.ndarray, scale: np.ndarray, src_len: int
) -> np.ndarray:
    """(N, 32, src_len) weights mapping source pixels from ``src_start`` to canvas pixels from ``dst_start``.

    A tent filter: bilinear when enlarging; widened by ``1 / scale`` when shrinking, which anti-aliases.
    """
    canvas = np.arange(IMAGE_SIZE) + 0.5
    source = src_start[:, None] + (canvas[None, :] - dst_start[:, None]) / scale[:, None] - 0.5
    support = np.minimum(scale, 1.0)[:, None, None]
    distance = np.abs(source[:, :, None] - np.arange(src_len)[None, None, :])
    return (np.clip(1 - distance * support, 0.0, None) * support).astype(np.float32)


# Half-extent of each shape relative to its size parameter r: keeps every shape inside the canvas.
_SHAPE_BOUND = {
    "circle": 1.0,
    "square": 0.85 * math.sqrt(2),
    "triangle": 1.3 * 2 / math.sqrt(3),
    "cross": math.hypot(1.0, 0.3),
}


def _draw_shapes(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (N, 32, 32) of the shape named by each label, from signed distances."""
    n = len(labels)
    radius = _uniform(rng, 4.5, 9.0, n)
    angle = _uniform(rng, 0, 2 * np.pi, n)
    bound = radius * np.array([_SHAPE_BOUND[name] for name in SHAPE_NAMES], dtype=np.float32)[labels]
    room = IMAGE_SIZE - 2 * (_MARGIN + bound)
    centre_y, centre_x = (_MARGIN + bound + _uniform(rng, 0, 1, (2, n)) * room)[:, :, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = cos * (_XX - centre_x) + sin * (_YY - centre_y)
    v = -sin * (_XX - centre_x) + cos * (_YY - centre_y)
    r = radius[:, None, None]
    signed = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for label, sdf in enumerate((_sd_circle, _sd_square, _sd_triangle, _sd_cross)):
        chosen = labels == label
        signed[chosen] = sdf(u[chosen], v[chosen], r[chosen])
    return np.clip(0.5 - signed, 0.0, 1.0).astype(np.float32)


def _sd_box(u: np.ndarray, v: np.ndarray, half_u: np.ndarray, half_v: np.ndarray) -> np.ndarray:
    qu, qv = np.abs(u) - half_u, np.abs(v) - half_v
    return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0)


def _sd_circle(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.hypot(u, v) - r


def _sd_square(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _sd_box(u, v, 0.85 * r, 0.85 * r)  # 0.85: about the circle's area


def _sd_cross(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.minimum(_sd_box(u, v, r, 0.3 * r), _sd_box(u, v, 0.3 * r, r))


def _sd_triangle(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Equilateral triangle of side 2.6 r centred on its centroid (Inigo Quilez's exact distance)."""
    half_side, k = 1.3 * r, math.sqrt(3.0)
    pu, pv = np.abs(u) - half_side, v + half_side / k
    fold = pu + k * pv > 0
    pu, pv = np.where(fold, (pu - k * pv) / 2, pu), np.where(fold, (-k * pu - pv) / 2, pv)
    pu = pu - np.clip(pu, -2 * half_side, 0)
    return -np.hypot(pu, pv) * np.sign(pv)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
