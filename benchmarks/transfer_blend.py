"""Does a transferred explanation carry information that attention rollout lacks?

Built on a finished suite (`selfexplain experiment --config full`). On every cell of the suite — each source
in-domain (its self-explaining model on its own held-out images) and each transfer pair (the target's frozen
classifier with the source's vector at its recommended α) — it scores three maps of the classifier's predicted
class on the suite's evaluation images:

- the self-explaining / transferred map (the suite's single pass);
- attention rollout of the same classifier (no training at all);
- their **blend** (`selfexplain.standardized_blend`, what `blend_with_rollout`, `--blend-rollout` and the
  pipeline's `blend_rollout=True` return): each map standardised per image (zero mean, unit standard deviation over the players), then
  averaged with equal weights. No parameter is fitted: Pearson with the reference and the insertion/deletion
  orderings are unchanged by a per-image affine map, so an equal-weight mean of z-scores is the one combination
  that needs no labels and no reference. If the two maps' errors are partly independent the blend agrees with the
  reference better than either; if the transferred map carried nothing rollout lacks, the blend could not beat
  rollout.

It also reports what a user could choose without labels or a reference: per cell, the map with the best
insertion − deletion on the suite's unlabelled validation images (the label-free faithfulness check of
`docs/design.md`), and how that choice scores on the test images.

    python benchmarks/transfer_blend.py                  # writes docs/results/transfer_blend.md (+ .json)

Per-seed results are cached under `outputs/transfer_blend/` (a rerun with the same models only renders; the
record names the weight files it read by hash). References come from the suite's Kernel SHAP cache (no new
Kernel SHAP is run when the suite has finished).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from _suite import experiment, read_record, require, write_outputs, write_record

ROOT = Path(__file__).resolve().parents[1]
MAPS = ("single_pass", "rollout", "blend")
MAP_NAMES = {
    "single_pass": "single pass (ours)",
    "rollout": "attention rollout",
    "blend": "blend (z-score mean)",
}


def cells(suite: str) -> list[tuple[str, str]]:
    """(source, domain) of every cell: (s, s) in-domain, (s, t) a transfer pair."""
    cfg = experiment(suite).config
    return [(s, s) for s in cfg.sources] + [(s, t) for t in cfg.targets for s in cfg.sources]


def cell_name(source: str, domain: str) -> str:
    return f"{source} in-domain" if source == domain else f"{source} → {domain}"


def _inputs(suite: str, seed: int) -> dict[str, str]:
    work = experiment(suite).work / f"seed{seed}"
    files = {}
    for source, domain in cells(suite):
        names = [f"{source}-vector", f"{source}-self_explaining"] if source == domain else []
        names += [f"{domain}-prediction_only"]
        for name in names:
            for path in sorted(require(work / name, suite).glob("*.safetensors")):
                files[f"{name}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def run_seed(seed: int, suite: str, cache: Path) -> dict[str, Any]:
    """{cell: {"maps": {map: scores}, "paired": {...}, "selected": map, "select_score": {map: ins − del}}}."""
    record = cache / f"seed{seed}-{suite}.json"
    inputs = _inputs(suite, seed)
    cached = read_record(record, inputs)
    if cached is not None:
        return cached
    import torch

    from selfexplain.evaluation import explainers
    from selfexplain.evaluation.explainers import standardized_blend
    from selfexplain.experiments.experiment import _as_plain_classifier, _patched, paired_comparisons
    from selfexplain.modeling_self_explaining_vit import pool_to_player_grid

    torch.set_num_threads(1)
    exp = experiment(suite)
    cfg, grid = exp.config, exp.config.grid()
    work = exp.work / f"seed{seed}"
    out: dict[str, Any] = {}
    for source, domain in cells(suite):
        test = exp.dataset(domain, seed, "test", cfg.num_eval)
        x = exp.pixels(test)
        x_sel = exp.pixels(exp.dataset(domain, seed, "validation", cfg.num_select))
        if source == domain:
            model = host = exp.load(require(work / f"{source}-self_explaining", suite))
        else:
            alpha = exp.recommended_alpha(seed, source)
            vector = exp.vector(seed, source)
            host = exp.load(require(work / f"{domain}-prediction_only", suite))
            model = _patched(
                exp.load(work / f"{domain}-prediction_only"), vector, alpha, cfg.resize_position_embeddings
            )
        plain = _as_plain_classifier(model)

        def maps_of(images, classes, model=model, plain=plain):
            single = exp.patch_map(model, images, classes, grid)
            rollout = pool_to_player_grid(explainers.attention_rollout(plain, images), grid)
            return {"single_pass": single, "rollout": rollout, "blend": standardized_blend(single, rollout)}

        with torch.inference_mode():
            classes = model(x, explain=None).logits.argmax(-1)
            sel_classes = model(x_sel, explain=None).logits.argmax(-1)
        rows = torch.arange(min(cfg.num_reference, len(x)))
        # The suite's reference (same model weights, images, budget and seed: read from its cache).
        reference = exp.kernel_shap(host, x[rows], cfg.reference_budget, 10_000 + seed)[rows, classes[rows]]
        scored = {
            name: exp.score(model, x, m, reference, None, classes) for name, m in maps_of(x, classes).items()
        }
        select = {}
        for name, m in maps_of(x_sel, sel_classes).items():
            faith = exp.faithfulness(model, x_sel, m, sel_classes)
            select[name] = faith["insertion"] - faith["deletion"]
        paired = {
            name: paired_comparisons(scored[name], {"rollout": scored["rollout"]}, seed=seed)["rollout"]
            for name in ("single_pass", "blend")
        }
        for entry in scored.values():
            entry.pop("_per_image", None)
        out[cell_name(source, domain)] = {
            "maps": scored,
            "paired_vs_rollout": paired,
            "select_insertion_minus_deletion": select,
            "selected": max(select, key=select.get),
            "budget_curve": _budget_curve(exp, seed, source, domain),
        }
    write_record(record, out, inputs)
    return out


def _budget_curve(exp, seed: int, source: str, domain: str) -> dict[str, Any] | None:
    """The suite's Kernel SHAP budget curve for this cell's model and reference (None where it has none)."""
    kind = "source" if source == domain else "target"
    path = exp.work / f"seed{seed}" / "results" / f"{kind}-{domain}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["result"].get("kernel_shap")


def _stat(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def _b_star(curve: dict[str, Any] | None, pearson: float) -> str:
    from selfexplain.experiments.experiment import budget_match

    if not curve:
        return "–"
    match = budget_match(curve, pearson)
    if match["relation"] == "above":
        return f">{match['largest_tested']}"
    return ("≤" if match["relation"] == "below" else "") + str(match["budget"])


def _paired(entry: dict[str, Any]) -> str:
    d = entry["insertion_minus_deletion"]
    low, high = d["ci95"]
    star = "*" if low > 0 or high < 0 else ""
    return f"{d['mean_diff']:+.3f}{star}"


def report(results: dict[int, dict[str, Any]], suite: str, wall_s: float, command: str) -> str:
    seeds = sorted(results)
    names = list(results[seeds[0]])
    cfg = experiment(suite).config
    lines = [
        "# Transferred map, attention rollout, and their blend",
        "",
        f"Produced by `{command}` on top of `selfexplain experiment --config {suite}`; this invocation's wall time "
        f"{wall_s / 60:.1f} min (finished seeds are read back); seeds {seeds}. Every cell explains its classifier's "
        f"predicted class on the suite's {cfg.num_eval} evaluation images: in-domain, the source's self-explaining "
        "model; a transfer pair, the target's frozen classifier with the source's vector at the suite's "
        "recommended α. Pearson: with the suite's Kernel SHAP reference (budget "
        f"{cfg.reference_budget}, first {cfg.num_reference} images); ins − del: insertion − deletion AUC "
        f"({cfg.auc_steps} steps, every image). The blend is the per-image z-scores of the single pass and rollout, "
        "averaged (nothing fitted). B*: the smallest Kernel SHAP budget of the suite's curve whose Pearson reaches "
        "the map's. Mean ± std over seeds.",
        "",
        "| cell | Pearson: single pass | rollout | blend | B*: single pass | blend "
        "| ins − del: single pass | rollout | blend |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in names:
        row = [cell]
        for key in ("pearson",):
            row += [_stat([results[s][cell]["maps"][m][key] for s in seeds]) for m in MAPS]
        for m in ("single_pass", "blend"):
            row.append(
                ", ".join(
                    _b_star(results[s][cell]["budget_curve"], results[s][cell]["maps"][m]["pearson"])
                    for s in seeds
                )
            )
        row += [
            _stat(
                [
                    results[s][cell]["maps"][m]["insertion"] - results[s][cell]["maps"][m]["deletion"]
                    for s in seeds
                ]
            )
            for m in MAPS
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Paired against rollout on the same images, per seed: Δ(insertion − deletion) (* where the 95 % bootstrap "
        "interval over images excludes 0) and ΔPearson.",
        "",
        "| cell | single pass − rollout: Δ(ins − del) | ΔPearson | blend − rollout: Δ(ins − del) | ΔPearson |",
        "|---|---|---|---|---|",
    ]
    for cell in names:
        row = [cell]
        for m in ("single_pass", "blend"):
            row.append(", ".join(_paired(results[s][cell]["paired_vs_rollout"][m]) for s in seeds))
            row.append(
                ", ".join(
                    f"{results[s][cell]['paired_vs_rollout'][m]['pearson']['mean_diff']:+.3f}" for s in seeds
                )
            )
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Label-free choice: the map with the best insertion − deletion on {cfg.num_select} unlabelled validation "
        "images (the classifier's own predictions), per seed, and the Pearson of the chosen map on the test "
        "images against the best of the three.",
        "",
        "| cell | chosen per seed | Pearson of the choice | best of the three |",
        "|---|---|---|---|",
    ]
    for cell in names:
        chosen = [results[s][cell]["selected"] for s in seeds]
        got = [results[s][cell]["maps"][c]["pearson"] for s, c in zip(seeds, chosen, strict=True)]
        best = [max(results[s][cell]["maps"][m]["pearson"] for m in MAPS) for s in seeds]
        lines.append(f"| {cell} | {', '.join(chosen)} | {_stat(got)} | {_stat(best)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="full")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "outputs" / "transfer_blend")
    parser.add_argument("--report", default=str(ROOT / "docs" / "results" / "transfer_blend"))
    args = parser.parse_args(argv)
    command = (
        "python benchmarks/transfer_blend.py"
        + (f" --suite {args.suite}" if args.suite != "full" else "")
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else "")
    )
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = {seed: pool.submit(run_seed, seed, args.suite, args.cache) for seed in args.seeds}
        results = {seed: future.result() for seed, future in futures.items()}
    wall = time.perf_counter() - started
    text = report(results, args.suite, wall, command)
    write_outputs(args.report, text, {"results": {str(k): v for k, v in results.items()}, "wall_s": wall})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
