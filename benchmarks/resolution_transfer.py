"""Does the explanation gain survive a resolution change? A suite's MNIST vector (made at 32 px, an 8×8 patch grid)
applied to `digits` classifiers fine-tuned at another image size from the same θ0, with the vector's position
embeddings resized (`apply_explanation_vector(..., resize_position_embeddings=True)`).

Built on a finished suite (`selfexplain experiment --config base12ep`, or `--suite shared_head`): for each seed it reuses
the suite's θ0 and MNIST vector (and its recommended α). θ0's position embeddings are resized to the new patch
grid the way transformers interpolates them, a prediction-only `digits` classifier is fine-tuned from it at the new
size with the suite's recipe (as a user fine-tunes a 224 px backbone at 384 px), and the target is scored exactly
like the suite's target rows — Kernel SHAP reference and budget curve on the new grid, attention rollout, Grad-CAM,
insertion / deletion — next to the suite's own 32 px row for the same seed.

    python benchmarks/resolution_transfer.py --suite base12ep --size 48 --seeds 0 1 2
    # writes docs/results/resolution_transfer.md (+ .json); models and results cached in outputs/resolution_transfer/

`--workers 2` runs two seeds at a time (one thread each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "selfexplain" / "experiments" / "configs"
SOURCE, TARGET = "mnist", "digits"


def _configs(args) -> tuple[Any, Any]:
    """The suite's config (vectors, α, θ0) and this benchmark's (the same recipe at the new image size)."""
    from selfexplain.experiments.experiment import ExperimentConfig

    path = CONFIGS / f"{args.suite}.json"
    suite = ExperimentConfig.from_json_file(path)
    if args.suite_output:
        suite.output_dir = args.suite_output
    ours = ExperimentConfig.from_json_file(
        path,
        output_dir=str(Path(args.cache) / f"{args.suite}-{args.size}px"),
        report_dir=None,
        base={**suite.base, "image_size": args.size},
        sources=[SOURCE],
        targets=[TARGET],
        resize_position_embeddings=True,
        oracle=False,  # the suite may train one; this benchmark measures the source's vector only
    )
    return suite, ours


def _resized_base(suite_base: Path, folder: Path, size: int) -> None:
    """θ0 at `size` px: its position embeddings resized to the new patch grid, everything else as it is."""
    from transformers import ViTForImageClassification

    from selfexplain.data.preprocessing import default_image_processor
    from selfexplain.vectors.resolution import patch_grid_of, resize_position_embeddings

    model = ViTForImageClassification.from_pretrained(suite_base)
    config = model.config
    old, new = patch_grid_of(config.image_size, config.patch_size), patch_grid_of(size, config.patch_size)
    embeddings = model.vit.embeddings
    resized = resize_position_embeddings(embeddings.position_embeddings.detach(), old, new)
    embeddings.position_embeddings = torch.nn.Parameter(resized.contiguous())
    config.image_size = size
    embeddings.patch_embeddings.image_size = (size, size)
    embeddings.patch_embeddings.num_patches = new[0] * new[1]
    model.save_pretrained(folder)
    default_image_processor(size).save_pretrained(folder)


def run_seed(seed: int, args) -> dict[str, Any]:
    from selfexplain.experiments.experiment import Experiment

    torch.set_num_threads(1)
    suite_config, config = _configs(args)
    record = Path(config.output_dir) / "work" / f"seed{seed}" / "results" / f"target-{TARGET}.json"
    if record.exists():
        return json.loads(record.read_text())
    suite = Experiment(suite_config, log=lambda message: None)
    for needed in (suite.work / f"seed{seed}" / f"{SOURCE}-vector", suite.work / f"seed{seed}" / "base"):
        if not needed.exists():
            raise SystemExit(
                f"{needed} is missing: run `selfexplain experiment --config {args.suite}` first."
            )

    class AtAnotherSize(Experiment):
        """The suite's vectors and α; everything else (θ0 at the new size, the target) of its own."""

        def vector(self, seed: int, source: str):
            return suite.vector(seed, source)

        def recommended_alpha(self, seed: int, source: str) -> float:
            return suite.recommended_alpha(seed, source)

    experiment = AtAnotherSize(config, log=print)
    # The target records the resized θ0's folder as its base, the vector the suite's θ0: the same weights (up to
    # the position embeddings' resize), so apply's "different base" warning does not apply here.
    warnings.filterwarnings("ignore", message="The model records base")
    base = experiment.work / f"seed{seed}" / "base"
    if not (base / "config.json").exists():
        _resized_base(suite.base(seed), base, args.size)
    started = time.perf_counter()
    result = experiment.evaluate_target(seed, TARGET, [SOURCE], crossover=True)
    out = {"result": result, "wall_s": time.perf_counter() - started, "timings_s": experiment.timings}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _suite_row(seed: int, suite_config) -> dict[str, Any]:
    path = Path(suite_config.output_dir) / "work" / f"seed{seed}" / "results" / f"target-{TARGET}.json"
    return json.loads(path.read_text())["result"]


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    transfer = result["transfer"][SOURCE]
    alpha = transfer["recommended_alpha"]
    sweep = transfer["sweep"]
    explainers = result["explainers"]

    def measures(entry):
        return {k: entry[k] for k in ("pearson", "spearman", "top10_overlap", "insertion", "deletion")}

    return {
        "accuracy": result["accuracy"],
        "reference_seed_agreement": result["reference_seed_agreement"],
        "recommended_alpha": alpha,
        "no_transfer": measures(explainers["no_transfer"]),
        "transferred": measures(sweep[f"{alpha:g}"]),
        "transferred_alpha_1": measures(sweep["1"]),
        "top1_kept_alpha_1": sweep["1"]["top1_agreement"],
        "accuracy_alpha_1": sweep["1"]["accuracy"],
        "attention_rollout": measures(explainers["attention_rollout"]),
        "grad_cam": measures(explainers["grad_cam"]),
        "budget_match_alpha_1": _budget(result["kernel_shap"], sweep["1"]["pearson"]),
    }


