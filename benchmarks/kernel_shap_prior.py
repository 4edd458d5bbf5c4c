"""How many Kernel SHAP evaluations is a map worth as a prior? `kernel_shap_values(ridge="gcv", prior=map)`.

A single-pass map need not be the last word: as the centre of Kernel SHAP's ridge penalty (rescaled to the
evaluations, trusted as far as generalised cross-validation says) it can make a small budget do the work of a large
one. This measures that on the `base12ep` suite's classifiers, against the same converged references as
`kernel_shap_ridge.py` (the mean of two Leverage SHAP runs at 4,096 evaluations; cached there, computed here when
missing), for every seed, the first ``--images`` test images and the predicted class:

- MNIST (in-domain): the source's self-explaining map (its extension sits on the frozen classifier, so the model
  explained and the model that explains have the same logits);
- `digits` (transfer): the map of the `digits` classifier patched with the MNIST vector (α = 1, the suite's
  recommended α), and the oracle's (an extension trained on the `digits` classifier itself);
- on both, the explainers that need no training: attention rollout (class-agnostic: the same map for every class)
  and Grad-CAM (per class) as priors, and no prior (the equal split: the suite's Kernel SHAP).

"Worth" = the budget the no-prior Kernel SHAP needs to reach the Pearson (or L2 error) a prior reaches at a given
budget, interpolated on log budget between the two budgets that bracket it, over that budget.

    python benchmarks/kernel_shap_prior.py     # writes docs/results/kernel_shap_prior.md (+ .json)

Needs the suite's models (`selfexplain experiment --config base12ep`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from kernel_shap_ridge import reference_pair

from selfexplain import ViTForSelfExplainingClassification
from selfexplain.attribution.shapley import kernel_shap_values
from selfexplain.evaluation import metrics
from selfexplain.evaluation.explainers import attention_rollout, grad_cam
from selfexplain.experiments.experiment import Experiment, ExperimentConfig, _environment, _patched
from selfexplain.vectors import ExplanationVector

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src" / "selfexplain" / "experiments" / "configs" / "base12ep.json"
GRID = (8, 8)
NO_PRIOR = "no prior (equal split)"


def priors(experiment: Experiment, seed: int, domain: str, model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(B, C, 8, 8)`` prior maps for the contenders on ``domain``'s classifier ``model``."""
    work = experiment.work / f"seed{seed}"
    maps: dict[str, torch.Tensor] = {}

    def self_explaining(explainer) -> torch.Tensor:
        with torch.inference_mode():
            return explainer(x, explain="all").explanation.float()

    if domain == "mnist":
        source = ViTForSelfExplainingClassification.from_pretrained(work / "mnist-self_explaining").eval()
        maps["self-explaining map (the source's own)"] = self_explaining(source)
    else:
        vector = ExplanationVector.from_pretrained(work / "mnist-vector")
        maps["transferred map (MNIST vector, α = 1)"] = self_explaining(_patched(model, vector, 1.0))
        oracle = ViTForSelfExplainingClassification.from_pretrained(work / f"{domain}-self_explaining").eval()
        maps["oracle map (trained on this classifier)"] = self_explaining(oracle)
    num_classes = model.config.num_labels
    rollout = attention_rollout(model, x)
    maps["attention rollout (no training)"] = (
        rollout.unsqueeze(1).expand(-1, num_classes, -1, -1).contiguous()
    )
    maps["Grad-CAM (no training)"] = torch.stack(
        [grad_cam(model, x, target=c) for c in range(num_classes)], dim=1
    )
    return maps


def reference(experiment: Experiment, model, x, classes, seed: int, domain: str, budget: int) -> dict:
    """The two reference runs of `kernel_shap_ridge.py` (its cache file and seeds), computed when missing."""
    # kernel_shap_ridge.py's file for its default 16 images; other counts get their own.
    count = "" if len(x) == 16 else f"-{len(x)}images"
    cache = experiment.work / "kernel_shap_ridge" / f"seed{seed}-{domain}-{budget}{count}.safetensors"
    first, second = reference_pair(model, x, classes, budget, cache)
    return {"first": first, "second": second}


