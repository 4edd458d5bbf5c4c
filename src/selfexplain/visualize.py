"""Turn patch-grid explanations into heatmaps at an image's own resolution, overlay them, and label pictures.

The usual picture of one image's map (red: patches that speak for the class, blue: against, white: neutral)::

    out = model(processor(images=image, return_tensors="pt")["pixel_values"])
    overlay_heatmap(image, out.explanation[0]).save("map.png")          # the grid is upsampled to the image

or, with the heatmap made explicitly (for example to keep it)::

    heat = explanation_to_heatmap(out.explanation[0], image=image, normalize="signed")   # (H, W) in [-1, 1]
    overlay_heatmap(image, heat)

Sizes: PIL speaks ``(width, height)`` (``image.size``), tensors ``(height, width)`` (``pixel_values.shape[-2:]``).
:func:`explanation_to_heatmap` takes either, each by its own name, so neither is ever read the wrong way round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = ["explanation_to_heatmap", "label_image", "overlay_heatmap"]

# ColorBrewer RdBu (reversed: blue = negative, red = positive) and YlOrRd, as (position, RGB) control points.
_DIVERGING = (
    (0.0, (5, 48, 97)),
    (0.125, (33, 102, 172)),
    (0.25, (67, 147, 195)),
    (0.375, (146, 197, 222)),
    (0.5, (247, 247, 247)),
    (0.625, (244, 165, 130)),
    (0.75, (214, 96, 77)),
    (0.875, (178, 24, 43)),
    (1.0, (103, 0, 31)),
)
_SEQUENTIAL = (
    (0.0, (255, 255, 204)),
    (0.25, (254, 217, 118)),
    (0.5, (253, 141, 60)),
    (0.75, (227, 26, 28)),
    (1.0, (128, 0, 38)),
)
_NORMALIZE_MODES = (True, False, None, "minmax", "signed")


def explanation_to_heatmap(
    explanation: torch.Tensor | np.ndarray,
    image_size: Sequence[int] | Image.Image | None = None,
    mode: str = "bilinear",
    normalize: bool | str | None = True,
    *,
    image: Image.Image | None = None,
    size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Upsample `(..., grid_h, grid_w)` patch scores to `(..., H, W)`: leading dimensions are kept.

    `out.explanation` of a batch is `(batch, grid_h, grid_w)`; `out.explanation[0]` (one image) gives an
    `(H, W)` heatmap, `out.explanation` of a batch of one a `(1, H, W)` one (`overlay_heatmap` takes both).

    Where to: give exactly one of
        image_size: `(height, width)`, the order of tensor shapes (e.g. `pixel_values.shape[-2:]`); a PIL image
            is accepted here too.
        image: a PIL image: the heatmap gets its own resolution, `(image.height, image.width)`.
        size: `(width, height)`, PIL's order: `size=image.size`.
    The map is stretched over the whole target: this is right when the model saw the whole image resized to
    its input size, as `ViTImageProcessor` does (a processor that crops shows the model only part of the image).

    normalize: `True` or `"minmax"`: each map scaled to [0, 1] (min-max; the sign is lost); `"signed"`: each
        map divided by its largest magnitude, to [-1, 1] with 0 kept at 0 (for `overlay_heatmap`'s diverging
        colours); `False`/`None`: the raw scores.

    Example:
        >>> out = model(pixel_values)
        >>> explanation_to_heatmap(out.explanation, pixel_values.shape[-2:])  # (batch, H, W) in [0, 1]
        >>> explanation_to_heatmap(out.explanation[0], image=image, normalize="signed")  # (image.height, image.width)
    """
    target = _target_size(image_size, image, size)
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f'normalize must be True, False, "minmax" or "signed", got {normalize!r}.')
    explanation = torch.as_tensor(explanation)
    if explanation.dim() < 2:
        raise ValueError(f"explanation must be (..., grid_h, grid_w), got shape {tuple(explanation.shape)}.")
    lead = explanation.shape[:-2]
    flat = explanation.detach().to("cpu", torch.float32).reshape(-1, 1, *explanation.shape[-2:])
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    up = F.interpolate(flat, size=target, mode=mode, **kwargs)
    if normalize is True or normalize == "minmax":
        low = up.amin(dim=(2, 3), keepdim=True)
        high = up.amax(dim=(2, 3), keepdim=True)
        up = (up - low) / (high - low).clamp_min(1e-12)
    elif normalize == "signed":
        up = up / up.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return up.reshape(*lead, *up.shape[-2:])


def _target_size(
    image_size: Sequence[int] | Image.Image | None, image: Image.Image | None, size: Sequence[int] | None
) -> tuple[int, int]:
    given = [
        name
        for name, value in (("image_size", image_size), ("image", image), ("size", size))
        if value is not None
    ]
    if len(given) != 1:
        raise TypeError(
            "explanation_to_heatmap needs exactly one of image_size=(height, width), image=<PIL image> or "
            f"size=(width, height) (PIL's image.size); got {', '.join(given) or 'none'}."
        )
    if isinstance(image_size, Image.Image):
        image, image_size = image_size, None
    if image is not None:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}.")
        return image.height, image.width
    pair = _int_pair(image_size if image_size is not None else size, "image_size" if size is None else "size")
    return pair if size is None else (pair[1], pair[0])


def _int_pair(value, name: str) -> tuple[int, int]:
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be two positive integers, got {value!r}.")
    return pair


