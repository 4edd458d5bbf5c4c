import functools
import math

import pytest
import torch
from transformers import ViTForImageClassification

from selfexplain.evaluation.explainers import (
    attention_rollout,
    grad_cam,
    patch_grid,
    random_explanation,
    standardized_blend,
)
from tests._tiny import tiny_config

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def tiny_model(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_config(**overrides)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------- patch_grid


def test_patch_grid_follows_the_real_input_size():
    model = tiny_model()
    assert patch_grid(model, torch.zeros(1, 3, 16, 16)) == (4, 4)
    assert patch_grid(model, torch.zeros(2, 3, 12, 20)) == (3, 5)
    assert patch_grid(model, torch.zeros(1, 3, 13, 7)) == (3, 1)  # partial patches dropped, like the conv


def test_patch_grid_rejects_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="pixel_values"):
        patch_grid(model, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="smaller than one"):
        patch_grid(model, torch.zeros(1, 3, 3, 16))
    with pytest.raises(TypeError, match="patch_size"):
        patch_grid(torch.nn.Linear(2, 2), torch.zeros(1, 3, 16, 16))


# ------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size, grid", [((16, 16), (4, 4)), ((12, 20), (3, 5))])
def test_all_explainers_return_maps_on_the_patch_grid(size, grid):
    model = tiny_model()
    pixel_values = torch.randn(2, 3, *size)
    interpolate = size != (16, 16)
    cam = grad_cam(model, pixel_values, interpolate_pos_encoding=interpolate)
    rollout = attention_rollout(model, pixel_values, interpolate_pos_encoding=interpolate)
    noise = random_explanation(pixel_values, patch_grid(model, pixel_values))
    for maps in (cam, rollout, noise):
        assert maps.shape == (2, *grid)
        assert maps.dtype == torch.float32
        assert torch.isfinite(maps).all()


def test_non_default_size_needs_interpolate_pos_encoding():
    model = tiny_model()
    with pytest.raises(ValueError, match="doesn't match model"):
        grad_cam(model, torch.randn(1, 3, 12, 20))
    with pytest.raises(ValueError, match="doesn't match model"):
        attention_rollout(model, torch.randn(1, 3, 12, 20))


def test_explainers_reject_models_without_vit_classifier_layout(images):
    with pytest.raises(TypeError, match="not a ViT classifier"):
        grad_cam(torch.nn.Conv2d(3, 3, 1), images)
    with pytest.raises(TypeError, match="not a ViT classifier"):
        attention_rollout(torch.nn.Conv2d(3, 3, 1), images)


# ----------------------------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_is_non_negative_and_class_dependent(images):
    model = tiny_model()
    maps = [grad_cam(model, images, target=c) for c in range(3)]
    for cam in maps:
        assert (cam >= 0).all()
    assert torch.stack(maps).sum() > 0
    assert not torch.allclose(maps[0], maps[1])


def test_grad_cam_default_target_is_the_predicted_class(images):
    model = tiny_model()
    predicted = model(pixel_values=images).logits.argmax(-1)
    assert torch.equal(grad_cam(model, images), grad_cam(model, images, target=predicted))
    assert torch.equal(grad_cam(model, images), grad_cam(model, images, target=predicted.tolist()))


def test_grad_cam_per_image_targets_match_single_image_calls(images):
    model = tiny_model()
    targets = [2, 0, 1, 2]
    batched = grad_cam(model, images, target=targets)
    for i, target in enumerate(targets):
        torch.testing.assert_close(batched[i], grad_cam(model, images[i : i + 1], target=target)[0])


@pytest.mark.parametrize(
    "target, error, match",
    [
        (3, ValueError, "in \\[0, 3\\)"),
        (-1, ValueError, "in \\[0, 3\\)"),
        ([0, 1], ValueError, "one class per image"),
        (0.5, TypeError, "integer"),
    ],
)
def test_grad_cam_rejects_bad_targets(images, target, error, match):
    with pytest.raises(error, match=match):
        grad_cam(tiny_model(), images, target=target)


