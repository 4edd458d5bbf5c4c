"""CLI commands that train or run experiments (registered into `selfexplain.cli`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the training and experiment sub-commands."""
