"""Explanation quality metrics: faithfulness, agreement, localisation, and accuracy.

Every function is pure: tensors in, tensors out, one value per image along the leading dimension, so
that callers decide how to aggregate (mean, per-class breakdown, confidence intervals).

- **Faithfulness without labels** -- :func:`insertion_deletion_auc` removes (deletion) or adds
  (insertion) patches in the order an explanation ranks them and integrates the model's probability
  for the explained class. It needs the model, so it is a plain function only.
- **Agreement with a reference explanation** (e.g. a high-budget Kernel SHAP of the same model) --
  :func:`spearman`, :func:`pearson`, :func:`topk_overlap`.
- **Localisation** where object masks exist -- :func:`pointing_game`, :func:`relevance_mass`.
- **Classification** -- :func:`accuracy`.

The agreement and localisation metrics are also shipped as a local `evaluate` metric
(:func:`load_explanation_metric`), plus an offline accuracy metric (:func:`load_accuracy_metric`),
because ``evaluate.load("accuracy")`` needs the Hugging Face Hub.

Example:
    >>> import torch
    >>> a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    >>> spearman(a, a)
    tensor([1.])
    >>> topk_overlap(a, -a, k=2)
    tensor([0.])
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import evaluate
import torch
from torch import nn

from ..attribution.masking import BaselineKind, grid_to_pixel_mask, make_baseline, mask_images
from ..attribution.model_call import eval_mode, model_device_dtype, model_logits, resolve_target

__all__ = [
    "METRICS_MODULE_DIR",
    "accuracy",
    "insertion_deletion_auc",
    "load_accuracy_metric",
    "load_explanation_metric",
    "pearson",
    "pointing_game",
    "relevance_mass",
    "spearman",
    "topk_overlap",
]

ScoreKind = Literal["probs", "logits"]

#: Folder of the `evaluate` metric scripts shipped inside the package.
METRICS_MODULE_DIR = Path(__file__).parent / "metrics_module"


# ---------------------------------------------------------------------------------------------------------
# Insertion / deletion
# ---------------------------------------------------------------------------------------------------------


def insertion_deletion_auc(
    model: nn.Module,
    pixel_values: torch.Tensor,
    explanations: torch.Tensor,
    baseline: BaselineKind | torch.Tensor = "mean",
    steps: int | None = None,
    batch_size: int = 256,
    target: int | torch.Tensor | None = None,
    value: ScoreKind = "probs",
    return_curves: bool = False,
) -> dict[str, torch.Tensor]:
    """Insertion and deletion AUC of explanations on a patch (player) grid, batched over images and steps.

    Players are ranked by their explanation score, highest first; ties go to the lower row-major index,
    so the ranking is deterministic. *Deletion* starts from the image and replaces players by the baseline
    in rank order; *insertion* starts from the baseline and restores players in rank order. At each of the
    ``steps + 1`` points the model scores the ``target`` class. The AUC is the trapezoid area under that
    curve with the x axis (fraction of players removed/added) normalised to ``[0, 1]``, i.e. the mean
    score along the curve. A faithful explanation has a **low deletion** and a **high insertion** AUC.

    All masked images of all images are pushed through the model in chunks of ``batch_size`` under
    :func:`torch.inference_mode` on the model's device; each chunk is composed just before its forward
    pass, so memory stays bounded by ``batch_size`` images whatever the number of images and steps. The
    model is put in eval mode and its training flag restored afterwards.

    Args:
        model: an image classifier (any `transformers` one, or a module or callable returning logits: see
            :mod:`selfexplain.attribution.model_call`).
        pixel_values: ``(B, C, H, W)`` images, already preprocessed for the model.
        explanations: ``(B, grid_h, grid_w)`` scores per player. Any grid works: it is laid over the image
            with :func:`selfexplain.masking.grid_to_pixel_mask` (it need not be the model's patch grid).
        baseline: what removed pixels show: ``"mean"``, ``"zero"``, ``"blur"`` or a tensor broadcastable
            to ``pixel_values`` (see :func:`selfexplain.masking.make_baseline`).
        steps: number of steps along each curve; ``None`` means one player per step. With fewer steps
            than players, step ``s`` has removed/added the top ``floor(s * n / steps)`` players.
        batch_size: masked images per forward pass.
        target: class to score, an ``int`` for all images or a ``(B,)`` tensor. Defaults to the model's
            predicted class on the original images.
        value: ``"probs"`` scores the softmax probability of ``target`` (the standard metric, in
            ``[0, 1]``), ``"logits"`` its raw logit.
        return_curves: also return the curves and their x axis.

    Returns:
        A dict with ``"insertion"`` and ``"deletion"`` ``(B,)`` AUCs and ``"target"`` ``(B,)`` (the class
        scored), all on ``pixel_values.device``. With ``return_curves=True`` also ``"insertion_curve"``
        and ``"deletion_curve"`` ``(B, steps + 1)`` and ``"fraction"`` ``(steps + 1,)``, the share of
        players added/removed at each point.

    Example:
        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
        ...                    num_attention_heads=4, intermediate_size=128, num_labels=10)
        >>> model = ViTForImageClassification(config)
        >>> images = torch.randn(2, 3, 32, 32)
        >>> maps = torch.randn(2, 8, 8)  # one score per 4x4 patch
        >>> out = insertion_deletion_auc(model, images, maps, baseline="mean", steps=16)
        >>> out["insertion"].shape, out["deletion"].shape
        (torch.Size([2]), torch.Size([2]))
    """
    _check_auc_inputs(model, pixel_values, explanations, batch_size, value)
    num_players = explanations.shape[-2] * explanations.shape[-1]
    steps = num_players if steps is None else steps
    if not 1 <= steps <= num_players:
        raise ValueError(f"`steps` must be between 1 and the number of players ({num_players}), got {steps}.")

    device, dtype = model_device_dtype(model, pixel_values)
    images = pixel_values.to(device=device, dtype=dtype)
    base = make_baseline(images, baseline).to(dtype)
    counts = torch.arange(steps + 1, device=device) * num_players // steps  # players moved at each point
    ranks = _descending_ranks(explanations.to(device).flatten(1))  # (B, n), 0 = most relevant
    # A player is kept after a deletion step while its rank is not yet reached; insertion is the converse.
    removed = ranks.unsqueeze(1) < counts.view(1, -1, 1)  # (B, steps + 1, n)
    grid = explanations.shape[-2:]
    keep = torch.cat([~removed, removed], dim=1).view(images.shape[0], 2 * (steps + 1), *grid)

    with eval_mode(model), torch.inference_mode():
        target = _resolve_target(model, images, target, batch_size)
        scores = _score_coalitions(model, images, base, keep, target, batch_size, value)

    deletion_curve, insertion_curve = scores.split(steps + 1, dim=1)
    fraction = counts.to(torch.float32) / num_players
    out_device = pixel_values.device
    result = {
        "insertion": torch.trapezoid(insertion_curve, fraction, dim=-1).to(out_device),
        "deletion": torch.trapezoid(deletion_curve, fraction, dim=-1).to(out_device),
        "target": target.to(out_device),
    }
    if return_curves:
        result["insertion_curve"] = insertion_curve.to(out_device)
        result["deletion_curve"] = deletion_curve.to(out_device)
        result["fraction"] = fraction.to(out_device)
    return result


def _check_auc_inputs(
    model: nn.Module, pixel_values: torch.Tensor, explanations: torch.Tensor, batch_size: int, value: str
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if pixel_values.ndim != 4:
        raise ValueError(f"`pixel_values` must be (B, C, H, W), got shape {tuple(pixel_values.shape)}.")
    if explanations.ndim != 3 or explanations.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"`explanations` must be (B, grid_h, grid_w) with B = {pixel_values.shape[0]} images, "
            f"got shape {tuple(explanations.shape)}."
        )
    if not torch.isfinite(explanations).all():
        raise ValueError("`explanations` contains NaN or infinite values; they cannot be ranked.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if value not in ("probs", "logits"):
        raise ValueError(f"`value` must be 'probs' or 'logits', got {value!r}.")


def _descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of ``(B, n)`` scores, 0 for the highest; ties go to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def _resolve_target(
    model: nn.Module, images: torch.Tensor, target: int | torch.Tensor | None, batch_size: int
) -> torch.Tensor:
    num_images = images.shape[0]
    if target is None:
        chunks = [model_logits(model, images[i : i + batch_size]) for i in range(0, num_images, batch_size)]
        return torch.cat(chunks).argmax(-1)
    return resolve_target(target, num_images=num_images).to(images.device)


def _score_coalitions(
    model: nn.Module,
    images: torch.Tensor,
    baseline: torch.Tensor,
    keep: torch.Tensor,
    target: torch.Tensor,
    batch_size: int,
    value: ScoreKind,
) -> torch.Tensor:
    """Score of ``target`` for every coalition ``keep`` ``(B, M, gh, gw)``; returns ``(B, M)`` float32."""
    num_images, per_image = keep.shape[:2]
    flat_keep = keep.reshape(num_images * per_image, 1, *keep.shape[2:])
    image_index = torch.arange(num_images, device=images.device).repeat_interleave(per_image)
    scores = torch.empty(num_images * per_image, device=images.device, dtype=torch.float32)
    for start in range(0, scores.numel(), batch_size):
        rows = slice(start, start + batch_size)
        idx = image_index[rows]
        # Composed per chunk (not all at once): B * M full images would not fit in memory for real sizes.
        masked = mask_images(images[idx], baseline[idx], flat_keep[rows])
        logits = model_logits(model, masked).float()
        if value == "probs":
            logits = logits.softmax(-1)
        scores[rows] = logits.gather(-1, target[idx].unsqueeze(-1)).squeeze(-1)
    return scores.view(num_images, per_image)


# ---------------------------------------------------------------------------------------------------------
# Agreement with a reference explanation
# ---------------------------------------------------------------------------------------------------------


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per item between maps ``a`` and ``b`` ``(B, ...)``, flattened after dim 0.

    Ties get their average rank (as in ``scipy.stats.spearmanr``). A constant map has no ranking, so its
    correlation is NaN.

    Example:
        >>> a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> spearman(a, a ** 3), spearman(a, -a)
        (tensor([1.]), tensor([-1.]))
    """
    a, b = _flat_pair(a, b)
    return pearson(_average_ranks(a), _average_ranks(b))


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per item between maps ``a`` and ``b`` ``(B, ...)``, flattened after dim 0.

    Computed in float64 and returned as float32. A constant map gives NaN.

    Example:
        >>> a = torch.tensor([[0.0, 1.0, 5.0]])
        >>> pearson(a, 2 * a + 3)
        tensor([1.])
    """
    a, b = _flat_pair(a, b)
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).float()


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the ``k`` highest entries of ``a`` that are also among the ``k`` highest of ``b``, per item.

    Ties are broken toward the lower flattened index, as in :func:`insertion_deletion_auc`.

    Example:
        >>> a = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
        >>> topk_overlap(a, a, k=2), topk_overlap(a, -a, k=2), topk_overlap(a, a.roll(1, -1), k=2)
        (tensor([1.]), tensor([0.]), tensor([0.5000]))
    """
    a, b = _flat_pair(a, b)
    if not 1 <= k <= a.shape[-1]:
        raise ValueError(f"`k` must be between 1 and the number of entries per map ({a.shape[-1]}), got {k}.")
    in_top_a = _descending_ranks(a) < k
    in_top_b = _descending_ranks(b) < k
    return (in_top_a & in_top_b).sum(-1).float() / k


