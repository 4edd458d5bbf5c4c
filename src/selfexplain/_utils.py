"""Small helpers shared by the modules that evaluate models (Shapley values, explainers, metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module | Callable) -> Iterator[None]:
    """Run in eval mode (no dropout), then restore every submodule's own training flag.

    `model.train(was_training)` would not do: it sets every submodule alike, and a user may have frozen some
    in eval mode on purpose. Plain callables (no modules) pass through.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
