"""The shared base θ0 of the offline experiments: a small ViT pre-trained on built-in domains."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import set_seed
from datasets import ClassLabel, Dataset, Features, concatenate_datasets
from transformers import (
    ViTConfig,
    ViTForImageClassification,
)

from ..data import (
    default_image_processor,
    load_builtin_domain,
)
from ..data import label_names as dataset_label_names
from ..modeling_self_explaining_vit import SELF_EXPLAINING_CONFIG_DEFAULTS
from ..vectors.config import BASE_MODEL_ATTRIBUTE
from .checkpoints import LOG_NAME, _write_json
from .config import TrainingConfig
from .distributed import cpu_only_launch
from .loop import train

# ----------------------------------------------------------------------------------------------------------
# The shared base θ0
# ----------------------------------------------------------------------------------------------------------


def pretrain_base(
    output_dir: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 64,
    layers: int = 4,
    heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    epochs: int = 8,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    domains: Sequence[str] = ("union",),
    num_samples: int | None = None,
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """Pre-train a small ViT θ0 on built-in domains: the base every offline model is fine-tuned from.

    Supervised classification on the training splits of ``domains`` (by default ``union``: the three digit
    domains and ``shapes-on-clutter``; ``faces`` stays unseen). Several domains are concatenated with
    ``"<domain>/<class>"`` labels. It runs the :func:`train` loop (λ = 0, same determinism, same
    ``accelerate`` support) from a seeded random initialisation and saves a plain
    ``ViTForImageClassification`` with ``save_pretrained`` plus its image processor, so fine-tunes load it
    like any Hub ViT and replace its head.

    Args:
        output_dir: folder of the base (also gets ``pretraining_log.jsonl`` and ``pretraining_metrics.json``).
        image_size, patch_size, hidden_size, layers, heads, intermediate_size: the ViT (intermediate size
            defaults to ``2 × hidden_size``).
        seed: seeds the initialisation, the data and the built-in domains.
        epochs, batch_size, learning_rate: the recipe (AdamW, cosine schedule, 10 % warmup, augmentation).
        domains: names of built-in domains (see ``selfexplain.data.BUILTIN_DOMAINS``).
        num_samples: size of each domain (default: the domain's default size).
        mixed_precision: as in :class:`TrainingConfig`.

    Returns:
        ``output_dir``, validation accuracy of the pre-training task, wall time and the run's metrics.

    Example:
        >>> info = pretrain_base("runs/base")          # a couple of minutes on 2 CPU cores
        >>> ViTForImageClassification.from_pretrained("runs/base").config.hidden_size
        64
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    train_split, validation_split = _pretraining_data(domains, seed, num_samples)
    names = dataset_label_names(train_split, "label")
    vit_config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    work = output_dir / ".pretraining"
    init_dir, run_dir = work / "init", work / "run"
    state = PartialState(cpu=cpu_only_launch())
    image_processor = default_image_processor(image_size)
    if state.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        set_seed(seed)
        ViTForImageClassification(vit_config).save_pretrained(init_dir)
        image_processor.save_pretrained(init_dir)
    state.wait_for_everyone()
    config = TrainingConfig(
        base=str(init_dir),
        output_dir=str(run_dir),
        num_epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=0.05,
        warmup_ratio=0.1,
        lr_scheduler="cosine",
        mixed_precision=mixed_precision,
        seed=seed,
        checkpoint_every=None,
        log_every=20,
        source_dataset=",".join(f"builtin:{d}" for d in domains),
    )
    metrics = train(config, train_split, validation_split, image_processor=image_processor)
    if state.is_main_process:
        _export_base(run_dir, output_dir, image_processor)
        shutil.copyfile(run_dir / LOG_NAME, output_dir / "pretraining_log.jsonl")
    result = {
        "output_dir": str(output_dir),
        "eval_accuracy": metrics.get("eval_accuracy"),
        "eval_loss": metrics.get("eval_loss"),
        "num_labels": len(names),
        "num_train_examples": len(train_split),
        "wall_time_s": time.perf_counter() - started,
        "domains": list(domains),
        "config": vit_config.to_diff_dict(),
    }
    if state.is_main_process:
        _write_json(output_dir / "pretraining_metrics.json", result)
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    return result


def _pretraining_data(domains: Sequence[str], seed: int, num_samples: int | None) -> tuple[Dataset, Dataset]:
    if isinstance(domains, str) or not domains:
        raise ValueError(f"domains must be a non-empty sequence of built-in domain names, got {domains!r}.")
    splits = {name: load_builtin_domain(name, seed=seed, num_samples=num_samples) for name in domains}
    if len(domains) == 1:
        only = splits[domains[0]]
        return only["train"].select_columns(["image", "label"]), only["validation"].select_columns(
            ["image", "label"]
        )
    names = [
        f"{domain}/{label}" for domain in domains for label in splits[domain]["train"].features["label"].names
    ]
    label_feature = ClassLabel(names=names)

    def relabel(split: str) -> Dataset:
        parts, offset = [], 0
        for domain in domains:
            part = splits[domain][split].select_columns(["image", "label"])
            num_classes = part.features["label"].num_classes
            features = Features({"image": part.features["image"], "label": label_feature})
            parts.append(
                part.map(_shift_labels, batched=True, fn_kwargs={"offset": offset}, features=features)
            )
            offset += num_classes
        return concatenate_datasets(parts)

    return relabel("train"), relabel("validation")


def _shift_labels(batch: dict[str, list[Any]], offset: int) -> dict[str, list[int]]:
    return {"label": [label + offset for label in batch["label"]]}


def _export_base(run_dir: Path, output_dir: Path, image_processor: Any) -> None:
    """Save the trained weights as a plain ``ViTForImageClassification`` (no selfexplain-specific config)."""
    model = ViTForImageClassification.from_pretrained(run_dir)
    config = model.config
    for key in (
        *SELF_EXPLAINING_CONFIG_DEFAULTS,
        BASE_MODEL_ATTRIBUTE,
        "selfexplain_recipe",
        "selfexplain_source_dataset",
        "auto_map",
    ):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [ViTForImageClassification.__name__]
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
