"""``selfexplain pretrain-base``, ``experiment`` and ``demo``: the offline base θ0 and the transfer experiment."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from importlib import resources
from pathlib import Path

from ..experiments.experiment import Experiment, ExperimentConfig
from ..experiments.report import _budget_text, pair_deltas, write_report
from ..training import pretrain_base


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain-base``, ``experiment`` and ``demo``."""
    p = sub.add_parser("pretrain-base", help="Pre-train a small ViT base θ0 on the built-in offline domains.")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    # Defaults: the recipe of the packaged experiments and of the packaged base `patch4-union` (an 8×8 patch grid).
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=4, help="4 on 32×32 images: an 8×8 patch grid.")
    p.add_argument("--domains", nargs="+", default=["union"], help="Built-in domains to pre-train on.")
    p.add_argument("--num-samples", type=int, default=None, help="Images per domain (default: all).")
    p.set_defaults(handler=_cmd_pretrain_base)

    p = sub.add_parser("experiment", help="Run a transfer experiment suite and write its report.")
    p.add_argument(
        "--config",
        required=True,
        help=f"A JSON file, or the name of a packaged suite ({', '.join(packaged_suites())}).",
    )
    p.add_argument("--output-dir", default=None, help="Work folder (models, targets); default: the config's.")
    p.add_argument("--report-dir", default=None, help="Where report.md and plots go; default: the config's.")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Override the config's seeds.")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Worker processes (default: the config's; set to your cores).",
    )
    p.set_defaults(handler=_cmd_experiment)

    p = sub.add_parser(
        "demo", help="The embedded default: a small transfer experiment, a few minutes on CPU."
    )
    p.add_argument(
        "--output-dir", default="outputs/demo", help="Work folder and report (default: outputs/demo)."
    )
    p.set_defaults(handler=_cmd_demo)


def _cmd_pretrain_base(args: argparse.Namespace) -> None:
    info = pretrain_base(
        args.output_dir,
        seed=args.seed,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        patch_size=args.patch_size,
        domains=tuple(args.domains),
        num_samples=args.num_samples,
    )
    print(json.dumps(info, indent=2, default=str))


def packaged_suites() -> list[str]:
    """Names of the experiment configs shipped in ``selfexplain/experiments/configs``."""
    folder = resources.files("selfexplain.experiments").joinpath("configs")
    return sorted(
        entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json")
    )


def packaged_config(name: str) -> Path:
    """Path of a packaged experiment config (e.g. `demo`, `full`), or `name` itself when it is a file."""
    if Path(name).is_file():
        return Path(name)
    candidate = resources.files("selfexplain.experiments").joinpath("configs", f"{name}.json")
    if not candidate.is_file():
        raise FileNotFoundError(
            f"{name}: no such config file, and not a packaged suite ({', '.join(packaged_suites())})."
        )
    return Path(str(candidate))


def _cmd_experiment(args: argparse.Namespace, command: str | None = None) -> dict:
    config = ExperimentConfig.from_json_file(
        packaged_config(args.config),
        output_dir=args.output_dir,
        report_dir=args.report_dir,
        seeds=args.seeds,
        workers=args.workers,
    )
    experiment = Experiment(config)
    results = experiment.run()
    report_dir = Path(config.report_dir or Path(config.output_dir) / "report")
    experiment.heatmap_figure(report_dir / "heatmaps.png")
    command = command or "selfexplain " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = write_report(results, report_dir, command)
    print(f"Report: {path}")
    return results


def _cmd_demo(args: argparse.Namespace) -> None:
    ns = argparse.Namespace(
        config="demo",
        output_dir=args.output_dir,
        report_dir=str(Path(args.output_dir) / "report"),
        seeds=None,
        workers=None,
    )
    results = _cmd_experiment(ns, command=f"selfexplain demo --output-dir {args.output_dir}")
    seed = str(results["config"]["seeds"][0])
    print("\nIn-domain: one pass of the self-explaining source model vs Kernel SHAP of the same model")
    for source, res in results["in_domain"][seed].items():
        own, head = res["explainers"]["self_explaining"], res["explainers"]["prediction_only_head"]
        curve = ", ".join(
            f"{b}: {res['kernel_shap'][b]['pearson']:.2f}" for b in sorted(res["kernel_shap"], key=int)
        )
        print(
            f"  {source}: Pearson with the reference {own['pearson']:.3f} (untrained head: {head['pearson']:.3f}; "
            f"rollout {res['explainers']['attention_rollout']['pearson']:.3f}, Grad-CAM "
            f"{res['explainers']['grad_cam']['pearson']:.3f}); Kernel SHAP by budget {curve}; "
            f"B* {_budget_text(res['budget_match'])}; reference seeds agree at {res['reference_seed_agreement']:.3f}; "
            f"accuracy {res['accuracy_prediction_only']:.3f} → {res['accuracy_self_explaining']:.3f}"
        )
    print(
        "Transfer: target's own patch scores (α = 0) → with the explanation vector (α recommended on the source)"
    )
    for (source, target), entry in sorted(pair_deltas(results, "recommended_alpha").items()):
        res = results["per_seed"][seed][target]
        sweep = res["transfer"][source]["sweep"]
        before, after = sweep["0"], sweep[f"{entry['alpha'][0]:g}"]
        print(
            f"  {source} → {target} (α = {entry['alpha'][0]:g}): Pearson with Kernel SHAP {before['pearson']:.3f} → "
            f"{after['pearson']:.3f} (rollout {res['explainers']['attention_rollout']['pearson']:.3f}, Grad-CAM "
            f"{res['explainers']['grad_cam']['pearson']:.3f}"
            + (
                f"; blended with rollout {res['transfer'][source]['blend_with_rollout']['pearson']:.3f}"
                if "blend_with_rollout" in res["transfer"][source]
                else ""
            )
            + f"), insertion {before['insertion']:.3f} → "
            f"{after['insertion']:.3f}, deletion {before['deletion']:.3f} → {after['deletion']:.3f}, "
            f"accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f}, predictions kept {after['top1_agreement']:.1%}"
        )
    print(f"Heatmaps: {Path(args.output_dir) / 'report' / 'heatmaps.png'}")
