"""Shapley values of image patches: exact enumeration and batched Kernel SHAP.

Players are the cells of a ``(grid_h, grid_w)`` grid laid over the image (one ViT patch each, or a group
of patches for a coarser grid). A coalition keeps its players' pixels and shows a baseline elsewhere
(see :mod:`selfexplain.masking`); its value is the model's output on that masked image, for *every*
class at once. One batch of masked forward passes therefore yields the attributions of all classes.

Two estimators share that machinery:

- :func:`exact_shapley_values` enumerates all ``2**n`` coalitions (``n <= 16``). It is the reference the
  estimator is tested against.
- :func:`kernel_shap_values` is Kernel SHAP (Lundberg & Lee, 2017) with a fixed budget of model
  evaluations per image: Shapley-kernel weighted least squares over sampled coalitions, paired sampling,
  and the efficiency constraint ``sum(phi) = f(x) - f(baseline)`` enforced exactly.

The default value of a coalition is the softmax probability (``value="probs"``): probabilities are
bounded, so a few extreme coalitions cannot dominate the least-squares fit, and the attributions of a
class sum to a change in probability, which reads the same for every model and every class. Use
``value="logits"`` for attributions in logit space (e.g. to explain an additive logit model).

Example:
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
    ...                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    >>> model = ViTForImageClassification(config)
    >>> pixel_values = torch.randn(2, 3, 16, 16)
    >>> phi = kernel_shap_values(model, pixel_values, grid=(4, 4), budget=150)
    >>> phi.shape  # (images, classes, grid_h, grid_w)
    torch.Size([2, 3, 4, 4])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from .._progress import progress_bar
from .masking import BaselineKind, make_baseline, mask_images
from .model_call import call_model, eval_mode, logits_of, model_device_dtype
from .token_dropping import RemovalKind, check_removal, token_dropping_values

__all__ = ["MAX_EXACT_PLAYERS", "exact_shapley_values", "kernel_shap_values"]

ValueKind = Literal["probs", "logits"]
VALUE_KINDS: tuple[str, ...] = ("probs", "logits")
SamplerKind = Literal["kernel", "leverage"]
SAMPLER_KINDS: tuple[str, ...] = ("kernel", "leverage")
RidgeKind = Literal["none", "gcv"]
RIDGE_KINDS: tuple[str, ...] = ("none", "gcv")

#: Exact enumeration evaluates ``2**n`` masked images per image; beyond 16 players that is impractical.
MAX_EXACT_PLAYERS = 16

# Drawing candidate coalitions stops after this many rounds even if duplicates kept the budget from
# being filled (only possible when the remaining coalitions are nearly exhausted); see `_sample_coalitions`.
_MAX_SAMPLING_ROUNDS = 64

# Eigenvalues of the weighted Gram matrix below this fraction of the largest count as zero (an
# underdetermined fit); the float64 normal equations resolve directions well above it.
_PINV_RTOL = 1e-10


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def exact_shapley_values(
    model: Callable,
    pixel_values: torch.Tensor,
    grid: tuple[int, int],
    baseline: BaselineKind | torch.Tensor = "mean",
    batch_size: int = 256,
    value: ValueKind = "probs",
    progress: bool = False,
    removal: RemovalKind = "baseline",
) -> torch.Tensor:
    """Exact Shapley values of the grid cells of each image, for every class.

    Evaluates all ``2**n`` coalitions of the ``n = grid_h * grid_w`` players and combines them with the
    Shapley weights ``|S|! (n - |S| - 1)! / n!``. The cost is ``2**n`` forward passes per image, so
    ``n`` is limited to :data:`MAX_EXACT_PLAYERS` (16).

    Args:
        model: an image classifier, e.g. a ``ViTForImageClassification``; called as
            ``model(pixel_values=x)`` when its forward takes ``pixel_values``, else as ``model(x)``. Its
            output must be a tensor of logits or have a ``.logits`` attribute.
        pixel_values: ``(B, C, H, W)`` images, preprocessed as the model expects.
        grid: ``(grid_h, grid_w)`` players; the model's patch grid or a coarser one. It need not divide
            the image: every pixel belongs to the cell it falls in.
        baseline: what removed players show: ``"mean"``, ``"zero"``, ``"blur"`` or a tensor broadcastable
            to ``pixel_values`` (see :func:`selfexplain.masking.make_baseline`).
        batch_size: masked images per forward pass; bounds the memory used.
        value: ``"probs"`` (softmax probabilities, the default) or ``"logits"``.
        progress: show a progress bar over forward passes.
        removal: how a removed player is removed. ``"baseline"`` (the default): its pixels show
            ``baseline``. ``"tokens"``: its patch token is dropped before the encoder (see
            :mod:`selfexplain.attribution.token_dropping`); only for a ``ViTForImageClassification`` or
            ``ViTForSelfExplainingClassification`` with ``grid`` its patch grid, and ``baseline`` is ignored.
            This is a *different value function* (the model never sees baseline pixels; ``f(empty)`` is the
            CLS token alone), so its Shapley values differ from baseline filling's: never mix the two.

    Returns:
        ``(B, num_classes, grid_h, grid_w)`` float32 Shapley values on ``pixel_values``' device. For each
        image and class they sum to ``f(x) - f(baseline)`` (with ``removal="tokens"``: ``f(x) - f(CLS only)``).

    Example:
        >>> phi = exact_shapley_values(model, pixel_values, grid=(2, 2), value="logits")
        >>> phi.shape
        torch.Size([2, 3, 2, 2])
    """
    grid = _check_inputs(pixel_values, grid, batch_size, value)
    num_players = grid[0] * grid[1]
    if num_players > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"exact_shapley_values needs 2**n forward passes per image; grid={grid} has n={num_players} "
            f"players (maximum {MAX_EXACT_PLAYERS}). Use a coarser grid or kernel_shap_values."
        )
    check_removal(removal, model, pixel_values, grid)
    coalitions = _all_coalitions(num_players)  # (2**n, n); row 0 is empty, row -1 is full
    values = _coalition_values(
        model,
        pixel_values,
        coalitions.expand(pixel_values.shape[0], -1, -1),
        grid,
        baseline,
        batch_size,
        value,
        progress,
        removal,
    )  # (B, 2**n, num_classes) float64
    phi = torch.einsum("mi,bmc->bci", _shapley_coefficients(coalitions), values)
    return _to_grid(phi, grid, pixel_values.device)


def kernel_shap_values(
    model: Callable,
    pixel_values: torch.Tensor,
    grid: tuple[int, int],
    budget: int = 150,
    baseline: BaselineKind | torch.Tensor = "mean",
    seed: int | Sequence[int] = 0,
    batch_size: int = 256,
    paired: bool = True,
    value: ValueKind = "probs",
    progress: bool = False,
    removal: RemovalKind = "baseline",
    sampler: SamplerKind = "kernel",
    control_variate: bool = False,
    ridge: RidgeKind = "none",
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel SHAP estimates of the Shapley values of the grid cells, for every image and class at once.

    Each image gets ``budget`` model evaluations (the empty and full coalitions included). All classes
    are fitted together from the same masked forward passes: one weighted least-squares problem per image
    with one right-hand side per class, solved batched over images.

    Sampling follows the ``shap`` library's ``KernelExplainer``. Coalition sizes are visited from the
    outside in (sizes ``1`` and ``n - 1``, then ``2`` and ``n - 2``, ...); a size pair is enumerated
    completely while the remaining budget covers its expected number of draws, and those coalitions get
    their exact Shapley-kernel weight. The rest of the budget is sampled: sizes from the Shapley-kernel
    distribution over the remaining sizes, members uniformly, and with ``paired=True`` every sampled
    coalition is evaluated together with its complement (antithetic sampling, which cancels the
    odd-order error terms; unlike ``shap``, half-size coalitions are paired too). A coalition drawn
    twice is evaluated once and counted twice. When the budget
    is at least ``2**n`` every coalition is enumerated and the result is the exact Shapley value.

    The fit is the constrained problem ``min sum_S k(S) (f(S) - f(empty) - sum_{i in S} phi_i)^2``
    subject to ``sum_i phi_i = f(x) - f(empty)``, solved in the constraint's null space, so efficiency
    holds exactly. With fewer than ``n + 1`` evaluations the system is underdetermined and the solution
    closest to the equal split ``(f(x) - f(empty)) / n`` is returned.

    Seeding: the random coalitions of each image come from its own ``torch.Generator`` on the CPU. An int
    ``seed`` gives image ``i`` of the call the stream ``(seed, i)``; a sequence gives one seed per image
    (e.g. dataset indices), which makes an image's estimate independent of the call it was computed in.
    The coalitions never depend on ``batch_size`` or on the device, so neither do the results, up to float
    rounding (on some CPUs, e.g. MKL with AVX-512, a forward pass rounds differently at another batch size).

    Args:
        model: an image classifier, e.g. a ``ViTForImageClassification``; called as
            ``model(pixel_values=x)`` when its forward takes ``pixel_values``, else as ``model(x)``. Its
            output must be a tensor of logits or have a ``.logits`` attribute.
        pixel_values: ``(B, C, H, W)`` images, preprocessed as the model expects.
        grid: ``(grid_h, grid_w)`` players; the model's patch grid or a coarser one.
        budget: model evaluations per image, including the full and empty coalitions (``>= 2``). At most
            ``2**n`` are used.
        baseline: ``"mean"``, ``"zero"``, ``"blur"`` or a tensor broadcastable to ``pixel_values``.
        seed: an int, or one int per image (see above).
        batch_size: masked images per forward pass; bounds the memory used.
        paired: evaluate every sampled coalition together with its complement.
        value: ``"probs"`` (softmax probabilities, the default) or ``"logits"``.
        progress: show a progress bar over forward passes.
        removal: how a removed player is removed. ``"baseline"`` (the default): its pixels show
            ``baseline``. ``"tokens"``: its patch token is dropped before the encoder, so a forward pass costs
            in proportion to the kept tokens (see :mod:`selfexplain.attribution.token_dropping`); only for a
            ``ViTForImageClassification`` or ``ViTForSelfExplainingClassification`` with ``grid`` its patch
            grid, and ``baseline`` is ignored. The coalitions and weights are the same as with
            ``"baseline"`` (same ``seed``, same design); only the value function differs. It *is* a
            different value function (the model never sees baseline pixels; ``f(empty)`` is the CLS token
            alone), so its attributions differ from baseline filling's: never mix the two, e.g. as the
            targets of one training run or in one comparison.
        sampler: ``"kernel"`` (the default: ``shap``'s design, above) or ``"leverage"``: Leverage SHAP's
            design (every coalition size gets the same number of evaluations, small sizes enumerated,
            coalitions drawn without replacement and weighted by Horvitz–Thompson; see
            :mod:`selfexplain.attribution.leverage`).
        control_variate: with ``value="probs"``, fit a softmax-of-additive-logits surrogate to the same
            evaluations and use it as a control variate (see :mod:`selfexplain.attribution.control_variate`):
            no extra model evaluation; smaller errors only where the logits are much closer to additive than
            the probabilities (not on the MNIST ViT of the benchmarks). Exact at full budget and efficient.
        ridge: ``"none"`` (the default: the plain least-squares fit) or ``"gcv"``: a ridge penalty towards the
            equal split, its strength chosen per image and class by generalised cross-validation (see
            :mod:`selfexplain.attribution.ridge`). It removes the error peak of the plain fit near ``2n``
            evaluations (``n`` players: at 64 players, 128 evaluations do worse than 64 without it) and
            leaves large budgets essentially unchanged; still efficient, and exact when every coalition is
            evaluated. In between it shrinks the values' scale somewhat (a map's Pearson or ranking does not
            see that; the values' L2 error does: ``docs/results/kernel_shap_equal_error.md``). Not with
            ``control_variate``.
        prior: with ``ridge="gcv"``, a ``(B, num_classes, grid_h, grid_w)`` estimate to shrink towards instead
            of the equal split, e.g. a self-explaining model's ``explain="all"`` map of the same classifier
            (pooled to ``grid``; any scale: it is refitted to the evaluations, and GCV decides how far to trust
            it, see :mod:`selfexplain.attribution.ridge`). Still efficient, exact when every coalition is
            evaluated, and converging to Kernel SHAP's estimate as the budget grows.

    Returns:
        ``(B, num_classes, grid_h, grid_w)`` float32 attributions on ``pixel_values``' device. For each
        image and class they sum to ``f(x) - f(baseline)`` (with ``removal="tokens"``: ``f(x) - f(CLS only)``).

    Example:
        >>> phi = kernel_shap_values(model, pixel_values, grid=(4, 4), budget=150)
        >>> predicted = model(pixel_values=pixel_values).logits.argmax(-1)
        >>> heatmaps = phi[torch.arange(len(phi)), predicted]  # (B, 4, 4)
    """
    grid = _check_inputs(pixel_values, grid, batch_size, value)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
        raise ValueError(
            f"budget must be an int >= 2 (it counts the full and empty coalitions), got {budget!r}."
        )
    if not isinstance(paired, bool):
        raise TypeError(f"paired must be a bool, got {type(paired).__name__}.")
    check_removal(removal, model, pixel_values, grid)
    _check_estimator(sampler, control_variate, value, ridge)
    _check_prior(prior, ridge, pixel_values.shape[0], grid)
    generators = _image_generators(seed, pixel_values.shape[0])
    num_players = grid[0] * grid[1]

    # Imported here: both modules build on this one's helpers.
    from .control_variate import control_variate_fit
    from .leverage import leverage_design
    from .ridge import solve_ridge_gcv

    design = leverage_design if sampler == "leverage" else _kernel_shap_design
    coalitions, weights = design(num_players, budget, paired, generators)
    values = _coalition_values(
        model, pixel_values, coalitions, grid, baseline, batch_size, value, progress, removal
    )  # (B, M, num_classes) float64; rows 0 and 1 are the empty and full coalitions
    # Every coalition evaluated: the exact values, so no penalty.
    complete = coalitions.shape[1] >= 2**num_players
    if control_variate:
        phi = control_variate_fit(coalitions, weights, values, generators)
    elif ridge == "gcv" and not complete and num_players > 1 and coalitions.shape[1] > 2:
        if prior is not None and prior.shape[1] != values.shape[-1]:
            raise ValueError(f"prior has {prior.shape[1]} classes, the model scores {values.shape[-1]}.")
        phi, _ = solve_ridge_gcv(
            coalitions[:, 2:].to(torch.float64), weights, values[:, 2:], values[:, 0], values[:, 1],
            _sum_zero_basis(num_players),
            None if prior is None else prior.detach().flatten(2).to("cpu", torch.float64),
        )  # fmt: skip
    else:
        phi = _solve_constrained_wls(
            coalitions[:, 2:].to(torch.float64), weights, values[:, 2:], values[:, 0], values[:, 1]
        )
    return _to_grid(phi, grid, pixel_values.device)