def _flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"Maps must be batched (B, ...), got shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    a, b = a.flatten(1), b.flatten(1)
    if a.shape != b.shape:
        raise ValueError(
            f"Maps must hold the same number of entries per item, got {tuple(a.shape)} and {tuple(b.shape)} "
            "after flattening."
        )
    return a, b


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ascending ranks of ``(B, n)`` values, 1-based, ties sharing their average rank (float64)."""
    sorted_x, order = torch.sort(x, dim=-1, stable=True)
    batch, n = x.shape
    # Runs of equal values form groups; each group's rank is the mean of the ordinal ranks it spans.
    new_group = torch.ones_like(sorted_x, dtype=torch.long)
    new_group[:, 1:] = (sorted_x[:, 1:] != sorted_x[:, :-1]).long()
    group = new_group.cumsum(-1) - 1 + n * torch.arange(batch, device=x.device).unsqueeze(1)
    ordinal = torch.arange(1, n + 1, device=x.device, dtype=torch.float64).expand(batch, n)
    totals = torch.zeros(batch * n, device=x.device, dtype=torch.float64).index_add_(
        0, group.flatten(), ordinal.flatten()
    )
    sizes = torch.zeros(batch * n, device=x.device, dtype=torch.float64).index_add_(
        0, group.flatten(), torch.ones(batch * n, device=x.device, dtype=torch.float64)
    )
    sorted_ranks = (totals / sizes.clamp_min(1))[group]
    return torch.empty_like(sorted_ranks).scatter_(-1, order, sorted_ranks)


# ---------------------------------------------------------------------------------------------------------
# Localisation
# ---------------------------------------------------------------------------------------------------------


def pointing_game(explanations: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pointing-game hit (1.0) or miss (0.0) per image: does the top-scoring cell point at the object?

    The test is done **at pixel level**: the map's single highest cell (ties go to the first in row-major
    order) is upsampled to the mask's size with :func:`selfexplain.masking.grid_to_pixel_mask` (nearest,
    i.e. the cell's exact pixel footprint, even for grids that do not divide the image), and it is a hit
    when any of its pixels lies on the object. Why pixel level: masks come at pixel resolution, and
    downsampling them to the patch grid would need an arbitrary coverage threshold that drops small
    objects; a patch is the finest resolution the explanation has, so a patch that touches the object is
    pointing at it (the same spirit as the original pointing game's tolerance radius). A pixel-resolution
    map (``grid == mask size``) gives the classic pixel pointing game.

    Args:
        explanations: ``(B, grid_h, grid_w)`` maps.
        masks: ``(B, H, W)`` object masks (bool or 0/1), at any resolution (pixel or patch grid).

    Returns:
        ``(B,)`` float32 tensor of hits; its mean is the pointing-game accuracy.

    Example:
        >>> maps = torch.tensor([[[0.9, 0.1], [0.0, 0.2]]])
        >>> top_left = torch.zeros(1, 4, 4, dtype=torch.bool); top_left[:, :2, :2] = True
        >>> pointing_game(maps, top_left), pointing_game(maps, ~top_left)
        (tensor([1.]), tensor([0.]))
    """
    masks = _check_maps_and_masks(explanations, masks)
    flat = explanations.flatten(1)
    top_cell = torch.zeros_like(flat, dtype=torch.bool)
    top_cell.scatter_(-1, flat.argmax(-1, keepdim=True), True)  # argmax returns the first maximum
    footprint = grid_to_pixel_mask(top_cell.view_as(explanations), masks.shape[-2:]).bool()
    return (footprint & masks).flatten(1).any(-1).float()


