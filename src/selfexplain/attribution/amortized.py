"""Amortised Shapley supervision: train a single-pass explainer without precomputed targets.

The weighted-least-squares objective of FastSHAP (Jethani et al., ICLR 2022) and ViT-Shapley (Covert, Kim,
Lee, ICLR 2023). For an image x with players 1..n and a value function v (the class probabilities of a
*frozen* classifier on x with the players outside S filled by the baseline), the Shapley values are the
solution of

    min_φ  E_{S ~ p(S)} ‖ v(∅) + Σ_{i∈S} φ_i − v(S) ‖²      subject to   Σ_i φ_i = v(all) − v(∅)

where p(S) is the Shapley kernel: |S| = s with probability ∝ (n − 1) / (s (n − s)), then S uniform among the
subsets of that size. A model that outputs φ for every image in one pass and is trained on this loss
(coalitions sampled afresh, each paired with its complement to halve the variance) converges to the Shapley
values of v, with no Kernel SHAP targets ever computed. Efficiency is enforced additively: the missing mass
(v(all) − v(∅) − Σφ) / n is added to every player before the loss. All classes are fitted at once: one masked
forward pass of the frozen classifier gives the values of every class.

The value of a coalition is a vector: the class probabilities by default (``game="probs"``, the paper's
convention), or, with ``game="representation"``, the value model's final CLS token, the representation its
linear classifier reads (``z(S) = W·r(S) + b``). Shapley values are linear in the game, so an explainer that
outputs the Shapley values of ``r`` (one ``hidden_size`` vector per patch) gives *every* linear head on that
backbone its own logit Shapley values ``W·φ_r``: the supervision no longer depends on the source's label set,
which is what lets an explanation extension trained on one head be read by another.

The explanation of `ViTForSelfExplainingClassification` is on the scale of one whole-image probability per
patch (its patch scores are ``n · φ``: the ``explanation_target_scale="num_players"`` convention of the
target-based loss), so ``φ = explanation / n``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .masking import BaselineKind, make_baseline, mask_images
from .model_call import model_logits

__all__ = [
    "SHAPLEY_GAMES",
    "amortized_shapley_loss",
    "cls_representation",
    "coalition_values",
    "example_generators",
    "shapley_kernel_coalitions",
]

#: What a coalition is worth: the class probabilities, or the backbone's final CLS token (see the module doc).
SHAPLEY_GAMES: tuple[str, ...] = ("probs", "representation")


def shapley_kernel_coalitions(
    num_players: int, num_pairs: int, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """``(len(generators), 2 * num_pairs, num_players)`` bool coalitions drawn from the Shapley kernel.

    Each image draws from its own generator (so its coalitions depend on its own seed only, not on the batch
    it is in); row ``2k + 1`` is the complement of row ``2k``.

    Example:
        >>> coalitions = shapley_kernel_coalitions(64, 8, [torch.Generator().manual_seed(0)])
        >>> coalitions.shape, bool((coalitions[0, 0] ^ coalitions[0, 1]).all())
        (torch.Size([1, 16, 64]), True)
    """
    if num_players < 2 or num_pairs < 1:
        raise ValueError(f"Need at least 2 players and 1 pair, got {num_players} players, {num_pairs} pairs.")
    sizes = torch.arange(1, num_players, dtype=torch.float64)
    size_weight = (num_players - 1) / (sizes * (num_players - sizes))
    size_weight = (size_weight / size_weight.sum()).float()
    rows = []
    for generator in generators:
        size = torch.multinomial(size_weight, num_pairs, replacement=True, generator=generator) + 1
        # The `size` smallest of n uniform keys are a uniform subset of that size.
        keys = torch.rand(num_pairs, num_players, generator=generator)
        threshold = keys.sort(dim=1).values.gather(1, (size - 1).unsqueeze(1))
        kept = keys <= threshold
        rows.append(torch.stack([kept, ~kept], dim=1).reshape(2 * num_pairs, num_players))
    return torch.stack(rows)


def coalition_values(
    model: Callable,
    pixel_values: torch.Tensor,
    coalitions: torch.Tensor,
    grid: tuple[int, int],
    baseline: BaselineKind | torch.Tensor = "mean",
    batch_size: int = 1024,
    game: str = "probs",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class probabilities of ``model`` (or, with ``game="representation"``, its final CLS token) on every
    coalition, on the empty and on the full image.

    Returns ``(values (B, M, K), v_empty (B, K), v_full (B, K))``, float32 on ``pixel_values``' device, with
    ``K`` the number of classes (or ``hidden_size``). The model is the frozen value function: it runs under
    ``torch.no_grad``, ``batch_size`` masked images at a time.
    """
    if game not in SHAPLEY_GAMES:
        raise ValueError(f"`game` must be one of {SHAPLEY_GAMES}, got {game!r}.")

    def value(images: torch.Tensor) -> torch.Tensor:
        if game == "representation":
            return cls_representation(model, images).float()
        return model_logits(model, images).float().softmax(-1)

    batch, num_coalitions, num_players = coalitions.shape
    if num_players != grid[0] * grid[1]:
        raise ValueError(f"Coalitions have {num_players} players, the grid {grid} has {grid[0] * grid[1]}.")
    images = pixel_values.detach()
    filled = make_baseline(images, baseline)
    keep = coalitions.reshape(batch, num_coalitions, *grid).to(images.device)
    per_chunk = max(1, batch_size // num_coalitions)
    chunks = []
    with torch.no_grad():
        for start in range(0, batch, per_chunk):
            rows = slice(start, start + per_chunk)
            masked = mask_images(images[rows], filled[rows], keep[rows])
            chunks.append(value(masked))
        ends = value(torch.cat([filled, images]))
    values = torch.cat(chunks).view(batch, num_coalitions, -1)
    return values, ends[:batch], ends[batch:]


def cls_representation(model: Callable, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(batch, hidden_size)``: the final (normed) CLS token of a 🤗 ViT classifier, the vector its linear
    classifier turns into logits. ``model`` is a ``ViTForImageClassification`` or
    ``ViTForSelfExplainingClassification`` (anything whose ``base_model`` returns ``last_hidden_state``)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(
            f'game="representation" needs a 🤗 ViT classifier (with a `base_model`), got {type(model).__name__}.'
        )
    return base(pixel_values=pixel_values).last_hidden_state[:, 0]


def amortized_shapley_loss(
    phi: torch.Tensor,
    coalitions: torch.Tensor,
    values: torch.Tensor,
    v_empty: torch.Tensor,
    v_full: torch.Tensor,
) -> torch.Tensor:
    """The weighted-least-squares loss of the amortised Shapley objective, efficiency enforced additively.

    Args:
        phi: ``(B, K, n)`` the explainer's Shapley estimates for every class (or every representation
            coordinate; differentiable).
        coalitions: ``(B, M, n)`` bool coalitions from :func:`shapley_kernel_coalitions` (the kernel's
            weights are in how they were sampled, so every coalition counts once).
        values, v_empty, v_full: from :func:`coalition_values`.

    Returns:
        The mean over images and coalitions of ``‖v(∅) + Σ_{i∈S} φ̂_i − v(S)‖²`` summed over the K outputs.
    """
    num_players = phi.shape[-1]
    gap = (v_full - v_empty).to(phi.dtype) - phi.sum(-1)
    efficient = phi + gap.unsqueeze(-1) / num_players
    predicted = v_empty.to(phi.dtype).unsqueeze(1) + coalitions.to(phi.dtype) @ efficient.transpose(1, 2)
    return ((predicted - values.to(phi.dtype)) ** 2).sum(-1).mean()


def example_generators(
    seed: int, epoch: int, indices: Sequence[int], stream: int = 7
) -> list[torch.Generator]:
    """One generator per example from ``(seed, epoch, index)``: an example's coalitions in an epoch do not
    depend on the batch, the process or the number of processes it is trained in. ``stream`` separates
    independent uses of the same ``(seed, epoch, index)``."""
    generators = []
    for index in indices:
        state = np.random.SeedSequence([seed, epoch, int(index), stream]).generate_state(1, dtype=np.uint64)[
            0
        ]
        generators.append(torch.Generator().manual_seed(int(state) & (2**63 - 1)))
    return generators
