"""Tiny ViT configs and models shared by the tests (random weights, milliseconds per forward)."""

from __future__ import annotations

import torch
from transformers import ViTConfig, ViTForImageClassification

from selfexplain import ViTForSelfExplainingClassification


def tiny_config(**overrides) -> ViTConfig:
    kwargs = dict(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def tiny_classifier(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_config(**overrides)).eval()


def tiny_self_explaining(seed: int = 0, **overrides) -> ViTForSelfExplainingClassification:
    torch.manual_seed(seed)
    return ViTForSelfExplainingClassification(tiny_config(**overrides)).eval()


def pixels(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
