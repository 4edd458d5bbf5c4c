import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, ViTForImageClassification

from selfexplain import ViTForSelfExplainingClassification, explanation_to_heatmap
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining


@pytest.fixture()
def classifier_dir(tmp_path):
    model = tiny_classifier(seed=1)
    model.save_pretrained(tmp_path / "clf")
    return tmp_path / "clf", model


def test_plain_checkpoint_loads_with_no_missing_or_unexpected_keys_and_same_logits(classifier_dir):
    path, plain = classifier_dir
    model, info = ViTForSelfExplainingClassification.from_pretrained(path, output_loading_info=True)
    assert (
        info["missing_keys"] == set()
        and info["unexpected_keys"] == set()
        and info["mismatched_keys"] == set()
    )
    x = pixels(4)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, plain(x).logits, atol=1e-6, rtol=0)
    assert set(model.state_dict()) == set(plain.state_dict())


def test_save_and_reload_round_trips(tmp_path):
    model = tiny_self_explaining(seed=2)
    model.config.explanation_loss_weight = 0.25
    model.save_pretrained(tmp_path / "se")
    config = json.loads((tmp_path / "se" / "config.json").read_text())
    assert config["explanation_loss_weight"] == 0.25 and config["explanation_loss"] == "mse"
    reloaded = ViTForSelfExplainingClassification.from_pretrained(tmp_path / "se").eval()
    x = pixels(2)
    with torch.no_grad():
        a, b = model(x, explain="all"), reloaded(x, explain="all")
    assert torch.equal(a.logits, b.logits) and torch.equal(a.explanation, b.explanation)
    assert reloaded.config.explanation_loss_weight == 0.25


def test_explanation_is_the_classifier_applied_to_final_patch_tokens():
    model = tiny_self_explaining(seed=3)
    x = pixels(2)
    with torch.no_grad():
        out = model(x, explain="all", output_hidden_states=True)
        tokens = model.vit(x).last_hidden_state[:, 1:]
        expected = model.classifier(tokens).permute(0, 2, 1).reshape(2, 3, 4, 4)
    assert torch.allclose(out.explanation, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("explain", "shape"),
    [("predicted", (2, 4, 4)), ("all", (2, 3, 4, 4)), (1, (2, 4, 4)), ([2, 0], (2, 2, 4, 4)), (None, None)],
)
def test_explain_modes_shapes(explain, shape):
    model = tiny_self_explaining()
    with torch.no_grad():
        out = model(pixels(2), explain=explain)
    if shape is None:
        assert out.explanation is None and out.explained_classes is None
    else:
        assert tuple(out.explanation.shape) == shape


def test_predicted_map_is_the_matching_slice_of_all_maps():
    model = tiny_self_explaining(seed=4)
    x = pixels(3)
    with torch.no_grad():
        one = model(x)
        every = model(x, explain="all")
        chosen = model(x, explain=torch.tensor([2, 0, 1]))
    predicted = one.logits.argmax(-1)
    assert torch.equal(one.explained_classes, predicted)
    assert torch.allclose(one.explanation, every.explanation[torch.arange(3), predicted], atol=1e-6)
    assert torch.allclose(
        chosen.explanation, every.explanation[torch.arange(3), torch.tensor([2, 0, 1])], atol=1e-6
    )


def test_predicted_map_does_not_compute_all_classes():
    # With many classes, the predicted-class path must only touch one classifier row per image.
    model = tiny_self_explaining(num_labels=50)
    calls = []
    original = torch.einsum

    def spy(equation, *operands):
        calls.append(tuple(operands[1].shape))
        return original(equation, *operands)

    torch.einsum = spy
    try:
        with torch.no_grad():
            model(pixels(2))
    finally:
        torch.einsum = original
    assert calls == [(2, 32)]


def test_non_default_image_size_with_interpolated_positions():
    model = tiny_self_explaining()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 24, 20), interpolate_pos_encoding=True, explain="all")
    assert tuple(out.explanation.shape) == (2, 3, 6, 5)


