"""Kernel SHAP's regression with a ridge penalty whose strength generalised cross-validation picks.

Kernel SHAP fits ``n - 1`` free coefficients (efficiency fixes the last) to the sampled coalitions. With paired
sampling, ``2n`` evaluations are ``n`` coalition/complement pairs: as many pairs as unknowns, the point where a
least-squares fit interpolates its noise (the peak of "double descent"). On the 8×8 grid of the offline suite a
budget of 128 evaluations then does far *worse* than 64 (Pearson with a converged reference ≈ 0.2 against ≈ 0.5),
whatever the coalition design, and the error stays inflated up to several times ``n`` evaluations.

A ridge penalty ``lam * ||phi - total / n||^2`` (shrinkage towards the equal split, the estimate an empty design
gives) removes the peak. Its strength comes from the evaluations themselves, per image and class, by
generalised cross-validation (Golub, Heath & Wahba 1979): among ``lam = c * mean(diag(G))`` for ``c`` in
:data:`RIDGE_GRID` (0 included), the one minimising ``RSS(lam) / (1 - tr(H(lam)) / M)^2``, with ``G`` the weighted
Gram matrix, ``H`` the fit's hat matrix and ``M`` the coalitions fitted. As the budget grows the residual term
dominates, GCV's choice goes to 0 and the estimate to the unregularised one; a design that enumerates every
coalition is solved without penalty (the exact Shapley values).

**A prior instead of the equal split** (``prior``, e.g. a self-explaining model's single-pass map of the same
classifier). The penalty then pulls towards ``a * prior`` shifted to be efficient, ``a >= 0`` fitted per image and
class to the same evaluations (one weighted least-squares coefficient: the map's scale does not matter, and a
prior pointing the wrong way gets ``a = 0``, the equal split). GCV chooses the strength as before, on a grid that
reaches further (:data:`PRIOR_RIDGE_GRID`): a prior close to the values is worth a strong pull, one far from them
gets little, and at large budgets none, so the estimate still converges to Kernel SHAP's.

Example:
    >>> phi = kernel_shap_values(model, pixel_values, grid=(8, 8), budget=128, sampler="leverage", ridge="gcv")
    >>> prior = self_explaining(pixel_values, explain="all").explanation  # (B, C, 8, 8), any scale
    >>> refined = kernel_shap_values(model, pixel_values, grid=(8, 8), budget=128, sampler="leverage",
    ...                              ridge="gcv", prior=prior)
"""

from __future__ import annotations

import torch

__all__ = ["PRIOR_RIDGE_GRID", "RIDGE_GRID", "solve_ridge_gcv"]

#: Penalty strengths tried, relative to the mean diagonal of the weighted Gram matrix (its mean eigenvalue).
RIDGE_GRID: tuple[float, ...] = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
#: With a prior: one stronger pull too (a good prior can be worth more than the few evaluations fitted; stronger
#: ones, 10-100, won at small budgets too but made GCV over-trust a rough prior at larger ones, on the analytic
#: games of tests/test_shapley_ridge.py).
PRIOR_RIDGE_GRID: tuple[float, ...] = RIDGE_GRID + (3.0,)
# Eigenvalues below this fraction of the largest are treated as zero (the pseudo-inverse's cut-off at lam = 0).
_RTOL = 1e-10


