"""Silence transformers' load report while weights are left out of a checkpoint on purpose."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from transformers.utils import logging as transformers_logging


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Drop transformers' load report (only it: a filter, not a log level, which would change what transformers
    checks and logs) while a model is loaded with weights that are new on purpose (a re-initialised classifier
    for a new label set, an explanation extension added to a plain classifier)."""
    loading_logger = transformers_logging.get_logger("transformers.modeling_utils")

    def not_the_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    loading_logger.addFilter(not_the_report)
    try:
        yield
    finally:
        loading_logger.removeFilter(not_the_report)