def curves(model, x, classes, maps, ref, budgets, seeds) -> dict:
    rows = torch.arange(len(x))
    out = {}
    for name, prior in [(NO_PRIOR, None), *maps.items()]:
        curve = {}
        for budget in budgets:
            pearson, error = [], []
            for seed in range(seeds):
                phi = kernel_shap_values(
                    model, x, grid=GRID, budget=budget, baseline="mean", sampler="leverage", ridge="gcv",
                    prior=prior, seed=[1000 * seed + i for i in rows.tolist()],
                )[rows, classes].flatten(1).to(torch.float64)  # fmt: skip
                pearson.append(float(metrics.pearson(phi, ref).nanmean()))
                # The median over images: a mean is one image's when its reference is near zero (seen at 128).
                error.append(float(((phi - ref).norm(dim=1) / ref.norm(dim=1)).median()))
            curve[str(budget)] = {"pearson": statistics.mean(pearson), "relative_l2": statistics.mean(error)}
        out[name] = curve
        print(f"  {name}: " + ", ".join(f"{b} {c['pearson']:.3f}" for b, c in curve.items()), flush=True)
    # The prior alone (its per-image scale is irrelevant to Pearson).
    alone = {
        name: float(metrics.pearson(prior[rows, classes].flatten(1).double(), ref).nanmean())
        for name, prior in maps.items()
    }
    return {"curves": out, "prior_alone_pearson": alone}


def worth(curve: dict, baseline: dict, budget: int, key: str) -> tuple[str, float]:
    """Budget the baseline curve needs to reach ``curve``'s value at ``budget``, divided by ``budget``: ``("", x)``
    interpolated, ``("≤", x)`` when the baseline's smallest budget already reaches it, ``(">", x)`` when its
    largest does not."""
    better = (lambda a, b: a >= b) if key == "pearson" else (lambda a, b: a <= b)
    goal = curve[str(budget)][key]
    points = sorted((int(b), c[key]) for b, c in baseline.items())
    if better(points[0][1], goal):
        return "≤", points[0][0] / budget
    for (b0, v0), (b1, v1) in zip(points, points[1:], strict=False):
        if better(v1, goal) and not better(v0, goal):
            t = (goal - v0) / (v1 - v0) if v1 != v0 else 1.0
            return "", math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))) / budget
    return ">", points[-1][0] / budget


def _fmt_worth(values: list[tuple[str, float]]) -> str:
    per_seed = ", ".join(f"{qualifier}{ratio:.1f}" for qualifier, ratio in values)
    if all(qualifier == "" for qualifier, _ in values):
        return f"{statistics.mean(ratio for _, ratio in values):.1f}× ({per_seed})"
    return f"({per_seed})"


