"""Tests for selfexplain.data: built-in offline domains, loading any dataset, and ViT preprocessing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader

from selfexplain.data import (
    BUILTIN_DOMAINS,
    SPLITS,
    UNION_LABEL_OFFSETS,
    UNION_MEMBERS,
    build_transform,
    collate_fn,
    default_image_processor,
    detect_columns,
    detect_image_column,
    id2label,
    label2id,
    label_names,
    load_builtin_domain,
    load_image_dataset,
)

SMALL = 60  # examples per built-in domain in the quick tests (train/val/test = 42/6/12)
GENERATED = ("digits-on-clutter", "shapes-on-clutter")


def small(name: str, seed: int = 0) -> DatasetDict:
    return load_builtin_domain(name, seed=seed, num_samples=SMALL if name != "union" else 4 * SMALL)


def tables_equal(a: DatasetDict, b: DatasetDict) -> bool:
    return all(a[split].data.table.equals(b[split].data.table) for split in SPLITS)


def labels_of(split: Dataset) -> np.ndarray:
    return np.array(list(split["label"]), dtype=np.int64)


def as_arrays(split: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    columns = split.with_format("numpy")[:]
    return columns["image"], columns["label"], columns["object_mask"]


# --------------------------------------------------------------------------------------------------------
# Built-in domains
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN_DOMAINS))
def test_builtin_domain_has_the_common_features(name):
    ds = small(name)
    domain = BUILTIN_DOMAINS[name]
    assert list(ds) == list(SPLITS)
    expected = Features(
        {
            "image": ImageFeature(),
            "label": ClassLabel(names=list(domain.label_names)),
            "object_mask": Array2D((32, 32), "bool"),
        }
    )
    for split in SPLITS:
        assert ds[split].features == expected
        assert name in ds[split].info.description
    example = ds["train"][0]
    assert example["image"].mode == "RGB" and example["image"].size == (32, 32)
    assert np.asarray(example["object_mask"]).shape == (32, 32)
    assert label_names(ds, "label") == list(domain.label_names)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "union" else n for n in BUILTIN_DOMAINS],
)
def test_builtin_domain_default_sizes_and_stratified_splits(name):
    domain = BUILTIN_DOMAINS[name]
    ds = load_builtin_domain(name)
    assert {split: len(ds[split]) for split in SPLITS} == domain.split_sizes
    assert sum(domain.split_sizes.values()) == domain.num_samples
    totals = np.bincount(np.concatenate([labels_of(ds[s]) for s in SPLITS]), minlength=domain.num_classes)
    assert (totals > 0).all()
    for split in SPLITS:
        counts = np.bincount(labels_of(ds[split]), minlength=domain.num_classes)
        expected = totals * len(ds[split]) / totals.sum()
        # union concatenates four stratified splits, so its rounding error can add up over members
        tolerance = 1 if name != "union" else len(UNION_MEMBERS)
        assert np.abs(counts - expected).max() <= tolerance, (split, counts, expected)


@pytest.mark.parametrize("name", list(BUILTIN_DOMAINS))
def test_builtin_domain_is_deterministic_given_the_seed(name):
    first, again, other = small(name, seed=0), small(name, seed=0), small(name, seed=1)
    assert tables_equal(first, again)
    assert not tables_equal(first, other)


def test_faces_are_the_first_half_of_lfw_subset_and_have_no_masks():
    ds = load_builtin_domain("faces")
    assert not BUILTIN_DOMAINS["faces"].has_masks
    labels = np.concatenate([labels_of(ds[s]) for s in SPLITS])
    assert Counter(labels.tolist()) == {0: 100, 1: 100}
    assert ds["train"].features["label"].int2str(1) == "face"
    assert not any(as_arrays(ds[s])[2].any() for s in SPLITS)


@pytest.mark.parametrize("name", ["mnist", "digits"])
def test_digit_masks_are_the_bright_ink(name):
    images, _, masks = as_arrays(small(name)["train"])
    grey = images[..., 0].astype(np.float64) / 255
    assert masks.reshape(len(masks), -1).any(axis=1).all()
    np.testing.assert_array_equal(masks, grey > 0.5)  # grey images: the mask threshold is visible as is


@pytest.mark.parametrize("name", GENERATED)
def test_generated_masks_mark_a_visible_object_inside_the_image(name):
    images, _, masks = as_arrays(small(name)["train"])
    area = masks.reshape(len(masks), -1).mean(axis=1)
    assert (area > 0.01).all() and (area < 0.6).all()
    # The object lies inside the canvas, clear of the border, so no part of it is cut off.
    assert not masks[:, [0, -1], :].any() and not masks[:, :, [0, -1]].any()
    # The mask covers pixels that look different from their surroundings.
    pixels = images.astype(np.float64) / 255
    contrast = []
    for image, mask in zip(pixels, masks, strict=True):
        ring = _dilate(mask, 2) & ~mask
        contrast.append(np.linalg.norm(image[mask].mean(0) - image[ring].mean(0)))
    assert np.median(contrast) > 0.3


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def test_digits_on_clutter_reuses_the_mnist_split_of_the_same_seed():
    mnist, clutter = small("mnist", seed=3), small("digits-on-clutter", seed=3)
    for split in SPLITS:
        assert list(mnist[split]["label"]) == list(clutter[split]["label"])


def test_mnist_variants_are_the_mnist_images_in_the_same_splits():
    """Host domains made from the source's own images: no other domain's images, no test image in training."""
    mnist = small("mnist", seed=3)
    parity, inverted = small("mnist-parity", seed=3), small("mnist-inverted", seed=3)
    assert parity["train"].features["label"].names == ["even", "odd"]
    for split in SPLITS:
        images, labels, masks = as_arrays(mnist[split])
        parity_images, parity_labels, parity_masks = as_arrays(parity[split])
        inverted_images, inverted_labels, inverted_masks = as_arrays(inverted[split])
        np.testing.assert_array_equal(parity_images, images)
        np.testing.assert_array_equal(parity_labels, labels % 2)
        np.testing.assert_array_equal(inverted_images, 255 - images)
        np.testing.assert_array_equal(inverted_labels, labels)
        np.testing.assert_array_equal(parity_masks, masks)
        np.testing.assert_array_equal(inverted_masks, masks)  # the digit's pixels, not the bright ones


def test_union_is_the_members_with_shifted_labels():
    num_samples = 158  # shares 50 / 18 / 50 / 40 in proportion to the members' default sizes
    union = load_builtin_domain("union", seed=2, num_samples=num_samples)
    names = union["train"].features["label"].names
    assert names == list(BUILTIN_DOMAINS["union"].label_names)
    shares = dict(zip(UNION_MEMBERS, (50, 18, 50, 40), strict=True))
    for split in SPLITS:
        expected = Counter()
        for member, share in shares.items():
            part = load_builtin_domain(member, seed=2, num_samples=share)[split]
            member_names = part.features["label"].names
            for row, label in zip(part.data.table.column("image").to_pylist(), part["label"], strict=True):
                union_label = UNION_LABEL_OFFSETS[member] + label
                assert names[union_label] == member_names[label]
                expected[(row["bytes"], union_label)] += 1
        got = Counter(
            (row["bytes"], label)
            for row, label in zip(
                union[split].data.table.column("image").to_pylist(), union[split]["label"], strict=True
            )
        )
        assert got == expected
    assert names[10:] == ["circle", "square", "triangle", "cross"]


def test_builtin_domain_rejects_bad_arguments():
    with pytest.raises(ValueError, match="available"):
        load_builtin_domain("cifar")
    with pytest.raises(ValueError, match="between 10 and 200"):
        load_builtin_domain("faces", num_samples=500)
    with pytest.raises(ValueError, match="seed"):
        load_builtin_domain("faces", seed=-1)


def test_digits_on_clutter_can_exceed_the_mnist_pool_without_crossing_splits():
    mnist = load_builtin_domain("mnist", seed=5)
    clutter = load_builtin_domain("digits-on-clutter", seed=5, num_samples=5040)
    assert sum(len(clutter[s]) for s in SPLITS) == 5040
    for split in SPLITS:
        # Digits are reused beyond 5,000 images, but only within their own split.
        assert len(clutter[split]) >= len(mnist[split])
        assert list(clutter[split]["label"])[: len(mnist[split])] == list(mnist[split]["label"])


# --------------------------------------------------------------------------------------------------------
# Columns and loading
# --------------------------------------------------------------------------------------------------------


def test_detect_columns_finds_renamed_typed_columns():
    ds = small("faces")["train"].rename_columns({"image": "img", "label": "fine_label"})
    assert detect_columns(ds) == ("img", "fine_label")
    assert detect_columns(ds, image_column="img", label_column="fine_label") == ("img", "fine_label")


def test_detect_columns_falls_back_to_names():
    ds = Dataset.from_dict(
        {"id": [0, 1], "pixel_values": [np.zeros((4, 4)), np.ones((4, 4))], "labels": [0, 1]}
    )
    assert detect_columns(ds) == ("pixel_values", "labels")


def test_detect_image_column_works_without_labels():
    ds = small("faces")["test"].remove_columns("label").rename_column("image", "photo")
    assert detect_image_column(ds) == "photo"
    with pytest.raises(ValueError, match="label column"):
        detect_columns(ds)


def test_detect_columns_error_names_the_columns():
    ds = Dataset.from_dict({"picture_path": ["a.png"], "y": [1]})
    with pytest.raises(ValueError, match=r"image column.*\['picture_path', 'y'\].*image_column="):
        detect_columns(ds)
    with pytest.raises(ValueError, match=r"label_column='nope' is not a column.*\['picture_path', 'y'\]"):
        detect_columns(ds, image_column="picture_path", label_column="nope")


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, mode in (("cat", "L"), ("dog", "RGBA")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            channels = {"L": (), "RGBA": (4,)}[mode]
            pixels = rng.integers(0, 256, size=(20, 24, *channels), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(tmp_path / "images" / name / f"{i}.png")
    return tmp_path / "images"


def test_load_image_dataset_from_an_image_folder(image_folder, tmp_path):
    ds = load_image_dataset(str(image_folder), cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds, DatasetDict) and list(ds) == ["train"]
    assert label_names(ds) == ["cat", "dog"]
    train = load_image_dataset(image_folder, split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(train, Dataset) and len(train) == 6
    batch = collate_fn(list(train.with_transform(build_transform(default_image_processor()))))
    assert batch["pixel_values"].shape == (6, 3, 32, 32)  # grey and RGBA images become RGB
    assert sorted(batch["labels"].tolist()) == [0, 0, 0, 1, 1, 1]


def test_load_image_dataset_from_memory_renames_and_encodes_labels():
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    ds = Dataset.from_dict({"photo": images, "y": [2, 0, 2, 1]}).cast_column("photo", ImageFeature())
    out = load_image_dataset(ds, label_column="y")
    assert out.column_names == ["image", "label"]
    assert label_names(out) == ["0", "1", "2"]
    assert list(out["label"]) == [2, 0, 2, 1]  # integer labels keep their ids


def test_load_image_dataset_encodes_string_labels_consistently_across_splits():
    image = Image.new("RGB", (8, 8))
    dd = DatasetDict(
        {
            "train": Dataset.from_dict({"image": [image, image], "label": ["zebra", "ant"]}),
            "test": Dataset.from_dict({"image": [image], "label": ["bee"]}),
        }
    ).cast_column("image", ImageFeature())
    out = load_image_dataset(dd)
    assert label_names(out["train"]) == label_names(out["test"]) == ["ant", "bee", "zebra"]
    assert list(out["test"]["label"]) == [1]


def test_load_image_dataset_from_builtin_and_from_disk(tmp_path):
    ds = load_image_dataset("builtin:digits", split="validation", num_samples=50, seed=4)
    assert len(ds) == 5 and ds.column_names == ["image", "label", "object_mask"]
    saved = load_builtin_domain("faces", num_samples=20)
    saved.save_to_disk(str(tmp_path / "faces"))
    reloaded = load_image_dataset(str(tmp_path / "faces"), split="test")
    assert reloaded.data.table.equals(saved["test"].data.table)
    with pytest.raises(ValueError, match="Unknown built-in domain"):
        load_image_dataset("builtin:cifar")
    with pytest.raises(KeyError, match="available splits"):
        load_image_dataset(saved, split="dev")


def test_label_helpers_for_model_configs():
    names = label_names(small("shapes-on-clutter"), "label")
    assert id2label(names) == {0: "circle", 1: "square", 2: "triangle", 3: "cross"}
    assert label2id(names) == {"circle": 0, "square": 1, "triangle": 2, "cross": 3}
    with pytest.raises(ValueError, match="unique"):
        label2id(["a", "a"])
    with pytest.raises(TypeError, match="not a ClassLabel"):
        label_names(Dataset.from_dict({"label": [0, 1]}), "label")


# --------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------


def reference_processor(image_size: int = 32):
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def test_default_image_processor_settings():
    processor = default_image_processor()
    assert processor.size == {"height": 32, "width": 32}
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    assert processor.do_resize and processor.do_rescale and processor.do_normalize


def test_transform_matches_the_vit_image_processor():
    split = small("digits-on-clutter")["test"]
    processed = split.with_transform(build_transform(default_image_processor()))
    images = [split[i]["image"] for i in range(4)]
    expected = reference_processor()(images=images, return_tensors="pt")["pixel_values"]
    batch = collate_fn([processed[i] for i in range(4)])
    assert batch["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(batch["pixel_values"], expected, rtol=0, atol=0)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["labels"].tolist() == list(split["label"][:4])
    np.testing.assert_array_equal(batch["object_mask"].numpy(), as_arrays(split)[2][:4])


def test_transform_resizes_the_mask_with_the_image():
    split = small("shapes-on-clutter")["test"]
    example = split.with_transform(build_transform(reference_processor(64)))[0]
    assert example["pixel_values"].shape == (3, 64, 64)
    mask = np.asarray(split[0]["object_mask"])
    np.testing.assert_array_equal(example["object_mask"].numpy(), mask.repeat(2, axis=0).repeat(2, axis=1))


def test_transform_handles_unlabelled_data_and_passes_explanation_targets():
    split = small("digits")["test"].select(range(4)).remove_columns("label")
    targets = np.arange(4 * 16, dtype=np.float32).reshape(4, 4, 4)
    split = split.add_column("explanation_targets", targets.tolist())
    loader = DataLoader(
        split.with_transform(build_transform(default_image_processor())), batch_size=4, collate_fn=collate_fn
    )
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values", "object_mask", "explanation_targets"}
    torch.testing.assert_close(batch["explanation_targets"], torch.from_numpy(targets))


@pytest.fixture()
def indexed_split():
    split = small("digits-on-clutter")["train"].select(range(8))
    return split.add_column("example_index", list(range(8)))


def augmented(split: Dataset, seed: int, epoch: int, rows: list[int]) -> list[torch.Tensor]:
    transform = build_transform(default_image_processor(), train=True, augment_seed=seed)
    transform.set_epoch(epoch)
    batch = transform(split.select(rows)[:])
    return batch["pixel_values"]


def test_augmentation_depends_only_on_seed_epoch_and_index(indexed_split):
    together = augmented(indexed_split, seed=7, epoch=1, rows=list(range(8)))
    reversed_alone = [augmented(indexed_split, seed=7, epoch=1, rows=[i])[0] for i in reversed(range(8))]
    for a, b in zip(together, reversed(reversed_alone), strict=True):
        assert torch.equal(a, b)
    next_epoch = augmented(indexed_split, seed=7, epoch=2, rows=list(range(8)))
    other_seed = augmented(indexed_split, seed=8, epoch=1, rows=list(range(8)))
    assert any(not torch.equal(a, b) for a, b in zip(together, next_epoch, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(together, other_seed, strict=True))


def test_augmentation_is_a_small_translation_that_moves_the_mask(indexed_split):
    transform = build_transform(default_image_processor(), train=True, augment_seed=0)
    plain = build_transform(default_image_processor())(indexed_split[:])
    shifted = transform(indexed_split[:])
    for i, key in enumerate(indexed_split["example_index"]):
        dy, dx = transform.shift_for(key)
        assert max(abs(dy), abs(dx)) <= 2
        moved = torch.roll(plain["pixel_values"][i], shifts=(dy, dx), dims=(1, 2))
        inner = (slice(None), slice(2, 30), slice(2, 30))  # away from the padded border
        assert torch.equal(shifted["pixel_values"][i][inner], moved[inner])
        moved_mask = torch.roll(plain["object_mask"][i], shifts=(dy, dx), dims=(0, 1))
        assert torch.equal(shifted["object_mask"][i][2:30, 2:30], moved_mask[2:30, 2:30])


def test_augmentation_without_index_column_uses_the_pixels(indexed_split):
    split = indexed_split.remove_columns("example_index")
    first = augmented(split, seed=1, epoch=0, rows=[0, 1, 2])
    alone = augmented(split, seed=1, epoch=0, rows=[2])
    assert torch.equal(first[2], alone[0])


def test_set_epoch_rejects_negative_epochs():
    with pytest.raises(ValueError, match="epoch"):
        build_transform(default_image_processor(), train=True).set_epoch(-1)


def test_collate_fn_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="no examples"):
        collate_fn([])
