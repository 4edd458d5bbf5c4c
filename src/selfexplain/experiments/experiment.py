"""The transfer experiment: does adding an explanation vector make a prediction-only target explain itself?

Pipeline (docs/design.md §1, §7), per seed:

1. θ0: a small ViT pre-trained on built-in domains (`training.pretrain_base`).
2. Every domain used as a source or target: a prediction-only model fine-tuned from θ0 (λ = 0).
3. Every source: Kernel SHAP targets from its prediction-only model, a self-explaining model (λ > 0, same
   recipe and seed), and the vector τ = θ(self-explaining) − θ(prediction-only).
4. Every (source, target) pair: θ_T + α·τ for the α sweep, evaluated on target test images against the
   no-transfer map (α = 0), Kernel SHAP at several budgets, Grad-CAM, attention rollout, random, and an
   oracle target trained with supervision.

Every stage writes to `output_dir/work/` and is skipped when its result is already there, so an interrupted
experiment resumes. `docs/results/<name>/` gets `report.md`, `results.json` and PNG plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import ViTForImageClassification

from ..attribution import leverage, masking, model_call, shapley
from ..attribution import ridge as ridge_module
from ..attribution.targets import add_explanation_targets
from ..data import BUILTIN_DOMAINS, default_image_processor, load_builtin_domain
from ..evaluation import explainers, metrics
from ..evaluation.metrics import insertion_deletion_auc
from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification, pool_to_player_grid
from ..training import TrainingConfig, pretrain_base, train
from ..vectors.apply import apply_explanation_vector
from ..vectors.vector import ExplanationVector

EXPLAINERS_BASELINE = ("no_transfer", "grad_cam", "attention_rollout", "random")


@dataclass
class ExperimentConfig:
    """One experiment suite, read from a JSON file (see `configs/`).

    `pairs` defaults to every (source, target) with source != target. Sizes are per domain: `num_train`
    training images (and Shapley targets), `num_eval` test images evaluated, `num_select` unlabelled target
    images (validation split) used for label-free α selection.
    """

    name: str
    sources: list[str]
    targets: list[str]
    pairs: list[list[str]] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    output_dir: str = "outputs"
    report_dir: str | None = None
    base: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    explanation_loss_weight: float = 100.0
    # "shapley": the amortised objective (no targets; the prediction-only model is the frozen value model);
    # "targets": Kernel SHAP targets at `target_budget`, fitted with `explanation_loss`.
    explanation_objective: str = "shapley"
    coalitions_per_image: int = 2
    # With "shapley": what a coalition is worth, the value model's class probabilities ("probs") or its final CLS
    # token ("representation", needs trainable "extension"): `TrainingConfig.explanation_game`.
    explanation_game: str = "probs"
    explanation_loss: str = "mse"
    # "shared": the self-explaining model's classifier scores its last patch tokens; "extension": an explanation
    # extension of `explanation_extension_layers` blocks sits in between (it travels inside the vector).
    explanation_head: str = "shared"
    explanation_extension_layers: int = 1
    # What the extension reads: None, the final normed tokens; k, the output of block k (0: the embeddings).
    explanation_extension_input_layer: int | None = None
    # Where an inner-block extension's tokens go: "classifier", or "backbone" (the model's own later blocks first).
    explanation_extension_route: str = "classifier"
    # "all": the self-explaining model is fine-tuned from θ0 like the prediction-only one; "extension": only its
    # extension is trained, on top of the frozen prediction-only model (logits unchanged, vector = extension).
    trainable: str = "all"
    # Recipe settings for the self-explaining run only (e.g. its own learning rate), over `train`.
    explanation_train: dict[str, Any] = field(default_factory=dict)
    # With trainable "extension": domains whose prediction-only models (fine-tuned from the same θ0) the extension
    # also learns to explain, each on its own images (`TrainingConfig.extension_hosts`). Never a target.
    # "<domain>@<k>" (k ≥ 1) is a *replica*: another fine-tune of that domain on the same images with another
    # training seed (`host_domain`), e.g. "mnist@1" beside the source "mnist": an independent fine-tune of the
    # source's own domain, the kind of difference that separates a source's classifier from a target's.
    extension_hosts: list[str] = field(default_factory=list)
    # Kernel SHAP values (references, budget curves) are cached here, keyed by everything they depend on (the
    # weights the logits read, the images, grid, budget, baseline, seed and the estimator's code), so that suites
    # sharing models (a rerun, or another suite on the same prediction-only models) compute each only once.
    # None: `output_dir/work/kernel_shap_cache`.
    kernel_shap_cache: str | None = None
    # Targets at another image size than the sources (same patch size): vectors are applied with their position
    # embeddings resized to the target's patch grid (`apply_explanation_vector(resize_position_embeddings=True)`).
    resize_position_embeddings: bool = False
    # Explanations and Shapley values live on the model's patch grid unless a coarser grid is given.
    player_grid: list[int] | None = None
    target_budget: int = 128
    baseline: str = "mean"
    num_train: int = 1000
    num_eval: int = 64
    # Images per target (and per source, in-domain) compared with the Kernel SHAP reference: the reference
    # costs `reference_budget` evaluations per image, so it runs on a subset of the evaluated images.
    num_reference: int = 32
    # Images explained by a second reference seed, to show the reference has converged (Pearson between seeds).
    num_reference_check: int = 8
    auc_steps: int = 16
    num_select: int = 64
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 1.5, 2.0])
    agreement_threshold: float = 0.95
    reference_budget: int = 1024
    # The Kernel SHAP design of the reference and the budget curve (`kernel_shap_values(sampler=...)`): "kernel",
    # shap's (most evaluations on the smallest and largest coalitions), or "leverage", Leverage SHAP's (every size
    # alike, without replacement): the smaller error at equal budget (docs/results/kernel_shap_equal_error.md).
    kernel_shap_sampler: str = "kernel"
    # "gcv": the fit with a ridge penalty chosen by generalised cross-validation (`kernel_shap_values(ridge=...)`),
    # which removes the plain fit's error peak near 2 × the number of players evaluations; "none": the plain fit.
    kernel_shap_ridge: str = "none"
    kernel_shap_budgets: list[int] = field(default_factory=lambda: [25, 50, 100, 150, 300, 600])
    crossover_seeds: list[int] | None = None
    oracle: bool = True
    heatmap_examples: int = 6
    batch_size: int = 512
    # The offline models are tiny: one intra-op thread is as fast as two on an idle 2-core machine and 20-40x
    # faster when another process competes for the cores (OpenMP threads spin-wait). None: torch's default.
    num_threads: int | None = 1
    # Worker processes: the suite is split into units (a seed's base, each source, each target) run in this many
    # processes, each unit starting as soon as the units it needs are done. Set to the number of cores.
    workers: int = 1

    def __post_init__(self) -> None:
        if self.kernel_shap_sampler not in shapley.SAMPLER_KINDS:
            raise ValueError(
                f"kernel_shap_sampler must be one of {shapley.SAMPLER_KINDS}, got {self.kernel_shap_sampler!r}."
            )
        if self.kernel_shap_ridge not in shapley.RIDGE_KINDS:
            raise ValueError(
                f"kernel_shap_ridge must be one of {shapley.RIDGE_KINDS}, got {self.kernel_shap_ridge!r}."
            )
        if self.extension_hosts and self.trainable != "extension":
            raise ValueError('extension_hosts need trainable "extension" (they train an extension only).')
        for host in self.extension_hosts:
            host_domain(host)  # a clear error for a malformed replica now, not after hours of work
        leaked = sorted(h for h in self.extension_hosts if host_domain(h)[0] in self.targets)
        if leaked:
            raise ValueError(
                f"extension_hosts {leaked} are targets: a vector must not have learnt from a target's model."
            )

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> ExperimentConfig:
        data = json.loads(Path(path).read_text())
        data.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown experiment settings {sorted(unknown)}.")
        return cls(**data)

    def pair_list(self) -> list[tuple[str, str]]:
        if self.pairs is not None:
            return [(s, t) for s, t in self.pairs]
        return [(s, t) for s in self.sources for t in self.targets if s != t]

    def base_settings(self) -> dict[str, Any]:
        """The base's settings: ``base`` itself, or the config of the packaged base it names."""
        if "packaged" in self.base:
            return json.loads((packaged_base(self.base["packaged"]) / "config.json").read_text())
        return self.base

    def grid(self) -> tuple[int, int]:
        """The player grid: the config's, else the base's patch grid."""
        if self.player_grid is not None:
            return tuple(self.player_grid)
        settings = self.base_settings()
        size, patch = int(settings.get("image_size", 32)), int(settings.get("patch_size", 4))
        return size // patch, size // patch

    def domains(self) -> list[str]:
        names = list(self.sources) + list(self.targets)
        return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------- stages


