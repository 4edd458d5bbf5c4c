"""What limits the in-domain fidelity of the explanation extension? Training budget, capacity, learning rate,
and the supervision itself (amortised objective vs Kernel SHAP targets), per CPU-minute.

Built on a finished `extension` suite (`selfexplain experiment --config extension`): for each seed it reuses the
suite's prediction-only MNIST classifier (frozen: every variant predicts exactly as it does), its Kernel SHAP
reference (recomputed here with the suite's seeds on the same images: the classifier's logits are all a reference
reads, so it is the reference of every variant) and the suite's Kernel SHAP budget curve (B*). Each variant trains
an extension on the same 2000 MNIST images with one change to the suite's recipe and is scored like the suite's
in-domain row: Pearson / Spearman / top-10 % with the reference (48 images), insertion and deletion AUC (500).

    python benchmarks/extension_ablation.py --seeds 0      # writes docs/results/extension_ablation.md (+ .json)

Models and references are cached under `outputs/extension_ablation/` (a rerun only scores); `--workers 2` trains
two variants at a time (one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src" / "selfexplain" / "experiments" / "configs" / "extension.json"
SOURCE = "mnist"

#: name → (changes to the `extension` suite's config, what the change tests)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "suite recipe": ({}, "1 block, 8 coalitions/image, 10 epochs, lr 1e-3 (the suite's model, reused)"),
    "32 coalitions": ({"coalitions_per_image": 32}, "objective noise: 4x the coalitions per image and step"),
    "30 epochs": ({"explanation_train": {"num_epochs": 30}}, "training length: 3x the epochs"),
    "60 epochs": ({"explanation_train": {"num_epochs": 60}}, "training length: 6x the epochs"),
    "2 coalitions": (
        {"coalitions_per_image": 2},
        "the shared-head suite's 2 coalitions/image (the head compared at equal supervision)",
    ),
    "lr 3e-3": ({"explanation_train": {"learning_rate": 3e-3}}, "optimisation: a larger step"),
    "2 blocks": ({"explanation_extension_layers": 2}, "capacity: a second block"),
    "Kernel SHAP targets": (
        {"explanation_objective": "targets", "target_budget": 128, "explanation_loss_weight": 1.0},
        "supervision: fit precomputed Kernel SHAP values (budget 128, MSE) instead of the amortised objective",
    ),
    "Kernel SHAP targets, 256": (
        {"explanation_objective": "targets", "target_budget": 256, "explanation_loss_weight": 1.0},
        "the same with targets at budget 256 (128 is Kernel SHAP's degenerate budget at 64 players)",
    ),
    "lr 3e-3, 30 epochs": (
        {"explanation_train": {"learning_rate": 3e-3, "num_epochs": 30}},
        "the two levers that helped most, together",
    ),
}


def _prepare(name: str, seed: int, args) -> Path:
    """A work folder for the variant whose θ0 and prediction-only model are the suite's (links)."""
    out = Path(args.cache) / _slug(name)
    work = out / "work" / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    suite = Path(args.suite_work) / f"seed{seed}"
    links = ["base", f"{SOURCE}-prediction_only"]
    if name == "suite recipe":
        links.append(f"{SOURCE}-self_explaining")
    for link in links:
        if not (work / link).exists():
            os.symlink((suite / link).resolve(), work / link)
    return out


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _experiment(name: str, out: Path):
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    changes = VARIANTS[name][0]
    config = ExperimentConfig.from_json_file(CONFIG, output_dir=str(out), report_dir=None, **changes)
    return Experiment(config, log=lambda message: None)


def train_variant(name: str, seed: int, args) -> dict[str, Any]:
    """Train (or find) the variant's self-explaining model; its training CPU time, with targets if any."""
    torch.set_num_threads(1)
    out = _prepare(name, seed, args)
    experiment = _experiment(name, out)
    cfg = experiment.config
    record = out / "work" / f"seed{seed}" / "train-time.json"
    if record.exists():
        return json.loads(record.read_text())
    started = time.process_time()
    experiment.finetune(seed, SOURCE, cfg.explanation_loss_weight, experiment.with_targets(seed, SOURCE))
    cpu = time.process_time() - started
    result = {"variant": name, "seed": seed, "train_cpu_s": cpu, "timings_s": experiment.timings}
    if name == "suite recipe":  # reused: its time is the suite's training time, from the suite's unit log
        result = {"variant": name, "seed": seed, "train_cpu_s": None, "timings_s": {}}
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def reference(seed: int, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The suite's in-domain images, classes and reference for the seed (cached)."""
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    config = ExperimentConfig.from_json_file(CONFIG, output_dir=str(Path(args.suite_work).parent))
    experiment = Experiment(config, log=lambda message: None)
    test = experiment.dataset(SOURCE, seed, "test", config.num_eval)
    x = experiment.pixels(test)
    path = Path(args.cache) / f"reference-seed{seed}.safetensors"
    pred = experiment.load(experiment.work / f"seed{seed}" / f"{SOURCE}-prediction_only")
    with torch.no_grad():
        classes = pred(x, explain=None).logits.argmax(-1)
    if not path.exists():
        ref, check = experiment.reference(pred, x, classes, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"reference": ref.contiguous(), "check": torch.tensor([check])}, path)
    saved = load_file(path)
    return x, classes, saved["reference"]


