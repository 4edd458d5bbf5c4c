"""Section 6: insertion/deletion AUC throughput versus Quantus ``PixelFlipping`` and ``RegionPerturbation``.

The same model, images and maps (the self-explaining model's own patch maps of the predicted class) for all.
Players are the model's patches; removed pixels become 0 (Quantus ``perturb_baseline=0.0``, our
``baseline="zero"``), one patch per step, so our deletion curve and Quantus' pixel-flipping curve are the same
quantity. Quantus runs one forward pass per step over the batch of images; ours composes all masked images of
all steps and images and runs them in chunks of ``batch_size``. Ours also computes the insertion curve.
"""

from __future__ import annotations

import numpy as np
import torch
from _common import (
    VIT_MICRO16,
    VIT_SMALL32,
    LogitsModel,
    SectionResult,
    Table,
    build_classifier,
    describe,
    device,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    interleaved_times,
    load_peer,
    median,
    on_device,
    sample_images,
    vit_config,
)

from selfexplain import ViTForSelfExplainingClassification
from selfexplain.attribution.masking import grid_to_pixel_mask
from selfexplain.evaluation.metrics import insertion_deletion_auc

NUM_LABELS = 10


def run(quick: bool) -> SectionResult:
    settings, num_images, rounds = (VIT_MICRO16, 4, 1) if quick else (VIT_SMALL32, 32, 3)
    model = build_classifier(settings, NUM_LABELS)
    counted = LogitsModel(model).eval()
    explaining = on_device(ViTForSelfExplainingClassification(vit_config(settings, NUM_LABELS)).eval())
    explaining.load_state_dict(model.state_dict(), strict=True)
    pixel_values = sample_images(num_images, settings["image_size"], seed=6)
    with torch.inference_mode():
        output = explaining(pixel_values=pixel_values)
    maps, predicted = output.explanation, output.explained_classes
    grid = tuple(maps.shape[-2:])
    num_players = grid[0] * grid[1]
    patch = settings["patch_size"]
    # Quantus wants one attribution per input feature: the patch score on every pixel of every channel.
    pixel_maps = grid_to_pixel_mask(maps, tuple(pixel_values.shape[-2:]))[:, None].expand_as(pixel_values)

    contenders = {
        "ours": lambda: insertion_deletion_auc(
            counted, pixel_values, maps, baseline="zero", target=predicted, return_curves=True
        ),
    }
    quantus = load_peer("quantus", "Quantus")
    if quantus.available:
        # Quantus takes numpy batches (it perturbs them on the CPU) and moves each one to `device` to score it.
        x, y = pixel_values.detach().cpu().numpy(), predicted.detach().cpu().numpy()
        a = pixel_maps.contiguous().detach().cpu().numpy()
        common = dict(
            abs=False, normalise=False, perturb_baseline=0.0, disable_warnings=True, display_progressbar=False
        )
        # Quantus checks `features_in_step` against H×W but then steps through C×H×W features, so one patch per
        # step (3·p² features) is refused unless 3·p² divides H×W; p² per step (a third of a patch) is accepted.
        pixel_flipping = quantus.module.PixelFlipping(features_in_step=patch * patch, **common)
        region_perturbation = quantus.module.RegionPerturbation(
            patch_size=patch, regions_evaluation=num_players, order="morf", **common
        )

        def call(metric):
            return lambda: metric(
                model=counted,
                x_batch=x,
                y_batch=y,
                a_batch=a,
                device=str(device()),
                batch_size=num_images,
                softmax=True,
            )

        contenders["pixel_flipping"] = call(pixel_flipping)
        contenders["region_perturbation"] = call(region_perturbation)

    outputs, evaluations = {}, {}
    for name, contender in contenders.items():  # counted first call: warm-up + the curves compared below
        counted.evaluations = 0
        outputs[name] = contender()
        evaluations[name] = counted.evaluations
    times = interleaved_times(contenders, rounds=rounds, warmup=0)

    labels = {
        "ours": "ours: `insertion_deletion_auc` (insertion **and** deletion, batch_size 256)",
        "pixel_flipping": "Quantus `PixelFlipping` (deletion; p² of the 3·p² features of a patch per step)",
        "region_perturbation": f"Quantus `RegionPerturbation` (deletion, {patch}×{patch} regions, MoRF)",
    }
    table = Table(
        f"Faithfulness metric on {num_images} images, {num_players} steps per curve (median of {rounds} rounds)",
        ["metric", "time", "images/s", "model evaluations / image", "evaluations/s", "ours is … faster"],
    )
    ours_time = median(times["ours"])
    for name in contenders:
        elapsed = median(times[name])
        table.add(
            labels[name],
            fmt_seconds(elapsed),
            fmt_rate(num_images / elapsed),
            f"{evaluations[name] / num_images:g}",
            fmt_rate(evaluations[name] / elapsed),
            "—" if name == "ours" else fmt_ratio(elapsed / ours_time),
        )
    section = SectionResult(
        "metrics",
        "6. Insertion/deletion throughput vs Quantus",
        setup=[
            f"{'Quick run: ' if quick else ''}ViT {describe(settings)}, {NUM_LABELS} classes, random weights; "
            f"{num_images} photo crops; maps = the self-explaining model's predicted-class patch maps "
            f"({grid[0]}×{grid[1]}); softmax probability of the predicted class; baseline 0.",
        ],
        tables=[table],
    )
    if device().type != "cpu":
        section.setup.append(
            f"Device: the model, images, maps and masks are on {device()}; ours composes and scores the masked "
            "images there. Quantus takes numpy arrays: it perturbs the images on the CPU and moves each step's "
            f"batch to {device()} to score it (its `device` argument), so its times include those copies."
        )
    if quantus.available:
        section.notes.append(_curve_agreement(outputs, num_players))
    else:
        section.notes.append(f"Quantus: not available — {quantus.reason}.")
    return section


def _curve_agreement(outputs: dict, num_players: int) -> str:
    """Our deletion curve against Quantus' pixel-flipping curve: they should be the same numbers."""
    ours = outputs["ours"]["deletion_curve"][:, 1:].detach().cpu().numpy()  # after removing 1..n players
    theirs = np.asarray(outputs["pixel_flipping"], dtype=np.float64).reshape(ours.shape[0], -1)
    whole_patches = theirs[:, 2::3][:, :num_players]  # Quantus takes three steps per patch (see above)
    gap = float(np.abs(ours - whole_patches).max())
    return (
        "Quantus PixelFlipping steps through a patch in 3 steps of p² features, so it runs 3× as many forward "
        f"passes per curve. At whole patches its curve equals our deletion curve: max difference {gap:.2e} over "
        f"{ours.size} points."
    )
