"""A task a tiny ViT learns in seconds, with Shapley-like targets: shared by the training and fault tests."""

from __future__ import annotations

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

IMAGE_SIZE = 16
LABELS = ["red", "green", "blue"]


def coloured_squares(num_examples: int, seed: int) -> Dataset:
    """The label is the colour of a bright 8x8 square in a random quadrant (one patch of an 8-pixel-patch ViT).
    Targets on the 2x2 player grid: +0.1 at the square for the true class, -0.05 there for the others."""
    rng = np.random.default_rng(seed)
    images, labels, targets = [], [], []
    for _ in range(num_examples):
        label, quadrant = int(rng.integers(0, 3)), int(rng.integers(0, 4))
        pixels = rng.integers(0, 60, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
        y, x = 8 * (quadrant // 2), 8 * (quadrant % 2)
        pixels[y : y + 8, x : x + 8, label] += 180
        target = np.zeros((3, 2, 2), dtype=np.float32)
        target[:, quadrant // 2, quadrant % 2] = -0.05
        target[label, quadrant // 2, quadrant % 2] = 0.1
        images.append(Image.fromarray(pixels))
        labels.append(label)
        targets.append(target)
    features = Features(
        {
            "image": ImageFeature(),
            "label": ClassLabel(names=LABELS),
            "explanation_targets": Array3D((3, 2, 2), "float32"),
        }
    )
    return Dataset.from_dict(
        {"image": images, "label": labels, "explanation_targets": targets}, features=features
    )
