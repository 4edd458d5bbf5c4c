"""Fault tolerance with real process kills: training resumed after SIGKILLs ends with the weights, logs and
metrics of an uninterrupted run, and Shapley targets killed mid-way keep every finished shard.

The jobs run as child processes (``python -m selfexplain.training``, ``add_explanation_targets``) that are
sent ``SIGKILL``: no ``finally``, no ``atexit``, no flush, exactly what the OOM killer or a pre-empted node does.
A kill from outside lands wherever the child happens to be, so it is placed at a seeded random *step*: the
test watches the per-step ``batches.jsonl`` and kills when the chosen step starts. Writing a checkpoint of a
tiny model takes milliseconds, too short to hit from outside reliably; for those points the child is
started through a small driver (:data:`DRIVER`) that sends ``SIGKILL`` to itself at an exact place: half-way
through one of the checkpoint's files, right before the temporary folder is renamed, or right before the
final model is saved. Everything else in the child is the unchanged command-line entry point.

Tolerance: on CPU with one thread the runs are bitwise reproducible, so weights and targets are compared
exactly (``max |Δ| == 0``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import DatasetDict, load_from_disk
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from selfexplain.attribution.targets import add_explanation_targets
from selfexplain.cli.train import add_train_arguments, train_from_args
from selfexplain.data import default_image_processor
from selfexplain.training import latest_checkpoint
from tests._squares import IMAGE_SIZE, coloured_squares
from tests._tiny import tiny_classifier

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # children use OMP_NUM_THREADS=1 too

PATCH_SIZE = 8  # a 2 × 2 patch grid
STEPS = 12  # 48 examples, batch 8, 2 epochs
CHECKPOINT_EVERY = 3
TIMEOUT_S = 120.0
POLL_S = 0.005

# Starts the training or targets entry point in a child that SIGKILLs itself at one exact place:
#   python -c DRIVER <mode> <n> <entry> [args...]
#   mode "save":     the n-th file accelerate's `save_state` writes (1 model, 2 optimizer, 3 scheduler) is
#                    written, cut to half its size (a torn write), then the process dies;
#   mode "rename":   dies right before the n-th `.tmp-checkpoint-*` folder is renamed to its final name;
#   mode "finish":   dies right before the final model is saved (after the last checkpoint and evaluation);
#   mode "none":     no kill.
#   entry "training" runs `selfexplain.cli.train.main`; entry "targets" runs `targets_job` (below).
DRIVER = r"""
import os, signal, sys

