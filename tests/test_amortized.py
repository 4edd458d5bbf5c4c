"""The amortised Shapley objective: its minimiser is the Shapley value, and `train` fits it without targets."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

from selfexplain import ViTForSelfExplainingClassification
from selfexplain.attribution.amortized import (
    amortized_shapley_loss,
    coalition_values,
    example_generators,
    shapley_kernel_coalitions,
)
from selfexplain.attribution.shapley import exact_shapley_values, kernel_shap_values
from selfexplain.data import default_image_processor
from selfexplain.evaluation.metrics import pearson
from selfexplain.training import TrainingConfig, train
from tests._squares import IMAGE_SIZE, coloured_squares
from tests._tiny import pixels, tiny_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _exact_shapley(game, n: int) -> torch.Tensor:
    """Shapley values of a set function on n players by the permutation-free subset formula."""
    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                with_i = torch.zeros(n, dtype=torch.bool)
                with_i[list(subset) + [i]] = True
                without = with_i.clone()
                without[i] = False
                phi[i] += weight * (game(with_i) - game(without))
    return phi


def test_kernel_coalitions_follow_the_shapley_kernel_and_come_in_complementary_pairs():
    n = 10
    coalitions = shapley_kernel_coalitions(n, 20_000, [torch.Generator().manual_seed(0)])[0]
    assert bool((coalitions[0::2] ^ coalitions[1::2]).all())
    sizes = coalitions[0::2].sum(-1)
    expected = torch.tensor([(n - 1) / (s * (n - s)) for s in range(1, n)])
    expected = expected / expected.sum()
    observed = torch.bincount(sizes, minlength=n)[1:].double() / len(sizes)
    assert torch.allclose(observed, expected.double(), atol=0.01)


def test_the_minimiser_of_the_loss_is_the_shapley_value_of_a_non_additive_game():
    """Fit φ directly to the loss over many kernel coalitions: it must land on the exact Shapley values,
    interactions included (an additive game would be too easy: any regression recovers it)."""
    n = 5

    def game(keep: torch.Tensor) -> float:
        s = keep.double()
        return float(
            0.3 * s[0] + 0.2 * s[1] * s[2] + 0.4 * s[3] * s[4] * s[0] - 0.1 * s[2] + 0.05 * s.sum() ** 2
        )

    exact = _exact_shapley(game, n)
    coalitions = shapley_kernel_coalitions(n, 20_000, [torch.Generator().manual_seed(1)])
    values = torch.tensor([[game(c)] for c in coalitions[0]], dtype=torch.float64)[None]  # (1, M, 1)
    v_empty = torch.tensor([[game(torch.zeros(n, dtype=torch.bool))]], dtype=torch.float64)
    v_full = torch.tensor([[game(torch.ones(n, dtype=torch.bool))]], dtype=torch.float64)
    phi = torch.zeros(1, 1, n, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([phi], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = amortized_shapley_loss(phi, coalitions, values, v_empty, v_full)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = phi.detach()[0, 0]
    fitted = fitted + ((v_full - v_empty)[0, 0] - fitted.sum()) / n  # the efficiency step the loss applies
    assert torch.allclose(fitted, exact, atol=0.01), (fitted, exact)


def test_coalition_values_match_the_value_function_of_kernel_shap():
    """The training objective and the Kernel SHAP estimator must value a coalition identically: the exact
    Shapley values of the probabilities computed from `coalition_values` equal `exact_shapley_values`."""
    model = tiny_classifier(seed=3, image_size=8, patch_size=4)  # 2x2 patches: 4 players, 16 coalitions
    x = pixels(batch=2, size=8, seed=3)
    every = torch.tensor(list(itertools.product([False, True], repeat=4)))
    coalitions = every.expand(2, -1, -1)
    values, v_empty, v_full = coalition_values(model, x, coalitions, (2, 2), "mean")
    index = {tuple(c.tolist()): k for k, c in enumerate(every)}
    for image in range(2):
        for cls in range(3):
            table = values[image, :, cls]
            phi = _exact_shapley(lambda keep, table=table: float(table[index[tuple(keep.tolist())]]), 4)
            reference = exact_shapley_values(model, x[image : image + 1], grid=(2, 2), baseline="mean")
            assert torch.allclose(phi.float(), reference[0, cls].flatten(), atol=1e-5)
    assert torch.allclose(v_full, torch.softmax(model(pixel_values=x).logits, -1), atol=1e-6)


def test_example_generators_depend_on_seed_epoch_and_index_only():
    a = shapley_kernel_coalitions(16, 4, example_generators(0, 1, [5, 9]))
    b = shapley_kernel_coalitions(16, 4, example_generators(0, 1, [9]))
    c = shapley_kernel_coalitions(16, 4, example_generators(0, 2, [9]))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(b[0], c[0])


@pytest.fixture(scope="module")
def squares_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("squares-base")
    tiny_classifier(seed=0, num_labels=3, id2label={0: "red", 1: "green", 2: "blue"}).save_pretrained(path)
    default_image_processor(IMAGE_SIZE).save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def _value_model_images():
    """Counts the images that go through the frozen value model (the only model whose parameters are all frozen)
    while the block runs: a global forward hook, observing only."""
    valued: list[int] = []

    def count(module, args, kwargs, output):
        if isinstance(module, ViTForSelfExplainingClassification) and not any(
            p.requires_grad for p in module.parameters()
        ):
            valued.append(len(kwargs.get("pixel_values", args[0] if args else None)))

    hook = torch.nn.modules.module.register_module_forward_hook(count, with_kwargs=True)
    try:
        yield valued
    finally:
        hook.remove()


@pytest.mark.parametrize("pool", [None, 16])
def test_train_with_the_shapley_objective_needs_no_targets_and_learns_shapley_maps(
    squares_base, tmp_path, pool
):
    """A self-explaining model trained on the amortised objective (no targets anywhere) agrees with Kernel SHAP
    of its value model; the prediction-only partner, trained with the same recipe, does not. The zero baseline
    removes a square's colour (the per-image mean would keep it, and the values would barely move).
    With a coalition pool the frozen value model sees each training image's coalitions exactly once, over all
    epochs, and the model learns as well."""
    data = coloured_squares(96, seed=0).remove_columns("explanation_targets")
    common = dict(
        base=squares_base, num_epochs=20, batch_size=16, learning_rate=3e-3, log_every=6, augment=False
    )
    common["checkpoint_every"] = None
    pred_dir, se_dir = tmp_path / "pred", tmp_path / "se"
    train(TrainingConfig(output_dir=str(pred_dir), **common), data)
    with _value_model_images() as valued:
        metrics = train(
            TrainingConfig(
                output_dir=str(se_dir),
                explanation_loss_weight=10.0,
                explanation_objective="shapley",
                value_model=str(pred_dir),
                coalitions_per_image=8,
                coalition_pool=pool,
                removal_baseline="zero",
                **common,
            ),
            data,
        )
    assert metrics["train_explanation_loss"] > 0
    # Per image: its coalitions and the empty and full image, once with a pool, else at every epoch.
    per_image = pool + 2 if pool is not None else common["num_epochs"] * (8 + 2)
    assert sum(valued) == len(data) * per_image
    test = coloured_squares(16, seed=5)
    x = default_image_processor(IMAGE_SIZE)(
        images=[i.convert("RGB") for i in test["image"]], return_tensors="pt"
    )
    x = x["pixel_values"]
    pred = ViTForSelfExplainingClassification.from_pretrained(pred_dir).eval()
    se = ViTForSelfExplainingClassification.from_pretrained(se_dir).eval()
    with torch.no_grad():
        classes = pred(x, explain=None).logits.argmax(-1)
        reference = kernel_shap_values(pred, x, grid=(4, 4), budget=2048, baseline="zero", seed=0)
        reference = reference[torch.arange(len(x)), classes].flatten(1)
        agreement = {
            name: float(pearson(model(x, explain=classes).explanation.flatten(1), reference).mean())
            for name, model in (("prediction_only", pred), ("self_explaining", se))
        }
    assert agreement["self_explaining"] > agreement["prediction_only"] + 0.2, agreement
    config = se.config
    assert config.selfexplain_targets["method"] == "amortized_shapley"
    assert config.selfexplain_targets["value_model"] == str(pred_dir)
    assert config.selfexplain_targets.get("coalition_pool") == pool


def test_a_coalition_pool_is_refused_where_its_values_would_be_wrong():
    shapley = dict(base="b", output_dir="o", explanation_loss_weight=1.0, explanation_objective="shapley",
                   value_model="v", augment=False)  # fmt: skip
    TrainingConfig(**shapley, coalition_pool=64)
    with pytest.raises(ValueError, match="coalition_pool.*even int"):
        TrainingConfig(**shapley, coalition_pool=7)
    with pytest.raises(ValueError, match="coalition_pool.*augment=False"):
        TrainingConfig(**{**shapley, "augment": True}, coalition_pool=8)  # each epoch shows other images
    with pytest.raises(ValueError, match="coalition_pool.*shapley"):
        TrainingConfig(base="b", output_dir="o", explanation_loss_weight=1.0, coalition_pool=8, augment=False)


def test_the_shapley_objective_refuses_a_value_model_of_another_label_set(squares_base, tmp_path):
    other = tmp_path / "other"
    tiny_classifier(seed=0, num_labels=2).save_pretrained(other)
    data = coloured_squares(16, seed=0)
    cfg = TrainingConfig(
        base=squares_base,
        output_dir=str(tmp_path / "se"),
        explanation_loss_weight=1.0,
        explanation_objective="shapley",
        value_model=str(other),
        max_steps=1,
        batch_size=8,
    )
    with pytest.raises(ValueError, match="same label set"):
        train(cfg, data)
    with pytest.raises(ValueError, match="value_model"):
        TrainingConfig(base="b", output_dir="o", explanation_loss_weight=1.0, explanation_objective="shapley")


class _CrashingProcessor:
    """The image processor, raising on its n-th call: a crash in the middle of a run."""

    def __init__(self, processor, fail_on_call: int) -> None:
        self.processor, self.fail_on_call, self.calls = processor, fail_on_call, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return self.processor(*args, **kwargs)


def test_a_run_with_a_coalition_pool_resumes_to_the_uninterrupted_weights(squares_base, tmp_path):
    """The pool is not checkpointed: a resumed run values its coalitions again, from ``(seed, index)`` alone,
    and lands on the weights of the run that was never interrupted."""
    from safetensors.torch import load_file

    data = coloured_squares(48, seed=0).remove_columns("explanation_targets")
    common = dict(
        base=squares_base, num_epochs=3, batch_size=8, learning_rate=3e-3, augment=False, log_every=3
    )
    train(TrainingConfig(output_dir=str(tmp_path / "pred"), checkpoint_every=None, **common), data)

    def config(out, **extra):
        return TrainingConfig(
            output_dir=str(tmp_path / out),
            explanation_loss_weight=10.0,
            explanation_objective="shapley",
            value_model=str(tmp_path / "pred"),
            coalition_pool=8,
            removal_baseline="zero",
            checkpoint_every=4,
            **common,
            **extra,
        )

    train(config("full"), data)
    processor = default_image_processor(IMAGE_SIZE)
    with pytest.raises(RuntimeError, match="simulated crash"):
        # 6 batches value the pool first, then 6 steps per epoch: call 16 is step 10 (the checkpoint: step 8).
        train(config("run"), data, image_processor=_CrashingProcessor(processor, fail_on_call=16))
    resumed = train(config("run", resume=True), data, image_processor=processor)
    assert resumed["resumed_from"].endswith("checkpoint-00000008")
    full, run = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("full", "run"))
    # Equal up to float rounding: on some CPUs (MKL with AVX-512) a forward pass rounds differently at another batch
    # size, and the resumed run values its pool in other batches (2.5e-6 after 3 epochs there; a step lost or
    # repeated moves the weights by ~1e-3).
    assert all(torch.allclose(full[key], run[key], rtol=0, atol=2e-5) for key in full)


def test_a_run_stopped_by_max_steps_values_only_the_images_it_trains_on(squares_base, tmp_path):
    data = coloured_squares(48, seed=0).remove_columns("explanation_targets")
    common = dict(base=squares_base, batch_size=8, augment=False, checkpoint_every=None)
    train(TrainingConfig(output_dir=str(tmp_path / "pred"), max_steps=2, **common), data)
    with _value_model_images() as valued:
        train(
            TrainingConfig(
                output_dir=str(tmp_path / "se"), explanation_loss_weight=1.0, explanation_objective="shapley",
                value_model=str(tmp_path / "pred"), coalition_pool=8, max_steps=2, **common,
            ),
            data,
        )  # fmt: skip
    assert sum(valued) == 2 * 8 * (8 + 2)  # 2 steps of 8 images, not the 6 batches of the epoch
