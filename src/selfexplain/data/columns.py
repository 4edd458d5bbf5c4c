"""Names shared by every dataset of the package: columns, splits, the built-in prefix and image size."""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_FRACTIONS: tuple[float, ...] = (0.7, 0.1, 0.2)
BUILTIN_PREFIX = "builtin:"
MASK_COLUMN = "object_mask"
EXPLANATION_TARGETS_COLUMN = "explanation_targets"


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
