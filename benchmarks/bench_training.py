"""Section 5: the cost of the explanation loss in a training step (λ > 0 vs λ = 0, same batch).

A step is what ``selfexplain.training`` does per optimizer step: forward with ``explain=None``, backward,
gradient clipping, AdamW step, ``zero_grad``. λ = 0 passes no targets (as the training loop does); λ > 0 passes
all-class targets ``(batch, num_labels, gh, gw)``. Every variant trains its own copy of the same initial model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from _common import (
    VIT_MICRO16,
    VIT_SMALL32,
    VIT_TINY16_HALF,
    Goal,
    SectionResult,
    Table,
    describe,
    device,
    device_description,
    fmt_percent,
    fmt_seconds,
    interleaved_times,
    median,
    on_device,
    paired_ratio,
    sample_images,
    vit_config,
)

from selfexplain import ViTForSelfExplainingClassification

GOAL = 0.05  # ≤ 5 % extra step time
NUM_LABELS = 10


def run(quick: bool) -> SectionResult:
    if quick:
        models = {"micro ViT (quick)": (VIT_MICRO16, 16, (2, 2), 3)}
    else:
        models = {
            "small ViT (CPU experiments)": (VIT_SMALL32, 64, (4, 4), 20),
            "ViT-Tiny-width, 224 px": (VIT_TINY16_HALF, 8, (7, 7), 8),
        }
    section = SectionResult(
        "training",
        "5. Training step: λ > 0 vs λ = 0",
        setup=[
            "Step = forward (`explain=None`) + backward + `clip_grad_norm_(1.0)` + AdamW step + `zero_grad`, "
            f"float32, {NUM_LABELS} classes, random weights, the same batch every step; variants run in interleaved "
            "rounds, each on its own copy of the same initial model and optimizer.",
            "λ > 0 variants: `explanation_loss_weight=1`, all-class targets on the patch grid (default MSE), on a "
            "coarser player grid (patch scores average-pooled to it), and the Pearson loss.",
        ],
    )
    if device().type != "cpu":
        section.setup.append(
            f"On {device_description()}: model, optimizer state, batch, labels and targets live on the device "
            "(targets drawn on the CPU with the same generator, then copied once); the timer waits for the device "
            "after every step."
        )
    table = Table(
        "Median step time and extra time vs λ = 0 (median of paired rounds)",
        [
            "model",
            "batch",
            "rounds",
            "λ = 0",
            "λ > 0, MSE, patch grid",
            "λ > 0, MSE, coarse grid",
            "λ > 0, Pearson",
        ],
    )
    for label, (settings, batch, coarse, rounds) in models.items():
        steps = _steps(settings, batch, coarse)
        times = interleaved_times(steps, rounds=rounds, warmup=1)
        extra = {
            name: paired_ratio(times[name], times["lambda0"]) - 1.0 for name in steps if name != "lambda0"
        }
        grid = settings["image_size"] // settings["patch_size"]
        table.add(
            f"{label}: {describe(settings)}",
            batch,
            rounds,
            fmt_seconds(median(times["lambda0"])),
            *(
                f"{fmt_seconds(median(times[name]))} ({fmt_percent(extra[name])})"
                for name in ("mse", "coarse", "pearson")
            ),
        )
        section.setup.append(
            f"{label}: patch grid {grid}×{grid}, coarse player grid {coarse[0]}×{coarse[1]}."
        )
        for name, description in (
            ("mse", "MSE, patch grid (default)"),
            ("coarse", "MSE, coarse grid"),
            ("pearson", "Pearson"),
        ):
            met = extra[name] <= GOAL
            section.goals.append(
                Goal(
                    f"training step overhead, {label}, {description}",
                    "≤ 5 % extra step time",
                    fmt_percent(extra[name]),
                    met,
                    ""
                    if met
                    else f"gap {fmt_percent(extra[name] - GOAL)}: the loss scores every patch for all "
                    f"{NUM_LABELS} classes (N·D·K multiply-adds per image) and back-propagates through it",
                )
            )
    section.tables.append(table)
    return section


def _steps(settings: dict, batch: int, coarse: tuple[int, int]) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    config = vit_config(settings, NUM_LABELS)
    config.explanation_loss_weight = 1.0
    initial = on_device(ViTForSelfExplainingClassification(config).train())  # initialised on the CPU, moved
    pixel_values = sample_images(batch, settings["image_size"], seed=5)  # on the device
    labels = torch.arange(batch, device=device()) % NUM_LABELS
    grid = settings["image_size"] // settings["patch_size"]
    generator = torch.Generator().manual_seed(0)  # CPU draws (the same numbers on every device), then moved
    targets = {
        "patch": on_device(torch.randn(batch, NUM_LABELS, grid, grid, generator=generator) * 1e-2),
        "coarse": on_device(torch.randn(batch, NUM_LABELS, *coarse, generator=generator) * 1e-2),
    }
    variants = {
        "lambda0": (None, "mse"),
        "mse": (targets["patch"], "mse"),
        "coarse": (targets["coarse"], "mse"),
        "pearson": (targets["patch"], "pearson"),
    }
    steps = {}
    for name, (explanation_targets, loss) in variants.items():
        model = copy.deepcopy(initial)  # on the device, as `initial` is
        model.config.explanation_loss = loss
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[name] = _step(model, optimizer, pixel_values, labels, explanation_targets)
    return steps


def _step(model, optimizer, pixel_values, labels, explanation_targets) -> Callable[[], None]:
    def step() -> None:
        output = model(
            pixel_values=pixel_values, labels=labels, explanation_targets=explanation_targets, explain=None
        )
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
