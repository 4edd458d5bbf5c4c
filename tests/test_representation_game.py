"""The representation game (`TrainingConfig.explanation_game="representation"`): the extension learns the
Shapley values of the frozen backbone's CLS token, so any linear head on that backbone reads its own logit
Shapley values from the same extension, including a head the extension never saw."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from selfexplain import ViTForSelfExplainingClassification
from selfexplain.attribution.amortized import cls_representation, coalition_values, shapley_kernel_coalitions
from selfexplain.attribution.shapley import kernel_shap_values
from selfexplain.data import default_image_processor
from selfexplain.evaluation.metrics import pearson
from selfexplain.training import TrainingConfig, train
from tests._extension import colour_classifier, extension_config
from tests._squares import IMAGE_SIZE, coloured_squares
from tests._tiny import pixels, tiny_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A prediction-only colour classifier, and two extensions of it: one trained on the probability game,
    one on the representation game."""
    root = tmp_path_factory.mktemp("representation")
    pred, colours = colour_classifier(root)
    train(extension_config(root, pred, "probs"), colours)
    train(extension_config(root, pred, "representation", explanation_game="representation"), colours)
    return {"root": root, "pred": pred, "probs": root / "probs", "representation": root / "representation"}


def test_the_representation_is_what_the_classifier_reads():
    """v(S) of the representation game, put through the head, is exactly the logits on the same coalitions."""
    model = tiny_classifier(seed=1)
    images = pixels(3)
    coalitions = shapley_kernel_coalitions(16, 4, [torch.Generator().manual_seed(i) for i in range(3)])
    values, empty, full = coalition_values(model, images, coalitions, (4, 4), "zero", game="representation")
    assert values.shape == (3, 8, 32) and empty.shape == full.shape == (3, 32)
    with torch.no_grad():
        assert torch.allclose(model.classifier(full), model(pixel_values=images).logits, atol=1e-5)
        assert torch.allclose(
            model.classifier(empty), model(pixel_values=torch.zeros_like(images)).logits, atol=1e-5
        )
    assert torch.allclose(full, cls_representation(model, images).detach(), atol=1e-6)
    with pytest.raises(ValueError, match="game"):
        coalition_values(model, images, coalitions, (4, 4), "zero", game="logits")
    with pytest.raises(TypeError, match="representation"):
        cls_representation(lambda x: x, images)


def test_logits_unchanged_and_the_game_recorded(runs):
    pred = load_file(runs["pred"] / "model.safetensors")
    trained = load_file(runs["representation"] / "model.safetensors")
    assert all(torch.equal(trained[k], v) for k, v in pred.items())
    assert {k for k in trained if k not in pred} == {k for k in trained if k.startswith("explainer.")}
    config = json.loads((runs["representation"] / "config.json").read_text())
    assert config["selfexplain_targets"]["value"] == "representation"
    assert json.loads((runs["probs"] / "config.json").read_text())["selfexplain_targets"]["value"] == "probs"


def test_a_head_the_extension_never_saw_reads_its_own_shapley_values(runs):
    """What the representation game is for: a new linear head (another label set) on the same backbone,
    reading the extension trained on the colour head, agrees with *its own* logit Shapley values far better
    than the extension trained on the colour head's probabilities does."""
    held_out = list(coloured_squares(24, seed=7)["image"])
    images = default_image_processor(IMAGE_SIZE)(held_out, return_tensors="pt")["pixel_values"]
    agreement = {}
    for name in ("probs", "representation"):
        scores = []
        for head_seed in (3, 4, 5):  # three 5-class heads the extension was never trained with
            model = ViTForSelfExplainingClassification.from_pretrained(runs[name]).eval()
            generator = torch.Generator().manual_seed(head_seed)
            with torch.no_grad():
                model.classifier = torch.nn.Linear(32, 5)
                model.classifier.weight.copy_(torch.randn(5, 32, generator=generator))
                model.classifier.bias.zero_()
                model.config.num_labels = 5
                classes = model(images, explain=None).logits.argmax(-1)
                maps = model(images, explain=classes).explanation.flatten(1)
            reference = kernel_shap_values(
                model, images, grid=(4, 4), budget=2048, baseline="zero", seed=0, value="logits"
            )[torch.arange(len(images)), classes].flatten(1)
            scores.append(float(torch.nan_to_num(pearson(maps, reference)).mean()))
        agreement[name] = sum(scores) / len(scores)
    # Measured when written: representation 0.59 (0.65, 0.46, 0.66), probs 0.33 (0.74, 0.14, 0.12).
    assert agreement["representation"] > 0.5, agreement
    assert agreement["representation"] > agreement["probs"] + 0.15, agreement


def test_the_representation_game_needs_a_frozen_backbone_and_its_width(runs, tmp_path):
    with pytest.raises(ValueError, match="explanation_game"):
        TrainingConfig(
            base="b", output_dir="o", explanation_loss_weight=1.0, explanation_objective="shapley",
            value_model="v", explanation_game="representation",
        )  # fmt: skip
    with pytest.raises(ValueError, match="explanation_game"):
        TrainingConfig(base="b", output_dir="o", explanation_game="pixels")
    wide = tmp_path / "wide"
    tiny_classifier(
        seed=0, num_labels=3, hidden_size=48, id2label={0: "red", 1: "green", 2: "blue"}
    ).save_pretrained(wide)
    colours = coloured_squares(32, seed=0).remove_columns("explanation_targets")
    config = extension_config(
        tmp_path, runs["pred"], "bad", explanation_game="representation", value_model=str(wide)
    )
    with pytest.raises(ValueError, match="hidden_size 48"):
        train(config, colours)
