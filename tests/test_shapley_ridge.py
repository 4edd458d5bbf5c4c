"""Kernel SHAP with a GCV-chosen ridge (`kernel_shap_values(ridge="gcv")`), checked against exact enumeration.

On analytic games with interactions (12 players: 4,096 coalitions, enumerated for the exact values) the plain fit's
error peaks near ``2n`` evaluations; the ridge must remove that peak, leave large budgets alone, stay efficient,
and return the exact values when every coalition is evaluated. Each check could fail: a penalty chosen without
regard to the data (too strong or too weak), a broken constraint, or a penalty applied to a complete design.
"""

from __future__ import annotations

import pytest
import torch

from selfexplain.attribution.leverage import leverage_design
from selfexplain.attribution.ridge import PRIOR_RIDGE_GRID, RIDGE_GRID, solve_ridge_gcv
from selfexplain.attribution.shapley import (
    _image_generators,
    _solve_constrained_wls,
    _sum_zero_basis,
    exact_shapley_values,
    kernel_shap_values,
)
from tests._tiny import tiny_classifier
from tests.test_shapley_sampler import cubic_game, exact_values, relative_error, softmax_game

N = 12


def fits(game, budget: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain and the ridge fit of the same Leverage SHAP evaluations, and the penalty factors chosen."""
    coalitions, weights = leverage_design(N, budget, True, _image_generators(seed, 1))
    values = game(coalitions)
    z = coalitions[:, 2:].to(torch.float64)
    plain = _solve_constrained_wls(z, weights, values[:, 2:], values[:, 0], values[:, 1])
    ridge, factors = solve_ridge_gcv(
        z, weights, values[:, 2:], values[:, 0], values[:, 1], _sum_zero_basis(N)
    )
    return plain, ridge, factors


def mean_errors(game_of_seed, budget: int, seeds: int = 16) -> tuple[float, float, float]:
    plain_errors, ridge_errors, factors = [], [], []
    for seed in range(seeds):
        game = game_of_seed(seed % 4)
        exact = exact_values(game, N)
        plain, ridge, chosen = fits(game, budget, seed)
        plain_errors.append(relative_error(plain, exact))
        ridge_errors.append(relative_error(ridge, exact))
        factors.append(float(chosen.mean()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(plain_errors), mean(ridge_errors), mean(factors)


GAMES = {
    "cubic": lambda seed: cubic_game(N, seed=seed),
    "softmax with interactions": lambda seed: softmax_game(N, interaction=1.0, seed=seed),
}


@pytest.mark.parametrize("game", GAMES)
def test_the_ridge_removes_the_error_peak_near_2n_evaluations(game):
    """At 2n evaluations (n coalition/complement pairs for n - 1 unknowns) the plain fit interpolates its noise;
    measured: plain 0.79 / 1.24 relative error, ridge 0.55 / 0.58 (the plain fit at 2n - 6 evaluations: 0.63 /
    0.79)."""
    plain, ridge, factor = mean_errors(GAMES[game], 2 * N)
    assert ridge < 0.8 * plain
    assert factor > 0  # the penalty was chosen, not left at 0
    # The peak is a peak: fewer evaluations do better than 2n without the ridge.
    fewer, _, _ = mean_errors(GAMES[game], 2 * N - 6)
    assert plain > fewer


@pytest.mark.parametrize("game", GAMES)
def test_the_ridge_vanishes_as_the_budget_grows(game):
    """At half of all coalitions GCV picks (almost) no penalty and the estimate is the plain one's accuracy."""
    plain, ridge, factor = mean_errors(GAMES[game], 2000, seeds=8)
    assert factor < 0.01
    assert ridge < 1.1 * plain + 1e-3


def test_the_ridge_fit_is_efficient_and_picks_from_its_grid():
    game = softmax_game(N, interaction=1.0, seed=3)
    coalitions, _ = leverage_design(N, 30, True, _image_generators(0, 1))
    values = game(coalitions)
    _, ridge, factors = fits(game, 30, 0)
    assert torch.allclose(ridge.sum(-1), values[:, 1] - values[:, 0], atol=1e-10)
    assert set(factors.flatten().tolist()) <= set(RIDGE_GRID)


def test_kernel_shap_with_the_ridge_is_exact_when_every_coalition_is_evaluated():
    torch.manual_seed(0)
    model = tiny_classifier(image_size=8, patch_size=4)  # 2x2 patches
    x = torch.randn(2, 3, 8, 8)
    exact = exact_shapley_values(model, x, grid=(2, 2), baseline="zero")
    for sampler in ("kernel", "leverage"):
        estimate = kernel_shap_values(
            model, x, grid=(2, 2), budget=16, baseline="zero", sampler=sampler, ridge="gcv"
        )
        assert torch.allclose(estimate, exact, atol=1e-5)


def test_kernel_shap_with_the_ridge_is_efficient_on_a_model():
    torch.manual_seed(0)
    model = tiny_classifier(image_size=16, patch_size=4)  # 4x4 patches: 16 players
    x = torch.randn(2, 3, 16, 16)
    phi = kernel_shap_values(
        model, x, grid=(4, 4), budget=34, baseline="zero", sampler="leverage", ridge="gcv"
    )
    with torch.no_grad():
        full = model(pixel_values=x).logits.softmax(-1)
        empty = model(pixel_values=torch.zeros_like(x)).logits.softmax(-1)
    assert torch.allclose(phi.sum((-2, -1)), full - empty, atol=1e-5)
    plain = kernel_shap_values(model, x, grid=(4, 4), budget=34, baseline="zero", sampler="leverage")
    assert not torch.allclose(phi, plain)  # the penalty did something at 2n + 2 evaluations


def test_bad_ridge_settings_are_refused():
    model, x = tiny_classifier(image_size=8, patch_size=4), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="ridge must be one of"):
        kernel_shap_values(model, x, grid=(2, 2), budget=8, ridge="lasso")
    with pytest.raises(ValueError, match="cannot be combined"):
        kernel_shap_values(model, x, grid=(2, 2), budget=8, ridge="gcv", control_variate=True)


