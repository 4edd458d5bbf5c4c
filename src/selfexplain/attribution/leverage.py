"""Leverage SHAP coalition design: size-stratified sampling without replacement, paired, small sizes exact.

Kernel SHAP estimates the Shapley values by a weighted least-squares fit over sampled coalitions. Which
coalitions are sampled, and how each is weighted, decides how many model evaluations a given accuracy
costs. :func:`leverage_design` is the design of *Leverage SHAP* (Musco & Witter, "Provably Accurate
Shapley Value Estimation via Leverage Score Sampling", ICLR 2025), made deterministic in its counts:

- **Leverage scores.** After the efficiency constraint is projected out, every coalition of size ``s`` has
  statistical leverage proportional to ``1 / C(n, s)`` in the Kernel SHAP regression: every *size* carries
  the same leverage. Sampling proportionally to leverage gives each size ``s = 1 .. n - 1`` the same number
  of evaluations ``e`` (``shap``'s kernel sampling instead puts most of the budget on the sizes near 1 and
  ``n - 1``, whose kernel weight ``(n - 1) / (s (n - s))`` is largest).
- **Small sizes exact.** A size with fewer than ``e`` coalitions is enumerated completely and the others
  share its evaluations (water-filling: ``m_s = min(C(n, s), e)`` with ``sum_s m_s`` the budget). This is
  Musco & Witter's ``min(1, c * leverage)`` inclusion probability, so sizes ``1`` and ``n - 1`` become
  exact once the budget reaches ``(n - 1) * n + 2``.
- **Without replacement, stratified by size.** The ``m_s`` coalitions of a size are distinct and uniformly
  drawn; each carries the Horvitz–Thompson weight ``K_s / m_s``, with ``K_s`` the total kernel mass of the
  size. The weighted Gram matrix and right-hand side of the regression are then unbiased estimates of the
  exact ones, and a fully enumerated size carries exactly its kernel weights (Musco & Witter sample the
  counts as Bernoulli draws; fixing them removes that variance and spends the budget exactly).
- **Paired.** With ``paired=True`` every sampled coalition comes with its complement (Covert & Lee 2021):
  sizes ``s`` and ``n - s`` get the same count, and the odd-order error terms of the fit cancel. At
  ``s = n / 2`` a unit is a coalition and its complement of the same size. An odd budget adds one unpaired
  coalition, drawn uniformly among the undrawn ones of the smallest size that is not complete.

Example:
    >>> generators = [torch.Generator().manual_seed(0)]
    >>> coalitions, weights = leverage_design(16, 150, paired=True, generators=generators)
    >>> coalitions.shape, weights.shape  # rows 0 and 1: the empty and full coalitions
    (torch.Size([1, 150, 16]), torch.Size([1, 148]))
    >>> torch.allclose(weights.sum(dim=1), torch.ones(1, dtype=torch.float64))  # the kernel's total mass
    True
"""

from __future__ import annotations

import math

import torch

from .shapley import _kernel_size_weights, _subsets_of_size

__all__ = ["leverage_design", "level_counts"]

# A size with at most this many candidate coalitions (or at most this many times the number to draw) is
# enumerated and permuted; a larger one is sampled by rejection, where duplicates are then rare.
_ENUMERATE_BELOW = 4096
_ENUMERATE_FACTOR = 4
_MAX_REJECTION_ROUNDS = 64


def leverage_design(
    num_players: int, budget: int, paired: bool, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalitions ``(B, M, n)`` and their regression weights ``(B, M - 2)`` for every image (Leverage SHAP).

    Same layout as the ``shap``-style design of :mod:`selfexplain.attribution.shapley`, so the same
    constrained least-squares solver applies: rows 0 and 1 of every image are the empty and full coalitions,
    ``M = min(budget, 2**n)``, and the weights (which cover rows ``2 ..``) sum to 1, the kernel's total mass
    over sizes ``1 .. n - 1``. Every image draws its coalitions from its own generator, in a fixed order, so
    its design does not depend on the other images of the call.
    """
    n = num_players
    budget = min(budget, 2**n)
    units, extra_size = level_counts(n, budget - 2, paired)
    size_weight = _kernel_size_weights(n)
    fixed = torch.stack([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    coalitions, weights = [], []
    for generator in generators:
        sampled = _draw_design(n, units, extra_size, paired, generator)
        sizes = sampled.sum(dim=1)
        per_size = torch.bincount(sizes, minlength=n + 1).to(torch.float64)
        # Horvitz–Thompson: each of the m_s coalitions of size s stands for C(n, s) / m_s of them.
        weights.append(size_weight[sizes] / per_size[sizes])
        coalitions.append(torch.cat([fixed, sampled]))
    return torch.stack(coalitions), torch.stack(weights)


def level_counts(num_players: int, evaluations: int, paired: bool) -> tuple[list[int], int | None]:
    """How many draws each size gets: leverage-score (equal) allocation, water-filled under the size counts.

    Returns ``(units, extra_size)``. ``units[k]`` is the number of draws of size ``k`` (index 0 unused): with
    ``paired`` a draw is a coalition and its complement (two evaluations) and only sizes ``k <= n / 2`` are
    listed; otherwise a draw is one coalition. ``extra_size`` is the size of the one unpaired coalition that
    an odd ``evaluations`` adds when paired (else ``None``). The counts spend ``evaluations`` exactly, never
    exceed the number of coalitions of a size, and fill the sizes evenly: each size ``s`` gets
    ``min(C(n, s), e)`` evaluations up to rounding.

    Example:
        >>> level_counts(4, 8, paired=True)  # 3 pairs of sizes 1 and 3, 1 pair of size 2: 3, 2, 3 evaluations
        ([0, 3, 1], None)
    """
    n = num_players
    sizes = list(range(1, n // 2 + 1)) if paired else list(range(1, n))
    capacity = [_unit_capacity(n, k, paired) for k in sizes]
    cost = 2 if paired else 1
    # Units (draws) per size at the water level e: a half-size unit fills its size twice as fast.
    share = [0.5 if paired and 2 * k == n else 1.0 for k in sizes]
    level = _water_level([c / s for c, s in zip(capacity, share, strict=True)], evaluations / cost, share)
    targets = [min(float(c), level * s) for c, s in zip(capacity, share, strict=True)]
    units = [math.floor(t + 1e-9) for t in targets]
    left = evaluations - cost * sum(units)
    # Largest remainders first (ties: the smaller size), one unit at a time, never past a size's capacity.
    order = sorted(range(len(sizes)), key=lambda i: (-(targets[i] - units[i]), sizes[i]))
    while left >= cost and any(units[i] < capacity[i] for i in order):
        for i in order:
            if left >= cost and units[i] < capacity[i]:
                units[i] += 1
                left -= cost
    extra_size = None
    if left == 1:  # odd budget, paired: one unpaired coalition from the smallest size with room for it
        extra_size = next(k for k, u, c in zip(sizes, units, capacity, strict=True) if u < c)
    return [0, *units] if sizes else [0], extra_size


def _unit_capacity(num_players: int, size: int, paired: bool) -> int:
    """Distinct draws a size offers: its coalitions, or its complement pairs (half of them at ``n / 2``)."""
    count = math.comb(num_players, size)
    return count // 2 if paired and 2 * size == num_players else count


def _water_level(capacity: list[float], total: float, share: list[float]) -> float:
    """``e`` with ``sum_k min(capacity_k, e) * share_k == total`` (``inf`` when everything fits)."""
    remaining, open_share = total, sum(share)
    for cap, part in sorted(zip(capacity, share, strict=True)):
        if cap * open_share <= remaining + 1e-9:
            remaining -= cap * part
            open_share -= part
        else:
            return remaining / open_share
    return math.inf


def _draw_design(
    num_players: int, units: list[int], extra_size: int | None, paired: bool, generator: torch.Generator
) -> torch.Tensor:
    """The sampled rows of one image: every size's draws (ascending sizes), then the unpaired extra."""
    n = num_players
    blocks = []
    for size, count in enumerate(units):
        if count == 0:
            continue
        half = paired and 2 * size == n
        drawn = _distinct_subsets(n, size, count, generator, canonical=half)
        blocks.append(torch.stack([drawn, ~drawn], dim=1).reshape(-1, n) if paired else drawn)
    if extra_size is not None:
        taken = torch.cat(blocks) if blocks else torch.zeros(0, n, dtype=torch.bool)
        taken = taken[taken.sum(dim=1) == extra_size]
        blocks.append(_distinct_subsets(n, extra_size, 1, generator, exclude=taken))
    return torch.cat(blocks) if blocks else torch.zeros(0, n, dtype=torch.bool)


def _distinct_subsets(
    num_players: int,
    size: int,
    count: int,
    generator: torch.Generator,
    canonical: bool = False,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """``count`` distinct coalitions of ``size`` players, uniformly without replacement, as ``(count, n)`` masks.

    ``canonical`` draws complement pairs of a half-size: each pair is represented by its member holding
    player 0. ``exclude`` rows are never drawn. A small size is enumerated and randomly permuted; a large one
    is sampled by rejection (the first ``count`` distinct draws of i.i.d. uniform draws are a uniform sample
    without replacement).
    """
    n = num_players
    candidates = math.comb(n - 1, size - 1) if canonical else math.comb(n, size)
    if exclude is not None:
        candidates -= len(exclude)
    if count > candidates:
        raise ValueError(f"cannot draw {count} distinct coalitions of size {size} from {candidates}.")
    if count == candidates and exclude is None:  # complete: no randomness needed
        subsets = _subsets_of_size(n, size)
        return subsets[subsets[:, 0]] if canonical else subsets
    if candidates <= max(_ENUMERATE_BELOW, _ENUMERATE_FACTOR * count):
        subsets = _subsets_of_size(n, size)
        if canonical:
            subsets = subsets[subsets[:, 0]]
        if exclude is not None and len(exclude):
            subsets = subsets[~_rows_in(subsets, exclude)]
        return subsets[torch.randperm(len(subsets), generator=generator)[:count]]
    return _rejection_subsets(n, size, count, generator, canonical, exclude)


def _rejection_subsets(
    num_players: int,
    size: int,
    count: int,
    generator: torch.Generator,
    canonical: bool,
    exclude: torch.Tensor | None,
) -> torch.Tensor:
    n = num_players
    drawn = torch.zeros(0, n, dtype=torch.bool)
    for _ in range(_MAX_REJECTION_ROUNDS):
        keys = torch.rand(2 * count + 8, n, generator=generator, dtype=torch.float64)
        # The `size` smallest keys of a row pick a uniform subset of that size (keys are distinct a.s.).
        batch = keys <= keys.sort(dim=1).values[:, size - 1 : size]
        if canonical:
            batch = torch.where(batch[:, :1], batch, ~batch)
        if exclude is not None and len(exclude):
            batch = batch[~_rows_in(batch, exclude)]
        drawn = _first_distinct(torch.cat([drawn, batch]))
        if len(drawn) >= count:
            return drawn[:count]
    raise RuntimeError(f"drew fewer than {count} distinct coalitions of size {size}.")  # pragma: no cover


def _first_distinct(rows: torch.Tensor) -> torch.Tensor:
    """The distinct rows of ``rows`` in the order of their first occurrence."""
    if len(rows) == 0:
        return rows
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((len(unique),), len(rows)).scatter_reduce_(
        0, inverse, torch.arange(len(rows)), reduce="amin"
    )
    return rows[first.sort().values]


def _rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(len(rows),)`` bool: whether each row of ``rows`` equals some row of ``table``."""
    return (rows.unsqueeze(1) == table.unsqueeze(0)).all(dim=-1).any(dim=1)
