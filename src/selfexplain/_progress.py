"""Progress bars that stay readable in logs: live on a terminal, a few lines when stderr is a file or pipe."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

#: Seconds between two progress lines when stderr is not a terminal (CI logs, `> log.txt`, notebooks' pipes).
NON_TTY_INTERVAL_S = 30.0


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, redrawn at most every :data:`NON_TTY_INTERVAL_S` s outside a terminal, where
    each redraw is a new line."""
    if not _is_terminal(kwargs.get("file", sys.stderr)):
        kwargs.setdefault("mininterval", NON_TTY_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(NON_TTY_INTERVAL_S, kwargs["mininterval"]))
    return tqdm(iterable, **kwargs)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False
