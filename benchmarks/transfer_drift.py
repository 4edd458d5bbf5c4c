"""How far may a target classifier drift from the source's before the explanation vector stops helping?

`docs/results/transfer_gap.md` finds that a transferred extension loses most of its fidelity to the change of
classifier, not of images. This traces that loss against the amount of change: each target is the source's own
prediction-only MNIST classifier, fine-tuned further on `digits` (the suite's recipe: batch 64, learning rate 1e-3,
no augmentation; the same 10 labels, so its head is kept) for 0, 1, 3 and 10 epochs — 0 epochs is the source
classifier itself, on `digits` images — and, at the far end, the suite's own `digits` classifier (fine-tuned from
θ0, never from MNIST). The MNIST vector of the same seed is added at α = 1 and its map scored like the suite's
transfer rows, beside attention rollout and the target's own untrained patch scores: Pearson with a Kernel SHAP
reference of that very target (the suite's estimator and budget, 48 test images) and insertion − deletion (500).
How far each target drifted: its accuracy on `digits`, and the relative L2 distance of its weights from the source
classifier's.

    python benchmarks/transfer_drift.py      # writes docs/results/transfer_drift.md (+ .json)

Needs a finished `selfexplain experiment --config base12ep`; targets and results are cached under
`outputs/base12ep/work/transfer_drift/` (a rerun only renders).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from _common import run_and_write

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src" / "selfexplain" / "experiments" / "configs" / "base12ep.json"
EPOCHS = (0, 1, 3, 10)
FROM_THETA0 = "θ0 → digits (the suite's)"


def _experiment():
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    return Experiment(ExperimentConfig.from_json_file(CONFIG), log=lambda message: None)


def target_model(experiment, seed: int, epochs: int | None, cache: Path) -> Path:
    """The MNIST classifier fine-tuned on `digits` for ``epochs`` (0: itself; None: the suite's digits model)."""
    from selfexplain.training import TrainingConfig, train

    work = experiment.work / f"seed{seed}"
    if epochs is None:
        return work / "digits-prediction_only"
    if epochs == 0:
        return work / "mnist-prediction_only"
    path = cache / f"seed{seed}" / f"mnist-then-digits-{epochs}ep"
    if (path / "config.json").exists():
        return path
    cfg = experiment.config
    config = TrainingConfig(
        base=str(work / "mnist-prediction_only"),
        output_dir=str(path),
        explanation_loss_weight=0.0,
        seed=seed,
        num_epochs=epochs,
        batch_size=cfg.train.get("batch_size", 64),
        learning_rate=cfg.train.get("learning_rate", 1e-3),
        augment=cfg.train.get("augment", False),
        checkpoint_every=None,
        log_every=20,
        source_dataset="builtin:digits",
    )
    train_ds = experiment.dataset("digits", seed, "train", cfg.num_train)
    train(
        config,
        train_ds,
        experiment.dataset("digits", seed, "validation", None),
        image_processor=experiment.processor,
    )
    return path


def measure(seed: int, epochs: int | None, cache: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    from classifier_distance import relative_distance

    from selfexplain import ViTForSelfExplainingClassification
    from selfexplain.evaluation import explainers
    from selfexplain.experiments.experiment import _as_plain_classifier, _patched
    from selfexplain.modeling_self_explaining_vit import pool_to_player_grid
    from selfexplain.vectors import ExplanationVector

    label = FROM_THETA0 if epochs is None else f"{epochs}"
    record = Path(cache) / f"seed{seed}" / f"result-{'theta0' if epochs is None else epochs}.json"
    if record.exists():
        return json.loads(record.read_text())
    experiment = _experiment()
    cfg, grid = experiment.config, experiment.config.grid()
    path = target_model(experiment, seed, epochs, Path(cache))
    model = ViTForSelfExplainingClassification.from_pretrained(path).eval()
    source = ViTForSelfExplainingClassification.from_pretrained(
        experiment.work / f"seed{seed}" / "mnist-prediction_only"
    )
    drift = relative_distance(model.state_dict(), source.state_dict(), ("vit.", "classifier."))
    test = experiment.dataset("digits", seed, "test", cfg.num_eval)
    x, labels = experiment.pixels(test), torch.tensor(test["label"])
    with torch.inference_mode():
        predicted = model(x, explain=None).logits.argmax(-1)
    reference, agreement = experiment.reference(model, x, predicted, seed)
    vector = ExplanationVector.from_pretrained(experiment.work / f"seed{seed}" / "mnist-vector")
    patched = _patched(model, vector, 1.0)
    plain = _as_plain_classifier(model)
    maps = {
        "transferred (MNIST vector, α = 1)": (patched, experiment.patch_map(patched, x, predicted, grid)),
        "own patch scores (α = 0)": (model, experiment.patch_map(model, x, predicted, grid)),
        "attention rollout": (model, pool_to_player_grid(explainers.attention_rollout(plain, x), grid)),
    }
    scores = {}
    for name, (scored_model, explanation) in maps.items():
        scored = experiment.score(scored_model, x, explanation, reference, None, predicted)
        scored.pop("_per_image", None)
        scores[name] = {k: scored[k] for k in ("pearson", "insertion", "deletion")}
    result = {
        "seed": seed,
        "target": label,
        "accuracy": float((predicted == labels).float().mean()),
        "weight_distance": drift,
        "reference_seed_agreement": agreement,
        "scores": scores,
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(results: list[dict], command: str, wall: float, machine: str) -> str:
    order = [str(e) for e in EPOCHS] + [FROM_THETA0]
    names = list(results[0]["scores"])
    lines = [
        "# Transfer against classifier drift",
        "",
        f"Produced by `{command}`; this invocation's wall time {wall / 60:.1f} min on {machine} (targets already "
        "measured are read back from their cached results; measuring all 15 took 16.1 min on 2 workers); raw "
        "numbers: `transfer_drift.json`. Each row "
        "a target classifier (mean ± std over the `base12ep` suite's seeds 0, 1, 2): the source's prediction-only MNIST "
        "classifier fine-tuned further on `digits` for the given number of epochs (0: the source classifier itself, "
        "on `digits` images), and the suite's own `digits` classifier (fine-tuned from θ0). Drift: the relative L2 "
        "distance of the target's weights (backbone and head) from the source classifier's. Pearson with a Kernel "
        "SHAP reference of the target itself (48 test images; the suite's estimator), insertion − deletion on 500.",
        "",
        "| target (epochs on digits) | drift | digits accuracy | "
        + " | ".join(f"{n}: Pearson" for n in names)
        + " | "
        + " | ".join(f"{n}: ins − del" for n in names)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(names)),
    ]

    def cell(values: list[float]) -> str:
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}"

    for target in order:
        rows = [r for r in results if r["target"] == target]
        if not rows:
            continue
        pearson = [cell([r["scores"][n]["pearson"] for r in rows]) for n in names]
        faithful = [
            cell([r["scores"][n]["insertion"] - r["scores"][n]["deletion"] for r in rows]) for n in names
        ]
        lines.append(
            f"| {target} | {cell([r['weight_distance'] for r in rows])} | {cell([r['accuracy'] for r in rows])} | "
            + " | ".join(pearson + faithful)
            + " |"
        )
    lines += ["", "Per seed, transferred / attention rollout, Pearson and insertion − deletion:", ""]

    def pair(scores: dict, key) -> str:
        return f"{key(scores[names[0]]):.3f} / {key(scores['attention rollout']):.3f}"

    for target in order:
        rows = sorted((r for r in results if r["target"] == target), key=lambda r: r["seed"])
        text = "; ".join(
            f"seed {r['seed']}: {pair(r['scores'], lambda s: s['pearson'])}, "
            f"{pair(r['scores'], lambda s: s['insertion'] - s['deletion'])}"
            for r in rows
        )
        lines.append(f"- {target}: {text}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "transfer_drift"))
    args = parser.parse_args(argv)
    experiment = _experiment()
    for seed in args.seeds:
        if not (experiment.work / f"seed{seed}" / "mnist-vector").exists():
            sys.exit(f"seed {seed}: run `selfexplain experiment --config base12ep` first.")
    cache = str(experiment.work / "transfer_drift")
    jobs = [(seed, epochs) for seed in args.seeds for epochs in (*EPOCHS, None)]
    command = "python benchmarks/transfer_drift.py" + (" " + " ".join(argv) if argv else "")
    run_and_write(measure, jobs, cache, args.workers, args.out, command, report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