def relevance_mass(explanations: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the positive relevance that falls inside the object mask, per image.

    The map is upsampled to the mask's size (nearest: each pixel carries its cell's score, so a cell that
    straddles the mask border counts in proportion to its area inside), negative scores are clipped to 0,
    and ``sum(relevance * mask) / sum(relevance)`` is returned. An image with no positive relevance has
    no mass to share and gives NaN.

    Args:
        explanations: ``(B, grid_h, grid_w)`` maps.
        masks: ``(B, H, W)`` object masks (bool or 0/1).

    Returns:
        ``(B,)`` float32 tensor in ``[0, 1]``.

    Example:
        >>> maps = torch.tensor([[[3.0, 1.0], [-2.0, 0.0]]])
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.bool); mask[:, :2, :2] = True
        >>> relevance_mass(maps, mask)
        tensor([0.7500])
    """
    masks = _check_maps_and_masks(explanations, masks)
    relevance = grid_to_pixel_mask(explanations.float(), masks.shape[-2:]).clamp_min(0)
    inside = (relevance * masks).flatten(1).sum(-1)
    return inside / relevance.flatten(1).sum(-1)


def _check_maps_and_masks(explanations: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if explanations.ndim != 3:
        raise ValueError(
            f"`explanations` must be (B, grid_h, grid_w), got shape {tuple(explanations.shape)}."
        )
    if masks.ndim != 3 or masks.shape[0] != explanations.shape[0]:
        raise ValueError(
            f"`masks` must be (B, H, W) with B = {explanations.shape[0]}, got shape {tuple(masks.shape)}."
        )
    return masks.to(explanations.device).bool()


# ---------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------


def accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of correct predictions, as a 0-dim float32 tensor.

    ``logits_or_preds`` is either class predictions shaped like ``labels`` or logits with one more
    (last) dimension, which are reduced with ``argmax``.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        tensor(0.5000)
        >>> accuracy(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 1, 1]))
        tensor(0.5000)
    """
    if logits_or_preds.ndim == labels.ndim + 1:
        preds = logits_or_preds.argmax(-1)
    elif logits_or_preds.shape == labels.shape:
        preds = logits_or_preds
    else:
        raise ValueError(
            f"`logits_or_preds` must be predictions shaped like `labels` {tuple(labels.shape)} or logits with "
            f"one extra class dimension, got shape {tuple(logits_or_preds.shape)}."
        )
    if labels.numel() == 0:
        raise ValueError("`labels` is empty; accuracy is undefined.")
    return (preds.to(labels.device) == labels).float().mean()


