"""The `selfexplain` command line: from a base model to an explaining classifier.

```
selfexplain pretrain-base   --output-dir runs/base                      # small offline θ0 (built-in domains)
selfexplain shapley-targets --model runs/mnist-pred --dataset mnist --output-dir runs/mnist-targets
selfexplain train           --base runs/base --dataset mnist --explanation-weight 0 --output-dir runs/mnist-pred
selfexplain train           --base runs/base --dataset mnist --targets runs/mnist-targets --explanation-weight 1 ...
selfexplain extract-vector  --self-explaining runs/mnist-se --prediction-only runs/mnist-pred --output-dir runs/vec
selfexplain apply           --model runs/digits-pred --vector runs/vec --output-dir runs/digits-explaining
selfexplain explain         --model runs/digits-explaining image1.png image2.png --output-dir heatmaps
selfexplain experiment      --config configs/demo.json                  # the transfer experiment and its report
selfexplain demo                                                       # the embedded default, a few minutes on CPU
```
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


class CLIError(Exception):
    """A problem with the user's input, reported without a traceback."""


def _add_hub_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", default=None, help="Also push the result to this Hub repo."
    )
    parser.add_argument(
        "--token", default=None, help="Hub token (default: the one saved by `hf auth login`)."
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfexplain",
        description="Self-explaining Vision Transformers and explanation vectors (task arithmetic, no training on the target).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    _add_hub_args(p)

    p = sub.add_parser("apply", help="Model + vector → self-explaining model folder (no training).")
    p.add_argument("--model", required=True, help="Folder or Hub id of a ViT classifier.")
    p.add_argument("--vector", required=True, help="Folder or Hub id of an explanation vector.")
    p.add_argument(
        "--alpha", type=float, default=None, help="Scale of the vector (default: its recommended α)."
    )
    p.add_argument("--revision", default=None, help="Revision of --model.")
    p.add_argument("--vector-revision", default=None, help="Revision of --vector.")
    p.add_argument("--output-dir", required=True, type=Path)
    _add_hub_args(p)

    p = sub.add_parser("explain", help="Model + image files → predicted labels and heatmap overlay PNGs.")
    p.add_argument("--model", required=True, help="Folder or Hub id of a (self-explaining) ViT classifier.")
    p.add_argument("images", nargs="+", type=Path, help="Image files (PNG, JPEG, ...).")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--revision", default=None)

    # Commands whose implementation lives in other modules register themselves here.
    from . import cli_training

    cli_training.register(sub)
    return parser


def _cmd_extract_vector(args: argparse.Namespace) -> None:
    from . import ExplanationVector, ViTForSelfExplainingClassification
    from .apply import BASE_MODEL_ATTRIBUTE

    se = ViTForSelfExplainingClassification.from_pretrained(args.self_explaining)
    po = ViTForSelfExplainingClassification.from_pretrained(args.prediction_only)
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
    from . import apply_explanation_vector
    from .cards import render_model_card

    model = apply_explanation_vector(
        args.model,
        args.vector,
        alpha=args.alpha,
        revision=args.revision,
        vector_revision=args.vector_revision,
    )
    model.save_pretrained(args.output_dir)
    _copy_image_processor(args.model, args.output_dir, args.revision)
    applied = model.config.selfexplain_applied_vector
    card = render_model_card(
        args.push_to_hub or args.output_dir.name,
        base_model=applied.get("vector_base_model"),
        applied_vector=str(args.vector),
        alpha=applied["alpha"],
    )
    card.save(args.output_dir / "README.md")
    print(f"Saved the self-explaining model to {args.output_dir} (α = {applied['alpha']})")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=args.token)
        repo_id = api.create_repo(args.push_to_hub, exist_ok=True).repo_id
        print(
            api.upload_folder(
                repo_id=repo_id, folder_path=args.output_dir, commit_message="Apply explanation vector"
            )
        )


def _copy_image_processor(source: str, output_dir: Path, revision: str | None) -> None:
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError):
        return  # the model came without a processor; nothing to carry over
    processor.save_pretrained(output_dir)


def _load_image_processor(model_id: str, config, revision: str | None = None):
    from transformers import AutoImageProcessor, ViTImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        print(
            f"warning: {model_id} has no image processor; using ViTImageProcessor(size={size}).",
            file=sys.stderr,
        )
        return ViTImageProcessor(size={"height": size, "width": size})


def _cmd_explain(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image, UnidentifiedImageError

    from . import ViTForSelfExplainingClassification, explanation_to_heatmap, overlay_heatmap

    model = ViTForSelfExplainingClassification.from_pretrained(args.model, revision=args.revision).eval()
    processor = _load_image_processor(args.model, model.config, args.revision)
    images = []
    for path in args.images:
        if not path.is_file():
            raise CLIError(f"{path}: no such file.")
        try:
            with Image.open(path) as img:
                # Grayscale, palette and RGBA images are explained as RGB; any size is resized by the processor.
                images.append(img.convert("RGB"))
        except Image.DecompressionBombError as err:
            raise CLIError(f"{path}: image too large to open safely ({err}).") from err
        except (UnidentifiedImageError, OSError) as err:
            raise CLIError(f"{path}: not an image file ({err}).") from err
    args.output_dir.mkdir(parents=True, exist_ok=True)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model(pixel_values)
    heatmaps = explanation_to_heatmap(out.explanation, pixel_values.shape[-2:])
    results = []
    for path, image, cls, heat, logits in zip(
        args.images, images, out.explained_classes, heatmaps, out.logits, strict=True
    ):
        label = model.config.id2label.get(int(cls), str(int(cls)))
        png = args.output_dir / f"{path.stem}_explanation.png"
        overlay_heatmap(image.resize(tuple(pixel_values.shape[-1:-3:-1])), heat).save(png)
        prob = torch.softmax(logits, -1)[cls].item()
        results.append(
            {"image": str(path), "label": label, "probability": round(prob, 4), "heatmap": str(png)}
        )
        print(f"{path}: {label} ({prob:.1%}) -> {png}")
    (args.output_dir / "predictions.json").write_text(json.dumps(results, indent=2) + "\n")


COMMANDS = {"extract-vector": _cmd_extract_vector, "apply": _cmd_apply, "explain": _cmd_explain}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        handler = COMMANDS.get(args.command) or args.handler
        handler(args)
    except CLIError as err:
        parser.exit(2, f"selfexplain {args.command}: error: {err}\n")
    except (OSError, ValueError) as err:
        # Errors about the user's inputs (unknown repo, incompatible vector, ...) read better without a traceback.
        parser.exit(1, f"selfexplain {args.command}: error: {type(err).__name__}: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