# --- a prior instead of the equal split (`prior=`) ----------------------------------------------------------


def prior_errors(game_of_seed, budget: int, make_prior, seeds: int = 16) -> tuple[float, float]:
    """Mean relative error of the ridge fit without and with ``make_prior(exact, noise)`` as its centre."""
    without, with_prior = [], []
    for seed in range(seeds):
        game = game_of_seed(seed % 4)
        exact = exact_values(game, N)
        noise = torch.randn(
            exact.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64
        )
        coalitions, weights = leverage_design(N, budget, True, _image_generators(seed, 1))
        values = game(coalitions)
        args = (coalitions[:, 2:].to(torch.float64), weights, values[:, 2:], values[:, 0], values[:, 1])
        plain, _ = solve_ridge_gcv(*args, _sum_zero_basis(N))
        refined, _ = solve_ridge_gcv(*args, _sum_zero_basis(N), make_prior(exact, noise * exact.std()))
        without.append(relative_error(plain, exact))
        with_prior.append(relative_error(refined, exact))
    return sum(without) / seeds, sum(with_prior) / seeds


@pytest.mark.parametrize("game", GAMES)
@pytest.mark.parametrize("budget", [14, 24])
def test_a_good_prior_cuts_the_error_at_small_budgets(game, budget):
    """A prior with 30 % noise (relative error ~0.3): measured 0.72 → 0.29 (cubic, 14 evaluations), 0.54 → 0.24
    (cubic, 24), 0.76 → 0.36 and 0.56 → 0.30 (softmax)."""
    without, with_prior = prior_errors(GAMES[game], budget, lambda exact, noise: exact + 0.3 * noise)
    assert with_prior < 0.6 * without


