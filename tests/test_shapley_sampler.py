"""The Leverage SHAP design and the control-variate fit, checked against exact enumeration.

Most tests run the estimators on analytic games (functions of the coalition masks, no model), where the exact
Shapley values come from enumerating all ``2**n`` coalitions; the last ones go through `kernel_shap_values` on a
tiny ViT. Every check could fail: a biased or non-uniform sampler, wrong Horvitz–Thompson weights, a broken
pairing, or a control variate that loses efficiency or exactness would each trip one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from selfexplain.attribution.control_variate import (
    _enumerated_shapley,
    _permutation_shapley,
    control_variate_fit,
    fit_logit_surrogate,
    surrogate_values,
)
from selfexplain.attribution.leverage import level_counts, leverage_design
from selfexplain.attribution.masking import make_baseline
from selfexplain.attribution.shapley import (
    _all_coalitions,
    _image_generators,
    _kernel_shap_design,
    _kernel_size_weights,
    _shapley_coefficients,
    _solve_constrained_wls,
    exact_shapley_values,
    kernel_shap_values,
)
from tests._tiny import tiny_classifier

Game = Callable[[torch.Tensor], torch.Tensor]  # (B, M, n) bool masks -> (B, M, C) float64 values


# ---------------------------------------------------------------------------------------------------------
# Analytic games and the estimators run on them
# ---------------------------------------------------------------------------------------------------------


def softmax_game(num_players: int, num_classes: int = 3, interaction: float = 0.0, seed: int = 0) -> Game:
    """Class probabilities ``softmax(a + z W + interaction * third-order terms)`` of a coalition ``z``.

    With ``interaction=0`` the logits are additive: the game is exactly the control variate's surrogate
    family. Third-order terms are not cancelled by paired sampling, so they keep the fit honest.
    """
    generator = torch.Generator().manual_seed(seed)
    n = num_players
    intercept = torch.randn(num_classes, generator=generator, dtype=torch.float64)
    slopes = 1.5 * torch.randn(n, num_classes, generator=generator, dtype=torch.float64)
    triples = torch.randn(n, n, n, num_classes, generator=generator, dtype=torch.float64) / n

    def game(coalitions: torch.Tensor) -> torch.Tensor:
        z = coalitions.to(torch.float64)
        logits = intercept + z @ slopes
        if interaction:
            logits = logits + interaction * torch.einsum("bmi,bmj,bmk,ijkc->bmc", z, z, z, triples)
        return logits.softmax(dim=-1)

    return game


def cubic_game(num_players: int, seed: int = 0) -> Game:
    """One output: a linear part plus third-order interactions (not additive, not removed by pairing)."""
    generator = torch.Generator().manual_seed(seed)
    n = num_players
    linear = torch.randn(n, generator=generator, dtype=torch.float64)
    triples = torch.randn(n, n, n, generator=generator, dtype=torch.float64) / n

    def game(coalitions: torch.Tensor) -> torch.Tensor:
        z = coalitions.to(torch.float64)
        cubic = torch.einsum("bmi,bmj,bmk,ijk->bm", z, z, z, triples)
        return (z @ linear + cubic).unsqueeze(-1)

    return game


def exact_values(game: Game, num_players: int) -> torch.Tensor:
    """``(1, C, n)`` exact Shapley values by enumeration."""
    coalitions = _all_coalitions(num_players)
    return torch.einsum("mi,bmc->bci", _shapley_coefficients(coalitions), game(coalitions[None]))


def estimate(
    game: Game,
    num_players: int,
    budget: int,
    sampler: str = "leverage",
    paired: bool = True,
    control_variate: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """``(1, C, n)``: the design of ``sampler``, the game's values, then the plain or control-variate fit."""
    generators = _image_generators(seed, 1)
    design = leverage_design if sampler == "leverage" else _kernel_shap_design
    coalitions, weights = design(num_players, budget, paired, generators)
    values = game(coalitions)
    if control_variate:
        return control_variate_fit(coalitions, weights, values, generators)
    return _solve_constrained_wls(
        coalitions[:, 2:].to(torch.float64), weights, values[:, 2:], values[:, 0], values[:, 1]
    )


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def level_evaluations(num_players: int, evaluations: int, paired: bool) -> list[int]:
    """Evaluations per coalition size ``0 .. n`` implied by `level_counts`."""
    n = num_players
    units, extra = level_counts(n, evaluations, paired)
    per_size = [0] * (n + 1)
    for size, count in enumerate(units):
        if paired:
            per_size[size] += count
            per_size[n - size] += count
        else:
            per_size[size] += count
    if extra is not None:
        per_size[extra] += 1
    return per_size


