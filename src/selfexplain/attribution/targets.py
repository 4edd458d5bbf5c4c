"""Explanation targets as a `datasets` column: Kernel SHAP values of a prediction-only model, cached by shard.

A self-explaining model is trained against the patch attributions of the source *prediction-only* model
(docs/design.md §3). :func:`add_explanation_targets` computes them for every example of a dataset with
:func:`selfexplain.shapley.kernel_shap_values` and returns the dataset with one more column, a float32
``Array3D((num_labels, grid_h, grid_w))`` holding the attributions of every class.

Computing targets is the most expensive step of the pipeline (``budget`` forward passes per image), so it is
split into shards that are cached on disk:

- each finished shard is an Arrow file written by ``Dataset.map`` (to a temporary file that is renamed when
  the shard is complete), under a folder named by a fingerprint of everything the values depend on: the
  model's class and weights, the dataset's fingerprint, the image processor, the grid, budget, baseline and
  seed. Killing the process and calling the function again recomputes only the shards that have no file;
  calling it again with nothing missing runs no forward pass at all;
- every example draws its coalitions from its own seed, :func:`example_seed` ``(seed, index)``, so the values
  do not depend on the number of shards, the batch size or the number of processes (up to float rounding: on
  some CPUs a forward pass rounds differently at another batch size);
- under ``accelerate launch`` with ``N`` processes, process ``i`` computes the missing shards ``i, i + N, ...``
  and every process returns the assembled dataset once all shards exist.

Example:
    >>> from selfexplain.data import default_image_processor, load_builtin_domain
    >>> from selfexplain.attribution.targets import add_explanation_targets
    >>> train = load_builtin_domain("mnist")["train"]
    >>> model = ViTForImageClassification.from_pretrained("runs/mnist-prediction-only")
    >>> train = add_explanation_targets(train, model, image_processor=default_image_processor(),
    ...                                 grid=(4, 4), budget=150, cache_dir="cache/targets")
    >>> train.features["explanation_targets"].shape
    (10, 4, 4)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import PartialState
from datasets import Array3D, Dataset, Features, concatenate_datasets
from torch import nn
from tqdm.auto import tqdm

from .._progress import progress_bar
from ..data import build_transform, detect_columns
from ..training.distributed import cpu_only_launch
from .masking import BASELINE_KINDS
from .shapley import kernel_shap_values

__all__ = [
    "DEFAULT_EXAMPLES_PER_SHARD",
    "EXPLANATION_TARGETS_COLUMN",
    "add_explanation_targets",
    "example_seed",
    "explanation_targets_fingerprint",
]

logger = logging.getLogger(__name__)

EXPLANATION_TARGETS_COLUMN = "explanation_targets"
#: Default shard size: small enough that an interruption loses little work, large enough to keep the
#: number of cache files modest.
DEFAULT_EXAMPLES_PER_SHARD = 1000
# Images explained per `kernel_shap_values` call: each call evaluates `images * budget` masked images in
# batches of `batch_size`, so a few dozen images keep the batches full without holding much in memory.
_IMAGES_PER_CALL = 32
# Bumped whenever the stored values would change for the same inputs, so stale caches are never reused.
_CACHE_FORMAT_VERSION = 1


def example_seed(seed: int, index: int) -> int:
    """The Kernel SHAP seed of the example at row ``index`` for the run seed ``seed``.

    Mixing both with ``numpy.random.SeedSequence`` gives every (seed, index) pair an independent stream, so an
    example's targets depend on its row and the run seed only, not on the shard or batch it is computed in.

    Example:
        >>> example_seed(0, 3) == example_seed(0, 3) != example_seed(1, 3)
        True
    """
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & (2**63 - 1)


def add_explanation_targets(
    dataset: Dataset,
    model: nn.Module,
    *,
    image_processor: Any,
    grid: tuple[int, int],
    budget: int = 150,
    baseline: str | torch.Tensor = "mean",
    seed: int = 0,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    num_shards: int | None = None,
    column: str = EXPLANATION_TARGETS_COLUMN,
    image_column: str | None = None,
    progress: bool = True,
) -> Dataset:
    """Add a column of Kernel SHAP targets (all classes, on the player grid) computed with ``model``.

    Args:
        dataset: an image-classification ``Dataset`` (its image column is found with
            :func:`selfexplain.data.detect_columns` unless ``image_column`` is given).
        model: the source prediction-only classifier (e.g. a ``ViTForImageClassification``), on the device it
            should compute on. It is evaluated in eval mode; its training flags are restored afterwards.
        image_processor: the preprocessing the model is trained with (e.g.
            :func:`selfexplain.data.default_image_processor`); images are preprocessed exactly as the
            evaluation transform of :func:`selfexplain.data.build_transform` does, without augmentation.
        grid: ``(grid_h, grid_w)`` players: the model's patch grid or a coarser grid dividing it.
        budget: model evaluations per image (see :func:`selfexplain.shapley.kernel_shap_values`).
        baseline: what removed patches show: ``"mean"``, ``"zero"``, ``"blur"`` or a tensor.
        seed: run seed; example ``i`` uses :func:`example_seed` ``(seed, i)``.
        batch_size: masked images per forward pass (memory knob; results do not depend on it).
        cache_dir: folder of the shard cache. ``None`` uses a folder next to the dataset's own cache files
            when it has some (as ``Dataset.map`` does) and otherwise computes in memory, without resuming.
        num_shards: number of shards; default: one per :data:`DEFAULT_EXAMPLES_PER_SHARD` examples and at
            least one per process. Shard files are only reused with the same number of shards.
        column: name of the new column.
        image_column: the image column, when it cannot be detected.
        progress: show a progress bar over examples (on each node's main process).

    Returns:
        ``dataset`` with ``column`` added: float32 ``Array3D((num_classes, grid_h, grid_w))``.

    Raises:
        ValueError: a bad argument, ``column`` already exists, or several processes without a ``cache_dir``.

    Example:
        >>> train = add_explanation_targets(train, model, image_processor=processor, grid=(8, 8),
        ...                                 cache_dir="cache/targets")  # kill it, run it again: it resumes
        >>> train.with_format("torch")[0]["explanation_targets"].shape
        torch.Size([10, 8, 8])
    """
    _check_arguments(dataset, model, grid, budget, baseline, seed, batch_size, num_shards, column)
    grid = (int(grid[0]), int(grid[1]))
    image_column = (
        detect_columns(dataset, image_column=image_column)[0] if image_column is None else image_column
    )
    if image_column not in dataset.column_names:
        raise ValueError(f"image_column={image_column!r} is not a column; columns: {dataset.column_names}.")
    state = PartialState(cpu=cpu_only_launch())
    num_shards = num_shards or max(state.num_processes, math.ceil(len(dataset) / DEFAULT_EXAMPLES_PER_SHARD))
    num_shards = min(num_shards, len(dataset))
    bounds = _shard_bounds(len(dataset), num_shards)
    fingerprint = explanation_targets_fingerprint(
        model,
        dataset,
        image_processor=image_processor,
        grid=grid,
        budget=budget,
        baseline=baseline,
        seed=seed,
    )
    computer = _ShardComputer(
        model, image_processor, image_column, column, grid, budget, baseline, seed, batch_size, fingerprint
    )

    root = _resolve_cache_root(dataset, cache_dir, fingerprint)
    if root is None:
        if state.num_processes > 1:
            raise ValueError(
                f"add_explanation_targets runs on {state.num_processes} processes: pass a `cache_dir` on a "
                "file system they share, so that their shards can be assembled."
            )
        with _progress(len(dataset), progress and state.is_local_main_process) as bar:
            parts = [computer(dataset, start, stop, None, bar) for start, stop in bounds]
    else:
        parts = _compute_cached(computer, dataset, bounds, root, state, progress)
    targets = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return concatenate_datasets([dataset, targets], axis=1)


def explanation_targets_fingerprint(
    model: nn.Module,
    dataset: Dataset,
    *,
    image_processor: Any,
    grid: tuple[int, int],
    budget: int,
    baseline: str | torch.Tensor,
    seed: int,
) -> str:
    """A hex digest of everything the targets of ``dataset`` depend on; it names their cache folder.

    Covers the model's class and every weight and buffer (by value), the dataset's ``_fingerprint`` (which
    ``datasets`` derives from its content or files and from every transform applied), the image processor's
    settings, and ``grid``, ``budget``, ``baseline`` and ``seed``. ``batch_size`` and the sharding are left out:
    the values do not depend on them.

    Example:
        >>> a = explanation_targets_fingerprint(model, ds, image_processor=p, grid=(4, 4), budget=150,
        ...                                     baseline="mean", seed=0)
        >>> a != explanation_targets_fingerprint(model, ds, image_processor=p, grid=(4, 4), budget=150,
        ...                                      baseline="mean", seed=1)
        True
    """
    hasher = hashlib.sha256()
    description = {
        "format": _CACHE_FORMAT_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "dataset": dataset._fingerprint,
        "num_examples": len(dataset),
        "image_processor": _image_processor_settings(image_processor),
        "grid": list(grid),
        "budget": budget,
        "baseline": baseline if isinstance(baseline, str) else _tensor_digest(baseline),
        "seed": seed,
        "value": "probs",
    }
    hasher.update(json.dumps(description, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(str(tensor.dtype).encode())
        hasher.update(str(tuple(tensor.shape)).encode())
        hasher.update(_tensor_bytes(tensor))
    return hasher.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Computing shards
# ----------------------------------------------------------------------------------------------------------


class _ShardComputer:
    """Computes the targets of the rows ``[start, stop)`` with ``Dataset.map`` (to a cache file or in memory)."""

    def __init__(
        self,
        model: nn.Module,
        image_processor: Any,
        image_column: str,
        column: str,
        grid: tuple[int, int],
        budget: int,
        baseline: str | torch.Tensor,
        seed: int,
        batch_size: int,
        fingerprint: str,
    ) -> None:
        self.model = model
        self.transform = build_transform(
            image_processor, image_column=image_column, label_column=None, train=False
        )
        self.image_column = image_column
        self.column = column
        self.grid = grid
        self.budget = budget
        self.baseline = baseline
        self.seed = seed
        self.batch_size = batch_size
        self.fingerprint = fingerprint
        self._features: Features | None = None

    def __call__(
        self, dataset: Dataset, start: int, stop: int, cache_file: Path | None, bar: tqdm
    ) -> Dataset:
        rows = dataset.select_columns([self.image_column]).select(range(start, stop))

        def explain(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, np.ndarray]:
            phi = self._explain(batch[self.image_column], [start + i for i in indices])
            bar.update(len(indices))
            return {self.column: phi}

        with _datasets_progress_bars_disabled():
            return rows.map(
                explain,
                batched=True,
                batch_size=_IMAGES_PER_CALL,
                with_indices=True,
                remove_columns=[self.image_column],
                features=self.features(dataset),
                cache_file_name=None if cache_file is None else str(cache_file),
                keep_in_memory=cache_file is None,
                load_from_cache_file=False,  # the caller decides what is cached; a file here is a finished shard
                new_fingerprint=f"{self.fingerprint[:40]}-{start}-{stop}",
            )

    def features(self, dataset: Dataset) -> Features:
        """The new column's feature; the number of classes comes from one forward pass when not in the config."""
        if self._features is None:
            num_classes = self._num_classes(dataset)
            shape = (num_classes, *self.grid)
            self._features = Features({self.column: Array3D(shape=shape, dtype="float32")})
        return self._features

    def _num_classes(self, dataset: Dataset) -> int:
        num_labels = getattr(getattr(self.model, "config", None), "num_labels", None)
        if isinstance(num_labels, int) and num_labels > 0:
            return num_labels
        phi = self._explain(dataset.select_columns([self.image_column])[:1][self.image_column], [0], budget=2)
        return int(phi.shape[1])

    def _explain(self, images: Sequence[Any], indices: list[int], budget: int | None = None) -> np.ndarray:
        pixel_values = torch.stack(self.transform({self.image_column: list(images)})["pixel_values"])
        phi = kernel_shap_values(
            self.model,
            pixel_values,
            grid=self.grid,
            budget=budget or self.budget,
            baseline=self.baseline,
            seed=[example_seed(self.seed, index) for index in indices],
            batch_size=self.batch_size,
        )
        return phi.to(device="cpu", dtype=torch.float32).numpy()


def _compute_cached(
    computer: _ShardComputer,
    dataset: Dataset,
    bounds: list[tuple[int, int]],
    root: Path,
    state: PartialState,
    progress: bool,
) -> list[Dataset]:
    """Compute this process's missing shards into ``root``, wait for the others, load every shard."""
    num_shards = len(bounds)
    paths = [root / f"shard-{i:05d}-of-{num_shards:05d}.arrow" for i in range(num_shards)]
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _write_description(root, computer, dataset)
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    # Every process must see the same `missing` list before any of them writes a shard.
    state.wait_for_everyone()
    mine = missing[state.process_index :: state.num_processes]
    if missing and state.is_main_process:
        logger.info(
            "Explanation targets: %d of %d shards to compute in %s (%d cached).",
            len(missing),
            num_shards,
            root,
            num_shards - len(missing),
        )
    total = sum(bounds[i][1] - bounds[i][0] for i in mine)
    with _progress(total, progress and state.is_local_main_process) as bar:
        for i in mine:
            computer(dataset, *bounds[i], paths[i], bar)
    state.wait_for_everyone()
    absent = [str(path) for path in paths if not path.exists()]
    if absent:
        raise RuntimeError(
            f"Shards {absent} are missing after every process finished; is {root} on a shared file system?"
        )
    return [Dataset.from_file(str(path)) for path in paths]


def _write_description(root: Path, computer: _ShardComputer, dataset: Dataset) -> None:
    """A human-readable note of what the cache folder holds (the folder name alone is a digest)."""
    description = {
        "column": computer.column,
        "model_class": type(computer.model).__qualname__,
        "model_name_or_path": getattr(getattr(computer.model, "config", None), "_name_or_path", None),
        "dataset_fingerprint": dataset._fingerprint,
        "num_examples": len(dataset),
        "grid": list(computer.grid),
        "budget": computer.budget,
        "baseline": computer.baseline if isinstance(computer.baseline, str) else "tensor",
        "seed": computer.seed,
        "value": "probs",
    }
    tmp = root / f".description.json.{os.getpid()}"
    tmp.write_text(json.dumps(description, indent=2) + "\n")
    os.replace(tmp, root / "description.json")


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _check_arguments(
    dataset: Dataset,
    model: nn.Module,
    grid: tuple[int, int],
    budget: int,
    baseline: str | torch.Tensor,
    seed: int,
    batch_size: int,
    num_shards: int | None,
    column: str,
) -> None:
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("dataset has no rows.")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (its weights name the cache), got {type(model).__name__}."
        )
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid must be a pair of positive ints (grid_h, grid_w), got {grid!r}.")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
        raise ValueError(f"budget must be an int >= 2, got {budget!r}.")
    if not isinstance(baseline, torch.Tensor) and baseline not in BASELINE_KINDS:
        raise ValueError(f"baseline must be one of {BASELINE_KINDS} or a tensor, got {baseline!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if num_shards is not None and (
        isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1
    ):
        raise ValueError(f"num_shards must be a positive int or None, got {num_shards!r}.")
    if column in dataset.column_names:
        raise ValueError(
            f"dataset already has a {column!r} column; drop it first (dataset.remove_columns({column!r})) "
            "or choose another `column`."
        )


