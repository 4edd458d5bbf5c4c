"""The recipe of one fine-tuning run (:class:`TrainingConfig`): every field documented and validated."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..attribution.amortized import SHAPLEY_GAMES
from ..attribution.masking import BASELINE_KINDS
from ..data.columns import EXPLANATION_TARGETS_COLUMN
from ..modeling_self_explaining_vit import EXPLANATION_HEADS, EXTENSION_ROUTES

EXPLANATION_LOSSES: tuple[str, ...] = ("mse", "pearson")
#: "targets": fit precomputed explanation targets (Kernel SHAP); "shapley": the amortised Shapley objective
#: (FastSHAP / ViT-Shapley) against a frozen value model, no targets (see selfexplain.attribution.amortized).
EXPLANATION_OBJECTIVES: tuple[str, ...] = ("targets", "shapley")
#: What the optimizer updates: every parameter, or only the explanation extension (backbone and classifier
#: frozen, so the model's logits stay exactly those of `base`).
TRAINABLE: tuple[str, ...] = ("all", "extension")
LR_SCHEDULERS: tuple[str, ...] = (
    "cosine",
    "linear",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")


def _field(default: Any, help: str, *, parse: Any, **kwargs: Any) -> Any:
    """A config field whose ``metadata`` carries its ``--help`` text and how the command line parses it."""
    return field(default=default, metadata={"help": help, "parse": parse}, **kwargs)  # MISSING: required


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
        explanation_head: ``"shared"`` (the classifier scores the last patch tokens) or ``"extension"`` (they
            first pass through ``explanation_extension_layers`` extra transformer blocks that only the explanation
            reads); ``None`` keeps the base's.
        explanation_extension_layers: blocks of a new extension (``explanation_head="extension"``).
        explanation_extension_input_layer: what a new extension reads: ``None``, the final normed tokens; ``k``,
            the output of block ``k`` (``0``: the embeddings). It travels with the extension's vector.
        explanation_extension_route: where a new inner-block extension's tokens go: ``"classifier"`` (scored
            directly) or ``"backbone"`` (through the model's own later blocks as query tokens, then the final
            layer norm and the classifier). It travels with the extension's vector.
        trainable: ``"all"`` parameters, or only the ``"extension"``: backbone and classifier stay frozen, so
            the trained model predicts exactly as ``base`` (use a fine-tuned classifier as ``base`` and as
            ``value_model``); its explanation vector then changes only the extension (its backbone deltas
            are zero; `include=("explainer.*",)` stores the extension alone).
        extension_hosts: with ``trainable="extension"`` and the ``"shapley"`` objective, other frozen
            classifiers fine-tuned from the same base θ0, each with its training dataset
            (``[{"model": "runs/shapes-pred", "data": "builtin:shapes-on-clutter"}]``). Every micro-batch of the
            training data is followed by one of each host's own images, explained by the *same* extension on
            the host's backbone and classifier (see :mod:`selfexplain.training.hosts`): the extension learns
            what explains fine-tunes of θ0 in general, not one classifier, which is what a transferred vector
            meets. One process only.
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

    base: str = _field(dataclasses.MISSING, "Hub id or folder of the base model θ0 (required).", parse=str)
    output_dir: str = _field(
        dataclasses.MISSING,
        "Where the model, log.jsonl, metrics.json and checkpoints/ go (required).",
        parse=str,
    )
    explanation_loss_weight: float = _field(
        0.0, "λ: 0 trains prediction-only; > 0 self-explaining (needs targets).", parse=float
    )
    explanation_loss: str = _field("mse", f"Loss against targets, one of {EXPLANATION_LOSSES}.", parse=str)
    explanation_objective: str = _field(
        "targets",
        f"One of {EXPLANATION_OBJECTIVES}: fit a dataset's targets column, or the amortised Shapley objective "
        "(coalitions of patches drawn each step, valued by the frozen value_model; no targets needed).",
        parse=str,
    )
    value_model: str | None = _field(
        None,
        'For "shapley": Hub id or folder of the frozen classifier whose probabilities are v(S).',
        parse=str,
    )
    explanation_game: str = _field(
        "probs",
        f'For "shapley", one of {SHAPLEY_GAMES}: v(S) is the value model\'s class probabilities, or its final CLS '
        'token (needs trainable="extension": the extension learns the Shapley values of the representation, '
        "and any linear head on that backbone reads its own logit Shapley values from them).",
        parse=str,
    )
    coalitions_per_image: int = _field(
        32, 'For "shapley": coalitions drawn per image and step (pairs with their complements).', parse=int
    )
    coalition_pool: int | None = _field(
        None,
        'For "shapley": draw this many coalitions per image once (pairs with their complements), value them once '
        "with the frozen value model and fit all of them at every step, instead of coalitions_per_image fresh ones "
        "per step. The value model then runs once per image instead of once per image and epoch (its values are "
        "deterministic: it is frozen); needs augment off. Held in memory: images × pool × classes floats.",
        parse=int,
    )
    removal_baseline: str = _field(
        "mean", 'For "shapley": what removed patches show ("mean", "zero" or "blur").', parse=str
    )
    explanation_target_scale: str | float | None = _field(
        None, 'Scale of the targets for "mse" ("num_players" or a number; default: the model\'s).', parse=str
    )
    explanation_head: str | None = _field(
        None, f"One of {EXPLANATION_HEADS} (default: the base's).", parse=str
    )
    explanation_extension_layers: int = _field(
        1, 'Transformer blocks of a new explanation extension (explanation_head="extension").', parse=int
    )
    explanation_extension_input_layer: int | None = _field(
        None,
        "What a new explanation extension reads: the output of this block (0: the embeddings; default: the final "
        "normed tokens).",
        parse=int,
    )
    explanation_extension_route: str = _field(
        "classifier",
        f"Where a new inner-block extension's tokens go, one of {EXTENSION_ROUTES}: straight to the classifier, or "
        "through the model's own later blocks (as query tokens) first.",
        parse=str,
    )
    trainable: str = _field(
        "all",
        f"One of {TRAINABLE}: every parameter, or only the explanation extension (logits stay the base's).",
        parse=str,
    )
    extension_hosts: list[dict[str, str]] | None = _field(
        None,
        'With trainable="extension" and "shapley": other frozen classifiers of the same base that the extension '
        'learns to explain too, each on its own data: [{"model": FOLDER_OR_ID, "data": DATASET}, ...].',
        parse="json",
    )
    num_epochs: int = _field(3, "Passes over the training data (max_steps may stop earlier).", parse=int)
    max_steps: int | None = _field(
        None, "Total optimizer steps; when set, it defines the schedule.", parse=int
    )
    batch_size: int = _field(32, "Examples per device per micro-batch.", parse=int)
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step.", parse=int)
    learning_rate: float = _field(1e-4, "AdamW learning rate.", parse=float)
    weight_decay: float = _field(0.01, "AdamW weight decay (none on biases and norms).", parse=float)
    warmup_ratio: float = _field(0.1, "Share of the optimizer steps with a linear warmup.", parse=float)
    lr_scheduler: str = _field("cosine", f"Learning-rate schedule, one of {LR_SCHEDULERS}.", parse=str)
    max_grad_norm: float | None = _field(1.0, "Gradient clipping norm (none to disable: omit).", parse=float)
    mixed_precision: str = _field("no", f"One of {MIXED_PRECISIONS} (passed to Accelerator).", parse=str)
    gradient_checkpointing: bool = _field(False, "Trade compute for memory.", parse=bool)
    seed: int = _field(0, "Seeds the head, the data order, the augmentation and the global RNGs.", parse=int)
    full_determinism: bool = _field(False, "Force deterministic kernels too (slower on GPUs).", parse=bool)
    augment: bool = _field(True, "Random translation of up to max_shift pixels.", parse=bool)
    max_shift: int = _field(2, "Largest translation (pixels) of the augmentation.", parse=int)
    evaluate_every_epoch: bool = _field(
        True, "Evaluate at the end of every epoch (and at the end).", parse=bool
    )
    eval_batch_size: int | None = _field(
        None, "Per-device evaluation batch (default: batch_size).", parse=int
    )
    checkpoint_every: int | str | None = _field(
        "epoch", '"epoch", a number of optimizer steps, or "none".', parse=str
    )
    save_total_limit: int | None = _field(2, "Keep only this many newest checkpoints.", parse=int)
    resume: bool | str = _field(
        False,
        "Continue from the newest checkpoint in output_dir (or from the checkpoint path given).",
        parse="resume",
    )
    push_to_hub: bool = _field(
        False, "Push the final model to hub_model_id (default: the folder name).", parse=bool
    )
    hub_model_id: str | None = _field(None, "Hub repo of the pushed model.", parse=str)
    hub_private: bool = _field(False, "Create the Hub repo private.", parse=bool)
    hub_token: str | None = _field(None, "Hub token (never written to disk).", parse=str, repr=False)
    num_workers: int = _field(0, "DataLoader workers per process.", parse=int)
    log_every: int = _field(10, "Log the mean losses every this many optimizer steps.", parse=int)
    record_batches: bool = _field(
        False, "Write every micro-batch's example indices and pixel digest to batches.jsonl.", parse=bool
    )
    image_column: str | None = _field(None, "Image column (default: detected).", parse=str)
    label_column: str | None = _field(None, "Label column (default: detected).", parse=str)
    targets_column: str = _field(EXPLANATION_TARGETS_COLUMN, "Column of the explanation targets.", parse=str)
    base_revision: str | None = _field(None, "Revision of base on the Hub.", parse=str)
    source_dataset: str | None = _field(None, "Recorded in the model config for provenance.", parse=str)
    targets_info: dict[str, Any] | None = _field(
        None, 'How the targets were made, as a JSON object (e.g. {"method": "kernel_shap"}).', parse="json"
    )

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
        _check(
            self.explanation_objective in EXPLANATION_OBJECTIVES,
            "explanation_objective",
            self.explanation_objective,
            f"one of {EXPLANATION_OBJECTIVES}",
        )
        if self.uses_shapley_objective:
            _check(self.value_model is not None, "value_model", self.value_model, 'set for "shapley"')
        _check(
            self.explanation_game in SHAPLEY_GAMES,
            "explanation_game",
            self.explanation_game,
            f"one of {SHAPLEY_GAMES}",
        )
        if self.explanation_game == "representation":
            # The representation's Shapley values are read by the frozen backbone's heads: only an extension on a
            # frozen backbone keeps them valid (a trained backbone would drift from the value model's).
            _check(
                self.uses_shapley_objective and self.trainable == "extension",
                "explanation_game",
                self.explanation_game,
                'used only with explanation_objective="shapley", λ > 0 and trainable="extension"',
            )
        _check(
            _is_int(self.coalitions_per_image)
            and self.coalitions_per_image >= 2
            and self.coalitions_per_image % 2 == 0,
            "coalitions_per_image",
            self.coalitions_per_image,
            "an even int >= 2 (coalitions come with their complements)",
        )
        pool = self.coalition_pool
        _check(pool is None or (_is_int(pool) and pool >= 2 and pool % 2 == 0), "coalition_pool", pool,
               "None or an even int >= 2 (coalitions come with their complements)")  # fmt: skip
        if pool is not None:
            _check(self.uses_shapley_objective, "coalition_pool", pool,
                   'used only with explanation_objective="shapley" and λ > 0')  # fmt: skip
            # An augmented image differs every epoch: values computed once would belong to another image.
            _check(not self.augment, "coalition_pool", pool, "used only with augment=False")
        _check(
            self.removal_baseline in BASELINE_KINDS,
            "removal_baseline",
            self.removal_baseline,
            f"one of {BASELINE_KINDS}",
        )
        _check(
            self.explanation_head is None or self.explanation_head in EXPLANATION_HEADS,
            "explanation_head",
            self.explanation_head,
            f"one of {EXPLANATION_HEADS} or None",
        )
        _check(self.trainable in TRAINABLE, "trainable", self.trainable, f"one of {TRAINABLE}")
        self.extension_hosts = check_extension_hosts(self.extension_hosts) or None
        if self.extension_hosts:
            _check(
                self.trainable == "extension" and self.uses_shapley_objective,
                "extension_hosts",
                self.extension_hosts,
                'used only with trainable="extension" and explanation_objective="shapley" (λ > 0)',
            )
        if self.trainable == "extension":
            _check(
                self.explanation_loss_weight > 0,
                "explanation_loss_weight",
                self.explanation_loss_weight,
                '> 0 with trainable="extension" (only the explanation is trained)',
            )
        for name in (
            "num_epochs",
            "batch_size",
            "explanation_extension_layers",
            "gradient_accumulation_steps",
            "log_every",
        ):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, value, "a positive int")
        layer = self.explanation_extension_input_layer
        _check(layer is None or (_is_int(layer) and layer >= 0), "explanation_extension_input_layer", layer,
               "None or a block index >= 0")  # fmt: skip
        if layer is not None:
            _check(self.explanation_head == "extension", "explanation_extension_input_layer", layer,
                   'set only with explanation_head="extension"')  # fmt: skip
        route = self.explanation_extension_route
        _check(route in EXTENSION_ROUTES, "explanation_extension_route", route, f"one of {EXTENSION_ROUTES}")
        if route == "backbone":
            _check(layer is not None, "explanation_extension_route", route,
                   "set only with an explanation_extension_input_layer (the blocks after it carry the tokens)")  # fmt: skip
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
    def uses_targets(self) -> bool:
        """λ > 0 with precomputed targets: the training set needs a targets column."""
        return self.explanation_loss_weight > 0 and self.explanation_objective == "targets"

    @property
    def uses_shapley_objective(self) -> bool:
        """λ > 0 with the amortised Shapley objective: a frozen ``value_model`` values coalitions each step."""
        return self.explanation_loss_weight > 0 and self.explanation_objective == "shapley"

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


def check_extension_hosts(hosts: Any) -> list[dict[str, str]]:
    """Validate ``TrainingConfig.extension_hosts``: a list of ``{"model": ..., "data": ...}`` objects."""
    if hosts is None:
        return []
    if not isinstance(hosts, (list, tuple)):
        raise ValueError(
            'TrainingConfig.extension_hosts must be a list of {"model": ..., "data": ...} objects, '
            f"got {hosts!r}."
        )
    checked = []
    for i, host in enumerate(hosts):
        if not isinstance(host, dict) or not isinstance(host.get("model"), str) or not host["model"]:
            raise ValueError(
                f'TrainingConfig.extension_hosts[{i}] must be an object with a "model" (a classifier folder or '
                f'Hub id) and a "data" (its training dataset), got {host!r}.'
            )
        unknown = sorted(set(host) - {"model", "data"})
        if unknown:
            raise ValueError(f"TrainingConfig.extension_hosts[{i}] has unknown key(s) {unknown}.")
        data = host.get("data")
        if data is not None and (not isinstance(data, str) or not data):
            raise ValueError(
                f'TrainingConfig.extension_hosts[{i}]["data"] must be a dataset name, got {data!r}.'
            )
        checked.append({"model": host["model"], **({"data": data} if data is not None else {})})
    return checked


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainingConfig.{name} must be {expected}, got {value!r}.")