class Experiment:
    """Runs an `ExperimentConfig`; `run()` returns the results dict that `write_report` renders."""

    def __init__(self, config: ExperimentConfig, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self.work = Path(config.output_dir) / "work"
        self.timings: dict[str, float] = {}
        if config.num_threads is not None:
            # Here, not in `run`: stages called one by one (the notebook does) must compute what `run` computes.
            torch.set_num_threads(config.num_threads)
        self.processor = default_image_processor(config.base_settings().get("image_size", 32))

    # -- data
    def dataset(self, domain: str, seed: int, split: str, limit: int | None):
        key = (domain, seed)
        cache = self.__dict__.setdefault("_datasets", {})
        if key not in cache:
            cache[key] = load_builtin_domain(domain, seed=seed)
        ds = cache[key][split]
        if limit is not None and limit < len(ds):
            ds = ds.shuffle(seed=seed).select(range(limit))
        return ds

    def pixels(self, ds) -> torch.Tensor:
        return self.processor(images=[img.convert("RGB") for img in ds["image"]], return_tensors="pt")[
            "pixel_values"
        ]

    # -- models
    def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = fn()
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - started
        return result

    def base(self, seed: int) -> Path:
        """θ0: the packaged base named by ``base["packaged"]`` (shared by every seed), else pre-trained per seed."""
        if "packaged" in self.config.base:
            return packaged_base(self.config.base["packaged"])
        path = self.work / f"seed{seed}" / "base"
        if not (path / "config.json").exists():
            self.log(f"[seed {seed}] pre-training the base θ0 -> {path}")
            kwargs = {"seed": seed, **self.config.base}
            self._timed("pretrain_base", lambda: pretrain_base(path, **kwargs))
        return path

    def finetune(self, seed: int, domain: str, explanation_weight: float, targets_ds=None) -> Path:
        kind = "self_explaining" if explanation_weight > 0 else "prediction_only"
        path = self.work / f"seed{seed}" / f"{domain}-{kind}"
        data_domain, replica = host_domain(domain)  # "mnist@1": mnist's images, another training seed
        base = self.base(seed)  # first, so that the log reads in the order things happen
        head = {}
        if explanation_weight > 0:
            head = {
                "explanation_head": self.config.explanation_head,
                "explanation_extension_layers": self.config.explanation_extension_layers,
                "trainable": self.config.trainable,
                "explanation_extension_input_layer": self.config.explanation_extension_input_layer,
                "explanation_extension_route": self.config.explanation_extension_route,
            }
            if (
                self.config.trainable == "extension"
            ):  # the extension learns on the frozen prediction-only model
                base = self.finetune(seed, domain, 0.0)
        recipe = {
            "num_epochs": 4,
            "batch_size": 64,
            "learning_rate": 1e-3,
            "checkpoint_every": None,
            "log_every": 20,
            **self.config.train,
            **(self.config.explanation_train if explanation_weight > 0 else {}),
        }
        objective = {}
        if explanation_weight > 0 and self.config.explanation_objective == "shapley":
            objective = {
                "explanation_objective": "shapley",
                "value_model": str(self.finetune(seed, domain, 0.0)),
                "coalitions_per_image": self.config.coalitions_per_image,
                "removal_baseline": self.config.baseline,
                "explanation_game": self.config.explanation_game,
            }
        hosts = [d for d in self.config.extension_hosts if d != domain] if explanation_weight > 0 else []
        if hosts:
            objective["extension_hosts"] = [
                {"model": str(self.finetune(seed, d, 0.0)), "data": f"builtin:{host_domain(d)[0]}"}
                for d in hosts
            ]
        config = TrainingConfig(
            base=str(base),
            output_dir=str(path),
            explanation_loss_weight=explanation_weight,
            explanation_loss=self.config.explanation_loss,
            seed=seed + replica * REPLICA_SEED_STRIDE,
            source_dataset=f"builtin:{data_domain}",
            targets_info=self.targets_info() if explanation_weight > 0 and not objective else None,
            **objective,
            **head,
            **recipe,
        )
        if (path / "config.json").exists():
            _check_trained_with(path, config)
            return path
        self.log(f"[seed {seed}] training {kind} model on {domain} -> {path}")
        train_ds = (
            targets_ds
            if targets_ds is not None
            else self.dataset(data_domain, seed, "train", self.config.num_train)
        )
        eval_ds = self.dataset(data_domain, seed, "validation", None)
        host_data = [
            self.dataset(host_domain(d)[0], seed, "train", self.config.num_train) for d in hosts
        ] or None
        self._timed(
            f"train_{kind}",
            lambda: train(config, train_ds, eval_ds, image_processor=self.processor, host_datasets=host_data),
        )
        return path

    def targets_info(self) -> dict[str, Any]:
        if self.config.explanation_objective == "shapley":
            return {
                "method": "amortized_shapley",
                "coalitions_per_image": self.config.coalitions_per_image,
                "grid": list(self.config.grid()),
                "baseline": self.config.baseline,
            }
        return {
            "method": "kernel_shap",
            "value": "probs",
            "grid": list(self.config.grid()),
            "budget": self.config.target_budget,
            "baseline": self.config.baseline,
        }

    def with_targets(self, seed: int, domain: str):
        """The training split, with Kernel SHAP targets when the objective needs them."""
        if self.config.explanation_objective == "shapley":
            return self.dataset(domain, seed, "train", self.config.num_train)
        model = self.load(self.finetune(seed, domain, 0.0))
        train_ds = self.dataset(domain, seed, "train", self.config.num_train)
        self.log(f"[seed {seed}] Kernel SHAP targets for {len(train_ds)} {domain} images")
        return self._timed(
            "shapley_targets",
            lambda: add_explanation_targets(
                train_ds,
                model,
                image_processor=self.processor,
                grid=self.config.grid(),
                budget=self.config.target_budget,
                baseline=self.config.baseline,
                seed=seed,
                batch_size=self.config.batch_size,
                cache_dir=self.work / f"seed{seed}" / f"{domain}-targets",
                progress=False,
            ),
        )

    def vector(self, seed: int, source: str) -> ExplanationVector:
        path = self.work / f"seed{seed}" / f"{source}-vector"
        se_path = self.work / f"seed{seed}" / f"{source}-self_explaining"
        built = path / "explanation_vector_config.json"
        # A vector older than its self-explaining model was made from an earlier one: make it again.
        if built.exists() and (se_path / "model.safetensors").exists():
            if built.stat().st_mtime < (se_path / "model.safetensors").stat().st_mtime:
                self.log(f"[seed {seed}] {path} predates {se_path}: rebuilding it")
                built.unlink()
        if not built.exists():
            pred = self.load(self.finetune(seed, source, 0.0))
            se_path = self.finetune(
                seed, source, self.config.explanation_loss_weight, self.with_targets(seed, source)
            )
            se = self.load(se_path)
            vector = ExplanationVector.from_models(
                self_explaining=se,
                prediction_only=pred,
                base_model=str(self.base(seed)),
                provenance={
                    "source_dataset": f"builtin:{source}",
                    "explanation_loss_weight": self.config.explanation_loss_weight,
                    "explanation_loss": self.config.explanation_loss,
                    "targets": self.targets_info(),
                    "recipe": json.dumps(self.config.train, sort_keys=True),
                },
            )
            vector.save_pretrained(path)
        return ExplanationVector.from_pretrained(path)

    def oracle(self, seed: int, domain: str) -> Path:
        return self.finetune(
            seed, domain, self.config.explanation_loss_weight, self.with_targets(seed, domain)
        )

    @staticmethod
    def load(path: Path) -> ViTForSelfExplainingClassification:
        return ViTForSelfExplainingClassification.from_pretrained(path).eval()

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate_target(self, seed: int, target: str, sources: list[str], crossover: bool) -> dict[str, Any]:
        cfg = self.config
        grid = cfg.grid()
        test = self.dataset(target, seed, "test", cfg.num_eval)
        select = self.dataset(target, seed, "validation", cfg.num_select)
        x, labels = self.pixels(test), torch.tensor(test["label"])
        x_sel = self.pixels(select)
        masks = torch.tensor(np.asarray(test["object_mask"], dtype=bool))
        has_masks = BUILTIN_DOMAINS[target].has_masks
        model = self.load(self.finetune(seed, target, 0.0))
        with torch.inference_mode():
            logits = model(x, explain=None).logits
        predicted = logits.argmax(-1)
        self.log(f"[seed {seed}] {target}: Kernel SHAP reference (budget {cfg.reference_budget})")
        reference, reference_check = self.reference(model, x, predicted, seed)

        def score(m, maps, images=x, ref=reference, msk=masks) -> dict[str, float]:
            return self.score(
                m, images, maps, ref, msk if has_masks else None, predicted if images is x else None
            )

        result: dict[str, Any] = {
            "accuracy": float((predicted == labels).float().mean()),
            "num_eval": len(x),
            "num_reference": len(reference),
            "reference_seed_agreement": reference_check,
            "explainers": {},
        }
        own = self.patch_map(model, x, predicted, grid)
        result["explainers"]["no_transfer"] = score(model, own)
        plain = _as_plain_classifier(model)
        result["explainers"]["grad_cam"] = score(
            model, pool_to_player_grid(explainers.grad_cam(plain, x, predicted), grid)
        )
        rollout = pool_to_player_grid(explainers.attention_rollout(plain, x), grid)
        result["explainers"]["attention_rollout"] = score(model, rollout)
        result["explainers"]["random"] = score(model, explainers.random_explanation(x, grid, seed=seed))
        if crossover:
            result["kernel_shap"] = self.budget_curve(model, x, predicted, reference, seed)
        if cfg.oracle:
            oracle = self.load(self.oracle(seed, target))
            result["explainers"]["oracle"] = score(oracle, self.patch_map(oracle, x, predicted, grid))

        result["transfer"] = {}
        for source in sources:
            vector = self.vector(seed, source)
            sweep, maps_at = {}, {}
            for alpha in cfg.alphas:
                patched = _patched(model, vector, alpha, cfg.resize_position_embeddings)
                with torch.inference_mode():
                    patched_pred = patched(x, explain=None).logits.argmax(-1)
                    select_agree = patched(x_sel, explain=None).logits.argmax(-1) == model(
                        x_sel, explain=None
                    ).logits.argmax(-1)
                maps_at[_alpha_key(alpha)] = self.patch_map(patched, x, predicted, grid)
                entry = score(patched, maps_at[_alpha_key(alpha)])
                entry["accuracy"] = float((patched_pred == labels).float().mean())
                entry["top1_agreement"] = float((patched_pred == predicted).float().mean())
                # Label-free selection data: faithfulness on unlabelled validation images, own predictions.
                with torch.inference_mode():
                    sel_pred = patched(x_sel, explain=None).logits.argmax(-1)
                sel_maps = self.patch_map(patched, x_sel, sel_pred, grid)
                sel = self.faithfulness(patched, x_sel, sel_maps, sel_pred)
                entry["select_insertion_minus_deletion"] = sel["insertion"] - sel["deletion"]
                entry["select_top1_agreement"] = float(select_agree.float().mean())
                sweep[_alpha_key(alpha)] = entry
            recommended = self.recommended_alpha(seed, source)
            result["transfer"][source] = {
                "sweep": sweep,
                "label_free_alpha": _select_alpha(sweep, cfg.agreement_threshold),
                "recommended_alpha": recommended,
            }
            if "kernel_shap" in result and _alpha_key(recommended) in sweep:
                pearson = sweep[_alpha_key(recommended)]["pearson"]
                result["transfer"][source]["budget_match"] = budget_match(result["kernel_shap"], pearson)
            if _alpha_key(recommended) in sweep:
                result["transfer"][source]["paired"] = paired_comparisons(
                    sweep[_alpha_key(recommended)], result["explainers"], seed=seed
                )
                # The transferred map blended with the target's rollout (nothing fitted): does the vector carry
                # what rollout lacks? Scored like every map, and paired against rollout on the same images.
                blended = score(
                    model, explainers.standardized_blend(maps_at[_alpha_key(recommended)], rollout)
                )
                blended["paired_vs_rollout"] = paired_comparisons(
                    blended, {"attention_rollout": result["explainers"]["attention_rollout"]}, seed=seed
                )["attention_rollout"]
                blended.pop("_per_image")
                result["transfer"][source]["blend_with_rollout"] = blended
        _drop_per_image(result["explainers"])
        for transfer in result["transfer"].values():
            _drop_per_image(transfer["sweep"])
        return result

    def reference(self, model, x, classes, seed: int) -> tuple[torch.Tensor, float]:
        """Kernel SHAP at ``reference_budget`` on the first ``num_reference`` images (the classes explained),
        and the mean Pearson between two reference seeds on ``num_reference_check`` of them (convergence)."""
        cfg = self.config
        rows = torch.arange(min(cfg.num_reference, len(x)))

        def run(images, ref_seed):
            return self.kernel_shap(model, images, cfg.reference_budget, ref_seed)

        reference = self._timed("reference", lambda: run(x[rows], 10_000 + seed))[rows, classes[rows]]
        check = rows[: cfg.num_reference_check]
        second = self._timed("reference", lambda: run(x[check], 20_000 + seed))[check, classes[check]]
        seeds_agree = float(metrics.pearson(reference[check].flatten(1), second.flatten(1)).nanmean())
        return reference, seeds_agree

    def kernel_shap(self, model, images: torch.Tensor, budget: int, seed: int) -> torch.Tensor:
        """`kernel_shap_values` of `images` (every class), read back from the cache when computed before."""
        cfg = self.config

        def compute() -> torch.Tensor:
            return shapley.kernel_shap_values(
                model, images, grid=cfg.grid(), budget=budget, baseline=cfg.baseline, seed=seed,
                batch_size=cfg.batch_size, sampler=cfg.kernel_shap_sampler, ridge=cfg.kernel_shap_ridge,
            )  # fmt: skip

        folder = Path(cfg.kernel_shap_cache) if cfg.kernel_shap_cache else self.work / "kernel_shap_cache"
        key = kernel_shap_key(
            model,
            images,
            cfg.grid(),
            budget,
            cfg.baseline,
            seed,
            cfg.kernel_shap_sampler,
            cfg.kernel_shap_ridge,
        )
        path = folder / f"{key}.safetensors"
        if path.exists():
            return load_file(path)["values"]
        values = compute()
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(
            f"{path.stem}.{os.getpid()}.partial"
        )  # workers never see a half-written file
        save_file({"values": values.contiguous()}, str(partial))
        os.replace(partial, path)
        return values

    def budget_curve(self, model, x, classes, reference, seed: int) -> dict[str, dict[str, float]]:
        """Kernel SHAP at each budget of ``kernel_shap_budgets`` on the reference images, scored like a map."""
        cfg = self.config
        rows = torch.arange(len(reference))
        curve = {}
        for budget in cfg.kernel_shap_budgets:
            values = self._timed(
                "kernel_shap_curve", lambda budget=budget: self.kernel_shap(model, x[rows], budget, seed)
            )
            curve[str(budget)] = agreement(values[rows, classes[rows]], reference)
        return curve

    def evaluate_source(self, seed: int, source: str) -> dict[str, Any]:
        """In-domain fidelity: the source's self-explaining model explains its own held-out predictions in one
        pass; how close is that to a converged Kernel SHAP reference of the same model, at what budget would
        Kernel SHAP match it (B*), and what did the explanation supervision cost in accuracy?"""
        cfg = self.config
        grid = cfg.grid()
        test = self.dataset(source, seed, "test", cfg.num_eval)
        x, labels = self.pixels(test), torch.tensor(test["label"])
        masks = (
            torch.tensor(np.asarray(test["object_mask"], dtype=bool))
            if BUILTIN_DOMAINS[source].has_masks
            else None
        )
        pred = self.load(self.finetune(seed, source, 0.0))
        self.vector(seed, source)  # trains the self-explaining model
        se = self.load(
            self.finetune(seed, source, cfg.explanation_loss_weight, self.with_targets(seed, source))
        )
        with torch.no_grad():  # not inference_mode: Grad-CAM backpropagates to the logits of these classes
            se_classes = se(x, explain=None).logits.argmax(-1)
            pred_classes = pred(x, explain=None).logits.argmax(-1)
        self.log(f"[seed {seed}] {source}: in-domain reference (budget {cfg.reference_budget})")
        reference, check = self.reference(se, x, se_classes, seed)
        plain = _as_plain_classifier(se)
        maps = {
            "self_explaining": self.patch_map(se, x, se_classes, grid),
            "prediction_only_head": self.patch_map(pred, x, se_classes, grid),
            "grad_cam": pool_to_player_grid(explainers.grad_cam(plain, x, se_classes), grid),
            "attention_rollout": pool_to_player_grid(explainers.attention_rollout(plain, x), grid),
            "random": explainers.random_explanation(x, grid, seed=seed),
        }
        # Last, so that the bootstrap draws of the comparisons above are those of suites run before it existed.
        maps["blend_with_rollout"] = explainers.standardized_blend(
            maps["self_explaining"], maps["attention_rollout"]
        )
        scored = {name: self.score(se, x, m, reference, masks, se_classes) for name, m in maps.items()}
        paired = paired_comparisons(scored["self_explaining"], scored, seed=seed)
        _drop_per_image(scored)
        curve = self.budget_curve(se, x, se_classes, reference, seed)
        return {
            "paired": paired,
            "accuracy_self_explaining": float((se_classes == labels).float().mean()),
            "accuracy_prediction_only": float((pred_classes == labels).float().mean()),
            "top1_agreement": float((se_classes == pred_classes).float().mean()),
            "num_eval": len(x),
            "num_reference": len(reference),
            "reference_seed_agreement": check,
            "explainers": scored,
            "kernel_shap": curve,
            "budget_match": budget_match(curve, scored["self_explaining"]["pearson"]),
        }

    def recommended_alpha(self, seed: int, source: str) -> float:
        """α chosen on the source's own validation images: best insertion − deletion with top-1 kept.

        Written next to the vector (and into its config, so that ``alpha=None`` applies it); read back when there.
        """
        record = self.work / f"seed{seed}" / f"{source}-recommended-alpha.json"
        if record.exists():
            return float(json.loads(record.read_text())["alpha"])
        cfg = self.config
        val = self.dataset(source, seed, "validation", cfg.num_select)
        x = self.pixels(val)
        model = self.load(self.finetune(seed, source, 0.0))
        vector = self.vector(seed, source)
        with torch.inference_mode():
            original = model(x, explain=None).logits.argmax(-1)
        sweep = {}
        for alpha in cfg.alphas:
            patched = _patched(model, vector, alpha)
            with torch.inference_mode():
                pred = patched(x, explain=None).logits.argmax(-1)
            faith = self.faithfulness(patched, x, self.patch_map(patched, x, pred, cfg.grid()), pred)
            sweep[_alpha_key(alpha)] = {
                "select_insertion_minus_deletion": faith["insertion"] - faith["deletion"],
                "select_top1_agreement": float((pred == original).float().mean()),
            }
        alpha = _select_alpha(sweep, cfg.agreement_threshold)
        path = self.work / f"seed{seed}" / f"{source}-vector"
        stored = ExplanationVector.from_pretrained(path)
        if stored.config.recommended_alpha != alpha:
            stored.config.recommended_alpha = alpha
            stored.save_pretrained(path)
        record.write_text(json.dumps({"alpha": alpha, "sweep": sweep}, indent=1))
        return alpha

    @staticmethod
    def patch_map(model, x, classes, grid) -> torch.Tensor:
        with torch.inference_mode():
            maps = model(x, explain=classes).explanation
        return pool_to_player_grid(maps, grid)

    def faithfulness(self, model, x, maps, target) -> dict[str, float]:
        auc = self._auc(model, x, maps, target)
        return {"insertion": float(auc["insertion"].mean()), "deletion": float(auc["deletion"].mean())}

    def _auc(self, model, x, maps, target) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return insertion_deletion_auc(
                model,
                x,
                maps,
                baseline=self.config.baseline,
                target=target,
                batch_size=self.config.batch_size,
                steps=self.config.auc_steps,
            )

    def score(self, model, x, maps, reference, masks, target) -> dict[str, Any]:
        """Faithfulness on every image; agreement with the reference on the first ``len(reference)`` images
        (Pearson, Spearman and top-10 % overlap: Spearman alone is dominated by ties on flat backgrounds).

        ``_per_image`` keeps the per-image insertion, deletion and Pearson for the paired comparisons
        (:func:`paired_comparisons`), which remove it."""
        auc = self._auc(model, x, maps, target)
        out: dict[str, Any] = {
            "insertion": float(auc["insertion"].mean()),
            "deletion": float(auc["deletion"].mean()),
        }
        out.update(agreement(maps[: len(reference)], reference))
        if masks is not None:
            out["pointing_game"] = float(metrics.pointing_game(maps, masks).float().mean())
            out["relevance_mass"] = float(torch.nan_to_num(metrics.relevance_mass(maps, masks)).mean())
        pearson = torch.nan_to_num(
            metrics.pearson(maps[: len(reference)].flatten(1).float(), reference.flatten(1))
        )
        out["_per_image"] = {
            "insertion": auc["insertion"].tolist(),
            "deletion": auc["deletion"].tolist(),
            "pearson": pearson.tolist(),
        }
        return out

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Every unit of the suite (cached: a finished unit is read back), then the results dict."""
        cfg = self.config
        started = time.perf_counter()
        units = self.units()
        done = run_units(units, cfg, self.work, workers=cfg.workers, log=self.log)
        per_seed: dict[str, dict[str, Any]] = {}
        in_domain: dict[str, dict[str, Any]] = {}
        timings: dict[str, float] = {}
        for (kind, seed, name), unit in done.items():
            for key, value in unit.get("timings_s", {}).items():
                timings[key] = timings.get(key, 0.0) + value
            if kind == "source":
                in_domain.setdefault(str(seed), {})[name] = unit["result"]
            elif kind == "target":
                per_seed.setdefault(str(seed), {})[name] = unit["result"]
        order = lambda d: {s: d[s] for s in map(str, cfg.seeds) if s in d}  # noqa: E731
        return {
            "config": asdict(cfg),
            "per_seed": order(per_seed),
            "in_domain": order(in_domain),
            "grid": list(cfg.grid()),
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "unit_wall_s": {"/".join(map(str, k)): round(u["wall_s"], 1) for k, u in done.items()},
            "wall_time_s": round(time.perf_counter() - started, 1),
            "environment": _environment(cfg.workers),
        }

    def units(self) -> dict[Unit, list[Unit]]:
        """The suite's units, in the order they are started when ready, each with the units it needs."""
        cfg = self.config
        units: dict[Unit, list[Unit]] = {}
        for seed in cfg.seeds:
            base = ("base", seed, "")
            units[base] = []
            hosts = [("host", seed, d) for d in cfg.extension_hosts]
            for host in hosts:  # a host's prediction-only model, needed by every source's extension
                units[host] = [base]
            for source in cfg.sources:
                units[("source", seed, source)] = [base] + [h for h in hosts if h[2] != source]
            for target in cfg.targets:
                needs = [s for s, t in cfg.pair_list() if t == target]
                if (
                    target in cfg.sources
                ):  # its models are the source unit's (the oracle is its self-explaining)
                    needs.append(target)
                units[("target", seed, target)] = [base] + [("source", seed, s) for s in dict.fromkeys(needs)]
        return units

    def run_unit(self, unit: Unit) -> Any:
        """Compute one unit (its dependencies are assumed done)."""
        kind, seed, name = unit
        crossover_seeds = self.config.crossover_seeds
        crossover_seeds = crossover_seeds if crossover_seeds is not None else self.config.seeds[:1]
        if kind == "base":
            return str(self.base(seed))
        if kind == "host":
            return str(self.finetune(seed, name, 0.0))
        if kind == "source":
            result = self.evaluate_source(seed, name)
            result["recommended_alpha"] = self.recommended_alpha(seed, name)
            return result
        if kind == "target":
            sources = [s for s, t in self.config.pair_list() if t == name]
            return self.evaluate_target(seed, name, sources, seed in crossover_seeds)
        raise ValueError(f"Unknown unit kind {kind!r}.")

    def heatmap_figure(self, path: str | Path) -> Path:
        """Heatmaps of the first pair and seed: image, no transfer, with the vector, attention rollout, their blend,
        and the Kernel SHAP reference, each scaled by its largest magnitude (red: for the class, blue: against;
        for the blend, above and below the image's mean)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cfg = self.config
        seed, (source, target) = cfg.seeds[0], cfg.pair_list()[0]
        grid = cfg.grid()
        test = self.dataset(target, seed, "test", cfg.heatmap_examples)
        x = self.pixels(test)
        model = self.load(self.finetune(seed, target, 0.0))
        alpha = self.recommended_alpha(seed, source)
        patched = _patched(model, self.vector(seed, source), alpha, cfg.resize_position_embeddings)
        with torch.inference_mode():
            predicted = model(x, explain=None).logits.argmax(-1)
        reference = self.kernel_shap(model, x, cfg.reference_budget, 10_000 + seed)[
            torch.arange(len(x)), predicted
        ]
        rollout = pool_to_player_grid(explainers.attention_rollout(_as_plain_classifier(model), x), grid)
        transferred = self.patch_map(patched, x, predicted, grid)
        columns = [
            ("image", None),
            ("no transfer (α = 0)", self.patch_map(model, x, predicted, grid)),
            (f"vector from {source} (α = {alpha:g})", transferred),
            ("attention rollout", rollout),
            # z-scores: red and blue are above and below the image's mean here, not for and against
            ("blend with rollout\n(above / below mean)", explainers.standardized_blend(transferred, rollout)),
            (f"Kernel SHAP ({cfg.reference_budget} evals)", reference),
        ]
        fig, axes = plt.subplots(
            len(x), len(columns), figsize=(2.3 * len(columns) + 0.8, 2.3 * len(x)), squeeze=False
        )
        names = test.features["label"].names
        shown = None
        for row in range(len(x)):
            image = np.asarray(test[row]["image"].convert("RGB"))
            height, width = image.shape[:2]
            for col, (title, maps) in enumerate(columns):
                ax = axes[row][col]
                ax.imshow(image, cmap="gray" if col else None, alpha=1.0 if col == 0 else 0.6)
                if maps is not None:
                    m = maps[row].float()
                    m = (m / m.abs().max().clamp_min(1e-12)).numpy()
                    shown = ax.imshow(
                        m,
                        cmap="RdBu_r",
                        vmin=-1,
                        vmax=1,
                        alpha=0.6,
                        # Pixel edges, not centres: the map covers the image exactly.
                        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                        interpolation="nearest",
                    )
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=8)
            axes[row][0].set_ylabel(f"explained: {names[int(predicted[row])]}\n(predicted class)", fontsize=8)
        if shown is not None:
            bar = fig.colorbar(shown, ax=axes, fraction=0.025, pad=0.02)
            bar.set_label(
                "score / its largest magnitude per map\n(red: for the class, blue: against)", fontsize=7
            )
        fig.suptitle(f"{source} → {target}, seed {seed}: maps of the predicted class", fontsize=9)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


def kernel_shap_key(
    model,
    images: torch.Tensor,
    grid,
    budget: int,
    baseline: str,
    seed: int,
    sampler: str = "kernel",
    ridge: str = "none",
) -> str:
    """A digest of everything Kernel SHAP values depend on: the weights the logits read (the explanation
    extension is left out: the class token never passes through it, so it cannot change a logit), the images, the
    grid, budget, baseline, seed, sampler and ridge, and the source of the modules that compute them (an edit there,
    even one that would not change a value, starts a new cache entry rather than risk a stale one). With the default
    sampler and no ridge the keys are those written before either was a setting."""
    digest = hashlib.sha256()

    def add(tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")

    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith("explainer."):
            digest.update(name.encode())
            add(tensor)
    add(images)
    digest.update(json.dumps([type(model).__name__, list(grid), budget, str(baseline), seed]).encode())
    modules = [shapley, masking, model_call]
    if sampler != "kernel":
        digest.update(json.dumps({"sampler": sampler}).encode())
        modules.append(leverage)
    if ridge != "none":
        digest.update(json.dumps({"ridge": ridge}).encode())
        modules.append(ridge_module)
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:32]


def _as_plain_classifier(model: ViTForSelfExplainingClassification):
    """The same classifier as a `ViTForImageClassification` (for Grad-CAM and rollout), without the extension."""
    plain = ViTForImageClassification(model.config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("explainer.")}
    plain.load_state_dict(state)
    return plain.eval()


#: Bases θ0 shipped with the package (``experiments/bases/<name>``), each with the command that made it in its
#: ``pretraining_metrics.json``: the demo starts from one instead of spending its minutes on pre-training.
PACKAGED_BASES = ("patch4-union", "patch4-union-36ep", "patch4-union-96ep")


def packaged_base(name: str) -> Path:
    """Folder of a packaged base θ0 (a plain ``ViTForImageClassification`` + image processor)."""
    if name not in PACKAGED_BASES:
        raise ValueError(f"Unknown packaged base {name!r}; the package has {PACKAGED_BASES}.")
    return Path(str(resources.files("selfexplain.experiments").joinpath("bases", name)))


#: A replica host "<domain>@<k>" is fine-tuned with training seed ``seed + k * REPLICA_SEED_STRIDE`` (its head
#: initialisation and batch order), on the same images as ``<domain>``'s own fine-tune of that seed.
REPLICA_SEED_STRIDE = 1000


def host_domain(name: str) -> tuple[str, int]:
    """``(domain, replica)`` of an extension host's name: ``"mnist"`` → ``("mnist", 0)``, ``"mnist@2"`` →
    ``("mnist", 2)``, another fine-tune of ``mnist`` on the same images with another training seed."""
    domain, at, replica = name.partition("@")
    if not at:
        return name, 0
    if not replica.isdigit() or int(replica) < 1 or not domain:
        raise ValueError(
            f"extension host {name!r}: a replica is written '<domain>@<k>' with k a positive integer "
            f"(e.g. 'mnist@1')."
        )
    return domain, int(replica)


def agreement(maps: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean Pearson, Spearman and top-10 % overlap of ``maps`` with ``reference`` (both ``(B, gh, gw)``)."""
    flat, ref = maps.flatten(1).float(), reference.flatten(1).float()
    k = max(1, math.ceil(flat.shape[1] / 10))
    return {
        "pearson": float(torch.nan_to_num(metrics.pearson(flat, ref)).mean()),
        "spearman": float(torch.nan_to_num(metrics.spearman(flat, ref)).mean()),
        "top10_overlap": float(metrics.topk_overlap(flat, ref, k).float().mean()),
    }


#: Per-image measures compared in pairs, and the sign that means "the map is better" for each.
PAIRED_MEASURES = {"insertion": 1, "deletion": -1, "insertion_minus_deletion": 1, "pearson": 1}


def paired_comparisons(
    entry: dict[str, Any], others: dict[str, dict[str, Any]], seed: int = 0, resamples: int = 2000
) -> dict[str, dict[str, dict[str, float]]]:
    """Paired differences ``entry − other`` on the same images, for every explainer in ``others``.

    Per measure: the mean difference, its 95 % bootstrap confidence interval (images resampled, seeded), the
    number of images, and the share of images on which ``entry`` is better. The insertion/deletion measures use
    every evaluated image, Pearson the reference images.
    """
    mine = _per_image_measures(entry)
    generator = np.random.default_rng(seed)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, other in others.items():
        if other is entry or "_per_image" not in other:
            continue
        theirs = _per_image_measures(other)
        out[name] = {}
        for measure, sign in PAIRED_MEASURES.items():
            diff = mine[measure] - theirs[measure]
            draws = generator.integers(0, len(diff), size=(resamples, len(diff)))
            means = diff[draws].mean(axis=1)
            out[name][measure] = {
                "mean_diff": float(diff.mean()),
                "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
                "n": len(diff),
                "better_share": float((sign * diff > 0).mean()),
            }
    return out


def _per_image_measures(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    per = {k: np.asarray(v, dtype=float) for k, v in entry["_per_image"].items()}
    per["insertion_minus_deletion"] = per["insertion"] - per["deletion"]
    return per


def _drop_per_image(entries: dict[str, dict[str, Any]]) -> None:
    for entry in entries.values():
        entry.pop("_per_image", None)


def budget_match(curve: dict[str, dict[str, float]], pearson: float) -> dict[str, Any]:
    """B*: the smallest Kernel SHAP budget of ``curve`` whose mean Pearson with the reference reaches the single
    pass's ``pearson`` (``below``: already the smallest budget tested; ``above``: no budget tested does).

    Kernel SHAP is not monotone in its budget below about 2n evaluations (exact enumeration of the smallest
    coalition sizes uses the budget up), so a small budget can reach a value a larger one misses; B* takes the
    smallest that does, the reading least flattering to the single pass.
    """
    budgets = sorted(int(b) for b in curve)
    reached = [b for b in budgets if curve[str(b)]["pearson"] >= pearson]
    if not reached:
        return {"budget": None, "relation": "above", "largest_tested": budgets[-1]}
    relation = "below" if reached[0] == budgets[0] else "at"
    return {"budget": reached[0], "relation": relation, "largest_tested": budgets[-1]}


def _alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


def _select_alpha(sweep: dict[str, dict[str, float]], threshold: float) -> float:
    """Largest insertion − deletion among the α whose top-1 agreement with the original is ≥ threshold."""
    allowed = {a: e for a, e in sweep.items() if e["select_top1_agreement"] >= threshold}
    if not allowed:
        return 0.0
    return float(max(allowed, key=lambda a: (allowed[a]["select_insertion_minus_deletion"], -float(a))))


def _patched(model, vector: ExplanationVector, alpha: float, resize_position_embeddings: bool = False):
    """The model with ``alpha`` × the vector; at α = 0 the model itself, unpatched. (The same thing for a vector
    whose extension reads the final tokens: its all-zero extension is the identity. An extension reading an inner
    block's tokens is not: at α = 0 the classifier would read that block's tokens, which is not the model's own
    map, so the sweep's α = 0 is the model as it explains without any vector.)"""
    if alpha == 0:
        return model.eval()
    return apply_explanation_vector(
        model, vector, alpha=alpha, resize_position_embeddings=resize_position_embeddings
    ).eval()


def _environment(workers: int = 1) -> dict[str, str]:
    cores = os.cpu_count()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()}, {cores} cores, {workers} worker process(es) × "
        f"{torch.get_num_threads()} thread(s)",
    }


