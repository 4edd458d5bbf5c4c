"""Is insertion − deletion a yardstick on which Shapley values themselves win? The converged reference vs rollout.

The suites ask a single-pass map two things: agree with a converged Kernel SHAP reference (Pearson), and be more
faithful than attention rollout by insertion − deletion. This scores the reference itself on the second: on each
suite's reference images (the first 48 test images, where the reference is cached), insertion − deletion of the
Kernel SHAP reference (2048 evaluations), of the single-pass map (in-domain: the source's self-explaining model on
MNIST; transfer: the target patched with the MNIST vector at α = 1, on `digits`) and of attention rollout, with the
paired differences against rollout (mean, 95 % bootstrap CI over images). If the reference does not beat rollout,
a map that matched it exactly would not either, and the two goals pull apart.

    python benchmarks/reference_faithfulness.py      # writes docs/results/reference_faithfulness.md (+ .json)

Needs finished suites (`selfexplain experiment --config <suite>` for each of `--suites`); reads their cached
references, so it mostly scores (a couple of minutes). A cache entry is keyed by the estimator's source too, so a
suite whose references predate an edit of that code has them recomputed here (identical values; about 3 minutes
per seed and setting).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "selfexplain" / "experiments" / "configs"
SOURCE, TARGET = "mnist", "digits"
MAPS = ("Kernel SHAP reference", "single pass", "attention rollout")


def measure(suite: str, seed: int) -> list[dict[str, Any]]:
    from selfexplain import ViTForSelfExplainingClassification
    from selfexplain.evaluation import explainers
    from selfexplain.experiments.experiment import (
        Experiment,
        ExperimentConfig,
        _as_plain_classifier,
        _patched,
        paired_comparisons,
    )
    from selfexplain.modeling_self_explaining_vit import pool_to_player_grid
    from selfexplain.vectors import ExplanationVector

    experiment = Experiment(ExperimentConfig.from_json_file(CONFIGS / f"{suite}.json"), log=lambda m: None)
    cfg, grid = experiment.config, experiment.config.grid()
    work = experiment.work / f"seed{seed}"
    if not (work / f"{SOURCE}-vector").exists():
        sys.exit(f"{suite}, seed {seed}: run `selfexplain experiment --config {suite}` first.")
    rows = []
    for setting, domain in (("in-domain", SOURCE), ("transfer", TARGET)):
        kind = "self_explaining" if setting == "in-domain" else "prediction_only"
        model = ViTForSelfExplainingClassification.from_pretrained(work / f"{domain}-{kind}").eval()
        test = experiment.dataset(domain, seed, "test", cfg.num_eval)
        x = experiment.pixels(test)[: cfg.num_reference]
        with torch.inference_mode():
            predicted = model(x, explain=None).logits.argmax(-1)
        reference, _ = experiment.reference(model, x, predicted, seed)  # the suite's, from the cache
        explained = model
        if setting == "transfer":
            explained = _patched(model, ExplanationVector.from_pretrained(work / f"{SOURCE}-vector"), 1.0)
        maps = {
            "Kernel SHAP reference": reference,
            "single pass": experiment.patch_map(explained, x, predicted, grid),
            "attention rollout": pool_to_player_grid(
                explainers.attention_rollout(_as_plain_classifier(model), x), grid
            ),
        }
        scores = {name: experiment.score(model, x, m, reference, None, predicted) for name, m in maps.items()}
        paired = paired_comparisons(
            scores["Kernel SHAP reference"], {"attention rollout": scores["attention rollout"]}
        )
        paired_single = paired_comparisons(
            scores["single pass"], {"attention rollout": scores["attention rollout"]}
        )
        rows.append(
            {
                "suite": suite,
                "seed": seed,
                "setting": setting,
                "images": len(x),
                "insertion_minus_deletion": {n: s["insertion"] - s["deletion"] for n, s in scores.items()},
                "pearson": {n: s["pearson"] for n, s in scores.items()},
                "reference_vs_rollout": paired["attention rollout"]["insertion_minus_deletion"],
                "single_pass_vs_rollout": paired_single["attention rollout"]["insertion_minus_deletion"],
            }
        )
    return rows


def report(results: list[dict], command: str, wall: float) -> str:
    lines = [
        "# Do Shapley values beat attention rollout on insertion − deletion?",
        "",
        f"Produced by `{command}` ({wall / 60:.1f} min; scores only: the references are the suites' cached ones). "
        "On each suite's reference images (the first 48 test images of the domain; 16 insertion/deletion steps, "
        "the suites' mean baseline), insertion − deletion of the converged Kernel SHAP reference (2048 "
        "evaluations), of the single pass (in-domain: the source's self-explaining model on `mnist`; transfer: "
        "the `digits` classifier with the MNIST vector at α = 1) and of attention rollout; Δ vs rollout: the "
        "paired mean difference and its 95 % bootstrap CI over the images (`*`: excludes 0).",
        "",
        "| suite | setting | seed | reference | single pass | rollout | Δ reference − rollout [95% CI] | "
        "Δ single pass − rollout [95% CI] | single pass's Pearson |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def delta(entry: dict) -> str:
        low, high = entry["ci95"]
        star = " *" if low > 0 or high < 0 else ""
        return f"{entry['mean_diff']:+.3f} [{low:+.3f}, {high:+.3f}]{star}"

    for r in results:
        ind = r["insertion_minus_deletion"]
        lines.append(
            f"| {r['suite']} | {r['setting']} | {r['seed']} | "
            + " | ".join(f"{ind[name]:.3f}" for name in MAPS)
            + f" | {delta(r['reference_vs_rollout'])} | {delta(r['single_pass_vs_rollout'])} | "
            f"{r['pearson']['single pass']:.3f} |"
        )
    lines += [
        "",
        "Mean over seeds:",
        "",
        "| suite | setting | " + " | ".join(MAPS) + " |",
        "|---|---|---|---|---|",
    ]
    for suite in dict.fromkeys(r["suite"] for r in results):
        for setting in ("in-domain", "transfer"):
            rows = [r for r in results if r["suite"] == suite and r["setting"] == setting]
            cells = [f"{statistics.mean(r['insertion_minus_deletion'][n] for r in rows):.3f}" for n in MAPS]
            lines.append(f"| {suite} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", nargs="+", default=["base12ep", "base96ep", "base96ep_gentle"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "reference_faithfulness"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = [row for suite in args.suites for seed in args.seeds for row in measure(suite, seed)]
    wall = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python benchmarks/reference_faithfulness.py" + (" " + " ".join(argv) if argv else "")
    out.with_suffix(".md").write_text(report(results, command, wall))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
