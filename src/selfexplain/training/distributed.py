"""Processes and devices: the `accelerate` objects of a run, and how work is sliced across processes."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState

from .config import TrainingConfig


def _make_accelerator(config: TrainingConfig) -> Accelerator:
    state = AcceleratorState._shared_state
    if (
        state
        and state.get("_mixed_precision") != config.mixed_precision
        and PartialState().num_processes == 1
    ):
        # accelerate keeps one global state per process; a single process may run several trainings (e.g.
        # pre-training, then fine-tunes) with different precisions, so start afresh. (Several processes
        # share one launch configuration, and accelerate rightly refuses a change there.)
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=config.mixed_precision, cpu=cpu_only_launch())


def cpu_only_launch() -> bool:
    """True for a multi-process launch (``accelerate launch --multi_gpu`` / torchrun) on a machine without a
    GPU-like device. accelerate then needs ``cpu=True`` (``Accelerator(cpu=...)``/``PartialState(cpu=...)``)
    to join the processes as ``MULTI_CPU`` with gloo; without it each process would run alone.

    Example:
        >>> from accelerate import PartialState
        >>> state = PartialState(cpu=cpu_only_launch())
    """
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
    has_accelerator = (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    return launched and not has_accelerator


def _process_slice(num_examples: int, num_processes: int, process_index: int) -> tuple[int, int]:
    size, extra = divmod(num_examples, num_processes)
    start = process_index * size + min(process_index, extra)
    return start, start + size + (1 if process_index < extra else 0)