def _shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges, sizes differing by at most one (as ``Dataset.shard``)."""
    size, extra = divmod(num_examples, num_shards)
    bounds, start = [], 0
    for i in range(num_shards):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _resolve_cache_root(
    dataset: Dataset, cache_dir: str | os.PathLike | None, fingerprint: str
) -> Path | None:
    if cache_dir is None:
        if not dataset.cache_files:
            return None
        cache_dir = Path(dataset.cache_files[0]["filename"]).parent / "selfexplain-explanation-targets"
    return Path(cache_dir) / f"explanation-targets-{fingerprint[:24]}"


def _image_processor_settings(image_processor: Any) -> Any:
    to_dict = getattr(image_processor, "to_dict", None)
    if callable(to_dict):
        settings = to_dict()
        settings.pop("_processor_class", None)
        return json.loads(json.dumps(settings, sort_keys=True, default=str))
    return f"{type(image_processor).__module__}.{type(image_processor).__qualname__}"


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    # Viewing as bytes works for every dtype (bfloat16 has no numpy equivalent).
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(tensor) + str(tuple(tensor.shape)).encode()).hexdigest()


@contextmanager
def _progress(total: int, enabled: bool):
    bar = progress_bar(total=total, desc="explanation targets", unit="image", disable=not enabled)
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def _datasets_progress_bars_disabled():
    """Our own bar counts examples across shards; the per-shard bars of ``Dataset.map`` would only add noise."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
