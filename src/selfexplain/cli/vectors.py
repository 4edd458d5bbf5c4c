"""``selfexplain extract-vector`` and ``selfexplain apply``: make an explanation vector, patch a classifier."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from ..cards import IMAGE_PROCESSOR_ATTRIBUTE
from ..data import load_image_dataset
from ..errors import NotAModelError, NotAnExplanationVectorError
from ..evaluation.alpha_fitting import AlphaFit, fit_alpha
from ..hub import publish_folder
from ..vectors.apply import apply_explanation_vector
from ..vectors.config import BASE_MODEL_ATTRIBUTE, DEFAULT_INCLUDE
from ..vectors.vector import ExplanationVector
from ._common import (
    IMAGE_SUFFIXES,
    CLIError,
    add_hub_args,
    check_source,
    load_image_processor,
    load_model,
    open_image,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``extract-vector`` and ``apply``."""
    p = sub.add_parser(
        "extract-vector", help="Self-explaining + prediction-only models → explanation vector folder."
    )
    p.add_argument(
        "--self-explaining", required=True, help="Folder or Hub id of the self-explaining model (λ > 0)."
    )
    p.add_argument(
        "--prediction-only", required=True, help="Folder or Hub id of the prediction-only model (λ = 0)."
    )
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument(
        "--base-model", default=None, help="Id of the shared base (default: read from the models' config)."
    )
    p.add_argument("--base-model-revision", default=None)
    p.add_argument("--alpha", type=float, default=1.0, help="Recommended α stored with the vector.")
    p.add_argument(
        "--include",
        nargs="+",
        default=list(DEFAULT_INCLUDE),
        help="fnmatch patterns of serialized keys to include (default: the backbone and the explanation "
        "extension, if the model has one; `explainer.*` alone stores only an extension).",
    )
    p.add_argument("--exclude", nargs="*", default=[], help="fnmatch patterns of serialized keys to exclude.")
    p.add_argument("--storage-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument(
        "--compression",
        default=None,
        help='Store compactly: "top_k:0.05" (largest 5%% per tensor), "dare:0.9@SEED", "low_rank:8", '
        '"low_rank:8+top_k:0.1" (see VectorCompression). Default: dense.',
    )
    p.add_argument(
        "--source-dataset", default=None, help="Recorded in the vector's provenance and model card."
    )
    add_hub_args(p)
    p.set_defaults(handler=_cmd_extract_vector)

    p = sub.add_parser("apply", help="Model + vector → self-explaining model folder (no training).")
    p.add_argument("--model", required=True, help="Folder or Hub id of a ViT classifier.")
    p.add_argument("--vector", required=True, help="Folder or Hub id of an explanation vector.")
    p.add_argument(
        "--alpha", type=float, default=None, help="Scale of the vector (default: its recommended α)."
    )
    p.add_argument(
        "--fit-alpha-on",
        nargs="+",
        default=None,
        metavar="IMAGES_OR_DATASET",
        help="Choose α per transformer block on these unlabelled target images (files or folders of images, or one "
        "dataset: builtin:<domain>, a local folder/Hub dataset id with --fit-alpha-split): the patched model's own "
        "faithfulness, its predictions kept (see --min-agreement). Overrides --alpha.",
    )
    p.add_argument("--fit-alpha-split", default="validation", help="Dataset split for --fit-alpha-on.")
    p.add_argument("--fit-alpha-max-images", type=int, default=128, help="Images used by --fit-alpha-on.")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.97,
        help="Top-1 predictions --fit-alpha-on must keep (share).",
    )
    p.add_argument(
        "--global-alpha", action="store_true", help="--fit-alpha-on fits one α, not one per block."
    )
    p.add_argument(
        "--resize-position-embeddings",
        action="store_true",
        help="Allow a model at another image size than the vector's (same patch size): the vector's position "
        "embeddings are resized to the model's patch grid, as transformers interpolates them.",
    )
    p.add_argument("--revision", default=None, help="Revision of --model.")
    p.add_argument("--vector-revision", default=None, help="Revision of --vector.")
    p.add_argument("--output-dir", required=True, type=Path)
    add_hub_args(p)
    p.set_defaults(handler=_cmd_apply)


