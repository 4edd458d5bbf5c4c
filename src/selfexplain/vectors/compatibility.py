"""Does a vector fit a model? Every difference between their architectures, listed (empty when they fit)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

#: Config fields that must agree between a vector and a model for the vector to apply.
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "image_size",
    "num_channels",
    "qkv_bias",
    "hidden_act",
)


def architecture_fingerprint(config: PretrainedConfig) -> dict[str, Any]:
    """The architecture facts of a ViT config that decide whether a vector fits it (JSON-friendly)."""
    fingerprint = {}
    for name in FINGERPRINT_FIELDS:
        value = getattr(config, name, None)
        fingerprint[name] = list(value) if isinstance(value, (tuple, list)) else value
    return fingerprint


def check_compatible(fingerprint: dict[str, Any], model_type: str, config: PretrainedConfig) -> list[str]:
    """List every difference between a vector's architecture and a model config (empty when compatible)."""
    problems = []
    if config.model_type != model_type:
        problems.append(f"model_type: vector {model_type!r}, model {config.model_type!r}")
    theirs = architecture_fingerprint(config)
    for name in FINGERPRINT_FIELDS:
        if name in fingerprint and fingerprint[name] != theirs[name]:
            problems.append(f"{name}: vector {fingerprint[name]!r}, model {theirs[name]!r}")
    return problems
