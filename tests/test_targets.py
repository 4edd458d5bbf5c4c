"""Explanation targets as a dataset column: equal to direct Kernel SHAP, cached, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from torch import nn

from selfexplain.attribution.shapley import kernel_shap_values
from selfexplain.attribution.targets import add_explanation_targets, example_seed
from selfexplain.data import build_transform, default_image_processor
from tests._tiny import tiny_classifier

IMAGE_SIZE = 16
pytestmark = pytest.mark.usefixtures("one_thread")


class CountingModel(nn.Module):
    """Wraps a classifier, counts the images it evaluates and can crash after a number of them.

    It exposes the wrapped model's `config` (as wrappers of transformers models usually do) unless
    `with_config=False`, in which case the number of classes must be found with a forward pass.
    """

    def __init__(
        self, model: nn.Module, fail_after_images: int | None = None, with_config: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        if with_config:
            self.config = model.config
        self.images = 0
        self.fail_after_images = fail_after_images

    def forward(self, pixel_values: torch.Tensor):
        if self.fail_after_images is not None and self.images + len(pixel_values) > self.fail_after_images:
            raise RuntimeError("simulated crash")
        self.images += len(pixel_values)
        return self.model(pixel_values=pixel_values)


def image_dataset(num_examples: int = 12, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
        for _ in range(num_examples)
    ]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])})
    return Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(num_examples)]}, features=features
    )


def column(dataset: Dataset, name: str = "explanation_targets") -> np.ndarray:
    return np.asarray(dataset.with_format("numpy")[name])


@pytest.fixture(scope="module")
def processor():
    return default_image_processor(IMAGE_SIZE)


def test_targets_equal_a_direct_kernel_shap_call_and_do_not_depend_on_sharding(processor, tmp_path):
    dataset, model = image_dataset(), CountingModel(tiny_classifier(seed=1), with_config=False)
    kwargs = dict(image_processor=processor, grid=(4, 4), budget=40, seed=3, progress=False)
    out = add_explanation_targets(dataset, model, cache_dir=tmp_path / "a", num_shards=3, **kwargs)

    assert out.column_names == ["image", "label", "explanation_targets"]
    assert out.features["explanation_targets"].shape == (3, 4, 4)
    pixel_values = torch.stack(
        build_transform(processor, label_column=None)({"image": dataset["image"]})["pixel_values"]
    )
    seeds = [example_seed(3, i) for i in range(len(dataset))]
    expected = kernel_shap_values(model, pixel_values, grid=(4, 4), budget=40, seed=seeds).numpy()
    np.testing.assert_array_equal(column(out), expected)

    # Another sharding, another batch size, no cache: the same values, up to float rounding — on some CPUs (MKL
    # with AVX-512) a forward pass rounds differently at another batch size (about 1e-7 here; values ~1e-3).
    in_memory = add_explanation_targets(dataset, model, num_shards=1, batch_size=7, **kwargs)
    np.testing.assert_allclose(column(in_memory), expected, rtol=0, atol=1e-6)
    # The seed matters: a different run seed gives different samples.
    other = add_explanation_targets(dataset, model, cache_dir=tmp_path / "a", **{**kwargs, "seed": 4})
    assert not np.array_equal(column(other), expected)


def test_second_call_runs_no_forward_pass(processor, tmp_path):
    dataset = image_dataset()
    kwargs = dict(
        image_processor=processor, grid=(2, 2), budget=16, cache_dir=tmp_path, num_shards=2, progress=False
    )
    first = CountingModel(tiny_classifier(seed=1))
    out1 = add_explanation_targets(dataset, first, **kwargs)
    # Budget >= 2**4 enumerates all 16 coalitions of every image.
    assert first.images == 16 * len(dataset)

    second = CountingModel(tiny_classifier(seed=1))
    out2 = add_explanation_targets(dataset, second, **kwargs)
    assert second.images == 0
    np.testing.assert_array_equal(column(out1), column(out2))

    # Different weights are a different cache entry.
    retrained = CountingModel(tiny_classifier(seed=2))
    add_explanation_targets(dataset, retrained, **kwargs)
    assert retrained.images == 16 * len(dataset)


def test_interrupted_run_recomputes_only_unfinished_shards(processor, tmp_path):
    dataset = image_dataset(num_examples=16)
    kwargs = dict(image_processor=processor, grid=(2, 2), budget=16, num_shards=4, progress=False)
    per_shard = 16 * 4  # 4 examples per shard, 16 coalitions each

    crashing = CountingModel(tiny_classifier(seed=1), fail_after_images=2 * per_shard + 10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        add_explanation_targets(dataset, crashing, cache_dir=tmp_path / "cache", **kwargs)
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in folder.glob("*.arrow")) == [
        "shard-00000-of-00004.arrow",
        "shard-00001-of-00004.arrow",
    ]

    resumed = CountingModel(tiny_classifier(seed=1))
    out = add_explanation_targets(dataset, resumed, cache_dir=tmp_path / "cache", **kwargs)
    assert resumed.images == 2 * per_shard
    assert len(list(folder.glob("*.arrow"))) == 4

    uninterrupted = add_explanation_targets(
        dataset, CountingModel(tiny_classifier(seed=1)), cache_dir=tmp_path / "fresh", **kwargs
    )
    np.testing.assert_array_equal(column(out), column(uninterrupted))


def test_bad_arguments_are_named(processor):
    dataset, model = image_dataset(num_examples=3), tiny_classifier()
    with pytest.raises(ValueError, match="grid"):
        add_explanation_targets(dataset, model, image_processor=processor, grid=(4,), progress=False)
    with pytest.raises(ValueError, match="budget"):
        add_explanation_targets(dataset, model, image_processor=processor, grid=(2, 2), budget=1)
    with pytest.raises(ValueError, match="baseline"):
        add_explanation_targets(dataset, model, image_processor=processor, grid=(2, 2), baseline="grey")
    with pytest.raises(TypeError, match="nn.Module"):
        add_explanation_targets(dataset, lambda x: x, image_processor=processor, grid=(2, 2))
    labelled = dataset.add_column("explanation_targets", [0, 1, 2])
    with pytest.raises(ValueError, match="already has a 'explanation_targets' column"):
        add_explanation_targets(labelled, model, image_processor=processor, grid=(2, 2))


def test_example_seed_depends_on_seed_and_index_only():
    assert example_seed(0, 5) == example_seed(0, 5)
    assert len({example_seed(s, i) for s in range(3) for i in range(50)}) == 150
    assert 0 <= example_seed(2**31, 10**9) < 2**63
