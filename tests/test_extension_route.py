"""An inner-block extension whose tokens go through the model's own later blocks (`explanation_extension_route=
"backbone"`): the zero extension gives the model's own map exactly, the logits never change, the route is trained,
recorded in the vector (format 5) and checked wherever extensions are added or combined."""

from __future__ import annotations

import json

import pytest
import torch

from selfexplain import (
    ExplanationVector,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
)
from selfexplain.training import TrainingConfig, train
from selfexplain.vectors.config import VECTOR_CONFIG_NAME
from tests._extension import (
    assert_config_edits_refused,
    assert_never_combined,
    colour_classifier,
    extension_config,
    trained_vector,
)
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTED = {"explanation_head": "extension", "explanation_extension_route": "backbone"}


@pytest.mark.parametrize("layer", [0, 1])
def test_the_zero_extension_routed_through_the_backbone_is_the_models_own_map(layer):
    """A query token equal to patch token j, reading the image's tokens in every later block, is patch token j:
    the zero extension changes nothing, and a non-zero one changes the map but never the logits."""
    own = tiny_self_explaining(seed=3).eval()
    routed = tiny_self_explaining(seed=3, explanation_extension_input_layer=layer, **ROUTED).eval()
    routed.load_state_dict(own.state_dict(), strict=False)
    with torch.no_grad():
        for param in routed.explainer.parameters():
            param.zero_()
    x = pixels(3)
    with torch.no_grad():
        expected = own(x, explain="all")
        zero = routed(x, explain="all")
        torch.testing.assert_close(zero.explanation, expected.explanation, rtol=0, atol=1e-5)
        generator = torch.Generator().manual_seed(0)
        for param in routed.explainer.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
        moved = routed(x, explain="all")
    assert torch.equal(moved.logits, expected.logits)
    assert (moved.explanation - expected.explanation).abs().max() > 1e-3
    # The classifier route with the same (non-zero) weights scores block `layer`'s tokens without the later blocks.
    direct = tiny_self_explaining(
        seed=3, explanation_head="extension", explanation_extension_input_layer=layer
    )
    direct.load_state_dict(routed.state_dict())
    with torch.no_grad():
        assert (direct.eval()(x, explain="all").explanation - moved.explanation).abs().max() > 1e-3


def test_the_route_needs_an_inner_block():
    for layer in (None, 2):  # the tiny ViT has 2 blocks: nothing comes after block 2
        with pytest.raises(ValueError, match="explanation_extension_route"):
            tiny_self_explaining(explanation_extension_input_layer=layer, **ROUTED)
    with pytest.raises(ValueError, match="explanation_extension_route"):
        tiny_self_explaining(explanation_head="extension", explanation_extension_route="elsewhere")
    with pytest.raises(ValueError, match="explanation_extension_route"):
        TrainingConfig(
            base="b", output_dir="o", explanation_head="extension", explanation_extension_route="backbone"
        )


@pytest.fixture(scope="module")
def routed_extension(tmp_path_factory):
    """A classifier of coloured squares and a routed extension trained on it that reads the output of block 1."""
    root = tmp_path_factory.mktemp("routed-extension")
    pred, data = colour_classifier(root)
    train(
        extension_config(
            root,
            pred,
            "se",
            num_epochs=4,
            explanation_extension_input_layer=1,
            explanation_extension_route="backbone",
        ),
        data,
    )
    return root


def test_the_vector_records_the_route_and_every_way_of_applying_it_keeps_it(routed_extension, tmp_path):
    root = routed_extension
    se = ViTForSelfExplainingClassification.from_pretrained(root / "se").eval()
    assert se.config.explanation_extension_route == "backbone"
    pred = ViTForSelfExplainingClassification.from_pretrained(root / "pred").eval()
    x = pixels(4)
    with torch.no_grad():
        expected = se(x, explain="all").explanation
        assert (expected - pred(x, explain="all").explanation).abs().max() > 1e-3  # the training moved it
    vector = ExplanationVector.from_models(self_explaining=se, prediction_only=pred)
    assert vector.config.extension_route == "backbone"
    vector.save_pretrained(tmp_path / "vec")
    saved = json.loads((tmp_path / "vec" / VECTOR_CONFIG_NAME).read_text())
    assert saved["format_version"] == 5 and saved["extension_route"] == "backbone"
    assert "format version 5" in (tmp_path / "vec" / "README.md").read_text()
    loaded = ExplanationVector.from_pretrained(tmp_path / "vec")
    plain = tiny_classifier(seed=0, num_labels=3).eval()
    plain.load_state_dict(pred.state_dict())
    in_place = ViTForSelfExplainingClassification.from_pretrained(root / "pred").eval()
    for patched in (
        apply_explanation_vector(str(root / "pred"), tmp_path / "vec"),
        apply_explanation_vector(plain, loaded),
        apply_explanation_vector(in_place, loaded, inplace=True),
    ):
        assert patched.config.explanation_extension_route == "backbone"
        with torch.no_grad():
            torch.testing.assert_close(
                patched.eval()(x, explain="all").explanation, expected, rtol=0, atol=1e-5
            )
    patched.save_pretrained(tmp_path / "patched")
    again = ViTForSelfExplainingClassification.from_pretrained(tmp_path / "patched").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x, explain="all").explanation, expected, rtol=0, atol=1e-5)


def test_extensions_with_other_routes_are_never_combined(routed_extension, tmp_path):
    direct = ViTForSelfExplainingClassification.from_pretrained(routed_extension / "se")
    direct.config.explanation_extension_route = "classifier"
    saved = assert_never_combined(
        trained_vector(routed_extension),
        direct,
        routed_extension,
        tmp_path,
        "extension_route",
        "explanation_extension_route",
    )
    assert saved["format_version"] == 4 and "extension_route" not in saved  # what older readers understand


def test_a_vector_config_naming_a_route_is_checked(routed_extension, tmp_path):
    assert_config_edits_refused(
        trained_vector(routed_extension),
        tmp_path / "vec",
        [
            ({"format_version": 4}, "needs format_version 5"),
            ({"extension_route": "sideways"}, "must be one of"),
            ({"extension_input_layer": 2}, "below the last block"),
            ({"format_version": 6}, "upgrade selfexplain"),
        ],
    )
