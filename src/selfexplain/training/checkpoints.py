"""Files of a run: checkpoint folders (written to a temporary folder, renamed when complete), the JSON
logs, and pruning.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..hub import publish_folder
from .config import TrainingConfig

CHECKPOINTS_DIR = "checkpoints"
LOG_NAME = "log.jsonl"
BATCHES_LOG_NAME = "batches.jsonl"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_CONFIG_NAME = "training_config.json"
METRICS_NAME = "metrics.json"


_CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (``None`` when there is none).

    Only renamed folders count: a run killed while writing leaves a ``.tmp-`` folder, which is ignored.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    complete = [p for p in root.glob(f"{_CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE_NAME).is_file()]
    return max(complete, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :]), default=None)


def _prune_checkpoints(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    complete = sorted(
        root.glob(f"{_CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :])
    )
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_jsonl(path: Path, max_step: int, eval_history: list[dict[str, Any]] | None = None) -> None:
    """Keep the records up to ``max_step``; evaluation records only when the checkpoint knew them (an
    evaluation right after a checkpoint at the same step is run again on resume)."""
    if not path.is_file():
        return

    def keep(record: dict[str, Any]) -> bool:
        if record.get("type") == "eval" and eval_history is not None:
            return record in eval_history
        return record["step"] <= max_step

    kept = [line for line in path.read_text().splitlines() if line and keep(json.loads(line))]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _push_folder(config: TrainingConfig, folder: Path) -> str:
    kind = "self-explaining" if config.explanation_loss_weight > 0 else "prediction-only"
    commit = publish_folder(
        folder,
        config.hub_model_id or folder.resolve().name,
        token=config.hub_token,
        private=config.hub_private,
        # Checkpoints and the per-batch audit trail can be large; the model, its config and logs are pushed.
        ignore_patterns=[f"{CHECKPOINTS_DIR}/**", BATCHES_LOG_NAME, ".*", "**/.*"],
        commit_message=f"Upload {kind} ViT (λ = {config.explanation_loss_weight}) trained with selfexplain",
    )
    return commit.oid
