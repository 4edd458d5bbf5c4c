"""Kernel SHAP with a control variate: a softmax-of-additive-logits surrogate fitted to the same coalitions.

Kernel SHAP's error comes only from the non-additive part of the game: on an additive game
``v(S) = v(empty) + sum_{i in S} phi_i`` the weighted least-squares fit is exact from any ``n + 1``
coalitions that identify it. For a classifier scored by a softmax probability, part of the non-additivity is
the softmax itself: the probability saturates even where the logits add up. The *surrogate game*

    g_k(S) = softmax_k( log p(empty) + sum_{i in S} b_i )

takes the additive fit ``b`` of the log-probabilities (Kernel SHAP on ``log p``, every class at once, from the
same evaluations, endpoints matched: ``g(empty) = f(empty)``, ``g(full) = f(full)``). It costs no model
evaluation, and its exact Shapley values ``phi(g)`` cost only arithmetic: enumeration for ``n <= 16``, else
blocks of (cheap) permutations. The estimate is the control-variate form

    phi = phi(g) + KernelSHAP(f - g)

(Goldwasser & Hooker, "Provably Stable Feature Rankings with SHAP and LIME", 2023, stabilise Shapley estimates
with a Taylor surrogate this way; Witter et al., "Regression-adjusted Monte Carlo Estimators for Shapley Values
and Probabilistic Values", 2025, with a fitted one). It is exact whenever Kernel SHAP is (Kernel SHAP at full
enumeration is linear and exact, so the two ``phi(g)`` cancel), efficiency holds exactly (``phi(g)`` sums to
``g(full) - g(empty)``), and on a game that *is* a softmax of additive logits it is exact from any budget that
identifies the logits. A fitted coefficient (``phi(g) c + KernelSHAP(f - c g)``, ``c`` by least squares) was
measured too: its noise made it worse than ``c = 1`` on every game tried.

When it helps: only where the logits are much closer to additive than the probabilities. On the project's MNIST
ViT (4x4 players, exact values) it does *not*: even with the surrogate fitted on all coalitions the estimate is
~10 % worse than plain Kernel SHAP, because the logits themselves carry most of the interactions
(``benchmarks/bench_equal_error.py`` measures it). Hence off by default.

An *additive* surrogate (gradient x input, an occlusion map, a self-explaining model's own map) cannot help at
all: Kernel SHAP reproduces additive games exactly, so ``KernelSHAP(f - g) + phi(g) == KernelSHAP(f)``. A prior
map can only enter as a non-additive surrogate (like this one) or as a Bayesian prior (shrinkage), not as an
additive control variate.

Example:
    >>> phi = control_variate_fit(coalitions, weights, values, generators)  # (B, C, n)
"""

from __future__ import annotations

import torch

from .shapley import (
    MAX_EXACT_PLAYERS,
    _all_coalitions,
    _shapley_coefficients,
    _solve_constrained_wls,
)

__all__ = ["control_variate_fit", "fit_logit_surrogate", "surrogate_shapley_values", "surrogate_values"]

# Probabilities are clamped here before the logarithm: a float32 softmax can underflow to 0.
_MIN_PROB = 1e-30

# Without enumeration (n > MAX_EXACT_PLAYERS) the surrogate's Shapley values are averaged over this many
# blocks of 2 n permutations (n cyclic shifts of a random order and of its reverse): every player meets every
# position equally often, and antithetic orders cancel the odd terms. Surrogate evaluations cost ~n * C flops.
_SURROGATE_BLOCKS = 64


def control_variate_fit(
    coalitions: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor,
    generators: list[torch.Generator],
    blocks: int = _SURROGATE_BLOCKS,
) -> torch.Tensor:
    """Kernel SHAP with the softmax surrogate as control variate: ``(B, C, n)`` attributions.

    Args:
        coalitions: ``(B, M, n)`` bool masks; rows 0 and 1 are the empty and full coalitions.
        weights: ``(B, M - 2)`` regression weights of rows ``2 ..``.
        values: ``(B, M, C)`` float64 class probabilities of the coalitions.
        generators: one per image, for the surrogate's permutations when ``n > 16`` (drawn after the design).
        blocks: permutation blocks for the surrogate's Shapley values when they are not enumerated.
    """
    z = coalitions[:, 2:].to(torch.float64)
    if z.shape[1] == 0 or z.shape[2] == 1:  # nothing to fit: the plain solution (the equal split)
        return _solve_constrained_wls(z, weights, values[:, 2:], values[:, 0], values[:, 1])
    intercept, slopes = fit_logit_surrogate(coalitions, weights, values)
    residual = values - surrogate_values(intercept, slopes, coalitions)  # (B, M, C), ~0 at both endpoints
    phi_residual = _solve_constrained_wls(z, weights, residual[:, 2:], residual[:, 0], residual[:, 1])
    return surrogate_shapley_values(intercept, slopes, generators, blocks) + phi_residual


