"""A vector made at one resolution, applied to a model fine-tuned at another: resize τ's position embeddings.

Only one tensor of a ViT depends on the number of patches: the position embeddings ``(1, 1 + h·w, D)`` (the class
token's row, then one row per patch). A model fine-tuned at 384 px from a 224 px backbone got its position
embeddings by interpolating the backbone's to the new patch grid (transformers' ``interpolate_pos_encoding``,
timm's ``resample_abs_pos_embed``: bicubic, class row kept) and then training. Interpolation is linear, so
resizing the vector's delta the same way and adding it is the same as resizing ``θ + α·τ`` of the vector's own
resolution: the position embeddings move by what the explanation training moved them, seen on the new grid.
Every other tensor (patch projection, blocks, the explanation extension, the classifier) is independent of the
grid, so nothing else changes. The patch size must match: a different patch projection is a different model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

#: The serialized key of the only tensor whose shape depends on the image size.
POSITION_EMBEDDINGS_KEY = "vit.embeddings.position_embeddings"


def patch_grid_of(image_size: Any, patch_size: Any) -> tuple[int, int]:
    """``(rows, columns)`` of patches for a config's ``image_size`` and ``patch_size`` (ints or pairs)."""
    height, width = _pair(image_size)
    patch_h, patch_w = _pair(patch_size)
    return height // patch_h, width // patch_w


def resize_position_embeddings(
    position_embeddings: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize ``(1, 1 + h·w, D)`` position embeddings (or a delta of them) from one patch grid to another.

    The class token's row is kept; the patch rows are laid out on ``source_grid`` and resized bicubically to
    ``target_grid`` (``align_corners=False``), as transformers' ViT ``interpolate_pos_encoding`` does. Computed
    in float32 and returned in the input's dtype. The same grid returns the input unchanged.

    Example:
        >>> delta = vector.tensors["vit.embeddings.position_embeddings"]       # (1, 1 + 8·8, 64)
        >>> resize_position_embeddings(delta, (8, 8), (12, 12)).shape
        torch.Size([1, 145, 64])
    """
    source_grid, target_grid = tuple(source_grid), tuple(target_grid)
    if position_embeddings.dim() != 3 or position_embeddings.shape[0] != 1:
        raise ValueError(
            f"Expected position embeddings of shape (1, 1 + h*w, D), got {tuple(position_embeddings.shape)}."
        )
    rows, columns = source_grid
    if position_embeddings.shape[1] != 1 + rows * columns:
        raise ValueError(
            f"Position embeddings with {position_embeddings.shape[1]} rows do not fit a {rows}×{columns} patch grid "
            f"(expected 1 + {rows * columns})."
        )
    if source_grid == target_grid:
        return position_embeddings
    dim = position_embeddings.shape[-1]
    class_row = position_embeddings[:, :1]
    patches = position_embeddings[:, 1:].to(torch.float32).reshape(1, rows, columns, dim).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches, size=target_grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, target_grid[0] * target_grid[1], dim)
    return torch.cat([class_row, patches.to(position_embeddings.dtype)], dim=1)


def grid_change(
    fingerprint: Mapping[str, Any], config: Any
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``(vector grid, model grid)`` when the vector (its architecture fingerprint) and the model config differ
    only in image size, else None (same size, or a difference a resize cannot bridge: then the compatibility
    check says what differs)."""
    model_image = _get(config, "image_size")
    if fingerprint.get("image_size") is None or model_image is None:
        return None
    if _pair(fingerprint["image_size"]) == _pair(model_image):
        return None
    if _pair(fingerprint.get("patch_size")) != _pair(_get(config, "patch_size")):
        return None
    return (
        patch_grid_of(fingerprint["image_size"], fingerprint["patch_size"]),
        patch_grid_of(model_image, _get(config, "patch_size")),
    )


def resized_shapes(
    shapes: Mapping[str, tuple[int, ...]], target_grid: tuple[int, int]
) -> dict[str, tuple[int, ...]]:
    """The vector's tensor shapes as they will be added to a model of ``target_grid``."""
    shapes = dict(shapes)
    if POSITION_EMBEDDINGS_KEY in shapes:
        *lead, _, dim = shapes[POSITION_EMBEDDINGS_KEY]
        shapes[POSITION_EMBEDDINGS_KEY] = (*lead, 1 + target_grid[0] * target_grid[1], dim)
    return shapes


def resizing_deltas(
    deltas: Iterator[tuple[str, torch.Tensor]], source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The vector's tensors as they arrive, the position embeddings' delta resized to ``target_grid``."""
    for key, delta in deltas:
        if key == POSITION_EMBEDDINGS_KEY:
            delta = resize_position_embeddings(delta, source_grid, target_grid)
        yield key, delta


def _pair(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


__all__ = ["POSITION_EMBEDDINGS_KEY", "grid_change", "patch_grid_of", "resize_position_embeddings"]
