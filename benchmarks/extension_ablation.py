"""What limits the in-domain fidelity of the explanation extension, and what carries over to another classifier?
Training budget, capacity, learning rate, the supervision (amortised objective vs Kernel SHAP targets), the
game it fits (the source head's probabilities vs the backbone's representation), which block it reads and where its
tokens go (straight to the classifier, or through the classifier's own later blocks), per CPU-minute.

Built on a finished `extension_last_block` suite (`selfexplain experiment --config extension_last_block`: the
explanation extension on the final tokens with fresh coalitions every epoch, the `base12ep` suite's former recipe, which
these variants led away from): for each seed it reuses the suite's prediction-only MNIST classifier (frozen: every variant predicts exactly as it does), its Kernel SHAP
reference (recomputed here with the suite's seeds on the same images: the classifier's logits are all a reference
reads, so it is the reference of every variant) and the suite's Kernel SHAP budget curve (B*). Each variant trains
an extension on the same 2000 MNIST images with one change to the suite's recipe and is scored like the suite's
in-domain row: Pearson / Spearman / top-10 % with the reference (48 images), insertion and deletion AUC (500).

    python benchmarks/extension_ablation.py --seeds 0      # writes docs/results/extension_ablation.md (+ .json)
    python benchmarks/extension_ablation.py --config base12ep --seeds 0 1 2 --out docs/results/extension_ablation_full

`--config base12ep` runs the same on a finished `base12ep` suite (its classifiers, references and budget curves) with the
variants of :data:`FULL_VARIANTS`, each one change to *that* suite's recipe.

Models and references are cached under `outputs/extension_ablation/` (`outputs/extension_ablation_full/` with
`--config base12ep`; a rerun only scores); `--workers 2` trains
two variants at a time (one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "selfexplain" / "experiments" / "configs"
#: The suite the variants change (`--config`); set by `main` before anything reads it (also in worker processes,
#: which receive the parsed arguments).
CONFIG = CONFIGS / "extension_last_block.json"
SOURCE = "mnist"
TARGET = "digits"  # transfer is scored on the suite's related target

#: The session-5 recipe every original variant changes one thing of: 10 epochs at learning rate 1e-3 (the suite's
#: `train` recipe; the suite itself now trains with `explanation_train` = lr 3e-3, 30 epochs).
_OLD = {"explanation_train": {}}
#: The extension hosts tried for transfer: the generated domains (never a target), each with its own θ0 fine-tune.
HOSTS = ["digits-on-clutter", "shapes-on-clutter"]

#: The representation game (`explanation_game="representation"`: the `extension_representation` suite trains it
#: for 10 epochs), lr 3e-3, at three training lengths.
_REPR = {"explanation_game": "representation"}

#: name → (changes to the `extension_last_block` suite's config, what the change tests)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "suite recipe": (
        {},
        "the `extension_last_block` suite's model, reused: 1 block on the final tokens, 8 coalitions/image, "
        "lr 3e-3, 30 epochs",
    ),
    "10 epochs, lr 1e-3": (
        _OLD,
        "the session-5 recipe (every row down to the targets changes one thing of it)",
    ),
    "32 coalitions": (
        {**_OLD, "coalitions_per_image": 32},
        "objective noise: 4x the coalitions per image and step",
    ),
    "30 epochs": ({"explanation_train": {"num_epochs": 30}}, "training length: 3x the epochs"),
    "60 epochs": ({"explanation_train": {"num_epochs": 60}}, "training length: 6x the epochs"),
    "2 coalitions": (
        {**_OLD, "coalitions_per_image": 2},
        "the shared-head suite's 2 coalitions/image (the head compared at equal supervision)",
    ),
    "lr 3e-3": ({"explanation_train": {"learning_rate": 3e-3}}, "optimisation: a larger step"),
    "2 blocks": ({**_OLD, "explanation_extension_layers": 2}, "capacity: a second block"),
    "Kernel SHAP targets": (
        {**_OLD, "explanation_objective": "targets", "target_budget": 128, "explanation_loss_weight": 1.0},
        "supervision: fit precomputed Kernel SHAP values (budget 128, MSE) instead of the amortised objective",
    ),
    "Kernel SHAP targets, 256": (
        {**_OLD, "explanation_objective": "targets", "target_budget": 256, "explanation_loss_weight": 1.0},
        "the same with targets at budget 256 (128 is Kernel SHAP's degenerate budget at 64 players)",
    ),
    "lr 3e-3, 30 epochs": (
        {"explanation_train": {"learning_rate": 3e-3, "num_epochs": 30}},
        "the two levers that helped most, together (the suite's recipe, trained here)",
    ),
    "hosts, 10 epochs": (
        {"explanation_train": {"learning_rate": 3e-3, "num_epochs": 10}, "extension_hosts": HOSTS},
        "transfer: two frozen hosts (θ0 fine-tuned on digits-on-clutter, shapes-on-clutter), each step a batch of "
        "each (3x the work per epoch: compare with `lr 3e-3`, the same recipe without hosts, and the suite's 30 "
        "epochs, the same compute)",
    ),
    **{
        f"representation game, {epochs} epochs": (
            {**_REPR, "explanation_train": {"learning_rate": 3e-3, "num_epochs": epochs}},
            "supervision: the Shapley values of the frozen backbone's CLS token (a 64-dim game) instead of the "
            f"source head's probabilities, lr 3e-3, {epochs} epochs"
            + (
                " (the first `extension_representation` suite's recipe, clipped; compare with `lr 3e-3`)"
                if epochs == 10
                else ""
            ),
        )
        for epochs in (10, 20, 30)
    },
    # The recipe clips the gradient norm at 1.0 (TrainingConfig's default max_grad_norm).
    "lr 3e-3, no clipping": (
        {"explanation_train": {"learning_rate": 3e-3, "max_grad_norm": None}},
        "optimisation: `lr 3e-3` without gradient clipping (the recipe's max_grad_norm is 1.0)",
    ),
    # What the extension reads (`explanation_extension_input_layer`): the output of an inner block instead of the
    # final normed tokens. Fine-tuning moves the later blocks of two fine-tunes of θ0 furthest apart.
    "input block 1": (
        {"explanation_train": {"learning_rate": 3e-3}, "explanation_extension_input_layer": 1},
        "the extension reads the output of block 1 of 4 instead of the final tokens (`lr 3e-3` otherwise)",
    ),
    "input block 1, 30 epochs": (
        {
            "explanation_train": {"learning_rate": 3e-3, "num_epochs": 30},
            "explanation_extension_input_layer": 1,
        },
        "the suite's recipe with the extension reading the output of block 1",
    ),
    # Cost: the frozen classifier's values of each image's coalitions are computed once and fitted at every epoch
    # (`coalition_pool`) instead of 8 fresh ones per image and epoch (about 90 % of a training step's time).
    "input block 1, 30 epochs, pool 64": (
        {
            "explanation_train": {"learning_rate": 3e-3, "num_epochs": 30, "coalition_pool": 64},
            "explanation_extension_input_layer": 1,
        },
        "`input block 1, 30 epochs` with 64 coalitions per image drawn and valued once, all fitted every epoch",
    ),
    "input block 1, 30 epochs, pool 32": (
        {
            "explanation_train": {"learning_rate": 3e-3, "num_epochs": 30, "coalition_pool": 32},
            "explanation_extension_input_layer": 1,
        },
        "the same with 32 coalitions per image in the pool",
    ),
    # Where the extension's tokens go (`explanation_extension_route`): through the classifier's own blocks 2-4
    # (as query tokens that read the image's tokens) before its final norm and head, instead of straight to the
    # head. The blocks after block 1 are where two fine-tunes of θ0 differ most.
    "input block 1, 30 epochs, pool 64, through the backbone": (
        {
            "explanation_train": {"learning_rate": 3e-3, "num_epochs": 30, "coalition_pool": 64},
            "explanation_extension_input_layer": 1,
            "explanation_extension_route": "backbone",
        },
        "`input block 1, 30 epochs, pool 64` with the extension's tokens passed through the classifier's own "
        "blocks 2-4 (query tokens) and final norm before its head",
    ),
    "input block 1, through the backbone": (
        {
            "explanation_train": {"learning_rate": 3e-3},
            "explanation_extension_input_layer": 1,
            "explanation_extension_route": "backbone",
        },
        "`input block 1` (10 epochs, 8 fresh coalitions per image and epoch) through the backbone",
    ),
    "input block 1, 2 blocks, 30 epochs, pool 64, through the backbone": (
        {
            "explanation_train": {"learning_rate": 3e-3, "num_epochs": 30, "coalition_pool": 64},
            "explanation_extension_input_layer": 1,
            "explanation_extension_layers": 2,
            "explanation_extension_route": "backbone",
        },
        "the same with an extension of 2 blocks (capacity)",
    ),
    "input block 0, 2 blocks, 30 epochs, pool 64, through the backbone": (
        {
            "explanation_train": {"learning_rate": 3e-3, "num_epochs": 30, "coalition_pool": 64},
            "explanation_extension_input_layer": 0,
            "explanation_extension_layers": 2,
            "explanation_extension_route": "backbone",
        },
        "the same reading the embeddings: every block of the classifier carries the tokens",
    ),
    "representation game, 10 epochs, no clipping": (
        {**_REPR, "explanation_train": {"learning_rate": 3e-3, "num_epochs": 10, "max_grad_norm": None}},
        "the `representation game, 10 epochs` row without gradient clipping (the `extension_representation` "
        "suite's recipe)",
    ),
}

#: Variants of the `base12ep` suite's recipe (`--config base12ep`): two routed blocks reading block 1, pool 64, 30 epochs.
#: Transfer loses most to the change of classifier (docs/results/transfer_gap.md): these change what the
#: extension reads and how much it can express.
FULL_VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "suite recipe": (
        {},
        "the `base12ep` suite's model, reused: two routed blocks reading block 1, pool 64, 30 epochs",
    ),
    "3 blocks": ({"explanation_extension_layers": 3}, "capacity: a third extension block"),
    "input block 0": (
        {"explanation_extension_input_layer": 0},
        "the extension reads the embeddings (the least-drifted layer between two fine-tunes) and every block of "
        "the classifier carries its tokens",
    ),
    "source-side hosts": (
        {"extension_hosts": ["mnist-parity", "mnist-inverted"]},
        "transfer: every step also explains two frozen θ0 fine-tunes that differ from the source's classifier "
        "without any other domain's images (the same images with another task, `mnist-parity`; the same task on "
        "inverted images, `mnist-inverted`), each on a batch of its own (3x the work per epoch)",
    ),
}


def _variants(config: str) -> dict[str, tuple[dict[str, Any], str]]:
    return FULL_VARIANTS if config == "base12ep" else VARIANTS


def _use_config(args) -> None:
    global CONFIG
    CONFIG = CONFIGS / f"{args.config}.json"


def _prepare(name: str, seed: int, args) -> Path:
    """A work folder for the variant whose θ0 and prediction-only model are the suite's (links)."""
    out = Path(args.cache) / _slug(name)
    work = out / "work" / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    suite = Path(args.suite_work) / f"seed{seed}"
    links = ["base", f"{SOURCE}-prediction_only"]
    links += [
        f"{host}-prediction_only" for host in _variants(args.config)[name][0].get("extension_hosts", [])
    ]
    if name == "suite recipe":
        links.append(f"{SOURCE}-self_explaining")
    for link in links:
        if (
            not (work / link).exists() and (suite / link).exists()
        ):  # hosts: trained here when the suite has none
            os.symlink((suite / link).resolve(), work / link)
    return out


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _experiment(name: str, out: Path, variants: dict[str, tuple[dict[str, Any], str]] = VARIANTS):
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    # Every variant is explicit about its game: all but the representation rows play the probability game.
    changes = (
        variants[name][0] if name == "suite recipe" else {"explanation_game": "probs", **variants[name][0]}
    )
    config = ExperimentConfig.from_json_file(CONFIG, output_dir=str(out), report_dir=None, **changes)
    return Experiment(config, log=lambda message: None)


