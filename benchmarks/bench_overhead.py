"""Section 1: what the explanation costs on top of the forward pass of the same ViT.

``ViTForSelfExplainingClassification`` with the map of the predicted class (and of all classes) against
``ViTForImageClassification`` holding the very same weights, batch 1 and 32, under ``torch.inference_mode``.
Besides the end-to-end ratio (noisy on a shared machine) the extra work is timed in isolation: the classifier
rows of the requested classes applied to the patch tokens, exactly what the self-explaining forward adds.
"""

from __future__ import annotations

import torch
from _common import (
    VIT_B16,
    VIT_TINY16_HALF,
    Goal,
    SectionResult,
    Table,
    build_classifier,
    describe,
    fmt_percent,
    fmt_seconds,
    interleaved_times,
    median,
    on_device,
    sample_images,
    vit_config,
)

from selfexplain import ViTForSelfExplainingClassification

GOAL = 0.02  # ≤ 2 % extra time


def run(quick: bool) -> SectionResult:
    settings = VIT_TINY16_HALF if quick else VIT_B16
    num_labels = 1000
    # batch: (timed rounds, warm-up rounds). Batch 32 of ViT-B costs 5-20 s a call on 2 shared cores.
    # Batch 1 is fast but noisy here (±10 % between calls): many rounds make the median of paired ratios stable.
    batches = {1: (3, 3), 4: (2, 1)} if quick else {1: (31, 2), 32: (4, 0)}
    section = SectionResult(
        "overhead",
        "1. Explanation overhead of the single forward pass",
        setup=[
            f"{'ViT-Tiny-width (quick run)' if quick else 'ViT-B/16'} config ({describe(settings)}), "
            f"{num_labels} classes, random weights, float32, `torch.inference_mode()`, SDPA attention.",
            "Both models hold the same state dict; `ViTForImageClassification(x)` vs "
            "`ViTForSelfExplainingClassification(x, explain=...)`. At batch 1 a control runs the self-explaining "
            "model with `explain=None` (no map): its ratio to the plain model shows this machine's noise.",
            "End-to-end extra = median over rounds of (time / plain time of the same round) − 1, with the range over "
            "rounds. Isolated head = class selection + `_score_patches` on the model's real patch tokens (the only "
            "extra computation of the forward), median of many calls, divided by the plain forward's median.",
            "Verdict: met when the end-to-end median is ≤ 2 %, or when the head alone is ≤ 2 % and the best round "
            "or the fastest-vs-fastest ratio is ≤ 2 % (the median's excess is then run-to-run noise, visible in the "
            "range); unresolved when the head alone is ≤ 2 % but no end-to-end estimate is (noise beyond what the "
            "run can resolve); not met otherwise.",
        ],
    )
    plain = build_classifier(settings, num_labels)
    ours = on_device(ViTForSelfExplainingClassification(vit_config(settings, num_labels)).eval())
    ours.load_state_dict(plain.state_dict(), strict=True)
    patches = (settings["image_size"] // settings["patch_size"]) ** 2
    head_flops = {
        "predicted": patches * settings["hidden_size"],
        "all": patches * settings["hidden_size"] * num_labels,
    }
    forward_flops = _forward_macs(settings, patches)

    table = Table(
        "Forward time per batch (median) and extra time vs the plain classifier: median [range over rounds]",
        [
            "batch",
            "rounds",
            "plain ViTForImageClassification",
            "explain=None (control)",
            "predicted class",
            "all 1000 classes",
        ],
    )
    head = Table(
        "Isolated cost of the explanation head (share of the plain forward's median)",
        [
            "batch",
            "predicted class",
            "all 1000 classes",
            "all classes as one `F.linear` (not in the model; for comparison)",
        ],
    )
    for batch, (rounds, warmup) in batches.items():
        pixel_values = sample_images(batch, settings["image_size"], seed=batch)
        with torch.inference_mode():
            difference = plain(pixel_values=pixel_values).logits - ours(pixel_values=pixel_values).logits
        section.notes.append(
            f"batch {batch}: max |logits(plain) − logits(ours)| = {float(difference.abs().max()):.2e}."
        )
        functions = {
            "plain": _forward(plain, pixel_values),
            "none": _forward(ours, pixel_values, explain=None),
            "predicted": _forward(ours, pixel_values, explain="predicted"),
            "all": _forward(ours, pixel_values, explain="all"),
        }
        if batch > 4:
            functions.pop("none")
        times = interleaved_times(functions, rounds=rounds, warmup=warmup)
        ratios = {
            name: [a / b - 1.0 for a, b in zip(times[name], times["plain"], strict=True)]
            for name in times
            if name != "plain"
        }
        table.add(
            batch,
            rounds,
            fmt_seconds(median(times["plain"])),
            *(
                f"{fmt_seconds(median(times[name]))}: {_extra(ratios[name])}" if name in ratios else "—"
                for name in ("none", "predicted", "all")
            ),
        )
        isolated = _isolated_head_cost(ours, pixel_values, calls=50 if batch <= 4 else 10)
        head_share = {name: isolated[name] / median(times["plain"]) for name in isolated}
        head.add(
            batch,
            *(
                f"{fmt_seconds(isolated[name])} ({fmt_percent(head_share[name])})"
                for name in ("predicted", "all", "all_linear")
            ),
        )
        for name, label in (("predicted", "predicted class"), ("all", f"all {num_labels} classes")):
            flop_share = head_flops[name] / forward_flops
            fastest = min(times[name]) / min(times["plain"]) - 1.0
            section.goals.append(
                _goal(
                    f"overhead, {label}, batch {batch}", ratios[name], fastest, head_share[name], flop_share
                )
            )
    section.tables += [table, head]
    section.notes.append(
        f"Extra multiply-adds per image: predicted class N·D = {patches}·{settings['hidden_size']} "
        f"≈ {head_flops['predicted'] / 1e6:.2f} M; all classes N·D·K ≈ {head_flops['all'] / 1e9:.2f} G; "
        f"the forward pass itself ≈ {forward_flops / 1e9:.1f} G."
    )
    return section


def _forward(model, pixel_values: torch.Tensor, **kwargs):
    def call():
        with torch.inference_mode():
            return model(pixel_values=pixel_values, **kwargs)

    return call


def _extra(ratios: list[float]) -> str:
    return f"{fmt_percent(median(ratios))} [{fmt_percent(min(ratios))}, {fmt_percent(max(ratios))}]"


def _isolated_head_cost(
    model: ViTForSelfExplainingClassification, pixel_values: torch.Tensor, calls: int
) -> dict[str, float]:
    with torch.inference_mode():
        tokens = model.vit(pixel_values).last_hidden_state
        logits = model.classifier(tokens[:, 0])
    patch_tokens, grid = tokens[:, 1:], model.patch_grid(pixel_values)

    def head(explain):
        def call():
            with torch.inference_mode():
                classes = model._resolve_explained_classes(explain, logits)
                return model._score_patches(patch_tokens, classes, grid)

        return call

    def all_classes_linear():
        # What "all" could cost: one GEMM against the classifier weight, without gathering a (B, K, D) copy of it.
        with torch.inference_mode():
            scores = torch.nn.functional.linear(patch_tokens, model.classifier.weight, model.classifier.bias)
            return scores.transpose(1, 2).reshape(scores.shape[0], -1, *grid)

    times = interleaved_times(
        {"predicted": head("predicted"), "all": head("all"), "all_linear": all_classes_linear},
        rounds=calls,
        warmup=2,
    )
    return {name: median(values) for name, values in times.items()}


def _goal(name: str, ratios: list[float], fastest: float, head_share: float, flop_share: float) -> Goal:
    extra, best = median(ratios), min(ratios)
    measured = (
        f"{fmt_percent(extra)} end to end (best round {fmt_percent(best)}, fastest vs fastest "
        f"{fmt_percent(fastest)}); head alone {fmt_percent(head_share)}"
    )
    target = "≤ 2 % extra time"
    if extra <= GOAL:
        return Goal(name, target, measured, True)
    if head_share > GOAL:
        reason = (
            f"the extra computation itself costs {fmt_percent(head_share)} "
            f"({flop_share * 100:.1f} % of the forward's multiply-adds)"
        )
        return Goal(name, target, measured, False, f"gap {fmt_percent(extra - GOAL)}; {reason}")
    if min(best, fastest) <= GOAL:
        return Goal(
            name,
            target,
            measured,
            True,
            f"the median's {fmt_percent(extra - GOAL)} above the goal is run-to-run noise: the extra computation "
            f"costs {fmt_percent(head_share)} and the least disturbed estimate {fmt_percent(min(best, fastest))}",
        )
    return Goal(
        name,
        target,
        measured,
        None,
        f"the extra computation costs {fmt_percent(head_share)}, but every end-to-end estimate is ≥ "
        f"{fmt_percent(min(best, fastest))}: load from other processes changed between the calls of a round "
        "(compare the range); rerun on a quiet machine",
    )


def _forward_macs(settings: dict, patches: int) -> float:
    """Multiply-adds of one image's ViT forward pass (patch embedding, attention, MLP; norms ignored)."""
    tokens, width, hidden = patches + 1, settings["hidden_size"], settings["intermediate_size"]
    per_layer = tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width
    embed = patches * 3 * settings["patch_size"] ** 2 * width
    return settings["num_hidden_layers"] * per_layer + embed
