"""The ``selfexplain`` command line: one parser, one dispatch, a module per group of commands.

```
selfexplain pretrain-base   --output-dir runs/base                                   # offline θ0
selfexplain train           --base runs/base --train-data builtin:mnist --explanation-loss-weight 0 --output-dir runs/mnist-pred
selfexplain shapley-targets --model runs/mnist-pred --dataset builtin:mnist --budget 150 --output-dir runs/mnist-targets
selfexplain train           --base runs/base --train-data runs/mnist-targets/dataset --explanation-loss-weight 1 ...
selfexplain extract-vector  --self-explaining runs/mnist-se --prediction-only runs/mnist-pred --output-dir runs/vec
selfexplain apply           --model runs/digits-pred --vector runs/vec --output-dir runs/digits-explaining
selfexplain explain         --model runs/digits-explaining image1.png image2.png --output-dir heatmaps
selfexplain experiment      --config full                                            # the transfer suite + report
selfexplain demo                                                                     # the embedded default
```
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import datasets
from transformers.utils import logging as transformers_logging

from . import experiments, explain, serve, targets, train, vectors
from ._common import CLIError

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfexplain",
        description="Self-explaining Vision Transformers and explanation vectors (task arithmetic, no training on the target).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (experiments, train, targets, vectors, explain, serve):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not sys.stderr.isatty():
        # In logs, per-file download/load/save bars of transformers and datasets are hundreds of lines; our own
        # bars (training, targets) still report, a few lines per run (see selfexplain._progress).
        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        args.handler(args)
    except CLIError as err:
        parser.exit(2, f"selfexplain {args.command}: error: {err}\n")
    except (OSError, ValueError) as err:
        # Errors about the user's inputs (unknown repo, incompatible vector, ...) read better without a traceback.
        parser.exit(1, f"selfexplain {args.command}: error: {type(err).__name__}: {err}\n")
    return 0
