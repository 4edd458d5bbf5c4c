import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file

from selfexplain import (
    ExplanationVector,
    IncompatibleExplanationVectorError,
    InvalidExplanationVectorError,
    NotAnExplanationVectorError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
)
from selfexplain.cards import render_vector_card
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining


def make_vector(**kwargs) -> ExplanationVector:
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=10),
        prediction_only=tiny_classifier(seed=11),
        base_model="org/tiny-base",
        provenance={
            "source_dataset": "builtin:mnist",
            "explanation_loss_weight": 1.0,
            "explanation_loss": "mse",
        },
        **kwargs,
    )


def test_vector_is_the_difference_of_serialized_backbone_weights(tmp_path):
    se, po = tiny_self_explaining(seed=10), tiny_classifier(seed=11)
    se.save_pretrained(tmp_path / "se")
    po.save_pretrained(tmp_path / "po")
    vec = ExplanationVector.from_models(self_explaining=se, prediction_only=po)
    on_disk_se = load_file(tmp_path / "se" / "model.safetensors")
    on_disk_po = load_file(tmp_path / "po" / "model.safetensors")
    backbone = {k for k in on_disk_se if k.startswith("vit.")}
    assert set(vec.tensors) == backbone  # serialized names, classifier excluded
    assert "vit.encoder.layer.1.output.dense.weight" in vec.tensors
    for key in backbone:
        assert torch.equal(vec.tensors[key], on_disk_se[key] - on_disk_po[key])


def test_include_exclude_patterns():
    vec = make_vector(include=["vit.*", "classifier.*"], exclude=["vit.embeddings.*"])
    assert "classifier.weight" in vec.tensors
    assert not any(k.startswith("vit.embeddings.") for k in vec.tensors)
    with pytest.raises(ValueError, match="No parameter"):
        make_vector(include=["nothing.*"])


def test_save_load_round_trip_is_bit_exact_and_files_are_documented(tmp_path):
    vec = make_vector(recommended_alpha=0.7)
    vec.save_pretrained(tmp_path / "vec")
    assert sorted(p.name for p in (tmp_path / "vec").iterdir()) == [
        "README.md",
        "explanation_vector.safetensors",
        "explanation_vector_config.json",
    ]
    config = json.loads((tmp_path / "vec" / "explanation_vector_config.json").read_text())
    assert config["format_version"] == 1 and config["model_type"] == "vit"
    assert config["base_model"] == "org/tiny-base" and config["recommended_alpha"] == 0.7
    assert config["architecture"]["hidden_size"] == 32 and config["architecture"]["patch_size"] == 4
    assert config["tensors"]["vit.layernorm.weight"] == {"shape": [32], "dtype": "float32"}
    assert config["provenance"]["source_dataset"] == "builtin:mnist"
    loaded = ExplanationVector.from_pretrained(tmp_path / "vec")
    assert set(loaded.tensors) == set(vec.tensors)
    assert all(torch.equal(loaded.tensors[k], vec.tensors[k]) for k in vec.tensors)
    assert loaded.config.to_dict() == vec.config.to_dict()


def test_half_precision_storage_halves_the_file_and_loads_as_float32(tmp_path):
    vec = make_vector()
    vec.save_pretrained(tmp_path / "f32")
    vec.save_pretrained(tmp_path / "f16", storage_dtype=torch.float16)
    size32 = (tmp_path / "f32" / "explanation_vector.safetensors").stat().st_size
    size16 = (tmp_path / "f16" / "explanation_vector.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    with safe_open(tmp_path / "f16" / "explanation_vector.safetensors", "pt") as f:
        assert f.get_slice("vit.layernorm.weight").get_dtype() == "F16"
    loaded = ExplanationVector.from_pretrained(tmp_path / "f16")
    assert loaded.config.storage_dtype == "float16"
    key = "vit.encoder.layer.0.attention.attention.query.weight"
    assert loaded.tensors[key].dtype == torch.float32
    assert torch.equal(loaded.tensors[key], vec.tensors[key].half().float())


def test_model_card_metadata_parses():
    vec = make_vector()
    card = ModelCard(str(render_vector_card(vec.config, repo_id="me/vec")))
    data = card.data.to_dict()
    assert data["library_name"] == "selfexplain"
    assert data["base_model"] == "org/tiny-base" and data["base_model_relation"] == "adapter"
    assert data["pipeline_tag"] == "image-classification" and "explanation-vector" in data["tags"]
    assert 'apply_explanation_vector("your-org/your-vit-classifier", "me/vec"' in card.text


def test_model_card_loads_from_saved_folder(tmp_path):
    make_vector().save_pretrained(tmp_path / "vec")
    card = ModelCard.load(tmp_path / "vec" / "README.md")
    assert card.data.base_model == "org/tiny-base"


def test_arithmetic_in_float32():
    a, b = (
        make_vector(),
        ExplanationVector.from_models(
            self_explaining=tiny_self_explaining(seed=12), prediction_only=tiny_classifier(seed=13)
        ),
    )
    key = "vit.layernorm.bias"
    assert torch.equal((a + b).tensors[key], a.tensors[key] + b.tensors[key])
    assert torch.equal((a - b).tensors[key], a.tensors[key] - b.tensors[key])
    assert torch.equal((-a).tensors[key], -a.tensors[key])
    assert torch.equal((0.5 * a).tensors[key], a.tensors[key] * 0.5)
    assert torch.equal((a * 2).tensors[key], a.tensors[key] * 2)
    total = sum([a, b, a])
    assert torch.allclose(total.tensors[key], 2 * a.tensors[key] + b.tensors[key])
    assert all(t.dtype == torch.float32 for t in total.tensors.values())
    assert (a - a).norm() == 0.0
    with pytest.raises(ValueError, match="same architecture"):
        a + make_vector(include=["vit.layernorm.*"])


def test_loading_a_model_folder_as_a_vector_is_a_clear_error(tmp_path):
    tiny_classifier().save_pretrained(tmp_path / "clf")
    with pytest.raises(NotAnExplanationVectorError, match="looks like a model"):
        ExplanationVector.from_pretrained(tmp_path / "clf")


def test_config_lies_are_rejected(tmp_path):
    make_vector().save_pretrained(tmp_path / "vec")
    path = tmp_path / "vec" / "explanation_vector_config.json"
    config = json.loads(path.read_text())
    config["tensors"]["vit.layernorm.weight"]["shape"] = [31]
    path.write_text(json.dumps(config))
    with pytest.raises(InvalidExplanationVectorError, match="vit.layernorm.weight"):
        ExplanationVector.from_pretrained(tmp_path / "vec")
    config["format_version"] = 99
    path.write_text(json.dumps(config))
    with pytest.raises(InvalidExplanationVectorError, match="newer"):
        ExplanationVector.from_pretrained(tmp_path / "vec")


def test_models_of_different_architectures_cannot_make_a_vector():
    with pytest.raises(InvalidExplanationVectorError, match="hidden_size"):
        ExplanationVector.from_models(
            self_explaining=tiny_self_explaining(), prediction_only=tiny_classifier(hidden_size=64)
        )


def test_apply_to_vector_method_and_incompatible_error_type():
    vec = make_vector()
    model = vec.apply_to(tiny_classifier(seed=3), alpha=1.0)
    assert isinstance(model, ViTForSelfExplainingClassification)
    with pytest.raises(IncompatibleExplanationVectorError):
        apply_explanation_vector(tiny_classifier(patch_size=8), vec)
    assert model(pixels(1)).explanation.shape == (1, 4, 4)