def train_variant(name: str, seed: int, args) -> dict[str, Any]:
    """Train (or find) the variant's self-explaining model; its training CPU time, with targets if any."""
    torch.set_num_threads(1)
    _use_config(args)
    out = _prepare(name, seed, args)
    experiment = _experiment(name, out, _variants(args.config))
    cfg = experiment.config
    record = out / "work" / f"seed{seed}" / "train-time.json"
    if record.exists():
        return json.loads(record.read_text())
    started = time.process_time()
    experiment.finetune(seed, SOURCE, cfg.explanation_loss_weight, experiment.with_targets(seed, SOURCE))
    cpu = time.process_time() - started
    result = {"variant": name, "seed": seed, "train_cpu_s": cpu, "timings_s": experiment.timings}
    if name == "suite recipe":  # reused: its time is the suite's training time, from the suite's unit log
        result = {"variant": name, "seed": seed, "train_cpu_s": None, "timings_s": {}}
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def reference(seed: int, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The suite's in-domain images, classes and reference for the seed (cached)."""
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    config = ExperimentConfig.from_json_file(CONFIG, output_dir=str(Path(args.suite_work).parent))
    experiment = Experiment(config, log=lambda message: None)
    test = experiment.dataset(SOURCE, seed, "test", config.num_eval)
    x = experiment.pixels(test)
    path = Path(args.cache) / f"reference-seed{seed}.safetensors"
    pred = experiment.load(experiment.work / f"seed{seed}" / f"{SOURCE}-prediction_only")
    with torch.no_grad():
        classes = pred(x, explain=None).logits.argmax(-1)
    if not path.exists():
        ref, check = experiment.reference(pred, x, classes, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"reference": ref.contiguous(), "check": torch.tensor([check])}, path)
    saved = load_file(path)
    return x, classes, saved["reference"]


