"""Section 7: cheaper evaluations for ViTs: token dropping versus baseline filling.

``kernel_shap_values(..., removal="tokens")`` evaluates a coalition by running the ViT on the CLS token and the
kept patch tokens only; ``removal="baseline"`` (the default) runs the whole baseline-filled image. Both use the
same Kernel SHAP coalitions (same seed), so the difference in time is the value function's. The section measures
evaluations/s end to end (sampling, evaluations and fit) at 64 and 196 players; then the value function alone over
the same coalitions, against token dropping by attention masking (full sequences), bfloat16 and
``torch.compile``; and, on a trained classifier when one is present, how far apart the two removals' attributions
are (they are different value functions).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_removal.py           # this section alone, as Markdown
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_removal.py --quick   # smoke run
    python benchmarks/bench_removal.py --device cuda                      # on a GPU
    python benchmarks/run_all.py --only removal --output build/removal.md  # the same through run_all
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import (
    REPO_ROOT,
    VIT_MICRO16,
    VIT_SMALL32,
    VIT_TINY16_HALF,
    Goal,
    SectionResult,
    Table,
    build_classifier,
    describe,
    device,
    device_description,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    interleaved_times,
    median,
    on_device,
    paired_ratio,
    sample_images,
    set_device,
    time_once,
)

from selfexplain.attribution import shapley, token_dropping
from selfexplain.attribution.shapley import kernel_shap_values
from selfexplain.attribution.token_dropping import embed_patch_tokens, token_dropping_values

GOAL, GOAL_PLAYERS = 1.8, 64  # token dropping ≥ 1.8× the evaluations/s of baseline filling at 64 players
BATCH_SIZE = 256
NUM_LABELS = 10
#: A trained 8x8-patch classifier of the full experiment (λ = 0), used when present for the fidelity comparison.
FIDELITY_MODEL = REPO_ROOT / "outputs/full/work/seed0/mnist-prediction_only"
FIDELITY_IMAGES, FIDELITY_BUDGET = 16, 2048


@dataclass(frozen=True, eq=False)  # hashed by identity: a dict key of the run
class Case:
    """A model size and the Kernel SHAP workload timed on it (players = its patches)."""

    settings: Mapping[str, int]
    num_images: int
    budget: int

    @property
    def grid(self) -> tuple[int, int]:
        side = self.settings["image_size"] // self.settings["patch_size"]
        return side, side

    @property
    def num_players(self) -> int:
        return self.grid[0] * self.grid[1]


FULL_CASES = (Case(VIT_SMALL32, 2, 2048), Case(VIT_TINY16_HALF, 1, 256))
QUICK_CASES = (Case(VIT_MICRO16, 2, 256),)


def run(quick: bool) -> SectionResult:
    cases = QUICK_CASES if quick else FULL_CASES
    rounds = 1 if quick else 3
    section = SectionResult(
        "removal",
        "7. Cheaper evaluations: token dropping versus baseline filling",
        setup=[
            f"{'Quick run: ' if quick else ''}players = the model's patches; random weights, {NUM_LABELS} "
            f"classes, photo crops, value = softmax probabilities, batch_size {BATCH_SIZE}, float32, "
            f"{torch.get_num_threads()} torch threads{_device_text()}. Models: "
            + "; ".join(f"{case.num_players} players: ViT {describe(case.settings)}" for case in cases)
            + ".",
            "Both removals evaluate the same Kernel SHAP coalitions (same seed; paired sampling, so a coalition and "
            "its complement keep n tokens between them). Baseline filling runs n + 1 tokens per evaluation; token "
            "dropping runs 1 + |S| (coalitions grouped by size into dense batches of at most "
            f"{BATCH_SIZE} × (n + 1) tokens).",
            f"Rounds: {rounds} interleaved, after one untimed warm-up call each. Times are wall-clock medians; "
            "'CPU' columns are medians of process CPU seconds, which measure the work when other processes "
            "share the cores (wall time then also measures the waiting).",
        ],
    )
    if device().type != "cpu":
        section.setup.append(
            "On the GPU: models, images, the embedded tokens and every forward pass run on the device; the Kernel "
            "SHAP coalitions are sampled on the CPU (the library's per-image CPU generators) and copied over, the "
            "values come back to the CPU as float64 for the least-squares fit (on the CPU, as in the library). "
            "The 'CPU' columns then count the host's share only (launching kernels, waiting for the device), "
            "so the wall-time columns are the ones to read."
        )
    coalitions = {case: kernel_shap_coalitions(case.num_images, case.grid, case.budget) for case in cases}
    section.tables.append(_end_to_end_table(cases, coalitions, rounds, section))
    first = cases[0]
    section.tables.append(_value_function_table(first, coalitions[first], rounds, section))
    if not quick:
        section.tables.append(_variants_table(first, coalitions[first], section))
        fidelity = _fidelity_table(section)
        if fidelity is not None:
            section.tables.append(fidelity)
    return section


# --------------------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------------------


def kernel_shap_coalitions(
    num_images: int, grid: tuple[int, int], budget: int, seed: int = 0
) -> torch.Tensor:
    """The ``(num_images, M, n)`` coalitions ``kernel_shap_values(..., seed=seed)`` evaluates for this budget.

    Captured from its value step (no model is run), so they are exactly the design of the library, whatever its
    sampler is.
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(model, pixel_values, coalitions, *args, **kwargs) -> torch.Tensor:
        captured["coalitions"] = coalitions.clone()
        return torch.zeros(*coalitions.shape[:2], 1, dtype=torch.float64)

    with _patched(shapley, "_coalition_values", capture):
        blank = torch.zeros(num_images, 3, *grid)
        kernel_shap_values(lambda x: x, blank, grid=grid, budget=budget, seed=seed)
    return captured["coalitions"]


