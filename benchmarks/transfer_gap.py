"""Where does a transferred explanation lose its fidelity: the shift in images, or the shift in backbone?

Built on a finished suite (`selfexplain experiment --config base12ep`; `--suites` adds others trained on the same
classifiers, e.g. `extension_representation`). Per seed it takes the two frozen classifiers of one transfer pair —
the source's (MNIST) and the target's (`digits`), both fine-tuned from the same θ0 — and crosses them with both
image sets, a 2×2:

| classifier ↓ / images → | source images | target images |
|---|---|---|
| source | in-domain | image shift only |
| target | backbone shift only | transfer (what a user gets) |

On every cell it scores two explanation extensions added at α = 1 — the source's (the suite's vector) and the
target's own (the suite's oracle: the same recipe trained on the target's frozen classifier) — and attention
rollout, against a Kernel SHAP reference of *that cell's* classifier on *those* images (the suite's budget and
reference seed; the two diagonal cells are the suite's own references, read from its cache). The maps explain the
classifier's predicted class. Reading it: a source extension that stays good under "image shift only" and drops
under "backbone shift only" is lost to the backbone, and the reverse to the images; the oracle extension run
backwards (on the source classifier) says whether the loss is symmetric.

    python benchmarks/transfer_gap.py                       # writes docs/results/transfer_gap.md (+ .json)
    python benchmarks/transfer_gap.py --suites base12ep extension_representation

Per-seed results are cached under `outputs/transfer_gap/` (a rerun with the same models only renders; the record
names the weight files it read by hash, and a retrained suite is recomputed); Kernel SHAP values go to the
suite's cache. Each new reference (the two off-diagonal cells) costs `reference_budget` evaluations on 48 images.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from _suite import experiment, read_record, require, write_outputs, write_record

ROOT = Path(__file__).resolve().parents[1]
SOURCE, TARGET = "mnist", "digits"
CELLS = (
    ("source", SOURCE, "in-domain"),
    ("source", TARGET, "image shift only"),
    ("target", SOURCE, "backbone shift only"),
    ("target", TARGET, "transfer"),
)


def _inputs(seed: int, suites: list[str]) -> dict[str, str]:
    """SHA-256 of every weight file a seed's cells read: a cached record is reused only for the same models (a
    suite retrained under the same name must not be reported from the record of its former models)."""
    import hashlib

    files = {}
    for index, suite in enumerate(suites):
        work = experiment(suite).work / f"seed{seed}"
        names = [f"{SOURCE}-vector", f"{TARGET}-self_explaining", f"{TARGET}-prediction_only"]
        names += [f"{SOURCE}-prediction_only"] if index == 0 else []
        for name in names:
            for path in sorted(require(work / name, suite).glob("*.safetensors")):
                files[f"{suite}/{name}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def run_seed(seed: int, suites: list[str], cache: Path) -> dict[str, Any]:
    """The 2×2 for one seed: {cell: {"rollout": scores, "<suite>/source": scores, "<suite>/oracle": scores}}."""
    record = cache / f"seed{seed}-{'+'.join(suites)}.json"
    inputs = _inputs(seed, suites)
    cached = read_record(record, inputs)
    if cached is not None:
        return cached
    import torch

    from selfexplain import ExplanationVector, apply_explanation_vector
    from selfexplain.evaluation import explainers
    from selfexplain.experiments.experiment import _as_plain_classifier, agreement
    from selfexplain.modeling_self_explaining_vit import pool_to_player_grid

    torch.set_num_threads(1)
    main = experiment(suites[0])  # classifiers, images and references: the first suite's
    cfg, grid = main.config, main.config.grid()
    work = {suite: experiment(suite).work / f"seed{seed}" for suite in suites}
    classifiers = {
        "source": main.load(require(work[suites[0]] / f"{SOURCE}-prediction_only", suites[0])),
        "target": main.load(require(work[suites[0]] / f"{TARGET}-prediction_only", suites[0])),
    }
    extensions = {}
    for suite in suites:
        extensions[f"{suite}/source"] = ExplanationVector.from_pretrained(
            require(work[suite] / f"{SOURCE}-vector", suite)
        )
        oracle = main.load(require(work[suite] / f"{TARGET}-self_explaining", suite))
        target = main.load(work[suite] / f"{TARGET}-prediction_only")
        extensions[f"{suite}/oracle"] = ExplanationVector.from_models(
            self_explaining=oracle, prediction_only=target
        )
    images = {
        domain: main.pixels(main.dataset(domain, seed, "test", cfg.num_eval))[: cfg.num_reference]
        for domain in (SOURCE, TARGET)
    }
    out: dict[str, Any] = {"cka": {domain: _layer_cka(classifiers, images[domain]) for domain in images}}
    for host, domain, cell in CELLS:
        model, x = classifiers[host], images[domain]
        with torch.inference_mode():
            classes = model(x, explain=None).logits.argmax(-1)
        rows = torch.arange(len(x))
        reference = main.kernel_shap(model, x, cfg.reference_budget, 10_000 + seed)[rows, classes]

        def score(maps, model=model, x=x, classes=classes, reference=reference) -> dict[str, float]:
            faith = main.faithfulness(model, x, maps, classes)
            return {"pearson": agreement(maps, reference)["pearson"], **faith}

        entry = {
            "rollout": score(
                pool_to_player_grid(explainers.attention_rollout(_as_plain_classifier(model), x), grid)
            )
        }
        for name, vector in extensions.items():
            patched = apply_explanation_vector(model, vector, alpha=1.0).eval()
            entry[name] = score(main.patch_map(patched, x, classes, grid))
        out[cell] = entry
    write_record(record, out, inputs)
    return out


def _layer_cka(classifiers: dict[str, Any], x) -> list[float]:
    """Linear CKA between the two classifiers' patch tokens at each depth (0: the embeddings, last: the last
    block's output before the final layer norm) on the same images: how far fine-tuning moved the backbones apart."""
    import torch

    with torch.inference_mode():
        source, target = (
            classifiers[name].vit(x, output_hidden_states=True).hidden_states for name in ("source", "target")
        )
    values = []
    for a, b in zip(source, target, strict=True):
        a = a[:, 1:].reshape(-1, a.shape[-1]).double()
        b = b[:, 1:].reshape(-1, b.shape[-1]).double()
        a, b = a - a.mean(0), b - b.mean(0)
        values.append(float((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm())))
    return values


