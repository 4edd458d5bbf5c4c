"""``selfexplain explain``: predicted labels and heatmap overlays for image files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification
from ..visualize import explanation_to_heatmap, overlay_heatmap
from ._common import CLIError, load_image_processor


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``explain``."""
    p = sub.add_parser("explain", help="Model + image files → predicted labels and heatmap overlay PNGs.")
    p.add_argument("--model", required=True, help="Folder or Hub id of a (self-explaining) ViT classifier.")
    p.add_argument("images", nargs="+", type=Path, help="Image files (PNG, JPEG, ...).")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--revision", default=None)
    p.set_defaults(handler=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> None:
    model = ViTForSelfExplainingClassification.from_pretrained(args.model, revision=args.revision).eval()
    processor = load_image_processor(args.model, model.config, args.revision)
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
