"""DeiT checkpoints of model_type 'deit' are refused, clearly, on every path; why, measured on transformers' DeiT."""

import pytest
import torch
from transformers import DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher

from selfexplain import ExplanationVector, IncompatibleExplanationVectorError, apply_explanation_vector
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining

SIZES = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)


@pytest.fixture(scope="module")
def vector() -> ExplanationVector:
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=80),
        prediction_only=tiny_classifier(seed=81),
        base_model="b",
    )


@pytest.mark.parametrize("cls", [DeiTForImageClassificationWithTeacher, DeiTForImageClassification])
def test_deit_is_refused_with_the_reason_on_every_path(tmp_path, vector, cls):
    torch.manual_seed(0)
    model = cls(DeiTConfig(num_labels=3, **SIZES)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleExplanationVectorError, match="distillation token") as info:
        apply_explanation_vector(model, vector)
    assert "was not changed" in str(info.value) and "model_type 'vit'" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "deit")
    (tmp_path / "deit" / "model.safetensors").write_bytes(b"not read")  # refused from config.json alone
    with pytest.raises(IncompatibleExplanationVectorError, match="distillation token"):
        apply_explanation_vector(tmp_path / "deit", vector)


def test_what_makes_a_distilled_deit_another_model():
    """The reason, measured: a second special token (one more position row) and a prediction averaged over two
    heads, one of which reads a token a ViT does not have."""
    torch.manual_seed(1)
    config = DeiTConfig(num_labels=3, **SIZES)
    deit = DeiTForImageClassificationWithTeacher(config).eval()
    vit = tiny_classifier(seed=1)  # the same sizes as a ViT classifier
    assert (
        deit.deit.embeddings.position_embeddings.shape[1]
        == vit.vit.embeddings.position_embeddings.shape[1] + 1
    )
    assert hasattr(deit.deit.embeddings, "distillation_token") and not hasattr(
        vit.vit.embeddings, "distillation_token"
    )
    x = pixels(2)
    with torch.no_grad():
        hidden = deit.deit(x).last_hidden_state
        by_hand = (deit.cls_classifier(hidden[:, 0]) + deit.distillation_classifier(hidden[:, 1])) / 2
        torch.testing.assert_close(deit(x).logits, by_hand)
        # The two heads disagree on random weights: neither alone is the prediction a vector would explain.
        assert not torch.allclose(deit.cls_classifier(hidden[:, 0]), by_hand)