def _stat(values: list[float]) -> str:
    v = np.asarray(values)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def report(results: dict[int, dict[str, Any]], args, wall_s: float) -> str:
    seeds = sorted(results)
    maps = list(next(iter(results.values()))["in-domain"])
    cfg = experiment(args.suites[0]).config
    command = (
        "python benchmarks/transfer_gap.py"
        + (f" --suites {' '.join(args.suites)}" if args.suites != ["base12ep"] else "")
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else "")
    )
    names = {
        "rollout": "attention rollout (no training)",
        **{f"{s}/source": f"`{s}`: the source's extension (the vector)" for s in args.suites},
        **{f"{s}/oracle": f"`{s}`: the target's own extension (oracle)" for s in args.suites},
    }
    lines = [
        "# Where transfer loses fidelity: image shift vs backbone shift",
        "",
        f"Produced by `{command}` on top of `selfexplain experiment --config {args.suites[0]}`; this invocation's "
        f"wall time {wall_s / 60:.1f} min (finished seeds are read back); seeds {seeds}. Source `{SOURCE}`, target "
        f"`{TARGET}`: each cell is one of the two frozen classifiers (both fine-tuned from the seed's θ0) on one of "
        f"the two image sets (the first {cfg.num_reference} test images of the suite's evaluation set), explained "
        "for its predicted class. Pearson: agreement with a Kernel SHAP reference of that classifier on those images "
        f"(budget {cfg.reference_budget}, the suite's reference seed); ins − del: insertion − deletion AUC "
        f"({cfg.auc_steps} steps, same images). Extensions are added at α = 1. Mean ± std over seeds.",
        "",
    ]

    def table(title: str, value) -> None:
        """A mean ± std table over seeds: one row per map, one column per cell."""
        lines.extend(
            [title, "", "| map | " + " | ".join(c for _, _, c in CELLS) + " |", "|---|" + "---|" * len(CELLS)]
        )
        for name in maps:
            row = [_stat([value(results[s][cell][name]) for s in seeds]) for _, _, cell in CELLS]
            lines.append(f"| {names.get(name, name)} | " + " | ".join(row) + " |")
        lines.append("")

    table("Pearson with the cell's reference:", lambda scores: scores["pearson"])
    table("Insertion − deletion (higher is better):", lambda scores: scores["insertion"] - scores["deletion"])
    lines.pop()  # the blank line the next section starts with
    lines += [
        "",
        "Pearson lost from each extension's home cell (the classifier and images it was trained on: `in-domain` "
        "for the source's, `transfer` for the oracle, whose columns above read from the source's side): with the "
        "images changed and the classifier kept, with the classifier changed and the images kept, and both.",
        "",
        "| extension | home | images changed | classifier changed | both |",
        "|---|---|---|---|---|",
    ]
    for name in maps:
        if name == "rollout":
            continue
        home = ("source", SOURCE) if name.endswith("/source") else ("target", TARGET)
        other = {"source": "target", "target": "source"}
        other_images = {SOURCE: TARGET, TARGET: SOURCE}
        cell_of = {(host, domain): cell for host, domain, cell in CELLS}
        cells = [
            cell_of[home],
            cell_of[(home[0], other_images[home[1]])],
            cell_of[(other[home[0]], home[1])],
            cell_of[(other[home[0]], other_images[home[1]])],
        ]
        at_home = [results[s][cells[0]][name]["pearson"] for s in seeds]
        row = [_stat(at_home)]
        for cell in cells[1:]:
            row.append(
                _stat([h - results[s][cell][name]["pearson"] for h, s in zip(at_home, seeds, strict=True)])
            )
        lines.append(f"| {names.get(name, name)} | " + " | ".join(row) + " |")
    depths = len(results[seeds[0]]["cka"][SOURCE])
    lines += [
        "",
        "How far apart the two classifiers' backbones are: linear CKA of their patch tokens on the same images, by "
        "depth (0: the embeddings; the last: the last block's output, which the extension reads after the final "
        "layer norm). 1 = the same representation up to rotation and scale.",
        "",
        "| images | " + " | ".join(f"depth {d}" for d in range(depths)) + " |",
        "|---|" + "---|" * depths,
    ]
    for domain in (SOURCE, TARGET):
        row = [_stat([results[s]["cka"][domain][d] for s in seeds]) for d in range(depths)]
        lines.append(f"| {domain} | " + " | ".join(row) + " |")
    lines += ["", "Per seed (Pearson):", "", "| seed | map | " + " | ".join(c for _, _, c in CELLS) + " |"]
    lines.append("|---|---|" + "---|" * len(CELLS))
    for s in seeds:
        for name in maps:
            row = [f"{results[s][cell][name]['pearson']:.3f}" for _, _, cell in CELLS]
            lines.append(f"| {s} | {names.get(name, name)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suites",
        nargs="+",
        default=["base12ep"],
        help="Suites whose extensions are scored; the first one's classifiers, images and references are used "
        "(the others must be trained on copies of the same classifiers).",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "outputs" / "transfer_gap")
    parser.add_argument("--report", default=str(ROOT / "docs" / "results" / "transfer_gap"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = {seed: pool.submit(run_seed, seed, args.suites, args.cache) for seed in args.seeds}
        results = {seed: future.result() for seed, future in futures.items()}
    wall = time.perf_counter() - started
    text = report(results, args, wall)
    write_outputs(args.report, text, {"results": {str(k): v for k, v in results.items()}, "wall_s": wall})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
