"""α per transformer block (`LayerAlpha`) and its label-free fit (`fit_alpha`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from selfexplain import ExplanationVector, LayerAlpha, apply_explanation_vector, fit_alpha
from selfexplain.vectors.checkpoint_keys import serialized_state_dict

from ._tiny import pixels, tiny_classifier, tiny_self_explaining


@pytest.fixture(scope="module")
def vector() -> ExplanationVector:
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=1), prediction_only=tiny_self_explaining(seed=2)
    )


def test_layer_alpha_maps_keys_to_blocks_and_round_trips():
    alpha = LayerAlpha(blocks=(0.0, 2.0), other=0.5)
    assert alpha.alpha_for("vit.encoder.layer.1.output.dense.weight") == 2.0
    assert alpha.alpha_for("vit.encoder.layer.0.attention.attention.query.bias") == 0.0
    assert alpha.alpha_for("vit.embeddings.position_embeddings") == 0.5
    assert alpha.alpha_for("vit.layernorm.weight") == 0.5
    assert LayerAlpha.from_dict(alpha.to_dict()) == alpha
    assert LayerAlpha.uniform(1.5, 2).is_uniform and not alpha.is_uniform
    assert LayerAlpha((np.float32(0.5), 1), other=np.float64(1.0)).blocks == (0.5, 1.0)
    with pytest.raises(ValueError, match="block 2"):
        alpha.alpha_for("vit.encoder.layer.2.output.dense.weight")
    with pytest.raises(ValueError, match="finite"):
        LayerAlpha((math.nan, 1.0), 1.0)
    with pytest.raises(TypeError, match="number"):
        LayerAlpha((True, 1.0), 1.0)
    with pytest.raises(ValueError, match="Unknown LayerAlpha fields"):
        LayerAlpha.from_dict({"type": "per_layer", "blocks": [1.0], "other": 1.0, "gamma": 2})
    with pytest.raises(ValueError, match="transformer blocks"):
        LayerAlpha.uniform(1.0, 3).check_model(2)


def test_apply_with_layer_alpha_scales_each_block_by_its_own_alpha(vector):
    target = tiny_classifier(seed=3)
    uniform = apply_explanation_vector(target, vector, alpha=LayerAlpha.uniform(0.5, 2))
    scalar = apply_explanation_vector(target, vector, alpha=0.5)
    for (name, a), (_, b) in zip(uniform.state_dict().items(), scalar.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    only_block_1 = apply_explanation_vector(target, vector, alpha=LayerAlpha((0.0, 1.0), other=0.0))
    # Keyed by checkpoint names, as the vector is (transformers 5 names modules differently in memory).
    original, patched = serialized_state_dict(target), serialized_state_dict(only_block_1)
    changed = set()
    for key, delta in vector.tensors.items():
        expected = original[key] + delta if key.startswith("vit.encoder.layer.1.") else original[key]
        torch.testing.assert_close(patched[key], expected, msg=key)
        changed |= {key} if key.startswith("vit.encoder.layer.1.") and delta.abs().max() > 0 else set()
    assert changed, "the vector has no block-1 tensors to test with"
    assert only_block_1.config.selfexplain_applied_vector["alpha"] == {
        "type": "per_layer",
        "blocks": [0.0, 1.0],
        "other": 0.0,
    }
    with pytest.raises(ValueError, match="transformer blocks"):
        apply_explanation_vector(target, vector, alpha=LayerAlpha.uniform(1.0, 3))


def test_fit_alpha_keeps_predictions_and_is_deterministic(vector):
    target = tiny_classifier(seed=3)
    images = pixels(batch=24, seed=5)
    # A vector 30× too large: at α ≥ 0.25 it changes predictions, so the constraint has to bite.
    loud = ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=1), prediction_only=tiny_self_explaining(seed=2)
    )
    loud.tensors = {k: v * 30 for k, v in loud.tensors.items()}
    fit = fit_alpha(target, loud, images, min_agreement=0.9, auc_steps=4, progress=False)
    again = fit_alpha(target, loud, images, min_agreement=0.9, auc_steps=4, progress=False)
    assert fit.alpha == again.alpha and fit.objective == again.objective
    assert isinstance(fit.alpha, LayerAlpha)
    # The agreement it reports is the one a user measures after applying it.
    patched = apply_explanation_vector(target, loud, alpha=fit.alpha)
    with torch.no_grad():
        kept = (
            (patched(images, explain=None).logits.argmax(-1) == target(images).logits.argmax(-1))
            .float()
            .mean()
        )
    assert float(kept) == pytest.approx(fit.top1_agreement) and fit.top1_agreement >= 0.9
    # Per block never does worse than the best global α it starts from, which is never worse than α = 0.
    assert fit.objective >= fit.global_objective >= fit.unpatched_objective
    assert any(entry["top1_agreement"] < 0.9 for entry in fit.history), "the constraint never bit"
    # Every candidate: one pass for predictions and maps, then insertion and deletion at 5 points each.
    assert fit.forward_passes == len(images) * (1 + len(fit.history) * (1 + 2 * 5))
    record = fit.to_dict()
    assert record["alpha"]["type"] == "per_layer" and record["num_images"] == 24
    # Applying the fit itself records it: the applied model's config (and card) say how α was chosen.
    recorded = apply_explanation_vector(target, loud, alpha=fit).config.selfexplain_applied_vector
    assert recorded["alpha_fit"] == record and recorded["alpha"] == record["alpha"]


def test_fit_alpha_global_only_returns_a_float(vector):
    fit = fit_alpha(
        tiny_classifier(seed=3), vector, pixels(batch=8), per_layer=False, auc_steps=2, progress=False
    )
    assert isinstance(fit.alpha, float) and fit.alpha == fit.global_alpha
    assert len(fit.history) == 7  # the default grid
    with pytest.raises(ValueError, match="must contain 0.0"):
        fit_alpha(tiny_classifier(), vector, pixels(batch=2), grid=(0.5, 1.0), progress=False)
    with pytest.raises(ValueError, match="image processor"):
        fit_alpha(tiny_classifier(), vector, [Image.new("RGB", (16, 16))], progress=False)


def test_fit_alpha_searches_only_the_blocks_a_vector_moves(vector):
    """α on a block whose deltas are all zero cannot change the model: such blocks are not searched (an
    explanation extension's vector moves none of the backbone's); they keep the global α."""
    target, images = tiny_classifier(seed=3), pixels(batch=8, seed=5)
    kwargs = dict(auc_steps=2, progress=False)
    full = fit_alpha(target, vector, images, **kwargs)
    grid, blocks = 7, 2  # the default grid; the tiny model's blocks
    assert len(full.history) == grid + (blocks + 1) * (grid - 1)
    # The same vector with block 1 and everything outside the blocks set to zero: only block 0 is searched.
    block0 = ExplanationVector(
        {
            k: (v if k.startswith("vit.encoder.layer.0.") else torch.zeros_like(v))
            for k, v in vector.tensors.items()
        },
        vector.config,
    )
    fit = fit_alpha(target, block0, images, **kwargs)
    assert len(fit.history) == grid + (grid - 1)
    assert all(entry["alpha"]["blocks"][1] == fit.global_alpha for entry in fit.history[grid:])
    assert fit.alpha.blocks[1] == fit.alpha.other == fit.global_alpha