def report(results: dict, command: str) -> str:
    budgets = results["budgets"]
    lines = [
        "# A map as Kernel SHAP's prior: how many evaluations it is worth",
        "",
        f"Produced by `{command}` in {results['wall_s'] / 60:.1f} min on {results['environment']['machine']} "
        f"(torch {results['environment']['torch']}). Raw numbers: `kernel_shap_prior.json`.",
        "",
        f'`kernel_shap_values(sampler="leverage", ridge="gcv", prior=map)` on the prediction-only classifiers of '
        f"the `base12ep` suite (seeds {results['seeds']}): 64 players (the 8×8 patch grid), mean-colour baseline, "
        f"softmax probability of the predicted class, the first {results['images']} test images. Reference: the mean "
        f"of two Leverage SHAP runs at {results['reference_budget']:,} evaluations (the `kernel_shap_ridge` "
        f"benchmark's). Each cell: mean over {results['estimator_seeds']} estimator seeds, then mean ± std over "
        "the suite's seeds. The prior costs one forward pass (self-explaining maps, rollout) or one backward pass "
        "per class (Grad-CAM), not counted in the budget.",
        "",
    ]
    for measure_name, key in (("Pearson with the reference (higher is better)", "pearson"),
                              ("relative L2 error, median over images (lower is better)", "relative_l2")):  # fmt: skip
        lines += [f"## {measure_name}", ""]
        lines.append("| model | prior | alone | " + " | ".join(map(str, budgets)) + " |")
        lines.append("|---|---|---|" + "---|" * len(budgets))
        for model_name in results["models"]:
            runs = [results["runs"][f"{seed}/{model_name}"] for seed in results["seeds"]]
            for name in runs[0]["curves"]:
                cells = []
                for budget in budgets:
                    values = [r["curves"][name][str(budget)][key] for r in runs]
                    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
                    cells.append(f"{statistics.mean(values):.3f}{spread}")
                alone = [r["prior_alone_pearson"].get(name) for r in runs]
                alone_text = "—" if alone[0] is None or key != "pearson" else f"{statistics.mean(alone):.3f}"
                lines.append(f"| {model_name} | {name} | {alone_text} | " + " | ".join(cells) + " |")
        lines.append("")
    shown = [b for b in budgets if b in (64, 128, 256)]
    lines += [
        "## What a prior is worth",
        "",
        "The budget Kernel SHAP without a prior needs to match the prior's curve at a budget, divided by that budget "
        "(mean, and per seed in brackets; `> x` where the no-prior curve does not get there within the grid, `≤ x` "
        "where it is already there at its smallest budget). By Pearson, then by relative L2 error.",
        "",
        "| model | prior | "
        + " | ".join(f"Pearson @ {b}" for b in shown)
        + " | "
        + " | ".join(f"L2 @ {b}" for b in shown)
        + " |",
        "|---|---|" + "---|" * (2 * len(shown)),
    ]
    for model_name in results["models"]:
        runs = [results["runs"][f"{seed}/{model_name}"] for seed in results["seeds"]]
        for name in runs[0]["curves"]:
            if name == NO_PRIOR:
                continue
            cells = [
                _fmt_worth([worth(r["curves"][name], r["curves"][NO_PRIOR], b, key) for r in runs])
                for key in ("pearson", "relative_l2")
                for b in shown
            ]
            lines.append(f"| {model_name} | {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="32,64,128,256,512,1024")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2, help="estimator seeds per budget")
    parser.add_argument("--suite-seeds", default="0,1,2")
    parser.add_argument("--reference-budget", type=int, default=4096)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "kernel_shap_prior"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    experiment = Experiment(ExperimentConfig.from_json_file(CONFIG), log=lambda message: None)
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.suite_seeds.split(",")]
    runs = {}
    for seed in seeds:
        for domain in ("mnist", "digits"):
            path = experiment.work / f"seed{seed}" / f"{domain}-prediction_only"
            if not (path / "config.json").exists():
                sys.exit(f"{path} is missing: run `selfexplain experiment --config base12ep` first.")
            model = ViTForSelfExplainingClassification.from_pretrained(path).eval()
            x = experiment.pixels(experiment.dataset(domain, seed, "test", args.images))
            with torch.inference_mode():
                classes = model(x, explain=None).logits.argmax(-1)
            pair = reference(experiment, model, x, classes, seed, domain, args.reference_budget)
            ref = (pair["first"] + pair["second"]) / 2
            print(f"[seed {seed}] {domain}", flush=True)
            runs[f"{seed}/{domain}"] = {
                "reference_seeds_agree": float(metrics.pearson(pair["first"], pair["second"]).nanmean()),
                **curves(
                    model, x, classes, priors(experiment, seed, domain, model, x), ref, budgets, args.seeds
                ),
            }
    results = {
        "budgets": budgets,
        "images": args.images,
        "estimator_seeds": args.seeds,
        "seeds": seeds,
        "models": ["mnist", "digits"],
        "reference_budget": args.reference_budget,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "environment": _environment(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python benchmarks/kernel_shap_prior.py" + (" " + " ".join(argv) if argv else "")
    out.with_suffix(".md").write_text(report(results, command) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