# --------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------


def _check_inputs(
    pixel_values: torch.Tensor, grid: tuple[int, int], batch_size: int, value: str
) -> tuple[int, int]:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a (B, C, H, W) tensor, got {shape}.")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no images (batch dimension is 0).")
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid must be a pair of positive ints (grid_h, grid_w), got {grid!r}.")
    height, width = pixel_values.shape[-2:]
    if grid[0] > height or grid[1] > width:
        raise ValueError(
            f"grid={tuple(grid)} is finer than the {height}x{width} image: some players would own no pixel."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if value not in VALUE_KINDS:
        raise ValueError(f"value must be one of {VALUE_KINDS}, got {value!r}.")
    return int(grid[0]), int(grid[1])


def _check_prior(prior: torch.Tensor | None, ridge: str, batch: int, grid: tuple[int, int]) -> None:
    if prior is None:
        return
    if ridge != "gcv":
        raise ValueError('prior needs ridge="gcv" (the prior is the centre of the ridge penalty).')
    if (
        not isinstance(prior, torch.Tensor)
        or prior.ndim != 4
        or prior.shape[0] != batch
        or prior.shape[2:] != grid
    ):
        shape = tuple(prior.shape) if isinstance(prior, torch.Tensor) else type(prior).__name__
        raise ValueError(
            f"prior must be a (B, num_classes, grid_h, grid_w) = ({batch}, num_classes, {grid[0]}, {grid[1]}) "
            f"tensor, got {shape} (pool a finer map with `pool_to_player_grid`)."
        )
    if not torch.isfinite(prior).all():
        raise ValueError("prior holds non-finite values.")


def _check_estimator(sampler: str, control_variate: bool, value: str, ridge: str = "none") -> None:
    if sampler not in SAMPLER_KINDS:
        raise ValueError(f"sampler must be one of {SAMPLER_KINDS}, got {sampler!r}.")
    if ridge not in RIDGE_KINDS:
        raise ValueError(f"ridge must be one of {RIDGE_KINDS}, got {ridge!r}.")
    if ridge != "none" and control_variate:
        raise ValueError(
            "ridge and control_variate cannot be combined (the control variate has its own fit)."
        )
    if not isinstance(control_variate, bool):
        raise TypeError(f"control_variate must be a bool, got {type(control_variate).__name__}.")
    if control_variate and value != "probs":
        # Its surrogate is the softmax of additive logits; for the logits themselves the only surrogate at
        # hand is additive, and Kernel SHAP already fits additive games exactly.
        raise ValueError(f"control_variate=True needs value='probs', got value={value!r}.")


def _image_generators(seed: int | Sequence[int], num_images: int) -> list[torch.Generator]:
    """One CPU generator per image, so an image's coalitions don't depend on its neighbours in the batch."""
    per_image = isinstance(seed, Sequence)
    seeds = list(seed) if per_image else [seed]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise TypeError(f"seed must be an int or a sequence of ints (one per image), got {seed!r}.")
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative, got {seed!r}.")
    if per_image and len(seeds) != num_images:
        raise ValueError(f"seed has {len(seeds)} entries but pixel_values has {num_images} images.")
    if per_image:
        sequences = [np.random.SeedSequence(s) for s in seeds]
    else:
        # spawn_key keeps the (seed, i) streams apart from (seed + 1, i - 1): loops may pass seed=step.
        sequences = [np.random.SeedSequence(seed, spawn_key=(i,)) for i in range(num_images)]
    generators = []
    for sequence in sequences:
        state = int(sequence.generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)
        generators.append(torch.Generator(device="cpu").manual_seed(state))
    return generators


# --------------------------------------------------------------------------------------------------------
# Exact enumeration
# --------------------------------------------------------------------------------------------------------


def _all_coalitions(num_players: int) -> torch.Tensor:
    """``(2**n, n)`` boolean masks; row ``m`` holds the binary digits of ``m`` (player 0 = lowest bit)."""
    codes = torch.arange(2**num_players).unsqueeze(1)
    return (codes >> torch.arange(num_players)) & 1 == 1


def _shapley_coefficients(coalitions: torch.Tensor) -> torch.Tensor:
    """``(2**n, n)`` matrix ``A`` with ``phi = A^T v``.

    ``phi_i = sum_{S not containing i} w(|S|) (v(S + i) - v(S))`` with ``w(s) = s! (n-s-1)! / n!``, so
    every coalition ``S`` enters ``phi_i`` with ``+w(|S| - 1)`` if ``i`` is in ``S`` and ``-w(|S|)``
    otherwise.
    """
    n = coalitions.shape[1]
    sizes = torch.arange(n, dtype=torch.float64)
    weight = torch.exp(
        torch.lgamma(sizes + 1) + torch.lgamma(n - sizes) - math.lgamma(n + 1)
    )  # w(s), s = 0..n-1
    size = coalitions.sum(dim=1)
    plus = weight[(size - 1).clamp(min=0)].unsqueeze(1)
    minus = weight[size.clamp(max=n - 1)].unsqueeze(1)
    return torch.where(coalitions, plus, -minus)


# --------------------------------------------------------------------------------------------------------
# Kernel SHAP: coalition design (sampling and weights)
# --------------------------------------------------------------------------------------------------------


def _kernel_shap_design(
    num_players: int, budget: int, paired: bool, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalitions ``(B, M, n)`` and their kernel weights ``(B, M - 2)`` for every image.

    Rows 0 and 1 of every image are the empty and full coalitions (the weights cover the other rows).
    Fully enumerated size pairs are shared by all images; the sampled rows are drawn per image. Every
    image gets the same number of rows ``M = min(budget, 2**n)``.
    """
    n = num_players
    budget = min(budget, 2**n)
    size_weight = _kernel_size_weights(n)  # (n + 1,), sums to 1 over sizes 1..n-1
    enumerated, enumerated_weights, left, weight_left, next_size = _enumerate_size_pairs(
        n, budget - 2, size_weight
    )
    fixed = torch.cat([torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool), enumerated])
    coalitions, weights = [], []
    for generator in generators:
        sampled, counts = _sample_coalitions(n, left, next_size, size_weight, paired, generator)
        coalitions.append(torch.cat([fixed, sampled]))
        # The sampled rows share the kernel mass of the sizes that were not enumerated, by draw count.
        sampled_weights = weight_left * counts / counts.sum().clamp(min=1.0)
        weights.append(torch.cat([enumerated_weights, sampled_weights]))
    return torch.stack(coalitions), torch.stack(weights)


def _kernel_size_weights(num_players: int) -> torch.Tensor:
    """Total Shapley-kernel mass of each coalition size: ``(n - 1) / (s (n - s))``, normalised, 0 at the ends."""
    n = num_players
    weights = torch.zeros(n + 1, dtype=torch.float64)
    if n > 1:
        sizes = torch.arange(1, n, dtype=torch.float64)
        weights[1:n] = (n - 1) / (sizes * (n - sizes))
        weights /= weights.sum()
    return weights


def _enumerate_size_pairs(
    num_players: int, budget_left: int, size_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, float, int]:
    """Enumerate complete size pairs ``(k, n - k)``, from the outside in, while the budget allows.

    A pair is enumerated when the budget left would, in expectation, draw at least as many coalitions from
    it as it contains (the ``shap`` rule); each enumerated coalition then carries its exact kernel weight.

    Returns the enumerated coalitions, their weights, the budget and kernel mass left for sampling, and the
    first size that was not enumerated.
    """
    n = num_players
    masks, weights = [torch.zeros(0, n, dtype=torch.bool)], [torch.zeros(0, dtype=torch.float64)]
    weight_left = 1.0
    size = 1
    while size <= n // 2 and budget_left > 0:
        pair_weight, pair_count = _size_pair_mass(n, size, size_weight), _size_pair_count(n, size)
        if budget_left * pair_weight / weight_left < pair_count - 1e-8:
            break
        subsets = _subsets_of_size(n, size)
        both = subsets if 2 * size == n else torch.cat([subsets, ~subsets])
        masks.append(both)
        weights.append(size_weight[both.sum(dim=1)] / math.comb(n, size))
        budget_left -= pair_count
        weight_left -= pair_weight
        size += 1
    return torch.cat(masks), torch.cat(weights), budget_left, max(weight_left, 0.0), size


def _size_pair_mass(num_players: int, size: int, size_weight: torch.Tensor) -> float:
    if 2 * size == num_players:
        return float(size_weight[size])
    return float(size_weight[size] + size_weight[num_players - size])


def _size_pair_count(num_players: int, size: int) -> int:
    count = math.comb(num_players, size)
    return count if 2 * size == num_players else 2 * count


def _subsets_of_size(num_players: int, size: int) -> torch.Tensor:
    """All ``C(n, size)`` coalitions of ``size`` players as ``(C(n, size), n)`` masks, in lexicographic order.

    Built one member at a time, each step vectorised over the partial combinations (``torch.combinations``
    would materialise ``n ** size`` rows first).
    """
    n = num_players
    members = torch.arange(n - size + 1).unsqueeze(1)
    for position in range(1, size):
        last = members[:, -1]
        # The next member is above the last one and leaves room for the members still to come.
        choices = n - size + position - last
        rows = members.repeat_interleave(choices, dim=0)
        offset = torch.arange(len(rows)) - (torch.cumsum(choices, 0) - choices).repeat_interleave(choices)
        members = torch.cat([rows, (rows[:, -1] + 1 + offset).unsqueeze(1)], dim=1)
    masks = torch.zeros(len(members), n, dtype=torch.bool)
    return masks.scatter_(1, members, True)


def _sample_coalitions(
    num_players: int,
    budget_left: int,
    first_size: int,
    size_weight: torch.Tensor,
    paired: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``budget_left`` distinct coalitions of sizes ``first_size .. n - first_size``.

    A draw is a *unit*: with ``paired`` a coalition of size ``k <= n / 2`` and its complement, otherwise a
    single coalition. Units are drawn in rounds; a unit drawn again before the budget is filled is not
    evaluated again but counted again (its weight grows), as in ``shap``. If the budget is odd and
    ``paired``, the last unit contributes only its first member.

    Returns ``(budget_left, n)`` masks and their draw counts. In the (practically unreachable) case that
    duplicates exhaust all rounds, the missing rows are filled with zero-count copies of the full coalition.
    """
    n = num_players
    sizes, probs = _sampling_sizes(n, first_size, size_weight, paired)
    if budget_left <= 0 or sizes.numel() == 0:
        return torch.zeros(0, n, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    cost = 2 if paired else 1
    per_round = max(budget_left, 32)
    drawn = torch.zeros(0, n, dtype=torch.bool)
    for _ in range(_MAX_SAMPLING_ROUNDS):
        drawn = torch.cat([drawn, _draw_units(n, sizes, probs, per_round, paired, generator)])
        units, unit_of_draw = torch.unique(drawn, dim=0, return_inverse=True)
        draw_index = torch.arange(len(drawn))
        first_draw = torch.full((len(units),), len(drawn)).scatter_reduce_(
            0, unit_of_draw, draw_index, reduce="amin"
        )
        evaluations = torch.cumsum((first_draw[unit_of_draw] == draw_index).long() * cost, dim=0)
        if evaluations[-1] >= budget_left:
            break
    # Draws up to the one that fills the budget count; later draws are discarded.
    filled = bool(evaluations[-1] >= budget_left)
    last = int(torch.searchsorted(evaluations, budget_left)) if filled else len(drawn) - 1
    counts = torch.bincount(unit_of_draw[: last + 1], minlength=len(units)).to(torch.float64)
    order = first_draw.argsort()  # keep units in the order they were first drawn
    used = order[counts[order] > 0]
    masks, unit_counts = units[used], counts[used]
    if paired:
        masks = torch.stack([masks, ~masks], dim=1).reshape(-1, n)
        unit_counts = unit_counts.repeat_interleave(2)
    masks, unit_counts = masks[:budget_left], unit_counts[:budget_left]
    missing = budget_left - len(masks)
    if missing > 0:
        masks = torch.cat([masks, torch.ones(missing, n, dtype=torch.bool)])
        unit_counts = torch.cat([unit_counts, torch.zeros(missing, dtype=torch.float64)])
    return masks, unit_counts


def _sampling_sizes(
    num_players: int, first_size: int, size_weight: torch.Tensor, paired: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sizes a unit can be drawn with, and their probabilities (the kernel mass each unit size covers)."""
    n = num_players
    if paired:
        sizes = torch.arange(first_size, n // 2 + 1)
        mass = torch.tensor([_size_pair_mass(n, int(k), size_weight) for k in sizes], dtype=torch.float64)
    else:
        sizes = torch.arange(first_size, max(first_size, n - first_size + 1))
        mass = size_weight[sizes]
    return sizes, mass / mass.sum() if mass.numel() else mass


def _draw_units(
    num_players: int,
    sizes: torch.Tensor,
    probs: torch.Tensor,
    count: int,
    paired: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """``count`` random coalitions: size from ``probs``, then members uniformly (smallest random keys)."""
    size = sizes[torch.multinomial(probs, count, replacement=True, generator=generator)]
    keys = torch.rand(count, num_players, generator=generator, dtype=torch.float64)
    # The `size` smallest keys of a row pick a uniform subset of that size (keys are distinct a.s.).
    threshold = keys.sort(dim=1).values.gather(1, (size - 1).unsqueeze(1))
    masks = keys <= threshold
    if paired:
        # A half-size coalition and its complement form the same unit; store the member that holds player 0.
        masks = torch.where(((2 * size == num_players) & ~masks[:, 0]).unsqueeze(1), ~masks, masks)
    return masks


# --------------------------------------------------------------------------------------------------------
# Kernel SHAP: the constrained weighted least squares
# --------------------------------------------------------------------------------------------------------


def _solve_constrained_wls(
    coalitions: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor,
    empty_value: torch.Tensor,
    full_value: torch.Tensor,
) -> torch.Tensor:
    """Solve ``min sum_m w_m ||v_m - v_empty - z_m phi||^2`` s.t. ``sum(phi) = v_full - v_empty``, batched.

    Args:
        coalitions: ``(B, M, n)`` float64 masks ``z_m``.
        weights: ``(B, M)`` kernel weights.
        values: ``(B, M, C)`` coalition values, one right-hand side per class.
        empty_value, full_value: ``(B, C)``.

    Returns:
        ``(B, C, n)`` attributions.

    ``phi = total / n + Q a`` with ``Q`` an orthonormal basis of the sum-zero subspace satisfies the
    constraint for every ``a``; ``a`` is the minimum-norm least-squares solution, so an underdetermined
    fit falls back to the equal split instead of favouring one player (as eliminating a variable would).
    """
    batch, _, n = coalitions.shape
    total = full_value - empty_value  # (B, C)
    phi = (total / n).unsqueeze(1).expand(batch, n, total.shape[1])  # (B, n, C)
    if n > 1 and coalitions.shape[1] > 0:
        basis = _sum_zero_basis(n)  # (n, n - 1)
        target = values - empty_value.unsqueeze(1) - coalitions.sum(-1, keepdim=True) * phi[:, :1]
        design = coalitions @ basis  # (B, M, n - 1)
        weighted = design.mT * weights.unsqueeze(1)
        # Normal equations with a pseudo-inverse: the minimum-norm solution, like lstsq, but a batch of
        # small symmetric eigenproblems is far faster (and steadier) on CPU than batched LAPACK lstsq.
        gram_inverse = torch.linalg.pinv(weighted @ design, hermitian=True, rtol=_PINV_RTOL)
        phi = phi + basis @ (gram_inverse @ (weighted @ target))
    return phi.transpose(1, 2)


def _sum_zero_basis(num_players: int) -> torch.Tensor:
    """Orthonormal ``(n, n - 1)`` basis of ``{x : sum(x) = 0}`` (the Helmert contrasts)."""
    n = num_players
    k = torch.arange(1, n, dtype=torch.float64)  # column k compares players 0..k-1 with player k
    rows = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    basis = torch.where(rows < k, 1.0, 0.0) - torch.where(rows == k, k, 0.0)
    return basis / torch.sqrt(k * (k + 1))


# --------------------------------------------------------------------------------------------------------
# Running the model on masked images
# --------------------------------------------------------------------------------------------------------


def _coalition_values(
    model: Callable,
    pixel_values: torch.Tensor,
    coalitions: torch.Tensor,
    grid: tuple[int, int],
    baseline: BaselineKind | torch.Tensor,
    batch_size: int,
    value: str,
    progress: bool,
    removal: RemovalKind = "baseline",
) -> torch.Tensor:
    """Values ``(B, M, num_classes)`` (float64, CPU) of the coalitions ``(B, M, n)`` of every image.

    The ``B * M`` masked images are composed and evaluated ``batch_size`` at a time, so memory does not grow
    with the number of coalitions. ``removal="tokens"`` drops the removed patches' tokens instead of filling
    their pixels (:func:`~selfexplain.attribution.token_dropping.token_dropping_values`).
    """
    if removal == "tokens":
        return token_dropping_values(model, pixel_values, coalitions, batch_size, value, progress)
    device, dtype = model_device_dtype(model, pixel_values)
    images = pixel_values.to(device=device, dtype=torch.float32)
    baselines = make_baseline(images, baseline)
    num_images, num_coalitions = coalitions.shape[:2]
    total = num_images * num_coalitions
    values = None
    starts = range(0, total, batch_size)
    with eval_mode(model), torch.inference_mode():
        for start in progress_bar(starts, desc="masked forward passes", disable=not progress):
            flat = torch.arange(start, min(start + batch_size, total))
            image, member = flat // num_coalitions, flat % num_coalitions
            masks = coalitions[image, member].view(-1, 1, *grid).to(device)
            image = image.to(device)
            masked = mask_images(images[image], baselines[image], masks).to(dtype)
            scores = logits_of(call_model(model, masked)).float()
            if value == "probs":
                scores = scores.softmax(dim=-1)
            if values is None:
                values = torch.empty(total, scores.shape[-1], device=device)
            values[start : start + len(flat)] = scores
    return values.to(device="cpu", dtype=torch.float64).view(num_images, num_coalitions, -1)


def _to_grid(phi: torch.Tensor, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(B, C, n)`` float64 -> ``(B, C, grid_h, grid_w)`` float32 on ``device`` (players are row-major)."""
    return phi.reshape(*phi.shape[:2], *grid).to(device=device, dtype=torch.float32)
