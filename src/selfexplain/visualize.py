"""Turn patch-grid explanations into image-sized heatmaps and overlays for display."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def explanation_to_heatmap(
    explanation: torch.Tensor, image_size: tuple[int, int], mode: str = "bilinear", normalize: bool = True
) -> torch.Tensor:
    """Upsample `(..., grid_h, grid_w)` patch scores to `(..., H, W)`.

    With `normalize=True` each map is scaled to [0, 1] (min-max per map), which is what a colour map wants.

    Example:
        >>> out = model(pixel_values)
        >>> heat = explanation_to_heatmap(out.explanation, pixel_values.shape[-2:])  # (batch, H, W) in [0, 1]
    """
    lead = explanation.shape[:-2]
    flat = explanation.detach().to(torch.float32).reshape(-1, 1, *explanation.shape[-2:])
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    up = F.interpolate(flat, size=tuple(int(s) for s in image_size), mode=mode, **kwargs)
    if normalize:
        low = up.amin(dim=(2, 3), keepdim=True)
        high = up.amax(dim=(2, 3), keepdim=True)
        up = (up - low) / (high - low).clamp_min(1e-12)
    return up.reshape(*lead, *up.shape[-2:])


def overlay_heatmap(
    image: Image.Image, heatmap: torch.Tensor | np.ndarray, alpha: float = 0.5
) -> Image.Image:
    """Blend a `[0, 1]` heatmap `(H, W)` over an image with a blue→red colour ramp (no matplotlib needed)."""
    heat = np.asarray(heatmap.cpu() if isinstance(heatmap, torch.Tensor) else heatmap, dtype=np.float32)
    image = image.convert("RGB")
    if heat.shape != (image.height, image.width):
        heat = np.asarray(
            Image.fromarray(heat).resize((image.width, image.height), Image.BILINEAR), dtype=np.float32
        )
    heat = np.clip(heat, 0.0, 1.0)
    colour = np.stack([heat, 1.0 - np.abs(heat - 0.5) * 2.0, 1.0 - heat], axis=-1) * 255.0
    blended = (1.0 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colour
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))
