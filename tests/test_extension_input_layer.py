"""An explanation extension that reads an inner block (`explanation_extension_input_layer`): the model runs it on
that block's output, the vector records which block (format 4), and everything that adds or combines extensions
keeps or checks it."""

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


def _perturbed(
    model: ViTForSelfExplainingClassification, seed: int = 0
) -> ViTForSelfExplainingClassification:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.explainer.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_the_extension_reads_the_output_of_its_block_and_the_logits_stay(layer):
    model = _perturbed(
        tiny_self_explaining(seed=3, explanation_head="extension", explanation_extension_input_layer=layer)
    )
    last = tiny_self_explaining(seed=3, explanation_head="extension")
    last.load_state_dict(model.state_dict())
    x = pixels(3)
    with torch.no_grad():
        out = model(x, explain="all", output_explanation_tokens=True)
        hidden = model.vit(x, output_hidden_states=True).hidden_states
        expected = model.explainer(hidden[layer])
        other = last(x, explain="all")
    torch.testing.assert_close(out.explanation_tokens, expected, rtol=0, atol=1e-6)
    assert torch.equal(out.logits, other.logits)  # the CLS token never passes through the extension
    assert (
        out.explanation - other.explanation
    ).abs().max() > 1e-3  # it reads other tokens than the final ones
    assert out.hidden_states is None  # read for the extension, returned only when asked for
    with torch.no_grad():
        assert len(model(x, output_hidden_states=True).hidden_states) == 3


def test_an_input_layer_outside_the_backbone_is_refused():
    for bad in (-1, 3, 1.5, True):
        with pytest.raises(ValueError, match="explanation_extension_input_layer"):
            tiny_self_explaining(explanation_head="extension", explanation_extension_input_layer=bad)
    with pytest.raises(ValueError, match='explanation_head="extension"'):
        TrainingConfig(base="b", output_dir="o", explanation_extension_input_layer=1)


@pytest.fixture(scope="module")
def inner_extension(tmp_path_factory):
    """A classifier of coloured squares and an extension trained on it that reads the output of block 1."""
    root = tmp_path_factory.mktemp("inner-extension")
    pred, data = colour_classifier(root)
    train(extension_config(root, pred, "se", num_epochs=4, explanation_extension_input_layer=1), data)
    return root


def test_the_vector_records_the_block_and_the_target_reads_it(inner_extension, tmp_path):
    root = inner_extension
    se = ViTForSelfExplainingClassification.from_pretrained(root / "se").eval()
    assert se.config.explanation_extension_input_layer == 1
    vector = ExplanationVector.from_models(
        self_explaining=se, prediction_only=ViTForSelfExplainingClassification.from_pretrained(root / "pred")
    )
    assert vector.config.extension_input_layer == 1
    vector.save_pretrained(tmp_path / "vec")
    saved = json.loads((tmp_path / "vec" / VECTOR_CONFIG_NAME).read_text())
    assert saved["format_version"] == 4 and saved["extension_input_layer"] == 1
    loaded = ExplanationVector.from_pretrained(tmp_path / "vec")
    assert loaded.config.extension_input_layer == 1
    x = pixels(4)
    with torch.no_grad():
        expected = se(x, explain="all").explanation
    # Added to the frozen classifier it came from, as a folder, as a plain model and in place: the same model.
    plain = tiny_classifier(seed=0, num_labels=3).eval()
    plain.load_state_dict(ViTForSelfExplainingClassification.from_pretrained(root / "pred").state_dict())
    in_place = ViTForSelfExplainingClassification.from_pretrained(root / "pred").eval()
    for patched in (
        apply_explanation_vector(str(root / "pred"), tmp_path / "vec"),
        apply_explanation_vector(plain, loaded),
        apply_explanation_vector(in_place, loaded, inplace=True),
    ):
        assert patched.config.explanation_extension_input_layer == 1
        with torch.no_grad():
            torch.testing.assert_close(
                patched.eval()(x, explain="all").explanation, expected, rtol=0, atol=1e-5
            )
    # Saved and reloaded, the patched model still reads block 1.
    patched.save_pretrained(tmp_path / "patched")
    again = ViTForSelfExplainingClassification.from_pretrained(tmp_path / "patched").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x, explain="all").explanation, expected, rtol=0, atol=1e-5)


def test_extensions_that_read_other_tokens_are_never_combined(inner_extension, tmp_path):
    final_reader = ViTForSelfExplainingClassification.from_pretrained(inner_extension / "se")
    final_reader.config.explanation_extension_input_layer = None
    # A model whose extension reads the final tokens does not take an extension trained on block 1's.
    saved = assert_never_combined(
        trained_vector(inner_extension),
        final_reader,
        inner_extension,
        tmp_path,
        "extension_input_layer",
        "block 1",
    )
    assert saved["format_version"] == 3 and "extension_input_layer" not in saved


def test_a_vector_config_naming_a_block_is_checked(inner_extension, tmp_path):
    assert_config_edits_refused(
        trained_vector(inner_extension),
        tmp_path / "vec",
        [
            ({"format_version": 3}, "needs format_version 4"),
            ({"extension_input_layer": 7}, "not a block"),
            ({"extension_input_layer": "1"}, "must be int"),
        ],
    )


def test_alpha_zero_of_an_inner_extension_is_not_the_unpatched_map_and_the_suite_sweeps_from_the_model(
    inner_extension,
):
    """An all-zero extension is the identity on the tokens it reads: on the final tokens that is the model's own
    map, on block 1's it is not. So the suite's α sweep starts from the model itself (the "no transfer" map), not
    from the vector at α = 0."""
    from selfexplain.experiments.experiment import _patched

    root = inner_extension
    vector = ExplanationVector.from_models(
        self_explaining=ViTForSelfExplainingClassification.from_pretrained(root / "se"),
        prediction_only=ViTForSelfExplainingClassification.from_pretrained(root / "pred"),
    )
    model = ViTForSelfExplainingClassification.from_pretrained(root / "pred").eval()
    x = pixels(4)
    with torch.no_grad():
        own = model(x, explain="all").explanation
        at_zero = apply_explanation_vector(model, vector, alpha=0.0).eval()(x, explain="all").explanation
        swept = _patched(model, vector, 0.0)(x, explain="all").explanation
        at_one = _patched(model, vector, 1.0)(x, explain="all").explanation
    assert not torch.allclose(at_zero, own, atol=1e-3)  # block 1's tokens, read by the classifier
    torch.testing.assert_close(swept, own, rtol=0, atol=0)
    expected = apply_explanation_vector(model, vector, alpha=1.0).eval()(x, explain="all").explanation
    torch.testing.assert_close(at_one, expected, rtol=0, atol=0)
