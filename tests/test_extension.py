"""The explanation extension: extra blocks that only the explanation reads, trained on a frozen classifier,
carried inside the explanation vector (format 3) and added to a target by `apply_explanation_vector`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from selfexplain import (
    ExplanationVector,
    InvalidExplanationVectorError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
)
from selfexplain.data import default_image_processor
from selfexplain.training import TrainingConfig, train
from selfexplain.vectors.config import VECTOR_CONFIG_NAME
from tests._squares import IMAGE_SIZE, coloured_squares
from tests._tiny import pixels, tiny_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb_extension(model: ViTForSelfExplainingClassification, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.explainer.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    tiny_classifier(seed=0).save_pretrained(path)
    default_image_processor(IMAGE_SIZE).save_pretrained(path)
    return path


def test_a_new_extension_is_the_identity_and_never_changes_the_logits(plain_folder):
    x = pixels(3)
    shared = ViTForSelfExplainingClassification.from_pretrained(plain_folder).eval()
    extended, info = ViTForSelfExplainingClassification.from_pretrained(
        plain_folder, explanation_head="extension", explanation_extension_layers=2, output_loading_info=True
    )
    extended.eval()
    assert sorted(info["missing_keys"]) == sorted(
        f"explainer.{name}" for name in extended.explainer.state_dict()
    )
    assert len(extended.explainer.blocks) == 2
    with torch.no_grad():
        a, b = shared(x, explain="all"), extended(x, explain="all")
    assert torch.equal(a.logits, b.logits)
    # Zero-initialised output projections: training starts from the shared head's map.
    torch.testing.assert_close(a.explanation, b.explanation, rtol=0, atol=1e-6)
    _perturb_extension(extended)
    with torch.no_grad():
        c = extended(x, explain="all")
    assert torch.equal(a.logits, c.logits)  # the CLS token never passes through the extension
    assert (c.explanation - a.explanation).abs().max() > 1e-2
    with torch.no_grad():  # every weight at zero: the identity again
        for param in extended.explainer.parameters():
            param.zero_()
        assert torch.equal(extended(x, explain="all").explanation, a.explanation)


def test_an_extended_model_saves_and_reloads_its_extension(plain_folder, tmp_path):
    model = ViTForSelfExplainingClassification.from_pretrained(plain_folder, explanation_head="extension")
    _perturb_extension(model.eval())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["explanation_head"] == "extension" and config["explanation_extension_layers"] == 1
    again = ViTForSelfExplainingClassification.from_pretrained(tmp_path).eval()
    x = pixels(2)
    with torch.no_grad():
        assert torch.equal(again(x, explain="all").explanation, model(x, explain="all").explanation)
    with pytest.raises(ValueError, match="explanation_head"):
        ViTForSelfExplainingClassification.from_pretrained(plain_folder, explanation_head="mlp")
    with pytest.raises(TypeError, match="unexpected keyword"):
        ViTForSelfExplainingClassification(model.config, explanation_heads="extension")


@pytest.fixture(scope="module")
def trained_extension(tmp_path_factory):
    """A prediction-only classifier of coloured squares, and an extension trained on it (amortised objective)."""
    root = tmp_path_factory.mktemp("extension-run")
    base = root / "base"
    tiny_classifier(seed=0, num_labels=3, id2label={0: "red", 1: "green", 2: "blue"}).save_pretrained(base)
    default_image_processor(IMAGE_SIZE).save_pretrained(base)
    data = coloured_squares(64, seed=0).remove_columns("explanation_targets")
    common = dict(num_epochs=6, batch_size=16, learning_rate=3e-3, log_every=4, augment=False)
    common["checkpoint_every"] = None
    pred = root / "pred"
    train(TrainingConfig(base=str(base), output_dir=str(pred), **common), data)
    se = root / "se"
    train(
        TrainingConfig(
            base=str(pred),
            output_dir=str(se),
            explanation_loss_weight=10.0,
            explanation_objective="shapley",
            value_model=str(pred),
            coalitions_per_image=8,
            removal_baseline="zero",
            explanation_head="extension",
            trainable="extension",
            **common,
        ),
        data,
    )
    return pred, se


def test_training_only_the_extension_keeps_every_other_weight_and_learns(trained_extension):
    pred, se = trained_extension
    before, after = load_file(pred / "model.safetensors"), load_file(se / "model.safetensors")
    extension = sorted(k for k in after if k.startswith("explainer."))
    assert extension and set(after) - set(before) == set(extension)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key  # frozen: the logits stay the classifier's
    assert any(after[k].abs().max() > 0 for k in extension if ".proj." in k or ".fc2." in k)
    log = [json.loads(line) for line in (se / "log.jsonl").read_text().splitlines()]
    losses = [r["explanation_loss"] for r in log if r["type"] == "train"]
    assert min(losses[-3:]) < losses[0]


def test_training_the_extension_needs_one_and_a_nonzero_weight(trained_extension, tmp_path):
    pred, _ = trained_extension
    with pytest.raises(ValueError, match="trainable"):
        TrainingConfig(base=str(pred), output_dir=str(tmp_path), trainable="extension")
    with pytest.raises(ValueError, match="trainable"):
        TrainingConfig(base=str(pred), output_dir=str(tmp_path), trainable="head")
    data = coloured_squares(8, seed=0)
    config = TrainingConfig(
        base=str(pred),
        output_dir=str(tmp_path),
        explanation_loss_weight=1.0,
        trainable="extension",
        max_steps=1,
    )
    with pytest.raises(ValueError, match='explanation_head="extension"'):
        train(config, data)


def test_the_vector_carries_the_extension_and_rebuilds_the_self_explaining_model(trained_extension, tmp_path):
    pred_dir, se_dir = trained_extension
    pred = ViTForSelfExplainingClassification.from_pretrained(pred_dir).eval()
    se = ViTForSelfExplainingClassification.from_pretrained(se_dir).eval()
    vector = ExplanationVector.from_models(self_explaining=se, prediction_only=pred)
    extension = {k: v for k, v in vector.tensors.items() if k.startswith("explainer.")}
    assert extension and all(torch.equal(v, se.state_dict()[k]) for k, v in extension.items())
    assert all(not v.any() for k, v in vector.tensors.items() if k.startswith("vit."))  # frozen backbone
    vector.save_pretrained(tmp_path / "vector")
    config = json.loads((tmp_path / "vector" / VECTOR_CONFIG_NAME).read_text())
    assert config["format_version"] == 3
    loaded = ExplanationVector.from_pretrained(tmp_path / "vector")
    assert loaded.config.extension_layers == 1

    x = pixels(4)
    with torch.no_grad():
        wanted = se(x, explain="all")
        shared = pred(x, explain="all")
    plain = ViTForImageClassification.from_pretrained(pred_dir).eval()
    targets = {
        "folder": apply_explanation_vector(str(pred_dir), tmp_path / "vector", alpha=1.0),
        "loaded classifier": apply_explanation_vector(plain, loaded, alpha=1.0),
        "in place": apply_explanation_vector(
            ViTForSelfExplainingClassification.from_pretrained(pred_dir), loaded, alpha=1.0, inplace=True
        ),
    }
    for name, model in targets.items():
        with torch.no_grad():
            out = model.eval()(x, explain="all")
        assert torch.equal(out.logits, wanted.logits), name
        torch.testing.assert_close(out.explanation, wanted.explanation, rtol=0, atol=1e-6, msg=name)
    # α = 0 adds an all-zero extension: the shared head's map, exactly.
    unchanged = apply_explanation_vector(str(pred_dir), loaded, alpha=0.0).eval()
    with torch.no_grad():
        assert torch.equal(unchanged(x, explain="all").explanation, shared.explanation)

    # The applied model saves with its extension and loads back, also compressed vectors keep format 3.
    targets["folder"].save_pretrained(tmp_path / "applied")
    again = ViTForSelfExplainingClassification.from_pretrained(tmp_path / "applied").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x, explain="all").explanation, wanted.explanation, rtol=0, atol=1e-6)
    loaded.save_pretrained(tmp_path / "small", compression="low_rank:4")
    small = json.loads((tmp_path / "small" / VECTOR_CONFIG_NAME).read_text())
    assert small["format_version"] == 3 and small["compression"] is not None
    assert ExplanationVector.from_pretrained(tmp_path / "small").config.extension_layers == 1


def test_the_command_line_extracts_the_extension_and_can_store_it_alone(trained_extension, tmp_path):
    from selfexplain.cli import main

    pred_dir, se_dir = trained_extension
    common = ["extract-vector", "--self-explaining", str(se_dir), "--prediction-only", str(pred_dir)]
    assert main([*common, "--output-dir", str(tmp_path / "all")]) == 0
    assert main([*common, "--include", "explainer.*", "--output-dir", str(tmp_path / "alone")]) == 0
    every = ExplanationVector.from_pretrained(tmp_path / "all")
    alone = ExplanationVector.from_pretrained(tmp_path / "alone")
    assert every.config.extension_layers == alone.config.extension_layers == 1
    assert set(alone.tensors) == {k for k in every.tensors if k.startswith("explainer.")}
    x = pixels(2)
    with torch.no_grad():
        a = apply_explanation_vector(str(pred_dir), tmp_path / "all", alpha=1.0).eval()(x, explain="all")
        b = apply_explanation_vector(str(pred_dir), tmp_path / "alone", alpha=1.0).eval()(x, explain="all")
    assert torch.equal(a.explanation, b.explanation)  # the backbone deltas of a frozen backbone are zero


def test_an_in_place_update_that_fails_removes_the_extension_it_added(trained_extension):
    pred_dir, se_dir = trained_extension
    vector = ExplanationVector.from_models(
        self_explaining=ViTForSelfExplainingClassification.from_pretrained(se_dir),
        prediction_only=ViTForSelfExplainingClassification.from_pretrained(pred_dir),
    )
    vector.tensors["explainer.blocks.0.fc2.weight"][0, 0] = float("nan")
    model = ViTForSelfExplainingClassification.from_pretrained(pred_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="overflow|NaN"):
        apply_explanation_vector(model, vector, alpha=1.0, inplace=True)
    assert model.explainer is None and model.config.explanation_head == "shared"
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_extension_tensors_are_checked_before_they_are_read(trained_extension, tmp_path):
    pred_dir, se_dir = trained_extension
    vector = ExplanationVector.from_models(
        self_explaining=ViTForSelfExplainingClassification.from_pretrained(se_dir),
        prediction_only=ViTForSelfExplainingClassification.from_pretrained(pred_dir),
    )
    vector.save_pretrained(tmp_path / "v")
    path = tmp_path / "v" / VECTOR_CONFIG_NAME
    good = json.loads(path.read_text())

    def refused(change, match):
        config = json.loads(json.dumps(good))
        change(config)
        path.write_text(json.dumps(config))
        with pytest.raises(InvalidExplanationVectorError, match=match):
            ExplanationVector.from_pretrained(tmp_path / "v")

    refused(lambda c: c.update(format_version=2), "format_version 3")
    refused(lambda c: c["tensors"]["explainer.blocks.0.fc1.weight"].update(shape=[7, 7]), "fc1.weight.*shape")
    refused(
        lambda c: c["tensors"].update({"explainer.blocks.99.fc1.bias": {"shape": [64], "dtype": "float32"}}),
        "at most 64",
    )
    refused(
        lambda c: c["tensors"].update({"explainer.head.bias": {"shape": [1], "dtype": "float32"}}),
        "not a tensor of a ViT",
    )
