"""Tests for selfexplain.shapley: exact enumeration and batched Kernel SHAP over image patches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import ViTForImageClassification

from selfexplain.attribution.masking import grid_to_pixel_mask, make_baseline
from selfexplain.attribution.shapley import exact_shapley_values, kernel_shap_values
from tests._tiny import tiny_classifier


class LinearPixelModel(nn.Module):
    """Logits linear in the pixels: the coalition game is additive on any player grid.

    Its forward takes a positional ``images`` argument and returns an object with ``.logits``, which
    exercises the ``model(x)`` calling convention.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(image_shape[0] * image_shape[1] * image_shape[2], num_classes)

    def forward(self, images: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.linear(images.flatten(1)))


def additive_shapley(model: LinearPixelModel, pixel_values, baseline, grid) -> torch.Tensor:
    """Closed form: each player's Shapley value is its own pixels' contribution ``W (x - baseline)``."""
    height, width = pixel_values.shape[-2:]
    players = torch.eye(grid[0] * grid[1], dtype=torch.bool).view(-1, *grid)
    cells = grid_to_pixel_mask(players, (height, width)).double()  # (n, H, W)
    weight = model.linear.weight.detach().double().view(-1, *pixel_values.shape[1:])  # (K, C, H, W)
    delta = (pixel_values - make_baseline(pixel_values, baseline)).double()  # (B, C, H, W)
    phi = torch.einsum("kchw,bchw,nhw->bkn", weight, delta, cells)
    return phi.reshape(*phi.shape[:2], *grid).float()


def tiny_vit(num_labels: int = 3) -> ViTForImageClassification:
    # A wide initialisation makes the random model clearly non-additive in its patches.
    return tiny_classifier(seed=0, num_labels=num_labels, initializer_range=0.5)


