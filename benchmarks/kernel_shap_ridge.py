"""Kernel SHAP by budget on the suite's classifiers: shap's design, Leverage SHAP's, and Leverage SHAP with the GCV
ridge (`kernel_shap_values(sampler=..., ridge=...)`), against a converged reference.

The plain least-squares fit has an error peak near 2n evaluations (n players; with paired sampling, n pairs for
n - 1 unknowns); the ridge is meant to remove it and to leave large budgets alone. This measures both on real
models: for every seed's prediction-only MNIST and `digits` classifier of a finished `base12ep` suite, the first
``--images`` test images, the predicted class; reference = the mean of two Leverage SHAP runs at
``--reference-budget`` evaluations (their agreement is reported); each contender at each budget with
``--seeds`` seeds. Measures: Pearson with the reference (what the suite's B* reads) and relative L2 error.

    python benchmarks/kernel_shap_ridge.py      # writes docs/results/kernel_shap_ridge.md (+ .json)

Needs the suite's models (`selfexplain experiment --config base12ep`); references are cached beside the output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import ViTForImageClassification

from selfexplain.attribution.shapley import kernel_shap_values
from selfexplain.evaluation import metrics
from selfexplain.experiments.experiment import Experiment, ExperimentConfig, _environment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src" / "selfexplain" / "experiments" / "configs" / "base12ep.json"
CONTENDERS = {
    "shap's design": {"sampler": "kernel"},
    "Leverage SHAP": {"sampler": "leverage"},
    "Leverage SHAP + GCV ridge": {"sampler": "leverage", "ridge": "gcv"},
}


def _explained(model, x, classes, budget: int, seed, **settings) -> torch.Tensor:
    """``(B, 64)`` float64 Kernel SHAP values of each image's class ``classes[i]`` on the 8×8 grid."""
    phi = kernel_shap_values(model, x, grid=(8, 8), budget=budget, baseline="mean", seed=seed, **settings)
    return phi[torch.arange(len(x)), classes].flatten(1).to(torch.float64)


def reference_pair(model, x, classes, budget: int, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Leverage SHAP runs at ``budget`` (image seeds 10000+i and 20000+i), read from ``cache`` when there;
    also the reference of `kernel_shap_prior.py`."""
    if cache.exists():
        pair = load_file(cache)
        if pair["first"].shape[0] != len(x):
            raise RuntimeError(f"{cache} holds {pair['first'].shape[0]} images, not {len(x)}: delete it.")
        return pair["first"], pair["second"]
    rows = torch.arange(len(x)).tolist()
    first = _explained(model, x, classes, budget, [10_000 + i for i in rows], sampler="leverage")
    second = _explained(model, x, classes, budget, [20_000 + i for i in rows], sampler="leverage")
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"first": first.contiguous(), "second": second.contiguous()}, str(cache))
    return first, second


def measure(model, x, classes, budgets, seeds, reference_budget, cache: Path) -> dict:
    rows = torch.arange(len(x))

    def explained(budget: int, seed, **settings) -> torch.Tensor:
        return _explained(model, x, classes, budget, seed, **settings)

    first, second = reference_pair(model, x, classes, reference_budget, cache)
    reference = (first + second) / 2
    out = {"reference_seeds_agree": float(metrics.pearson(first, second).nanmean()), "curves": {}}
    for name, settings in CONTENDERS.items():
        curve = {}
        for budget in budgets:
            pearson, error = [], []
            for seed in range(seeds):
                phi = explained(budget, [1000 * seed + i for i in rows.tolist()], **settings)
                pearson.append(float(metrics.pearson(phi, reference).nanmean()))
                error.append(float(((phi - reference).norm(dim=1) / reference.norm(dim=1)).mean()))
            curve[str(budget)] = {"pearson": statistics.mean(pearson), "relative_l2": statistics.mean(error)}
        out["curves"][name] = curve
    return out


def report(results: dict, command: str) -> str:
    budgets = results["budgets"]
    lines = [
        "# Kernel SHAP by budget: the GCV ridge against the plain fit",
        "",
        f"Produced by `{command}` in {results['wall_s'] / 60:.1f} min on {results['environment']['machine']} "
        f"(torch {results['environment']['torch']}). Raw numbers: `kernel_shap_ridge.json`.",
        "",
        f"Models: the prediction-only classifiers of the `base12ep` suite (seeds {results['seeds']}), 64 players (the "
        f"8×8 patch grid), mean-colour baseline, softmax probability of the predicted class, the first "
        f"{results['images']} test images. Reference: the mean of two Leverage SHAP runs at "
        f"{results['reference_budget']:,} evaluations (agreement between the two below). Every contender is "
        f"averaged over {results['estimator_seeds']} estimator seeds, then over the suite's seeds (± std).",
        "",
    ]
    for measure_name, key in (("Pearson with the reference (higher is better)", "pearson"),
                              ("relative L2 error (lower is better)", "relative_l2")):  # fmt: skip
        lines += [f"## {measure_name}", ""]
        lines.append("| model | reference seeds agree | design | " + " | ".join(map(str, budgets)) + " |")
        lines.append("|---|---|---|" + "---|" * len(budgets))
        for model_name in results["models"]:
            runs = [results["runs"][f"{seed}/{model_name}"] for seed in results["seeds"]]
            agree = [r["reference_seeds_agree"] for r in runs]
            for name in CONTENDERS:
                cells = []
                for budget in budgets:
                    values = [r["curves"][name][str(budget)][key] for r in runs]
                    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
                    cells.append(f"{statistics.mean(values):.3f}{spread}")
                lines.append(
                    f"| {model_name} | {statistics.mean(agree):.3f} | {name} | " + " | ".join(cells) + " |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="64,96,128,192,256,384,512,1024")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2, help="estimator seeds per budget")
    parser.add_argument("--suite-seeds", default="0,1,2")
    parser.add_argument("--reference-budget", type=int, default=4096)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "kernel_shap_ridge"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    experiment = Experiment(ExperimentConfig.from_json_file(CONFIG), log=lambda message: None)
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.suite_seeds.split(",")]
    models = {"mnist": "mnist", "digits": "digits"}
    runs = {}
    for seed in seeds:
        for name, domain in models.items():
            path = experiment.work / f"seed{seed}" / f"{domain}-prediction_only"
            if not (path / "config.json").exists():
                sys.exit(f"{path} is missing: run `selfexplain experiment --config base12ep` first.")
            model = ViTForImageClassification.from_pretrained(path).eval()
            x = experiment.pixels(experiment.dataset(domain, seed, "test", args.images))
            with torch.inference_mode():
                classes = model(pixel_values=x).logits.argmax(-1)
            cache = (
                experiment.work
                / "kernel_shap_ridge"
                / f"seed{seed}-{domain}-{args.reference_budget}.safetensors"
            )
            print(f"[seed {seed}] {name}", flush=True)
            runs[f"{seed}/{name}"] = measure(
                model, x, classes, budgets, args.seeds, args.reference_budget, cache
            )
    results = {
        "budgets": budgets,
        "images": args.images,
        "estimator_seeds": args.seeds,
        "seeds": seeds,
        "models": list(models),
        "reference_budget": args.reference_budget,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "environment": _environment(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python benchmarks/kernel_shap_ridge.py" + (" " + " ".join(argv) if argv else "")
    out.with_suffix(".md").write_text(report(results, command) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
