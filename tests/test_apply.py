import copy

import pytest
import torch
from safetensors.torch import load_file

from selfexplain import (
    ExplanationVector,
    IncompatibleExplanationVectorError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
)
from selfexplain.checkpoint_keys import serialized_names
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining


@pytest.fixture(scope="module")
def vector() -> ExplanationVector:
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=20),
        prediction_only=tiny_classifier(seed=21),
        base_model="org/tiny-base",
        recommended_alpha=0.5,
    )


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apply_matches_a_hand_computation_on_serialized_weights(tmp_path, vector):
    labels = {i: f"c{i}" for i in range(5)}
    target = tiny_classifier(
        seed=22, num_labels=5, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    target.save_pretrained(tmp_path / "target")
    vector.save_pretrained(tmp_path / "vec")
    patched = apply_explanation_vector(tmp_path / "target", tmp_path / "vec", alpha=0.8)
    patched.save_pretrained(tmp_path / "out")

    before = load_file(tmp_path / "target" / "model.safetensors")
    tau = load_file(tmp_path / "vec" / "explanation_vector.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert set(after) == set(before)
    for key, value in before.items():
        expected = value + 0.8 * tau[key] if key in tau else value
        assert torch.equal(after[key], expected), key
    assert patched.config.id2label == {i: f"c{i}" for i in range(5)}
    assert patched.config.label2id == {f"c{i}": i for i in range(5)}
    reloaded = ViTForSelfExplainingClassification.from_pretrained(tmp_path / "out")
    x = pixels(2)
    with torch.no_grad():
        assert torch.equal(reloaded(x, explain="all").explanation, patched(x, explain="all").explanation)


def test_loaded_classifier_is_left_untouched_and_a_new_model_is_returned(vector):
    target = tiny_classifier(seed=23)
    before = snapshot(target)
    patched = apply_explanation_vector(target, vector, alpha=1.0)
    assert same(snapshot(target), before)
    assert isinstance(patched, ViTForSelfExplainingClassification) and patched is not target
    assert torch.equal(patched.classifier.weight, target.classifier.weight)
    assert patched.classifier.weight.data_ptr() != target.classifier.weight.data_ptr()


def test_recommended_alpha_is_the_default(vector):
    target = tiny_classifier(seed=24)
    default = apply_explanation_vector(target, vector)
    explicit = apply_explanation_vector(target, vector, alpha=0.5)
    assert same(snapshot(default), snapshot(explicit))
    assert not same(snapshot(default), snapshot(apply_explanation_vector(target, vector, alpha=1.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_alpha_zero_is_identity_and_dtypes_are_kept(vector, dtype):
    target = tiny_classifier(seed=25).to(dtype)
    before = snapshot(target)
    assert same(snapshot(apply_explanation_vector(target, vector, alpha=0.0)), before)
    patched = apply_explanation_vector(target, vector, alpha=1.0)
    key_mem, key_disk = (
        "vit.layers.0.attention.q_proj.weight",
        "vit.encoder.layer.0.attention.attention.query.weight",
    )
    param = patched.state_dict()[key_mem]
    assert param.dtype == dtype
    expected = (before[key_mem].float() + vector.tensors[key_disk]).to(dtype)
    assert torch.equal(param, expected)
    with torch.no_grad():
        out = patched(pixels(1).to(dtype))
    assert out.explanation.dtype == dtype


def test_inplace_on_a_self_explaining_model(vector):
    model = tiny_self_explaining(seed=26)
    expected = snapshot(apply_explanation_vector(model, vector, alpha=1.0))
    same_object = apply_explanation_vector(model, vector, alpha=1.0, inplace=True)
    assert same_object is model and same(snapshot(model), expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 64}, "hidden_size: vector 32, model 64"),
        ({"num_hidden_layers": 3}, "num_hidden_layers: vector 2, model 3"),
        ({"patch_size": 8}, "patch_size: vector 4, model 8"),
        ({"image_size": 32}, "image_size: vector 16, model 32"),
    ],
)
def test_mismatch_errors_name_what_differs_and_leave_the_model_untouched(vector, overrides, message):
    target = tiny_classifier(seed=27, **overrides)
    before = snapshot(target)
    with pytest.raises(IncompatibleExplanationVectorError, match=message) as info:
        apply_explanation_vector(target, vector)
    assert "was not changed" in str(info.value)
    assert same(snapshot(target), before)


def test_missing_key_and_wrong_model_type_are_reported(vector):
    broken = copy.deepcopy(vector)
    broken.tensors["vit.encoder.layer.9.output.dense.weight"] = torch.zeros(32, 64)
    target = tiny_classifier(seed=28)
    before = snapshot(target)
    with pytest.raises(IncompatibleExplanationVectorError, match="not in the model"):
        apply_explanation_vector(target, broken)
    other = copy.deepcopy(vector)
    other.config.model_type = "deit"
    with pytest.raises(IncompatibleExplanationVectorError, match="model_type: vector 'deit', model 'vit'"):
        apply_explanation_vector(target, other)
    assert same(snapshot(target), before)


def test_incompatible_model_id_is_rejected_from_its_config(tmp_path, vector):
    tiny_classifier(hidden_size=48).save_pretrained(tmp_path / "wide")
    with pytest.raises(IncompatibleExplanationVectorError, match="hidden_size"):
        apply_explanation_vector(tmp_path / "wide", vector)


def test_base_mismatch_warns_but_applies(vector):
    target = tiny_classifier(seed=29)
    target.config.selfexplain_base_model = "org/another-base"
    with pytest.warns(UserWarning, match="another-base"):
        apply_explanation_vector(target, vector)


def test_logits_of_applied_model_are_those_of_the_plain_arithmetic(vector):
    target = tiny_classifier(seed=30)
    patched = apply_explanation_vector(target, vector, alpha=1.0)
    manual = copy.deepcopy(target)
    state = manual.state_dict()
    for disk, mem in serialized_names(manual).items():
        if disk in vector.tensors:
            state[mem] += vector.tensors[disk]
    manual.load_state_dict(state)
    x = pixels(3)
    with torch.no_grad():
        assert torch.allclose(patched(x).logits, manual(x).logits, atol=1e-6)
