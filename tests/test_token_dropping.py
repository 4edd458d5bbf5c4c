"""Tests for selfexplain.attribution.token_dropping: removal of players by dropping their patch tokens."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from selfexplain.attribution import shapley
from selfexplain.attribution.shapley import exact_shapley_values, kernel_shap_values
from selfexplain.attribution.token_dropping import (
    embed_patch_tokens,
    kept_token_logits,
    token_dropping_values,
)
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_PLAYERS = 16  # the tiny models: 16 px images, 4 px patches


def wide_vit(**overrides) -> nn.Module:
    # A wide initialisation makes the random model clearly depend on which tokens it sees.
    return tiny_classifier(seed=0, initializer_range=0.5, **overrides)


def random_coalitions(num_images: int, per_image: int, num_players: int, seed: int = 1) -> torch.Tensor:
    """Coalitions of every size 0..n (sizes drawn uniformly, members uniformly)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, num_players + 1, (num_images, per_image, 1), generator=generator)
    ranks = torch.rand(num_images, per_image, num_players, generator=generator).argsort(-1).argsort(-1)
    return ranks < sizes


def reference_logits(model: nn.Module, image: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """One coalition by hand: embed the image from the model's parameters, keep CLS + the kept patch tokens, run
    the encoder layers, layernorm and classifier on CLS. ``image`` ``(C, H, W)``, ``kept`` ``(n,)`` bool."""
    vit = model.vit
    embeddings = vit.embeddings
    with torch.no_grad():
        patches = embeddings.patch_embeddings.projection(image[None]).flatten(2).transpose(1, 2)  # (1, n, D)
        patches = patches + embeddings.position_embeddings[:, 1:]
        cls = embeddings.cls_token + embeddings.position_embeddings[:, :1]
        hidden = torch.cat([cls, patches[:, kept]], dim=1)
        for layer in vit.layers:
            hidden = layer(hidden)
        return model.classifier(vit.layernorm(hidden)[:, 0])[0]


def model_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


# --------------------------------------------------------------------------------------------------------
# The value function
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_model",
    [wide_vit, lambda: tiny_self_explaining(seed=0, initializer_range=0.5, explanation_head="extension")],
    ids=["ViTForImageClassification", "ViTForSelfExplainingClassification+extension"],
)
def test_all_tokens_kept_equals_the_models_logits(make_model):
    model, pixel_values = make_model(), pixels(3)
    full = torch.ones(3, 1, NUM_PLAYERS, dtype=torch.bool)
    values = token_dropping_values(model, pixel_values, full, value="logits")
    torch.testing.assert_close(values[:, 0].float(), model_logits(model, pixel_values), atol=1e-5, rtol=1e-5)


def test_matches_a_hand_written_reference_one_coalition_at_a_time():
    model, pixel_values = wide_vit(), pixels(2)
    coalitions = random_coalitions(2, 12, NUM_PLAYERS)
    values = token_dropping_values(model, pixel_values, coalitions, value="logits")
    for image in range(2):
        for member in range(coalitions.shape[1]):
            expected = reference_logits(model, pixel_values[image], coalitions[image, member])
            torch.testing.assert_close(values[image, member].float(), expected, atol=1e-5, rtol=1e-5)


def test_equals_the_models_own_forward_with_removed_tokens_masked_out_of_attention():
    """An independent route to the same function: the model's forward with an attention mask over the tokens."""
    model, pixel_values = wide_vit(), pixels(2)
    if "attention_mask" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers' ViT forward takes no attention_mask")
    coalitions = random_coalitions(2, 6, NUM_PLAYERS, seed=2)
    values = token_dropping_values(model, pixel_values, coalitions, value="logits")
    for image in range(2):
        keep = torch.cat([torch.ones(6, 1, dtype=torch.bool), coalitions[image]], dim=1).long()
        with torch.no_grad():
            masked = model(pixel_values=pixel_values[image].expand(6, -1, -1, -1), attention_mask=keep).logits
        torch.testing.assert_close(values[image].float(), masked, atol=1e-5, rtol=1e-5)


def test_results_do_not_depend_on_batch_size():
    model, pixel_values = wide_vit(), pixels(2)
    coalitions = random_coalitions(2, 40, NUM_PLAYERS, seed=3)
    one = token_dropping_values(model, pixel_values, coalitions, batch_size=1, value="probs")
    many = token_dropping_values(model, pixel_values, coalitions, batch_size=4096, value="probs")
    torch.testing.assert_close(one, many, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one.sum(-1), torch.ones(2, 40, dtype=torch.float64), atol=1e-6, rtol=0)


