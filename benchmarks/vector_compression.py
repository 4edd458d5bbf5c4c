"""Compact storage of explanation vectors: file size against the faithfulness gain kept (issue 15).

For every seed and source → target pair of an experiment's work folder, and every compression setting, the
vector is saved compressed, loaded back and applied to the target's prediction-only model at α; the *gain* is the
insertion − deletion AUC of the patched model's own map (classes: the unpatched target's predictions) minus the
same at α = 0, on the target's test images, exactly as the experiment scores transfer (its `patch_map` and
`faithfulness`). Reported: the weights file's size against the fp32 dense vector, and the gain kept as a fraction
of the dense vector's gain.

Layout read (what `selfexplain experiment` writes): ``WORK/seed{N}/{source}-vector/`` and
``WORK/seed{N}/{target}-prediction_only/``; the test images come from `selfexplain.data.load_builtin_domain`.

    python benchmarks/vector_compression.py --work outputs/base12ep/work --config base12ep --pairs mnist:digits union:digits

Writes a Markdown table (with the command) to ``docs/results/vector_compression.md`` (``--output``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfexplain import ExplanationVector, VectorCompression, apply_explanation_vector
from selfexplain.experiments.experiment import Experiment, ExperimentConfig
from selfexplain.vectors.config import VECTOR_WEIGHTS_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SETTINGS = [
    "top_k:0.5",
    "top_k:0.2",
    "top_k:0.1",
    "top_k:0.05",
    "top_k:0.02",
    "low_rank:4",
    "low_rank:8",
    "low_rank:16",
    "dare:0.9",
    "low_rank:8+top_k:0.1",
]
#: The issue's goal: at least 10x smaller than the fp32 vector with at least 95 % of its faithfulness gain.
GOAL_RATIO, GOAL_KEPT = 10.0, 0.95


def _config_path(name: str) -> Path:
    if Path(name).is_file():
        return Path(name)
    return REPO_ROOT / "src" / "selfexplain" / "experiments" / "configs" / f"{name}.json"


def _score(experiment: Experiment, model, x, classes) -> float:
    """Insertion − deletion AUC of ``model``'s own map of ``classes`` (the experiment's scoring)."""
    maps = experiment.patch_map(model, x, classes, experiment.config.grid())
    auc = experiment.faithfulness(model, x, maps, classes)
    return auc["insertion"] - auc["deletion"]


def measure_pair(
    experiment: Experiment,
    work: Path,
    seed: int,
    source: str,
    target: str,
    settings: list[str],
    alpha: float | None,
) -> list[dict]:
    cfg = experiment.config
    vector_dir = work / f"seed{seed}" / f"{source}-vector"
    model = experiment.load(work / f"seed{seed}" / f"{target}-prediction_only")
    vector = ExplanationVector.from_pretrained(vector_dir)
    used_alpha = vector.recommended_alpha if alpha is None else alpha
    note = ""
    if used_alpha == 0.0:  # a zero α measures nothing: every setting would keep "0 of 0"
        used_alpha, note = 1.0, "recommended α is 0; α = 1 used"
    test = experiment.dataset(target, seed, "test", cfg.num_eval)
    x = experiment.pixels(test)
    with torch.inference_mode():
        classes = model(x, explain=None).logits.argmax(-1)
    unpatched = _score(experiment, model, x, classes)

    def gain_of(candidate: ExplanationVector) -> tuple[float, float]:
        patched = apply_explanation_vector(model, candidate, alpha=used_alpha).eval()
        with torch.inference_mode():
            kept = float((patched(x, explain=None).logits.argmax(-1) == classes).float().mean())
        return _score(experiment, patched, x, classes) - unpatched, kept

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        vector.save_pretrained(dense_dir, storage_dtype="float32", model_card=False)
        dense_bytes = (dense_dir / VECTOR_WEIGHTS_NAME).stat().st_size
        dense_gain, dense_kept = gain_of(ExplanationVector.from_pretrained(dense_dir))
        rows.append(
            _row(
                seed,
                source,
                target,
                "dense fp32",
                dense_bytes,
                dense_bytes,
                dense_gain,
                dense_gain,
                dense_kept,
                used_alpha,
                note,
            )
        )
        for setting in settings:
            kept_keys, save_kwargs = parse_setting(setting)
            candidate = vector
            if kept_keys is not None:
                tensors = {k: v for k, v in vector.tensors.items() if k.startswith(kept_keys)}
                if not tensors:
                    print(
                        f"seed {seed} {source}: {setting}: no {kept_keys}* tensors, skipped", file=sys.stderr
                    )
                    continue
                candidate = ExplanationVector(tensors, copy.deepcopy(vector.config))
            folder = Path(tmp) / setting.replace(":", "_").replace("+", "_")
            candidate.save_pretrained(folder, model_card=False, **save_kwargs)
            size = (folder / VECTOR_WEIGHTS_NAME).stat().st_size
            gain, kept = gain_of(ExplanationVector.from_pretrained(folder))
            rows.append(
                _row(
                    seed, source, target, setting, size, dense_bytes, gain, dense_gain, kept, used_alpha, note
                )
            )
    return rows


#: Setting words that are not compression: store the explanation extension alone (the backbone's deltas of a
#: vector trained with a frozen backbone are exactly zero), or store in half precision.
_KEY_PREFIXES = {"extension": "explainer."}
_STORAGE = {"fp16": "float16", "bf16": "bfloat16"}


def parse_setting(setting: str) -> tuple[str | None, dict]:
    """``"extension+fp16+low_rank:8"`` → (the key prefix kept, `save_pretrained` keyword arguments)."""
    prefix, kwargs, compression = None, {}, []
    for word in setting.split("+"):
        if word in _KEY_PREFIXES:
            prefix = _KEY_PREFIXES[word]
        elif word in _STORAGE:
            kwargs["storage_dtype"] = _STORAGE[word]
        else:
            compression.append(word)
    if compression:
        kwargs["compression"] = "+".join(compression)
        VectorCompression.parse(kwargs["compression"])
    return prefix, kwargs


def _row(seed, source, target, setting, size, dense_bytes, gain, dense_gain, kept, alpha, note) -> dict:
    return {
        "seed": seed,
        "pair": f"{source}→{target}",
        "setting": setting,
        "bytes": size,
        "ratio": dense_bytes / size,
        "gain": gain,
        "dense_gain": dense_gain,
        # The fraction is undefined when the dense vector gains nothing (or loses): reported as NaN.
        "kept_fraction": gain / dense_gain if dense_gain > 0 else math.nan,
        "top1_kept": kept,
        "alpha": alpha,
        "note": note,
    }


def _fmt(values: list[float], digits: int = 3) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f}"
    return f"{statistics.mean(finite):.{digits}f} ± {statistics.stdev(finite):.{digits}f}"


def render(rows: list[dict], command: str, elapsed: float) -> str:
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    notes = sorted({f"seed {r['seed']} {r['pair']}: {r['note']}" for r in rows if r["note"]})
    lines = [
        "# Compact storage of explanation vectors: size vs faithfulness gain",
        "",
        f"Produced by `{command}` in {elapsed / 60:.1f} min on {platform.machine()} (torch {torch.__version__}).",
        "",
        "Gain = (insertion − deletion AUC of the patched target's own map at the vector's recommended α) − (the same",
        "at α = 0), on the target's test images, classes = the unpatched target's predictions (as the experiment",
        "scores transfer). *Gain kept* = the compressed vector's gain / the dense fp32 vector's gain (n/a where the",
        "dense vector gains nothing). *Smaller* = dense fp32 weights file / compressed weights file (safetensors, with",
        f"its header). Seeds {seeds}: `mean ± std` over seeds. Goal (issue 15): ≥ {GOAL_RATIO:g}× smaller at ≥ "
        f"{GOAL_KEPT:.0%} of the gain.",
        "",
        "| pair | setting | size (KiB) | smaller | gain | gain kept | top-1 kept | goal met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        for setting in settings:
            chosen = [r for r in rows if r["pair"] == pair and r["setting"] == setting]
            if not chosen:
                continue
            kept = [r["kept_fraction"] for r in chosen]
            ratio = statistics.mean(r["ratio"] for r in chosen)
            finite = [k for k in kept if math.isfinite(k)]
            met = (
                "—"
                if not finite
                else ("yes" if ratio >= GOAL_RATIO and statistics.mean(finite) >= GOAL_KEPT else "no")
            )
            lines.append(
                f"| {pair} | {setting} | {statistics.mean(r['bytes'] for r in chosen) / 1024:.1f} | {ratio:.1f}× | "
                f"{_fmt([r['gain'] for r in chosen], 4)} | {_fmt(kept, 2)} | {_fmt([r['top1_kept'] for r in chosen], 3)} | {met} |"
            )
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    lines += [
        "",
        "Settings: `top_k:d` keeps the fraction d of each tensor's largest-magnitude entries (int16/32 indices +",
        "fp32 values); `dare:p` drops each entry with probability p and rescales the rest by 1/(1 − p) (seed 0);",
        "`low_rank:r` stores each matrix as a rank-r truncated SVD (biases and LayerNorm dense); `+` combines a",
        "low-rank setting for the matrices with a sparse one for the other tensors (docs/design.md §8); `extension`",
        "stores the explanation extension's tensors alone (`explainer.*`: a vector whose backbone was frozen has",
        "all-zero backbone deltas), `fp16` / `bf16` store in half precision.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, default=Path("outputs/base12ep/work"), help="the experiment's work folder"
    )
    parser.add_argument(
        "--config", default="base12ep", help="experiment config (name or JSON file): grid, AUC steps"
    )
    parser.add_argument(
        "--pairs", nargs="+", default=None, help="source:target pairs (default: the config's)"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="default: every seedN folder of --work"
    )
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="compression settings")
    parser.add_argument(
        "--num-eval", type=int, default=None, help="test images per target (default: config's)"
    )
    parser.add_argument("--alpha", type=float, default=None, help="default: each vector's recommended α")
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "docs" / "results" / "vector_compression.md"
    )
    args = parser.parse_args(argv)
    for setting in args.settings:
        parse_setting(setting)  # refuse a typo before hours of work
    overrides = {"output_dir": str(args.work.parent), "num_eval": args.num_eval}
    config = ExperimentConfig.from_json_file(_config_path(args.config), **overrides)
    experiment = Experiment(config, log=lambda message: None)
    seeds = args.seeds or sorted(int(p.name[4:]) for p in args.work.glob("seed*") if p.name[4:].isdigit())
    pairs = [tuple(p.split(":")) for p in args.pairs] if args.pairs else config.pair_list()
    started, rows = time.perf_counter(), []
    for seed in seeds:
        for source, target in pairs:
            if not (args.work / f"seed{seed}" / f"{source}-vector").is_dir():
                print(f"seed {seed}: no {source}-vector, skipped", file=sys.stderr)
                continue
            print(f"seed {seed}: {source} -> {target}", file=sys.stderr)
            rows += measure_pair(experiment, args.work, seed, source, target, args.settings, args.alpha)
    if not rows:
        print("nothing measured: no vectors found", file=sys.stderr)
        return 1
    command = "python benchmarks/vector_compression.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(rows, command.strip(), time.perf_counter() - started))
    args.output.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
