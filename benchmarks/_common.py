"""Shared machinery of the benchmarks: timing, model configs, images, peer libraries and report tables.

Every section module (``bench_*.py`` next to this file) exposes ``run(profile) -> SectionResult``;
``run_all.py`` calls them in one process and renders the results as Markdown. Times are wall-clock medians of
*interleaved* rounds (each round runs every contender once, in a rotating order), so a load spike from another
process on this small machine hits all contenders alike; ratios are medians of the per-round ratios.
"""

from __future__ import annotations

import importlib
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import _torchvision_workaround  # noqa: F401  (before transformers: imports a CUDA-built torchvision on CPU torch)
import numpy as np
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

REPO_ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------------------
# Device: every section runs its models and tensors where `run_all.py --device` says (default: the CPU)
# --------------------------------------------------------------------------------------------------------

_DEVICE = torch.device("cpu")


def set_device(name: str | torch.device) -> torch.device:
    """Run every section on ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``); refuses a device this torch lacks.

    ``run_all.py --device`` calls it once, before any section runs. Sections never hold a device of their own:
    they ask :func:`device` (models, images, masks) and time through :func:`interleaved_times` /
    :func:`time_once`, which wait for the device after every timed call (a CUDA call returns before its
    kernels finish, so an unsynchronised timer would measure the launch, not the work).
    """
    global _DEVICE
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: this torch ({torch.__version__}) sees no CUDA device "
                f"({'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); install a CUDA build "
                "of torch on a machine with a GPU, or run on the CPU."
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible.")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: the benchmarks run on 'cpu' or 'cuda[:N]'.")
    _DEVICE = device
    return device


def device() -> torch.device:
    """The device the sections run on (see :func:`set_device`)."""
    return _DEVICE


def device_description() -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H200, 139.8 GiB)"``: what the report names."""
    if _DEVICE.type != "cuda":
        return str(_DEVICE)
    properties = torch.cuda.get_device_properties(_DEVICE)
    return f"{_DEVICE} ({properties.name}, {properties.total_memory / 2**30:.1f} GiB)"


def synchronize() -> None:
    """Wait until the device has finished the work queued so far (a no-op on the CPU)."""
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize(_DEVICE)


def on_device(module_or_tensor):
    """``x.to(device())``: a model, or a tensor made on the CPU (images, masks, baselines)."""
    return module_or_tensor.to(_DEVICE)


# --------------------------------------------------------------------------------------------------------
# Model configurations (random weights: speed does not depend on what the weights learned)
# --------------------------------------------------------------------------------------------------------

#: ViT-B/16 at 224 px (86M parameters), as google/vit-base-patch16-224.
VIT_B16 = dict(
    image_size=224,
    patch_size=16,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
)
#: ViT-L/16 at 224 px (304M parameters), as google/vit-large-patch16-224.
VIT_L16 = dict(
    image_size=224,
    patch_size=16,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
)
#: ViT-Tiny width (192, 3 heads) at half its depth (6 layers instead of 12), 224 px / patch 16: a 14x14 patch grid
#: at a cost that lets post-hoc explainers with 150+ forward passes per image run on 2 CPU cores.
VIT_TINY16_HALF = dict(
    image_size=224,
    patch_size=16,
    hidden_size=192,
    num_hidden_layers=6,
    num_attention_heads=3,
    intermediate_size=768,
)
#: The small ViT of the CPU experiments: 32 px / patch 4 (8x8 patches), 4 layers of width 64.
VIT_SMALL32 = dict(
    image_size=32,
    patch_size=4,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
)
#: A smoke-test ViT for ``--quick`` runs.
VIT_MICRO16 = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)


def vit_config(settings: Mapping[str, int], num_labels: int) -> ViTConfig:
    """A stock ``ViTConfig`` with the given architecture and ``num_labels`` classes."""
    return ViTConfig(num_channels=3, num_labels=num_labels, **settings)


def describe(settings: Mapping[str, int]) -> str:
    """``"224px/p16, d=768, 12 layers, 12 heads"`` for a config dict."""
    return (
        f"{settings['image_size']}px/p{settings['patch_size']}, d={settings['hidden_size']}, "
        f"{settings['num_hidden_layers']} layers, {settings['num_attention_heads']} heads"
    )


def build_classifier(
    settings: Mapping[str, int], num_labels: int, seed: int = 0
) -> ViTForImageClassification:
    """A randomly initialised ``ViTForImageClassification`` in eval mode on :func:`device` (deterministic for
    ``seed``: initialised on the CPU, then moved)."""
    torch.manual_seed(seed)
    return on_device(ViTForImageClassification(vit_config(settings, num_labels)).eval())


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class LogitsModel(nn.Module):
    """``model(x) -> logits`` for a transformers classifier, counting the images it is asked to score.

    Peer libraries (shap, Captum, Quantus) want a function or module that maps a tensor to a tensor; the count
    checks that every explainer really spends the evaluation budget it is credited with.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.evaluations = 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.evaluations += pixel_values.shape[0]
        # Peers that work in numpy hand over CPU tensors: the model runs where it lives.
        return self.model(pixel_values=pixel_values.to(next(self.model.parameters()).device)).logits


# --------------------------------------------------------------------------------------------------------
# Images: crops of the photographs bundled with scikit-image (no download), normalised like ViTImageProcessor
# --------------------------------------------------------------------------------------------------------

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def sample_images(num_images: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(num_images, 3, size, size)`` random square crops of real photos, scaled to ``[-1, 1]``, on :func:`device`.

    Real photos rather than noise: masked-image explainers and insertion/deletion see realistic
    colour statistics, and the "mean" baseline is a real mean colour.
    """
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [torch.from_numpy(getattr(skimage.data, name)().copy()) for name in _PHOTOS]
    crops = []
    for index in range(num_images):
        photo = photos[index % len(photos)].permute(2, 0, 1).float() / 255.0  # (3, H, W)
        height, width = photo.shape[1:]
        side = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = photo[None, :, top : top + side, left : left + side]
        crops.append(
            torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
        )
    return on_device(torch.cat(crops) * 2.0 - 1.0)


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------