def test_embedding_and_head_compose_to_the_model():
    model, pixel_values = wide_vit(), pixels(2)
    with torch.no_grad():
        logits = kept_token_logits(model, embed_patch_tokens(model, pixel_values))
    torch.testing.assert_close(logits, model_logits(model, pixel_values), atol=1e-5, rtol=1e-5)


def test_restores_the_training_flags():
    model = wide_vit().train()
    token_dropping_values(model, pixels(1), random_coalitions(1, 3, NUM_PLAYERS))
    assert model.training and model.vit.layers[0].training


# --------------------------------------------------------------------------------------------------------
# Through the Shapley estimators
# --------------------------------------------------------------------------------------------------------


def test_exact_shapley_with_token_dropping_is_efficient():
    """sum(phi) = f(all tokens) - f(CLS token alone), for every image and class."""
    model, pixel_values = wide_vit(), pixels(2)
    phi = exact_shapley_values(model, pixel_values, grid=(4, 4), value="logits", removal="tokens")
    cls_alone = token_dropping_values(
        model, pixel_values, torch.zeros(2, 1, NUM_PLAYERS, dtype=torch.bool), value="logits"
    )[:, 0].float()
    expected = model_logits(model, pixel_values) - cls_alone
    torch.testing.assert_close(phi.sum(dim=(-2, -1)), expected, atol=1e-4, rtol=1e-4)


def test_token_dropping_is_a_different_value_function_from_baseline_filling():
    model, pixel_values = wide_vit(), pixels(1)
    tokens = exact_shapley_values(model, pixel_values, grid=(4, 4), value="logits", removal="tokens")
    filled = exact_shapley_values(model, pixel_values, grid=(4, 4), value="logits")
    assert not torch.allclose(tokens, filled, atol=1e-3)


def test_kernel_shap_with_a_full_budget_is_exact_with_token_dropping():
    model, pixel_values = wide_vit(image_size=8), pixels(2, size=8)  # 2x2 patches: 16 coalitions
    exact = exact_shapley_values(model, pixel_values, grid=(2, 2), removal="tokens")
    estimate = kernel_shap_values(model, pixel_values, grid=(2, 2), budget=16, removal="tokens")
    torch.testing.assert_close(estimate, exact, atol=1e-5, rtol=1e-4)


def test_kernel_shap_evaluates_the_same_coalitions_for_both_removals(monkeypatch):
    model, pixel_values = wide_vit(), pixels(2)
    seen = {}
    original = shapley._coalition_values

    def recording(model, pixel_values, coalitions, *args):
        seen[args[-1]] = coalitions.clone()
        return original(model, pixel_values, coalitions, *args)

    monkeypatch.setattr(shapley, "_coalition_values", recording)
    for removal in ("baseline", "tokens"):
        kernel_shap_values(model, pixel_values, grid=(4, 4), budget=100, seed=[5, 6], removal=removal)
    assert torch.equal(seen["baseline"], seen["tokens"])


def test_the_default_removal_is_unchanged_baseline_filling():
    model, pixel_values = wide_vit(), pixels(2)
    default = kernel_shap_values(model, pixel_values, grid=(2, 2), budget=12)
    explicit = kernel_shap_values(model, pixel_values, grid=(2, 2), budget=12, removal="baseline")
    assert torch.equal(default, explicit)


# --------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------


class NotAViT(nn.Module):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.flatten(1)[:, :3]


@pytest.mark.parametrize("estimator", ["exact", "kernel"])
def test_refuses_a_model_that_is_not_a_vit_classifier(estimator):
    with pytest.raises(TypeError, match='removal="tokens" .*ViTForImageClassification'):
        _estimate(estimator, NotAViT(), grid=(4, 4))


@pytest.mark.parametrize("estimator", ["exact", "kernel"])
def test_refuses_a_grid_that_is_not_the_patch_grid(estimator):
    with pytest.raises(ValueError, match=r"players to be the model's patches.*grid=\(4, 4\)"):
        _estimate(estimator, wide_vit(), grid=(2, 2))


def test_refuses_an_unknown_removal():
    with pytest.raises(ValueError, match="removal must be one of"):
        kernel_shap_values(wide_vit(), pixels(1), grid=(4, 4), budget=8, removal="drop")


def test_refuses_images_of_another_size_like_the_model_does():
    model = wide_vit()
    with pytest.raises(ValueError, match="doesn't match model"):
        kernel_shap_values(model, pixels(1, size=20), grid=(5, 5), budget=8, removal="tokens")


def _estimate(estimator: str, model: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    if estimator == "exact":
        return exact_shapley_values(model, pixels(1), grid=grid, removal="tokens")
    return kernel_shap_values(model, pixels(1), grid=grid, budget=8, removal="tokens")
