"""Choosing α without labels: the source's global α vs `fit_alpha` (global and per block) on the transfer suite, for
single-source, merged and union-trained vectors.

Built on a finished suite (`selfexplain experiment --config base12ep`, or `--config shared_head` with
`--config shared_head`): its target models, vectors and the α
each vector recommends (chosen on the source). For every seed and target, each vector is applied with
- `source α`: the α recommended on the source (the paper's recipe),
- `fit, global`: `fit_alpha(per_layer=False)` on unlabelled target validation images,
- `fit, per block`: `fit_alpha()` (one α per transformer block) on the same images,
and scored on the target's test images: accuracy change, share of predictions kept, and the change in the
insertion − deletion AUC of the model's own map (label-free faithfulness) against the unpatched target.
Vectors: each source's, and `ties(mnist, union)`: the two merged with TIES (density 0.5).

    python benchmarks/alpha_fitting.py        # writes docs/results/alpha_fitting.md (+ .json)
    python benchmarks/alpha_fitting.py --config shared_head --report docs/results/alpha_fitting_shared_head.md

Results are cached per seed and target under `<output-dir>/alpha_fitting/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from selfexplain import ExplanationVector, apply_explanation_vector, fit_alpha
from selfexplain.experiments.experiment import Experiment, ExperimentConfig, _environment
from selfexplain.vectors.alpha import alpha_record

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "selfexplain" / "experiments" / "configs"
MERGED = "ties(mnist, union)"


def evaluate(experiment: Experiment, model, x, labels, original) -> dict[str, float]:
    with torch.inference_mode():
        out = model(x, explain="predicted")
    predicted = out.logits.argmax(-1)
    faith = experiment.faithfulness(model, x, out.explanation, predicted)
    return {
        "accuracy": float((predicted == labels).float().mean()),
        "top1_kept": float((predicted == original).float().mean()),
        "insertion_minus_deletion": faith["insertion"] - faith["deletion"],
    }


def run_seed_target(experiment: Experiment, seed: int, target: str, sources: list[str], args) -> list[dict]:
    cfg = experiment.config
    work = experiment.work / f"seed{seed}"
    test = experiment.dataset(target, seed, "test", cfg.num_eval)
    x, labels = experiment.pixels(test), torch.tensor(test["label"])
    unlabelled = experiment.pixels(experiment.dataset(target, seed, "validation", args.fit_images))
    model = experiment.load(work / f"{target}-prediction_only")
    with torch.inference_mode():
        original = model(x, explain=None).logits.argmax(-1)
    unpatched = evaluate(experiment, model, x, labels, original)
    vectors = {s: ExplanationVector.from_pretrained(work / f"{s}-vector") for s in sources}
    if {"mnist", "union"} <= set(vectors):
        vectors[MERGED] = ExplanationVector.merge(
            [vectors["mnist"], vectors["union"]], method="ties", density=0.5, names=["mnist", "union"]
        )
    rows = []
    for name, vector in vectors.items():
        rules = {"source α": (vector.recommended_alpha, None)}
        for label, per_layer in (("fit, global", False), ("fit, per block", True)):
            started = time.process_time()
            fit = fit_alpha(
                model, vector, unlabelled, per_layer=per_layer, auc_steps=args.fit_steps,
                min_agreement=args.min_agreement, progress=False, seed=seed,
            )  # fmt: skip
            rules[label] = (fit.alpha, {**fit.to_dict(), "cpu_s": time.process_time() - started})
        for rule, (alpha, fit) in rules.items():
            patched = apply_explanation_vector(model, vector, alpha=alpha).eval()
            scored = evaluate(experiment, patched, x, labels, original)
            rows.append(
                {
                    "seed": seed,
                    "target": target,
                    "vector": name,
                    "rule": rule,
                    "alpha": alpha_record(alpha),
                    "delta_accuracy": scored["accuracy"] - unpatched["accuracy"],
                    "top1_kept": scored["top1_kept"],
                    "delta_faithfulness": scored["insertion_minus_deletion"]
                    - unpatched["insertion_minus_deletion"],
                    "fit": fit,
                }
            )
            experiment.log(f"[seed {seed}] {name} → {target}, {rule}: {rows[-1]['delta_faithfulness']:+.4f}")
    return rows


def _alpha_text(alpha) -> str:
    if isinstance(alpha, dict):
        return "[" + ", ".join(f"{v:g}" for v in alpha["blocks"]) + f"] / {alpha['other']:g}"
    return f"{alpha:g}"


def render(rows: list[dict], args, command: str) -> str:
    lines = [
        "# Choosing α without labels",
        "",
        f"Produced by `{command}` on {_environment()['machine']}, from the `{args.suite}` suite's models and vectors "
        f"(seeds {sorted({r['seed'] for r in rows})}). Δ: against the unpatched target on its "
        f"{args.num_eval} test images; faithfulness = insertion − deletion AUC of the model's own map for its own "
        f"prediction (16 steps). `fit_alpha` saw {args.fit_images} unlabelled validation images of the target "
        f"({args.fit_steps} AUC steps, top-1 agreement ≥ {args.min_agreement}). α per block: "
        "`[block 0, …, block 3] / other`.",
        "",
        "A row *helps* when Δfaithfulness > 0 with Δaccuracy ≥ −0.01 and ≥ 97 % of predictions kept.",
        "",
        "| vector | α rule | targets × seeds helped | mean Δfaithfulness | mean Δaccuracy | mean top-1 kept | "
        "fit cost (forward passes, CPU s) |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["vector"], row["rule"]), []).append(row)
    for (vector, rule), group in groups.items():
        helped = [
            r
            for r in group
            if r["delta_faithfulness"] > 0 and r["delta_accuracy"] >= -0.01 and r["top1_kept"] >= 0.97
        ]
        fits = [r["fit"] for r in group if r["fit"]]
        cost = (
            f"{sum(f['forward_passes'] for f in fits) / len(fits):,.0f}, {sum(f['cpu_s'] for f in fits) / len(fits):.0f}"
            if fits
            else "—"
        )
        mean = lambda key, g=group: sum(r[key] for r in g) / len(g)  # noqa: E731
        lines.append(
            f"| {vector} | {rule} | {len(helped)} / {len(group)} | {mean('delta_faithfulness'):+.4f} | "
            f"{mean('delta_accuracy'):+.4f} | {mean('top1_kept'):.3f} | {cost} |"
        )
    lines += [
        "",
        "Per seed and target:",
        "",
        "| seed | target | vector | α rule | α | Δfaithfulness | Δaccuracy | top-1 kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['target']} | {r['vector']} | {r['rule']} | {_alpha_text(r['alpha'])} | "
            f"{r['delta_faithfulness']:+.4f} | {r['delta_accuracy']:+.4f} | {r['top1_kept']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        default="base12ep",
        help="The suite (a name in selfexplain/experiments/configs): base12ep, shared_head.",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="The suite's output (default: its config's output_dir)."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--fit-images", type=int, default=64)
    parser.add_argument("--fit-steps", type=int, default=8)
    parser.add_argument("--min-agreement", type=float, default=0.97)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "alpha_fitting.md")
    args = parser.parse_args(argv)
    path = CONFIGS / f"{args.config}.json"
    if not path.exists():
        parser.error(f"no suite config {path}")
    if args.output_dir is None:
        args.output_dir = Path(json.loads(path.read_text())["output_dir"])
    config = ExperimentConfig.from_json_file(path, output_dir=str(args.output_dir), seeds=args.seeds)
    args.suite = args.config
    args.num_eval = config.num_eval
    experiment = Experiment(config)
    rows = []
    for seed in config.seeds:
        for target in config.targets:
            # Cached per (seed, target): a rerun with more seeds only computes the new ones.
            cache = args.output_dir / "alpha_fitting" / f"seed{seed}-{target}.json"
            if not cache.exists():
                cache.parent.mkdir(parents=True, exist_ok=True)
                found = run_seed_target(experiment, seed, target, list(config.sources), args)
                cache.write_text(json.dumps(found, indent=1))
            rows += json.loads(cache.read_text())
    command = "python benchmarks/alpha_fitting.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(render(rows, args, command))
    args.report.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(args.report.read_text())


if __name__ == "__main__":
    main()
