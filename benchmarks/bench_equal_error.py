"""Equal-error cost of Kernel SHAP estimators: the model evaluations each needs to reach a fixed error.

Contenders: ours (`kernel_shap_values` with the ``shap``-style ``sampler="kernel"`` and Leverage SHAP's
``sampler="leverage"``, each without and with ``control_variate=True``, Leverage SHAP with ``ridge="gcv"``, the
design and fit of the experiment suites' Kernel SHAP, and the same shrunk towards the single-pass map of the
classifier's self-explaining model, ``prior=``, where the trained suite's exists), shap ``KernelExplainer``, shapiq's
``KernelSHAP`` and its Leverage SHAP configuration, and Captum ``KernelShap``. Error is the relative L2 error of
the explained class's attributions (the predicted class), averaged over images and seeds, as a function of the
budget; from each curve, the budget at which it reaches a fixed error (log-log interpolation), and the ratio
of the best peer's budget to ours. Evaluations are counted, not timed, so machine load does not matter here.

(a) 4×4 = 16 players against **exact** Shapley values. The values of all 65,536 coalitions of each image are
    tabulated once; every estimator then reads that same table (ours through `kernel_shap_values` on a table
    "model", the peers through their own coalition-function interfaces), so value function, baseline fill and
    evaluation counts are identical by construction.
(b) 8×8 = 64 players (one ViT patch each) against a **converged reference**: our estimator at a large budget,
    two seeds averaged, their agreement reported. Every estimator calls the model itself here.

    python benchmarks/run_all.py --only equal_error --output build/bench-equal-error.md
    python benchmarks/run_all.py --only equal_error --quick

The model is the MNIST ViT the experiment trains (``outputs/full/work/seed0/mnist-prediction_only``, 32 px,
8×8 patches) on MNIST test digits; where it is absent, a random-weight ViT of the same shape on photo crops.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import peers
import torch
from _common import (
    REPO_ROOT,
    VIT_SMALL32,
    Goal,
    SectionResult,
    Table,
    build_classifier,
    describe,
    device,
    fmt_ratio,
    load_peer,
    on_device,
    sample_images,
)
from torch import nn

from selfexplain.attribution.masking import make_baseline, mask_images
from selfexplain.attribution.model_call import model_logits
from selfexplain.attribution.shapley import _all_coalitions, _shapley_coefficients, kernel_shap_values
from selfexplain.modeling_self_explaining_vit import pool_to_player_grid

MODEL_DIR = REPO_ROOT / "outputs" / "full" / "work" / "seed0" / "mnist-prediction_only"
#: Its self-explaining model (an extension trained on the frozen `MODEL_DIR`), whose map is the prior of `PRIOR`.
EXPLAINER_DIR = MODEL_DIR.parent / "mnist-self_explaining"
PRIOR = "ours leverage + ridge + self-explaining prior"
SELF_EXPLAINING = "self-explaining map"  # placeholder in OURS, replaced by the map pooled to each part's grid
GOAL = 4.0  # ours reaches the best peer's error with >= 4x fewer evaluations
#: `kernel_shap_values` settings of our contenders; PRIMARY is the one the goal is judged on (the smallest error at
#: 300+ evaluations; the ridge, which the suites use for its maps' Pearson, shrinks the values' scale: see the notes).
OURS: dict[str, dict[str, object]] = {
    "ours kernel": {"sampler": "kernel"},
    "ours kernel + CV": {"sampler": "kernel", "control_variate": True},
    "ours leverage": {"sampler": "leverage"},
    "ours leverage + CV": {"sampler": "leverage", "control_variate": True},
    "ours leverage + ridge": {"sampler": "leverage", "ridge": "gcv"},
    # The same, shrunk towards the single-pass map of the classifier's self-explaining model (its extension sits on
    # the frozen classifier: same logits); only where that model exists (the trained suite's), else left out.
    PRIOR: {"sampler": "leverage", "ridge": "gcv", "prior": SELF_EXPLAINING},
}
PRIMARY = "ours leverage + CV"
PEER_LABELS = {
    "shap": "shap `KernelExplainer`",
    "shapiq kernel": "shapiq `KernelSHAP` (paired)",
    "shapiq leverage": "shapiq Leverage SHAP (`KernelSHAP`, paired, equal size weights)",
    "captum": "Captum `KernelShap`",
}


@dataclass(frozen=True)
class Profile:
    images: int
    exact_seeds: int
    large_seeds: int
    exact_grid: tuple[int, int]
    exact_budgets: tuple[int, ...]
    exact_target: float
    large_grid: tuple[int, int]
    large_budgets: tuple[int, ...]
    large_target: float
    reference_budget: int


FULL = Profile(
    images=2,
    exact_seeds=4,
    large_seeds=2,
    exact_grid=(4, 4),
    exact_budgets=(30, 50, 80, 130, 200, 320, 500, 800),
    exact_target=0.15,
    large_grid=(8, 8),
    large_budgets=(100, 150, 200, 300, 600, 1200),
    large_target=0.30,
    reference_budget=4096,
)
QUICK = Profile(
    images=2,
    exact_seeds=2,
    large_seeds=2,
    exact_grid=(3, 3),
    exact_budgets=(20, 40, 80, 160),
    exact_target=0.10,
    large_grid=(4, 4),
    large_budgets=(40, 80, 160),
    large_target=0.20,
    reference_budget=1024,
)


def run(quick: bool) -> SectionResult:
    profile = QUICK if quick else FULL
    model, pixel_values, source = _model_and_images(profile.images)
    with torch.inference_mode():
        classes = model_logits(model, pixel_values).argmax(-1).cpu()  # indexes CPU tables and estimates
    prior = _self_explaining_map(model, pixel_values)  # (B, C, gh, gw) on the patch grid, or None
    libraries = {
        "shap": load_peer("shap", "shap"),
        "shapiq": load_peer("shapiq", "shapiq"),
        "captum": load_peer("captum.attr", "Captum"),
    }
    section = SectionResult(
        "equal_error",
        "Equal-error cost of Kernel SHAP (evaluations to reach a fixed error)",
        setup=[
            f"{'Quick run: ' if quick else ''}{source}; {profile.images} images, {profile.exact_seeds} seeds per "
            f"budget in (a), {profile.large_seeds} in (b); the explained class is the predicted one; value = its softmax probability; removed players "
            "show the image's mean colour (the same baseline for every method).",
            "Error = ‖φ̂ − φ‖₂ / ‖φ‖₂ over the players, averaged over images × seeds. Budget = model evaluations "
            "per image, the empty and full coalitions included, counted by a wrapper around the value function "
            "(shap: `nsamples = budget − 2`, it evaluates those two apart).",
            "Budget to reach the target error: log-log interpolation between the two budgets whose mean errors "
            "bracket it; `>` when a method never reaches it in the range, `≤` when it already does at the "
            "smallest budget.",
        ],
    )
    if device().type != "cpu":
        section.setup.append(
            f"On {device()}: the model, the images, the masked images and every model evaluation (the tabulation "
            "in (a), all of (b)) run on the device; the coalitions are sampled on the CPU (by each library, ours "
            "with its CPU generators) and copied over per call, and the values come back to the CPU for the fits "
            "and the errors (float64). The peers call the model through a numpy game here (masks in, the explained "
            "class's probabilities out), so every method pays the same transfers; evaluations are counted, not "
            "timed."
        )
    for library in libraries.values():
        if not library.available:
            section.notes.append(f"{library.label}: not available — {library.reason}.")

    if prior is None:
        section.notes.append(
            f"`{PRIOR}` is left out: it needs the classifier's self-explaining model "
            f"({EXPLAINER_DIR.relative_to(REPO_ROOT)}, made by `selfexplain experiment --config full`)."
        )
    else:
        section.setup.append(
            f'`{PRIOR}`: `kernel_shap_values(sampler="leverage", ridge="gcv", prior=map)` with the map of '
            f"{EXPLAINER_DIR.relative_to(REPO_ROOT)} (an explanation extension trained on this frozen classifier, "
            'so the model explained and the explainer have the same logits), `explain="all"`, pooled to the '
            "part's player grid; its one forward pass is not counted in the budget. The peers have no such model."
        )
    exact_curves = _exact_part(model, pixel_values, classes, profile, libraries, section, prior)
    large_curves = _reference_part(model, pixel_values, classes, profile, libraries, section, prior)
    for label, curves, budgets, target, grid in (
        ("exact", exact_curves, profile.exact_budgets, profile.exact_target, profile.exact_grid),
        ("reference", large_curves, profile.large_budgets, profile.large_target, profile.large_grid),
    ):
        section.tables.append(_curve_table(label, curves, budgets, grid))
        section.tables.append(_equal_error_table(label, curves, budgets, target, grid, section))
    section.notes += _fairness_notes()
    return section


# --------------------------------------------------------------------------------------------------------
# Model and images
# --------------------------------------------------------------------------------------------------------


def _model_and_images(num_images: int) -> tuple[nn.Module, torch.Tensor, str]:
    """The trained MNIST ViT and MNIST test digits when the experiment's outputs exist, else a random ViT."""
    if (MODEL_DIR / "config.json").exists():
        from selfexplain import ViTForSelfExplainingClassification
        from selfexplain.data import default_image_processor, load_builtin_domain

        model = on_device(ViTForSelfExplainingClassification.from_pretrained(MODEL_DIR).eval())
        test = load_builtin_domain("mnist", seed=0)["test"]
        processor = default_image_processor(model.config.image_size)
        images = [test[index]["image"].convert("RGB") for index in range(num_images)]
        pixel_values = on_device(processor(images=images, return_tensors="pt")["pixel_values"])
        source = (
            f"the trained MNIST ViT ({MODEL_DIR.relative_to(REPO_ROOT)}, 32 px, 8×8 patches, 10 classes) on the "
            "first MNIST test digits"
        )
        return model, pixel_values, source
    model = build_classifier(VIT_SMALL32, num_labels=10)
    source = f"a random-weight ViT {describe(VIT_SMALL32)} (no trained model in outputs/) on photo crops"
    return model, sample_images(num_images, VIT_SMALL32["image_size"], seed=3), source