def _suite_model(seed: int, domain: str, args):
    from selfexplain import ViTForSelfExplainingClassification

    return ViTForSelfExplainingClassification.from_pretrained(
        Path(args.suite_work) / f"seed{seed}" / f"{domain}-prediction_only"
    ).eval()


def logit_reference_agreement(model, x, classes, reference, seed: int, args, domain: str) -> float:
    """Pearson between the probability reference and Kernel SHAP of the *logits* (same budget, images and seed):
    how far the representation game's map (logit Shapley values) can be from the probability yardstick."""
    from selfexplain.attribution.shapley import kernel_shap_values
    from selfexplain.experiments.experiment import ExperimentConfig, agreement

    config = ExperimentConfig.from_json_file(CONFIG, output_dir=str(Path(args.suite_work).parent))
    path = Path(args.cache) / f"logit-reference-{domain}-seed{seed}.safetensors"
    rows = torch.arange(len(reference))
    if not path.exists():
        values = kernel_shap_values(
            model, x[rows], grid=config.grid(),
            budget=config.reference_budget, baseline=config.baseline, seed=10_000 + seed, value="logits",
        )[rows, classes[rows]]  # fmt: skip
        save_file({"reference": values.contiguous()}, path)
    return agreement(load_file(path)["reference"], reference)["pearson"]


