"""Import torchvision next to a CPU-only torch when its wheel is a CUDA build (benchmarks only, never ``src/``).

pytorch-grad-cam needs torchvision, and the torchvision 0.28 wheel on PyPI is a CUDA build. Next to torch
2.13.0+cpu its compiled operators (``torchvision::nms``, ...) are not registered, so ``import torchvision`` dies in
``torchvision/_meta_registrations.py`` while registering fake (meta) kernels for them (``RuntimeError: operator
torchvision::nms does not exist``). transformers imports torchvision whenever it is installed, so in such an
environment even ``from transformers import ViTForImageClassification`` fails. The fake kernels only serve
``torch.compile`` and meta tensors of torchvision's detection operators, which no benchmark uses: importing
torchvision once with ``torch.library.register_fake`` turned into a no-op makes everything else work.

``_common`` imports this module before transformers; importing it does that once, and only if torchvision is
installed. Environment: ``python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0
torchvision==0.28.0 grad-cam -e '.[bench]'`` (torch and torchvision pinned in one command, else pip replaces the
CPU torch by torch 2.14 with CUDA wheels).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator

import torch

__all__ = ["fake_kernel_registration_disabled", "import_torchvision"]


@contextlib.contextmanager
def fake_kernel_registration_disabled() -> Iterator[None]:
    """Make ``torch.library.register_fake`` a no-op (as a call and as a decorator) for the duration, then restore it.

    Example:
        >>> with fake_kernel_registration_disabled():
        ...     import torchvision
    """
    original = torch.library.register_fake

    def register_nothing(op: object, func: Callable | None = None, /, *args: object, **kwargs: object):
        if func is not None:  # register_fake(op, func)
            return func
        return lambda fn: fn  # @register_fake(op)

    torch.library.register_fake = register_nothing
    try:
        yield
    finally:
        torch.library.register_fake = original


def import_torchvision() -> str | None:
    """Import torchvision (when installed) with the workaround; ``None`` on success or absence, else the error."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    with fake_kernel_registration_disabled():
        try:
            importlib.import_module("torchvision")
        except Exception as err:  # reported by the peers that need it; the benchmarks without it still run
            return f"{type(err).__name__}: {err}"
    return None


#: Why torchvision could not be imported even with the workaround (``None``: imported, or not installed).
TORCHVISION_IMPORT_ERROR = import_torchvision()
