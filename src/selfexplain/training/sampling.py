"""Deterministic data order and batches: the same permutation and augmentation for λ = 0 and λ > 0 runs.

The order of every epoch is a permutation drawn from ``(seed, epoch)`` alone with its own generator, so the
model's own randomness can never shift the data; every optimizer step consumes one *global* batch, sliced per
process, so one process with batch 2b and two with batch b make the same updates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from ..data import (
    collate_fn,
)
from ..data.columns import EXPLANATION_TARGETS_COLUMN

# Streams of `numpy.random.SeedSequence([seed, epoch, stream])`; distinct so data order and head init never
# share random numbers.
#: Key of the example index in each batch (its position in the training set).
INDEX_KEY = "example_index"
_ORDER_STREAM = 0
_HEAD_STREAM = 1


# ----------------------------------------------------------------------------------------------------------
# Data order and batches
# ----------------------------------------------------------------------------------------------------------


def epoch_order(seed: int, epoch: int, num_examples: int) -> torch.Tensor:
    """The order in which the examples are visited in ``epoch``: a permutation that depends on
    ``(seed, epoch)`` only (its own generator; the global RNGs are neither used nor advanced).

    Example:
        >>> epoch_order(0, 1, 5).tolist() == epoch_order(0, 1, 5).tolist()
        True
    """
    state = np.random.SeedSequence([seed, epoch, _ORDER_STREAM]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) & (2**63 - 1))
    return torch.randperm(num_examples, generator=generator)


@dataclass(frozen=True)
class _Schedule:
    """How many examples and steps an epoch and the run have, for a given process layout."""

    num_examples: int
    batch_size: int  # per device, per micro-batch
    num_processes: int
    accumulation: int
    num_epochs: int
    max_steps: int | None

    @property
    def global_micro_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def global_batch(self) -> int:
        return self.global_micro_batch * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    @property
    def total_steps(self) -> int:
        planned = self.num_epochs * self.steps_per_epoch
        return planned if self.max_steps is None else self.max_steps

    @property
    def epochs_needed(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


class _EpochBatches:
    """Batch sampler of one epoch for one process: keys ``(epoch, index)`` of slice ``process_index`` of every
    global micro-batch, starting after ``skip_micro_batches`` (to resume mid-epoch)."""

    def __init__(
        self, schedule: _Schedule, seed: int, epoch: int, process_index: int, skip_micro_batches: int = 0
    ) -> None:
        self.schedule = schedule
        self.seed = seed
        self.epoch = epoch
        self.process_index = process_index
        self.skip = skip_micro_batches

    def __len__(self) -> int:
        return self.schedule.steps_per_epoch * self.schedule.accumulation - self.skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.schedule
        order = epoch_order(self.seed, self.epoch, s.num_examples).tolist()
        for micro in range(self.skip, s.steps_per_epoch * s.accumulation):
            start = micro * s.global_micro_batch + self.process_index * s.batch_size
            yield [(self.epoch, index) for index in order[start : start + s.batch_size]]


class _Examples(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` keyed by ``(epoch, index)`` and passed through the data transform.

    The key carries the epoch so that augmentation is right in ``DataLoader`` workers too (they hold copies of
    the transform, whose ``set_epoch`` would not reach them).
    """

    def __init__(self, dataset: Dataset, transform: Any, columns: dict[str, str]) -> None:
        # `columns`: dataset column -> name the transform expects.
        # Raw rows: a format or transform the caller set on the dataset would be applied twice otherwise.
        self.dataset = dataset.with_format(None).select_columns(list(columns))
        if EXPLANATION_TARGETS_COLUMN in columns.values():
            source = next(k for k, v in columns.items() if v == EXPLANATION_TARGETS_COLUMN)
            self.dataset = self.dataset.with_format("numpy", columns=[source], output_all_columns=True)
        self.transform = transform
        self.columns = columns

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        epochs = {epoch for epoch, _ in keys}
        if len(epochs) != 1:
            raise ValueError(f"A batch must come from one epoch, got keys of epochs {sorted(epochs)}.")
        indices = [index for _, index in keys]
        rows = self.dataset[indices]
        batch = {self.columns[name]: values for name, values in rows.items()}
        batch[INDEX_KEY] = indices
        self.transform.set_epoch(epochs.pop())
        output = self.transform(batch)
        examples = [dict(zip(output, values, strict=True)) for values in zip(*output.values(), strict=True)]
        for example, index in zip(examples, indices, strict=True):
            example[INDEX_KEY] = index
        return examples


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = collate_fn(examples)
    batch[INDEX_KEY] = torch.tensor([example[INDEX_KEY] for example in examples], dtype=torch.long)
    return batch


def _loader(examples: _Examples, batch_sampler: Any, num_workers: int) -> DataLoader:
    # A private generator: creating the iterator draws a worker base seed, which must not advance the
    # global RNG (it drives dropout, and it is saved in checkpoints).
    return DataLoader(
        examples,
        batch_sampler=batch_sampler,
        collate_fn=_collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
