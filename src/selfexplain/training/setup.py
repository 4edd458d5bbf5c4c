"""What a run starts from: the model loaded from its base with the run's labels, the image processor, the
optimizer, and the checks on the datasets.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Array2D, Array3D, ClassLabel, Dataset
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    PretrainedConfig,
    ViTConfig,
)

from .._load_report import quiet_load_report
from ..data import (
    default_image_processor,
)
from ..data import label_names as dataset_label_names
from ..evaluation.metrics import load_accuracy_metric
from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification
from ..vectors.config import BASE_MODEL_ATTRIBUTE
from .config import TrainingConfig
from .sampling import _HEAD_STREAM

logger = logging.getLogger(__name__)


def _label_names(dataset: Dataset, label_column: str, label_names: Sequence[str] | None) -> list[str]:
    if label_names is None:
        return dataset_label_names(dataset, label_column)
    names = [str(name) for name in label_names]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"label_names must be unique and non-empty, got {names}.")
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel) and feature.num_classes != len(names):
        raise ValueError(
            f"label_names has {len(names)} names but column {label_column!r} has {feature.num_classes} classes."
        )
    return names


def _check_targets_column(dataset: Dataset, column: str, num_labels: int) -> None:
    if column not in dataset.column_names:
        raise ValueError(
            f"explanation_loss_weight > 0 needs a {column!r} column of explanation targets in train_dataset "
            f"(columns: {dataset.column_names}); compute it with selfexplain.targets.add_explanation_targets."
        )
    feature = dataset.features[column]
    if isinstance(feature, Array3D) and feature.shape[0] != num_labels:
        raise ValueError(
            f"Column {column!r} holds targets for {feature.shape[0]} classes, the dataset has {num_labels} labels."
        )
    if not isinstance(feature, (Array3D, Array2D)):
        raise ValueError(
            f"Column {column!r} must be an Array3D (num_labels, gh, gw) or Array2D (gh, gw), got {feature}."
        )


def _check_eval_dataset(dataset: Dataset, image_column: str, label_column: str, names: Sequence[str]) -> None:
    missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"eval_dataset lacks the column(s) {missing} of train_dataset; it has {dataset.column_names}."
        )
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel) and list(feature.names) != list(names):
        raise ValueError(
            f"eval_dataset's labels {feature.names} differ from the training labels {list(names)}."
        )


def _load_model(config: TrainingConfig, names: Sequence[str]) -> ViTForSelfExplainingClassification:
    """Load the base with a classifier for ``names``; a fresh head (seeded) when the base's labels differ."""
    base_config = AutoConfig.from_pretrained(config.base, revision=config.base_revision)
    if not isinstance(base_config, ViTConfig):
        raise ValueError(f"base={config.base!r} is a {type(base_config).__name__} model; a ViT is needed.")
    base_names = [base_config.id2label[i] for i in range(base_config.num_labels)]
    new_head = base_names != list(names)
    # A new label set re-initialises the classifier on purpose: transformers' load report would show it as a
    # size MISMATCH. It is silenced then, and anything else that did not load is reported below instead.
    head = {}
    if config.explanation_head is not None:
        head = {"explanation_head": config.explanation_head}
        if config.explanation_head == "extension":
            head["explanation_extension_layers"] = config.explanation_extension_layers
            head["explanation_extension_input_layer"] = config.explanation_extension_input_layer
            head["explanation_extension_route"] = config.explanation_extension_route
    new_extension = config.explanation_head == "extension" and (
        getattr(base_config, "explanation_head", "shared") != "extension"
    )
    with quiet_load_report() if new_head or new_extension else contextlib.nullcontext():
        model, info = ViTForSelfExplainingClassification.from_pretrained(
            config.base,
            revision=config.base_revision,
            **head,
            # `num_labels` follows from `id2label` (passing both warns when the base has another label count).
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    not_loaded = sorted(
        {_key_name(key) for kind in ("missing_keys", "mismatched_keys") for key in info.get(kind, ())}
    )
    surprising = [
        key
        for key in not_loaded
        if not (new_head and key.startswith("classifier."))
        and not (new_extension and key.startswith("explainer."))
    ]
    if surprising:
        logger.warning(
            "%s: these weights were not loaded from the base and start random: %s", config.base, surprising
        )
    if new_head:
        _reset_classifier(model, config.seed)
        logger.info(
            "New classifier for %d labels (the base has %d): initialised from seed %d.",
            len(names),
            len(base_names),
            config.seed,
        )
    model.config.explanation_loss_weight = float(config.explanation_loss_weight)
    model.config.explanation_loss = config.explanation_loss
    if config.explanation_target_scale is not None:
        model.config.explanation_target_scale = config.explanation_target_scale
    # The base a model shares with others is the root of its fine-tuning chain.
    setattr(
        model.config, BASE_MODEL_ATTRIBUTE, getattr(base_config, BASE_MODEL_ATTRIBUTE, None) or config.base
    )
    model.config.selfexplain_recipe = config.recipe
    if config.source_dataset is not None:
        model.config.selfexplain_source_dataset = config.source_dataset
    if config.targets_info is not None and config.explanation_loss_weight > 0:
        model.config.selfexplain_targets = dict(config.targets_info)
    if config.uses_shapley_objective:
        model.config.selfexplain_targets = {
            "method": "amortized_shapley",
            "value_model": config.value_model,
            "coalitions_per_image": config.coalitions_per_image,
            **({"coalition_pool": config.coalition_pool} if config.coalition_pool is not None else {}),
            "baseline": config.removal_baseline,
            "value": config.explanation_game,
            **(config.targets_info or {}),
        }
        if config.extension_hosts:  # what else the extension learnt to explain (provenance)
            model.config.selfexplain_targets["extension_hosts"] = [dict(h) for h in config.extension_hosts]
    if config.trainable == "extension":
        if model.explainer is None:
            raise ValueError(
                f'trainable="extension" needs an explanation extension: {config.base} has none; pass '
                'explanation_head="extension".'
            )
        model.requires_grad_(False)
        model.explainer.requires_grad_(True)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def _key_name(key: Any) -> str:
    """A key of transformers' loading info: a name, or a ``(name, shape, shape)`` tuple for mismatches."""
    return key[0] if isinstance(key, (tuple, list)) else str(key)


def _load_value_model(
    config: TrainingConfig, names: Sequence[str], device: torch.device, hidden_size: int | None = None
) -> nn.Module:
    """The frozen classifier whose class probabilities define v(S) for the amortised Shapley objective.

    It must score the training labels in the same order (its probabilities are what the explanation of each
    class is fitted to); usually the prediction-only model trained with the same recipe. For the
    representation game its CLS token is the value, so its ``hidden_size`` must be the model's.
    """
    model = ViTForSelfExplainingClassification.from_pretrained(config.value_model)
    theirs = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if theirs != list(names) and config.explanation_game == "probs":  # the representation has no labels
        raise ValueError(
            f"value_model={config.value_model!r} scores the labels {theirs}, the training data has {list(names)}; "
            "the value model must be a classifier of the same label set (e.g. the prediction-only model)."
        )
    if config.explanation_game == "representation" and model.config.hidden_size != hidden_size:
        raise ValueError(
            f'explanation_game="representation": value_model={config.value_model!r} has hidden_size '
            f"{model.config.hidden_size}, the model {hidden_size}; the extension's tokens are fitted to the value "
            "model's representation, so it must be the model's own backbone (e.g. the prediction-only model)."
        )
    model.requires_grad_(False)
    return model.to(device).eval()


def _reset_classifier(model: ViTForSelfExplainingClassification, seed: int) -> None:
    """A new head for a new label set, initialised as transformers does (normal(0, initializer_range), zero
    bias) from a generator of its own, so it is the same for every λ and every process."""
    state = np.random.SeedSequence([seed, 0, _HEAD_STREAM]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) & (2**63 - 1))
    with torch.no_grad():
        weight = torch.empty(model.classifier.weight.shape, dtype=torch.float32)
        weight.normal_(0.0, model.config.initializer_range, generator=generator)
        model.classifier.weight.copy_(weight)
        model.classifier.bias.zero_()


def _resolve_image_processor(
    image_processor: Any | None, config: TrainingConfig, model_config: PretrainedConfig
) -> Any:
    if image_processor is not None:
        return image_processor
    try:
        return AutoImageProcessor.from_pretrained(config.base, revision=config.base_revision)
    except (OSError, ValueError):
        logger.warning(
            "%s has no image processor; using selfexplain.data.default_image_processor(%d).",
            config.base,
            model_config.image_size,
        )
        return default_image_processor(model_config.image_size)


def _make_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    # As transformers' Trainer: no weight decay on biases and normalisation weights (the 1-d parameters).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _accuracy_metric() -> Any:
    # keep_in_memory: no cache files, so every process can compute on the gathered predictions.
    return load_accuracy_metric(keep_in_memory=True)
