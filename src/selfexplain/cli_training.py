"""CLI commands that train, compute targets or run experiments (registered into `selfexplain.cli`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from importlib import resources
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add `pretrain-base`, `shapley-targets`, `train`, `experiment` and `demo`."""
    p = sub.add_parser("pretrain-base", help="Pre-train a small ViT base θ0 on the built-in offline domains.")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    # Defaults: the recipe of the packaged experiments (49% on the 14 union classes in ~2 min on one core).
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=8, help="8 on 32×32 images: a 4×4 patch grid.")
    p.add_argument("--domains", nargs="+", default=["union"], help="Built-in domains to pre-train on.")
    p.add_argument("--num-samples", type=int, default=None, help="Images per domain (default: all).")
    p.set_defaults(handler=_cmd_pretrain_base)

    p = sub.add_parser(
        "shapley-targets",
        help="Add Kernel SHAP explanation targets (all classes) to a dataset, with a source prediction-only model.",
    )
    p.add_argument("--model", required=True, help="Folder or Hub id of the source prediction-only model.")
    p.add_argument(
        "--dataset", required=True, help='"builtin:<name>", a folder (imagefolder/save_to_disk) or a Hub id.'
    )
    p.add_argument("--split", default="train")
    p.add_argument("--output-dir", required=True, type=Path, help="Where the dataset with targets is saved.")
    p.add_argument(
        "--grid",
        type=int,
        nargs=2,
        default=None,
        metavar=("GH", "GW"),
        help="Player grid (default: patch grid).",
    )
    p.add_argument("--budget", type=int, default=150, help="Model evaluations per image.")
    p.add_argument("--baseline", default="mean", choices=["mean", "zero", "blur"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="Masked images per forward pass.")
    p.add_argument("--num-samples", type=int, default=None, help="Use only the first N examples.")
    p.add_argument(
        "--num-shards", type=int, default=None, help="Shards of the resumable cache (default: 1 per 1000)."
    )
    p.set_defaults(handler=_cmd_shapley_targets)

    from .training import add_train_arguments

    p = sub.add_parser(
        "train",
        help="Fine-tune prediction-only (--explanation-loss-weight 0) or self-explaining (> 0) with accelerate.",
    )
    add_train_arguments(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("experiment", help="Run a transfer experiment suite and write its report.")
    p.add_argument(
        "--config", required=True, help='A JSON file, or the name of a packaged suite ("demo", "full").'
    )
    p.add_argument("--output-dir", default=None, help="Work folder (models, targets); default: the config's.")
    p.add_argument("--report-dir", default=None, help="Where report.md and plots go; default: the config's.")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Override the config's seeds.")
    p.set_defaults(handler=_cmd_experiment)

    p = sub.add_parser(
        "demo", help="The embedded default: a small transfer experiment, a few minutes on CPU."
    )
    p.add_argument(
        "--output-dir", default="outputs/demo", help="Work folder and report (default: outputs/demo)."
    )
    p.set_defaults(handler=_cmd_demo)


def _cmd_pretrain_base(args: argparse.Namespace) -> None:
    from .training import pretrain_base

    info = pretrain_base(
        args.output_dir,
        seed=args.seed,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        patch_size=args.patch_size,
        domains=tuple(args.domains),
        num_samples=args.num_samples,
    )
    print(json.dumps(info, indent=2, default=str))


def _cmd_shapley_targets(args: argparse.Namespace) -> None:
    from . import ViTForSelfExplainingClassification
    from .cli import CLIError, _load_image_processor
    from .data import load_image_dataset
    from .targets import add_explanation_targets

    model = ViTForSelfExplainingClassification.from_pretrained(args.model).eval()
    processor = _load_image_processor(args.model, model.config)
    kwargs = {"seed": args.seed} if args.dataset.startswith("builtin:") else {}
    dataset = load_image_dataset(args.dataset, split=args.split, **kwargs)
    if args.num_samples is not None:
        dataset = dataset.select(range(min(args.num_samples, len(dataset))))
    grid = tuple(args.grid) if args.grid else model.patch_grid(_dummy(model))
    if args.budget < 3:
        raise CLIError(f"--budget must be at least 3 model evaluations, got {args.budget}.")
    with_targets = add_explanation_targets(
        dataset,
        model,
        image_processor=processor,
        grid=grid,
        budget=args.budget,
        baseline=args.baseline,
        seed=args.seed,
        batch_size=args.batch_size,
        num_shards=args.num_shards,
        cache_dir=args.output_dir / "shards",
    )
    # Saved as a DatasetDict under the same split name, so `selfexplain train --train-data DIR/dataset
    # --train-split <split>` reads it like any other dataset.
    from datasets import DatasetDict

    destination = args.output_dir / "dataset"
    if destination.exists():  # a stale save of another layout would shadow the new one when loading
        import shutil

        shutil.rmtree(destination)
    DatasetDict({args.split: with_targets}).save_to_disk(str(destination))
    print(
        f"Saved {len(with_targets)} examples with explanation targets {grid} to {args.output_dir / 'dataset'}"
    )


def _dummy(model):
    import torch

    size = model.config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return torch.zeros(1, model.config.num_channels, *size)


def _cmd_train(args: argparse.Namespace) -> None:
    from .training import train_from_args

    train_from_args(args)


def packaged_config(name: str) -> Path:
    """Path of a packaged experiment config (`demo`, `full`), or `name` itself when it is a file."""
    if Path(name).is_file():
        return Path(name)
    candidate = resources.files("selfexplain").joinpath("configs", f"{name}.json")
    if not candidate.is_file():
        raise FileNotFoundError(f"{name}: no such config file, and not a packaged suite (demo, full).")
    return Path(str(candidate))


def _cmd_experiment(args: argparse.Namespace, command: str | None = None) -> dict:
    from .experiment import Experiment, ExperimentConfig
    from .report import write_report

    config = ExperimentConfig.from_json_file(
        packaged_config(args.config), output_dir=args.output_dir, report_dir=args.report_dir, seeds=args.seeds
    )
    experiment = Experiment(config)
    results = experiment.run()
    report_dir = Path(config.report_dir or Path(config.output_dir) / "report")
    experiment.heatmap_figure(report_dir / "heatmaps.png")
    command = command or "selfexplain " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = write_report(results, report_dir, command)
    print(f"Report: {path}")
    return results


def _cmd_demo(args: argparse.Namespace) -> None:
    from .report import pair_deltas

    ns = argparse.Namespace(
        config="demo",
        output_dir=args.output_dir,
        report_dir=str(Path(args.output_dir) / "report"),
        seeds=None,
    )
    results = _cmd_experiment(ns, command=f"selfexplain demo --output-dir {args.output_dir}")
    print(
        "\nBefore (target's own patch scores, α = 0) → after (explanation vector, α recommended on the source):"
    )
    for (source, target), entry in sorted(pair_deltas(results, "recommended_alpha").items()):
        seed = str(results["config"]["seeds"][0])
        sweep = results["per_seed"][seed][target]["transfer"][source]["sweep"]
        before, after = sweep["0"], sweep[f"{entry['alpha'][0]:g}"]
        print(
            f"  {source} → {target} (α = {entry['alpha'][0]:g}): insertion {before['insertion']:.3f} → {after['insertion']:.3f}, "
            f"deletion {before['deletion']:.3f} → {after['deletion']:.3f}, "
            f"Spearman with Kernel SHAP {before['spearman']:.3f} → {after['spearman']:.3f}, "
            f"accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f}"
        )
    print(f"Heatmaps: {Path(args.output_dir) / 'report' / 'heatmaps.png'}")