def fit_logit_surrogate(
    coalitions: torch.Tensor, weights: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive fit of the log-probabilities: intercept ``log p(empty)`` ``(B, C)`` and slopes ``(B, C, n)``.

    The constrained Kernel SHAP fit of ``log p_k`` for every class, so that the slopes sum to
    ``log p_k(full) - log p_k(empty)``: the surrogate then matches the model at both endpoints. Fitting
    ``log p`` instead of the logits changes nothing after the softmax: ``log p = logits - logsumexp`` and the
    fit of the common ``logsumexp`` term is the same for every class.
    """
    log_values = values.clamp_min(_MIN_PROB).log()
    slopes = _solve_constrained_wls(
        coalitions[:, 2:].to(torch.float64), weights, log_values[:, 2:], log_values[:, 0], log_values[:, 1]
    )
    return log_values[:, 0], slopes


def surrogate_values(intercept: torch.Tensor, slopes: torch.Tensor, coalitions: torch.Tensor) -> torch.Tensor:
    """``g(S) = softmax(intercept + z_S slopes)`` for coalitions ``(B, M, n)``: ``(B, M, C)`` float64."""
    logits = intercept.unsqueeze(1) + coalitions.to(torch.float64) @ slopes.transpose(1, 2)
    return logits.softmax(dim=-1)


def surrogate_shapley_values(
    intercept: torch.Tensor,
    slopes: torch.Tensor,
    generators: list[torch.Generator],
    blocks: int = _SURROGATE_BLOCKS,
) -> torch.Tensor:
    """Shapley values ``(B, C, n)`` of the surrogate: exact for ``n <= 16``, else by blocks of permutations."""
    num_players = slopes.shape[-1]
    if num_players <= MAX_EXACT_PLAYERS:
        coalitions = _all_coalitions(num_players)
        coefficients = _shapley_coefficients(coalitions)
        return torch.stack(
            [
                _enumerated_shapley(intercept[b], slopes[b], coalitions, coefficients)
                for b in range(len(slopes))
            ]
        )
    return torch.stack(
        [
            _permutation_shapley(intercept[b], slopes[b], blocks, generator)
            for b, generator in enumerate(generators)
        ]
    )


def _enumerated_shapley(
    intercept: torch.Tensor,
    slopes: torch.Tensor,
    coalitions: torch.Tensor | None = None,
    coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact ``(C, n)`` Shapley values of one image's surrogate over all ``2**n`` coalitions."""
    if coalitions is None or coefficients is None:
        coalitions = _all_coalitions(slopes.shape[-1])
        coefficients = _shapley_coefficients(coalitions)
    values = surrogate_values(intercept[None], slopes[None], coalitions[None])[0]  # (2**n, C)
    return (coefficients.T @ values).T


def _permutation_shapley(
    intercept: torch.Tensor, slopes: torch.Tensor, blocks: int, generator: torch.Generator
) -> torch.Tensor:
    """Monte Carlo ``(C, n)`` Shapley values of one surrogate: each order's marginal contributions, averaged.

    A block is the ``n`` cyclic shifts of a random order and the ``n`` of its reverse; along an order the
    surrogate's logits are a cumulative sum, so a whole block costs ``2 n (n + 1)`` softmaxes.
    """
    num_classes, n = slopes.shape
    shifts = (torch.arange(n).unsqueeze(0) + torch.arange(n).unsqueeze(1)) % n  # (n shifts, n positions)
    phi = torch.zeros(num_classes, n, dtype=torch.float64)
    for _ in range(blocks):
        order = torch.randperm(n, generator=generator)
        orders = torch.cat([order[shifts], order.flip(0)[shifts]])  # (2n, n)
        steps = slopes.T[orders]  # (2n, n, C): the logit increment of each arriving player
        start = torch.zeros(2 * n, 1, num_classes, dtype=torch.float64)
        path = (intercept + torch.cat([start, steps], 1).cumsum(dim=1)).softmax(dim=-1)  # (2n, n + 1, C)
        marginal = (path[:, 1:] - path[:, :-1]).reshape(-1, num_classes)  # (2n * n, C)
        phi.index_add_(1, orders.reshape(-1), marginal.T)
    return phi / (2 * n * blocks)