#: Training settings that name where things are, not how they are trained: a suite whose models are linked
#: from another folder (a benchmark reusing the suite's θ0) records other paths for the same training.
_PATH_SETTINGS = frozenset({"base", "output_dir", "value_model", "extension_hosts", "resume"})


def _check_trained_with(path: Path, config: TrainingConfig) -> None:
    """Refuse to reuse a finished model that was trained with other settings than the suite asks for now: its
    numbers would be reported under a configuration that did not produce them. Nothing is deleted."""
    saved_file = path / "training_config.json"
    if not saved_file.exists():
        return  # trained outside `train` (e.g. a packaged model): nothing to compare
    saved = TrainingConfig.from_json_file(saved_file).to_dict()
    wanted = config.to_dict()
    different = {
        key: (saved.get(key), value)
        for key, value in wanted.items()
        if key not in _PATH_SETTINGS and saved.get(key) != value
    }
    if different:
        details = ", ".join(
            f"{k}: trained with {a!r}, asked {b!r}" for k, (a, b) in sorted(different.items())
        )
        raise ValueError(
            f"{path} was trained with other settings than this suite asks for ({details}). Move it (and the "
            "results that used it) away to retrain, or point output_dir elsewhere."
        )


# ------------------------------------------------------------------------------------------------- units
#: A unit of work: (kind, seed, domain) with kind "base", "host", "source" or "target".
Unit = tuple[str, int, str]


