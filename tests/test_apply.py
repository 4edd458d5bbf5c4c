import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfexplain import (
    ExplanationVector,
    IncompatibleExplanationVectorError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
)
from selfexplain.vectors.checkpoint_keys import serialized_names, serialized_state_dict
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


# ------------------------------------------------------------------------------------ streaming from files


def write_nan_vector(vector: ExplanationVector, folder) -> str:
    """Save `vector` with a NaN in its last tensor (in key order), so it is refused only once streaming ends."""
    last = sorted(vector.tensors)[-1]
    broken = copy.deepcopy(vector)
    broken.tensors[last][0] = float("nan")
    broken.save_pretrained(folder)
    return last


def test_every_path_gives_the_same_bits(tmp_path, vector):
    """Streaming from files, a loaded vector, a new model and an in-place update agree bit for bit."""
    target = tiny_classifier(seed=40)
    target.save_pretrained(tmp_path / "target")
    vector.save_pretrained(tmp_path / "vec")
    explaining = ViTForSelfExplainingClassification.from_pretrained(tmp_path / "target")
    results = [
        apply_explanation_vector(tmp_path / "target", tmp_path / "vec", alpha=0.7),
        apply_explanation_vector(tmp_path / "target", vector, alpha=0.7),
        apply_explanation_vector(target, tmp_path / "vec", alpha=0.7),
        apply_explanation_vector(explaining, tmp_path / "vec", alpha=0.7, inplace=True),
    ]
    reference = snapshot(results[0])
    assert not same(reference, snapshot(target))
    for result in results[1:]:
        assert same(snapshot(result), reference)


def test_a_vector_refused_halfway_through_the_stream(tmp_path, vector):
    from selfexplain import InvalidExplanationVectorError

    last = write_nan_vector(vector, tmp_path / "nan")
    tiny_classifier(seed=41).save_pretrained(tmp_path / "target")
    with pytest.raises(InvalidExplanationVectorError, match=f"{last}.*NaN"):
        apply_explanation_vector(tmp_path / "target", tmp_path / "nan")
    # In place, the whole stream is read and checked before the first write: the model is never touched.
    explaining = tiny_self_explaining(seed=42)
    versions = {k: v._version for k, v in explaining.named_parameters()}
    before = snapshot(explaining)
    with pytest.raises(InvalidExplanationVectorError, match="NaN"):
        apply_explanation_vector(explaining, tmp_path / "nan", inplace=True)
    assert same(snapshot(explaining), before)
    assert {k: v._version for k, v in explaining.named_parameters()} == versions


PEAK_SCRIPT = """
import gc, json, sys
from pathlib import Path
import torch
from selfexplain import apply_explanation_vector

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
folder = Path(sys.argv[1])
apply_explanation_vector(folder / "warmup-model", folder / "warmup-vector")  # lazy imports, first-call caches
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
baseline = rss("VmRSS")
model = apply_explanation_vector(folder / "model", folder / "vector", alpha=1.0)
print(json.dumps({"peak_extra": rss("VmHWM") - baseline}))
"""


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS"
)
def test_applying_from_files_holds_the_model_and_one_tensor_not_the_vector(tmp_path):
    """The documented memory bound, measured: peak extra RSS ≈ the model, far below model + vector."""
    import subprocess
    import sys

    from selfexplain import ExplanationVectorConfig
    from selfexplain.vectors.compatibility import architecture_fingerprint

    def write(name, **overrides):
        model = tiny_classifier(seed=43, **overrides)
        model.save_pretrained(tmp_path / f"{name}model")
        backbone = {
            k: torch.randn(v.shape) * 1e-3
            for k, v in serialized_state_dict(model).items()
            if k.startswith("vit.")
        }
        config = ExplanationVectorConfig(
            model_type="vit", architecture=architecture_fingerprint(model.config)
        )
        ExplanationVector(backbone, config).save_pretrained(tmp_path / f"{name}vector", model_card=False)
        return sum(t.numel() * t.element_size() for t in backbone.values())

    write("warmup-")
    # ~19 M parameters (76 MB): large enough that the tensors dominate the allocator's noise.
    vector_bytes = write(
        "", hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048
    )
    completed = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True
    )
    peak = json.loads(completed.stdout.strip().splitlines()[-1])["peak_extra"]
    # Loading both whole (the earlier implementation and the naive baseline) peaks at ≥ 2.3× the vector.
    assert peak < 1.4 * vector_bytes, (
        f"peak extra RSS {peak / 2**20:.0f} MiB, vector {vector_bytes / 2**20:.0f} MiB"
    )


def test_a_loaded_model_is_checked_against_the_vector_config_before_the_weights_are_read(tmp_path, vector):
    from selfexplain.vectors.config import VECTOR_WEIGHTS_NAME

    vector.save_pretrained(tmp_path / "vec")
    (tmp_path / "vec" / VECTOR_WEIGHTS_NAME).write_bytes(b"not safetensors")  # would fail if it were read
    with pytest.raises(IncompatibleExplanationVectorError, match="hidden_size"):
        apply_explanation_vector(tiny_classifier(hidden_size=48), tmp_path / "vec")
