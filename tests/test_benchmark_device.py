"""`benchmarks/run_all.py --device`: where the sections run, what the report names, and a clear refusal."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """`run_all` and `_common` imported from benchmarks/ (a folder of scripts, not a package); the device is
    reset to the CPU afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    run_all = importlib.import_module("run_all")
    common = importlib.import_module("_common")
    yield run_all, common
    common.set_device("cpu")


def test_default_reports_never_overwrite_the_other_device(bench):
    run_all, _ = bench
    assert run_all.parse_args([]).output == run_all.REPO_ROOT / "docs/benchmarks.md"
    assert run_all.parse_args(["--device", "cuda"]).output == run_all.REPO_ROOT / "docs/benchmarks-cuda.md"
    assert run_all.parse_args(["--device", "cuda:1", "--quick"]).output == (
        run_all.REPO_ROOT / "build/benchmarks-cuda-quick.md"
    )
    # The command in the report regenerates the report: the device is part of it, the default output is not.
    assert run_all._flags(run_all.parse_args(["--device", "cuda:1"])) == " --device cuda:1"
    assert run_all._flags(run_all.parse_args([])) == ""


def test_unknown_devices_are_refused(bench):
    _, common = bench
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        common.set_device("mps")
    with pytest.raises(RuntimeError):
        common.set_device("not-a-device")
    assert common.device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_exits_with_the_reason_and_writes_nothing(bench, tmp_path, capsys):
    run_all, common = bench
    output = tmp_path / "report.md"
    assert run_all.main(["--device", "cuda", "--only", "overhead", "--output", str(output)]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err
    assert not output.exists()
    assert common.device() == torch.device("cpu")


def test_sections_build_their_models_and_images_on_the_chosen_device(bench):
    _, common = bench
    common.set_device("cpu")
    model = common.build_classifier(common.VIT_MICRO16, num_labels=3)
    images = common.sample_images(2, common.VIT_MICRO16["image_size"])
    assert next(model.parameters()).device == images.device == common.device()
    # LogitsModel takes CPU tensors from numpy-based peers and runs them where the model lives.
    counted = common.LogitsModel(model)
    assert counted(images.cpu()).shape == (2, 3) and counted.evaluations == 2


@pytest.mark.slow
def test_a_quick_cpu_run_names_the_device_in_the_report(bench, tmp_path):
    run_all, _ = bench
    output = tmp_path / "report.md"
    assert run_all.main(["--quick", "--only", "overhead", "--device", "cpu", "--output", str(output)]) == 0
    report = output.read_text()
    assert "- Device: **cpu**" in report
    assert "## 1. Explanation overhead" in report