def test_grad_cam_matches_a_reference_from_a_hand_written_forward(images):
    # Re-run the last encoder layer by hand from its first LayerNorm, take the gradient there and apply the
    # Grad-CAM definition: weights = gradient averaged over patch tokens, map = ReLU(weighted channel sum).
    model = tiny_model()
    vit, last = model.vit, model.vit.layers[-1]
    hidden = vit.embeddings(images)
    for layer in vit.layers[:-1]:
        hidden = layer(hidden)
    activation = last.layernorm_before(hidden).detach().requires_grad_(True)
    hidden = hidden + last.attention(activation)[0]
    hidden = hidden + last.mlp(last.layernorm_after(hidden))
    logits = model.classifier(vit.layernorm(hidden)[:, 0])
    targets = torch.tensor([0, 1, 2, 1])
    (gradient,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), activation)
    weights = gradient[:, 1:].mean(dim=1, keepdim=True)
    expected = torch.relu((weights * activation[:, 1:]).sum(-1)).reshape(-1, 4, 4)
    assert expected.sum() > 0

    torch.testing.assert_close(grad_cam(model, images, target=targets), expected.detach())


def test_grad_cam_leaves_no_trace_on_the_model(images):
    model = tiny_model(hidden_dropout_prob=0.3)
    model.train()
    model.vit.layers[0].eval()  # a mixed train/eval state must come back as it was, module by module
    for parameter in model.vit.embeddings.parameters():
        parameter.requires_grad_(False)
    modes = {name: module.training for name, module in model.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pixel_values = images.clone().requires_grad_(True)

    cam = grad_cam(model, pixel_values)

    assert cam.sum() > 0
    for name, module in model.named_modules():
        for hooks in HOOK_DICTS:
            assert len(getattr(module, hooks)) == 0, f"{hooks} left on {name or 'model'}"
        assert module.training == modes[name], name
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == requires_grad[name], name
        assert parameter.grad is None, name
    assert pixel_values.grad is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert not cam.requires_grad


def test_grad_cam_runs_in_eval_mode_and_works_frozen_under_no_grad(images):
    model = tiny_model(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    reference = grad_cam(model, images, target=1)
    model.train()  # dropout would make two calls differ if the explainer did not switch to eval mode
    torch.testing.assert_close(grad_cam(model, images, target=1), reference)
    model.requires_grad_(False)
    with torch.no_grad():
        frozen = grad_cam(model, images, target=1)
    torch.testing.assert_close(frozen, reference)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.training


def constructed_model(num_layers: int = 1) -> ViTForImageClassification:
    """A ViT whose Grad-CAM has a closed form.

    Patch token channel 0 = mean of the patch's red channel, every other embedding is zero; attention is uniform
    (zero query/key), value and output projections are the identity, the MLP adds nothing. The final LayerNorm
    gets a huge eps so it is (nearly) linear: ``LN(x) ~ x - mean(x)``. (With an ordinary LayerNorm the map would
    vanish: LayerNorm is scale-invariant, and sum_k w_k A_k is a derivative along the activation's own scale.)
    Class 0 reads channel 0, class 1 reads minus channel 0, class 2 reads nothing.
    """
    model = tiny_model(num_hidden_layers=num_layers, qkv_bias=True)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        model.vit.embeddings.patch_embeddings.projection.weight[0, 0] = 1.0 / 16  # mean over a 4x4 patch
        for layer in model.vit.layers:
            layer.attention.v_proj.weight.copy_(torch.eye(hidden))
            layer.attention.o_proj.weight.copy_(torch.eye(hidden))
        model.vit.layernorm.eps = 1e6
        model.vit.layernorm.weight.fill_(1e3)  # undo the 1/sqrt(eps) scale
        model.classifier.weight[0, 0] = 1.0
        model.classifier.weight[1, 0] = -1.0
    return model


@pytest.mark.parametrize("hot", [(0, 2), (1, 0), (1, 3)])
def test_grad_cam_known_answer_on_a_constructed_model(hot):
    model = constructed_model()
    # An 8x16 input gives a non-square 2x4 grid, so a transposed or shifted reshape cannot pass.
    pixel_values = torch.zeros(1, 3, 8, 16)
    row, col = hot
    pixel_values[0, 0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = 1.0

    cam = grad_cam(model, pixel_values, target=0, interpolate_pos_encoding=True)[0]

    # Only the hot token is non-zero after layernorm_before: A_hot = LN(e_0) with A_hot[0] = sqrt(D - 1). Every
    # token gets gradient (e_0 - 1/D) / T from the uniform attention (T = 9 tokens), so the map there is
    # A_hot . (e_0 - 1/D) / T = sqrt(D - 1) / T, and zero elsewhere.
    expected = torch.zeros(2, 4)
    expected[row, col] = math.sqrt(model.config.hidden_size - 1) / 9
    torch.testing.assert_close(cam, expected, rtol=1e-3, atol=1e-6)
    # The opposite class sees only negative evidence, which Grad-CAM's ReLU removes.
    assert torch.equal(
        grad_cam(model, pixel_values, target=1, interpolate_pos_encoding=True), torch.zeros(1, 2, 4)
    )
    # Class 0 is the prediction (its logit is the only positive one), so it is explained by default.
    torch.testing.assert_close(grad_cam(model, pixel_values, interpolate_pos_encoding=True)[0], expected)


# ------------------------------------------------------------------------------------------ attention rollout


def test_rollout_of_one_layer_equals_hand_computation(images):
    model = tiny_model(num_hidden_layers=1, attn_implementation="eager")
    attention = model(pixel_values=images, output_attentions=True).attentions[0]  # (B, heads, T, T)
    fused = attention.mean(dim=1)
    # One layer: rollout = (A + I) / 2, whose rows already sum to one; the CLS row over patches is A[0, 1:] / 2.
    expected = (fused[:, 0, 1:] / 2).reshape(-1, 4, 4)
    torch.testing.assert_close(attention_rollout(model, images), expected)
    # Max-fused rows sum to more than one, so the renormalisation shows: CLS row = A[0, 1:] / (sum A[0] + 1).
    fused_max = attention.amax(dim=1)
    expected_max = fused_max[:, 0, 1:] / (fused_max[:, 0].sum(-1, keepdim=True) + 1)
    torch.testing.assert_close(
        attention_rollout(model, images, head_fusion="max"), expected_max.reshape(-1, 4, 4)
    )


def test_rollout_discard_matches_hand_computation_and_keeps_cls_to_cls(images):
    model = tiny_model(num_hidden_layers=1, attn_implementation="eager")
    fused = (
        model(pixel_values=images, output_attentions=True).attentions[0].mean(dim=1).flatten(1)
    )  # (B, T*T)
    tokens, kept = 17, 40
    # Discard all but the 40 largest entries besides CLS-to-CLS (which the explainer never discards).
    ratio = (tokens * tokens - 1 - kept + 0.5) / tokens**2
    others = fused[:, 1:]
    threshold = others.sort(dim=-1, descending=True).values[:, kept - 1 : kept]
    assert ((others >= threshold).sum(-1) == kept).all()
    assert (fused[:, :1] < threshold).all()  # CLS-to-CLS is among the discarded ones, so its protection shows
    sparse = torch.cat([fused[:, :1], torch.where(others >= threshold, others, 0.0)], dim=1).view(
        -1, tokens, tokens
    )
    cls_row = sparse[:, 0]
    expected = cls_row[:, 1:] / (cls_row.sum(-1, keepdim=True) + 1)  # rows of (A + I) / 2 renormalised

    torch.testing.assert_close(
        attention_rollout(model, images, discard_ratio=ratio), expected.reshape(-1, 4, 4)
    )


def test_rollout_multiplies_layers_in_order(images):
    model = tiny_model(num_hidden_layers=3, attn_implementation="eager")
    attentions = model(pixel_values=images, output_attentions=True).attentions
    eye = torch.eye(17)
    flows = [(a.mean(dim=1) + eye) / 2 for a in attentions]
    # Rollout reaches the input through layer 1 last: R = A_3 A_2 A_1.
    expected = functools.reduce(torch.matmul, reversed(flows))[:, 0, 1:].reshape(-1, 4, 4)
    torch.testing.assert_close(attention_rollout(model, images), expected)
    wrong_order = functools.reduce(torch.matmul, flows)[:, 0, 1:].reshape(-1, 4, 4)
    assert not torch.allclose(wrong_order, expected)


def test_rollout_known_answer_for_uniform_attention():
    # Uniform attention U (U @ U = U): one layer gives (U + I) / 2, two give (3 U + I) / 4 for T tokens.
    pixel_values = torch.zeros(1, 3, 16, 16)
    torch.testing.assert_close(
        attention_rollout(constructed_model(1), pixel_values), torch.full((1, 4, 4), 1 / 34)
    )
    torch.testing.assert_close(
        attention_rollout(constructed_model(2), pixel_values), torch.full((1, 4, 4), 3 / 68)
    )


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.9])
def test_rollout_is_a_sub_distribution_over_patches(images, head_fusion, discard_ratio):
    maps = attention_rollout(tiny_model(), images, head_fusion=head_fusion, discard_ratio=discard_ratio)
    assert (maps >= 0).all()
    sums = maps.sum(dim=(1, 2))
    assert (sums > 0).all()
    assert (sums < 1).all()  # the CLS token keeps at least its own residual share


def test_rollout_discard_ratio_zeroes_weak_links(images):
    model = tiny_model()
    dense = attention_rollout(model, images)
    sparse = attention_rollout(model, images, discard_ratio=0.95)
    assert (dense > 0).all()
    assert (sparse == 0).sum() > 0
    assert not torch.allclose(dense, sparse)


def test_rollout_rejects_bad_settings(images):
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(tiny_model(), images, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(tiny_model(), images, discard_ratio=1.0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_rollout_switches_to_eager_and_back(images, attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    reference = tiny_model(attn_implementation="eager")
    model.train()
    maps = attention_rollout(model, images)
    assert model.config._attn_implementation == attn_implementation
    assert model.vit.config._attn_implementation == attn_implementation
    assert all(module.training for module in model.modules())
    torch.testing.assert_close(maps, attention_rollout(reference, images))
    # The restored implementation is really used again: sdpa returns no attention weights.
    if attn_implementation == "sdpa":
        assert model(pixel_values=images, output_attentions=True).attentions == ()


# ------------------------------------------------------------------------------------------------- random


def test_random_explanation_is_reproducible_by_seed(images):
    first = random_explanation(images, (4, 4), seed=3)
    assert first.shape == (4, 4, 4)
    assert torch.equal(first, random_explanation(images, (4, 4), seed=3))
    assert not torch.equal(first, random_explanation(images, (4, 4), seed=4))
    assert (first >= 0).all() and (first < 1).all()
    state = torch.random.get_rng_state()
    random_explanation(images, (2, 3))
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("grid", [(0, 4), (4,), "44", (2.0, 2)])
def test_random_explanation_rejects_bad_grids(images, grid):
    with pytest.raises(ValueError, match="grid"):
        random_explanation(images, grid)


def test_standardized_blend_is_the_mean_of_per_image_z_scores():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 4, 4, generator=generator), torch.rand(3, 4, 4, generator=generator)

    def z(m):
        flat = m.flatten(1)
        return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(m)

    torch.testing.assert_close(standardized_blend(a, b), (z(a) + z(b)) / 2)
    # A per-image affine change of either map (positive scale) leaves the blend as it was: nothing to calibrate.
    scale, shift = (
        torch.tensor([2.0, 0.1, 50.0])[:, None, None],
        torch.tensor([-1.0, 3.0, 0.0])[:, None, None],
    )
    torch.testing.assert_close(standardized_blend(a * scale + shift, b), standardized_blend(a, b))
    # A constant map carries no ranking: it contributes zeros, not NaNs.
    flat = standardized_blend(a, torch.ones_like(a))
    torch.testing.assert_close(flat, z(a) / 2)
    # Blending a map with itself gives back its z-scores: the same ranking and the same Pearson with anything.
    torch.testing.assert_close(standardized_blend(a, a), z(a))


def test_standardized_blend_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one map"):
        standardized_blend()
    with pytest.raises(ValueError, match="one shape"):
        standardized_blend(torch.zeros(2, 4, 4), torch.zeros(2, 2, 8))


def test_blend_with_rollout_blends_the_models_own_map_with_its_rollout(images):
    from selfexplain import ViTForSelfExplainingClassification, blend_with_rollout

    torch.manual_seed(0)
    model = ViTForSelfExplainingClassification(tiny_config(num_labels=3)).eval()
    with torch.no_grad():
        out = model(images, explain="predicted")
    expected = standardized_blend(out.explanation, attention_rollout(model, images))
    torch.testing.assert_close(blend_with_rollout(model, images), expected)
    # Another class explained: another map, the same rollout (it is class-agnostic).
    other = (out.explained_classes + 1) % 3
    with torch.no_grad():
        theirs = model(images, explain=other).explanation
    torch.testing.assert_close(
        blend_with_rollout(model, images, explain=other),
        standardized_blend(theirs, attention_rollout(model, images)),
    )
    assert not torch.allclose(blend_with_rollout(model, images, explain=other), expected)
    with pytest.raises(TypeError, match="self-explaining model"):
        blend_with_rollout(ViTForImageClassification(tiny_config(num_labels=3)), images)