def interleaved_times(
    functions: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    inner: Mapping[str, int] | None = None,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall times (s) of each function over ``rounds`` interleaved rounds, after ``warmup`` untimed rounds.

    Each round calls every function once (``inner[name]`` times for cheap ones, each call timed on its own),
    starting at a different function every round so no contender always runs first after a slow neighbour.
    With ``cpu_times`` (a dict to fill), the process CPU time of every timed call is recorded there too: on a
    machine shared with higher-priority work, CPU seconds measure the work done where wall time measures the
    waiting as well.
    """
    inner = dict(inner or {})
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    if cpu_times is not None:
        cpu_times.update({name: [] for name in names})
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(inner.get(name, 1)):
                start, cpu_start = time.perf_counter(), time.process_time()
                functions[name]()
                synchronize()
                times[name].append(time.perf_counter() - start)
                if cpu_times is not None:
                    cpu_times[name].append(time.process_time() - cpu_start)
    return times


def run_and_write(
    measure: Callable[..., Any],
    jobs: Sequence[tuple],
    shared: Any,
    workers: int,
    out: str | Path,
    command: str,
    render: Callable[[list, str, float, str], str],
) -> None:
    """Run ``measure(*job, shared)`` for every job in ``workers`` spawned processes (one thread each), then write
    the results to ``out`` + ``.json`` and ``render(results, command, wall_s, machine)`` to ``out`` + ``.md``."""
    import json
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from selfexplain.experiments.experiment import _environment

    started = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(measure, *zip(*jobs, strict=True), [shared] * len(jobs)))
    wall = time.perf_counter() - started
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(results, command, wall, _environment(workers)["machine"]))
    print(out.with_suffix(".md").read_text())


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]`` (robust to load that drifts between rounds).

    With ``inner`` repeats the lists can differ in length: each is summarised per round first.
    """
    if len(numerator) != len(denominator):
        return median(numerator) / median(denominator)
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])


def time_once(function: Callable[[], object]) -> tuple[float, Any]:
    synchronize()
    start = time.perf_counter()
    result = function()
    synchronize()
    return time.perf_counter() - start, result


# --------------------------------------------------------------------------------------------------------
# Peer libraries: optional, reported as "not available" with the reason when they cannot be imported
# --------------------------------------------------------------------------------------------------------


@dataclass
class Peer:
    """An optional benchmark-only library: the module when importable, else why it is not."""

    label: str
    module: ModuleType | None
    version: str | None
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.module is not None

    def status(self) -> str:
        return (
            f"{self.label} {self.version}"
            if self.available
            else f"{self.label}: not available ({self.reason})"
        )


#: Why a peer may be missing even though it exists on PyPI (shown next to the import error).
_KNOWN_BLOCKERS = {
    "pytorch_grad_cam": (
        "`pip install grad-cam` pulls torchvision, and an unpinned torchvision makes pip replace torch 2.13.0+cpu "
        "by torch 2.14 with CUDA wheels, so it is not part of the [bench] extra; install it in its own "
        "environment, torch and torchvision pinned in one command: `python3 -m venv .venv-bench && "
        ".venv-bench/bin/pip install torch==2.13.0 torchvision==0.28.0 grad-cam -e '.[bench]'` and run the "
        "benchmarks with `.venv-bench/bin/python`"
    ),
}


def load_peer(import_name: str, label: str) -> Peer:
    """Import an optional peer library; never raises."""
    try:
        module = importlib.import_module(import_name)
    except Exception as err:  # any import failure (missing, broken binary) means "not available"
        reason = f"`import {import_name}` failed: {type(err).__name__}: {err}"
        if import_name in _KNOWN_BLOCKERS:
            reason = f"{_KNOWN_BLOCKERS[import_name]}; {reason}"
        return Peer(label, None, None, reason)
    return Peer(label, module, getattr(module, "__version__", "unknown"))


# --------------------------------------------------------------------------------------------------------
# Results and Markdown rendering
# --------------------------------------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def to_markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |"]
        lines.append("|" + "|".join(" --- " for _ in self.headers) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Goal:
    """One acceptance goal of the issue: its target, what was measured and whether it is met.

    ``met=None`` means unresolved: not measured (a peer is missing) or not resolvable in this run (noise); the
    explanation says which.
    """

    name: str
    target: str
    measured: str
    met: bool | None
    explanation: str = ""

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**not met**", None: "unresolved"}[self.met]


@dataclass
class SectionResult:
    key: str
    title: str
    setup: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


# --------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------


def fmt_seconds(seconds: float) -> str:
    """Seconds with a unit that keeps 3 significant digits (``"12.3 ms"``, ``"4.56 s"``)."""
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.3g}×" if math.isfinite(ratio) else "n/a"


def fmt_percent(fraction: float) -> str:
    return f"{fraction * 100:+.2f} %"


def fmt_bytes(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f} MiB"


def fmt_rate(rate: float) -> str:
    return f"{rate:,.1f}" if rate < 100 else f"{rate:,.0f}"


# --------------------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def package_versions(names: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
