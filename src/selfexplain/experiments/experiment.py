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

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from ..attribution import shapley
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
    explanation_loss_weight: float = 1.0
    explanation_loss: str = "pearson"
    player_grid: list[int] = field(default_factory=lambda: [4, 4])
    target_budget: int = 128
    baseline: str = "mean"
    num_train: int = 1000
    num_eval: int = 64
    num_select: int = 64
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 1.5, 2.0])
    agreement_threshold: float = 0.95
    reference_budget: int = 1024
    kernel_shap_budgets: list[int] = field(default_factory=lambda: [25, 50, 100, 150, 300, 600])
    crossover_seeds: list[int] | None = None
    oracle: bool = True
    heatmap_examples: int = 6
    batch_size: int = 512
    # The offline models are tiny: one intra-op thread is as fast as two on an idle 2-core machine and 20-40x
    # faster when another process competes for the cores (OpenMP threads spin-wait). None: torch's default.
    num_threads: int | None = 1

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
        self.processor = default_image_processor(int(config.base.get("image_size", 32)))

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
        path = self.work / f"seed{seed}" / "base"
        if not (path / "config.json").exists():
            self.log(f"[seed {seed}] pre-training the base θ0 -> {path}")
            kwargs = {"seed": seed, **self.config.base}
            self._timed("pretrain_base", lambda: pretrain_base(path, **kwargs))
        return path

    def finetune(self, seed: int, domain: str, explanation_weight: float, targets_ds=None) -> Path:
        kind = "self_explaining" if explanation_weight > 0 else "prediction_only"
        path = self.work / f"seed{seed}" / f"{domain}-{kind}"
        if (path / "config.json").exists():
            return path
        self.log(f"[seed {seed}] training {kind} model on {domain} -> {path}")
        train_ds = (
            targets_ds
            if targets_ds is not None
            else self.dataset(domain, seed, "train", self.config.num_train)
        )
        eval_ds = self.dataset(domain, seed, "validation", None)
        recipe = {
            "num_epochs": 4,
            "batch_size": 64,
            "learning_rate": 1e-3,
            "checkpoint_every": None,
            "log_every": 20,
            **self.config.train,
        }
        config = TrainingConfig(
            base=str(self.base(seed)),
            output_dir=str(path),
            explanation_loss_weight=explanation_weight,
            explanation_loss=self.config.explanation_loss,
            seed=seed,
            source_dataset=f"builtin:{domain}",
            targets_info=self.targets_info() if explanation_weight > 0 else None,
            **recipe,
        )
        self._timed(f"train_{kind}", lambda: train(config, train_ds, eval_ds, image_processor=self.processor))
        return path

    def targets_info(self) -> dict[str, Any]:
        return {
            "method": "kernel_shap",
            "value": "probs",
            "grid": list(self.config.player_grid),
            "budget": self.config.target_budget,
            "baseline": self.config.baseline,
        }

    def with_targets(self, seed: int, domain: str):
        model = self.load(self.finetune(seed, domain, 0.0))
        train_ds = self.dataset(domain, seed, "train", self.config.num_train)
        self.log(f"[seed {seed}] Kernel SHAP targets for {len(train_ds)} {domain} images")
        return self._timed(
            "shapley_targets",
            lambda: add_explanation_targets(
                train_ds,
                model,
                image_processor=self.processor,
                grid=tuple(self.config.player_grid),
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
        if not (path / "explanation_vector_config.json").exists():
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
        grid = tuple(cfg.player_grid)
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
        reference_all = self._timed(
            "reference",
            lambda: shapley.kernel_shap_values(
                model,
                x,
                grid=grid,
                budget=cfg.reference_budget,
                baseline=cfg.baseline,
                seed=10_000 + seed,
                batch_size=cfg.batch_size,
            ),
        )
        reference = reference_all[torch.arange(len(x)), predicted]

        def score(m, maps, images=x, ref=reference, msk=masks) -> dict[str, float]:
            return self.score(
                m, images, maps, ref, msk if has_masks else None, predicted if images is x else None
            )

        result: dict[str, Any] = {"accuracy": float((predicted == labels).float().mean()), "explainers": {}}
        own = self.patch_map(model, x, predicted, grid)
        result["explainers"]["no_transfer"] = score(model, own)
        plain = _as_plain_classifier(model)
        result["explainers"]["grad_cam"] = score(
            model, pool_to_player_grid(explainers.grad_cam(plain, x, predicted), grid)
        )
        result["explainers"]["attention_rollout"] = score(
            model, pool_to_player_grid(explainers.attention_rollout(plain, x), grid)
        )
        result["explainers"]["random"] = score(model, explainers.random_explanation(x, grid, seed=seed))
        if crossover:
            curve = {}
            for budget in cfg.kernel_shap_budgets:
                ks = shapley.kernel_shap_values(
                    model,
                    x,
                    grid=grid,
                    budget=budget,
                    baseline=cfg.baseline,
                    seed=seed,
                    batch_size=cfg.batch_size,
                )
                curve[str(budget)] = score(model, ks[torch.arange(len(x)), predicted])
            result["kernel_shap"] = curve
        if cfg.oracle:
            oracle = self.load(self.oracle(seed, target))
            result["explainers"]["oracle"] = score(oracle, self.patch_map(oracle, x, predicted, grid))

        result["transfer"] = {}
        for source in sources:
            vector = self.vector(seed, source)
            sweep = {}
            for alpha in cfg.alphas:
                patched = apply_explanation_vector(model, vector, alpha=alpha).eval()
                with torch.inference_mode():
                    patched_pred = patched(x, explain=None).logits.argmax(-1)
                    select_agree = patched(x_sel, explain=None).logits.argmax(-1) == model(
                        x_sel, explain=None
                    ).logits.argmax(-1)
                entry = score(patched, self.patch_map(patched, x, predicted, grid))
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
            result["transfer"][source] = {
                "sweep": sweep,
                "label_free_alpha": _select_alpha(sweep, cfg.agreement_threshold),
                "recommended_alpha": self.recommended_alpha(seed, source),
            }
        return result

    def recommended_alpha(self, seed: int, source: str) -> float:
        """α chosen on the source's own validation images: best insertion − deletion with top-1 kept."""
        cache = self.__dict__.setdefault("_recommended", {})
        if (seed, source) in cache:
            return cache[(seed, source)]
        cfg = self.config
        val = self.dataset(source, seed, "validation", cfg.num_select)
        x = self.pixels(val)
        model = self.load(self.finetune(seed, source, 0.0))
        vector = self.vector(seed, source)
        with torch.inference_mode():
            original = model(x, explain=None).logits.argmax(-1)
        sweep = {}
        for alpha in cfg.alphas:
            patched = apply_explanation_vector(model, vector, alpha=alpha).eval()
            with torch.inference_mode():
                pred = patched(x, explain=None).logits.argmax(-1)
            faith = self.faithfulness(
                patched, x, self.patch_map(patched, x, pred, tuple(cfg.player_grid)), pred
            )
            sweep[_alpha_key(alpha)] = {
                "select_insertion_minus_deletion": faith["insertion"] - faith["deletion"],
                "select_top1_agreement": float((pred == original).float().mean()),
            }
        cache[(seed, source)] = _select_alpha(sweep, cfg.agreement_threshold)
        return cache[(seed, source)]

    @staticmethod
    def patch_map(model, x, classes, grid) -> torch.Tensor:
        with torch.inference_mode():
            maps = model(x, explain=classes).explanation
        return pool_to_player_grid(maps, grid)

    def faithfulness(self, model, x, maps, target) -> dict[str, float]:
        with torch.inference_mode():
            auc = insertion_deletion_auc(
                model,
                x,
                maps,
                baseline=self.config.baseline,
                target=target,
                batch_size=self.config.batch_size,
            )
        return {"insertion": float(auc["insertion"].mean()), "deletion": float(auc["deletion"].mean())}

    def score(self, model, x, maps, reference, masks, target) -> dict[str, float]:
        out = self.faithfulness(model, x, maps, target)
        flat, ref = maps.flatten(1).float(), reference.flatten(1).float()
        k = max(1, math.ceil(flat.shape[1] / 4))
        out["spearman"] = float(torch.nan_to_num(metrics.spearman(flat, ref)).mean())
        out["topk_overlap"] = float(metrics.topk_overlap(flat, ref, k).float().mean())
        if masks is not None:
            out["pointing_game"] = float(metrics.pointing_game(maps, masks).float().mean())
            out["relevance_mass"] = float(torch.nan_to_num(metrics.relevance_mass(maps, masks)).mean())
        return out

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        started = time.perf_counter()
        crossover_seeds = cfg.crossover_seeds if cfg.crossover_seeds is not None else cfg.seeds[:1]
        per_seed = {}
        for seed in cfg.seeds:
            per_seed[str(seed)] = {}
            for target in cfg.targets:
                sources = [s for s, t in cfg.pair_list() if t == target]
                per_seed[str(seed)][target] = self.evaluate_target(
                    seed, target, sources, seed in crossover_seeds
                )
        return {
            "config": asdict(cfg),
            "per_seed": per_seed,
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
            "wall_time_s": round(time.perf_counter() - started, 1),
            "environment": _environment(),
        }

    def heatmap_figure(self, path: str | Path) -> Path:
        """Heatmaps of the first pair and seed: image, no transfer, with the vector, Kernel SHAP reference."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cfg = self.config
        seed, (source, target) = cfg.seeds[0], cfg.pair_list()[0]
        grid = tuple(cfg.player_grid)
        test = self.dataset(target, seed, "test", cfg.heatmap_examples)
        x = self.pixels(test)
        model = self.load(self.finetune(seed, target, 0.0))
        alpha = self.recommended_alpha(seed, source)
        patched = apply_explanation_vector(model, self.vector(seed, source), alpha=alpha).eval()
        with torch.inference_mode():
            predicted = model(x, explain=None).logits.argmax(-1)
        reference = shapley.kernel_shap_values(
            model, x, grid=grid, budget=cfg.reference_budget, baseline=cfg.baseline, seed=10_000 + seed
        )[torch.arange(len(x)), predicted]
        columns = [
            ("image", None),
            ("no transfer (α = 0)", self.patch_map(model, x, predicted, grid)),
            (f"vector from {source} (α = {alpha:g})", self.patch_map(patched, x, predicted, grid)),
            (f"Kernel SHAP ({cfg.reference_budget} evals)", reference),
        ]
        fig, axes = plt.subplots(
            len(x), len(columns), figsize=(2.2 * len(columns), 2.2 * len(x)), squeeze=False
        )
        names = test.features["label"].names
        for row in range(len(x)):
            image = np.asarray(test[row]["image"].convert("RGB"))
            for col, (title, maps) in enumerate(columns):
                ax = axes[row][col]
                ax.imshow(image)
                if maps is not None:
                    ax.imshow(
                        maps[row].float().numpy(),
                        cmap="jet",
                        alpha=0.5,
                        extent=(0, image.shape[1], image.shape[0], 0),
                        interpolation="nearest",
                    )
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=8)
            axes[row][0].set_ylabel(names[int(predicted[row])], fontsize=8)
        fig.suptitle(f"{source} → {target}, seed {seed}", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _as_plain_classifier(model: ViTForSelfExplainingClassification):
    from transformers import ViTForImageClassification

    plain = ViTForImageClassification(model.config)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def _alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


def _select_alpha(sweep: dict[str, dict[str, float]], threshold: float) -> float:
    """Largest insertion − deletion among the α whose top-1 agreement with the original is ≥ threshold."""
    allowed = {a: e for a, e in sweep.items() if e["select_top1_agreement"] >= threshold}
    if not allowed:
        return 0.0
    return float(max(allowed, key=lambda a: (allowed[a]["select_insertion_minus_deletion"], -float(a))))


def _environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
