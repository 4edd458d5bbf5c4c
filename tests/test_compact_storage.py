"""Compact storage of explanation vectors (issue 15): top-k, DARE and low-rank files (format 2), checked against
hand-computed cases, round trips, old (format 1) vectors, and the loopback Hub."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

from selfexplain import ExplanationVector, VectorCompression, apply_explanation_vector
from selfexplain.vectors.compression import keep_count, low_rank_factors, top_k, top_k_indices
from selfexplain.vectors.config import VECTOR_CONFIG_NAME, VECTOR_WEIGHTS_NAME
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining

pytestmark = pytest.mark.usefixtures("one_thread")

MATRIX = "vit.encoder.layer.0.output.dense.weight"  # (32, 64) in the tiny ViT


@pytest.fixture(scope="module")
def vector() -> ExplanationVector:
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=80),
        prediction_only=tiny_classifier(seed=81),
        base_model="org/tiny-base",
        recommended_alpha=0.5,
        provenance={"source_dataset": "builtin:mnist"},
    )


def saved_and_loaded(vector, folder, **kwargs) -> ExplanationVector:
    vector.save_pretrained(folder, **kwargs)
    return ExplanationVector.from_pretrained(folder)


def weights_bytes(folder) -> int:
    return (folder / VECTOR_WEIGHTS_NAME).stat().st_size


# ---------------------------------------------------------------------------------------------- the math


def test_top_k_keeps_exactly_the_largest_magnitudes():
    tensor = torch.tensor([[0.5, -4.0, 1.0], [3.0, -0.1, -2.0]])
    assert top_k_indices(tensor, 0.5).tolist() == [1, 3, 5]  # |-4|, |3|, |-2|, in increasing index order
    assert top_k(tensor, 0.5).tolist() == [[0.0, -4.0, 0.0], [3.0, 0.0, -2.0]]
    assert top_k_indices(torch.tensor([1.0, -1.0, 1.0]), 1 / 3).tolist() == [
        0
    ]  # a tie goes to the lower index
    assert [keep_count(d, 100) for d in (0.29, 0.005, 0.0001, 1.0)] == [29, 1, 1, 100]


def test_a_rank_r_matrix_is_rebuilt_exactly_from_rank_r_factors():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(32, 3, generator=generator) @ torch.randn(3, 64, generator=generator)
    a, b = low_rank_factors(matrix, 3)
    assert a.shape == (32, 3) and b.shape == (3, 64)
    assert torch.allclose(a @ b, matrix, atol=1e-5)
    # Rank 2 of a rank-3 matrix: the Frobenius error is the dropped singular value (Eckart–Young).
    a2, b2 = low_rank_factors(matrix, 2)
    sigma = torch.linalg.svdvals(matrix.double())
    assert float(torch.linalg.norm(matrix - a2 @ b2)) == pytest.approx(float(sigma[2]), rel=1e-4)


def test_compression_specs_parse_and_bad_ones_are_refused():
    assert VectorCompression.parse("top_k:0.1") == VectorCompression(sparsity="top_k", density=0.1)
    assert VectorCompression.parse("dare:0.9@3") == VectorCompression(
        sparsity="dare", density=1 - 0.9, seed=3
    )
    assert VectorCompression.parse("low_rank:8+topk:0.2") == VectorCompression(
        sparsity="top_k", density=0.2, rank=8
    )
    assert VectorCompression.parse({"rank": 4}) == VectorCompression.low_rank(4)
    for bad in (
        "top_k:0",
        "top_k:1.5",
        "dare:1.0",
        "low_rank:0",
        "low_rank:x",
        "zip:3",
        "top_k:0.1+dare:0.5",
    ):
        with pytest.raises(ValueError):
            VectorCompression.parse(bad)
    with pytest.raises(ValueError, match="sparsity method"):
        VectorCompression()


# ---------------------------------------------------------------------------------------------- round trips


def test_top_k_file_loads_as_exactly_the_top_k_vector(tmp_path, vector):
    loaded = saved_and_loaded(vector, tmp_path / "top", compression="top_k:0.1")
    for key, tensor in vector.tensors.items():
        assert torch.equal(loaded.tensors[key], top_k(tensor, 0.1)), key
    config = json.loads((tmp_path / "top" / VECTOR_CONFIG_NAME).read_text())
    assert config["format_version"] == 2
    assert config["compression"] == {"sparsity": "top_k", "density": 0.1, "rank": None, "seed": 0}
    spec = config["tensors"][MATRIX]
    assert spec == {
        "shape": [32, 64],
        "dtype": "float32",
        "encoding": "sparse",
        "nnz": 205,
        "index_dtype": "int16",
    }
    with safe_open(str(tmp_path / "top" / VECTOR_WEIGHTS_NAME), framework="pt") as f:
        assert f.get_tensor(MATRIX + "::indices").dtype == torch.int16
        assert MATRIX not in f.keys()
    dense = tmp_path / "dense"
    vector.save_pretrained(dense)
    assert weights_bytes(tmp_path / "top") < weights_bytes(dense) / 4  # 10 % of entries at 6 bytes each
    assert loaded.config.compression["density"] == 0.1  # the loaded vector says it is the compressed one


def test_lossless_settings_round_trip_exactly(tmp_path, vector):
    # Density 1 keeps every entry; a rank as large as the matrix falls back to dense storage (no larger, exact).
    everything = saved_and_loaded(vector, tmp_path / "all", compression="top_k:1.0")
    full_rank = saved_and_loaded(vector, tmp_path / "full", compression=VectorCompression.low_rank(32))
    for key, tensor in vector.tensors.items():
        assert torch.equal(everything.tensors[key], tensor)
        assert torch.equal(full_rank.tensors[key], tensor)
    config = json.loads((tmp_path / "full" / VECTOR_CONFIG_NAME).read_text())
    assert all(spec.get("encoding", "dense") == "dense" for spec in config["tensors"].values())


def test_low_rank_file_is_within_the_truncation_error(tmp_path, vector):
    loaded = saved_and_loaded(vector, tmp_path / "r4", compression="low_rank:4")
    config = json.loads((tmp_path / "r4" / VECTOR_CONFIG_NAME).read_text())
    assert config["tensors"][MATRIX]["encoding"] == "low_rank" and config["tensors"][MATRIX]["rank"] == 4
    for key, tensor in vector.tensors.items():
        if tensor.dim() == 2 and 4 * sum(tensor.shape) < tensor.numel():
            sigma = torch.linalg.svdvals(tensor.double())
            error = float(torch.linalg.norm((loaded.tensors[key] - tensor).double()))
            assert error == pytest.approx(float(sigma[4:].norm()), rel=1e-3, abs=1e-6), key
        else:  # biases and LayerNorm: dense, exact
            assert torch.equal(loaded.tensors[key], tensor), key


def test_low_rank_and_top_k_combine_and_half_precision_applies_to_values(tmp_path, vector):
    loaded = saved_and_loaded(
        vector, tmp_path / "both", compression="low_rank:4+top_k:0.25", storage_dtype="float16"
    )
    config = json.loads((tmp_path / "both" / VECTOR_CONFIG_NAME).read_text())
    encodings = {spec.get("encoding") for spec in config["tensors"].values()}
    assert encodings == {"low_rank", "sparse"}
    bias = "vit.encoder.layer.0.output.dense.bias"
    assert config["tensors"][bias]["encoding"] == "sparse"
    assert torch.equal(loaded.tensors[bias], top_k(vector.tensors[bias], 0.25).half().float())


def test_dare_file_keeps_rescaled_entries_and_is_reproducible(tmp_path, vector):
    loaded = saved_and_loaded(vector, tmp_path / "a", compression=VectorCompression.dare(0.9, seed=5))
    vector.save_pretrained(tmp_path / "b", compression="dare:0.9@5")
    vector.save_pretrained(tmp_path / "c", compression="dare:0.9@6")
    read = lambda name: (tmp_path / name / VECTOR_WEIGHTS_NAME).read_bytes()  # noqa: E731
    assert read("a") == read("b") and read("a") != read("c")
    tensor, stored = vector.tensors[MATRIX], loaded.tensors[MATRIX]
    kept = stored != 0
    assert torch.allclose(stored[kept], tensor[kept] / (1 - 0.9), rtol=1e-6)
    assert 0.05 < float(kept.float().mean()) < 0.15  # ~10 % of 2048 entries kept


def test_a_dense_save_is_still_format_1_and_old_vectors_load_unchanged(tmp_path, vector):
    vector.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / VECTOR_CONFIG_NAME).read_text())
    assert config["format_version"] == 1 and "compression" not in config
    # A format-1 folder written the way selfexplain 0.2 wrote it (no compression anywhere) loads unchanged.
    old = tmp_path / "old"
    old.mkdir()
    save_file(
        {k: v.contiguous() for k, v in vector.tensors.items()},
        str(old / VECTOR_WEIGHTS_NAME),
        {"format": "pt"},
    )
    legacy = {key: value for key, value in config.items()}
    legacy["tensors"] = {k: {"shape": list(v.shape), "dtype": "float32"} for k, v in vector.tensors.items()}
    (old / VECTOR_CONFIG_NAME).write_text(json.dumps(legacy))
    loaded = ExplanationVector.from_pretrained(old)
    assert loaded.config.format_version == 1 and loaded.config.compression is None
    assert all(torch.equal(loaded.tensors[k], vector.tensors[k]) for k in vector.tensors)


def test_applying_a_compressed_folder_streams_the_same_tensors(tmp_path, vector):
    vector.save_pretrained(tmp_path / "c", compression="low_rank:4+top_k:0.2")
    loaded = ExplanationVector.from_pretrained(tmp_path / "c")
    target = tiny_classifier(seed=82)
    target.save_pretrained(tmp_path / "target")
    from_folders = apply_explanation_vector(tmp_path / "target", tmp_path / "c", alpha=1.0)
    from_memory = apply_explanation_vector(target, loaded, alpha=1.0)
    x = pixels(2)
    with torch.no_grad():
        assert torch.equal(
            from_folders(x, explain="all").explanation, from_memory(x, explain="all").explanation
        )


def test_the_card_says_how_the_vector_is_stored(tmp_path, vector):
    vector.save_pretrained(tmp_path / "c", compression="dare:0.9@2")
    card = ModelCard.load(tmp_path / "c" / "README.md")
    assert "| Compact storage | DARE drop-and-rescale, drop rate 0.9, seed 2" in card.text
    vector.save_pretrained(tmp_path / "d")
    assert "Compact storage" not in ModelCard.load(tmp_path / "d" / "README.md").text


# ---------------------------------------------------------------------------------------------- over the Hub


def test_a_compressed_vector_round_trips_through_the_loopback_hub(hub, tmp_path, vector):
    setting = "low_rank:4+top_k:0.2"
    vector.push_to_hub("compact/vector", token=hub.token, compression=setting)
    pulled = ExplanationVector.from_pretrained("compact/vector")
    local = saved_and_loaded(vector, tmp_path / "local", compression=setting)
    assert all(torch.equal(pulled.tensors[k], local.tensors[k]) for k in vector.tensors)
    assert pulled.config.compression == VectorCompression.parse(setting).to_dict()
    ModelCard.load("compact/vector").validate()
    target = tiny_classifier(seed=83)
    target.save_pretrained(tmp_path / "target")
    hub.create_repo_from_folder("compact/classifier", tmp_path / "target")
    patched = apply_explanation_vector("compact/classifier", "compact/vector", alpha=1.0)
    expected = apply_explanation_vector(target, local, alpha=1.0)
    x = pixels(2)
    with torch.no_grad():
        assert torch.equal(patched(x, explain="all").explanation, expected(x, explain="all").explanation)
