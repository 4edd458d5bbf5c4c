"""``selfexplain explain``: predicted labels and labelled heatmap overlays for image files.

Each picture is the image at its own resolution (small images are enlarged by a whole factor so that the text
stays readable) with the map of the predicted class over it — red: patches that speak for the class, blue:
against — and the class and its probability written on it. Bad files are reported and skipped; the command
then exits non-zero after explaining the others.

``--refine-budget N`` spends N model evaluations per image on Kernel SHAP (Leverage SHAP's design, the GCV ridge)
shrunk towards the single-pass map (``kernel_shap_values(prior=...)``): on the offline suite's MNIST classifiers 64
evaluations so refined match Kernel SHAP with about 4× as many (docs/results/kernel_shap_prior.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import PretrainedConfig

from ..evaluation.explainers import attention_rollout, standardized_blend
from ..visualize import explanation_to_heatmap, label_image, overlay_heatmap
from ._common import CLIError, load_image_processor, load_model, open_image


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``explain``."""
    p = sub.add_parser(
        "explain", help="Model + image files → predicted labels and labelled heatmap overlay PNGs."
    )
    p.add_argument("--model", required=True, help="Folder or Hub id of a (self-explaining) ViT classifier.")
    p.add_argument("images", nargs="+", type=Path, help="Image files (PNG, JPEG, ...).")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--revision", default=None)
    p.add_argument("--batch-size", type=int, default=16, help="Images per forward pass (default: 16).")
    p.add_argument(
        "--refine-budget",
        type=int,
        default=0,
        help="Refine each map with this many Kernel SHAP evaluations per image, shrunk towards the single-pass "
        "map (0, the default: the single pass alone).",
    )
    p.add_argument(
        "--blend-rollout",
        action="store_true",
        help="Blend each map with the model's attention rollout (per-image z-scores averaged): more faithful than "
        "a transferred map alone on related domains in docs/results/transfer_blend.md, less than an in-domain one.",
    )
    p.set_defaults(handler=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.blend_rollout and args.refine_budget:
        raise CLIError("--blend-rollout and --refine-budget cannot be combined: choose one.")
    if args.refine_budget == 1 or args.refine_budget < 0:
        raise CLIError(
            f"--refine-budget must be 0 (no refinement) or at least 2 evaluations, got {args.refine_budget}."
        )
    model = load_model(args.model, "--model", args.revision).eval()
    trained = explanation_is_trained(args.model, args.revision)
    if not trained and not args.refine_budget:
        print(
            f"warning: {args.model} is a prediction-only model (explanation loss weight 0 or unset, and no "
            "explanation vector applied): its heatmaps are the patch scores of a head never trained to explain, "
            "and mean nothing. Apply a vector first: selfexplain apply --model MODEL --vector VECTOR --output-dir OUT.",
            file=sys.stderr,
        )
    processor = load_image_processor(args.model, model.config, args.revision)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    legend = ["red: for the class, blue: against" if trained else "untrained map: means nothing"]
    if args.refine_budget:  # Kernel SHAP: meaningful whatever the prior (GCV decides how far to trust it)
        legend = ["red: for the class, blue: against", f"refined: {args.refine_budget} evaluations"]
    method = "single pass"
    if args.blend_rollout:
        method = "single pass blended with attention rollout"
        # z-scores: the sign says above or below the image's average, not for or against the class
        legend = ["blended with attention rollout", "red: above the image's average, blue: below"]
    if args.refine_budget:
        method = f"Kernel SHAP, {args.refine_budget} evaluations, prior: the single pass"
    results, failures, used = [], [], set()
    paths = list(args.images)
    for start in range(0, len(paths), args.batch_size):
        batch = []
        for path in paths[start : start + args.batch_size]:
            try:
                batch.append((path, open_image(path)))
            except CLIError as err:
                failures.append(str(err))
                print(f"skipped {err}", file=sys.stderr)
        if not batch:
            continue
        pixel_values = processor(images=[image for _, image in batch], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = model(pixel_values, explain="all" if args.refine_budget else "predicted")
        probabilities = torch.softmax(out.logits.float(), -1)
        classes = out.logits.argmax(-1)
        maps = out.explanation  # (B, gh, gw): the predicted class's
        if args.refine_budget:  # every class's single pass is the prior; the predicted class's refined map
            maps = _refined(model, pixel_values, out.explanation, args.refine_budget)
            maps = maps[torch.arange(len(batch)), classes]
        elif args.blend_rollout:
            maps = standardized_blend(maps, attention_rollout(model, pixel_values))
        for i, (path, image) in enumerate(batch):
            cls = int(classes[i])
            label = model.config.id2label.get(cls, str(cls))
            prob = float(probabilities[i, cls])
            heat = _heatmap(maps[i], image, processor)
            picture = label_image(overlay_heatmap(image, heat, signed=True), [f"{label} {prob:.1%}", *legend])
            png = args.output_dir / _unique_name(path, used)
            picture.save(png)
            results.append(
                {
                    "image": str(path),
                    "label": label,
                    "class_index": cls,
                    "probability": round(prob, 4),
                    "heatmap": str(png),
                    "explanation": method,
                }
            )
            print(f"{path}: {label} ({prob:.1%}) -> {png}")
    (args.output_dir / "predictions.json").write_text(json.dumps(results, indent=2) + "\n")
    if failures:
        raise CLIError(
            f"{len(failures)} of {len(paths)} file(s) could not be explained"
            f"{f' (the other {len(results)} are in {args.output_dir})' if results else ''}:\n  "
            + "\n  ".join(failures)
        )


def _refined(model, pixel_values: torch.Tensor, prior: torch.Tensor, budget: int) -> torch.Tensor:
    """Kernel SHAP of every class on the model's patch grid, with the single-pass maps as the ridge's centre."""
    from ..attribution.shapley import kernel_shap_values

    grid = tuple(prior.shape[-2:])
    return kernel_shap_values(
        model, pixel_values, grid=grid, budget=budget, sampler="leverage", ridge="gcv", prior=prior
    )


def explanation_is_trained(model: str, revision: str | None = None) -> bool:
    """Whether `model`'s explanation means something: trained with an explanation loss weight > 0, or given an
    explanation vector. Read from its raw ``config.json``: the model class fills in a default weight when the
    key is missing (a plain classifier)."""
    config, _ = PretrainedConfig.get_config_dict(model, revision=revision)
    if config.get("selfexplain_applied_vector"):
        return True
    weight = config.get("explanation_loss_weight")
    return isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight != 0


def _heatmap(explanation: torch.Tensor, image: Image.Image, processor) -> torch.Tensor:
    """The map at the image's own resolution, in [-1, 1], placed over the part of the image the model saw."""
    left, top, right, bottom = _seen_region(processor, image.width, image.height)
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(image.width, max(x0 + 1, round(right))), min(image.height, max(y0 + 1, round(bottom)))
    if (x0, y0, x1, y1) == (0, 0, image.width, image.height):
        return explanation_to_heatmap(explanation, image=image, normalize="signed")
    heat = torch.zeros(image.height, image.width)
    heat[y0:y1, x0:x1] = explanation_to_heatmap(explanation, (y1 - y0, x1 - x0), normalize="signed")
    return heat


def _seen_region(processor, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a `width`×`height` image the model sees, `(left, top, right, bottom)` in its pixels: the whole
    image for a processor that only resizes (`ViTImageProcessor`), the centre for one that crops (DeiT's)."""
    resized_w, resized_h = float(width), float(height)
    size = getattr(processor, "size", None)
    if getattr(processor, "do_resize", False) and isinstance(size, dict):
        if size.get("height") and size.get("width"):
            resized_h, resized_w = float(size["height"]), float(size["width"])
        elif size.get("shortest_edge"):
            scale = float(size["shortest_edge"]) / min(width, height)
            resized_w, resized_h = width * scale, height * scale
    crop = getattr(processor, "crop_size", None)
    if not (getattr(processor, "do_center_crop", False) and isinstance(crop, dict) and crop.get("height")):
        return 0.0, 0.0, float(width), float(height)
    crop_h, crop_w = min(float(crop["height"]), resized_h), min(float(crop["width"]), resized_w)
    left, top = (resized_w - crop_w) / 2, (resized_h - crop_h) / 2
    sx, sy = width / resized_w, height / resized_h
    return left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy


def _unique_name(path: Path, used: set[str]) -> str:
    """`<stem>_explanation.png`, numbered when two inputs share a stem (a/x.png and b/x.png, x.png and x.jpg)."""
    name, n = f"{path.stem}_explanation.png", 1
    while name in used:
        n += 1
        name = f"{path.stem}_{n}_explanation.png"
    used.add(name)
    return name