def _case_inputs(case: Case) -> tuple[torch.nn.Module, torch.Tensor]:
    model = build_classifier(case.settings, NUM_LABELS)
    return model, sample_images(case.num_images, case.settings["image_size"], seed=7)


def _mean_tokens(coalitions: torch.Tensor) -> float:
    """Mean tokens per token-dropping evaluation: the CLS token plus the kept patches."""
    return 1.0 + float(coalitions.sum(-1).double().mean())


# --------------------------------------------------------------------------------------------------------
# End to end: kernel_shap_values with either removal
# --------------------------------------------------------------------------------------------------------


def _end_to_end_table(
    cases: tuple[Case, ...], coalitions: Mapping[Case, torch.Tensor], rounds: int, section: SectionResult
) -> Table:
    table = Table(
        "Kernel SHAP end to end (sampling, evaluations, fit), same coalitions for both removals",
        [
            "players",
            "removal",
            "evaluations",
            "tokens / evaluation",
            "time",
            "evaluations/s",
            "speed-up (wall)",
            "speed-up (CPU)",
        ],
    )
    for index, case in enumerate(cases):
        model, pixel_values = _case_inputs(case)

        def estimate(removal: str, model=model, pixel_values=pixel_values, case=case) -> torch.Tensor:
            return kernel_shap_values(
                model,
                pixel_values,
                grid=case.grid,
                budget=case.budget,
                batch_size=BATCH_SIZE,
                removal=removal,
            )

        functions = {"baseline": lambda: estimate("baseline"), "tokens": lambda: estimate("tokens")}
        cpu: dict[str, list[float]] = {}
        times = interleaved_times(functions, rounds=rounds, cpu_times=cpu)
        evaluations = coalitions[case].shape[0] * coalitions[case].shape[1]
        tokens = {"baseline": case.num_players + 1.0, "tokens": _mean_tokens(coalitions[case])}
        wall_ratio = paired_ratio(times["baseline"], times["tokens"])
        cpu_ratio = paired_ratio(cpu["baseline"], cpu["tokens"])
        for removal in functions:
            elapsed = median(times[removal])
            is_tokens = removal == "tokens"
            table.add(
                case.num_players,
                f"`{removal}`",
                evaluations,
                f"{tokens[removal]:.1f}",
                fmt_seconds(elapsed),
                fmt_rate(evaluations / elapsed),
                fmt_ratio(wall_ratio) if is_tokens else "—",
                fmt_ratio(cpu_ratio) if is_tokens else "—",
            )
        if index == 0:
            section.goals.append(_goal(case, wall_ratio, cpu_ratio))
        section.notes.append(
            f"{case.num_players} players: token dropping runs {fmt_ratio(tokens['baseline'] / tokens['tokens'])} "
            f"fewer tokens per evaluation; measured {fmt_ratio(wall_ratio)} (wall) and {fmt_ratio(cpu_ratio)} "
            "(CPU) the evaluations/s of baseline filling."
        )
    return table


