"""How far apart are a suite's classifiers? Relative weight distances between fine-tunes of one θ0.

For each seed of each suite: the relative L2 distance of the target's prediction-only classifier from the source's
(backbone and head, ‖θ_target − θ_source‖ / ‖θ_source‖: what `transfer_drift.py` calls drift), and of each
classifier's backbone from the base θ0 it was fine-tuned from (‖θ − θ0‖ / ‖θ0‖ over `vit.*`; the head is new).
For the suites of `--host-suites`, each extension host's classifier (e.g. a replica `mnist@1`: another fine-tune of
the source's domain) against the source's, on the same scale.

    python benchmarks/classifier_distance.py      # writes docs/results/classifier_distance.md

Needs finished suites (`selfexplain experiment --config <suite>` for each of `--suites`); reads weights only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "selfexplain" / "experiments" / "configs"


def relative_distance(state: dict, reference: dict, prefixes: tuple[str, ...]) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref‖ over the tensors whose names start with ``prefixes`` and exist in both."""
    squared = total = 0.0
    for name, tensor in state.items():
        if name.startswith(prefixes) and name in reference and reference[name].shape == tensor.shape:
            squared += float((tensor - reference[name]).double().square().sum())
            total += float(reference[name].double().square().sum())
    return (squared / total) ** 0.5


def base_state(experiment, seed: int) -> dict:
    """θ0 of the seed: the suite's packaged base, or the one it pre-trained."""
    from selfexplain import ViTForSelfExplainingClassification
    from selfexplain.experiments.experiment import packaged_base

    base = experiment.config.base
    path = packaged_base(base["packaged"]) if "packaged" in base else experiment.work / f"seed{seed}" / "base"
    return ViTForSelfExplainingClassification.from_pretrained(path).state_dict()


def main(argv: list[str] | None = None) -> int:
    from selfexplain import ViTForSelfExplainingClassification
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--suites",
        nargs="+",
        default=["base12ep", "gentle_finetune", "base36ep", "base96ep", "base96ep_gentle"],
    )
    parser.add_argument("--host-suites", nargs="*", default=["full_replica_hosts2"])
    parser.add_argument("--source", default="mnist")
    parser.add_argument("--target", default="digits")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "classifier_distance.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for suite in args.suites:
        experiment = Experiment(
            ExperimentConfig.from_json_file(CONFIGS / f"{suite}.json"), log=lambda m: None
        )
        per_seed = []
        for seed in experiment.config.seeds:
            work = experiment.work / f"seed{seed}"
            paths = {d: work / f"{d}-prediction_only" for d in (args.source, args.target)}
            if not all((path / "config.json").exists() for path in paths.values()):
                sys.exit(f"{suite}, seed {seed}: run `selfexplain experiment --config {suite}` first.")
            states = {
                d: ViTForSelfExplainingClassification.from_pretrained(path).state_dict()
                for d, path in paths.items()
            }
            theta0 = base_state(experiment, seed)
            per_seed.append(
                (
                    relative_distance(states[args.target], states[args.source], ("vit.", "classifier.")),
                    relative_distance(states[args.source], theta0, ("vit.",)),
                    relative_distance(states[args.target], theta0, ("vit.",)),
                )
            )
        train = experiment.config.train
        base = experiment.config.base.get("packaged", "one per seed")
        rows.append((suite, base, train.get("learning_rate"), train.get("num_epochs"), per_seed))

    host_rows = []
    for suite in args.host_suites:
        experiment = Experiment(
            ExperimentConfig.from_json_file(CONFIGS / f"{suite}.json"), log=lambda m: None
        )
        for host in experiment.config.extension_hosts:
            per_seed = []
            for seed in experiment.config.seeds:
                work = experiment.work / f"seed{seed}"
                paths = [work / f"{d}-prediction_only" for d in (host, args.source)]
                if not all((path / "config.json").exists() for path in paths):
                    sys.exit(f"{suite}, seed {seed}: run `selfexplain experiment --config {suite}` first.")
                host_state, source_state = (
                    ViTForSelfExplainingClassification.from_pretrained(path).state_dict() for path in paths
                )
                per_seed.append(relative_distance(host_state, source_state, ("vit.", "classifier.")))
            host_rows.append((suite, host, per_seed))

    def cell(values: list[float]) -> str:
        text = f"{statistics.mean(values):.3f}"
        return text + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    lines = [
        "# How far apart the suites' classifiers are",
        "",
        f"Produced by `python benchmarks/classifier_distance.py{' ' + ' '.join(argv) if argv else ''}` "
        "(weights only). Relative L2 distances, mean ± std over each suite's seeds (per seed in brackets). "
        f"`{args.target} ↔ {args.source}`: the two prediction-only classifiers, backbone and head; `from θ0`: the "
        "backbone of each against the base it was fine-tuned from.",
        "",
        f"| suite | θ0 | fine-tuning lr, epochs | {args.target} ↔ {args.source} | {args.source} from θ0 | "
        f"{args.target} from θ0 |",
        "|---|---|---|---|---|---|",
    ]
    for suite, base, lr, epochs, per_seed in rows:
        columns = list(zip(*per_seed, strict=True))
        cells = [f"{cell(list(c))} ({', '.join(f'{v:.3f}' for v in c)})" for c in columns]
        lines.append(f"| {suite} | `{base}` | {lr:g}, {epochs} | " + " | ".join(cells) + " |")
    if host_rows:
        lines += [
            "",
            f"Extension hosts: each host's prediction-only classifier ↔ the source's (`{args.source}`), backbone and "
            "head, the same measure as the first distance above.",
            "",
            f"| suite | host | host ↔ {args.source} |",
            "|---|---|---|",
        ]
        for suite, host, per_seed in host_rows:
            lines.append(
                f"| {suite} | `{host}` | {cell(per_seed)} ({', '.join(f'{v:.3f}' for v in per_seed)}) |"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