def overlay_heatmap(
    image: Image.Image,
    heatmap: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    *,
    signed: bool | None = None,
    vmax: float | None = None,
    stretch: bool = False,
    background: str = "gray",
) -> Image.Image:
    """Blend a heatmap over an image, at the image's own resolution. Returns an RGB image of `image.size`.

    heatmap: one image's map, `(H, W)` (or with leading dimensions of size 1, e.g. `(1, H, W)`). A map of
        another resolution with the image's aspect ratio (a patch grid of a square image, say) is upsampled
        bilinearly; one whose aspect differs is refused unless `stretch=True` (make it with
        `explanation_to_heatmap(explanation, image=image)` instead), and one that is the image's transpose
        (PIL's `(width, height)` read as `(height, width)`) is always refused.
    signed: diverging blue–white–red colours centred on 0 (blue: against the class, red: for it), scaled by
        the largest magnitude (or `vmax`). `None` (default): signed when the map has negative values. Unsigned
        maps (e.g. min-max normalised to [0, 1]) get a light-yellow→dark-red ramp over [0, max(1, `vmax`)].
    alpha: weight of the colours (0: the image only, 1: the colours only).
    background: `"gray"` (default: the image in grey, so that its own colours are not read as heat) or `"color"`.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}.")
    if background not in ("gray", "color"):
        raise ValueError(f'background must be "gray" or "color", got {background!r}.')
    heat = torch.as_tensor(
        heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    )
    heat, shape = heat.to(torch.float32), tuple(heat.shape)
    while heat.dim() > 2 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.dim() != 2:
        raise ValueError(
            f"overlay_heatmap draws one image's map, (H, W) or (1, H, W); got shape {shape}. "
            "For a batch, overlay each image's map: heatmap[i]."
        )
    height, width = image.height, image.width
    heat = _fit(heat, height, width, stretch)
    if not bool(torch.isfinite(heat).all()):
        raise ValueError("The heatmap holds NaN or Inf values.")
    if signed is None:
        signed = bool((heat < 0).any())
    if signed:
        scale = float(vmax) if vmax is not None else float(heat.abs().max())
        position = (heat / max(scale, 1e-12)).clamp(-1.0, 1.0) * 0.5 + 0.5
        colours = _DIVERGING
    else:
        scale = float(vmax) if vmax is not None else max(1.0, float(heat.max()))
        position = (heat / max(scale, 1e-12)).clamp(0.0, 1.0)
        colours = _SEQUENTIAL
    index = (position * 255.0).round().to(torch.uint8).numpy()
    colour = Image.fromarray(_lookup_table(colours)[index])
    base = image.convert("L").convert("RGB") if background == "gray" else image.convert("RGB")
    return Image.blend(base, colour, float(alpha))


def _fit(heat: torch.Tensor, height: int, width: int, stretch: bool) -> torch.Tensor:
    h, w = heat.shape
    if (h, w) == (height, width):
        return heat
    if (h, w) == (width, height):
        raise ValueError(
            f"The heatmap is {h}×{w} (height×width) but the image is {height}×{width}: it is transposed, as when "
            "PIL's image.size, which is (width, height), is passed where (height, width) is expected. Make it with "
            "explanation_to_heatmap(explanation, image=image) or size=image.size."
        )
    same_aspect = round(h * width / height) == w or round(w * height / width) == h
    if not (same_aspect or stretch):
        raise ValueError(
            f"The heatmap is {h}×{w} (height×width) but the image is {height}×{width}: the aspect ratios differ, "
            "and stretching the map would misplace it. Make it at the image's size with "
            "explanation_to_heatmap(explanation, image=image) (right when the model saw the whole image resized, "
            "as ViTImageProcessor does), or pass stretch=True."
        )
    return explanation_to_heatmap(heat, (height, width), normalize=False)


def _lookup_table(points: Sequence[tuple[float, tuple[int, int, int]]]) -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    stops = [p for p, _ in points]
    return (
        np.stack([np.interp(x, stops, [c[channel] for _, c in points]) for channel in range(3)], axis=-1)
        .round()
        .astype(np.uint8)
    )


def label_image(
    image: Image.Image, lines: Sequence[str], *, min_size: int = 224, max_size: int = 4096
) -> Image.Image:
    """Write `lines` on a dark box in the top-left corner of `image` (the first line larger).

    An image whose shorter side is under `min_size` pixels is first enlarged by a whole factor (nearest
    neighbour, so every pixel stays a crisp square, its longer side at most `max_size`) so that the text
    fits and stays readable; larger images keep their size.
    """
    image = image.convert("RGB")
    factor = max(1, -(-min_size // max(1, min(image.size))))
    factor = max(1, min(factor, max_size // max(image.size)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    if not lines:
        return image
    short = min(image.size)
    sizes = [max(9, min(64, short // 14))] + [max(8, min(48, short // 20))] * (len(lines) - 1)
    fonts = [_font(s) for s in sizes]
    draw = ImageDraw.Draw(image, "RGBA")
    pad = max(2, sizes[0] // 4)
    texts, boxes = [], []
    for text, font in zip(lines, fonts, strict=True):
        text = _fit_text(draw, text, font, image.width - 2 * pad)
        texts.append(text)
        boxes.append(draw.textbbox((0, 0), text, font=font))
    width = max(b[2] for b in boxes) + 2 * pad
    height = sum(b[3] for b in boxes) + pad * (len(lines) + 1)
    draw.rectangle((0, 0, min(width, image.width), min(height, image.height)), fill=(0, 0, 0, 170))
    y = pad
    for text, font, box in zip(texts, fonts, boxes, strict=True):
        draw.text((pad, y), text, font=font, fill=(255, 255, 255, 255))
        y += box[3] + pad
    return image


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