def _goal(case: Case, wall_ratio: float, cpu_ratio: float) -> Goal:
    met_wall, met_cpu = wall_ratio >= GOAL, cpu_ratio >= GOAL
    explanation = ""
    if case.num_players != GOAL_PLAYERS:
        met_wall = met_cpu = None
        explanation = f"smoke run at {case.num_players} players; the goal is stated at {GOAL_PLAYERS}"
    elif met_wall != met_cpu:
        explanation = "wall and CPU ratios disagree (load from other processes): rerun on a quiet machine"
    elif not met_wall:
        explanation = (
            "paired sampling keeps n tokens per coalition pair, so token dropping halves the tokens at best; "
            "per-pass overheads of small size groups eat into that"
        )
    return Goal(
        f"token dropping vs baseline filling, {case.num_players} players",
        f"≥ {GOAL:g}× evaluations/s",
        f"{fmt_ratio(wall_ratio)} wall, {fmt_ratio(cpu_ratio)} CPU",
        met_wall if met_wall == met_cpu else None,
        explanation,
    )


# --------------------------------------------------------------------------------------------------------
# The value function alone: dense batches by size versus attention masking
# --------------------------------------------------------------------------------------------------------


def attention_mask_values(
    model: torch.nn.Module, pixel_values: torch.Tensor, coalitions: torch.Tensor, batch_size: int = BATCH_SIZE
) -> torch.Tensor:
    """Token dropping by attention masking: every coalition runs all ``n + 1`` tokens, and a key mask hides the
    removed ones from every query. The CLS output (and so the value) equals dropping the tokens; the cost is that
    of the full sequence. Runs where the model lives; returns probabilities ``(B, M, C)`` float64 on the CPU."""
    from transformers.masking_utils import create_bidirectional_mask

    num_images, num_coalitions, num_players = coalitions.shape
    where = next(model.parameters()).device
    flat = coalitions.reshape(-1, num_players).to(where)
    values = []
    with torch.inference_mode():
        tokens = embed_patch_tokens(model, pixel_values.to(where))
        for rows in torch.arange(len(flat), device=where).split(batch_size):
            hidden = tokens[rows // num_coalitions]
            keep = torch.cat([torch.ones(len(rows), 1, dtype=torch.bool, device=where), flat[rows]], dim=1)
            mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=keep)
            for layer in model.vit.layers:
                hidden = layer(hidden, mask)
            logits = model.classifier(model.vit.layernorm(hidden[:, 0]))
            values.append(logits.float().softmax(-1))
    # float64 on the CPU, like the library's value functions (`token_dropping_values`, `_coalition_values`).
    return torch.cat(values).to(device="cpu", dtype=torch.float64).view(num_images, num_coalitions, -1)


def _baseline_values(model: Callable, pixel_values: torch.Tensor, coalitions: torch.Tensor) -> torch.Tensor:
    """The library's baseline-filling value step (mean-colour baseline, probabilities)."""
    grid = (round(coalitions.shape[-1] ** 0.5),) * 2
    return shapley._coalition_values(
        model, pixel_values, coalitions, grid, "mean", BATCH_SIZE, "probs", False
    )


