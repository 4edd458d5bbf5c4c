"""Load any image-classification dataset (Hub id, local folder, built-in domain, in-memory) and detect
its image and label columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    load_dataset,
    load_from_disk,
)
from datasets import Image as ImageFeature

from .builtin_domains import BUILTIN_DOMAINS, load_builtin_domain
from .columns import BUILTIN_PREFIX

# ----------------------------------------------------------------------------------------------------------
# Any image-classification dataset
# ----------------------------------------------------------------------------------------------------------

_IMAGE_NAMES: tuple[str, ...] = ("image", "img", "images", "pixel_values", "picture", "photo")
_LABEL_NAMES: tuple[str, ...] = ("label", "labels", "fine_label", "class", "target", "coarse_label")
_TABLE_EXTENSIONS: tuple[str, ...] = (".parquet", ".arrow", ".csv", ".json", ".jsonl")

DatasetLike = Dataset | DatasetDict


def load_image_dataset(
    name_or_path_or_dataset: str | os.PathLike | Dataset | DatasetDict,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    *,
    rename_columns: bool = True,
    **kwargs: Any,
) -> Dataset | DatasetDict:
    """Load an image-classification dataset and give it a known shape.

    Args:
        name_or_path_or_dataset: one of
            - ``"builtin:<name>"``: a built-in offline domain (``kwargs`` may hold ``seed`` and
              ``num_samples``, see :func:`load_builtin_domain`);
            - a local folder: one saved with ``save_to_disk``, a folder of class subfolders of images
              (loaded with the ``"imagefolder"`` builder), or any other folder ``datasets.load_dataset``
              reads;
            - a Hub dataset id (``datasets.load_dataset(name, split=split, **kwargs)``);
            - a ``Dataset`` or ``DatasetDict`` already in memory.
        split: a split to return (a ``Dataset``); ``None`` returns every split (a ``DatasetDict``, or the
            ``Dataset`` itself when one was given).
        image_column, label_column: override :func:`detect_columns`.
        rename_columns: rename the columns to ``image`` and ``label`` so that downstream code can rely on
            those names.
        **kwargs: passed to ``datasets.load_dataset`` (e.g. ``revision``, ``cache_dir``) or to
            :func:`load_builtin_domain`.

    The label column becomes a ``ClassLabel`` when it is not one: integer labels keep their ids (names
    ``"0"``, ``"1"``, ...), string labels are numbered in sorted order, consistently across splits.

    Example:
        >>> ds = load_image_dataset("builtin:digits", split="test", seed=0)
        >>> ds.column_names
        ['image', 'label', 'object_mask']
    """
    dataset = _load_any(name_or_path_or_dataset, split, **kwargs)
    image_column, label_column = detect_columns(dataset, image_column, label_column)
    dataset = _as_class_label(dataset, label_column)
    if rename_columns:
        dataset = _rename(dataset, {image_column: "image", label_column: "label"})
    return dataset


def _load_any(
    source: str | os.PathLike | Dataset | DatasetDict, split: str | None, **kwargs: Any
) -> DatasetLike:
    if isinstance(source, Dataset):
        if split is not None and source.split is not None and str(source.split) != split:
            raise ValueError(
                f"split={split!r} was requested but the given Dataset is split {str(source.split)!r}."
            )
        return source
    if isinstance(source, DatasetDict):
        return _select_split(source, split)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Expected a dataset name, a path, a Dataset or a DatasetDict, got {type(source).__name__}."
        )
    source = os.fspath(source)
    if source.startswith(BUILTIN_PREFIX):
        return _select_split(load_builtin_domain(source[len(BUILTIN_PREFIX) :], **kwargs), split)
    if os.path.isdir(source):
        return _load_local_folder(source, split, **kwargs)
    try:
        return load_dataset(source, split=split, **kwargs)
    except Exception as error:
        if source in BUILTIN_DOMAINS and hasattr(error, "add_note"):
            error.add_note(f"For the offline built-in domain, use {BUILTIN_PREFIX + source!r}.")
        raise


def _load_local_folder(path: str, split: str | None, **kwargs: Any) -> DatasetLike:
    if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
        os.path.join(path, "state.json")
    ):
        return _select_split(load_from_disk(path), split)
    if _contains_table_files(path):
        return load_dataset(path, split=split, **kwargs)
    return load_dataset("imagefolder", data_dir=path, split=split, **kwargs)


def _contains_table_files(path: str) -> bool:
    for _, _, files in os.walk(path):
        if any(name.lower().endswith(_TABLE_EXTENSIONS) for name in files):
            return True
    return False


def _select_split(dataset: DatasetDict, split: str | None) -> DatasetLike:
    if split is None:
        return dataset
    if split not in dataset:
        raise KeyError(f"Split {split!r} not found; available splits: {list(dataset)}.")
    return dataset[split]


def _features_of(dataset: DatasetLike) -> Features:
    if isinstance(dataset, DatasetDict):
        if not dataset:
            raise ValueError("The DatasetDict has no splits.")
        dataset = next(iter(dataset.values()))
    features = getattr(dataset, "features", None)
    if features is None:
        raise ValueError(
            f"{type(dataset).__name__} has no known features; call `.cast(...)` or resolve them first."
        )
    return features


def detect_columns(
    dataset: DatasetLike, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """Find the image and label columns of an image-classification dataset.

    The image column is the ``datasets.Image()`` feature (else a column named ``image``, ``img``,
    ``pixel_values``, ...); the label column is the ``ClassLabel`` feature (else ``label``, ``labels``,
    ``fine_label``, ...). When several columns qualify, the one with the earliest preferred name wins (e.g.
    ``fine_label`` over ``coarse_label`` in CIFAR-100). Either can be given explicitly.

    Raises:
        ValueError: a column cannot be found or a given one does not exist; the message lists the columns.

    Example:
        >>> ds = load_builtin_domain("faces", num_samples=20)["train"].rename_column("image", "img")
        >>> detect_columns(ds)
        ('img', 'label')
    """
    image = detect_image_column(dataset, image_column)
    label = _find_column(
        _features_of(dataset), label_column, ClassLabel, _LABEL_NAMES, "label", "label_column"
    )
    if image == label:
        raise ValueError(f"The image and label columns must differ, both are {image!r}.")
    return image, label


def detect_image_column(dataset: DatasetLike, image_column: str | None = None) -> str:
    """The image column alone, as :func:`detect_columns` finds it; for unlabelled data.

    Example:
        >>> detect_image_column(load_builtin_domain("faces", num_samples=20)["test"].remove_columns("label"))
        'image'
    """
    return _find_column(
        _features_of(dataset), image_column, ImageFeature, _IMAGE_NAMES, "image", "image_column"
    )


def _find_column(
    features: Features,
    requested: str | None,
    feature_type: type,
    preferred: Sequence[str],
    kind: str,
    argument: str,
) -> str:
    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise ValueError(f"{argument}={requested!r} is not a column; available columns: {columns}.")
        return requested
    typed = [name for name in columns if isinstance(features[name], feature_type)]
    if len(typed) == 1:
        return typed[0]
    candidates = typed or columns
    for name in preferred:
        if name in candidates:
            return name
    if typed:
        return typed[0]
    raise ValueError(
        f"Could not find the {kind} column: no {feature_type.__name__} feature and none of {list(preferred)} "
        f"among the columns {columns}. Pass {argument}=... to name it."
    )


def _as_class_label(dataset: DatasetLike, column: str) -> DatasetLike:
    feature = _features_of(dataset)[column]
    if isinstance(feature, ClassLabel):
        return dataset
    # Names are computed over every split so that ids agree between splits.
    parts = dataset.values() if isinstance(dataset, DatasetDict) else [dataset]
    values = sorted({value for part in parts for value in part.unique(column)})
    if values and all(
        isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in values
    ):
        if values[0] < 0:
            raise ValueError(f"Integer labels in column {column!r} must be >= 0, found {values[0]}.")
        names = [str(i) for i in range(int(values[-1]) + 1)]
    elif values and all(isinstance(value, str) for value in values):
        names = values
    else:
        raise TypeError(
            f"Column {column!r} ({feature}) holds neither integer nor string labels: {values[:5]}..."
        )
    return dataset.cast_column(column, ClassLabel(names=names))


def _rename(dataset: DatasetLike, mapping: dict[str, str]) -> DatasetLike:
    mapping = {old: new for old, new in mapping.items() if old != new}
    clashes = [new for new in mapping.values() if new in _features_of(dataset) and new not in mapping]
    if clashes:
        raise ValueError(
            f"Cannot rename {mapping} because {clashes} already exist(s); pass rename_columns=False or drop them first."
        )
    return dataset.rename_columns(mapping) if mapping else dataset


def label_names(dataset: DatasetLike, label_column: str = "label") -> list[str]:
    """Class names of ``label_column`` (a ``ClassLabel``), index = label id.

    Example:
        >>> label_names(load_builtin_domain("faces"), "label")
        ['non-face', 'face']
    """
    features = _features_of(dataset)
    if label_column not in features:
        raise ValueError(
            f"label_column={label_column!r} is not a column; available columns: {list(features)}."
        )
    feature = features[label_column]
    if not isinstance(feature, ClassLabel):
        raise TypeError(
            f"Column {label_column!r} is {feature}, not a ClassLabel; load it with load_image_dataset() to convert it."
        )
    return list(feature.names)


def id2label(names: Sequence[str]) -> dict[int, str]:
    """``{id: name}`` for ``PretrainedConfig.id2label``.

    Example:
        >>> id2label(["cat", "dog"])
        {0: 'cat', 1: 'dog'}
    """
    return dict(enumerate(names))


def label2id(names: Sequence[str]) -> dict[str, int]:
    """``{name: id}`` for ``PretrainedConfig.label2id``; names must be unique.

    Example:
        >>> label2id(["cat", "dog"])
        {'cat': 0, 'dog': 1}
    """
    mapping = {name: index for index, name in enumerate(names)}
    if len(mapping) != len(names):
        raise ValueError(f"Label names must be unique, got {list(names)}.")
    return mapping
