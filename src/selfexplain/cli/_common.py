"""What every command shares: the error type reported without a traceback, what a ``--model``/``--vector``
argument names, Hub options, image processors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..data import default_image_processor
from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification
from ..vectors.apply import load_image_processor as load_image_processor_safely
from ..vectors.config import VECTOR_CONFIG_NAME
from ..vectors.io import Source, _list_repo_files, classify_source, offline_message


class CLIError(Exception):
    """A problem with the user's input, reported without a traceback."""


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", default=None, help="Also push the result to this Hub repo."
    )
    parser.add_argument(
        "--token", default=None, help="Hub token (default: the one saved by `hf auth login`)."
    )


def check_source(name: str, expected: str, option: str, *, revision: str | None = None) -> Source:
    """Refuse, with what it is and what to do, a ``--model`` (``expected="model"``) or ``--vector``
    (``expected="vector"``) argument that names something else; return what it names.

    Nothing is downloaded: a Hub id is accepted as it is (and checked when it is loaded), except while the Hub
    is offline (``HF_HUB_OFFLINE=1``) and nothing of it is cached, which fails at once.
    """
    found = classify_source(name, revision=revision)
    if found.kind == expected or (found.kind == "hub" and not found.offline_miss):
        return found
    if found.offline_miss:
        raise CLIError(f"{option} {offline_message(name)}")
    if found.kind == "missing":
        raise CLIError(f"{option} {name}: no such folder.")
    if found.kind == "vector":
        raise CLIError(
            f"{option} {name} is an explanation vector, not a model: pass it as --vector "
            f"(selfexplain apply --model CLASSIFIER --vector {name} --output-dir OUT), then use OUT as the model."
        )
    if found.kind == "model":
        raise CLIError(
            f"{option} {name} is a model, not an explanation vector: pass it as --model; "
            "a vector is made from two models with `selfexplain extract-vector`."
        )
    if found.kind == "dataset":
        raise CLIError(
            f"{option} {name} is a dataset folder, not {'a model' if expected == 'model' else 'an explanation vector'}:"
            " datasets go to `selfexplain shapley-targets --dataset` or `selfexplain train --train-data`."
        )
    wanted = (
        "config.json (a model)" if expected == "model" else f"{VECTOR_CONFIG_NAME} (an explanation vector)"
    )
    if found.kind == "file":
        raise CLIError(f"{option} {name} is a file: pass the folder that holds {wanted}.")
    raise CLIError(
        f"{option} {name} holds no {wanted}; it contains: {', '.join(found.contents[:10]) or 'nothing'}."
    )


def load_model(name: str, option: str = "--model", revision: str | None = None):
    """`ViTForSelfExplainingClassification.from_pretrained`, after `check_source`; a Hub repo that turns out to
    hold an explanation vector is reported as one."""
    check_source(name, "model", option, revision=revision)
    try:
        return ViTForSelfExplainingClassification.from_pretrained(name, revision=revision)
    except OSError as err:
        files = _list_repo_files(name, {"revision": revision}) if classify_source(name).kind == "hub" else []
        if VECTOR_CONFIG_NAME in files:
            raise CLIError(
                f"{option} {name} is an explanation vector on the Hub, not a model: pass it as --vector "
                f"(selfexplain apply --model CLASSIFIER --vector {name} --output-dir OUT)."
            ) from err
        raise


def load_image_processor(model_id: str, config, revision: str | None = None):
    """The model's own image processor (never one that needs the repo's code), else a default ViT one."""
    processor = load_image_processor_safely(model_id, revision)
    if processor is not None:
        return processor
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    print(
        f"warning: {model_id} has no image processor; using a ViT image processor at {size}×{size} px (mean = std = 0.5).",
        file=sys.stderr,
    )
    return default_image_processor(size)


#: File suffixes read as images when a folder is given.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def open_image(path: Path) -> Image.Image:
    if path.is_dir():
        raise CLIError(f"{path}: a folder, not an image file.")
    if not path.is_file():
        raise CLIError(f"{path}: no such file.")
    try:
        with Image.open(path) as img:
            # Grayscale, palette and RGBA images are explained as RGB; any size is resized by the processor.
            return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise CLIError(f"{path}: image too large to open safely ({err}).") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CLIError(f"{path}: not an image file ({err}).") from err