def _value_function_table(case: Case, coalitions: torch.Tensor, rounds: int, section: SectionResult) -> Table:
    model, pixel_values = _case_inputs(case)
    functions = {
        "baseline filling (`shapley._coalition_values`)": lambda: _baseline_values(
            model, pixel_values, coalitions
        ),
        "**token dropping, dense batches by size** (`token_dropping_values`)": lambda: token_dropping_values(
            model, pixel_values, coalitions, BATCH_SIZE, "probs"
        ),
        "token dropping by attention masking (all n + 1 tokens, removed keys masked)": lambda: (
            attention_mask_values(model, pixel_values, coalitions)
        ),
    }
    names = list(functions)
    dense, masked = functions[names[1]](), functions[names[2]]()
    cpu: dict[str, list[float]] = {}
    times = interleaved_times(functions, rounds=rounds, warmup=0, cpu_times=cpu)  # warmed up above
    evaluations = coalitions.shape[0] * coalitions.shape[1]
    table = Table(
        f"Value function alone, {case.num_players} players: {evaluations} Kernel SHAP coalitions",
        ["implementation", "time", "evaluations/s", "× baseline filling (wall)", "× baseline filling (CPU)"],
    )
    for name in names:
        elapsed = median(times[name])
        table.add(
            name,
            fmt_seconds(elapsed),
            fmt_rate(evaluations / elapsed),
            fmt_ratio(paired_ratio(times[names[0]], times[name])),
            fmt_ratio(paired_ratio(cpu[names[0]], cpu[name])),
        )
    section.notes.append(
        "Dense batches by size and attention masking compute the same values (largest difference in a "
        f"probability: {float((dense - masked).abs().max()):.1e}); masking pays for the full sequence, dropping only "
        "for the kept tokens, so the library drops."
    )
    return table


# --------------------------------------------------------------------------------------------------------
# bfloat16 and torch.compile (quick measurements on a slice of the coalitions)
# --------------------------------------------------------------------------------------------------------


def _variants_table(case: Case, coalitions: torch.Tensor, section: SectionResult, rounds: int = 2) -> Table:
    """bfloat16 and ``torch.compile`` for both value functions, each against its float32 eager self."""
    model, pixel_values = _case_inputs(case)
    pixel_values, coalitions = pixel_values[:1], coalitions[:1, :512]
    bf16 = copy.deepcopy(model).to(torch.bfloat16)

    def tokens(chosen: torch.nn.Module) -> torch.Tensor:
        return token_dropping_values(chosen, pixel_values, coalitions, BATCH_SIZE, "probs")

    def baseline(chosen: Callable) -> torch.Tensor:
        return _baseline_values(chosen, pixel_values, coalitions)

    functions: dict[str, Callable[[], torch.Tensor]] = {
        "baseline, float32": lambda: baseline(model),
        "baseline, bfloat16": lambda: baseline(bf16),
        "tokens, float32": lambda: tokens(model),
        "tokens, bfloat16": lambda: tokens(bf16),
    }
    compile_seconds: dict[str, float] = {}
    compiled = _compiled_variants(model, baseline, tokens, compile_seconds, section)
    functions.update(compiled)
    reference = {"baseline": functions["baseline, float32"](), "tokens": functions["tokens, float32"]()}
    errors = {
        name: float((fn() - reference[name.split(",")[0]]).abs().max()) for name, fn in functions.items()
    }
    cpu: dict[str, list[float]] = {}
    times = interleaved_times(functions, rounds=rounds, warmup=0, cpu_times=cpu)
    evaluations = coalitions.shape[1]
    table = Table(
        f"bfloat16 and `torch.compile`, {case.num_players} players, {evaluations} coalitions of one image "
        f"(median of {rounds} rounds)",
        [
            "value function",
            "time",
            "× float32 eager (wall)",
            "× float32 eager (CPU)",
            "max |Δ prob|",
            "one-off compile",
        ],
    )
    for name in functions:
        own = f"{name.split(',')[0]}, float32"
        table.add(
            name,
            fmt_seconds(median(times[name])),
            fmt_ratio(paired_ratio(times[own], times[name])),
            fmt_ratio(paired_ratio(cpu[own], cpu[name])),
            f"{errors[name]:.1e}",
            fmt_seconds(compile_seconds[name]) if name in compile_seconds else "—",
        )
    if device().type == "cuda":
        hardware = (
            f"the GPU {'supports' if torch.cuda.is_bf16_supported() else 'lacks native'} bfloat16; "
            "`torch.compile` on the GPU generates Triton kernels"
        )
    else:
        hardware = f"the CPU has {'no ' if not _has_bf16_instructions() else ''}native bfloat16 instructions"
    section.notes.append(
        "bfloat16 and `torch.compile` are measured, not used: the library keeps float32 eager unless a variant "
        f"wins clearly once its one-off compile time is counted (see the table; {hardware})."
    )
    return table