def score(name: str, seed: int, x, classes, ref, curve, args) -> dict[str, Any]:
    from selfexplain.experiments.experiment import budget_match

    out = Path(args.cache) / _slug(name)
    experiment = _experiment(name, out)
    se = experiment.load(out / "work" / f"seed{seed}" / f"{SOURCE}-self_explaining")
    maps = experiment.patch_map(se, x, classes, experiment.config.grid())
    scored = experiment.score(se, x, maps, ref, None, classes)
    scored.pop("_per_image", None)
    with torch.no_grad():
        same = bool(torch.equal(se(x, explain=None).logits.argmax(-1), classes))
    return {**scored, "top1_as_classifier": same, "budget_match": budget_match(curve, scored["pearson"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite-work", default=str(ROOT / "outputs" / "extension" / "work"))
    parser.add_argument("--cache", default=str(ROOT / "outputs" / "extension_ablation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "extension_ablation"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()

    jobs = [(name, seed) for seed in args.seeds for name in args.variants]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        trained = list(pool.map(train_variant, *zip(*jobs, strict=True), [args] * len(jobs)))
    rows = []
    for seed in args.seeds:
        suite = json.loads(
            (Path(args.suite_work) / f"seed{seed}" / "results" / f"source-{SOURCE}.json").read_text()
        )
        suite = suite.get("result", suite)
        x, classes, ref = reference(seed, args)
        for name, info in zip(args.variants, [t for t in trained if t["seed"] == seed], strict=True):
            row = {
                "variant": name,
                "seed": seed,
                "train_cpu_s": info["train_cpu_s"],
                "timings_s": info["timings_s"],
            }
            row.update(score(name, seed, x, classes, ref, suite["kernel_shap"], args))
            row["suite_pearson"] = suite["explainers"]["self_explaining"]["pearson"]
            row["rollout_pearson"] = suite["explainers"]["attention_rollout"]["pearson"]
            rows.append(row)
            print(f"seed {seed} {name}: pearson {row['pearson']:.3f}", file=sys.stderr)
    wall = time.perf_counter() - started
    write(rows, args, wall)
    return 0


def write(rows: list[dict], args, wall: float) -> None:
    import numpy as np

    from selfexplain.experiments.experiment import _environment

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/extension_ablation.py --seeds " + " ".join(map(str, args.seeds))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Explanation extension: what limits its in-domain fidelity (MNIST)",
        "",
        f"Produced by `{command}` on top of `selfexplain experiment --config extension`; this invocation's wall "
        f"time {wall / 60:.1f} min on {_environment(args.workers)['machine']} (variants already trained are read "
        "back: their training CPU time below is the one recorded when they were trained). Every variant trains an extension "
        '(`trainable="extension"`) on the suite\'s frozen prediction-only MNIST classifier (so every variant predicts '
        "exactly as it does) with one change to the suite's recipe; scored on the suite's MNIST test images against "
        "the suite's Kernel SHAP reference (2048 evaluations, 48 images) and its budget curve (B*). Train CPU: the "
        "variant's training, Kernel SHAP targets included, on one thread.",
        "",
        "| variant | what it tests | seeds | train CPU-min | pearson | spearman | top-10% | insertion | deletion | B* |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]

        def stat(key, rows=mine):
            values = np.array([r[key] for r in rows], dtype=float)
            return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "")

        cpu = [r["train_cpu_s"] for r in mine if r["train_cpu_s"] is not None]
        cpu_text = f"{np.mean(cpu) / 60:.1f}" if cpu else "(the suite's)"
        bstar = ", ".join(
            ("≤ " if b["relation"] == "below" else "> " if b["relation"] == "above" else "")
            + str(b["budget"] or b["largest_tested"])
            for b in (r["budget_match"] for r in mine)
        )
        lines.append(
            f"| {name} | {VARIANTS[name][1]} | {len(mine)} | {cpu_text} | {stat('pearson')} | {stat('spearman')} | "
            f"{stat('top10_overlap')} | {stat('insertion')} | {stat('deletion')} | {bstar} |"
        )
    lines += [
        "",
        "Attention rollout on the same images (the suite's): Pearson "
        + ", ".join(f"{r['rollout_pearson']:.3f}" for r in rows if r["variant"] == rows[0]["variant"])
        + ". Every variant's top-1 equals the classifier's: "
        + str(all(r["top1_as_classifier"] for r in rows))
        + ".",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