mode, n, entry, *args = sys.argv[1:]
n = int(n)
calls = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "save":
    import accelerate.checkpointing as checkpointing

    original_save = checkpointing.save

    def save(obj, f, *a, **k):
        original_save(obj, f, *a, **k)
        calls[0] += 1
        if calls[0] == n:
            size = os.path.getsize(f)
            os.truncate(f, size // 2)
            die()

    checkpointing.save = save
elif mode == "rename":
    original_replace = os.replace

    def replace(src, dst, *a, **k):
        if os.path.basename(str(src)).startswith(".tmp-checkpoint-"):
            calls[0] += 1
            if calls[0] == n:
                die()
        return original_replace(src, dst, *a, **k)

    os.replace = replace
elif mode == "finish":
    from transformers import PreTrainedModel

    def save_pretrained(self, *a, **k):
        die()

    PreTrainedModel.save_pretrained = save_pretrained
elif mode != "none":
    raise SystemExit(f"unknown mode {mode!r}")

if entry == "training":
    from selfexplain.cli.train import main

    main(args)
elif entry == "targets":
    sys.argv = list(args)
    exec(open(args[0]).read())
else:
    raise SystemExit(f"unknown entry {entry!r}")
"""

# The targets job: the dataset saved with `save_to_disk`, the source model, 6 shards cached in `cache_dir`.
TARGETS_JOB = r"""
import logging, sys
from datasets import load_from_disk
from transformers import ViTForImageClassification
from selfexplain.data import default_image_processor
from selfexplain.attribution.targets import add_explanation_targets

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("selfexplain").setLevel(logging.INFO)
_, images, model, cache_dir, output = sys.argv
out = add_explanation_targets(
    load_from_disk(images), ViTForImageClassification.from_pretrained(model).eval(),
    image_processor=default_image_processor({image_size}), grid=(2, 2), budget={budget}, seed=5,
    cache_dir=cache_dir, num_shards={num_shards}, progress=False,
)
out.save_to_disk(output)
"""
TARGETS_BUDGET = 12
NUM_SHARDS = 6


# ----------------------------------------------------------------------------------------------------------
# Fixtures: a tiny base and tiny datasets, on disk so that the children load them by folder
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """``base/``: 5 labels (a fresh head is drawn) and dropout (the global RNG must be restored on resume);
    ``data/``: train (48, with targets) and validation (16) splits saved with ``save_to_disk``."""
    root = tmp_path_factory.mktemp("faults")
    tiny_classifier(seed=0, patch_size=PATCH_SIZE, num_labels=5, hidden_dropout_prob=0.1).save_pretrained(
        root / "base"
    )
    default_image_processor(IMAGE_SIZE).save_pretrained(root / "base")
    DatasetDict(
        {"train": coloured_squares(48, seed=0), "validation": coloured_squares(16, seed=1)}
    ).save_to_disk(root / "data")
    return root


# ----------------------------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    # One thread: two threads on two contended cores are 20-40x slower. No GPU, no network, no progress bars.
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }


class Child:
    """A child process whose output goes to files (a full pipe would block it)."""

    def __init__(self, command: list[str], cwd: Path, name: str) -> None:
        self.log = cwd / f"{name}.log"
        self.command = command
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=cwd, env=child_env(), stdout=log, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text()[-6000:]

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"{self.command} did not finish in {timeout} s:\n{self.output()}")

    def succeed(self) -> str:
        assert self.wait() == 0, self.output()
        return self.output()

    def killed(self) -> None:
        """Expect the child to have died of SIGKILL (sent by the test or by itself)."""
        assert self.wait() == -signal.SIGKILL, f"expected a SIGKILL death:\n{self.output()}"

    def kill_when(self, condition: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
        """SIGKILL the child as soon as ``condition()`` holds (polled every few milliseconds)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(
                    f"the child exited ({self.process.returncode}) before the kill point:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"kill point not reached in {timeout} s:\n{self.output()}")
            time.sleep(POLL_S)
        self.process.send_signal(signal.SIGKILL)
        self.killed()


def driver(mode: str, n: int, entry: str, *args: str) -> list[str]:
    return [sys.executable, "-c", DRIVER, mode, str(n), entry, *args]


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def training_argv(workspace: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--base", str(workspace / "base"), "--output-dir", str(output_dir), "--train-data",
        str(workspace / "data"), "--explanation-loss-weight", "1.0", "--num-epochs", "2", "--batch-size", "8",
        "--learning-rate", "3e-3", "--log-every", "2", "--checkpoint-every", str(CHECKPOINT_EVERY),
        "--save-total-limit", "2", "--record-batches", "true", *extra,
    ]  # fmt: skip


def steps_started(output_dir: Path) -> int:
    """The newest step whose first micro-batch has been drawn (``batches.jsonl`` gets a line per step)."""
    path = output_dir / "batches.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def checkpoint_step(path: Path | None) -> int:
    return 0 if path is None else int(path.name.rsplit("-", 1)[1])


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference_run(workspace) -> Path:
    """The uninterrupted run, in this process through the same argument parsing as the command line."""
    output_dir = workspace / "reference"
    parser = add_train_arguments(argparse.ArgumentParser())
    train_from_args(parser.parse_args(training_argv(workspace, output_dir)))
    return output_dir


def test_training_killed_three_times_resumes_to_the_uninterrupted_weights(workspace, reference_run):
    rng = random.Random(7)
    out = workspace / "killed"
    resume = ("--resume", "true")
    kills = []

    # Kill 1, from outside, mid-step at a seeded step after the first checkpoint exists.
    step = rng.randint(CHECKPOINT_EVERY + 1, 2 * CHECKPOINT_EVERY + 2)
    child = Child(
        [sys.executable, "-m", "selfexplain.training", *training_argv(workspace, out)], workspace, "run1"
    )
    child.kill_when(lambda: latest_checkpoint(out) is not None and steps_started(out) >= step)
    kills.append(("external", step, steps_started(out), checkpoint_step(latest_checkpoint(out))))
    assert 0 < checkpoint_step(latest_checkpoint(out)) < steps_started(out)
    assert not (out / "model.safetensors").exists()

    # Kill 2: inside the writing of the next checkpoint, at a seeded place (a torn file or before the rename).
    before = checkpoint_step(latest_checkpoint(out))
    assert before < STEPS - CHECKPOINT_EVERY, f"the kill came too late (newest checkpoint {before})"
    mode, n = rng.choice([("save", 1), ("save", 2), ("save", 3), ("rename", 1)])
    Child(driver(mode, n, "training", *training_argv(workspace, out, *resume)), workspace, "run2").killed()
    torn = before + CHECKPOINT_EVERY
    kills.append((mode, n, steps_started(out), checkpoint_step(latest_checkpoint(out))))
    assert checkpoint_step(latest_checkpoint(out)) == before  # the half-written one is not taken
    assert (out / "checkpoints" / f".tmp-checkpoint-{torn:08d}").is_dir()

    # Kill 3: after the last checkpoint and the final evaluation, right before the model is saved.
    Child(
        driver("finish", 1, "training", *training_argv(workspace, out, *resume)), workspace, "run3"
    ).killed()
    last = latest_checkpoint(out)
    kills.append(("finish", 1, steps_started(out), checkpoint_step(last)))
    assert steps_started(out) == STEPS and checkpoint_step(last) >= torn
    assert not (out / "model.safetensors").exists()

    started = time.perf_counter()
    command = [sys.executable, "-m", "selfexplain.training", *training_argv(workspace, out, *resume)]
    Child(command, workspace, "run4").succeed()
    print(f"kills (kind, seeded point, last step started, newest checkpoint): {kills}")
    print(f"final resume: {time.perf_counter() - started:.1f} s")

    difference = max_difference(weights(reference_run), weights(out))
    print(f"max |w_reference - w_killed| = {difference}")
    assert difference == 0.0
    # The run reads as one uninterrupted run: same batches, same log (train and eval records), same metrics.
    for name in ("batches.jsonl", "log.jsonl"):
        assert (out / name).read_text() == (reference_run / name).read_text(), name
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, reference_run))
    for key in ("global_step", "epoch", "train_loss", "train_explanation_loss", "eval_accuracy", "eval_loss"):
        assert metrics[key] == expected[key], key
    assert metrics["resumed_from"] == str(last)
    # The same complete checkpoints as the reference (`save_total_limit` holds), no temporary folder left.
    assert sorted(os.listdir(out / "checkpoints")) == sorted(os.listdir(reference_run / "checkpoints"))


