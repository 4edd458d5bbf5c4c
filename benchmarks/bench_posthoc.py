"""Section 2: one self-explaining forward pass versus post-hoc explainers, per image.

The same ViT (random weights) and image for every method: our single pass (the map of the predicted class),
our Kernel SHAP, shap's KernelExplainer and image (Partition) explainer, Captum KernelShap and FeatureAblation
with a patch feature mask, Grad-CAM (ours, pytorch-grad-cam's GradCAM and Captum LayerGradCam) and attention
rollout. Sampling explainers
get the same budget of model evaluations; the model counts the images it scores to check it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import peers
import torch
from _common import (
    VIT_TINY16_HALF,
    LogitsModel,
    SectionResult,
    Table,
    build_classifier,
    describe,
    device,
    device_description,
    fmt_ratio,
    fmt_seconds,
    interleaved_times,
    load_peer,
    median,
    on_device,
    paired_ratio,
    sample_images,
    vit_config,
)

from selfexplain import ViTForSelfExplainingClassification
from selfexplain.attribution.shapley import kernel_shap_values
from selfexplain.evaluation.explainers import attention_rollout, grad_cam

BUDGET = 150


@dataclass
class Method:
    label: str
    run: Callable[[], object]
    explains: str
    cheap: bool = False
    evaluations: str | None = None  # for methods that do not call the counting model


def run(quick: bool) -> SectionResult:
    settings = dict(VIT_TINY16_HALF, image_size=64) if quick else VIT_TINY16_HALF
    num_labels = 1000
    rounds, cheap_repeats = (1, 2) if quick else (3, 5)
    grid = (settings["image_size"] // settings["patch_size"],) * 2
    num_players = grid[0] * grid[1]

    plain = build_classifier(settings, num_labels)
    counted = LogitsModel(plain)
    ours = on_device(ViTForSelfExplainingClassification(vit_config(settings, num_labels)).eval())
    ours.load_state_dict(plain.state_dict(), strict=True)
    pixel_values = sample_images(1, settings["image_size"], seed=2)
    with torch.inference_mode():
        predicted = plain(pixel_values=pixel_values).logits.argmax(-1)

    shap, captum = load_peer("shap", "shap"), load_peer("captum.attr", "Captum")
    grad_cam_lib = peers.load_grad_cam()  # with the torchvision workaround (see peers)

    def single_pass():
        with torch.inference_mode():
            return ours(pixel_values=pixel_values, explain="predicted").explanation

    def plain_forward():
        with torch.inference_mode():
            return plain(pixel_values=pixel_values).logits

    methods = [
        Method(
            '**ours: single forward pass** (`explain="predicted"`)',
            single_pass,
            "predicted",
            True,
            "1 forward",
        ),
        Method("plain forward pass (no explanation), for reference", plain_forward, "—", True, "1 forward"),
        Method(
            f"ours: `kernel_shap_values`, budget {BUDGET}",
            lambda: kernel_shap_values(counted, pixel_values, grid=grid, budget=BUDGET, batch_size=BUDGET),
            f"all {num_labels}",
        ),
    ]
    unavailable = []
    layer_grad_cam: peers.CaptumLayerGradCam | None = None
    real_grad_cam: peers.PytorchGradCam | None = None
    if shap.available:
        methods += [
            Method(
                f"shap `KernelExplainer`, nsamples {BUDGET - 2} (+ background + x), `l1_reg=False`",
                lambda: peers.shap_kernel(
                    shap.module, counted, pixel_values, grid, BUDGET, classes=predicted
                ),
                "predicted",
            ),
            Method(
                f"shap `PartitionExplainer` + `maskers.Image` (the image explainer), max_evals {BUDGET}",
                lambda: peers.shap_partition(shap.module, counted, pixel_values, predicted, BUDGET),
                "predicted",
            ),
        ]
    else:
        unavailable.append(shap)
    if captum.available:
        layer_grad_cam = peers.CaptumLayerGradCam(captum.module, plain)
        methods += [
            Method(
                f"Captum `KernelShap`, n_samples {BUDGET}, patch feature mask",
                lambda: peers.captum_kernel_shap(
                    captum.module, counted, pixel_values, grid, predicted, BUDGET
                ),
                "predicted",
            ),
            Method(
                "Captum `FeatureAblation`, patch feature mask (one patch at a time)",
                lambda: peers.captum_feature_ablation(captum.module, counted, pixel_values, grid, predicted),
                "predicted",
            ),
            Method(
                "Captum `LayerGradCam` (last block, tokens as channels)",
                lambda: layer_grad_cam(pixel_values, predicted, grid),
                "predicted",
                cheap=True,
                evaluations="1 forward + 1 backward",
            ),
        ]
    else:
        unavailable.append(captum)
    if grad_cam_lib.available:
        real_grad_cam = peers.PytorchGradCam(grad_cam_lib.module, plain, grid)
        methods.append(
            Method(
                "pytorch-grad-cam `GradCAM` (last block's `layernorm_before`, CLS dropped by `reshape_transform`)",
                lambda: real_grad_cam(pixel_values, predicted),
                "predicted",
                cheap=True,
                evaluations="1 forward + 1 backward",
            )
        )
    else:
        unavailable.append(grad_cam_lib)
    methods += [
        Method(
            "ours: `explainers.grad_cam`",
            lambda: grad_cam(plain, pixel_values),
            "predicted",
            cheap=True,
            evaluations="1 forward + 1 backward",
        ),
        Method(
            "ours: `explainers.attention_rollout`",
            lambda: attention_rollout(plain, pixel_values),
            "class-agnostic",
            cheap=True,
            evaluations="1 forward (eager attention)",
        ),
    ]

    evaluations = {}
    for method in methods:  # one untimed, counted call each: also the warm-up (numba JIT, lazy imports)
        counted.evaluations = 0
        method.run()
        evaluations[method.label] = counted.evaluations
    functions = {method.label: method.run for method in methods}
    inner = {method.label: cheap_repeats for method in methods if method.cheap}
    times = interleaved_times(functions, rounds=rounds, warmup=0, inner=inner)

    reference = methods[0].label
    table = Table(
        "Time per image (median) and how many times longer than the single forward pass",
        ["method", "maps for", "model evaluations", "time / image", "× single pass"],
    )
    for method in methods:
        evaluated = method.evaluations or str(evaluations[method.label])
        ratio = median(times[method.label]) / median(times[reference])
        table.add(
            method.label,
            method.explains,
            evaluated,
            fmt_seconds(median(times[method.label])),
            fmt_ratio(ratio),
        )
    section = SectionResult(
        "posthoc",
        "2. Versus post-hoc explainers, per image",
        setup=[
            f"{'Quick run: ' if quick else ''}ViT-Tiny-width model ({describe(settings)}), {num_labels} classes, "
            f"random weights, batch 1 (one photo crop), float32, {_where()}. ViT-B/16 would make each "
            f"{BUDGET}-evaluation explainer take minutes per image on 2 CPU cores; all costs scale with the forward "
            "pass.",
            f"Players: the {grid[0]}×{grid[1]} patch grid ({num_players} players), baseline = the image's mean "
            f"colour, value = softmax probability. Budget: {BUDGET} model evaluations per image (with "
            f"{num_players} players this is fewer than the {num_players + 1} a fully determined fit needs; this "
            "section compares speed only, section 3 compares the estimates).",
            f"Rounds: {rounds}, after one untimed call of each method (it counts the model evaluations and warms "
            f"up JIT compilation and lazy imports); cheap methods run {cheap_repeats}× per round. "
            "'× single pass' = median time / median time of our single pass.",
        ],
        tables=[table],
    )
    if device().type != "cpu":
        section.setup.append(
            f"Device: every model, image, baseline and feature mask is on {device()}. What stays on the CPU: shap's "
            "sampling, masking (Partition) and fits run in numpy (each batch of masked images is moved to the "
            "device to be scored, the scores back), Captum's `KernelShap` fits its linear model with scikit-learn "
            "and draws its coalitions with the CPU generator, and pytorch-grad-cam copies activations and "
            "gradients to the CPU to weight and resize them in numpy."
        )
    if unavailable:
        section.notes += [f"{peer.label}: not available — {peer.reason}." for peer in unavailable]
    section.notes.append(
        "Ours-Kernel-SHAP returns the maps of all classes from the same evaluations; the peers are given only the "
        "predicted class (their cheapest correct use), so the comparison favours them."
    )
    section.tables.append(_grad_cam_agreement(plain, settings, grid, real_grad_cam, layer_grad_cam))
    speedups = {
        method.label: paired_ratio(times[method.label], times[reference])
        for method in methods[2:]
        if not method.cheap
    }
    if speedups:
        slowest, fastest = max(speedups.values()), min(speedups.values())
        section.notes.append(
            f"The single pass is {fmt_ratio(fastest)}–{fmt_ratio(slowest)} faster than the {BUDGET}-evaluation "
            "explainers (paired-round medians)."
        )
    return section


def _where() -> str:
    """``"2 CPU threads"`` or ``"on cuda:0 (NVIDIA H200, 139.8 GiB)"``: where the models run."""
    if device().type == "cpu":
        return f"{torch.get_num_threads()} CPU threads"
    return f"on {device_description()}"


def _grad_cam_agreement(
    plain: torch.nn.Module,
    settings: dict,
    grid: tuple[int, int],
    real_grad_cam: peers.PytorchGradCam | None,
    layer_grad_cam: peers.CaptumLayerGradCam | None,
    num_images: int = 4,
) -> Table:
    """Mean Pearson / Spearman between our ``grad_cam`` and each library's Grad-CAM.

    pytorch-grad-cam returns min-max scaled pixel maps (its patch-grid map resized with OpenCV's bilinear
    interpolation): it is compared with ours upsampled the same way (``align_corners=False`` bilinear, which is
    OpenCV's pixel-centre convention), at the pixel level. Captum's maps are compared on the patch grid.
    """
    from selfexplain.evaluation.metrics import pearson, spearman

    pixel_values = sample_images(num_images, settings["image_size"], seed=5)
    with torch.no_grad():  # not inference_mode: Captum uses the classes in a graph it differentiates
        predicted = plain(pixel_values=pixel_values).logits.argmax(-1)
    ours = grad_cam(plain, pixel_values)  # (B, gh, gw)
    ours_pixels = torch.nn.functional.interpolate(
        ours[:, None], size=tuple(pixel_values.shape[-2:]), mode="bilinear", align_corners=False
    )[:, 0]
    table = Table(
        f"Grad-CAM agreement with ours (`explainers.grad_cam`), {num_images} photo crops, predicted class",
        ["library", "compared on", "Pearson (mean)", "Spearman (mean)"],
    )
    rows = {
        "pytorch-grad-cam `GradCAM`": (
            real_grad_cam and (lambda: real_grad_cam(pixel_values, predicted)),
            ours_pixels,
            "pixels (ours upsampled bilinearly)",
        ),
        "Captum `LayerGradCam`": (
            layer_grad_cam and (lambda: layer_grad_cam(pixel_values, predicted, grid)),
            ours,
            f"the {grid[0]}×{grid[1]} patch grid",
        ),
    }
    for label, (explain, reference, where) in rows.items():
        if explain is None:
            table.add(label, where, "not available", "—")
            continue
        # On the CPU: pytorch-grad-cam's maps come from numpy, and agreement is not timed.
        theirs, reference = explain().flatten(1).float().cpu(), reference.flatten(1).cpu()
        table.add(
            label,
            where,
            f"{float(pearson(theirs, reference).nanmean()):.4f}",
            f"{float(spearman(theirs, reference).nanmean()):.4f}",
        )
    return table
