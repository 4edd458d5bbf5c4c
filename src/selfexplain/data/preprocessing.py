"""ViT preprocessing of image-classification examples: the offline image processor, the training
and evaluation transform (deterministic augmentation), and batching.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .columns import EXPLANATION_TARGETS_COLUMN, IMAGE_SIZE, MASK_COLUMN, check_seed

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
            check_seed(augment_seed)
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
