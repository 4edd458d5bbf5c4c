"""``selfexplain extract-vector`` and ``selfexplain apply``: make an explanation vector, patch a classifier."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cards import IMAGE_PROCESSOR_ATTRIBUTE
from ..errors import NotAModelError, NotAnExplanationVectorError
from ..hub import publish_folder
from ..vectors.apply import apply_explanation_vector
from ..vectors.config import BASE_MODEL_ATTRIBUTE
from ..vectors.vector import ExplanationVector
from ._common import CLIError, add_hub_args, check_source, load_model


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
        "--include", nargs="+", default=["vit.*"], help="fnmatch patterns of serialized keys to include."
    )
    p.add_argument("--exclude", nargs="*", default=[], help="fnmatch patterns of serialized keys to exclude.")
    p.add_argument("--storage-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
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
    vector.save_pretrained(args.output_dir, storage_dtype=args.storage_dtype)
    print(f"Saved {vector} to {args.output_dir}")
    if args.push_to_hub:
        print(vector.push_to_hub(args.push_to_hub, token=args.token, storage_dtype=args.storage_dtype))


def _cmd_apply(args: argparse.Namespace) -> None:
    check_source(args.model, "model", "--model", revision=args.revision)
    check_source(args.vector, "vector", "--vector", revision=args.vector_revision)
    try:
        model = apply_explanation_vector(
            args.model,
            args.vector,
            alpha=args.alpha,
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
        f"Saved the self-explaining model to {args.output_dir} (α = {model.config.selfexplain_applied_vector['alpha']})"
    )
    if args.push_to_hub:
        print(
            publish_folder(
                args.output_dir, args.push_to_hub, token=args.token, commit_message="Apply explanation vector"
            )
        )
