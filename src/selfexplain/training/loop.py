"""One `accelerate` training loop for prediction-only (λ = 0) and self-explaining (λ > 0) ViT classifiers.

An explanation vector is the difference between two fine-tunes of one base (docs/design.md §1): one with the
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

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from datasets import Dataset
from torch import nn
from transformers import (
    enable_full_determinism,
    get_scheduler,
)

from .._progress import progress_bar
from ..attribution.amortized import (
    amortized_shapley_loss,
    coalition_values,
    example_generators,
    shapley_kernel_coalitions,
)
from ..cards import render_model_card
from ..data import (
    build_transform,
    detect_columns,
)
from ..data.columns import EXPLANATION_TARGETS_COLUMN
from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification
from ..vectors.config import BASE_MODEL_ATTRIBUTE
from .checkpoints import (
    _CHECKPOINT_PREFIX,
    _TMP_PREFIX,
    BATCHES_LOG_NAME,
    CHECKPOINTS_DIR,
    LOG_NAME,
    METRICS_NAME,
    TRAINER_STATE_NAME,
    TRAINING_CONFIG_NAME,
    _append_jsonl,
    _prune_checkpoints,
    _push_folder,
    _truncate_jsonl,
    _write_json,
    latest_checkpoint,
)
from .config import TrainingConfig, _is_int
from .distributed import _make_accelerator, _process_slice
from .hosts import ExtensionHost, load_extension_hosts
from .sampling import INDEX_KEY, _EpochBatches, _Examples, _loader, _Schedule
from .setup import (
    _accuracy_metric,
    _check_eval_dataset,
    _check_targets_column,
    _label_names,
    _load_model,
    _load_value_model,
    _make_optimizer,
    _resolve_image_processor,
)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train(
    config: TrainingConfig,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    image_processor: Any | None = None,
    label_names: Sequence[str] | None = None,
    host_datasets: Sequence[Dataset] | None = None,
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
        host_datasets: the training images of ``config.extension_hosts``, one dataset per host in order
            (default: each host's ``"data"``, split ``"train"``).

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
    with_targets = config.uses_targets
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
    value_model = (
        _load_value_model(
            config, names, accelerator.device, accelerator.unwrap_model(model).config.hidden_size
        )
        if config.uses_shapley_objective
        else None
    )
    hosts = []
    if config.extension_hosts:
        if accelerator.num_processes > 1:
            raise ValueError(
                "extension_hosts train on one process only (the hosts' gradients are not synchronised); "
                f"this run has {accelerator.num_processes}."
            )
        hosts = load_extension_hosts(
            config.extension_hosts,
            accelerator.unwrap_model(model),
            train_transform,
            host_datasets,
            config.seed,
            accelerator.device,
        )
    run = _Run(config, accelerator, model, optimizer, scheduler, schedule, output_dir, value_model, hosts)
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
        value_model: nn.Module | None = None,
        hosts: Sequence[ExtensionHost] = (),
    ) -> None:
        self.config = config
        self.value_model = value_model  # frozen v(S) of the amortised Shapley objective
        self.hosts = list(hosts)  # other frozen classifiers the extension learns to explain (hosts.py)
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
        # coalition_pool: example index -> (coalitions, values, v_empty, v_full), filled on first sight.
        self._pool: dict[int, tuple[torch.Tensor, ...]] = {}

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
            "extension_hosts": self.config.extension_hosts,
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
        if self.config.coalition_pool is not None and self.global_step < schedule.total_steps:
            self._fill_coalition_pool(train_examples)
        bar = progress_bar(
            total=schedule.total_steps,
            initial=self.global_step,
            desc="training",
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        while self.global_step < schedule.total_steps:
            batches = self._epoch_batches()
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

    def _epoch_batches(self) -> _EpochBatches:
        """This process's batches of the epoch in progress, after the micro-batches already trained."""
        schedule = self.schedule
        return _EpochBatches(
            schedule,
            self.config.seed,
            self.epoch,
            self.accelerator.process_index,
            skip_micro_batches=self.step_in_epoch * schedule.accumulation,
        )

    def _fill_coalition_pool(self, train_examples: _Examples) -> None:
        """Value the coalition pool of every example this process trains on in the current epoch, before the
        first step and under its own progress bar: that is most of the run's cost, and paid inside the first
        epoch it would make the training bar's time estimate wrong. Examples this process first sees in a later
        epoch (another shard with several processes, or the next epoch of a run that stops early) are valued when
        they come; a run that stops within the epoch (`max_steps`) values only the batches it will train on."""
        accelerator, schedule = self.accelerator, self.schedule
        batches = self._epoch_batches()
        steps = min(schedule.steps_per_epoch - self.step_in_epoch, schedule.total_steps - self.global_step)
        model = accelerator.unwrap_model(self.model)
        bar = progress_bar(
            total=steps * schedule.accumulation,
            desc=f"valuing {self.config.coalition_pool} coalitions per image",
            unit="batch",
            disable=not accelerator.is_local_main_process,
        )
        loader = _loader(train_examples, batches, self.config.num_workers)
        for batch in itertools.islice(loader, steps * schedule.accumulation):
            pixel_values = batch["pixel_values"].to(accelerator.device)
            self._pooled_values(pixel_values, batch[INDEX_KEY], model.patch_grid(pixel_values))
            bar.update(1)
        bar.close()

    def _optimizer_step(self, micro_batches: Iterator[dict[str, torch.Tensor]]) -> None:
        accelerator, config = self.accelerator, self.config
        representation = config.uses_shapley_objective and config.explanation_game == "representation"
        self.model.train()
        for micro in range(self.schedule.accumulation):
            batch = next(micro_batches)
            if config.record_batches:
                self._record_batch(batch, micro)
            last = micro == self.schedule.accumulation - 1
            # Gradients are only all-reduced on the last micro-batch of a step.
            with accelerator.no_sync(self.model) if not last else contextlib.nullcontext():
                pixel_values = batch["pixel_values"].to(accelerator.device)
                output = self.model(
                    pixel_values=pixel_values,
                    labels=batch["labels"].to(accelerator.device),
                    explanation_targets=(
                        batch[EXPLANATION_TARGETS_COLUMN].to(accelerator.device)
                        if config.uses_targets
                        else None
                    ),
                    explain="all" if config.uses_shapley_objective and not representation else None,
                    output_explanation_tokens=representation,
                )
                if config.uses_shapley_objective:
                    # Representation game: the tokens themselves are fitted, one player vector per patch.
                    scores = (
                        output.explanation_tokens.transpose(1, 2) if representation else output.explanation
                    )
                    output.explanation_loss = self._shapley_loss(scores, pixel_values, batch[INDEX_KEY])
                    output.loss = output.loss + config.explanation_loss_weight * output.explanation_loss
                accelerator.backward(output.loss / self.schedule.accumulation)
                host_losses = [self._host_loss(host, micro) for host in self.hosts]
            self._window.add(output, host_losses)
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

    def _shapley_loss(
        self, explanation: torch.Tensor, pixel_values: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """The amortised Shapley loss of a micro-batch (docs/design.md §3): coalitions drawn per example from
        ``(seed, epoch, index)``, valued by the frozen value model; φ = explanation / n. ``explanation`` is
        ``(B, classes, gh, gw)``, or ``(B, hidden, n)`` explanation tokens for the representation game."""
        if explanation.dim() == 4:
            grid = tuple(explanation.shape[-2:])
        else:
            grid = self.accelerator.unwrap_model(self.model).patch_grid(pixel_values)
        num_players = grid[0] * grid[1]
        if self.config.coalition_pool is not None:
            coalitions, values, v_empty, v_full = self._pooled_values(pixel_values, indices, grid)
        else:
            generators = example_generators(self.config.seed, self.epoch, indices.tolist())
            pairs = self.config.coalitions_per_image // 2
            coalitions = shapley_kernel_coalitions(num_players, pairs, generators).to(pixel_values.device)
            values, v_empty, v_full = coalition_values(
                self.value_model,
                pixel_values,
                coalitions,
                grid,
                self.config.removal_baseline,
                game=self.config.explanation_game,
            )
        phi = explanation.flatten(2) / num_players
        return amortized_shapley_loss(phi, coalitions, values, v_empty, v_full)

    def _pooled_values(
        self, pixel_values: torch.Tensor, indices: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        """``coalition_pool``: each example's coalitions are drawn from ``(seed, index)`` alone and valued the
        first time it is seen; later epochs read them back. A resumed run recomputes the same values (the value
        model is frozen and the draw does not depend on the epoch), so the pool is not checkpointed."""
        keys = [int(i) for i in indices.tolist()]
        missing = [row for row, key in enumerate(keys) if key not in self._pool]
        if missing:
            generators = example_generators(self.config.seed, 0, [keys[r] for r in missing], stream=11)
            drawn = shapley_kernel_coalitions(grid[0] * grid[1], self.config.coalition_pool // 2, generators)
            values, v_empty, v_full = coalition_values(
                self.value_model,
                pixel_values[missing],
                drawn.to(pixel_values.device),
                grid,
                self.config.removal_baseline,
                game=self.config.explanation_game,
            )
            for j, row in enumerate(missing):
                self._pool[keys[row]] = (drawn[j], values[j].cpu(), v_empty[j].cpu(), v_full[j].cpu())
        device = pixel_values.device
        return tuple(torch.stack([self._pool[key][part] for key in keys]).to(device) for part in range(4))

    def _host_loss(self, host: ExtensionHost, micro: int) -> torch.Tensor:
        """One micro-batch of the host's own images through the shared extension; backward, and the loss."""
        config = self.config
        batch = host.batch(config.seed, self.global_step, micro, config.batch_size)
        loss = host.shapley_loss(
            batch,
            config.seed,
            self.global_step,
            config.coalitions_per_image,
            config.removal_baseline,
            config.explanation_game,
        )
        self.accelerator.backward(config.explanation_loss_weight * loss / self.schedule.accumulation)
        return loss.detach()

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
            "extension_hosts": self.config.extension_hosts,
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

    _PARTS = ("loss", "classification_loss", "explanation_loss", "host_explanation_loss")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self._PARTS), dtype=torch.float64, device=self.device)
        self.count = 0
        self.seen: set[str] = set()

    def add(self, output: Any, host_losses: Sequence[torch.Tensor] = ()) -> None:
        """Add a micro-batch's loss parts; ``host_losses``: its extension hosts' losses (logged as their mean)."""
        host = torch.stack(list(host_losses)).mean() if host_losses else None
        for i, name in enumerate(self._PARTS):
            value = host if name == "host_explanation_loss" else getattr(output, name)
            if value is not None:
                self.sums[i] += value.detach().to(torch.float64)
                self.seen.add(name)
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.tolist(), "count": self.count, "seen": sorted(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sums = list(state["sums"]) + [0.0] * (
            len(self._PARTS) - len(state["sums"])
        )  # older checkpoints: fewer parts
        self.sums = torch.tensor(sums, dtype=torch.float64, device=self.device)
        self.count = state["count"]
        self.seen = set(state["seen"])

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        means = accelerator.reduce(self.sums / max(self.count, 1), reduction="mean")
        values = {name: float(means[i]) for i, name in enumerate(self._PARTS) if name in self.seen}
        self.reset()
        return values