def _compiled_variants(
    model: torch.nn.Module,
    baseline: Callable[[Callable], torch.Tensor],
    tokens: Callable[[torch.nn.Module], torch.Tensor],
    compile_seconds: dict[str, float],
    section: SectionResult,
) -> dict[str, Callable[[], torch.Tensor]]:
    """``torch.compile`` of the model's forward (baseline: fixed batch shapes) and of the encoder-and-head step of
    token dropping (``dynamic=True``: one sequence length per coalition size). Empty when compiling fails."""
    try:
        compiled_model = torch.compile(model)

        def compiled_logits(x: torch.Tensor) -> torch.Tensor:
            return compiled_model(pixel_values=x).logits

        compiled_head = torch.compile(token_dropping.kept_token_logits, dynamic=True)

        def compiled_tokens() -> torch.Tensor:
            with _patched(token_dropping, "kept_token_logits", compiled_head):
                return tokens(model)

        functions = {
            "baseline, torch.compile": lambda: baseline(compiled_logits),
            "tokens, torch.compile": compiled_tokens,
        }
        for name, function in functions.items():
            compile_seconds[name], _ = time_once(function)  # the first call compiles
        return functions
    except Exception as err:  # no C++ compiler, unsupported platform: report and go on
        section.notes.append(f"`torch.compile` not measured: {type(err).__name__}: {err}".splitlines()[0])
        return {}


def _device_text() -> str:
    """``""`` on the CPU (the text stays as it was), ``", on cuda:0 (NVIDIA ...)"`` elsewhere."""
    return "" if device().type == "cpu" else f", on {device_description()}"


def _has_bf16_instructions() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextlib.contextmanager
def _patched(module: object, name: str, value: object) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


# --------------------------------------------------------------------------------------------------------
# Fidelity: the two value functions on a trained classifier
# --------------------------------------------------------------------------------------------------------