def test_the_prior_is_refitted_so_its_scale_does_not_matter():
    game = softmax_game(N, interaction=1.0, seed=1)
    exact = exact_values(game, N)
    prior = exact + 0.3 * torch.randn(
        exact.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    coalitions, weights = leverage_design(N, 20, True, _image_generators(0, 1))
    values = game(coalitions)
    args = (
        coalitions[:, 2:].to(torch.float64),
        weights,
        values[:, 2:],
        values[:, 0],
        values[:, 1],
        _sum_zero_basis(N),
    )
    first, factors = solve_ridge_gcv(*args, prior)
    scaled, _ = solve_ridge_gcv(*args, 7.0 * prior + 3.0)  # another scale and an offset: the same estimate
    assert torch.allclose(first, scaled, atol=1e-10)
    assert torch.allclose(first.sum(-1), values[:, 1] - values[:, 0], atol=1e-10)  # still efficient
    assert set(factors.flatten().tolist()) <= set(PRIOR_RIDGE_GRID)


def test_a_prior_pointing_the_wrong_way_changes_nothing():
    """The refitted scale is clamped at 0: a negated prior is the equal split, the fit without a prior exactly."""
    without, with_prior = prior_errors(GAMES["cubic"], 14, lambda exact, noise: -exact)
    assert with_prior == pytest.approx(without, abs=1e-12)


@pytest.mark.parametrize("make_prior", [lambda e, n: e + 0.3 * n, lambda e, n: n], ids=["good", "random"])
def test_the_prior_fades_as_the_budget_grows(make_prior):
    """At half of all coalitions GCV trusts the evaluations, whatever the prior."""
    without, with_prior = prior_errors(GAMES["cubic"], 2000, make_prior, seeds=8)
    assert with_prior < 1.1 * without + 1e-3


def test_a_random_prior_costs_little():
    """GCV does not trust a prior that is noise: measured 0.747 against 0.719 without (cubic, 14 evaluations)."""
    without, with_prior = prior_errors(GAMES["cubic"], 14, lambda exact, noise: noise)
    assert with_prior < 1.15 * without


def test_kernel_shap_with_a_prior_on_a_model():
    torch.manual_seed(0)
    model = tiny_classifier(image_size=16, patch_size=4)  # 16 players, 3 classes
    x = torch.randn(2, 3, 16, 16)
    prior = torch.randn(2, 3, 4, 4)
    phi = kernel_shap_values(
        model, x, grid=(4, 4), budget=34, baseline="zero", sampler="leverage", ridge="gcv", prior=prior
    )
    with torch.no_grad():
        full = model(pixel_values=x).logits.softmax(-1)
        empty = model(pixel_values=torch.zeros_like(x)).logits.softmax(-1)
    assert torch.allclose(phi.sum((-2, -1)), full - empty, atol=1e-5)
    # Every coalition evaluated: the exact values, whatever the prior.
    small = tiny_classifier(image_size=8, patch_size=4)
    x_small = torch.randn(2, 3, 8, 8)
    exact = exact_shapley_values(small, x_small, grid=(2, 2), baseline="zero")
    estimate = kernel_shap_values(
        small, x_small, grid=(2, 2), budget=16, baseline="zero", ridge="gcv", prior=torch.randn(2, 3, 2, 2)
    )
    assert torch.allclose(estimate, exact, atol=1e-5)


def test_bad_priors_are_refused():
    model, x = tiny_classifier(image_size=8, patch_size=4), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match='prior needs ridge="gcv"'):
        kernel_shap_values(model, x, grid=(2, 2), budget=8, prior=torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="pool a finer map"):
        kernel_shap_values(model, x, grid=(2, 2), budget=8, ridge="gcv", prior=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="non-finite"):
        kernel_shap_values(
            model, x, grid=(2, 2), budget=8, ridge="gcv", prior=torch.full((1, 3, 2, 2), torch.nan)
        )
    with pytest.raises(ValueError, match="classes, the model scores"):
        kernel_shap_values(model, x, grid=(2, 2), budget=8, ridge="gcv", prior=torch.zeros(1, 5, 2, 2))
