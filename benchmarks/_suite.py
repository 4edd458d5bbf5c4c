"""Helpers for benchmarks built on a finished `selfexplain experiment` suite: its `Experiment`, its files, and
per-seed records cached under the hashes of the weight files they read."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "selfexplain" / "experiments" / "configs"


def experiment(suite: str):
    """The packaged suite `suite` as an `Experiment` (silent: a benchmark prints its own progress)."""
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    return Experiment(ExperimentConfig.from_json_file(CONFIGS / f"{suite}.json"), log=lambda message: None)


def require(path: Path, suite: str) -> Path:
    """`path`, or a clear exit naming the command that makes it."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `selfexplain experiment --config {suite}` first.")
    return path


def read_record(record: Path, inputs: dict[str, str]) -> dict[str, Any] | None:
    """A cached per-seed record, if it was written from the same input files (a suite retrained under the same
    name must not be reported from the record of its former models); None otherwise."""
    if not record.exists():
        return None
    cached = json.loads(record.read_text())
    if cached.pop("inputs", None) == inputs:
        return cached
    print(f"{record}: its models changed since it was written; recomputing", file=sys.stderr)
    return None


def write_record(record: Path, result: dict[str, Any], inputs: dict[str, str]) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({**result, "inputs": inputs}, indent=1) + "\n")


def write_outputs(prefix: str, text: str, payload: dict[str, Any]) -> None:
    """`<prefix>.md` (the report) and `<prefix>.json` (`payload`), and the report on standard output."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(prefix + ".md").write_text(text)
    Path(prefix + ".json").write_text(json.dumps(payload, indent=2) + "\n")
    sys.stdout.write(text)