def _cmd_extract_vector(args: argparse.Namespace) -> None:
    check_source(args.self_explaining, "model", "--self-explaining")
    check_source(args.prediction_only, "model", "--prediction-only")
    se = load_model(args.self_explaining, "--self-explaining")
    po = load_model(args.prediction_only, "--prediction-only")
    base = args.base_model or getattr(se.config, BASE_MODEL_ATTRIBUTE, None)
    provenance = {
        "self_explaining": str(args.self_explaining),
        "prediction_only": str(args.prediction_only),
        "explanation_loss_weight": se.config.explanation_loss_weight,
        "explanation_loss": se.config.explanation_loss,
        "include": " ".join(args.include),
    }
    for key in ("selfexplain_source_dataset", "selfexplain_recipe", "selfexplain_targets"):
        if getattr(se.config, key, None) is not None:
            provenance[key.removeprefix("selfexplain_")] = getattr(se.config, key)
    if args.source_dataset:
        provenance["source_dataset"] = args.source_dataset
    vector = ExplanationVector.from_models(
        self_explaining=se,
        prediction_only=po,
        base_model=base,
        base_model_revision=args.base_model_revision,
        include=args.include,
        exclude=args.exclude,
        recommended_alpha=args.alpha,
        provenance=provenance,
    )
    try:
        vector.save_pretrained(
            args.output_dir, storage_dtype=args.storage_dtype, compression=args.compression
        )
    except ValueError as err:  # a malformed --compression: said before anything is written
        raise CLIError(f"--compression {args.compression}: {err}") from err
    print(f"Saved {vector} to {args.output_dir}")
    if args.push_to_hub:
        print(
            vector.push_to_hub(
                args.push_to_hub,
                token=args.token,
                storage_dtype=args.storage_dtype,
                compression=args.compression,
            )
        )


def _cmd_apply(args: argparse.Namespace) -> None:
    check_source(args.model, "model", "--model", revision=args.revision)
    check_source(args.vector, "vector", "--vector", revision=args.vector_revision)
    alpha, fit = args.alpha, None
    try:
        if args.fit_alpha_on:
            alpha = fit = _fit_alpha(args)  # applied as α, recorded in the config and card
            print(
                f"Fitted α on {fit.num_images} unlabelled images ({fit.forward_passes:,} forward passes): {fit.alpha}; "
                f"insertion − deletion {fit.unpatched_objective:.4f} (α = 0) → {fit.global_objective:.4f} (best "
                f"global α = {fit.global_alpha:g}) → {fit.objective:.4f}; top-1 kept {fit.top1_agreement:.3f}"
            )
        model = apply_explanation_vector(
            args.model,
            args.vector,
            alpha=alpha,
            resize_position_embeddings=args.resize_position_embeddings,
            revision=args.revision,
            vector_revision=args.vector_revision,
        )
    except NotAModelError as err:  # found only on the Hub: a vector repo given as --model
        raise CLIError(f"--model {err}") from err
    except NotAnExplanationVectorError as err:
        raise CLIError(f"--vector {err}") from err
    # Weights, config, model card and the source's image processor (carried by `apply_explanation_vector`).
    model.save_pretrained(args.output_dir, repo_id=args.push_to_hub)
    if getattr(model, IMAGE_PROCESSOR_ATTRIBUTE, None) is None:
        print(
            f"warning: {args.model} has no image processor (preprocessor_config.json), so {args.output_dir} has "
            "none either: pipeline() needs one; `selfexplain explain` falls back to a default ViT processor.",
            file=sys.stderr,
        )
    print(
        f"Saved the self-explaining model to {args.output_dir} (α = {fit.alpha if fit is not None else model.config.selfexplain_applied_vector['alpha']})"
    )
    if args.push_to_hub:
        print(
            publish_folder(
                args.output_dir, args.push_to_hub, token=args.token, commit_message="Apply explanation vector"
            )
        )


def _fit_alpha(args: argparse.Namespace) -> AlphaFit:
    if args.fit_alpha_max_images is not None and args.fit_alpha_max_images < 1:
        raise CLIError(f"--fit-alpha-max-images must be at least 1, got {args.fit_alpha_max_images}.")
    if not 0.0 <= args.min_agreement <= 1.0:
        raise CLIError(f"--min-agreement must be in [0, 1], got {args.min_agreement}.")
    model = load_model(args.model, revision=args.revision)
    vector = ExplanationVector.from_pretrained(args.vector, revision=args.vector_revision)
    processor = load_image_processor(args.model, model.config, revision=args.revision)
    return fit_alpha(
        model,
        vector,
        _unlabelled_images(args.fit_alpha_on, args.fit_alpha_split, args.fit_alpha_max_images),
        image_processor=processor,
        per_layer=not args.global_alpha,
        min_agreement=args.min_agreement,
        max_images=args.fit_alpha_max_images,
        resize_position_embeddings=args.resize_position_embeddings,
    )


def _unlabelled_images(sources: list[str], split: str, limit: int | None) -> list[Image.Image]:
    """Image files and folders of images, or one dataset (its image column only: labels are never read)."""
    paths = [Path(s) for s in sources]
    if sources[0].startswith("builtin:") or (len(sources) == 1 and not paths[0].exists()):
        if len(sources) != 1:
            raise CLIError("--fit-alpha-on takes image files and folders, or exactly one dataset.")
        dataset = load_image_dataset(sources[0], split=split)
        if limit is not None and len(dataset) > limit:
            dataset = dataset.shuffle(seed=0).select(range(limit))
        return [img.convert("RGB") for img in dataset["image"]]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    if not files:
        raise CLIError(f"--fit-alpha-on {' '.join(sources)}: no image files found.")
    return [open_image(f) for f in files]