def _budget(curve, pearson):
    from selfexplain.experiments.experiment import budget_match

    match = budget_match(curve, pearson)
    if match["budget"] is None:
        return f"> {match['largest_tested']}"
    return f"≤ {match['budget']}" if match["relation"] == "below" else str(match["budget"])


def report(rows: dict[int, dict[str, dict[str, Any]]], args, wall_s: float) -> str:
    sizes = {
        "suite": "32 px (8×8, the suite)",
        "resized": f"{args.size} px ({args.size // 4}×{args.size // 4})",
    }
    lines = [
        f"# Transfer across image sizes: the {args.suite} suite's MNIST vector on `digits` at {args.size} px",
        "",
        f"Produced by `python benchmarks/resolution_transfer.py --suite {args.suite} --size {args.size} --seeds "
        f"{' '.join(map(str, args.seeds))}` on top of `selfexplain experiment --config {args.suite}`; this "
        f"invocation's wall time {wall_s / 60:.1f} min (finished seeds are read back). The {args.size} px target is "
        f"fine-tuned from the suite's θ0 with its position embeddings resized (as transformers interpolates them), "
        "with the suite's recipe and images; the vector (made at 32 px) is applied with "
        "`resize_position_embeddings=True`. Every row is scored against a Kernel SHAP reference of its own model "
        "on its own patch grid (the suite's budget, 48 images; insertion / deletion on 500).",
        "",
        "Transfer rows at α = 1 (the vector's recommended α is chosen on MNIST at 32 px: it is in the JSON). "
        "ΔPearson: transferred − no transfer; B*: the smallest Kernel SHAP budget (of the suite's grid, on the "
        "row's own patch grid) whose Pearson with the reference reaches the transferred map's. Read the "
        "'ref. seeds agree' column first: a reference whose two seeds agree below ~0.9 has not converged at that "
        "budget (more players need more evaluations), which lowers every Pearson on its row and makes B* "
        "unreliable; insertion and deletion do not depend on it.",
        "",
        "| seed | size | accuracy | ref. seeds agree | no transfer Pearson | α = 1 Pearson | ΔPearson | α = 1 "
        "ins / del | top-1 kept | B* (α = 1) | rollout Pearson | rollout ins / del | Grad-CAM Pearson |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    deltas: dict[str, list[float]] = {"suite": [], "resized": []}
    beats: dict[str, list[bool]] = {"suite": [], "resized": []}
    for seed, pair in sorted(rows.items()):
        for kind in ("suite", "resized"):
            s = pair[kind]
            delta = s["transferred_alpha_1"]["pearson"] - s["no_transfer"]["pearson"]
            deltas[kind].append(delta)
            t, r = s["transferred_alpha_1"], s["attention_rollout"]
            beats[kind].append(t["insertion"] - t["deletion"] > r["insertion"] - r["deletion"])
            lines.append(
                f"| {seed} | {sizes[kind]} | {s['accuracy']:.3f} | {s['reference_seed_agreement']:.3f} | "
                f"{s['no_transfer']['pearson']:.3f} | {t['pearson']:.3f} | {delta:+.3f} | "
                f"{t['insertion']:.3f} / {t['deletion']:.3f} | {s['top1_kept_alpha_1']:.3f} | "
                f"{s['budget_match_alpha_1']} | {r['pearson']:.3f} | {r['insertion']:.3f} / {r['deletion']:.3f} | "
                f"{s['grad_cam']['pearson']:.3f} |"
            )
    lines += [
        "",
        "| size | ΔPearson at α = 1, mean ± std over seeds | beats rollout on insertion − deletion |",
    ]
    lines += ["|---|---|---|"]
    for kind in ("suite", "resized"):
        d = np.asarray(deltas[kind])
        lines.append(
            f"| {sizes[kind]} | {d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.3f} (n = {len(d)}) | "
            f"{sum(beats[kind])} of {len(beats[kind])} seeds |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="base12ep", help="The suite whose θ0 and vectors are used.")
    parser.add_argument("--suite-output", default=None, help="The suite's output_dir, if not its config's.")
    parser.add_argument("--size", type=int, default=48, help="The target's image size (px; patch size 4).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=str(ROOT / "outputs" / "resolution_transfer"))
    parser.add_argument("--report", default=str(ROOT / "docs" / "results" / "resolution_transfer"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = {seed: pool.submit(run_seed, seed, args) for seed in args.seeds}
        results = {seed: future.result() for seed, future in futures.items()}
    suite_config, _ = _configs(args)
    rows = {
        seed: {"suite": _summary(_suite_row(seed, suite_config)), "resized": _summary(out["result"])}
        for seed, out in results.items()
    }
    wall = time.perf_counter() - started
    text = report(rows, args, wall)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report + ".md").write_text(text)
    Path(args.report + ".json").write_text(
        json.dumps({"rows": {str(k): v for k, v in rows.items()}, "wall_s": wall}, indent=2) + "\n"
    )
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