def score(name: str, seed: int, x, classes, ref, curve, args) -> dict[str, Any]:
    from selfexplain.experiments.experiment import budget_match

    out = Path(args.cache) / _slug(name)
    experiment = _experiment(name, out, _variants(args.config))
    se = experiment.load(out / "work" / f"seed{seed}" / f"{SOURCE}-self_explaining")
    maps = experiment.patch_map(se, x, classes, experiment.config.grid())
    scored = experiment.score(se, x, maps, ref, None, classes)
    scored.pop("_per_image", None)
    with torch.no_grad():
        same = bool(torch.equal(se(x, explain=None).logits.argmax(-1), classes))
    return {**scored, "top1_as_classifier": same, "budget_match": budget_match(curve, scored["pearson"])}


def transfer_data(seed: int, args) -> dict[str, Any]:
    """The suite's `digits` target for the seed: its prediction-only model, test images, predictions, and its
    Kernel SHAP reference (read from the suite's cache: the same key the suite computed it under)."""
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    config = ExperimentConfig.from_json_file(CONFIG, output_dir=str(Path(args.suite_work).parent))
    experiment = Experiment(config, log=lambda message: None)
    test = experiment.dataset(TARGET, seed, "test", config.num_eval)
    x = experiment.pixels(test)
    target = experiment.load(experiment.work / f"seed{seed}" / f"{TARGET}-prediction_only")
    with torch.no_grad():
        classes = target(x, explain=None).logits.argmax(-1)
    reference, _ = experiment.reference(target, x, classes, seed)
    return {"experiment": experiment, "target": target, "x": x, "classes": classes, "reference": reference}


def score_transfer(name: str, seed: int, data: dict[str, Any], args) -> dict[str, Any]:
    """The variant's vector (self-explaining − prediction-only MNIST model) on the `digits` target at α = 1,
    scored like the suite's transfer rows (its own map of the target's predicted class)."""
    from selfexplain import ExplanationVector, apply_explanation_vector

    out = Path(args.cache) / _slug(name)
    work = out / "work" / f"seed{seed}"
    experiment = data["experiment"]
    vector = ExplanationVector.from_models(
        self_explaining=experiment.load(work / f"{SOURCE}-self_explaining"),
        prediction_only=experiment.load(work / f"{SOURCE}-prediction_only"),
    )  # its base: the one the models record (the suite's θ0, which the target shares)
    patched = apply_explanation_vector(data["target"], vector, alpha=1.0).eval()
    x, classes = data["x"], data["classes"]
    maps = experiment.patch_map(patched, x, classes, experiment.config.grid())
    scored = experiment.score(patched, x, maps, data["reference"], None, classes)
    scored.pop("_per_image", None)
    return {f"transfer_{key}": value for key, value in scored.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default="extension_last_block", choices=["extension_last_block", "base12ep"],
        help="the finished suite whose classifiers, references and recipe the variants change",
    )  # fmt: skip
    parser.add_argument("--suite-work", default=None, help="default: outputs/<config>/work")
    parser.add_argument("--cache", default=None, help="default: outputs/extension_ablation (+ _<config>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=None, help="default: every variant of the config")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "extension_ablation"))
    args = parser.parse_args(argv)
    variants = _variants(args.config)
    if args.variants is None:
        args.variants = list(variants)
    unknown = [name for name in args.variants if name not in variants]
    if unknown:
        parser.error(f"unknown variant(s) {unknown} for --config {args.config}; choose from {list(variants)}")
    args.suite_work = args.suite_work or str(ROOT / "outputs" / args.config / "work")
    suffix = "" if args.config == "extension_last_block" else f"_{args.config}"
    args.cache = args.cache or str(ROOT / "outputs" / f"extension_ablation{suffix}")
    _use_config(args)
    torch.set_num_threads(1)
    started = time.perf_counter()

    jobs = [(name, seed) for seed in args.seeds for name in args.variants]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        trained = list(pool.map(train_variant, *zip(*jobs, strict=True), [args] * len(jobs)))
    rows = []
    for seed in args.seeds:
        suite = json.loads(
            (Path(args.suite_work) / f"seed{seed}" / "results" / f"source-{SOURCE}.json").read_text()
        )
        suite = suite.get("result", suite)
        x, classes, ref = reference(seed, args)
        target = json.loads(
            (Path(args.suite_work) / f"seed{seed}" / "results" / f"target-{TARGET}.json").read_text()
        )
        target = target.get("result", target)
        transfer = transfer_data(seed, args)
        source_model = _suite_model(seed, SOURCE, args)
        logit_agreement = {
            SOURCE: logit_reference_agreement(source_model, x, classes, ref, seed, args, SOURCE),
            TARGET: logit_reference_agreement(
                transfer["target"],
                transfer["x"],
                transfer["classes"],
                transfer["reference"],
                seed,
                args,
                TARGET,
            ),
        }
        for name, info in zip(args.variants, [t for t in trained if t["seed"] == seed], strict=True):
            row = {
                "variant": name,
                "seed": seed,
                "train_cpu_s": info["train_cpu_s"],
                "timings_s": info["timings_s"],
            }
            row.update(score(name, seed, x, classes, ref, suite["kernel_shap"], args))
            row["suite_pearson"] = suite["explainers"]["self_explaining"]["pearson"]
            row["rollout_pearson"] = suite["explainers"]["attention_rollout"]["pearson"]
            row.update(score_transfer(name, seed, transfer, args))
            rollout = target["explainers"]["attention_rollout"]
            row["target_rollout"] = {k: rollout[k] for k in ("pearson", "insertion", "deletion")}
            row["suite_transfer_pearson"] = target["transfer"][SOURCE]["sweep"]["1"]["pearson"]
            row["logit_vs_prob_reference"] = logit_agreement
            rows.append(row)
            print(
                f"seed {seed} {name}: pearson {row['pearson']:.3f}, -> {TARGET} {row['transfer_pearson']:.3f}",
                file=sys.stderr,
            )
    wall = time.perf_counter() - started
    write(rows, args, wall)
    return 0


def write(rows: list[dict], args, wall: float) -> None:
    import numpy as np

    from selfexplain.experiments.experiment import _environment

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    variants = _variants(args.config)
    command = "python benchmarks/extension_ablation.py"
    command += f" --config {args.config}" if args.config != "extension_last_block" else ""
    command += " --seeds " + " ".join(map(str, args.seeds))
    if list(args.variants) != list(variants):  # a subset: the command names it, and where it wrote
        command += " --variants " + " ".join(f'"{name}"' for name in args.variants)
        command += (
            f" --out {Path(args.out).relative_to(ROOT) if Path(args.out).is_relative_to(ROOT) else args.out}"
        )
    elif Path(args.out) != ROOT / "docs" / "results" / "extension_ablation":
        command += (
            f" --out {Path(args.out).relative_to(ROOT) if Path(args.out).is_relative_to(ROOT) else args.out}"
        )
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Explanation extension: what limits its in-domain fidelity (MNIST), and what it does to transfer",
        "",
        f"Produced by `{command}` on top of `selfexplain experiment --config {args.config}`; this invocation's wall "
        f"time {wall / 60:.1f} min on {_environment(args.workers)['machine']} (variants already trained are read "
        "back: their training CPU time below is the one recorded when they were trained). Every variant trains an extension "
        '(`trainable="extension"`) on the suite\'s frozen prediction-only MNIST classifier (so every variant predicts '
        "exactly as it does) with one change to the suite's recipe; scored on the suite's MNIST test images against "
        "the suite's Kernel SHAP reference (2048 evaluations, 48 images) and its budget curve (B*). Train CPU: the "
        "variant's training, Kernel SHAP targets included, on one thread.",
        "",
        "| variant | what it tests | seeds | train CPU-min | pearson | spearman | top-10% | insertion | deletion | B* "
        f"| → {TARGET} pearson | → {TARGET} insertion − deletion |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        row["transfer_margin"] = row["transfer_insertion"] - row["transfer_deletion"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]

        def stat(key, rows=mine):
            values = np.array([r[key] for r in rows], dtype=float)
            return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "")

        cpu = [r["train_cpu_s"] for r in mine if r["train_cpu_s"] is not None]
        cpu_text = f"{np.mean(cpu) / 60:.1f}" if cpu else "(the suite's)"
        bstar = ", ".join(
            ("≤ " if b["relation"] == "below" else "> " if b["relation"] == "above" else "")
            + str(b["budget"] or b["largest_tested"])
            for b in (r["budget_match"] for r in mine)
        )
        lines.append(
            f"| {name} | {variants[name][1]} | {len(mine)} | {cpu_text} | {stat('pearson')} | {stat('spearman')} | "
            f"{stat('top10_overlap')} | {stat('insertion')} | {stat('deletion')} | {bstar} | "
            f"{stat('transfer_pearson')} | {stat('transfer_margin')} |"
        )
    first = [r for r in rows if r["variant"] == rows[0]["variant"]]
    lines += [
        "",
        f"Transfer (the last two columns): the variant's vector (its self-explaining − the prediction-only MNIST model) "
        f"added at α = 1 to the suite's `{TARGET}` classifier of the same seed, its own map of the target's predicted "
        f"class scored against the suite's Kernel SHAP reference of that classifier (48 images) and by insertion − "
        f"deletion (500 images). On the same images attention rollout has Pearson "
        + ", ".join(f"{r['target_rollout']['pearson']:.3f}" for r in first)
        + " and insertion − deletion "
        + ", ".join(
            f"{r['target_rollout']['insertion'] - r['target_rollout']['deletion']:.3f}" for r in first
        )
        + "; the suite's own transfer row (α = 1) has Pearson "
        + ", ".join(f"{r['suite_transfer_pearson']:.3f}" for r in first)
        + " (the `suite recipe` row recomputes it).",
        "",
        "In-domain attention rollout on the same images (the suite's): Pearson "
        + ", ".join(f"{r['rollout_pearson']:.3f}" for r in rows if r["variant"] == rows[0]["variant"])
        + ". The representation-game rows give each classifier's *logit* Shapley values: on the same images the "
        + "Kernel SHAP reference of the logits (same budget and seed) agrees with the probability reference at "
        + "Pearson "
        + "; ".join(", ".join(f"{d} {v:.3f}" for d, v in r["logit_vs_prob_reference"].items()) for r in first)
        + ". Every variant's top-1 equals the classifier's: "
        + str(all(r["top1_as_classifier"] for r in rows))
        + ".",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