# ---------------------------------------------------------------------------------------------------------
# The allocation over sizes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize(
    ("num_players", "evaluations"), [(5, 17), (8, 100), (8, 253), (16, 148), (16, 1001), (64, 998)]
)
def test_level_counts_spend_the_budget_evenly_and_enumerate_small_sizes(num_players, evaluations, paired):
    n = num_players
    per_size = level_evaluations(n, evaluations, paired)
    coalitions = [math.comb(n, s) for s in range(n + 1)]

    assert sum(per_size) == evaluations
    assert per_size[0] == per_size[n] == 0
    assert all(per_size[s] <= coalitions[s] for s in range(n + 1))
    if paired:  # complements come together; only the odd leftover breaks the symmetry
        assert sum(abs(per_size[s] - per_size[n - s]) for s in range(1, n // 2 + 1)) <= 1
    open_sizes = [per_size[s] for s in range(1, n) if per_size[s] < coalitions[s]]
    # Leverage scores are equal over sizes: the sizes still sampled share the budget evenly (a half-size
    # draw is a pair, and an odd budget adds one coalition), and a size is only complete if it is no larger
    # than that share (water-filling).
    assert max(open_sizes) - min(open_sizes) <= 3
    assert all(coalitions[s] <= min(open_sizes) + 3 for s in range(1, n) if per_size[s] == coalitions[s])


def test_level_counts_of_a_full_budget_enumerate_everything():
    for n in (2, 5, 6, 9):
        everything = [0, *(math.comb(n, s) for s in range(1, n)), 0]
        assert level_evaluations(n, 2**n - 2, paired=True) == everything
        assert level_evaluations(n, 2**n - 2, paired=False) == everything


# ---------------------------------------------------------------------------------------------------------
# The design: without replacement, paired, Horvitz–Thompson weights, uniform within a size
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_players", "budget"), [(10, 200), (10, 201), (40, 300), (7, 128)])
def test_leverage_design_is_distinct_paired_and_weighted_by_kernel_mass(num_players, budget):
    n = num_players
    coalitions, weights = leverage_design(n, budget, True, _image_generators([3, 4], 2))
    size_weight = _kernel_size_weights(n)

    assert coalitions.shape == (2, min(budget, 2**n), n) and weights.shape == (2, min(budget, 2**n) - 2)
    for rows, row_weights in zip(coalitions, weights, strict=True):
        assert torch.equal(rows[0], torch.zeros(n, dtype=torch.bool)) and bool(rows[1].all())
        sampled = rows[2:]
        assert len(torch.unique(sampled, dim=0)) == len(sampled)  # without replacement
        unpaired = (~sampled.unsqueeze(1) == sampled.unsqueeze(0)).all(-1).sum(1) == 0
        assert int(unpaired.sum()) == (budget - 2) % 2  # every complement is there, but an odd leftover
        sizes = sampled.sum(1)
        for size in sizes.unique():
            in_size = sizes == size
            # Horvitz–Thompson: the drawn coalitions of a size carry that size's whole kernel mass.
            torch.testing.assert_close(row_weights[in_size].sum(), size_weight[size], rtol=1e-12, atol=0)
            if int(in_size.sum()) == math.comb(n, int(size)):  # complete: exactly the Shapley kernel
                expected = size_weight[size] / math.comb(n, int(size))
                torch.testing.assert_close(row_weights[in_size], expected.expand(int(in_size.sum())))
    if budget < 2**n:
        assert not torch.equal(coalitions[0], coalitions[1])  # each image draws its own


@pytest.mark.parametrize("budget", [40, 41])  # an odd budget adds one unpaired coalition
def test_leverage_sampling_is_uniform_within_sizes_and_unbiased(budget):
    """Inclusion frequencies are equal within a size, and the weighted Gram matrix and moment vector average
    to the exact (fully enumerated) ones: the Horvitz–Thompson estimates are unbiased."""
    n, draws = 6, 2000
    game = cubic_game(n)
    everything = _all_coalitions(n)
    exact_weights = _kernel_size_weights(n)[everything.sum(1)] / torch.tensor(
        [math.comb(n, int(s)) for s in everything.sum(1)], dtype=torch.float64
    )
    inner = slice(1, 2**n - 1)  # sizes 1 .. n - 1
    z_all = everything[inner].to(torch.float64)
    exact_gram = z_all.T @ (exact_weights[inner, None] * z_all)
    exact_moment = z_all.T @ (exact_weights[inner, None] * game(everything[None])[0, inner])

    coalitions, weights = leverage_design(n, budget, True, _image_generators(0, draws))
    codes = (coalitions[:, 2:].long() << torch.arange(n)).sum(-1)  # (draws, M - 2) coalition ids
    frequency = (
        torch.zeros(2**n, dtype=torch.float64).index_add_(
            0, codes.flatten(), torch.ones(codes.numel(), dtype=torch.float64)
        )
        / draws
    )
    sizes = everything.sum(1)
    for size in range(1, n):
        in_size = frequency[sizes == size]
        assert float(in_size.max() - in_size.min()) < 0.08  # binomial sd at 2000 draws is <= 0.012

    z = coalitions[:, 2:].to(torch.float64)
    gram = (z.mT @ (weights.unsqueeze(-1) * z)).mean(0)
    moment = (z.mT @ (weights.unsqueeze(-1) * game(coalitions[:, 2:]))).mean(0)
    torch.testing.assert_close(gram, exact_gram, rtol=0, atol=0.03 * float(exact_gram.abs().max()))
    torch.testing.assert_close(moment, exact_moment, rtol=0, atol=0.05 * float(exact_moment.abs().max()))


# ---------------------------------------------------------------------------------------------------------
# The estimators against exact enumeration
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("control_variate", [False, True])
@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("sampler", ["kernel", "leverage"])
def test_a_full_budget_is_exact(sampler, paired, control_variate):
    n = 7
    game = softmax_game(n, interaction=1.0)

    phi = estimate(game, n, 2**n, sampler, paired, control_variate)

    torch.testing.assert_close(phi, exact_values(game, n), rtol=0, atol=1e-10)


@pytest.mark.parametrize("control_variate", [False, True])
def test_leverage_estimates_converge_to_the_exact_values(control_variate):
    n = 10
    game = softmax_game(n, interaction=2.0) if control_variate else cubic_game(n)
    exact = exact_values(game, n)

    def mean_error(budget: int) -> float:
        return (
            sum(
                relative_error(estimate(game, n, budget, control_variate=control_variate, seed=s), exact)
                for s in range(4)
            )
            / 4
        )

    errors = [mean_error(budget) for budget in (40, 160, 640)]

    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * errors[0]
    assert mean_error(1000) < errors[2]  # 1024 coalitions: nearly all enumerated


@pytest.mark.parametrize("sampler", ["kernel", "leverage"])
def test_efficiency_holds_exactly(sampler):
    n = 12
    game = softmax_game(n, interaction=1.0)
    total = (game(torch.ones(1, 1, n, dtype=torch.bool)) - game(torch.zeros(1, 1, n, dtype=torch.bool)))[:, 0]

    for control_variate in (False, True):
        phi = estimate(game, n, 37, sampler, control_variate=control_variate)
        torch.testing.assert_close(phi.sum(-1), total, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# The control variate
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["kernel", "leverage"])
def test_the_control_variate_is_exact_on_a_softmax_of_additive_logits(sampler):
    """The surrogate family contains this game, so any budget that identifies the logits is exact; plain Kernel
    SHAP is not, since the probabilities are not additive."""
    n = 10
    game = softmax_game(n)
    exact = exact_values(game, n)

    assert relative_error(estimate(game, n, 30, sampler), exact) > 0.01
    torch.testing.assert_close(estimate(game, n, 30, sampler, control_variate=True), exact, rtol=0, atol=1e-9)


def test_an_additive_surrogate_cannot_help_kernel_shap():
    """Why the surrogate is the softmax of additive logits and not an additive prior map: Kernel SHAP is linear
    in the values and exact on additive games, so subtracting an additive game and adding back its Shapley
    values returns the very same estimate."""
    n = 9
    game = softmax_game(n, interaction=1.0)
    prior = torch.randn(1, n, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    coalitions, weights = leverage_design(n, 40, True, _image_generators(0, 1))
    values = game(coalitions)
    additive = coalitions.to(torch.float64) @ prior  # (1, M, C): g(S) = sum_{i in S} prior_i, g(empty) = 0

    def fit(v: torch.Tensor) -> torch.Tensor:
        z = coalitions[:, 2:].to(torch.float64)
        return _solve_constrained_wls(z, weights, v[:, 2:], v[:, 0], v[:, 1])

    torch.testing.assert_close(
        fit(values - additive) + prior.transpose(1, 2), fit(values), rtol=0, atol=1e-12
    )


def test_the_surrogate_matches_the_model_at_both_endpoints():
    n = 8
    game = softmax_game(n, interaction=2.0)
    coalitions, weights = leverage_design(n, 30, True, _image_generators(0, 1))
    values = game(coalitions)

    intercept, slopes = fit_logit_surrogate(coalitions, weights, values)
    surrogate = surrogate_values(intercept, slopes, coalitions)

    torch.testing.assert_close(surrogate[:, :2], values[:, :2], rtol=0, atol=1e-12)


def test_sampled_surrogate_shapley_values_match_enumeration():
    """Beyond 16 players the surrogate's Shapley values are sampled by permutations: check the sampler where
    enumeration is possible. Each order telescopes, so the sampled values are exactly efficient."""
    n = 12
    generator = torch.Generator().manual_seed(0)
    intercept = torch.randn(3, generator=generator, dtype=torch.float64)
    slopes = torch.randn(3, n, generator=generator, dtype=torch.float64)

    exact = _enumerated_shapley(intercept, slopes)
    sampled = _permutation_shapley(intercept, slopes, blocks=64, generator=generator)

    torch.testing.assert_close(sampled.sum(-1), exact.sum(-1), rtol=0, atol=1e-12)
    assert relative_error(sampled, exact) < 0.02


def test_the_control_variate_cuts_the_error_on_a_saturating_classifier_game():
    """Logits nearly additive, probabilities saturating: the surrogate absorbs most of the non-additivity."""
    n = 12
    game = softmax_game(n, interaction=0.3, seed=2)
    exact = exact_values(game, n)

    def mean_error(control_variate: bool) -> float:
        return (
            sum(
                relative_error(estimate(game, n, 80, control_variate=control_variate, seed=s), exact)
                for s in range(4)
            )
            / 4
        )

    assert mean_error(True) < 0.5 * mean_error(False)


# ---------------------------------------------------------------------------------------------------------
# Through kernel_shap_values on a tiny ViT
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit():
    return tiny_classifier(seed=0, num_labels=3, initializer_range=0.5)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("sampler", "control_variate"), [("leverage", False), ("leverage", True), ("kernel", True)]
)
def test_kernel_shap_values_with_every_coalition_is_exact(vit, images, sampler, control_variate):
    exact = exact_shapley_values(vit, images, grid=(2, 3))

    phi = kernel_shap_values(
        vit, images, grid=(2, 3), budget=64, sampler=sampler, control_variate=control_variate
    )

    torch.testing.assert_close(phi, exact, atol=1e-6, rtol=1e-5)


def test_kernel_shap_values_leverage_and_control_variate_keep_efficiency_and_seeding(vit, images):
    kwargs = dict(grid=(4, 4), budget=41, sampler="leverage", control_variate=True)
    with torch.no_grad():
        change = vit(pixel_values=images).logits.softmax(-1) - vit(
            pixel_values=make_baseline(images, "mean")
        ).logits.softmax(-1)

    together = kernel_shap_values(vit, images, seed=[10, 11, 12], batch_size=512, **kwargs)
    first = kernel_shap_values(vit, images[:1], seed=[10], batch_size=7, **kwargs)
    rest = kernel_shap_values(vit, images[1:], seed=[11, 12], batch_size=13, **kwargs)

    torch.testing.assert_close(together.sum(dim=(2, 3)), change, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([first, rest]), together, atol=1e-6, rtol=1e-5)


def test_kernel_shap_values_with_the_leverage_sampler_converges_on_a_vit(vit, images):
    grid = (3, 4)  # 12 players, 4096 coalitions
    exact = exact_shapley_values(vit, images, grid=grid, batch_size=1024)

    errors = {
        budget: relative_error(
            kernel_shap_values(vit, images, grid=grid, budget=budget, sampler="leverage", batch_size=1024),
            exact,
        )
        for budget in (30, 300, 3000)
    }

    assert errors[3000] < errors[300] < errors[30]
    assert errors[3000] < 0.25 * errors[30]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sampler": "uniform"}, ValueError, "sampler"),
        ({"control_variate": 1}, TypeError, "control_variate"),
        ({"control_variate": True, "value": "logits"}, ValueError, "value='probs'"),
    ],
)
def test_bad_estimator_arguments_are_rejected(vit, images, kwargs, error, match):
    with pytest.raises(error, match=match):
        kernel_shap_values(vit, images, grid=(2, 2), **kwargs)