def _self_explaining_map(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor | None:
    """The single-pass map (all classes) of the classifier's self-explaining model, when the trained suite's
    classifier is the one benchmarked and its self-explaining model exists; else ``None``."""
    if not (MODEL_DIR / "config.json").exists() or not (EXPLAINER_DIR / "config.json").exists():
        return None
    from selfexplain import ViTForSelfExplainingClassification

    explainer = on_device(ViTForSelfExplainingClassification.from_pretrained(EXPLAINER_DIR).eval())
    with torch.inference_mode():
        output = explainer(pixel_values, explain="all")
        same = torch.allclose(output.logits, model_logits(model, pixel_values), atol=1e-5)
    if not same:  # the extension must sit on this very classifier
        raise RuntimeError(f"{EXPLAINER_DIR} does not predict as {MODEL_DIR}: rerun the suite.")
    return output.explanation.float().cpu()


# --------------------------------------------------------------------------------------------------------
# Games: one value function for every method, with an evaluation counter
# --------------------------------------------------------------------------------------------------------


class TableModel(nn.Module):
    """A stand-in "classifier" that replays tabulated coalition values through `kernel_shap_values`.

    Image ``b`` is a ``(1, gh, gw)`` picture whose pixels are ``b + 1`` and its baseline ``-(b + 1)``: a
    masked copy tells by its signs which players are kept and by its magnitude which image it is. The output is
    the log of the tabulated probabilities, which `kernel_shap_values`' softmax turns back into them.
    """

    def __init__(self, probabilities: torch.Tensor) -> None:
        super().__init__()
        self.log_probs = probabilities.clamp_min(1e-30).log().float()  # (B, 2**n, C)
        self.evaluations = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        image = flat[:, 0].abs().round().long() - 1
        code = ((flat > 0).long() << torch.arange(flat.shape[1])).sum(1)
        self.evaluations += len(images)
        return self.log_probs[image, code]

    @staticmethod
    def inputs(num_images: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.arange(1, num_images + 1, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, *grid)
        return pixels.contiguous(), -pixels.contiguous()


class CountedGame:
    """``(M, n)`` bool masks -> ``(M,)`` probabilities of one image's class, from a table or from the model."""

    def __init__(self, values: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.values = values
        self.evaluations = 0

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = torch.as_tensor(np.asarray(masks, dtype=bool))
        self.evaluations += len(masks)
        return self.values(masks).to(device="cpu", dtype=torch.float64).numpy()


def _table_game(table: torch.Tensor, image: int, cls: int) -> CountedGame:
    weights = 1 << torch.arange(table.shape[-2].bit_length() - 1)

    return CountedGame(lambda masks: table[image, (masks.long() * weights).sum(1), cls])


def _model_game(model: nn.Module, image: torch.Tensor, cls: int, grid: tuple[int, int]) -> CountedGame:
    """The game of one image on the model's device (``image`` lives there; the CPU masks are copied over)."""
    baseline = make_baseline(image[None], "mean")

    def values(masks: torch.Tensor) -> torch.Tensor:
        outputs = []
        with torch.inference_mode():
            for chunk in masks.split(256):
                masked = mask_images(image[None], baseline, on_device(chunk.view(1, -1, *grid)))
                outputs.append(model_logits(model, masked).softmax(-1)[:, cls])
        return torch.cat(outputs) if outputs else torch.zeros(0)

    return CountedGame(values)


class CountedModel(nn.Module):
    """``x -> logits`` of the model (no explanation pass), counting the images scored."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.evaluations = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.evaluations += len(images)
        return model_logits(self.model, images)


# --------------------------------------------------------------------------------------------------------
# The contenders
# --------------------------------------------------------------------------------------------------------


def _peer_estimates(
    libraries: dict, game: CountedGame, num_players: int, budget: int, seed: int
) -> dict[str, tuple[np.ndarray, int]]:
    """Each available peer's ``(n,)`` estimate on ``game`` and the evaluations it spent."""
    runs = {}
    if libraries["shap"].available:
        runs["shap"] = lambda: peers.shap_kernel_game(
            libraries["shap"].module, game, num_players, budget, seed
        )
    if libraries["shapiq"].available:
        for name, leverage in (("shapiq kernel", False), ("shapiq leverage", True)):
            runs[name] = lambda leverage=leverage: peers.shapiq_kernel_shap_game(
                libraries["shapiq"].module, game, num_players, budget, seed, leverage
            )
    if libraries["captum"].available:
        runs["captum"] = lambda: peers.captum_kernel_shap_game(
            libraries["captum"].module, game, num_players, budget, seed
        )
    results = {}
    for name, estimate in runs.items():
        game.evaluations = 0
        phi = estimate()
        results[name] = (phi, game.evaluations)
    return results


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


Curves = dict[str, dict[int, list[float]]]  # method -> budget -> errors (images x seeds)


def _estimate_curves(
    ours: Callable[..., torch.Tensor],
    games: Callable[[int], CountedGame],
    reference: torch.Tensor,
    budgets: Sequence[int],
    seeds: int,
    libraries: dict,
    spent: dict[str, list[float]],
) -> Curves:
    """Errors of every contender at every budget. ``ours(budget, seed, **settings) -> (B, n)``."""
    num_images, num_players = reference.shape
    curves: Curves = {}
    for budget in budgets:
        for seed in range(seeds):
            for name, settings in OURS.items():
                if settings.get("prior") == SELF_EXPLAINING and not ours.has_prior:
                    continue
                phi = ours(budget, seed, **settings)
                for image in range(num_images):
                    curves.setdefault(name, {}).setdefault(budget, []).append(
                        _relative_error(phi[image], reference[image])
                    )
            for image in range(num_images):
                game = games(image)
                for name, (phi, used) in _peer_estimates(libraries, game, num_players, budget, seed).items():
                    error = _relative_error(torch.from_numpy(phi), reference[image])
                    curves.setdefault(name, {}).setdefault(budget, []).append(error)
                    spent.setdefault(name, []).append(used / budget)
    return curves


def _ours_runner(
    model: Callable,
    pixel_values: torch.Tensor,
    classes: torch.Tensor,
    grid,
    baseline,
    counter,
    prior: torch.Tensor | None = None,
):
    """``(budget, seed, **settings) -> (B, n)`` estimates of the explained classes, checking the budget; a
    ``prior=SELF_EXPLAINING`` setting becomes the self-explaining map pooled to ``grid``."""
    divides = prior is not None and all(p % g == 0 for p, g in zip(prior.shape[-2:], grid, strict=True))
    pooled = pool_to_player_grid(prior, tuple(grid)) if divides else None  # (quick runs' 3x3 grid: left out)

    def ours(budget: int, seed: int, **settings) -> torch.Tensor:
        if settings.get("prior") == SELF_EXPLAINING:
            settings["prior"] = pooled
        counter.evaluations = 0
        phi = kernel_shap_values(
            model,
            pixel_values,
            grid=grid,
            budget=budget,
            baseline=baseline,
            seed=[1000 * seed + image for image in range(len(pixel_values))],
            batch_size=1024,
            **settings,
        )
        expected = len(pixel_values) * min(budget, 2 ** (grid[0] * grid[1]))
        assert counter.evaluations == expected, (counter.evaluations, expected)
        return phi[torch.arange(len(phi)), classes].flatten(1).to(device="cpu", dtype=torch.float64)

    ours.has_prior = pooled is not None
    return ours


# --------------------------------------------------------------------------------------------------------
# (a) exact Shapley values, (b) a converged reference
# --------------------------------------------------------------------------------------------------------


def _exact_part(
    model, pixel_values, classes, profile: Profile, libraries, section: SectionResult, prior=None
) -> Curves:
    grid = profile.exact_grid
    num_players = grid[0] * grid[1]
    coalitions = _all_coalitions(num_players)
    table = torch.cat([_tabulate(model, image, coalitions, grid) for image in pixel_values])  # (B, 2**n, C)
    exact = torch.einsum("mi,bmc->bci", _shapley_coefficients(coalitions), table)
    exact = exact[torch.arange(len(exact)), classes]  # (B, n)
    table_model = TableModel(table)
    pixels, baseline = TableModel.inputs(len(pixel_values), grid)
    ours = _ours_runner(table_model, pixels, classes, grid, baseline, table_model, prior)
    spent: dict[str, list[float]] = {}
    curves = _estimate_curves(
        ours,
        lambda image: _table_game(table, image, int(classes[image])),
        exact,
        profile.exact_budgets,
        profile.exact_seeds,
        libraries,
        spent,
    )
    section.setup.append(
        f"(a) {grid[0]}×{grid[1]} = {num_players} players: all {2**num_players:,} coalitions of each image "
        "evaluated once and tabulated; exact Shapley values from the table; every method reads the table."
    )
    section.notes += _spending_notes("(a)", spent)
    return curves


def _tabulate(model, image: torch.Tensor, coalitions: torch.Tensor, grid) -> torch.Tensor:
    """``(1, 2**n, C)`` softmax probabilities of every coalition of one image (mean-colour baseline), evaluated on
    the model's device and tabulated on the CPU (float64)."""
    game = _model_game(model, image, slice(None), grid)  # all classes
    return game.values(coalitions)[None].to(device="cpu", dtype=torch.float64)


def _reference_part(model, pixel_values, classes, profile: Profile, libraries, section, prior=None) -> Curves:
    grid = profile.large_grid
    num_players = grid[0] * grid[1]
    counted = CountedModel(model)
    ours = _ours_runner(counted, pixel_values, classes, grid, "mean", counted, prior)
    references = []
    for seed in (10_000, 20_000):
        counted.evaluations = 0
        phi = kernel_shap_values(
            counted,
            pixel_values,
            grid=grid,
            budget=profile.reference_budget,
            seed=[seed + image for image in range(len(pixel_values))],
            sampler="leverage",
            batch_size=1024,
        )
        references.append(
            phi[torch.arange(len(phi)), classes].flatten(1).to(device="cpu", dtype=torch.float64)
        )
    reference = (references[0] + references[1]) / 2
    agreement = statistics.mean(
        _relative_error(references[0][i], references[1][i]) for i in range(len(reference))
    )
    spent: dict[str, list[float]] = {}
    curves = _estimate_curves(
        ours,
        lambda image: _model_game(model, pixel_values[image], int(classes[image]), grid),
        reference,
        profile.large_budgets,
        profile.large_seeds,
        libraries,
        spent,
    )
    section.setup.append(
        f"(b) {grid[0]}×{grid[1]} = {num_players} players: reference = the mean of two runs of ours "
        f'(`sampler="leverage"`) at {profile.reference_budget:,} evaluations per image, '
        f"seeds 10000+i and 20000+i; the two differ by {agreement:.4f} (relative L2, mean over images), so the "
        f"reference's own error is about {agreement / 2:.4f}: errors well above that are measured reliably."
    )
    section.notes += _spending_notes("(b)", spent)
    return curves


# --------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------


def _mean_curve(curve: dict[int, list[float]], budgets: Sequence[int]) -> list[float]:
    return [statistics.mean(curve[b]) for b in budgets]


def budget_to_reach(budgets: Sequence[int], errors: Sequence[float], target: float) -> tuple[float, str]:
    """Budget at which a mean-error curve first reaches ``target``: log-log interpolation between bracketing
    points; ``(inf, ">max")`` when it never does, ``(budgets[0], "≤min")`` when it does at once."""
    if errors[0] <= target:
        return float(budgets[0]), f"≤ {budgets[0]:,}"
    for (b0, e0), (b1, e1) in zip(zip(budgets, errors), zip(budgets[1:], errors[1:])):  # noqa: B905
        if e1 <= target < e0:
            slope = (math.log(b1) - math.log(b0)) / (math.log(e1) - math.log(e0))
            budget = math.exp(math.log(b0) + (math.log(target) - math.log(e0)) * slope)
            return budget, f"{budget:,.0f}"
    return math.inf, f"> {budgets[-1]:,}"


def _curve_table(label: str, curves: Curves, budgets: Sequence[int], grid) -> Table:
    n = grid[0] * grid[1]
    table = Table(
        f"({'a' if label == 'exact' else 'b'}) {n} players: mean relative error vs "
        f"{'exact Shapley values' if label == 'exact' else 'the converged reference'}, by budget",
        ["method", *[f"{b:,}" for b in budgets]],
    )
    for name, curve in curves.items():
        table.add(PEER_LABELS.get(name, name), *[f"{e:.3f}" for e in _mean_curve(curve, budgets)])
    return table


def _equal_error_table(label, curves: Curves, budgets, target: float, grid, section: SectionResult) -> Table:
    n = grid[0] * grid[1]
    part = "a" if label == "exact" else "b"
    reach = {
        name: budget_to_reach(budgets, _mean_curve(curve, budgets), target) for name, curve in curves.items()
    }
    peer_names = [name for name in curves if name not in OURS]
    best_peer = min(peer_names, key=lambda name: reach[name][0]) if peer_names else None
    table = Table(
        f"({part}) {n} players: budget to reach a mean error of {target:g}, and the best peer's budget over it",
        ["method", "budget to reach", "best peer / this"],
    )
    for name in curves:
        ratio = "—" if best_peer is None or name == best_peer else ""
        if not ratio:
            ratio = _ratio_text(reach[best_peer][0], reach[name][0], budgets[-1])[1]
        table.add(PEER_LABELS.get(name, name), reach[name][1], ratio)
    for ours_name in (PRIMARY, PRIOR):
        if best_peer is None or ours_name not in curves:
            continue
        bound, text = _ratio_text(reach[best_peer][0], reach[ours_name][0], budgets[-1])
        if not math.isfinite(reach[ours_name][0]):
            met = False
        elif math.isfinite(reach[best_peer][0]):
            met = bound >= GOAL
        else:  # the peer never reaches the target: the ratio is a lower bound, which settles only "met"
            met = True if bound >= GOAL else None
        reason = (
            "the sampler alone (Leverage SHAP's design) is worth ~1.1–1.3× and the peers have it too; the "
            "softmax control variate does not help on this model (its logits carry the interactions); the GCV "
            "ridge removes the error peak near 2n evaluations but shrinks the values at the budgets where this "
            "error is reached; see the curves"
            if ours_name == PRIMARY
            else "the prior's gain is at small budgets and shrinks as the evaluations take over (by Pearson and by "
            "median L2 error, 3 seeds × 16 images: docs/results/kernel_shap_prior.md, about 4–5× at 64 "
            "evaluations, 2× at 256); this error needs more evaluations than that; see the curves"
        )
        section.goals.append(
            Goal(
                f"({part}) {n} players: equal-error budget, {ours_name} vs the best peer"
                + (
                    " (with the classifier's self-explaining model, which the peers do not have)"
                    if ours_name == PRIOR
                    else ""
                ),
                f"≥ {GOAL:g}× fewer evaluations at error {target:g}",
                f"{text} vs {PEER_LABELS[best_peer]} ({reach[best_peer][1]} vs {reach[ours_name][1]})",
                met,
                "" if met else reason,
            )
        )
    return table


def _ratio_text(peer_budget: float, our_budget: float, max_budget: int) -> tuple[float, str]:
    """``peer / ours`` and its text; a curve that never reaches the target counts as ``> max_budget``."""
    if math.isinf(peer_budget) and math.isinf(our_budget):
        return math.nan, "n/a (neither reaches it)"
    if math.isinf(peer_budget):
        bound = max_budget / our_budget
        return bound, f"> {fmt_ratio(bound)}"
    if math.isinf(our_budget):
        bound = peer_budget / max_budget
        return bound, f"< {fmt_ratio(bound)}"
    return peer_budget / our_budget, fmt_ratio(peer_budget / our_budget)


def _spending_notes(part: str, spent: dict[str, list[float]]) -> list[str]:
    notes = []
    for name, fractions in spent.items():
        low, high = min(fractions), max(fractions)
        if abs(low - 1.0) > 1e-9 or abs(high - 1.0) > 1e-9:
            notes.append(
                f"{part} {PEER_LABELS[name]} spent {low:.0%}–{high:.0%} of the nominal budget (counted); its curve "
                "is plotted at the nominal budget."
            )
    return notes


def _fairness_notes() -> list[str]:
    return [
        "Same players, baseline fill, value function (softmax probability of the explained class) and budget "
        "counting for every method. What cannot be made equal: shap pairs its samples except at half size and "
        "counts repeats instead of re-evaluating them; shapiq draws with replacement (repeats counted, not "
        "re-evaluated) and its budget includes the empty and full coalitions; Captum does not pair, evaluates "
        "repeats again, and fits an unconstrained regression (efficiency only approximately). Each peer keeps "
        "its own defaults otherwise; Leverage SHAP in shapiq 1.4 is `KernelSHAP` with equal size weights.",
        "Ours reads all classes from one set of evaluations (the peers here explain one class per call); the "
        "comparison uses the explained class only, so that does not change the counts.",
        '`ours leverage + ridge` (`ridge="gcv"`, the estimator of the experiment suites) shrinks the estimate '
        "towards the equal split by a penalty that generalised cross-validation picks: it removes the error peak "
        "of every plain least-squares fit near 2n evaluations (n players), and it shrinks the values' scale at "
        "moderate budgets, which relative L2 error counts and Pearson (a map's shape, what the suites' B* reads) "
        "does not; docs/results/kernel_shap_ridge.md measures both.",
    ]
