"""A vector made at one image size, applied to a classifier fine-tuned at another (opt-in position-embedding resize)."""

import pytest
import torch
from safetensors.torch import load_file

from selfexplain import (
    ExplanationVector,
    IncompatibleExplanationVectorError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
    fit_alpha,
)
from selfexplain.cli import main
from selfexplain.vectors.checkpoint_keys import serialized_state_dict
from selfexplain.vectors.resolution import POSITION_EMBEDDINGS_KEY, resize_position_embeddings
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining

PE = "vit.embeddings.position_embeddings"


@pytest.fixture(scope="module")
def vector() -> ExplanationVector:
    """Made at 16 px with 4 px patches: a 4×4 patch grid."""
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=70),
        prediction_only=tiny_classifier(seed=71),
        base_model="org/tiny-base",
        recommended_alpha=1.0,
    )


def target_at(size: int, seed: int = 72):
    """A classifier of the vector's architecture fine-tuned at another image size (same 4 px patches)."""
    return tiny_classifier(seed=seed, image_size=size)


def test_resize_is_transformers_interpolation():
    model = tiny_classifier(seed=73)  # 16 px, 4×4 grid
    embeddings = model.vit.embeddings
    tokens = torch.zeros(1, 1 + 6 * 6, model.config.hidden_size)
    expected = embeddings.interpolate_pos_encoding(tokens, 24, 24)  # what transformers does at 24 px
    resized = resize_position_embeddings(embeddings.position_embeddings.detach(), (4, 4), (6, 6))
    torch.testing.assert_close(resized, expected.detach(), rtol=0, atol=1e-6)
    same = embeddings.position_embeddings.detach()
    assert resize_position_embeddings(same, (4, 4), (4, 4)) is same
    with pytest.raises(ValueError, match="do not fit a 5×5 patch grid"):
        resize_position_embeddings(same, (5, 5), (6, 6))


def test_another_image_size_is_refused_unless_asked_and_the_error_says_how(tmp_path, vector):
    target = target_at(24)
    with pytest.raises(IncompatibleExplanationVectorError, match="resize_position_embeddings=True") as info:
        apply_explanation_vector(target, vector)
    assert "image_size: vector 16, model 24" in str(info.value)
    target.save_pretrained(tmp_path / "t24")
    with pytest.raises(IncompatibleExplanationVectorError, match="--resize-position-embeddings"):
        apply_explanation_vector(tmp_path / "t24", vector)
    # A different patch size is a different model: no resize bridges it, and no hint is given.
    other_patch = tiny_classifier(seed=74, patch_size=8)
    for resize in (False, True):
        with pytest.raises(IncompatibleExplanationVectorError, match="patch_size") as info:
            apply_explanation_vector(other_patch, vector, resize_position_embeddings=resize)
        assert "resize_position_embeddings=True" not in str(info.value)


@pytest.mark.parametrize("path", ["folder", "loaded", "inplace"])
def test_resized_vector_is_the_hand_computation_on_every_path(tmp_path, vector, path):
    target = target_at(24)  # a 6×6 patch grid
    before = {k: v.detach().clone() for k, v in serialized_state_dict(target).items()}
    alpha = 0.7
    if path == "folder":
        target.save_pretrained(tmp_path / "t24")
        vector.save_pretrained(tmp_path / "vec")
        patched = apply_explanation_vector(
            tmp_path / "t24", tmp_path / "vec", alpha=alpha, resize_position_embeddings=True
        )
    elif path == "loaded":
        patched = apply_explanation_vector(target, vector, alpha=alpha, resize_position_embeddings=True)
    else:
        target = ViTForSelfExplainingClassification.from_pretrained(_saved(target, tmp_path / "t24"))
        patched = apply_explanation_vector(
            target, vector, alpha=alpha, resize_position_embeddings=True, inplace=True
        )
        assert patched is target
    state = serialized_state_dict(patched)
    for key, delta in vector.tensors.items():
        if key == PE:
            expected = before[PE] + alpha * resize_position_embeddings(delta, (4, 4), (6, 6))
            assert state[PE].shape == (1, 37, 32)
        else:
            expected = before[key] + alpha * delta
        torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-6, msg=key)
    assert patched.config.selfexplain_applied_vector["resized_position_embeddings"] == {
        "from": [4, 4],
        "to": [6, 6],
    }
    with torch.no_grad():
        out = patched(pixels(2, size=24), explain="predicted")
    assert out.explanation.shape == (2, 6, 6)

    patched.save_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "made at a 4×4 patch grid" in card and "this model's 6×6 grid" in card
    reloaded = ViTForSelfExplainingClassification.from_pretrained(tmp_path / "out")
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")[PE], state[PE])
    assert reloaded.config.selfexplain_applied_vector["resized_position_embeddings"]["to"] == [6, 6]


def test_alpha_zero_and_a_smaller_model_and_an_extension_vector(tmp_path):
    """α = 0 leaves the model exactly as it was; a smaller grid works too; an extension travels unchanged."""
    vector = ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=75, explanation_head="extension"),
        prediction_only=tiny_classifier(seed=76),
        base_model="org/tiny-base",
    )
    target = target_at(12, seed=77)  # a 3×3 grid
    unchanged = apply_explanation_vector(target, vector, alpha=0.0, resize_position_embeddings=True)
    assert torch.equal(
        unchanged.vit.embeddings.position_embeddings, target.vit.embeddings.position_embeddings
    )
    patched = apply_explanation_vector(target, vector, alpha=1.0, resize_position_embeddings=True)
    assert patched.vit.embeddings.position_embeddings.shape == (1, 10, 32)
    for name, param in patched.explainer.named_parameters():
        assert torch.equal(param, vector.tensors[f"explainer.{name}"]), name
    x = pixels(3, size=12)
    with torch.no_grad():
        assert patched(x, explain="all").explanation.shape == (3, 3, 3, 3)


def test_fit_alpha_and_the_cli_take_the_option(tmp_path, vector, capsys):
    target = target_at(24)
    fit = fit_alpha(
        target,
        vector,
        pixels(8, size=24),
        per_layer=False,
        grid=(0.0, 1.0),
        min_agreement=0.0,
        progress=False,
        resize_position_embeddings=True,
    )
    patched = apply_explanation_vector(target, vector, alpha=fit, resize_position_embeddings=True)
    assert patched.vit.embeddings.position_embeddings.shape == (1, 37, 32)

    _saved(target, tmp_path / "t24")
    vector.save_pretrained(tmp_path / "vec")
    args = ["apply", "--model", str(tmp_path / "t24"), "--vector", str(tmp_path / "vec"), "--output-dir"]
    with pytest.raises(SystemExit) as refused:
        main([*args, str(tmp_path / "refused")])
    assert refused.value.code != 0
    assert "--resize-position-embeddings" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "out"), "--resize-position-embeddings"]) == 0
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved[POSITION_EMBEDDINGS_KEY].shape == (1, 37, 32)


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder
