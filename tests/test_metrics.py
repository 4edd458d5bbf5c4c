"""Known-answer tests for selfexplain.metrics and the shipped `evaluate` metric scripts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from selfexplain.evaluation.metrics import (
    METRICS_MODULE_DIR,
    accuracy,
    insertion_deletion_auc,
    load_accuracy_metric,
    load_explanation_metric,
    pearson,
    pointing_game,
    relevance_mass,
    spearman,
    topk_overlap,
)

# ---------------------------------------------------------------------------------------------------------
# Insertion / deletion on a model that only looks at one patch
# ---------------------------------------------------------------------------------------------------------

GRID = 4  # 4x4 players of 2x2 pixels on an 8x8 image
PATCH = 2
N = GRID * GRID
SEEN_ROW, SEEN_COL = 1, 2
SEEN_INDEX = SEEN_ROW * GRID + SEEN_COL  # row-major index of the only patch the model looks at
P_PRESENT = 1 / (1 + math.exp(-2.0))  # softmax([2, 0])[0]: the seen patch holds the value 2
P_REMOVED = 0.5  # softmax([0, 0])[0]: the zero baseline replaced it


class OnePatchModel(nn.Module):
    """Two-class logits ``[m, 0]`` where ``m`` is the mean of one 2x2 patch; records its training flag."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.training_flags: list[bool] = []

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.training_flags.append(self.training)
        rows = slice(SEEN_ROW * PATCH, (SEEN_ROW + 1) * PATCH)
        cols = slice(SEEN_COL * PATCH, (SEEN_COL + 1) * PATCH)
        m = pixel_values[:, :, rows, cols].mean(dim=(1, 2, 3)) * self.scale
        return torch.stack([m, torch.zeros_like(m)], dim=-1)


def one_patch_images(batch: int = 1) -> torch.Tensor:
    images = (
        torch.rand(batch, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(0)) - 0.5
    )
    images[:, :, SEEN_ROW * PATCH : (SEEN_ROW + 1) * PATCH, SEEN_COL * PATCH : (SEEN_COL + 1) * PATCH] = 2.0
    return images


def map_ranking_seen_patch_at(rank: int) -> torch.Tensor:
    """A (1, 4, 4) map whose descending ranking puts the seen patch at position ``rank``."""
    others = [i for i in range(N) if i != SEEN_INDEX]
    order = others[:rank] + [SEEN_INDEX] + others[rank:]
    scores = torch.empty(N)
    scores[torch.tensor(order)] = torch.arange(N, 0, -1, dtype=torch.float32)
    return scores.view(1, GRID, GRID)


def expected_aucs(rank: int) -> tuple[float, float]:
    """Hand-computed trapezoid AUCs (x normalised to [0, 1]) when the seen patch has ``rank``.

    Deletion curve: P_PRESENT at 0..rank patches removed, P_REMOVED afterwards; insertion is the mirror.
    """
    crossing = (P_PRESENT + P_REMOVED) / 2
    deletion = (rank * P_PRESENT + crossing + (N - rank - 1) * P_REMOVED) / N
    insertion = (rank * P_REMOVED + crossing + (N - rank - 1) * P_PRESENT) / N
    return insertion, deletion


def test_expected_aucs_by_hand() -> None:
    # The formula itself, spelled out for rank 0: (0.5 + 0.8808) / 2 / 16 + 15 * 0.5 / 16.
    insertion, deletion = expected_aucs(0)
    assert deletion == pytest.approx(0.5118999, abs=1e-6)
    assert insertion == pytest.approx(0.8688972, abs=1e-6)


def test_faithful_ranking_beats_unfaithful_with_hand_computed_values() -> None:
    model = OnePatchModel()
    images = one_patch_images()
    first = insertion_deletion_auc(
        model, images, map_ranking_seen_patch_at(0), baseline="zero", return_curves=True
    )
    last = insertion_deletion_auc(model, images, map_ranking_seen_patch_at(N - 1), baseline="zero")

    ins_first, del_first = expected_aucs(0)
    ins_last, del_last = expected_aucs(N - 1)
    assert first["deletion"].item() == pytest.approx(del_first, abs=1e-6)
    assert first["insertion"].item() == pytest.approx(ins_first, abs=1e-6)
    assert last["deletion"].item() == pytest.approx(del_last, abs=1e-6)
    assert last["insertion"].item() == pytest.approx(ins_last, abs=1e-6)
    assert first["deletion"] < last["deletion"] and first["insertion"] > last["insertion"]

    assert first["target"].tolist() == [0]
    expected_deletion = torch.tensor([P_PRESENT] + [P_REMOVED] * N)
    torch.testing.assert_close(first["deletion_curve"][0], expected_deletion)
    torch.testing.assert_close(first["insertion_curve"][0], torch.tensor([P_REMOVED] + [P_PRESENT] * N))
    torch.testing.assert_close(first["fraction"], torch.arange(N + 1) / N)


def test_random_maps_score_between_best_and_worst() -> None:
    model = OnePatchModel()
    images = one_patch_images(batch=5)
    maps = torch.randn(5, GRID, GRID, generator=torch.Generator().manual_seed(1))
    out = insertion_deletion_auc(model, images, maps, baseline="zero")
    ins_best, del_best = expected_aucs(0)
    ins_worst, del_worst = expected_aucs(N - 1)
    for i in range(5):
        rank = int((maps[i].flatten() > maps[i].flatten()[SEEN_INDEX]).sum())
        ins, dele = expected_aucs(rank)
        assert out["insertion"][i].item() == pytest.approx(ins, abs=1e-6)
        assert out["deletion"][i].item() == pytest.approx(dele, abs=1e-6)
        assert ins_worst <= ins <= ins_best and del_best <= dele <= del_worst


def test_ties_are_broken_by_row_major_index() -> None:
    # A constant map ranks players in row-major order, so the seen patch sits at rank SEEN_INDEX.
    out = insertion_deletion_auc(
        OnePatchModel(), one_patch_images(), torch.zeros(1, GRID, GRID), baseline="zero"
    )
    ins, dele = expected_aucs(SEEN_INDEX)
    assert out["insertion"].item() == pytest.approx(ins, abs=1e-6)
    assert out["deletion"].item() == pytest.approx(dele, abs=1e-6)


def test_fewer_steps_move_groups_of_patches() -> None:
    out = insertion_deletion_auc(
        OnePatchModel(),
        one_patch_images(),
        map_ranking_seen_patch_at(0),
        baseline="zero",
        steps=4,
        return_curves=True,
    )
    torch.testing.assert_close(out["fraction"], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # Deletion removes 4 patches per step: the seen patch goes in the first step.
    assert out["deletion"].item() == pytest.approx(
        ((P_PRESENT + P_REMOVED) / 2 + 3 * P_REMOVED) / 4, abs=1e-6
    )
    assert out["insertion"].item() == pytest.approx(
        ((P_PRESENT + P_REMOVED) / 2 + 3 * P_PRESENT) / 4, abs=1e-6
    )


def test_eval_mode_during_scoring_and_training_flag_restored() -> None:
    model = OnePatchModel().train()
    insertion_deletion_auc(
        model, one_patch_images(), torch.zeros(1, GRID, GRID), baseline="zero", batch_size=7
    )
    assert model.training
    assert model.training_flags and not any(model.training_flags)
    # 1 pass for the target, then 2 * 17 masked images in chunks of 7.
    assert len(model.training_flags) == 1 + math.ceil(2 * (N + 1) / 7)


def test_explicit_target_and_logit_scores() -> None:
    out = insertion_deletion_auc(
        OnePatchModel(),
        one_patch_images(),
        map_ranking_seen_patch_at(0),
        baseline="zero",
        target=1,
        value="logits",
        return_curves=True,
    )
    # Class 1's logit is always 0 whatever is masked.
    assert out["target"].tolist() == [1]
    assert torch.count_nonzero(out["deletion_curve"]) == 0 and out["insertion"].item() == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"explanations": torch.zeros(2, GRID, GRID)}, "explanations"),
        ({"explanations": torch.full((1, GRID, GRID), float("nan"))}, "NaN"),
        ({"steps": 0}, "steps"),
        ({"steps": N + 1}, "steps"),
        ({"value": "log_probs"}, "value"),
        ({"batch_size": 0}, "batch_size"),
        ({"target": torch.tensor([0, 1])}, "target"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs: dict, message: str) -> None:
    call = {
        "model": OnePatchModel(),
        "pixel_values": one_patch_images(),
        "explanations": torch.zeros(1, GRID, GRID),
    }
    with pytest.raises(ValueError, match=message):
        insertion_deletion_auc(**{**call, **kwargs})


def test_non_module_model_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="model"):
        insertion_deletion_auc(lambda x: x, one_patch_images(), torch.zeros(1, GRID, GRID))


@pytest.fixture(scope="module")
def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    return ViTForImageClassification(config).eval()


@pytest.mark.parametrize("grid, steps", [(4, None), (3, 5)])
def test_batch_size_does_not_change_aucs(
    tiny_vit: ViTForImageClassification, grid: int, steps: int | None
) -> None:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 16, 16, generator=generator)
    maps = torch.randn(3, grid, grid, generator=generator)
    one = insertion_deletion_auc(tiny_vit, images, maps, baseline="mean", steps=steps, batch_size=1)
    many = insertion_deletion_auc(tiny_vit, images, maps, baseline="mean", steps=steps, batch_size=1000)
    torch.testing.assert_close(one["insertion"], many["insertion"], atol=1e-5, rtol=0)
    torch.testing.assert_close(one["deletion"], many["deletion"], atol=1e-5, rtol=0)
    assert torch.equal(one["target"], tiny_vit(images).logits.argmax(-1))
    assert ((one["insertion"] >= 0) & (one["insertion"] <= 1)).all()


# ---------------------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------------------


def test_agreement_of_identical_and_reversed_maps() -> None:
    a = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(spearman(a, a), torch.ones(4))
    torch.testing.assert_close(pearson(a, a), torch.ones(4))
    torch.testing.assert_close(spearman(a, -a), -torch.ones(4))
    torch.testing.assert_close(spearman(a, a.exp()), torch.ones(4))  # monotone, not linear
    assert (pearson(a, a.exp()) < 1 - 1e-3).all()
    torch.testing.assert_close(pearson(a, 3 * a - 2), torch.ones(4))


def test_spearman_averages_ties_like_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 1.0, 2.0, 2.0, 9.0]])
    b = torch.tensor([[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0], [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0]])
    expected = [stats.spearmanr(x, y).statistic for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expected, dtype=torch.float32))


def test_correlation_of_a_constant_map_is_nan() -> None:
    assert spearman(torch.ones(1, 4), torch.arange(4.0).view(1, 4)).isnan().all()


def test_topk_overlap_known_sets() -> None:
    a = torch.tensor([[9.0, 8.0, 7.0, 0.0, 0.0, 0.0]])
    disjoint = torch.tensor([[0.0, 0.0, 0.0, 7.0, 8.0, 9.0]])
    half = torch.tensor([[9.0, 0.0, 0.0, 8.0, 0.0, 0.0]])
    assert topk_overlap(a, disjoint, k=3).item() == 0.0
    assert topk_overlap(a, a, k=3).item() == 1.0
    assert topk_overlap(a, half, k=2).item() == 0.5
    with pytest.raises(ValueError, match="k"):
        topk_overlap(a, a, k=7)


def test_agreement_rejects_maps_of_different_sizes() -> None:
    with pytest.raises(ValueError, match="same number of entries"):
        spearman(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))


# ---------------------------------------------------------------------------------------------------------
# Localisation and accuracy
# ---------------------------------------------------------------------------------------------------------


def test_pointing_game_hit_and_miss_at_pixel_level() -> None:
    maps = torch.tensor([[[0.1, 0.2], [0.9, 0.3]], [[0.1, 0.2], [0.9, 0.3]]])
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 7, 0] = True  # one pixel inside the bottom-left (top) cell: a hit
    masks[1, :4, :] = True  # the whole top half: a miss
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0]


def test_pointing_game_ties_pick_the_first_cell_and_uneven_grids_work() -> None:
    maps = torch.ones(1, 3, 3)  # all tied: the first (top-left) cell is the pointer
    top_left = torch.zeros(1, 7, 7, dtype=torch.bool)
    top_left[0, 0, 0] = True
    assert pointing_game(maps, top_left).item() == 1.0
    assert pointing_game(maps, ~top_left & (torch.arange(7).view(1, 7, 1) > 3)).item() == 0.0


def test_relevance_mass_exact() -> None:
    maps = torch.tensor([[[3.0, 1.0], [-2.0, 0.0]]])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # the whole top-left cell (4 pixels of score 3)
    mask[0, :1, 2:] = True  # 2 of the 4 pixels of the top-right cell (score 1)
    # positive mass: 4 * 3 + 4 * 1 = 16; inside: 4 * 3 + 2 * 1 = 14; the -2 cell is clipped to 0.
    assert relevance_mass(maps, mask).item() == pytest.approx(14 / 16)
    assert relevance_mass(-maps.abs(), mask).isnan().all()


def test_localisation_rejects_mismatched_batches() -> None:
    with pytest.raises(ValueError, match="masks"):
        relevance_mass(torch.zeros(2, 2, 2), torch.zeros(3, 4, 4))


def test_accuracy_from_logits_and_predictions() -> None:
    labels = torch.tensor([0, 1, 1, 2])
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    assert accuracy(logits, labels).item() == 0.75
    assert accuracy(torch.tensor([0, 1, 1, 0]), labels).item() == 0.75
    with pytest.raises(ValueError, match="logits_or_preds"):
        accuracy(torch.zeros(3), labels)


# ---------------------------------------------------------------------------------------------------------
# The shipped `evaluate` modules
# ---------------------------------------------------------------------------------------------------------


def test_explanation_metric_agrees_with_plain_functions() -> None:
    generator = torch.Generator().manual_seed(4)
    maps, refs = torch.randn(6, 4, 4, generator=generator), torch.randn(6, 4, 4, generator=generator)
    masks = torch.rand(6, 8, 8, generator=generator) > 0.6
    metric = load_explanation_metric("all", keep_in_memory=True)
    scores = metric.compute(
        predictions=maps.flatten(1).tolist(),
        references=refs.tolist(),
        masks=masks.int().tolist(),
        grid_shape=(4, 4),
        k=3,
    )
    assert scores["spearman"] == pytest.approx(spearman(maps, refs).mean().item(), abs=1e-6)
    assert scores["pearson"] == pytest.approx(pearson(maps, refs).mean().item(), abs=1e-6)
    assert scores["topk_overlap"] == pytest.approx(topk_overlap(maps, refs, k=3).mean().item(), abs=1e-6)
    assert scores["pointing_game"] == pytest.approx(pointing_game(maps, masks).mean().item(), abs=1e-6)
    assert scores["relevance_mass"] == pytest.approx(relevance_mass(maps, masks).mean().item(), abs=1e-6)


def test_explanation_metric_batches_and_mixed_sizes() -> None:
    metric = load_explanation_metric("agreement", keep_in_memory=True)
    metric.add_batch(predictions=[[[0.0, 1.0], [2.0, 3.0]]], references=[[[0.0, 1.0], [2.0, 3.0]]])
    metric.add_batch(predictions=[[[3.0, 2.0, 1.0]]], references=[[[1.0, 2.0, 3.0]]])
    scores = metric.compute(k=1)  # spearman 1 and -1; top-1 overlap 1 and 0
    assert scores["spearman"] == pytest.approx(0.0, abs=1e-6)
    assert scores["topk_overlap"] == pytest.approx(0.5)

    localization = load_explanation_metric("localization", keep_in_memory=True)
    with pytest.raises(ValueError, match="grid_shape"):
        localization.compute(predictions=[[1.0, 0.0, 0.0, 0.0]], references=[[[1, 0], [0, 0]]])


def test_accuracy_metric_agrees_with_plain_function() -> None:
    preds, labels = [0, 2, 1, 1, 0], [0, 1, 1, 1, 2]
    metric = load_accuracy_metric(keep_in_memory=True)
    assert metric.compute(predictions=preds, references=labels)["accuracy"] == pytest.approx(
        accuracy(torch.tensor(preds), torch.tensor(labels)).item()
    )
    assert metric.compute(predictions=preds, references=labels, normalize=False)["accuracy"] == 3


def test_metric_scripts_load_and_compute_offline() -> None:
    script = f"""
import json, evaluate
from selfexplain.evaluation.metrics import load_accuracy_metric, load_explanation_metric
assert evaluate.config.HF_EVALUATE_OFFLINE
quality = evaluate.load({str(METRICS_MODULE_DIR / "explanation_quality.py")!r}, "localization")
out = {{
    "accuracy": load_accuracy_metric().compute(predictions=[1, 0], references=[1, 1]),
    "quality": quality.compute(predictions=[[[0.0, 2.0], [1.0, 0.0]]], references=[[[0, 1], [0, 0]]]),
    "helper": load_explanation_metric().compute(predictions=[[1.0, 2.0, 3.0]], references=[[3.0, 2.0, 1.0]]),
}}
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["accuracy"] == {"accuracy": 0.5}
    assert out["quality"] == {"pointing_game": 1.0, "relevance_mass": pytest.approx(2 / 3)}
    assert out["helper"]["spearman"] == pytest.approx(-1.0)


def test_the_crossover_names_b_star_and_how_close_the_smaller_budgets_come():
    """B* is the smallest budget whose Pearson reaches the map's; beside it the best Pearson of a smaller budget, so
    that a non-monotone curve (Kernel SHAP dips near 2n evaluations) cannot make B* look larger than it is."""
    from selfexplain.experiments.report import crossover

    curve = {"64": {"pearson": 0.469}, "128": {"pearson": 0.187}, "256": {"pearson": 0.694}}
    results = {
        "per_seed": {
            "0": {
                "digits": {
                    "kernel_shap": curve,
                    "transfer": {
                        "mnist": {"recommended_alpha": 1.0, "sweep": {"1": {"pearson": 0.475}}},
                        "union": {"recommended_alpha": 1.0, "sweep": {"1": {"pearson": 0.9}}},
                        "faces": {"recommended_alpha": 1.0, "sweep": {"1": {"pearson": 0.1}}},
                    },
                }
            }
        }
    }
    rows = {row["source"]: row for row in crossover(results)}
    assert rows["mnist"]["budget"] == 256 and rows["mnist"]["closest_below"] == (64, 0.469)
    assert rows["union"]["budget"] is None and rows["union"]["closest_below"] == (256, 0.694)
    assert rows["faces"]["budget"] == 64 and rows["faces"]["closest_below"] is None
