"""Patch masking shared by the Shapley estimators and the faithfulness metrics.

A *player* is a cell of a ``(grid_h, grid_w)`` grid laid over the image: one ViT patch, or a group of
patches for a coarser grid. A coalition keeps the pixels of its players and replaces every other
pixel with a *baseline* image. Both the Shapley code (coalitions) and insertion/deletion (growing or
shrinking sets of patches) go through the functions below, so the two always agree on what "removing a
patch" means.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

BaselineKind = Literal["mean", "zero", "blur"]
BASELINE_KINDS: tuple[str, ...] = ("mean", "zero", "blur")


def make_baseline(pixel_values: torch.Tensor, kind: BaselineKind | torch.Tensor = "mean") -> torch.Tensor:
    """Return the image that stands in for removed pixels, shaped like ``pixel_values`` ``(B, C, H, W)``.

    - ``"mean"``: each image's own mean colour (per channel) in the normalised pixel space. It carries no
      spatial information yet stays on the image's colour statistics.
    - ``"zero"``: zeros; for inputs normalised with the dataset mean this is the dataset's mean colour.
    - ``"blur"``: a strong Gaussian blur of the image (sigma = 1/8 of the shorter side), which removes
      detail while keeping low-frequency context.
    - a tensor broadcastable to ``pixel_values``: used as is.

    Example:
        >>> x = torch.randn(2, 3, 32, 32)
        >>> make_baseline(x, "mean").shape
        torch.Size([2, 3, 32, 32])
    """
    if isinstance(kind, torch.Tensor):
        return kind.to(device=pixel_values.device, dtype=pixel_values.dtype).expand_as(pixel_values)
    if kind == "mean":
        return pixel_values.mean(dim=(2, 3), keepdim=True).expand_as(pixel_values)
    if kind == "zero":
        return torch.zeros_like(pixel_values)
    if kind == "blur":
        return _gaussian_blur(pixel_values, sigma=min(pixel_values.shape[-2:]) / 8.0)
    raise ValueError(f"Unknown baseline {kind!r}; expected one of {BASELINE_KINDS} or a tensor.")


def _gaussian_blur(pixel_values: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, device=pixel_values.device, dtype=pixel_values.dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = pixel_values.shape[1]
    # Separable blur with reflect padding; the padding is capped so that tiny images still work.
    out = pixel_values
    for dim in (2, 3):
        size = out.shape[dim]
        pad = min(radius, size - 1)
        k = kernel[radius - pad : radius + pad + 1]
        shape = (1, 1, -1, 1) if dim == 2 else (1, 1, 1, -1)
        padding = (0, 0, pad, pad) if dim == 2 else (pad, pad, 0, 0)
        out = F.conv2d(
            F.pad(out, padding, mode="reflect" if pad > 0 else "constant"),
            k.view(shape).expand(channels, 1, *k.view(shape).shape[2:]),
            groups=channels,
        )
    return out


def grid_to_pixel_mask(player_mask: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Upsample a player mask ``(..., grid_h, grid_w)`` to pixels ``(..., H, W)`` (nearest neighbour).

    Works for grids that do not divide the image evenly: each pixel takes the player whose cell it falls in.
    """
    lead = player_mask.shape[:-2]
    flat = player_mask.reshape(-1, 1, *player_mask.shape[-2:]).to(torch.float32)
    up = F.interpolate(flat, size=tuple(image_size), mode="nearest")
    return up.reshape(*lead, *image_size)


def mask_images(
    pixel_values: torch.Tensor, baseline: torch.Tensor, player_masks: torch.Tensor
) -> torch.Tensor:
    """Compose images that keep the players marked ``True`` and show the baseline elsewhere.

    Args:
        pixel_values: ``(B, C, H, W)`` images.
        baseline: ``(B, C, H, W)`` baseline images (see :func:`make_baseline`).
        player_masks: ``(B, M, grid_h, grid_w)`` boolean coalitions, ``M`` per image.

    Returns:
        ``(B * M, C, H, W)`` masked images, image-major (all coalitions of image 0 first).
    """
    b, c, h, w = pixel_values.shape
    # Coalitions are usually drawn on the CPU: they go where the images are.
    keep = grid_to_pixel_mask(player_masks, (h, w)).to(device=pixel_values.device, dtype=pixel_values.dtype)
    keep = keep.unsqueeze(2)  # (B, M, 1, H, W)
    x = pixel_values.unsqueeze(1)
    base = baseline.unsqueeze(1)
    out = base + keep * (x - base)
    return out.reshape(b * keep.shape[1], c, h, w)
