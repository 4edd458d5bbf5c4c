"""`fit_alpha`: choose the vector's scale per transformer block on *unlabelled* target images.

The objective needs no labels: the patched model's own faithfulness, insertion − deletion AUC of its own map for
its own predicted class, subject to keeping the unpatched model's predictions (top-1 agreement ≥
``min_agreement``). AdaMerging (Yang et al., ICLR 2024) learns per-layer merging coefficients on unlabelled target
data the same way, with prediction entropy as the label-free objective; here the objective is the one the vector
is for. Search: the best global α on a grid first (the paper's recipe, and the fallback), then coordinate ascent
over the blocks (each block's α on the same grid, the others held), keeping a change only when it raises the
objective and keeps the agreement. Deterministic: no sampling anywhere but the optional image subset (seeded).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel

from .._progress import progress_bar
from ..cards import IMAGE_PROCESSOR_ATTRIBUTE
from ..vectors.alpha import AlphaFit, LayerAlpha, alpha_record
from ..vectors.apply import apply_explanation_vector
from ..vectors.vector import ExplanationVector
from .metrics import insertion_deletion_auc

#: The α values tried, globally and per block.
DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def fit_alpha(
    model: PreTrainedModel | str | os.PathLike,
    vector: ExplanationVector | str | os.PathLike,
    images: torch.Tensor | Sequence[Image.Image],
    *,
    image_processor: Any = None,
    per_layer: bool = True,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    min_agreement: float = 0.97,
    sweeps: int = 1,
    max_images: int | None = 128,
    baseline: str = "mean",
    auc_steps: int = 16,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    resize_position_embeddings: bool = False,
) -> AlphaFit:
    """Choose α (per block, or one global α with ``per_layer=False``) for ``vector`` on ``model`` from unlabelled
    target images: the largest own-map faithfulness with the model's predictions kept.

    Args:
        model: the target classifier: a loaded `ViTForImageClassification` / self-explaining model, or a folder /
            Hub id of one (loaded once, as `apply_explanation_vector` loads it, with its image processor).
        vector: the explanation vector, or a folder / Hub id of one.
        images: preprocessed ``pixel_values`` ``(B, C, H, W)`` or PIL images (then ``image_processor``, or the
            processor `apply_explanation_vector` attached to the model, prepares them). No labels.
        per_layer: search one α per transformer block after the global one.
        grid: the α values tried (must contain 0: the unpatched model is the reference; for a vector whose
            extension reads an inner block, α = 0 is its all-zero extension, whose map is the classifier on that
            block's tokens rather than the model's own map, see `apply_explanation_vector`).
        min_agreement: the share of the unpatched model's top-1 predictions the patched model must keep.
        sweeps: passes of the per-block coordinate ascent.
        max_images: fit on a seeded random subset of this many images (``None``: all).
        baseline, auc_steps, batch_size: as in :func:`selfexplain.evaluation.metrics.insertion_deletion_auc`.
        seed: the subset's seed.
        progress: a progress bar over the candidates.
        resize_position_embeddings: as in `apply_explanation_vector`, for a model at another image size.

    Returns:
        An :class:`AlphaFit`; ``fit.alpha`` is a `LayerAlpha` with ``per_layer`` (or the global float without).

    Example:
        >>> fit = fit_alpha(classifier, vector, unlabelled_images)
        >>> print(fit.alpha, fit.objective, fit.top1_agreement, fit.forward_passes)
        >>> explaining = apply_explanation_vector(classifier, vector, alpha=fit)  # the fit is recorded too
    """
    grid = sorted({float(a) for a in grid})
    if 0.0 not in grid:
        raise ValueError("grid must contain 0.0 (the unpatched model).")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}.")
    if isinstance(vector, (str, os.PathLike)):
        vector = ExplanationVector.from_pretrained(vector)
    if isinstance(model, (str, os.PathLike)):  # once: every candidate below starts from the loaded model
        model = apply_explanation_vector(
            model, vector, alpha=0.0, resize_position_embeddings=resize_position_embeddings
        )
    pixel_values = _pixel_values(model, images, image_processor)
    if max_images is not None and len(pixel_values) > max_images:
        keep = torch.randperm(len(pixel_values), generator=torch.Generator().manual_seed(seed))[:max_images]
        pixel_values = pixel_values[keep.sort().values]
    num_blocks = int(model.config.num_hidden_layers)
    counter = _ForwardCounter()

    with torch.inference_mode():
        reference = apply_explanation_vector(
            model, vector, alpha=0.0, resize_position_embeddings=resize_position_embeddings
        ).eval()
        with counter.watch(reference):
            original = reference(pixel_values, explain=None).logits.argmax(-1)

    cache: dict[tuple[float, ...], dict[str, float]] = {}
    history: list[dict[str, Any]] = []

    def evaluate(alpha: LayerAlpha) -> dict[str, float]:
        key = (*alpha.blocks, alpha.other)
        if key not in cache:
            patched = apply_explanation_vector(
                model,
                vector,
                alpha=alpha if not alpha.is_uniform else alpha.other,
                resize_position_embeddings=resize_position_embeddings,
            )
            patched.eval()
            with torch.inference_mode(), counter.watch(patched):
                out = patched(pixel_values, explain="predicted")
                predicted = out.logits.argmax(-1)
                auc = insertion_deletion_auc(
                    patched,
                    pixel_values,
                    out.explanation,
                    baseline=baseline,
                    target=predicted,
                    steps=auc_steps,
                    batch_size=batch_size,
                )
            cache[key] = {
                "objective": float((auc["insertion"] - auc["deletion"]).mean()),
                "top1_agreement": float((predicted == original).float().mean()),
            }
            history.append({"alpha": alpha_record(alpha), **cache[key]})
            bar.update(1)
        return cache[key]

    # Only groups (blocks, and the tensors outside them) where the vector moves a weight are searched: α on an
    # all-zero group changes nothing (an extension vector's backbone deltas are zero), so the result is the same.
    groups = [*range(num_blocks), "other"]
    labels = LayerAlpha(blocks=tuple(float(i) for i in range(num_blocks)), other=-1.0)
    moving = {int(labels.alpha_for(key)) for key, tensor in vector.tensors.items() if bool(tensor.any())}
    groups = [g for g in groups if (-1 if g == "other" else g) in moving]
    candidates = len(grid) + (sweeps * len(groups) * (len(grid) - 1) if per_layer else 0)
    bar = progress_bar(total=candidates, desc="fit_alpha", unit="α", disable=not progress)
    try:
        scores = {a: evaluate(LayerAlpha.uniform(a, num_blocks)) for a in grid}
        feasible = [a for a in grid if scores[a]["top1_agreement"] >= min_agreement]
        global_alpha = max(feasible, key=lambda a: (scores[a]["objective"], -a)) if feasible else 0.0
        best = LayerAlpha.uniform(global_alpha, num_blocks)
        best_score = scores[global_alpha]
        if per_layer:
            for _ in range(sweeps):
                for group in groups:
                    for value in grid:
                        candidate = _with(best, group, value)
                        if candidate == best:
                            continue
                        score = evaluate(candidate)
                        if (
                            score["top1_agreement"] >= min_agreement
                            and score["objective"] > best_score["objective"] + 1e-6
                        ):
                            best, best_score = candidate, score
    finally:
        bar.close()
    return AlphaFit(
        alpha=best if per_layer else global_alpha,
        objective=best_score["objective"],
        top1_agreement=best_score["top1_agreement"],
        global_alpha=global_alpha,
        global_objective=scores[global_alpha]["objective"],
        unpatched_objective=scores[0.0]["objective"],
        forward_passes=counter.images,
        num_images=len(pixel_values),
        min_agreement=min_agreement,
        history=history,
    )


def _with(alpha: LayerAlpha, group: int | str, value: float) -> LayerAlpha:
    if group == "other":
        return LayerAlpha(alpha.blocks, value)
    blocks = list(alpha.blocks)
    blocks[group] = value
    return LayerAlpha(tuple(blocks), alpha.other)


def _pixel_values(model, images, image_processor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width), got {tuple(images.shape)}."
            )
        return images
    images = list(images)
    if not images:
        raise ValueError("fit_alpha needs at least one image.")
    if not all(isinstance(img, Image.Image) for img in images):
        raise TypeError("images must be a (B, C, H, W) tensor of pixel values or a sequence of PIL images.")
    processor = image_processor or getattr(model, IMAGE_PROCESSOR_ATTRIBUTE, None)
    if processor is None:
        raise ValueError(
            "PIL images need an image processor: pass image_processor=AutoImageProcessor.from_pretrained(model_id)."
        )
    return processor(images=[img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]


class _ForwardCounter:
    """Counts images through a model's forward (every batch the metrics push included)."""

    def __init__(self) -> None:
        self.images = 0

    @contextmanager
    def watch(self, model: torch.nn.Module) -> Iterator[None]:
        def hook(module, args, kwargs) -> None:
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            if isinstance(pixels, torch.Tensor):
                self.images += len(pixels)

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