def _fidelity_table(section: SectionResult) -> Table | None:
    """Pearson / Spearman between Kernel SHAP maps of the predicted class with either removal, beside the
    seed-to-seed agreement of each (its sampling noise), on MNIST test images and a trained classifier; and the
    share of each map's attribution mass that lies on the digit (patches with ink)."""
    from selfexplain import ViTForSelfExplainingClassification
    from selfexplain.evaluation.metrics import pearson, spearman

    if not (FIDELITY_MODEL / "model.safetensors").is_file():
        section.notes.append(f"Fidelity comparison skipped: no trained classifier at {FIDELITY_MODEL}.")
        return None
    model = on_device(ViTForSelfExplainingClassification.from_pretrained(FIDELITY_MODEL).eval())
    pixel_values, ink = _mnist_test_images(FIDELITY_IMAGES, FIDELITY_MODEL)
    pixel_values = on_device(pixel_values)
    grid = model.patch_grid(pixel_values)
    on_digit = torch.nn.functional.adaptive_max_pool2d(ink[:, None].float(), grid).flatten(1) > 0  # (B, n)
    with torch.inference_mode():
        predicted = model(pixel_values=pixel_values, explain=None).logits.argmax(-1).cpu()
    maps = {}
    for removal in ("baseline", "tokens"):
        for seed in (0, 1):
            phi = kernel_shap_values(
                model, pixel_values, grid=grid, budget=FIDELITY_BUDGET, seed=seed, removal=removal
            )
            maps[removal, seed] = phi.cpu()[torch.arange(len(phi)), predicted].flatten(1)  # maps on the CPU
    table = Table(
        f"Attributions of a trained classifier ({FIDELITY_MODEL.relative_to(REPO_ROOT)}, {grid[0]}×{grid[1]} "
        f"players), {FIDELITY_IMAGES} MNIST test images, budget {FIDELITY_BUDGET}, predicted class",
        [
            "pair",
            "Pearson (mean)",
            "Spearman (mean)",
            "sum of attributions (mean): first / second",
            "share of |φ| on the digit's patches: first / second",
        ],
    )
    pairs = {
        "tokens vs baseline (same coalitions, seed 0)": (("tokens", 0), ("baseline", 0)),
        "baseline seed 0 vs seed 1 (sampling noise)": (("baseline", 0), ("baseline", 1)),
        "tokens seed 0 vs seed 1 (sampling noise)": (("tokens", 0), ("tokens", 1)),
    }
    agreement = {}
    for label, (first, second) in pairs.items():
        a, b = maps[first], maps[second]
        agreement[label] = float(pearson(a, b).nanmean())
        table.add(
            label,
            f"{agreement[label]:.3f}",
            f"{float(spearman(a, b).nanmean()):.3f}",
            f"{float(a.sum(-1).mean()):+.3f} / {float(b.sum(-1).mean()):+.3f}",
            f"{_mass_share(a, on_digit):.2f} / {_mass_share(b, on_digit):.2f}",
        )
    cross, noise = agreement[next(iter(pairs))], min(list(agreement.values())[1:])
    digit_share = {removal: _mass_share(maps[removal, 0], on_digit) for removal in ("tokens", "baseline")}
    section.notes.append(
        f"Fidelity: tokens-vs-baseline Pearson {cross:.3f} against a seed-to-seed {noise:.3f} for the noisier "
        "removal: "
        + (
            "the removals disagree beyond sampling noise; they explain different value functions (what the "
            "model does without those patches' tokens, versus with those patches painted the mean colour), so "
            "token-dropping attributions are a different explanation, not a cheaper estimate of the same one. "
            if cross < noise - 0.05
            else "within sampling noise of each other on this model. "
        )
        + f"Share of the attribution mass on the digit's patches ({float(on_digit.float().mean()):.0%} of the "
        f"patches): {digit_share['tokens']:.2f} with token dropping, {digit_share['baseline']:.2f} with baseline "
        "filling."
    )
    return table


def _mass_share(maps: torch.Tensor, on_object: torch.Tensor) -> float:
    """Mean over images of the share of ``sum |φ|`` that lies on the object's players (``maps``: ``(B, n)``)."""
    magnitude = maps.abs()
    return float(((magnitude * on_object).sum(-1) / magnitude.sum(-1).clamp(min=1e-12)).mean())


def _mnist_test_images(count: int, model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` MNIST test images of the experiment's split (seed 0), preprocessed as the model's saved
    image processor says (rescale and normalise; the images already have the model's size), and their ink masks
    ``(count, H, W)`` bool."""
    import numpy as np

    from selfexplain.data.builtin_domains import load_builtin_domain

    processor = json.loads((model_dir / "preprocessor_config.json").read_text())
    test = load_builtin_domain("mnist", seed=0)["test"].select(range(count))
    images = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in test["image"]])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2) * processor["rescale_factor"]
    mean = torch.tensor(processor["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(processor["image_std"]).view(1, 3, 1, 1)
    masks = torch.from_numpy(np.stack([np.asarray(mask, dtype=bool) for mask in test["object_mask"]]))
    return (pixels - mean) / std, masks


# --------------------------------------------------------------------------------------------------------
# Standalone run
# --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_device(args.device)
    result = run(args.quick)
    print(f"## {result.title}\n")
    print("\n".join(f"- {item}" for item in result.setup))
    for table in result.tables:
        print("\n" + table.to_markdown())
    for goal in result.goals:
        print(
            f"\nGoal: {goal.name}: {goal.target}; measured {goal.measured}: {goal.verdict} {goal.explanation}"
        )
    print("\nNotes:\n\n" + "\n".join(f"- {note}" for note in result.notes))


if __name__ == "__main__":
    sys.exit(main())
