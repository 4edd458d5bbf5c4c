"""One `accelerate` training loop for prediction-only (λ = 0) and self-explaining (λ > 0) ViT classifiers.

An explanation vector is the difference between two fine-tunes of one base (DESIGN.md §1): one with the
explanation loss (λ > 0), one without (λ = 0). For that difference to isolate what the supervision changed,
both runs must see the same data in the same order with the same augmentation. :func:`train` guarantees it:

- The data order of every epoch is a permutation drawn from ``(seed, epoch)`` alone, with its own
  ``torch.Generator``; the augmentation of an example depends only on ``(seed, epoch, example index)``
  (see :class:`selfexplain.data.ImageClassificationTransform`). Neither touches the global RNG, so the model's
  own randomness (dropout, the new head's initialisation) cannot shift the data, and λ changes nothing but the
  loss. ``explanation_targets`` are not even read when λ = 0.
- Every optimizer step consumes one *global* batch of ``batch_size × num_processes ×
  gradient_accumulation_steps`` examples; process ``r`` takes slice ``r`` of each micro-batch. One process
  with batch 2b and two processes with batch b therefore make the same updates (up to float rounding).
  Incomplete global batches at the end of an epoch are dropped.
- Checkpoints (``accelerator.save_state`` plus ``trainer_state.json``) are written to a temporary folder that
  is renamed when complete. Resuming restores weights, optimizer, scheduler and RNG states and continues at
  the exact position in the data, so an interrupted run ends with the weights of an uninterrupted one.

Launch on several processes with ``accelerate launch``; on a CPU-only machine
``accelerate launch --multi_gpu --num_processes 2 -m selfexplain.training --config cfg.json ...`` runs on
``MULTI_CPU`` with gloo (:func:`train` asks accelerate for CPU processes when no accelerator is available).

Example:
    >>> from selfexplain.data import load_builtin_domain
    >>> from selfexplain.training import TrainingConfig, train
    >>> data = load_builtin_domain("mnist")
    >>> config = TrainingConfig(base="runs/base", output_dir="runs/mnist-pred", explanation_loss_weight=0.0)
    >>> metrics = train(config, data["train"], data["validation"])
    >>> metrics["eval_accuracy"]
    0.97
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed
from datasets import Array2D, Array3D, ClassLabel, Dataset, Features, concatenate_datasets
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    PretrainedConfig,
    ViTConfig,
    ViTForImageClassification,
    enable_full_determinism,
    get_scheduler,
)

from .apply import BASE_MODEL_ATTRIBUTE
from .data import (
    build_transform,
    collate_fn,
    default_image_processor,
    detect_columns,
    load_builtin_domain,
    load_image_dataset,
)
from .data import label_names as dataset_label_names
from .modeling_self_explaining_vit import SELF_EXPLAINING_CONFIG_DEFAULTS, ViTForSelfExplainingClassification

__all__ = [
    "CHECKPOINTS_DIR",
    "LOG_NAME",
    "TrainingConfig",
    "add_train_arguments",
    "cpu_only_launch",
    "epoch_order",
    "latest_checkpoint",
    "main",
    "pretrain_base",
    "train",
    "train_from_args",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LOG_NAME = "log.jsonl"
BATCHES_LOG_NAME = "batches.jsonl"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_CONFIG_NAME = "training_config.json"
METRICS_NAME = "metrics.json"
EXPLANATION_TARGETS_COLUMN = "explanation_targets"
INDEX_KEY = "example_index"

EXPLANATION_LOSSES: tuple[str, ...] = ("mse", "pearson")
LR_SCHEDULERS: tuple[str, ...] = (
    "cosine",
    "linear",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
_CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-"
# Streams of `numpy.random.SeedSequence([seed, epoch, stream])`; distinct so data order and head init never
# share random numbers.
_ORDER_STREAM = 0
_HEAD_STREAM = 1


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainingConfig:
    """The recipe of one fine-tuning run. Two runs that differ only in ``explanation_loss_weight`` see the
    same data, in the same order, with the same augmentation.

    Args:
        base: Hub id or folder of the base model θ0 (any ViT; a new classifier head is created when its
            labels differ from the dataset's).
        output_dir: where the final model, ``log.jsonl``, ``metrics.json`` and ``checkpoints/`` go.
        explanation_loss_weight: λ. ``0`` trains a prediction-only model (targets are ignored); ``> 0`` needs
            an ``explanation_targets`` column (see :func:`selfexplain.targets.add_explanation_targets`).
        explanation_loss: ``"mse"`` or ``"pearson"`` (see ``ViTForSelfExplainingClassification``).
        explanation_target_scale: overrides the model's ``explanation_target_scale`` (``None``: keep).
        num_epochs: passes over the training data (``max_steps`` may stop earlier).
        max_steps: total optimizer steps; when set, it defines the length of the schedule.
        batch_size: examples per device per micro-batch. Global batch =
            ``batch_size × num_processes × gradient_accumulation_steps``.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate, weight_decay: AdamW settings (no decay on biases and norms).
        warmup_ratio: share of the optimizer steps with a linear warmup.
        lr_scheduler: ``"cosine"`` or ``"linear"`` (or another ``transformers.get_scheduler`` name in
            :data:`LR_SCHEDULERS`).
        max_grad_norm: gradient clipping (``None``: off).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (passed to ``Accelerator``).
        gradient_checkpointing: trade compute for memory.
        seed: seeds the head initialisation, the data order, the augmentation and the global RNGs.
        full_determinism: also force deterministic kernels (``transformers.enable_full_determinism``); slower
            on GPUs. CPU runs are deterministic without it.
        augment: random translation of up to ``max_shift`` pixels (see ``selfexplain.data``). Targets stay on
            the patch grid, so keep ``max_shift`` small next to the patch size for λ > 0.
        evaluate_every_epoch: evaluate ``eval_dataset`` at the end of every epoch (and at the end).
        eval_batch_size: per-device evaluation batch (default: ``batch_size``).
        checkpoint_every: ``"epoch"``, a number of optimizer steps, or ``None`` for no checkpoints.
        save_total_limit: keep only the newest checkpoints (``None``: keep all).
        resume: ``True`` continues from the newest complete checkpoint in ``output_dir`` (or starts fresh when
            there is none); a path continues from that checkpoint.
        push_to_hub: push the final model to ``hub_model_id`` (default: the output folder's name).
        hub_model_id, hub_private, hub_token: Hub settings (``hub_token`` is never written to disk).
        num_workers: ``DataLoader`` workers per process.
        log_every: log the mean losses every this many optimizer steps (and at the last step).
        record_batches: write the example indices and a pixel digest of every micro-batch to
            ``batches.jsonl`` (proves that two runs saw the same data).
        image_column, label_column: override the detected dataset columns.
        targets_column: column of the explanation targets.
        base_revision: revision of ``base`` on the Hub.
        source_dataset: recorded in the model config (``selfexplain_source_dataset``) for provenance.
        targets_info: how the targets were made (e.g. ``{"method": "kernel_shap", "budget": 150}``), recorded
            as ``selfexplain_targets`` when λ > 0.

    Example:
        >>> config = TrainingConfig(base="runs/base", output_dir="runs/se", explanation_loss_weight=1.0,
        ...                         num_epochs=5, batch_size=64, learning_rate=3e-4)
        >>> config.to_json_file("se.json"); TrainingConfig.from_json_file("se.json") == config
        True
    """

    base: str
    output_dir: str
    explanation_loss_weight: float = 0.0
    explanation_loss: str = "mse"
    explanation_target_scale: str | float | None = None
    num_epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    full_determinism: bool = False
    augment: bool = True
    max_shift: int = 2
    evaluate_every_epoch: bool = True
    eval_batch_size: int | None = None
    checkpoint_every: int | str | None = "epoch"
    save_total_limit: int | None = 2
    resume: bool | str = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    hub_token: str | None = field(default=None, repr=False)
    num_workers: int = 0
    log_every: int = 10
    record_batches: bool = False
    image_column: str | None = None
    label_column: str | None = None
    targets_column: str = EXPLANATION_TARGETS_COLUMN
    base_revision: str | None = None
    source_dataset: str | None = None
    targets_info: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.base = os.fspath(self.base)
        self.output_dir = os.fspath(self.output_dir)
        if isinstance(self.checkpoint_every, str) and self.checkpoint_every.isdigit():
            self.checkpoint_every = int(self.checkpoint_every)
        if isinstance(self.checkpoint_every, str) and self.checkpoint_every.lower() in ("none", "no"):
            self.checkpoint_every = None
        if isinstance(self.resume, os.PathLike):
            self.resume = os.fspath(self.resume)
        self._validate()

    def _validate(self) -> None:
        _check(
            self.explanation_loss_weight >= 0, "explanation_loss_weight", self.explanation_loss_weight, ">= 0"
        )
        _check(
            self.explanation_loss in EXPLANATION_LOSSES,
            "explanation_loss",
            self.explanation_loss,
            f"one of {EXPLANATION_LOSSES}",
        )
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "log_every"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, value, "a positive int")
        for name in ("max_steps", "eval_batch_size", "save_total_limit"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= 1), name, value, "a positive int or None")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _check(
            self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", self.lr_scheduler, f"one of {LR_SCHEDULERS}"
        )
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            self.max_grad_norm,
            "> 0 or None",
        )
        _check(
            self.mixed_precision in MIXED_PRECISIONS,
            "mixed_precision",
            self.mixed_precision,
            f"one of {MIXED_PRECISIONS}",
        )
        _check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "a non-negative int")
        _check(
            _is_int(self.max_shift) and self.max_shift >= 0, "max_shift", self.max_shift, "a non-negative int"
        )
        _check(
            _is_int(self.num_workers) and self.num_workers >= 0,
            "num_workers",
            self.num_workers,
            "a non-negative int",
        )
        every = self.checkpoint_every
        _check(
            every is None or every == "epoch" or (_is_int(every) and every >= 1),
            "checkpoint_every",
            every,
            '"epoch", a positive number of steps or None',
        )
        _check(isinstance(self.resume, (bool, str)), "resume", self.resume, "a bool or a checkpoint path")

    @property
    def recipe(self) -> dict[str, Any]:
        """The settings that define the data and optimisation, identical for the λ = 0 / λ > 0 pair."""
        keys = (
            "base", "num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate",
            "weight_decay", "warmup_ratio", "lr_scheduler", "max_grad_norm", "mixed_precision", "seed",
            "augment", "max_shift",
        )  # fmt: skip
        return {key: getattr(self, key) for key in keys}

    def to_dict(self) -> dict[str, Any]:
        """All fields except ``hub_token`` (a secret never written to disk)."""
        values = dataclasses.asdict(self)
        values.pop("hub_token")
        return values

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> TrainingConfig:
        """Read a config written by :meth:`to_json_file` (or by hand); ``overrides`` replace its fields."""
        values = json.loads(Path(path).read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object of TrainingConfig fields.")
        values.update(overrides)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown TrainingConfig field(s) {unknown}.")
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainingConfig.{name} must be {expected}, got {value!r}.")


# ----------------------------------------------------------------------------------------------------------
# Data order and batches
# ----------------------------------------------------------------------------------------------------------


def epoch_order(seed: int, epoch: int, num_examples: int) -> torch.Tensor:
    """The order in which the examples are visited in ``epoch``: a permutation that depends on
    ``(seed, epoch)`` only (its own generator; the global RNGs are neither used nor advanced).

    Example:
        >>> epoch_order(0, 1, 5).tolist() == epoch_order(0, 1, 5).tolist()
        True
    """
    state = np.random.SeedSequence([seed, epoch, _ORDER_STREAM]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) & (2**63 - 1))
    return torch.randperm(num_examples, generator=generator)


@dataclass(frozen=True)
class _Schedule:
    """How many examples and steps an epoch and the run have, for a given process layout."""

    num_examples: int
    batch_size: int  # per device, per micro-batch
    num_processes: int
    accumulation: int
    num_epochs: int
    max_steps: int | None

    @property
    def global_micro_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def global_batch(self) -> int:
        return self.global_micro_batch * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    @property
    def total_steps(self) -> int:
        planned = self.num_epochs * self.steps_per_epoch
        return planned if self.max_steps is None else self.max_steps

    @property
    def epochs_needed(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


class _EpochBatches:
    """Batch sampler of one epoch for one process: keys ``(epoch, index)`` of slice ``process_index`` of every
    global micro-batch, starting after ``skip_micro_batches`` (to resume mid-epoch)."""

    def __init__(
        self, schedule: _Schedule, seed: int, epoch: int, process_index: int, skip_micro_batches: int = 0
    ) -> None:
        self.schedule = schedule
        self.seed = seed
        self.epoch = epoch
        self.process_index = process_index
        self.skip = skip_micro_batches

    def __len__(self) -> int:
        return self.schedule.steps_per_epoch * self.schedule.accumulation - self.skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.schedule
        order = epoch_order(self.seed, self.epoch, s.num_examples).tolist()
        for micro in range(self.skip, s.steps_per_epoch * s.accumulation):
            start = micro * s.global_micro_batch + self.process_index * s.batch_size
            yield [(self.epoch, index) for index in order[start : start + s.batch_size]]


class _Examples(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` keyed by ``(epoch, index)`` and passed through the data transform.

    The key carries the epoch so that augmentation is right in ``DataLoader`` workers too (they hold copies of
    the transform, whose ``set_epoch`` would not reach them).
    """

    def __init__(self, dataset: Dataset, transform: Any, columns: dict[str, str]) -> None:
        # `columns`: dataset column -> name the transform expects.
        # Raw rows: a format or transform the caller set on the dataset would be applied twice otherwise.
        self.dataset = dataset.with_format(None).select_columns(list(columns))
        if EXPLANATION_TARGETS_COLUMN in columns.values():
            source = next(k for k, v in columns.items() if v == EXPLANATION_TARGETS_COLUMN)
            self.dataset = self.dataset.with_format("numpy", columns=[source], output_all_columns=True)
        self.transform = transform
        self.columns = columns

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        epochs = {epoch for epoch, _ in keys}
        if len(epochs) != 1:
            raise ValueError(f"A batch must come from one epoch, got keys of epochs {sorted(epochs)}.")
        indices = [index for _, index in keys]
        rows = self.dataset[indices]
        batch = {self.columns[name]: values for name, values in rows.items()}
        batch[INDEX_KEY] = indices
        self.transform.set_epoch(epochs.pop())
        output = self.transform(batch)
        examples = [dict(zip(output, values, strict=True)) for values in zip(*output.values(), strict=True)]
        for example, index in zip(examples, indices, strict=True):
            example[INDEX_KEY] = index
        return examples


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = collate_fn(examples)
    batch[INDEX_KEY] = torch.tensor([example[INDEX_KEY] for example in examples], dtype=torch.long)
    return batch


def _loader(examples: _Examples, batch_sampler: Any, num_workers: int) -> DataLoader:
    # A private generator: creating the iterator draws a worker base seed, which must not advance the
    # global RNG (it drives dropout, and it is saved in checkpoints).
    return DataLoader(
        examples,
        batch_sampler=batch_sampler,
        collate_fn=_collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train(
    config: TrainingConfig,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    image_processor: Any | None = None,
    label_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``config.base`` on ``train_dataset``; prediction-only when λ = 0, self-explaining when λ > 0.

    Args:
        config: the recipe (see :class:`TrainingConfig`).
        train_dataset: a ``datasets.Dataset`` with an image and a label column (and, for λ > 0, the
            ``config.targets_column`` of explanation targets shaped ``(num_labels, gh, gw)`` or ``(gh, gw)``).
        eval_dataset: evaluated with accuracy at the end of every epoch when given.
        image_processor: preprocessing; default: the base's own (``AutoImageProcessor``), else
            :func:`selfexplain.data.default_image_processor` at the model's image size.
        label_names: class names, index = label id; default: the label column's ``ClassLabel`` names.

    Returns:
        Final metrics: ``output_dir``, ``global_step``, ``epoch``, ``train_loss`` (and its parts, mean over the
        last logging window), ``eval_accuracy`` and ``eval_loss`` when evaluated, ``train_runtime`` (s),
        ``resumed_from``, and ``hub_commit`` after a push.

    Example:
        >>> cfg = TrainingConfig(base="runs/base", output_dir="runs/se", explanation_loss_weight=1.0)
        >>> train(cfg, train_with_targets, validation)["eval_accuracy"]
        0.96
    """
    started = time.perf_counter()
    accelerator = _make_accelerator(config)
    if config.full_determinism:
        enable_full_determinism(config.seed)
    else:
        set_seed(config.seed)
    image_column, label_column = detect_columns(train_dataset, config.image_column, config.label_column)
    names = _label_names(train_dataset, label_column, label_names)
    with_targets = config.explanation_loss_weight > 0
    if with_targets:
        _check_targets_column(train_dataset, config.targets_column, len(names))
    if eval_dataset is not None:
        _check_eval_dataset(eval_dataset, image_column, label_column, names)

    model = _load_model(config, names)
    image_processor = _resolve_image_processor(image_processor, config, model.config)
    columns = {image_column: "image", label_column: "label"}
    if with_targets:
        columns[config.targets_column] = EXPLANATION_TARGETS_COLUMN
    train_transform = build_transform(
        image_processor,
        "image",
        "label",
        train=config.augment,
        augment_seed=config.seed,
        max_shift=config.max_shift,
    )
    train_examples = _Examples(train_dataset, train_transform, columns)
    schedule = _Schedule(
        num_examples=len(train_dataset),
        batch_size=config.batch_size,
        num_processes=accelerator.num_processes,
        accumulation=config.gradient_accumulation_steps,
        num_epochs=config.num_epochs,
        max_steps=config.max_steps,
    )
    if schedule.steps_per_epoch == 0:
        raise ValueError(
            f"train_dataset has {len(train_dataset)} examples, fewer than one global batch "
            f"({config.batch_size} per device × {accelerator.num_processes} processes × "
            f"{config.gradient_accumulation_steps} accumulation steps = {schedule.global_batch})."
        )

    logger.info(
        "Training %s (λ = %s) on %d process(es) [%s, %s]: %d examples, global batch %d, %d steps.",
        config.base,
        config.explanation_loss_weight,
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.device,
        len(train_dataset),
        schedule.global_batch,
        schedule.total_steps,
    )
    optimizer = _make_optimizer(model, config)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * schedule.total_steps),
        num_training_steps=schedule.total_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    # Stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
    accelerator.register_for_checkpointing(scheduler)

    output_dir = Path(config.output_dir)
    run = _Run(config, accelerator, model, optimizer, scheduler, schedule, output_dir)
    run.resume_if_asked()
    eval_examples = None
    if eval_dataset is not None:
        eval_transform = build_transform(image_processor, "image", "label", train=False)
        eval_examples = _Examples(
            eval_dataset, eval_transform, {image_column: "image", label_column: "label"}
        )
    run.fit(train_examples, eval_examples)

    result = run.finish(image_processor, names)
    result["train_runtime"] = time.perf_counter() - started
    if accelerator.is_main_process:
        _write_json(output_dir / METRICS_NAME, result)
    return result


class _Run:
    """State and steps of one training run (kept together so that checkpoints capture all of it)."""

    def __init__(
        self,
        config: TrainingConfig,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        schedule: _Schedule,
        output_dir: Path,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.schedule = schedule
        self.output_dir = output_dir
        self.global_step = 0
        self.epoch = 0  # epoch in progress
        self.step_in_epoch = 0  # optimizer steps done in `epoch`
        self.eval_history: list[dict[str, Any]] = []
        self.last_train_log: dict[str, Any] = {}
        self.resumed_from: str | None = None
        self._window = _LossWindow(accelerator.device)
        self._metric: Any = None

    # --- resume -------------------------------------------------------------------------------------------

    def resume_if_asked(self) -> None:
        resume = self.config.resume
        if resume is False:
            if self.accelerator.is_main_process:
                # A fresh run owns its folder: stale logs and checkpoints of an earlier run would be mixed
                # into this one's (and a later resume could pick an old checkpoint).
                self.output_dir.mkdir(parents=True, exist_ok=True)
                for name in (LOG_NAME, BATCHES_LOG_NAME):
                    (self.output_dir / name).unlink(missing_ok=True)
                shutil.rmtree(self.output_dir / CHECKPOINTS_DIR, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            return
        checkpoint = latest_checkpoint(self.output_dir) if resume is True else Path(resume)
        if checkpoint is None:
            logger.info(
                "resume=True but %s holds no complete checkpoint: starting from scratch.", self.output_dir
            )
            self.config = dataclasses.replace(self.config, resume=False)
            self.resume_if_asked()
            return
        if not (checkpoint / TRAINER_STATE_NAME).is_file():
            raise ValueError(
                f"resume={str(resume)!r}: {checkpoint} is not a complete checkpoint (no {TRAINER_STATE_NAME})."
            )
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
        self._check_resumable(state, checkpoint)
        self.accelerator.load_state(str(checkpoint))
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.eval_history = state["eval_history"]
        self.last_train_log = state["last_train_log"]
        self._window.load_state_dict(state["loss_windows"][self.accelerator.process_index])
        self.resumed_from = str(checkpoint)
        if self.accelerator.is_main_process:
            # Records written after the checkpoint by the interrupted run are replayed, so drop them.
            _truncate_jsonl(self.output_dir / LOG_NAME, self.global_step, self.eval_history)
            _truncate_jsonl(self.output_dir / BATCHES_LOG_NAME, self.global_step)
        self.accelerator.wait_for_everyone()
        logger.info("Resumed from %s at step %d (epoch %d).", checkpoint, self.global_step, self.epoch)

    def _check_resumable(self, state: dict[str, Any], checkpoint: Path) -> None:
        expected = {
            "global_batch_size": self.schedule.global_batch,
            "num_examples": self.schedule.num_examples,
            "total_steps": self.schedule.total_steps,
            "explanation_loss_weight": self.config.explanation_loss_weight,
            **{f"recipe.{k}": v for k, v in self.config.recipe.items()},
        }
        saved = {**state, **{f"recipe.{k}": v for k, v in state.get("recipe", {}).items()}}
        different = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        if different:
            details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in different.items())
            raise ValueError(f"Cannot resume from {checkpoint}: the run differs ({details}).")

    # --- the loop -----------------------------------------------------------------------------------------

    def fit(self, train_examples: _Examples, eval_examples: _Examples | None) -> None:
        schedule, accelerator = self.schedule, self.accelerator
        bar = tqdm(
            total=schedule.total_steps,
            initial=self.global_step,
            desc="training",
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        while self.global_step < schedule.total_steps:
            batches = _EpochBatches(
                schedule,
                self.config.seed,
                self.epoch,
                accelerator.process_index,
                skip_micro_batches=self.step_in_epoch * schedule.accumulation,
            )
            micro_batches = iter(_loader(train_examples, batches, self.config.num_workers))
            while self.step_in_epoch < schedule.steps_per_epoch and self.global_step < schedule.total_steps:
                self._optimizer_step(micro_batches)
                bar.update(1)
                if self.last_train_log:
                    bar.set_postfix(loss=self.last_train_log["loss"], refresh=False)
                if (
                    _is_int(self.config.checkpoint_every)
                    and self.global_step % self.config.checkpoint_every == 0
                    # Not at the last step: that checkpoint would predate the final evaluation, which a run
                    # resumed from it would skip (the final state is the saved model anyway).
                    and self.global_step < schedule.total_steps
                ):
                    self.save_checkpoint()
            epoch_done = self.step_in_epoch == schedule.steps_per_epoch
            if eval_examples is not None and (
                (epoch_done and self.config.evaluate_every_epoch) or self.global_step == schedule.total_steps
            ):
                self.evaluate(eval_examples)
            if epoch_done:
                self.epoch += 1
                self.step_in_epoch = 0
                if self.config.checkpoint_every == "epoch":
                    self.save_checkpoint()
        bar.close()

    def _optimizer_step(self, micro_batches: Iterator[dict[str, torch.Tensor]]) -> None:
        accelerator, config = self.accelerator, self.config
        self.model.train()
        for micro in range(self.schedule.accumulation):
            batch = next(micro_batches)
            if config.record_batches:
                self._record_batch(batch, micro)
            last = micro == self.schedule.accumulation - 1
            # Gradients are only all-reduced on the last micro-batch of a step.
            with accelerator.no_sync(self.model) if not last else contextlib.nullcontext():
                output = self.model(
                    pixel_values=batch["pixel_values"].to(accelerator.device),
                    labels=batch["labels"].to(accelerator.device),
                    explanation_targets=(
                        batch[EXPLANATION_TARGETS_COLUMN].to(accelerator.device)
                        if config.explanation_loss_weight > 0
                        else None
                    ),
                    explain=None,
                )
                accelerator.backward(output.loss / self.schedule.accumulation)
            self._window.add(output)
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.step_in_epoch += 1
        if self.global_step % config.log_every == 0 or self.global_step == self.schedule.total_steps:
            self._log_window(lr)

    def _log_window(self, lr: float) -> None:
        means = self._window.reduce(self.accelerator)
        record = {
            "type": "train",
            "step": self.global_step,
            "epoch": round(self.epoch + self.step_in_epoch / self.schedule.steps_per_epoch, 4),
            **means,
            "lr": lr,
        }
        self.last_train_log = record
        if self.accelerator.is_main_process:
            _append_jsonl(self.output_dir / LOG_NAME, record)

    def _record_batch(self, batch: dict[str, torch.Tensor], micro: int) -> None:
        record = {
            "step": self.global_step + 1,
            "micro_batch": micro,
            "process": self.accelerator.process_index,
            "epoch": self.epoch,
            "indices": batch[INDEX_KEY].tolist(),
            "pixel_sha1": hashlib.sha1(batch["pixel_values"].contiguous().numpy().tobytes()).hexdigest(),
        }
        records = gather_object([record])
        if self.accelerator.is_main_process:
            for item in records:
                _append_jsonl(self.output_dir / BATCHES_LOG_NAME, item)

    # --- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, examples: _Examples) -> dict[str, Any]:
        """Accuracy (through the shipped `evaluate` metric) and mean cross-entropy on ``examples``."""
        accelerator = self.accelerator
        model = accelerator.unwrap_model(self.model)
        model.eval()
        start, stop = _process_slice(len(examples), accelerator.num_processes, accelerator.process_index)
        batch_size = self.config.eval_batch_size or self.config.batch_size
        keys = [(0, index) for index in range(start, stop)]
        batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        rows = []
        with torch.inference_mode(), accelerator.autocast():
            for batch in _loader(examples, batches, self.config.num_workers):
                logits = model(pixel_values=batch["pixel_values"].to(accelerator.device), explain=None).logits
                labels = batch["labels"].to(accelerator.device)
                losses = F.cross_entropy(logits.float(), labels, reduction="none")
                rows += zip(
                    batch[INDEX_KEY].tolist(),
                    logits.argmax(-1).tolist(),
                    labels.tolist(),
                    losses.tolist(),
                    strict=True,
                )
        rows = sorted(gather_object(rows))
        if self._metric is None:
            with accelerator.main_process_first():
                self._metric = _accuracy_metric()
        scores = self._metric.compute(predictions=[r[1] for r in rows], references=[r[2] for r in rows])
        record = {
            "type": "eval",
            "step": self.global_step,
            "epoch": round(self.epoch + self.step_in_epoch / self.schedule.steps_per_epoch, 4),
            "eval_accuracy": scores["accuracy"],
            "eval_loss": float(np.mean([r[3] for r in rows])),
            "eval_examples": len(rows),
        }
        self.eval_history.append(record)
        if accelerator.is_main_process:
            _append_jsonl(self.output_dir / LOG_NAME, record)
        return record

    # --- checkpoints and the final model ------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` atomically: a temporary folder renamed when complete."""
        accelerator = self.accelerator
        root = self.output_dir / CHECKPOINTS_DIR
        final = root / f"{_CHECKPOINT_PREFIX}{self.global_step:08d}"
        tmp = root / f"{_TMP_PREFIX}{final.name}"
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        # Each process's partial loss sums since the last log, so that a resumed log reads as one run.
        windows = gather_object([self._window.state_dict()])
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_json(tmp / TRAINER_STATE_NAME, {**self._trainer_state(), "loss_windows": windows})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _prune_checkpoints(root, self.config.save_total_limit)
        accelerator.wait_for_everyone()
        return final

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.schedule.steps_per_epoch,
            "total_steps": self.schedule.total_steps,
            "global_batch_size": self.schedule.global_batch,
            "num_examples": self.schedule.num_examples,
            "num_processes": self.schedule.num_processes,
            "recipe": self.config.recipe,
            "explanation_loss_weight": self.config.explanation_loss_weight,
            "eval_history": self.eval_history,
            "last_train_log": self.last_train_log,
        }

    def finish(self, image_processor: Any, names: Sequence[str]) -> dict[str, Any]:
        """Save the final model (main process only), push it when asked, and return the final metrics."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        model = accelerator.unwrap_model(self.model)
        if self.config.gradient_checkpointing:
            model.activation_checkpointing_disable()
        model.save_pretrained(
            self.output_dir,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=accelerator.get_state_dict(self.model),
        )
        if accelerator.is_main_process:
            image_processor.save_pretrained(self.output_dir)
            self.config.to_json_file(self.output_dir / TRAINING_CONFIG_NAME)
        result: dict[str, Any] = {
            "output_dir": str(self.output_dir),
            "global_step": self.global_step,
            "epoch": round(self.epoch + self.step_in_epoch / self.schedule.steps_per_epoch, 4),
            "num_labels": len(names),
            "resumed_from": self.resumed_from,
        }
        for key in ("loss", "classification_loss", "explanation_loss"):
            if key in self.last_train_log:
                result[f"train_{key}"] = self.last_train_log[key]
        if self.eval_history:
            result.update({k: v for k, v in self.eval_history[-1].items() if k.startswith("eval_")})
        if accelerator.is_main_process:
            self._write_model_card(model, result)
        accelerator.wait_for_everyone()
        if self.config.push_to_hub and accelerator.is_main_process:
            result["hub_commit"] = _push_folder(self.config, self.output_dir)
        accelerator.wait_for_everyone()
        return result

    def _write_model_card(self, model: ViTForSelfExplainingClassification, result: dict[str, Any]) -> None:
        """`README.md` beside the weights: what was trained, how, and the final metrics (pushed with them)."""
        from .cards import render_model_card

        cfg = self.config
        base = cfg.base + (f" (revision {cfg.base_revision})" if cfg.base_revision else "")
        training = {
            "base model": base,
            "training data": cfg.source_dataset or "not recorded",
            "explanation loss weight λ": cfg.explanation_loss_weight,
            "explanation loss": cfg.explanation_loss if cfg.explanation_loss_weight > 0 else "—",
            "recipe": ", ".join(f"{key}={value}" for key, value in cfg.recipe.items() if key != "base"),
            "optimizer steps": result["global_step"],
            "epochs": result["epoch"],
        }
        metrics = {k: v for k, v in result.items() if k.startswith(("eval_", "train_"))}
        card = render_model_card(
            cfg.hub_model_id or self.output_dir.resolve().name,
            base_model=getattr(model.config, BASE_MODEL_ATTRIBUTE, None),
            metrics=metrics,
            label_names=[model.config.id2label[i] for i in range(model.config.num_labels)],
            training=training,
            prediction_only=cfg.explanation_loss_weight == 0,
        )
        card.save(self.output_dir / "README.md")


class _LossWindow:
    """Sums of the loss parts over the micro-batches since the last log, reduced across processes."""

    _PARTS = ("loss", "classification_loss", "explanation_loss")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self._PARTS), dtype=torch.float64, device=self.device)
        self.count = 0
        self.seen: set[str] = set()

    def add(self, output: Any) -> None:
        for i, name in enumerate(self._PARTS):
            value = getattr(output, name)
            if value is not None:
                self.sums[i] += value.detach().to(torch.float64)
                self.seen.add(name)
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.tolist(), "count": self.count, "seen": sorted(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.device)
        self.count = state["count"]
        self.seen = set(state["seen"])

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        means = accelerator.reduce(self.sums / max(self.count, 1), reduction="mean")
        values = {name: float(means[i]) for i, name in enumerate(self._PARTS) if name in self.seen}
        self.reset()
        return values


# ----------------------------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------------------------


def _make_accelerator(config: TrainingConfig) -> Accelerator:
    state = AcceleratorState._shared_state
    if (
        state
        and state.get("_mixed_precision") != config.mixed_precision
        and PartialState().num_processes == 1
    ):
        # accelerate keeps one global state per process; a single process may run several trainings (e.g.
        # pre-training, then fine-tunes) with different precisions, so start afresh. (Several processes
        # share one launch configuration, and accelerate rightly refuses a change there.)
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=config.mixed_precision, cpu=cpu_only_launch())


def cpu_only_launch() -> bool:
    """True for a multi-process launch (``accelerate launch --multi_gpu`` / torchrun) on a machine without a
    GPU-like device. accelerate then needs ``cpu=True`` (``Accelerator(cpu=...)``/``PartialState(cpu=...)``)
    to join the processes as ``MULTI_CPU`` with gloo; without it each process would run alone.

    Example:
        >>> from accelerate import PartialState
        >>> state = PartialState(cpu=cpu_only_launch())
    """
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
    has_accelerator = (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    return launched and not has_accelerator


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
    model = ViTForSelfExplainingClassification.from_pretrained(
        config.base,
        revision=config.base_revision,
        # `num_labels` follows from `id2label` (passing both warns when the base has another label count).
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    if base_names != list(names):
        _reset_classifier(model, config.seed)
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
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


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
    from .metrics import load_accuracy_metric

    # keep_in_memory: no cache files, so every process can compute on the gathered predictions.
    return load_accuracy_metric(keep_in_memory=True)


def _process_slice(num_examples: int, num_processes: int, process_index: int) -> tuple[int, int]:
    size, extra = divmod(num_examples, num_processes)
    start = process_index * size + min(process_index, extra)
    return start, start + size + (1 if process_index < extra else 0)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (``None`` when there is none).

    Only renamed folders count: a run killed while writing leaves a ``.tmp-`` folder, which is ignored.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    complete = [p for p in root.glob(f"{_CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE_NAME).is_file()]
    return max(complete, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :]), default=None)


def _prune_checkpoints(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    complete = sorted(
        root.glob(f"{_CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :])
    )
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_jsonl(path: Path, max_step: int, eval_history: list[dict[str, Any]] | None = None) -> None:
    """Keep the records up to ``max_step``; evaluation records only when the checkpoint knew them (an
    evaluation right after a checkpoint at the same step is run again on resume)."""
    if not path.is_file():
        return

    def keep(record: dict[str, Any]) -> bool:
        if record.get("type") == "eval" and eval_history is not None:
            return record in eval_history
        return record["step"] <= max_step

    kept = [line for line in path.read_text().splitlines() if line and keep(json.loads(line))]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _push_folder(config: TrainingConfig, folder: Path) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=config.hub_token)
    repo_id = config.hub_model_id or folder.resolve().name
    api.create_repo(repo_id, private=config.hub_private, exist_ok=True)
    kind = "self-explaining" if config.explanation_loss_weight > 0 else "prediction-only"
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        # Checkpoints and the per-batch audit trail can be large; the model, its config and logs are pushed.
        ignore_patterns=[f"{CHECKPOINTS_DIR}/**", BATCHES_LOG_NAME, ".*", "**/.*"],
        commit_message=f"Upload {kind} ViT (λ = {config.explanation_loss_weight}) trained with selfexplain",
    )
    return commit.oid


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


# ----------------------------------------------------------------------------------------------------------
# Command line: `python -m selfexplain.training` (also used by `selfexplain train`)
# ----------------------------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to ``parser``: ``--config`` (a JSON of :class:`TrainingConfig` fields), one
    ``--<field>`` per field (overrides the JSON), and the data options."""
    parser.add_argument("--config", type=Path, default=None, help="JSON file of TrainingConfig fields.")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train-data",
        required=True,
        help='Dataset: "builtin:<name>", a folder (save_to_disk, imagefolder) or a Hub id.',
    )
    data.add_argument("--train-split", default="train")
    data.add_argument("--eval-data", default=None, help="Evaluation dataset (default: --train-data).")
    data.add_argument(
        "--eval-split",
        default=None,
        help='Split of the evaluation data ("none" to skip; default: "validation" if present).',
    )
    data.add_argument(
        "--data-seed", type=int, default=None, help="Seed of a built-in domain (default: --seed)."
    )
    recipe = parser.add_argument_group("recipe (override --config)")
    for f in dataclasses.fields(TrainingConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "targets_info":
            recipe.add_argument(flag, type=json.loads, default=None, help="JSON object.")
        elif f.type in ("bool", bool):
            recipe.add_argument(
                flag, type=_parse_bool, nargs="?", const=True, default=None, metavar="{true,false}"
            )
        elif f.name == "resume":
            recipe.add_argument(
                flag, nargs="?", const="true", default=None, help="Resume (optionally: a checkpoint path)."
            )
        else:
            recipe.add_argument(flag, type=_field_parser(f.type), default=None)
    return parser


def train_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`train` from parsed :func:`add_train_arguments` options."""
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainingConfig)
        if getattr(args, f.name, None) is not None
    }
    if overrides.get("resume") is not None:
        overrides["resume"] = _parse_resume(overrides["resume"])
    if args.config is not None:
        config = TrainingConfig.from_json_file(args.config, **overrides)
    else:
        missing = [name for name in ("base", "output_dir") if name not in overrides]
        if missing:
            raise SystemExit(f"error: --{missing[0].replace('_', '-')} is required without --config.")
        config = TrainingConfig(**overrides)
    data_seed = config.seed if args.data_seed is None else args.data_seed
    train_split = _load_split(args.train_data, args.train_split, data_seed)
    eval_split = _load_eval_split(args, data_seed)
    metrics = train(config, train_split, eval_split)
    if PartialState().is_main_process:
        print(json.dumps(metrics, indent=2, default=str))
    return metrics


def _load_split(source: str, split: str, seed: int) -> Dataset:
    kwargs = {"seed": seed} if source.startswith("builtin:") else {}
    return load_image_dataset(source, split=split, **kwargs)


def _load_eval_split(args: argparse.Namespace, seed: int) -> Dataset | None:
    if args.eval_split is not None and args.eval_split.lower() == "none":
        return None
    source = args.eval_data or args.train_data
    if args.eval_split is not None:
        return _load_split(source, args.eval_split, seed)
    try:
        return _load_split(source, "validation", seed)
    except (ValueError, KeyError):
        logger.info("%s has no validation split: training without evaluation.", source)
        return None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "y"):
        return True
    if lowered in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_resume(value: str | bool) -> bool | str:
    if isinstance(value, bool):
        return value
    try:
        return _parse_bool(value)
    except argparse.ArgumentTypeError:
        return value


def _field_parser(annotation: Any) -> Any:
    text = str(annotation)
    if text.startswith("int | str") or text.startswith("str | float"):
        return str
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m selfexplain.training --config cfg.json --train-data builtin:mnist [--<field> value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m selfexplain.training",
        description="Fine-tune a ViT prediction-only (λ = 0) or self-explaining (λ > 0) with accelerate.",
    )
    add_train_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("selfexplain", __name__):  # `__main__` under `python -m`
        logging.getLogger(name).setLevel(logging.INFO)
    train_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