def test_bad_explain_arguments_are_clear_errors():
    model = tiny_self_explaining()
    with pytest.raises(ValueError, match="outside"):
        model(pixels(2), explain=[5])
    with pytest.raises(ValueError, match="predicted"):
        model(pixels(2), explain="everything")
    with pytest.raises(ValueError, match="batch"):
        model(pixels(2), explain=torch.tensor([0, 1, 2]))


def test_loss_composition_all_classes_and_label_only():
    model = tiny_self_explaining(seed=5)
    model.config.explanation_loss_weight = 0.5
    x, labels = pixels(2), torch.tensor([0, 2])
    targets = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.01
    out = model(x, labels=labels, explanation_targets=targets)
    assert torch.allclose(out.loss, out.classification_loss + 0.5 * out.explanation_loss)
    ce = torch.nn.functional.cross_entropy(out.logits, labels)
    assert torch.allclose(out.classification_loss, ce)
    scores = model(x, explain="all").explanation
    assert torch.allclose(out.explanation_loss, torch.mean((scores - targets * 16) ** 2), atol=1e-6)
    # Without labels, the loss is the explanation part alone.
    no_labels = model(x, explanation_targets=targets)
    assert no_labels.classification_loss is None
    assert torch.allclose(no_labels.loss, 0.5 * no_labels.explanation_loss)
    # Targets for the labelled class only.
    label_only = model(x, labels=labels, explanation_targets=targets[torch.arange(2), labels])
    expected = torch.mean((scores[torch.arange(2), labels] - targets[torch.arange(2), labels] * 16) ** 2)
    assert torch.allclose(label_only.explanation_loss, expected, atol=1e-6)
    out.loss.backward()
    assert model.vit.embeddings.cls_token.grad is not None


def test_coarser_target_grid_and_pearson_loss():
    model = tiny_self_explaining(seed=6)
    model.config.explanation_loss = "pearson"
    x = pixels(2)
    scores = model(x, explain="all").explanation.detach()
    pooled = torch.nn.functional.avg_pool2d(scores.reshape(6, 1, 4, 4), 2).reshape(2, 3, 2, 2)
    # Targets that are an affine function of the pooled scores correlate perfectly: loss ≈ 0.
    out = model(x, explanation_targets=3.0 * pooled + 1.0)
    assert out.explanation_loss.item() < 1e-5
    out = model(x, explanation_targets=-pooled)
    assert out.explanation_loss.item() > 1.99
    with pytest.raises(ValueError, match="divide"):
        model(x, explanation_targets=torch.zeros(2, 3, 3, 3))
    with pytest.raises(ValueError, match="labels"):
        model(x, explanation_targets=torch.zeros(2, 4, 4))


def test_auto_class_loading_with_and_without_remote_code(tmp_path):
    model = tiny_self_explaining(seed=7)
    model.save_pretrained(tmp_path / "se")
    assert (tmp_path / "se" / "modeling_self_explaining_vit.py").exists()
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "se")
    assert type(plain) is ViTForImageClassification
    remote = AutoModelForImageClassification.from_pretrained(tmp_path / "se", trust_remote_code=True)
    assert type(remote).__name__ == "ViTForSelfExplainingClassification"
    assert type(remote) is not ViTForSelfExplainingClassification  # the copy shipped in the folder
    x = pixels(2)
    with torch.no_grad():
        assert torch.allclose(plain(x).logits, model(x).logits, atol=1e-6)
        assert torch.allclose(
            remote(x, explain="all").explanation, model(x, explain="all").explanation, atol=1e-6
        )
    saved = load_file(tmp_path / "se" / "model.safetensors")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in saved


def test_heatmap_upsamples_and_normalises():
    expl = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    heat = explanation_to_heatmap(expl, (16, 16))
    assert heat.shape == (1, 16, 16)
    assert heat.min().item() == 0.0 and heat.max().item() == pytest.approx(1.0)
    assert heat[0, 0, 0] < heat[0, -1, -1]
    raw = explanation_to_heatmap(expl, (8, 8), mode="nearest", normalize=False)
    assert torch.equal(raw[0, ::2, ::2], expl[0])
