"""Run every selfexplain benchmark in one process and write ``docs/benchmarks.md``.

    python benchmarks/run_all.py            # full run, < 20 min on 2 CPU cores; writes docs/benchmarks.md
    python benchmarks/run_all.py --quick    # smoke run, < 2 min; writes build/benchmarks-quick.md
    python benchmarks/run_all.py --only overhead,apply --output /tmp/partial.md
    python benchmarks/run_all.py --device cuda  # every section on a GPU; writes docs/benchmarks-cuda.md

Sections (see each ``bench_*.py``): ``overhead`` (explanation cost of the forward pass), ``posthoc`` (versus
post-hoc explainers per image), ``kernel_shap`` (target-generation engine vs shap and Captum), ``apply``
(``apply_explanation_vector`` time and peak memory), ``training`` (λ > 0 vs λ = 0 step time), ``metrics``
(insertion/deletion vs Quantus), ``removal`` (Kernel SHAP with token dropping vs baseline filling) and
``equal_error`` (evaluations each Kernel SHAP estimator needs to reach a fixed error, vs shap, shapiq and Captum). Peers
(shap, Captum, Quantus, pytorch-grad-cam) are optional: the ``[bench]`` extra installs the first three
(pytorch-grad-cam needs its own environment, see ``peers.load_grad_cam``), and a missing one is reported as
"not available" with the reason. A section that fails is reported with its
error and makes the command exit with status 1 after the report is written.

``--device cuda`` runs every section's models and tensors on the GPU (timers wait for the device after every
timed call) and names the GPU in the report; the tables are the same. What stays on the CPU says so in its section
(the peers' own numpy work, the sampling of coalitions).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
#: section name -> module (next to this file) with `run(quick: bool) -> SectionResult`.
SECTIONS = {
    "overhead": "bench_overhead",
    "posthoc": "bench_posthoc",
    "kernel_shap": "bench_kernel_shap",
    "apply": "bench_apply",
    "training": "bench_training",
    "metrics": "bench_metrics",
    "removal": "bench_removal",
    "equal_error": "bench_equal_error",
}
PACKAGES = (
    "selfexplain",
    "torch",
    "transformers",
    "numpy",
    "safetensors",
    "accelerate",
    "shap",
    "shapiq",
    "captum",
    "quantus",
    "grad-cam",
    "numba",
    "scikit-learn",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run with small models and few repeats (< 2 min)"
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Markdown report (default: docs/benchmarks.md, or build/benchmarks-quick.md with --quick)",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all cores)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the sections run their models: cpu (default), cuda or cuda:N",
    )
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.output is None:
        args.output = _default_output(args)
    return args


def _default_output(args: argparse.Namespace) -> Path:
    """docs/benchmarks.md for the CPU, docs/benchmarks-cuda.md on a GPU (never overwriting the other)."""
    suffix = "" if args.device == "cpu" else f"-{args.device.split(':')[0]}"
    return REPO_ROOT / (f"build/benchmarks{suffix}-quick.md" if args.quick else f"docs/benchmarks{suffix}.md")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    # Before the first `import torch`: with OpenMP's default active spin-waiting, 2 threads on 2 cores shared
    # with one busy process run ~10x slower than 1 thread (every parallel region waits for the descheduled
    # thread). Passive waiting costs nothing on an idle machine and makes timings usable on a busy one.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["SELFEXPLAIN_BENCH_THREADS"] = str(args.threads)  # read by the subprocess workers of `apply`
    import _common
    import torch

    torch.set_num_threads(args.threads)
    try:
        _common.set_device(args.device)
    except ValueError as error:
        print(f"[benchmarks] {error}", file=sys.stderr)
        return 2
    print(f"[benchmarks] device: {_common.device_description()}", flush=True)
    started = time.perf_counter()
    results = []
    for name in args.sections:
        print(f"[benchmarks] {name} ...", flush=True)
        section_start = time.perf_counter()
        module: ModuleType | None = None
        try:
            module = importlib.import_module(SECTIONS[name])
            result = module.run(args.quick)
        except Exception:
            traceback.print_exc()
            title = module.__doc__.splitlines()[0] if module is not None and module.__doc__ else name
            result = _common.SectionResult(name, title, error=traceback.format_exc(limit=6))
        result.seconds = time.perf_counter() - section_start
        print(f"[benchmarks] {name} done in {result.seconds:.0f} s", flush=True)
        results.append(result)
    total = time.perf_counter() - started
    report = render(args, results, load_at_start, os.getloadavg(), total)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"[benchmarks] wrote {args.output} ({total:.0f} s in all)")
    return 1 if any(result.error for result in results) else 0


def render(
    args: argparse.Namespace,
    results: list,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
    total_seconds: float,
) -> str:
    import _common

    command = "python benchmarks/run_all.py" + _flags(args)
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/run_all.py; do not edit by hand. -->",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `{command}` "
        f"in {total_seconds / 60:.1f} min{' (quick smoke run: small models, few repeats)' if args.quick else ''}.",
        "",
        "Times are wall-clock **medians**; contenders run in interleaved rounds (each round runs every contender once,",
        "in a rotating order) and ratios are medians of the per-round ratios, so load from other processes hits all",
        "contenders alike. Models have random weights (speed does not depend on training); where agreement matters",
        "it is measured on the same model for every method.",
        "",
        "## Machine",
        "",
        f"- Device: **{_common.device_description()}** (every section's models and tensors)",
        f"- CPU: {_common.cpu_model()}, {os.cpu_count()} logical cores; torch threads: {args.threads}",
        f"- Memory: {_common.fmt_bytes(_common.total_memory_bytes() or 0)}; OS: {platform.platform()}",
        f"- `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}` (run_all sets PASSIVE unless set: with active "
        "spin-waiting, 2 torch threads on 2 cores shared with one busy process ran ~10× slower here)",
        f"- Load average (1/5/15 min) at start: {_fmt_load(load_start)}; at end: {_fmt_load(load_end)} "
        "(other processes shared the machine when it is above the core count)",
        f"- Python {platform.python_version()}; git commit {_git_revision()}",
        "",
        "## Versions",
        "",
        "| package | version |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {version} |" for name, version in _common.package_versions(PACKAGES).items()]
    import peers as peer_adapters

    peers = [
        _common.load_peer(module, label)
        for module, label in (("shap", "shap"), ("captum", "Captum"), ("quantus", "Quantus"))
    ]
    peers.append(peer_adapters.load_grad_cam())  # imported with its torchvision workaround
    lines += [
        "",
        "Peers are benchmark-only dependencies: `pip install -e '.[bench]'` (pytorch-grad-cam: "
        f"`{peer_adapters.GRAD_CAM_INSTALL}`, then run with `.venv-bench/bin/python`). In this run: "
        + "; ".join(peer.status() for peer in peers)
        + ".",
    ]
    lines += [
        "",
        "## Goals",
        "",
        "| section | goal | target | measured | verdict | gap and reason |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        if result.error:
            lines.append(f"| {result.title} | — | — | — | **failed** | see the section |")
        for goal in result.goals:
            lines.append(
                f"| {result.key} | {goal.name} | {goal.target} | {goal.measured} | {goal.verdict} | {goal.explanation or '—'} |"
            )
    for result in results:
        lines += ["", f"## {result.title}", "", f"_Section time: {result.seconds:.0f} s._", ""]
        if result.error:
            lines += ["**This section failed:**", "", "```", result.error.rstrip(), "```"]
            continue
        lines += [f"- {item}" for item in result.setup]
        for table in result.tables:
            lines += ["", table.to_markdown()]
        if result.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _flags(args: argparse.Namespace) -> str:
    flags = " --quick" if args.quick else ""
    if args.sections != list(SECTIONS):
        flags += f" --only {','.join(args.sections)}"
    if args.threads != (os.cpu_count() or 1):
        flags += f" --threads {args.threads}"
    if args.device != "cpu":
        flags += f" --device {args.device}"
    if args.output.resolve() != _default_output(args).resolve():
        flags += f" --output {args.output}"
    return flags


def _fmt_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{value:.2f}" for value in load)


def _git_revision() -> str:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{revision}{' (with uncommitted changes)' if dirty else ''}"


if __name__ == "__main__":
    sys.exit(main())
