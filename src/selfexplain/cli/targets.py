"""``selfexplain shapley-targets``: Kernel SHAP explanation targets (all classes) for a dataset."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from datasets import DatasetDict

from ..attribution.targets import add_explanation_targets
from ..data import load_image_dataset
from ._common import CLIError, load_image_processor, load_model


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``shapley-targets``."""
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


def _cmd_shapley_targets(args: argparse.Namespace) -> None:
    model = load_model(args.model, "--model").eval()
    processor = load_image_processor(args.model, model.config)
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
    destination = args.output_dir / "dataset"
    if destination.exists():  # a stale save of another layout would shadow the new one when loading
        shutil.rmtree(destination)
    DatasetDict({args.split: with_targets}).save_to_disk(str(destination))
    print(
        f"Saved {len(with_targets)} examples with explanation targets {grid} to {args.output_dir / 'dataset'}"
    )


def _dummy(model):
    size = model.config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return torch.zeros(1, model.config.num_channels, *size)