# ----------------------------------------------------------------------------------------------------------
# Shapley targets
# ----------------------------------------------------------------------------------------------------------


def shard_files(cache_dir: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in sorted(cache_dir.glob("*/shard-*.arrow"))}


def partial_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.glob("*/tmp*"))


def test_targets_killed_mid_way_keep_finished_shards_and_recompute_only_the_rest(tmp_path):
    rng = random.Random(11)
    images = coloured_squares(36, seed=2).remove_columns("explanation_targets")
    images.save_to_disk(tmp_path / "images")
    tiny_classifier(seed=3, patch_size=PATCH_SIZE, num_labels=3).save_pretrained(tmp_path / "source")
    job = tmp_path / "targets_job.py"
    job.write_text(TARGETS_JOB.format(image_size=IMAGE_SIZE, budget=TARGETS_BUDGET, num_shards=NUM_SHARDS))
    args = (str(job), str(tmp_path / "images"), str(tmp_path / "source"), str(tmp_path / "cache"))

    # Kill from outside once a seeded number of shards is finished (`Dataset.map` writes a shard to a `tmp*`
    # file in the same folder and renames it when complete).
    finished = rng.randint(1, NUM_SHARDS - 2)
    child = Child(driver("none", 0, "targets", *args, str(tmp_path / "out")), tmp_path, "targets1")
    # Killing while a shard file is half-written is what we aim for, but that window lasts milliseconds: on a
    # loaded machine the poll can miss it, so the kill also counts once the seeded number of shards is done.
    child.kill_when(lambda: len(shard_files(tmp_path / "cache")) >= finished)
    kept, torn = shard_files(tmp_path / "cache"), partial_files(tmp_path / "cache")
    assert finished <= len(kept) < NUM_SHARDS
    assert not (tmp_path / "out").exists()

    log = Child(driver("none", 0, "targets", *args, str(tmp_path / "out")), tmp_path, "targets2").succeed()
    missing = NUM_SHARDS - len(kept)
    assert f"{missing} of {NUM_SHARDS} shards to compute" in log, log
    after = shard_files(tmp_path / "cache")
    assert len(after) == NUM_SHARDS
    for name, stat in kept.items():  # finished work is neither lost nor rewritten
        now = after[name]
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns), (
            name
        )
    print(f"killed with {len(kept)} of {NUM_SHARDS} shards finished (seeded point: {finished}), torn: {torn}")

    # The uninterrupted reference, in this process.
    reference = add_explanation_targets(
        load_from_disk(tmp_path / "images"),
        ViTForImageClassification.from_pretrained(tmp_path / "source").eval(),
        image_processor=default_image_processor(IMAGE_SIZE),
        grid=(2, 2),
        budget=TARGETS_BUDGET,
        seed=5,
        cache_dir=tmp_path / "reference-cache",
        num_shards=NUM_SHARDS,
        progress=False,
    )
    resumed = load_from_disk(tmp_path / "out")
    got = np.asarray(resumed.with_format("numpy")["explanation_targets"])
    expected = np.asarray(reference.with_format("numpy")["explanation_targets"])
    print(f"max |targets_reference - targets_killed| = {np.abs(got - expected).max()}")
    np.testing.assert_array_equal(got, expected)
    assert resumed["label"] == reference["label"]