def _unit_file(work: Path, unit: Unit) -> Path:
    kind, seed, name = unit
    return work / f"seed{seed}" / "results" / (f"{kind}-{name}.json" if name else f"{kind}.json")


#: Suite settings that do not change any unit's numbers: where things go, how the work is spread, which seeds
#: the suite has (a unit is one seed's), and the batch size (results do not depend on it).
_NON_RESULT_SETTINGS = frozenset(
    {"name", "output_dir", "report_dir", "kernel_shap_cache", "workers", "num_threads", "batch_size", "seeds"}
)


def _result_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a unit's result depends on, as recorded in its result file (JSON-normalised)."""
    kept = {key: value for key, value in config.items() if key not in _NON_RESULT_SETTINGS}
    return json.loads(json.dumps(kept, sort_keys=True))


def _setting_defaults() -> dict[str, Any]:
    """Every `ExperimentConfig` setting's default value."""
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(ExperimentConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def _check_result_settings(path: Path, record: Mapping[str, Any], config: dict[str, Any]) -> None:
    """Refuse to report a finished unit that was computed with other settings than the suite asks for now (its
    numbers would be shown under a configuration that did not produce them). Result files written before units
    recorded their settings are read back as they are. Nothing is deleted."""
    saved = record.get("settings")
    if saved is None:
        return
    wanted = _result_settings(config)
    # A setting added after the file was written had its default value then.
    saved = {**_result_settings(_setting_defaults()), **saved}
    different = sorted(key for key in saved.keys() | wanted.keys() if saved.get(key) != wanted.get(key))
    if different:
        details = ", ".join(
            f"{key}: computed with {saved.get(key)!r}, asked {wanted.get(key)!r}" for key in different
        )
        raise ValueError(
            f"{path} was computed with other settings than this suite asks for ({details}). Move it (and the "
            "models it trained) away to recompute, or point output_dir elsewhere."
        )


def _compute_unit(config: dict[str, Any], unit: Unit) -> dict[str, Any]:
    """Run one unit in this process and write its result file (so that a killed suite resumes after it)."""
    experiment = Experiment(ExperimentConfig(**config))
    started = time.perf_counter()
    result = experiment.run_unit(unit)
    record = {
        "unit": list(unit),
        "settings": _result_settings(config),
        "result": result,
        "timings_s": experiment.timings,
        "wall_s": time.perf_counter() - started,
    }
    path = _unit_file(experiment.work, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: a unit file is complete or absent
    return record


def run_units(
    units: dict[Unit, list[Unit]],
    config: ExperimentConfig,
    work: Path,
    workers: int = 1,
    log: Callable[[str], None] = print,
    compute: Callable[[dict[str, Any], Unit], dict[str, Any]] = _compute_unit,
) -> dict[Unit, dict[str, Any]]:
    """Run every unit whose result file is missing, each once the units it needs are done, in up to ``workers``
    processes (units are started in the order of ``units`` among those ready). Returns every unit's record."""
    done: dict[Unit, dict[str, Any]] = {}
    config_dict = asdict(config)
    for unit in units:
        path = _unit_file(work, unit)
        if path.exists():
            done[unit] = json.loads(path.read_text())
            _check_result_settings(path, done[unit], config_dict)
    pending = [u for u in units if u not in done]
    if done:
        log(f"resuming: {len(done)} of {len(units)} units already done")
    if workers <= 1:
        for unit in pending:
            done[unit] = compute(config_dict, unit)
        return {u: done[u] for u in units}
    # spawn: fork would copy torch's thread pools and the parent's state into the workers.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running: dict[Future, Unit] = {}
        while pending or running:
            ready = [u for u in pending if all(d in done for d in units[u])]
            for unit in ready[: workers - len(running)]:
                pending.remove(unit)
                log(f"unit {'/'.join(map(str, unit))}: started")
                running[pool.submit(compute, config_dict, unit)] = unit
            if not running:
                raise RuntimeError(f"Units {pending} wait on units that are not in the suite.")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                unit = running.pop(future)
                done[unit] = future.result()  # a failed unit stops the suite; finished units stay cached
                log(f"unit {'/'.join(map(str, unit))}: done in {done[unit]['wall_s'] / 60:.1f} min")
    return {u: done[u] for u in units}