def model_outputs(model, pixel_values, value: str) -> torch.Tensor:
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    return logits.softmax(-1) if value == "probs" else logits


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------
# Closed form on an additive model
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["mean", "zero", "blur"])
def test_exact_shapley_of_an_additive_model_is_each_players_contribution(baseline):
    torch.manual_seed(0)
    model = LinearPixelModel((3, 10, 10))
    pixel_values = torch.randn(2, 3, 10, 10)
    grid = (3, 3)  # does not divide the 10x10 image

    phi = exact_shapley_values(model, pixel_values, grid=grid, baseline=baseline, value="logits")

    torch.testing.assert_close(
        phi, additive_shapley(model, pixel_values, baseline, grid), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("paired", [True, False])
def test_kernel_shap_of_an_additive_model_is_exact_at_a_small_budget(paired):
    torch.manual_seed(0)
    model = LinearPixelModel((3, 10, 10))
    pixel_values = torch.randn(2, 3, 10, 10)
    baseline = torch.full((3, 1, 1), 0.5)  # a tensor baseline, broadcast over the images

    # 40 of the 512 coalitions: enough to identify an additive game exactly.
    phi = kernel_shap_values(
        model, pixel_values, grid=(3, 3), budget=40, baseline=baseline, paired=paired, value="logits"
    )

    torch.testing.assert_close(
        phi, additive_shapley(model, pixel_values, baseline, (3, 3)), atol=1e-5, rtol=1e-5
    )


def test_model_dtype_and_positional_call_are_used():
    torch.manual_seed(0)
    model = LinearPixelModel((3, 8, 8)).double()
    pixel_values = torch.randn(2, 3, 8, 8)  # float32 input, float64 model: inputs follow the model

    phi = kernel_shap_values(model, pixel_values, grid=(2, 2), budget=16, value="logits")

    assert phi.dtype == torch.float32 and phi.device == pixel_values.device
    torch.testing.assert_close(
        phi, additive_shapley(model, pixel_values, "mean", (2, 2)), atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------------------
# A non-additive model: Kernel SHAP against exact enumeration
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("paired", [True, False])
def test_kernel_shap_enumerating_every_coalition_is_exact(vit, images, paired):
    exact = exact_shapley_values(vit, images, grid=(2, 3))
    # 2**6 = 64 evaluations cover every coalition; a larger budget is capped there.
    estimate = kernel_shap_values(vit, images, grid=(2, 3), budget=1000, paired=paired)

    torch.testing.assert_close(estimate, exact, atol=1e-6, rtol=1e-5)


def test_kernel_shap_converges_to_exact_on_a_vit(vit, images):
    grid = (3, 4)  # 12 players, 4096 coalitions, on a 4x4 patch grid
    exact = exact_shapley_values(vit, images, grid=grid, batch_size=1024)
    # The model must not be additive, or any budget would be exact (see the additive tests).
    assert relative_error(kernel_shap_values(vit, images, grid=grid, budget=14), exact) > 0.2

    errors = {
        budget: relative_error(
            kernel_shap_values(vit, images, grid=grid, budget=budget, batch_size=1024), exact
        )
        for budget in (30, 300, 1000)
    }

    assert errors[1000] < 0.15  # measured 0.09 (0.35 at budget 150)
    assert errors[1000] < errors[300] < errors[30]


@pytest.mark.parametrize("value", ["probs", "logits"])
def test_efficiency_sums_to_the_change_in_model_output(vit, images, value):
    expected = model_outputs(vit, images, value) - model_outputs(vit, make_baseline(images, "mean"), value)

    exact = exact_shapley_values(vit, images, grid=(2, 2), value=value)
    estimate = kernel_shap_values(vit, images, grid=(4, 4), budget=50, value=value)

    torch.testing.assert_close(exact.sum(dim=(2, 3)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(estimate.sum(dim=(2, 3)), expected, atol=1e-5, rtol=0)


def test_a_single_player_gets_the_whole_change(vit, images):
    change = model_outputs(vit, images, "probs") - model_outputs(vit, make_baseline(images, "zero"), "probs")

    for phi in (
        exact_shapley_values(vit, images, grid=(1, 1), baseline="zero"),
        kernel_shap_values(vit, images, grid=(1, 1), baseline="zero"),
    ):
        assert phi.shape == (3, 3, 1, 1)
        torch.testing.assert_close(phi[..., 0, 0], change, atol=1e-6, rtol=0)


def test_an_underdetermined_fit_falls_back_to_the_equal_split(vit, images):
    change = model_outputs(vit, images, "probs") - model_outputs(vit, make_baseline(images, "mean"), "probs")

    phi = kernel_shap_values(vit, images, grid=(2, 2), budget=2)  # only the empty and full coalitions

    torch.testing.assert_close(phi, (change / 4)[..., None, None].expand(-1, -1, 2, 2), atol=1e-6, rtol=0)


def test_probabilities_are_the_default_value(vit, images):
    phi = kernel_shap_values(vit, images, grid=(2, 2), budget=16)
    change = model_outputs(vit, images, "probs") - model_outputs(vit, make_baseline(images, "mean"), "probs")

    torch.testing.assert_close(phi.sum(dim=(2, 3)), change, atol=1e-5, rtol=0)
    # Probabilities sum to one, so the attributions of all classes cancel.
    torch.testing.assert_close(phi.sum(dim=(1, 2, 3)), torch.zeros(len(images)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Determinism and batching
# ---------------------------------------------------------------------------------------------------------


def test_results_do_not_depend_on_batch_size(vit, images):
    reference = kernel_shap_values(vit, images, grid=(4, 4), budget=60, batch_size=512)
    chunked = kernel_shap_values(vit, images, grid=(4, 4), budget=60, batch_size=7)
    exact_chunked = exact_shapley_values(vit, images, grid=(2, 2), batch_size=5)

    torch.testing.assert_close(chunked, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        exact_chunked, exact_shapley_values(vit, images, grid=(2, 2)), atol=1e-6, rtol=1e-5
    )


def test_per_image_seeds_make_results_independent_of_the_call(vit, images):
    together = kernel_shap_values(vit, images, grid=(4, 4), budget=60, seed=[10, 11, 12])
    first = kernel_shap_values(vit, images[:1], grid=(4, 4), budget=60, seed=[10])
    rest = kernel_shap_values(vit, images[1:], grid=(4, 4), budget=60, seed=[11, 12])

    torch.testing.assert_close(torch.cat([first, rest]), together, atol=1e-6, rtol=1e-5)


def test_int_seed_draws_per_image_streams(vit, images):
    run = kernel_shap_values(vit, images, grid=(4, 4), budget=60, seed=3)
    # Image 0 keeps its coalitions whatever follows it in the call.
    alone = kernel_shap_values(vit, images[:1], grid=(4, 4), budget=60, seed=3)
    again = kernel_shap_values(vit, images, grid=(4, 4), budget=60, seed=3)
    other_seed = kernel_shap_values(vit, images, grid=(4, 4), budget=60, seed=4)
    # The same image at another position of the call gets other coalitions.
    swapped = kernel_shap_values(vit, images[[1, 0]], grid=(4, 4), budget=60, seed=3)

    torch.testing.assert_close(alone, run[:1], atol=1e-6, rtol=1e-5)
    assert torch.equal(again, run)
    assert not torch.allclose(other_seed, run, atol=1e-4)
    assert not torch.allclose(swapped[1], run[0], atol=1e-4)


def test_training_flags_are_restored(images):
    model = tiny_vit()
    model.train()
    model.vit.embeddings.eval()  # a mixed state must come back exactly as it was
    flags = [module.training for module in model.modules()]

    phi = kernel_shap_values(model, images[:1], grid=(2, 2), budget=16)

    assert [module.training for module in model.modules()] == flags
    # Evaluated in eval mode: dropout off, so the result matches the eval-mode model's.
    torch.testing.assert_close(phi, kernel_shap_values(tiny_vit().eval(), images[:1], grid=(2, 2), budget=16))


# ---------------------------------------------------------------------------------------------------------
# Shapes and input errors
# ---------------------------------------------------------------------------------------------------------


def test_coarser_grid_shapes(vit, images):
    assert exact_shapley_values(vit, images, grid=(2, 2)).shape == (3, 3, 2, 2)
    assert kernel_shap_values(vit, images, grid=(2, 2), budget=10).shape == (3, 3, 2, 2)
    assert kernel_shap_values(vit, images[:2], grid=(3, 2), budget=10).shape == (2, 3, 3, 2)


def test_exact_refuses_more_than_16_players(vit, images):
    with pytest.raises(ValueError, match="n=20 players"):
        exact_shapley_values(vit, images, grid=(4, 5))


@pytest.mark.parametrize("grid", [(0, 2), (2,), (2.0, 2), "ab", (17, 4), (True, 2)])
def test_bad_grid_is_rejected(vit, images, grid):
    with pytest.raises(ValueError, match="grid"):
        kernel_shap_values(vit, images, grid=grid)
    with pytest.raises(ValueError, match="grid"):
        exact_shapley_values(vit, images, grid=grid)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 1}, ValueError, "budget"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"value": "softmax"}, ValueError, "value"),
        ({"baseline": "noise"}, ValueError, "baseline"),
        ({"seed": [1, 2]}, ValueError, "seed has 2 entries"),
        ({"seed": -1}, ValueError, "non-negative"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_arguments_are_rejected(vit, images, kwargs, error, match):
    with pytest.raises(error, match=match):
        kernel_shap_values(vit, images, grid=(2, 2), **kwargs)


def test_bad_images_and_outputs_are_rejected(vit, images):
    with pytest.raises(ValueError, match="pixel_values"):
        kernel_shap_values(vit, images[0], grid=(2, 2))

    def returns_a_tuple(x):  # like transformers with return_dict=False: logits first
        return (x.flatten(1)[:, :3],)

    assert kernel_shap_values(returns_a_tuple, images, grid=(2, 2), budget=8).shape == (len(images), 3, 2, 2)

    def returns_features(x):
        return {"hidden_states": x.flatten(1)}

    with pytest.raises(TypeError, match="logits"):
        kernel_shap_values(returns_features, images, grid=(2, 2), budget=8)