# ---------------------------------------------------------------------------------------------------------
# `evaluate` modules shipped with the package
# ---------------------------------------------------------------------------------------------------------


def load_explanation_metric(config_name: str = "agreement", **kwargs: object) -> evaluate.EvaluationModule:
    """Load the shipped ``explanation_quality`` `evaluate` metric from its file (offline, no Hub).

    Configs: ``"agreement"`` (predictions vs reference maps: spearman, pearson, topk_overlap),
    ``"localization"`` (predictions vs object masks: pointing_game, relevance_mass) and ``"all"``
    (predictions, references and masks: all five). Insertion/deletion need the model and are computed
    with :func:`insertion_deletion_auc` instead. ``kwargs`` go to :func:`evaluate.load`
    (e.g. ``keep_in_memory=True``).

    Example:
        >>> metric = load_explanation_metric("agreement")
        >>> scores = metric.compute(predictions=[[[0.0, 1.0], [2.0, 3.0]]],
        ...                         references=[[[0.0, 1.0], [2.0, 3.0]]])
        >>> round(scores["spearman"], 4)
        1.0
    """
    return evaluate.load(str(METRICS_MODULE_DIR / "explanation_quality.py"), config_name, **kwargs)


def load_accuracy_metric(**kwargs: object) -> evaluate.EvaluationModule:
    """Load the shipped offline ``accuracy`` `evaluate` metric (same inputs/outputs as the Hub's).

    Example:
        >>> load_accuracy_metric().compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]
        0.6666666666666666
    """
    return evaluate.load(str(METRICS_MODULE_DIR / "accuracy.py"), **kwargs)
