"""Merging explanation vectors (issue 15): task arithmetic, TIES and DARE against hand-computed cases, the
compatibility checks, the provenance record in the config and card, and a merged vector over the loopback Hub."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from selfexplain import (
    ExplanationVector,
    ExplanationVectorConfig,
    IncompatibleExplanationVectorError,
    apply_explanation_vector,
)
from selfexplain.vectors.config import VECTOR_CONFIG_NAME
from selfexplain.vectors.merging import disjoint_mean, elect_sign_mask, merge_tensors, tensors_sha256
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHITECTURE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 4,
    "image_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "hidden_act": "gelu",
}


def hand_vector(values, key="vit.layernorm.bias", base="org/base", alpha=1.0) -> ExplanationVector:
    """An in-memory vector holding one hand-written tensor (the merge math is per key)."""
    config = ExplanationVectorConfig(
        model_type="vit", architecture=dict(ARCHITECTURE), base_model=base, recommended_alpha=alpha
    )
    return ExplanationVector({key: torch.tensor(values, dtype=torch.float32)}, config)


def only(vector: ExplanationVector) -> list[float]:
    (tensor,) = vector.tensors.values()
    return tensor.tolist()


@pytest.fixture(scope="module")
def real_vectors() -> list[ExplanationVector]:
    """Two vectors of the tiny ViT from the same (recorded) base, as `from_models` makes them."""
    return [
        ExplanationVector.from_models(
            self_explaining=tiny_self_explaining(seed=90 + i),
            prediction_only=tiny_classifier(seed=95),
            base_model="org/tiny-base",
            recommended_alpha=0.5 + i,
            provenance={"source_dataset": f"org/source-{i}"},
        )
        for i in range(2)
    ]


# ---------------------------------------------------------------------------------------------- the math


def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean():
    # density 0.5 keeps 2 of 4 entries: a -> [3, -2, 0, 0], b -> [0, -4, 2, 0].
    # Summed: [3, -6, 2, 0] elects [+, -, +, +]; disjoint mean: [3, (-2 - 4) / 2, 2, 0].
    a, b = hand_vector([3.0, -2.0, 0.5, 1.0]), hand_vector([-1.0, -4.0, 2.0, 0.2])
    merged = ExplanationVector.merge([a, b], method="ties", density=0.5)
    assert only(merged) == [3.0, -3.0, 2.0, 0.0]


def test_ties_drops_the_values_that_disagree_with_the_elected_sign():
    # Nothing trimmed; entry 0: 3 and -1 sum to + so only 3 is kept (not their mean, 1).
    a, b = hand_vector([3.0, -1.0]), hand_vector([-1.0, -1.0])
    assert only(ExplanationVector.merge([a, b], method="ties", density=1.0)) == [3.0, -1.0]
    # Weights scale the terms of the disjoint mean, after the election (PEFT's order).
    weighted = ExplanationVector.merge([a, b], method="ties", density=1.0, weights=[2.0, 0.5])
    assert only(weighted) == [6.0, (-2.0 - 0.5) / 2]


def test_total_and_frequency_sign_elections_differ_as_defined():
    a, b, c = hand_vector([5.0]), hand_vector([-1.0]), hand_vector([-1.0])
    # total: 5 - 1 - 1 > 0 elects +, keeping 5; frequency: two of three are negative, keeping -1 and -1.
    assert only(ExplanationVector.merge([a, b, c], method="ties", density=1.0)) == [5.0]
    frequency = ExplanationVector.merge([a, b, c], method="ties", density=1.0, majority_sign="frequency")
    assert only(frequency) == [-1.0]


def test_sign_mask_and_disjoint_mean_primitives():
    stacked = torch.tensor([[2.0, 0.0, -1.0], [-3.0, 0.0, -1.0]])
    mask = elect_sign_mask(stacked, "total")
    assert mask.tolist() == [[False, False, True], [True, False, True]]  # zeros never carry a sign
    assert disjoint_mean(stacked, mask).tolist() == [-3.0, 0.0, -1.0]  # an entry nobody keeps stays 0


def test_task_arithmetic_is_the_weighted_sum_and_defaults_to_the_mean():
    a, b = hand_vector([1.0, 2.0]), hand_vector([3.0, -6.0])
    assert only(ExplanationVector.merge([a, b], method="task_arithmetic")) == [2.0, -2.0]
    summed = ExplanationVector.merge([a, b], method="task_arithmetic", weights=[1.0, 0.5])
    assert only(summed) == [2.5, -1.0]


def test_magnitude_prune_keeps_the_top_k_of_each_input_then_sums():
    a, b = hand_vector([4.0, 1.0, -3.0, 0.5]), hand_vector([0.1, 0.2, 0.3, -5.0])
    merged = ExplanationVector.merge([a, b], method="magnitude_prune", density=0.25, weights=[1.0, 1.0])
    assert only(merged) == [4.0, 0.0, 0.0, -5.0]


def test_dare_drops_and_rescales_seeded_and_unbiased():
    ones = hand_vector(torch.ones(200_000).tolist())
    merged = ExplanationVector.merge([ones], method="dare_linear", density=0.1, seed=3, weights=[1.0])
    values = next(iter(merged.tensors.values()))
    assert set(values.unique().tolist()) == {0.0, 10.0}  # kept entries rescaled by 1 / density
    assert abs(float((values != 0).float().mean()) - 0.1) < 0.005  # ~10 % kept (binomial sd 0.0007)
    assert abs(float(values.mean()) - 1.0) < 0.05  # unbiased: E[dare(τ)] = τ
    again = ExplanationVector.merge([ones], method="dare_linear", density=0.1, seed=3, weights=[1.0])
    other = ExplanationVector.merge([ones], method="dare_linear", density=0.1, seed=4, weights=[1.0])
    assert torch.equal(next(iter(again.tensors.values())), values)
    assert not torch.equal(next(iter(other.tensors.values())), values)


def test_dare_masks_differ_between_inputs_and_dare_ties_elects_signs():
    a, b = hand_vector(torch.ones(1000).tolist()), hand_vector((-torch.ones(1000)).tolist())
    linear = next(iter(ExplanationVector.merge([a, b], method="dare_linear", density=0.5).tensors.values()))
    # Independent masks: some entries keep only a (+1), some only b (-1); with the same mask all would be 0.
    assert (linear > 0).any() and (linear < 0).any()
    ties = next(iter(ExplanationVector.merge([a, b], method="dare_ties", density=0.5).tensors.values()))
    # Per entry the sum elects one sign, so only ±2 (one survivor, rescaled) or 0 can come out.
    assert set(ties.unique().tolist()) <= {-2.0, 0.0, 2.0}
    direct = merge_tensors(
        [torch.ones(4), torch.ones(4)], [1.0, 1.0], "dare_linear", density=1.0, generators=[None, None]
    )
    assert direct.tolist() == [2.0] * 4  # density 1 drops nothing


# ---------------------------------------------------------------------------------------------- checks


def test_incompatible_vectors_are_refused_with_every_difference():
    a = hand_vector([1.0, 2.0])
    other_base = hand_vector([1.0, 2.0], base="org/another-base")
    with pytest.raises(IncompatibleExplanationVectorError, match="base_model 'org/another-base'"):
        ExplanationVector.merge([a, other_base])
    wider = hand_vector([1.0, 2.0])
    wider.config.architecture["hidden_size"] = 64
    with pytest.raises(IncompatibleExplanationVectorError, match="hidden_size 64"):
        ExplanationVector.merge([a, wider], names=["a", "wide"])
    with pytest.raises(IncompatibleExplanationVectorError, match="keys differ"):
        ExplanationVector.merge([a, hand_vector([1.0, 2.0], key="vit.layernorm.weight")])
    with pytest.raises(IncompatibleExplanationVectorError, match="shapes differ"):
        ExplanationVector.merge([a, hand_vector([1.0, 2.0, 3.0])])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "average"}, "method"),
        ({"weights": [1.0]}, "weights"),
        ({"weights": [1.0, float("nan")]}, "weights"),
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"majority_sign": "vote"}, "majority_sign"),
        ({"seed": -1}, "seed"),
        ({"names": ["one"]}, "names"),
    ],
)
def test_bad_merge_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExplanationVector.merge([hand_vector([1.0]), hand_vector([2.0])], **kwargs)


# ---------------------------------------------------------------------------------------------- provenance


def test_provenance_records_the_inputs_and_survives_save_and_load(tmp_path, real_vectors):
    first, second = real_vectors
    first.save_pretrained(tmp_path / "first")
    merged = ExplanationVector.merge(
        [tmp_path / "first", second], method="dare_ties", density=0.3, seed=7, names=[None, "second"]
    )
    record = merged.config.provenance["merge"]
    assert record["method"] == "dare_ties" and record["density"] == 0.3 and record["seed"] == 7
    assert record["weights"] == [1.0, 1.0] and record["majority_sign"] == "total"
    inputs = record["inputs"]
    assert inputs[0]["source"] == str(tmp_path / "first") and inputs[1]["name"] == "second"
    assert [i["sha256"] for i in inputs] == [tensors_sha256(v.tensors) for v in real_vectors]
    assert [i["source_dataset"] for i in inputs] == ["org/source-0", "org/source-1"]
    assert merged.config.base_model == "org/tiny-base"
    assert merged.recommended_alpha == pytest.approx((0.5 + 1.5) / 2)  # the inputs' mean by default

    merged.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / VECTOR_CONFIG_NAME).read_text())
    assert saved["provenance"]["merge"] == json.loads(json.dumps(record))
    loaded = ExplanationVector.from_pretrained(tmp_path / "merged")
    assert loaded.config.provenance == saved["provenance"]
    assert all(torch.equal(loaded.tensors[k], merged.tensors[k]) for k in merged.tensors)

    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert "## Merged from" in card.text and "method `dare_ties`" in card.text
    assert inputs[0]["sha256"][:12] in card.text and "| second |" in card.text
    assert card.data.datasets == ["org/source-0", "org/source-1"]


def test_merging_a_vector_with_itself_by_ties_is_its_top_k(real_vectors):
    vector = real_vectors[0]
    merged = ExplanationVector.merge([vector, vector], method="ties", density=0.2)
    for key, tensor in vector.tensors.items():
        kept = merged.tensors[key] != 0
        # the disjoint mean of two equal values is the value; 20 % (rounded, at least one) of the entries
        # survive, fewer where the tensor has fewer non-zeros (LayerNorm deltas of equal inits are all zero)
        assert torch.equal(merged.tensors[key][kept], tensor[kept])
        nonzero = int((tensor != 0).sum())
        assert int(kept.sum()) == min(max(1, round(0.2 * tensor.numel())), nonzero)
    assert any(int((merged.tensors[k] != 0).sum()) > 1 for k in merged.tensors)


# ---------------------------------------------------------------------------------------------- over the Hub


def test_a_merged_vector_round_trips_through_the_loopback_hub(hub, tmp_path, real_vectors):
    merged = ExplanationVector.merge(real_vectors, method="ties", density=0.5)
    merged.push_to_hub("merge/ties-vector", token=hub.token)
    pulled = ExplanationVector.from_pretrained("merge/ties-vector")
    assert all(torch.equal(pulled.tensors[k], merged.tensors[k]) for k in merged.tensors)
    assert pulled.config.provenance["merge"]["method"] == "ties"
    assert "## Merged from" in ModelCard.load("merge/ties-vector").text
    # A merge of Hub inputs records their ids, and the pushed merge applies from its id.
    for index, vector in enumerate(real_vectors):
        vector.push_to_hub(f"merge/input-{index}", token=hub.token)
    from_ids = ExplanationVector.merge(
        ["merge/input-0", "merge/input-1"], method="ties", density=0.5, revision="main"
    )
    assert [i["source"] for i in from_ids.config.provenance["merge"]["inputs"]] == [
        "merge/input-0@main",
        "merge/input-1@main",
    ]
    assert all(torch.equal(from_ids.tensors[k], merged.tensors[k]) for k in merged.tensors)
    target = tiny_classifier(seed=96)
    patched = apply_explanation_vector(target, "merge/ties-vector", alpha=1.0)
    expected = apply_explanation_vector(target, merged, alpha=1.0)
    x = pixels(2)
    with torch.no_grad():
        assert torch.equal(patched(x, explain="all").explanation, expected(x, explain="all").explanation)
