"""What does each packaged θ0 let the suites' fine-tuning recipe learn, and how far does fine-tuning move it?

The packaged bases differ only in pre-training length (`patch4-union`: 12 epochs on `union`; `patch4-union-36ep`,
`patch4-union-96ep`: 36 and 96; each one's `pretraining_metrics.json` has its command). For each base and domain a
prediction-only classifier is fine-tuned with the `base12ep` suite's recipe (2,000 training images, 10 epochs, batch
64, learning rate 1e-3, no augmentation; the same code path as the suite's) and scored on the domain's test images
(the suite's 500), with the relative L2 distance of its backbone from θ0 (‖θ − θ0‖ / ‖θ0‖ over `vit.*`, as in
`classifier_distance.py`). The clutter domains are the ones the first base could not teach.

    python benchmarks/base_strength.py      # writes docs/results/base_strength.md (+ .json)

Classifiers and their scores are cached under `outputs/base_strength/` (a rerun reads them back).
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
from _common import run_and_write

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src" / "selfexplain" / "experiments" / "configs" / "base12ep.json"
BASES = ("patch4-union", "patch4-union-36ep", "patch4-union-96ep")
DOMAINS = ("mnist", "digits", "digits-on-clutter", "shapes-on-clutter")


def _experiment(base: str, cache: str):
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    config = ExperimentConfig.from_json_file(
        CONFIG, base={"packaged": base}, output_dir=str(Path(cache) / base), name=f"base_strength/{base}"
    )
    return Experiment(config, log=lambda message: None)


def measure(base: str, domain: str, seed: int, cache: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    from classifier_distance import relative_distance

    from selfexplain import ViTForSelfExplainingClassification

    record = Path(cache) / base / f"seed{seed}-{domain}.json"
    if record.exists():  # keeps the training CPU time of the run that trained the classifier
        return json.loads(record.read_text())
    experiment = _experiment(base, cache)
    started = time.process_time()
    path = experiment.finetune(seed, domain, 0.0)  # skipped when already on disk
    train_cpu = time.process_time() - started
    model = ViTForSelfExplainingClassification.from_pretrained(path).eval()
    theta0 = ViTForSelfExplainingClassification.from_pretrained(experiment.base(seed)).state_dict()
    test = experiment.dataset(domain, seed, "test", experiment.config.num_eval)
    x, labels = experiment.pixels(test), torch.tensor(test["label"])
    with torch.inference_mode():
        predicted = model(x, explain=None).logits.argmax(-1)
    result = {
        "base": base,
        "domain": domain,
        "seed": seed,
        "accuracy": float((predicted == labels).float().mean()),
        "distance_from_theta0": relative_distance(model.state_dict(), theta0, ("vit.",)),
        "train_cpu_s": train_cpu,
    }
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(results: list[dict], command: str, wall: float, machine: str) -> str:
    from selfexplain.experiments.experiment import packaged_base

    seeds = sorted({r["seed"] for r in results})
    lines = [
        "# What each packaged θ0 lets the suites' recipe learn",
        "",
        f"Produced by `{command}` ({wall / 60:.1f} min wall on {machine}; seeds {seeds}; "
        f"{sum(r['train_cpu_s'] for r in results) / 60:.0f} CPU-min of fine-tuning when the classifiers were "
        "trained; classifiers and scores are cached under `outputs/base_strength/`, which a rerun reads back). "
        "Each classifier is "
        "fine-tuned from the base with the `base12ep` suite's recipe (2,000 training images, 10 epochs, learning rate "
        "1e-3) and scored on 500 test images of its domain; distance: the backbone's relative L2 distance from "
        "θ0. With several seeds, mean ± std.",
        "",
        "| base | pre-training (`union` validation accuracy) | "
        + " | ".join(f"{d} accuracy" for d in DOMAINS)
        + " | distance from θ0 (mean over domains) |",
        "|---|---|" + "---|" * len(DOMAINS) + "---|",
    ]

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    for base in BASES:
        rows = [r for r in results if r["base"] == base]
        if not rows:
            continue
        metrics = json.loads((packaged_base(base) / "pretraining_metrics.json").read_text())
        epochs = metrics["command"].split("--epochs ")[1].split()[0]
        accuracy = [cell([r["accuracy"] for r in rows if r["domain"] == d]) for d in DOMAINS]
        distance = cell(
            [statistics.mean(r["distance_from_theta0"] for r in rows if r["seed"] == s) for s in seeds]
        )
        lines.append(
            f"| `{base}` | {epochs} epochs ({metrics['eval_accuracy']:.3f}) | "
            + " | ".join(accuracy)
            + f" | {distance} |"
        )
    lines += [
        "",
        "Distance from θ0 per domain:",
        "",
        "| base | " + " | ".join(DOMAINS) + " |",
        "|---|" + "---|" * len(DOMAINS),
    ]
    for base in BASES:
        rows = [r for r in results if r["base"] == base]
        if rows:
            cells = [cell([r["distance_from_theta0"] for r in rows if r["domain"] == d]) for d in DOMAINS]
            lines.append(f"| `{base}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=str(ROOT / "outputs" / "base_strength"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "base_strength"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in the workers, so that the report names the threads that did the work
    jobs = [(base, domain, seed) for seed in args.seeds for base in BASES for domain in DOMAINS]
    command = "python benchmarks/base_strength.py" + (" " + " ".join(argv) if argv else "")
    run_and_write(measure, jobs, args.cache, args.workers, args.out, command, report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
