"""What every command shares: the error type reported without a traceback, Hub options, image processors."""

from __future__ import annotations

import argparse
import sys

from transformers import AutoImageProcessor

from ..data import default_image_processor


class CLIError(Exception):
    """A problem with the user's input, reported without a traceback."""


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", default=None, help="Also push the result to this Hub repo."
    )
    parser.add_argument(
        "--token", default=None, help="Hub token (default: the one saved by `hf auth login`)."
    )


def load_image_processor(model_id: str, config, revision: str | None = None):
    try:
        return AutoImageProcessor.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        print(
            f"warning: {model_id} has no image processor; using a ViT image processor at {size}×{size} px (mean = std = 0.5).",
            file=sys.stderr,
        )
        return default_image_processor(size)
