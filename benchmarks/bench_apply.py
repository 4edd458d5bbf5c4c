"""Section 4: ``apply_explanation_vector`` wall time and peak memory, versus "load both state dicts and add".

Each measurement runs in its own Python process (``python benchmarks/bench_apply.py --worker MODE ...``) so
the resident-set high-water mark belongs to that operation alone: after the imports (and, for the "loaded"
modes, after loading the model and the vector) the worker resets the kernel's peak-RSS counter (``VmHWM``, by
writing 5 to ``/proc/self/clear_refs``), runs the operation, and reports the new peak minus the RSS at the
reset. Models and vectors (random weights) are written once to a temporary folder as safetensors.

With ``run_all.py --device cuda`` the workers get ``--device cuda:N``: the operation then produces a model in
device memory (see ``_operation``), the timer waits for the device, and the worker also reports the peak of
device memory allocated during the call (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus what was allocated before it). On the CPU nothing changes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    VIT_B16,
    VIT_L16,
    VIT_MICRO16,
    VIT_TINY16_HALF,
    Goal,
    SectionResult,
    Table,
    describe,
    device,
    device_description,
    fmt_bytes,
    fmt_seconds,
    median,
    set_device,
    synchronize,
)

WORKER_MODES = {
    "ours-disk": "ours: `apply_explanation_vector(model_dir, vector_dir)` (loads both, returns the model)",
    "naive-disk": "naive: `load_file` both state dicts, add, `load_state_dict` into a new model",
    "ours-loaded-new": "ours: `apply_explanation_vector(vit_classifier, vector)` (loaded; returns a new model)",
    "ours-loaded-inplace": "ours: `apply_explanation_vector(self_explaining, vector, inplace=True)` (loaded)",
    "naive-loaded": "naive: `state_dict()` + vector, added into a new dict, `load_state_dict` into a new model",
    "load-only": "load only: `ViTForSelfExplainingClassification.from_pretrained` + `ExplanationVector.from_pretrained`",
}
#: What the modes do on a GPU (``--device cuda``): the same operations, with the result in device memory.
CUDA_WORKER_MODES = {
    "ours-disk": "ours: `apply_explanation_vector(model_dir, vector_dir, device_map=DEVICE)` (loads both, "
    "returns the model on the device)",
    "naive-disk": "naive: `load_file(..., device=DEVICE)` both state dicts, add, `load_state_dict` into a new model",
    "ours-loaded-new": "ours: `apply_explanation_vector(vit_classifier, vector)` (model loaded and on the device; "
    "returns a new model there)",
    "ours-loaded-inplace": "ours: `apply_explanation_vector(self_explaining, vector, inplace=True)` (model loaded "
    "and on the device)",
    "naive-loaded": "naive: `state_dict()` + vector (copied to the device), added into a new dict, `load_state_dict` "
    "into a new model",
    "load-only": "load only: `ViTForSelfExplainingClassification.from_pretrained(device_map=DEVICE)` + "
    "`ExplanationVector.from_pretrained`",
}
GOAL_SECONDS = 1.0


# --------------------------------------------------------------------------------------------------------
# Parent side: section
# --------------------------------------------------------------------------------------------------------


def run(quick: bool) -> SectionResult:
    # model: (settings, processes per mode, calls per process)
    sizes = (
        {"ViT-Tiny-width (quick)": (VIT_TINY16_HALF, 1, 2)}
        if quick
        else {"ViT-B/16": (VIT_B16, 3, 2), "ViT-L/16": (VIT_L16, 1, 2)}
    )
    on_gpu = device().type == "cuda"
    where = str(device())  # the workers' --device
    section = SectionResult(
        "apply",
        "4. apply_explanation_vector: time and peak memory",
        setup=[
            "Random-weight `ViTForImageClassification` (num_labels=10) saved with `save_pretrained` (safetensors), "
            "and an explanation vector over its backbone (`vit.*`, every tensor) saved with "
            "`ExplanationVector.save_pretrained`; α = 1, float32.",
            "Each measurement runs in fresh processes (after a warm-up call on a micro model, so lazy imports are "
            "paid). **First call**: what a user's process pays, median over processes; it also gives the peak = RSS "
            "high-water mark during the call minus RSS just before it (file pages of memory-mapped safetensors count "
            "while resident). **Repeat**: later calls in the same process (memory already faulted in).",
            '"disk" modes include loading both from the local folders (page cache warm); "loaded" modes start with '
            'both already in memory; "load only" is the loading part of the disk modes.',
            "From disk, the vector is streamed tensor by tensor into the freshly loaded model, whose tensors "
            "transformers memory-maps from the checkpoint: the update's writes are copy-on-write page faults, "
            "which is why the row on one thread can be faster than on all of them (the faults do not parallelise "
            "on this VM).",
        ],
    )
    modes = dict(WORKER_MODES)
    headers = [
        "model",
        "mode",
        "processes × calls",
        "first call",
        "repeat",
        "peak extra RSS",
        "peak / model size",
    ]
    if on_gpu:
        modes = {mode: text.replace("DEVICE", where) for mode, text in CUDA_WORKER_MODES.items()}
        headers += ["peak extra device memory", "device peak / model size"]
        section.setup[-1] = (
            f'On {device_description()} (`--device {where}` to every worker): the "disk" modes load the model '
            "straight into device memory, as a GPU user would (`device_map` is passed on to `from_pretrained` by "
            "`apply_explanation_vector`; the naive path reads the safetensors with `device=`), and the vector is "
            'streamed to the device tensor by tensor; the "loaded" modes start with the model already on the '
            "device (`from_pretrained`, then `.to(device)`, before the timer) and the vector in host memory, "
            "where `ExplanationVector.from_pretrained` puts it, so the call copies the vector's tensors over (the "
            "naive merge copies them too). Timers wait for the device. Besides RSS, the peak of device memory "
            "allocated during the call (`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus "
            "what was allocated before it) is reported. The warm-up call on a micro model also creates the CUDA "
            "context, so neither figure includes it. The one-thread row of the CPU run is not repeated: the "
            "copy-on-write faults it isolates do not occur when the weights are loaded into device memory."
        )
    table = Table("Wall time and peak extra memory (medians)", headers)
    threads = os.environ.get("SELFEXPLAIN_BENCH_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="selfexplain-bench-apply-") as tmp:
        for label, (settings, processes, calls) in sizes.items():
            folder = Path(tmp) / label.split()[0].replace("/", "")
            info = _call_worker("prepare", folder, threads, 1, settings, "cpu")  # writes files only
            model_bytes, vector_bytes = info["model_bytes"], info["vector_bytes"]
            section.setup.append(
                f"{label}: {describe(settings)}, {info['parameters'] / 1e6:.1f} M parameters; model "
                f"{fmt_bytes(model_bytes)}, vector (backbone) {fmt_bytes(vector_bytes)}."
            )
            results = {}
            for mode, description in modes.items():
                runs = [_call_worker(mode, folder, threads, calls, settings, where) for _ in range(processes)]
                results[mode] = {
                    "first": median([run["seconds"][0] for run in runs]),
                    "repeat": median([t for run in runs for t in run["seconds"][1:]] or [float("nan")]),
                    "peak": median([run["peak_extra_bytes"] for run in runs]),
                }
                cells = [
                    label,
                    description,
                    f"{processes} × {calls}",
                    fmt_seconds(results[mode]["first"]),
                    fmt_seconds(results[mode]["repeat"]),
                    fmt_bytes(results[mode]["peak"]),
                    f"{results[mode]['peak'] / model_bytes:.2f}×",
                ]
                if on_gpu:
                    results[mode]["device_peak"] = median([run["peak_extra_device_bytes"] for run in runs])
                    cells += [
                        fmt_bytes(results[mode]["device_peak"]),
                        f"{results[mode]['device_peak'] / model_bytes:.2f}×",
                    ]
                table.add(*cells)
            if threads != "1" and not on_gpu:
                # The from-disk update writes into the pages transformers memory-maps the checkpoint into
                # (copy-on-write faults); measured once more on one thread to show what threads do to that.
                runs = [
                    _call_worker("ours-disk", folder, "1", calls, settings, where) for _ in range(processes)
                ]
                single = median([run["seconds"][0] for run in runs])
                table.add(
                    label,
                    WORKER_MODES["ours-disk"] + ", **1 thread**",
                    f"{processes} × {calls}",
                    fmt_seconds(single),
                    fmt_seconds(median([t for run in runs for t in run["seconds"][1:]] or [float("nan")])),
                    fmt_bytes(median([run["peak_extra_bytes"] for run in runs])),
                    f"{median([run['peak_extra_bytes'] for run in runs]) / model_bytes:.2f}×",
                )
            section.goals += _goals(label, results, model_bytes, vector_bytes, quick, on_gpu)
    section.tables.append(table)
    return section


def _goals(
    label: str, results: dict, model_bytes: int, vector_bytes: int, quick: bool, on_gpu: bool = False
) -> list[Goal]:
    """Time goals on the first call; the memory goal on the peak RSS (on a GPU: the peak device memory, where
    the model and the update live)."""
    goals = []
    if label.startswith("ViT-B") or quick:
        for mode in ("ours-loaded-new", "ours-disk"):
            elapsed = results[mode]["first"]
            met = elapsed <= GOAL_SECONDS
            naive = "naive-disk" if mode == "ours-disk" else "naive-loaded"
            reason = ""
            if not met:
                reason = (
                    f"gap {fmt_seconds(elapsed - GOAL_SECONDS)}; naive takes {fmt_seconds(results[naive]['first'])}"
                    + (
                        f", loading alone {fmt_seconds(results['load-only']['first'])}"
                        if mode == "ours-disk"
                        else ""
                    )
                )
            goals.append(
                Goal(
                    f"apply {label}, {mode}, first call",
                    f"≤ 1 s on {device()}" if on_gpu else "≤ 1 s on 2 cores",
                    fmt_seconds(elapsed),
                    met,
                    reason,
                )
            )
    key = "device_peak" if on_gpu else "peak"
    peak = results["ours-disk"][key]
    limit = model_bytes + vector_bytes
    met = peak <= limit * 1.05  # 5 % slack for allocator and interpreter noise
    reason = ""
    if not met:
        reason = (
            f"gap {fmt_bytes(peak - limit)}: peak {peak / model_bytes:.2f}× the model (naive "
            f"{results['naive-disk'][key] / model_bytes:.2f}×, loading alone "
            f"{results['load-only'][key] / model_bytes:.2f}×)"
        )
    goals.append(
        Goal(
            f"apply {label} peak {'device ' if on_gpu else ''}memory (from disk)",
            "≤ model + one backbone copy",
            f"{fmt_bytes(peak)} vs {fmt_bytes(limit)}",
            met,
            reason,
        )
    )
    return goals


def _call_worker(mode: str, folder: Path, threads: str, repeats: int, settings: dict, where: str) -> dict:
    """One worker process; ``where`` is its ``--device`` (the parent's :func:`device`)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--folder",
        str(folder),
        "--threads",
        str(threads),
        "--repeats",
        str(repeats),
        "--settings",
        json.dumps(settings),
        "--device",
        where,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {mode} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS and return that RSS (the baseline of the next peak)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_bytes("VmRSS")


def _prepare(folder: Path, settings: dict) -> dict:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from selfexplain import ExplanationVector
    from selfexplain.vectors import ExplanationVectorConfig, architecture_fingerprint
    from selfexplain.vectors.checkpoint_keys import serialized_state_dict

    torch.manual_seed(0)
    config = ViTConfig(num_channels=3, num_labels=10, **settings)
    model = ViTForImageClassification(config)
    model.save_pretrained(folder / "model")
    state = serialized_state_dict(model)
    parameters = sum(p.numel() for p in model.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    backbone = {k: torch.randn(v.shape) * 1e-3 for k, v in state.items() if k.startswith("vit.")}
    del model, state
    vector = ExplanationVector(
        backbone, ExplanationVectorConfig(model_type="vit", architecture=architecture_fingerprint(config))
    )
    vector.save_pretrained(folder / "vector", model_card=False)
    vector_bytes = sum(t.numel() * t.element_size() for t in vector.tensors.values())
    return {
        "parameters": parameters,
        "model_bytes": model_bytes,
        "vector_bytes": vector_bytes,
        "seconds": [0.0],
        "peak_extra_bytes": 0,
    }


def _naive_merge(model_state: dict, vector_state: dict, alpha: float = 1.0) -> dict:
    """θ + α·τ into a new dict; a vector tensor in host memory is copied to its parameter's device first (a no-op
    on the CPU)."""
    return {
        k: v + alpha * vector_state[k].to(v.device) if k in vector_state else v
        for k, v in model_state.items()
    }


def _naive_model(config, serialized_state: dict):
    """A self-explaining model holding a serialized-name state dict (built on the meta device, no random init)."""
    import torch

    from selfexplain import ViTForSelfExplainingClassification
    from selfexplain.vectors.checkpoint_keys import serialized_names

    with torch.device("meta"):
        model = ViTForSelfExplainingClassification(config)
    names = serialized_names(model)
    model.load_state_dict({names[k]: v for k, v in serialized_state.items()}, strict=True, assign=True)
    return model


def _operation(mode: str, folder: Path):
    """The callable a worker times, with its inputs already loaded for the "loaded" modes.

    On the CPU (the default) exactly the operations the section describes. On a GPU (:func:`device` is CUDA) the
    result is a model in device memory: the disk modes load onto the device (``device_map`` for
    ``from_pretrained``, ``device=`` for ``load_file``), the loaded modes get the model moved there first (the
    vector stays in host memory, where ``ExplanationVector.from_pretrained`` loads it).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, ViTForImageClassification

    from selfexplain import ExplanationVector, ViTForSelfExplainingClassification, apply_explanation_vector
    from selfexplain.vectors.checkpoint_keys import serialized_state_dict
    from selfexplain.vectors.config import VECTOR_WEIGHTS_NAME

    model_dir, vector_dir = folder / "model", folder / "vector"
    on_cpu = device().type == "cpu"
    # Where from_pretrained / load_file put the weights: nothing passed on the CPU (as before), the device else.
    placement = {} if on_cpu else {"device_map": str(device())}
    files_on = {} if on_cpu else {"device": str(device())}
    if mode == "ours-disk":
        return lambda: apply_explanation_vector(model_dir, vector_dir, alpha=1.0, **placement)
    if mode == "naive-disk":
        config = AutoConfig.from_pretrained(model_dir)

        def naive_from_disk():
            model_state = {}
            for shard in sorted(model_dir.glob("*.safetensors")):
                model_state.update(load_file(shard, **files_on))
            return _naive_model(
                config, _naive_merge(model_state, load_file(vector_dir / VECTOR_WEIGHTS_NAME, **files_on))
            )

        return naive_from_disk
    if mode == "load-only":
        return lambda: (
            ViTForSelfExplainingClassification.from_pretrained(model_dir, **placement),
            ExplanationVector.from_pretrained(vector_dir),
        )
    vector = ExplanationVector.from_pretrained(vector_dir)

    def loaded(model_class):
        model = model_class.from_pretrained(model_dir)
        return model if on_cpu else model.to(device())

    if mode == "ours-loaded-new":
        model = loaded(ViTForImageClassification)
        return lambda: apply_explanation_vector(model, vector, alpha=1.0)
    if mode == "ours-loaded-inplace":
        model = loaded(ViTForSelfExplainingClassification)
        return lambda: apply_explanation_vector(model, vector, alpha=1.0, inplace=True)
    if mode == "naive-loaded":
        model = loaded(ViTForImageClassification)
        return lambda: _naive_model(model.config, _naive_merge(serialized_state_dict(model), vector.tensors))
    raise ValueError(f"unknown worker mode {mode!r}")


def _worker(mode: str, folder: Path, repeats: int, settings: dict) -> dict:
    if mode == "prepare":
        _prepare(folder / "warmup", VIT_MICRO16)
        return _prepare(folder, settings)
    # Run the operation once on a micro model first: lazy imports and first-call caches are then paid before
    # the peak counter is reset, and the peak belongs to the weights alone.
    warmup = _operation(mode, folder / "warmup")
    warmup()
    del warmup
    operation = _operation(mode, folder)
    on_gpu = device().type == "cuda"
    seconds, peak_extra, device_peak_extra = [], None, None
    for _ in range(repeats):
        if on_gpu:
            device_baseline = _reset_device_peak()
        baseline = _reset_peak()
        start = time.perf_counter()
        result = operation()
        synchronize()  # a no-op on the CPU
        seconds.append(time.perf_counter() - start)
        if peak_extra is None:
            peak_extra = _rss_bytes("VmHWM") - baseline
            if on_gpu:
                device_peak_extra = _device_peak_bytes() - device_baseline
        del result
    report = {"seconds": seconds, "peak_extra_bytes": peak_extra}
    if on_gpu:
        report["peak_extra_device_bytes"] = device_peak_extra
    return report


def _reset_device_peak() -> int:
    """Reset the device's peak-allocation counter; return the bytes allocated now (the next peak's baseline)."""
    import torch

    gc.collect()
    synchronize()
    torch.cuda.reset_peak_memory_stats(device())
    return torch.cuda.memory_allocated(device())


def _device_peak_bytes() -> int:
    import torch

    synchronize()
    return torch.cuda.max_memory_allocated(device())


def _worker_main() -> None:
    parser = argparse.ArgumentParser(description="one measurement of the apply benchmark (internal)")
    parser.add_argument("--worker", required=True, choices=["prepare", *WORKER_MODES])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--settings", type=json.loads, required=True)
    parser.add_argument("--device", default="cpu", help="where the operation puts the model: cpu or cuda[:N]")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    set_device(args.device)
    print(json.dumps(_worker(args.worker, args.folder, args.repeats, args.settings)))


if __name__ == "__main__":
    _worker_main()
