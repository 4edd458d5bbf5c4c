"""``selfexplain train`` and ``python -m selfexplain.training``: the training options, built from the fields of
:class:`~selfexplain.training.TrainingConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset

from ..data import (
    load_image_dataset,
)
from ..training import TrainingConfig, train

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train``."""
    p = sub.add_parser(
        "train",
        help="Fine-tune prediction-only (--explanation-loss-weight 0) or self-explaining (> 0) with accelerate.",
    )
    add_train_arguments(p)
    p.set_defaults(handler=train_from_args)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to ``parser``: ``--config`` (a JSON of :class:`TrainingConfig` fields), one
    ``--<field>`` per field (overrides the JSON), and the data options."""
    parser.add_argument("--config", type=Path, default=None, help="JSON file of TrainingConfig fields.")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train-data",
        required=True,
        help='Dataset: "builtin:<name>", a folder (save_to_disk, imagefolder) or a Hub id.',
    )
    data.add_argument("--train-split", default="train")
    data.add_argument("--eval-data", default=None, help="Evaluation dataset (default: --train-data).")
    data.add_argument(
        "--eval-split",
        default=None,
        help='Split of the evaluation data ("none" to skip; default: "validation" if present).',
    )
    data.add_argument(
        "--data-seed", type=int, default=None, help="Seed of a built-in domain (default: --seed)."
    )
    recipe = parser.add_argument_group("recipe (each overrides --config; TrainingConfig's fields)")
    for f in dataclasses.fields(TrainingConfig):
        flag = "--" + f.name.replace("_", "-")
        parse, help_text = f.metadata["parse"], f.metadata["help"]
        if parse is bool:
            recipe.add_argument(
                flag,
                type=_parse_bool,
                nargs="?",
                const=True,
                default=None,
                metavar="{true,false}",
                help=help_text,
            )
        elif parse == "resume":
            recipe.add_argument(flag, nargs="?", const="true", default=None, metavar="PATH", help=help_text)
        elif parse == "json":
            recipe.add_argument(flag, type=json.loads, default=None, metavar="JSON", help=help_text)
        else:
            default = "" if f.default in (None, dataclasses.MISSING) else f" (default: {f.default})"
            recipe.add_argument(flag, type=parse, default=None, help=help_text + default)
    return parser


def train_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`train` from parsed :func:`add_train_arguments` options."""
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainingConfig)
        if getattr(args, f.name, None) is not None
    }
    if overrides.get("resume") is not None:
        overrides["resume"] = _parse_resume(overrides["resume"])
    if args.config is not None:
        config = TrainingConfig.from_json_file(args.config, **overrides)
    else:
        missing = [name for name in ("base", "output_dir") if name not in overrides]
        if missing:
            raise SystemExit(f"error: --{missing[0].replace('_', '-')} is required without --config.")
        config = TrainingConfig(**overrides)
    data_seed = config.seed if args.data_seed is None else args.data_seed
    train_split = _load_split(args.train_data, args.train_split, data_seed)
    eval_split = _load_eval_split(args, data_seed)
    metrics = train(config, train_split, eval_split)
    if PartialState().is_main_process:
        print(json.dumps(metrics, indent=2, default=str))
    return metrics


def _load_split(source: str, split: str, seed: int) -> Dataset:
    kwargs = {"seed": seed} if source.startswith("builtin:") else {}
    return load_image_dataset(source, split=split, **kwargs)


def _load_eval_split(args: argparse.Namespace, seed: int) -> Dataset | None:
    if args.eval_split is not None and args.eval_split.lower() == "none":
        return None
    source = args.eval_data or args.train_data
    if args.eval_split is not None:
        return _load_split(source, args.eval_split, seed)
    try:
        return _load_split(source, "validation", seed)
    except (ValueError, KeyError):
        logger.info("%s has no validation split: training without evaluation.", source)
        return None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "y"):
        return True
    if lowered in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_resume(value: str | bool) -> bool | str:
    if isinstance(value, bool):
        return value
    try:
        return _parse_bool(value)
    except argparse.ArgumentTypeError:
        return value


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m selfexplain.training --config cfg.json --train-data builtin:mnist [--<field> value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m selfexplain.training",
        description="Fine-tune a ViT prediction-only (λ = 0) or self-explaining (λ > 0) with accelerate.",
    )
    add_train_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("selfexplain", __name__):  # `__main__` under `python -m`
        logging.getLogger(name).setLevel(logging.INFO)
    train_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