def solve_ridge_gcv(
    coalitions: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor,
    empty_value: torch.Tensor,
    full_value: torch.Tensor,
    basis: torch.Tensor,
    prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The constrained weighted least-squares fit of Kernel SHAP with a GCV-chosen ridge, batched.

    Args:
        coalitions: ``(B, M, n)`` float64 masks (the empty and full coalitions excluded).
        weights: ``(B, M)`` regression weights.
        values: ``(B, M, C)`` coalition values, one right-hand side per class.
        empty_value, full_value: ``(B, C)``.
        basis: ``(n, n - 1)`` orthonormal basis of the sum-zero subspace.
        prior: optional ``(B, C, n)`` values to shrink towards instead of the equal split (any scale: it is
            refitted, see the module docstring).

    Returns:
        ``(B, C, n)`` attributions (each sums to ``full - empty``) and the ``(B, C)`` penalty factors chosen
        (the entries of :data:`RIDGE_GRID`, or of :data:`PRIOR_RIDGE_GRID` with a prior).
    """
    batch, num_rows, n = coalitions.shape
    total = full_value - empty_value  # (B, C)
    equal_split = (total / n).unsqueeze(1)  # (B, 1, C)
    target = values - empty_value.unsqueeze(1) - coalitions.sum(-1, keepdim=True) * equal_split  # (B, M, C)
    design = coalitions @ basis  # (B, M, n - 1)
    grid, prior_dof = RIDGE_GRID, torch.zeros(batch, 1, 1, dtype=torch.float64)
    if prior is not None:
        # The prior's sum-zero part, scaled by a >= 0 fitted to the same evaluations (weighted least squares of
        # the target on it); the centre of the penalty is then equal split + a * that part, efficient as before.
        prior = prior.to(torch.float64)
        centred = (prior - prior.mean(-1, keepdim=True)).transpose(1, 2)  # (B, n, C)
        along = coalitions @ centred  # (B, M, C): what the prior's shape predicts for each coalition
        weighted_along = weights.unsqueeze(-1) * along
        fitted = (weighted_along * target).sum(1) / (weighted_along * along).sum(1).clamp_min(1e-300)
        fitted = fitted.clamp_min(0.0).unsqueeze(1)  # a, (B, 1, C)
        equal_split = equal_split + fitted * centred  # (B, n, C)
        target = target - fitted * along
        # Where the prior got a = 0 the fit is exactly the one without a prior (same grid, same score).
        grid, prior_dof = PRIOR_RIDGE_GRID, (fitted > 0).to(torch.float64)  # a: one more fitted parameter
    weighted = design.mT * weights.unsqueeze(1)
    eigenvalues, eigenvectors = torch.linalg.eigh(weighted @ design)  # (B, n - 1), (B, n - 1, n - 1)
    projected = eigenvectors.mT @ (weighted @ target)  # (B, n - 1, C)
    scale = eigenvalues.sum(-1, keepdim=True) / eigenvalues.shape[-1]  # mean diagonal = mean eigenvalue
    cutoff = _RTOL * eigenvalues.amax(-1, keepdim=True)
    best_score = best_coefficients = best_factor = None
    for factor in grid:
        shifted = eigenvalues + factor * scale
        inverse = torch.where(shifted > cutoff, 1.0 / shifted.clamp_min(cutoff), 0.0)  # (B, n - 1)
        coefficients = eigenvectors @ (inverse.unsqueeze(-1) * projected)  # (B, n - 1, C)
        residual = target - design @ coefficients
        rss = (weights.unsqueeze(-1) * residual.square()).sum(1)  # (B, C)
        dof = (eigenvalues * inverse).sum(-1, keepdim=True) + prior_dof[:, 0]  # tr(H), (B, 1 or C)
        # An interpolating fit (tr(H) = M) has no cross-validated error estimate: it never wins.
        slack = (1.0 - dof / num_rows).clamp_min(0.0)
        score = torch.where(slack > 0, rss / slack.square().clamp_min(1e-300), torch.inf)  # (B, C)
        if factor not in RIDGE_GRID:
            score = torch.where(prior_dof[:, 0] > 0, score, torch.inf)
        if best_score is None:
            best_score, best_coefficients = score, coefficients
            best_factor = torch.full_like(score, factor)
            continue
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_coefficients = torch.where(better.unsqueeze(1), coefficients, best_coefficients)
        best_factor = torch.where(better, factor, best_factor)
    phi = equal_split + basis @ best_coefficients  # (B, n, C)
    return phi.transpose(1, 2), best_factor
