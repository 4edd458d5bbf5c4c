"""Render an experiment's results (`experiment.Experiment.run`) as markdown tables and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

METRICS = ("insertion", "deletion", "pearson", "spearman", "top10_overlap", "accuracy")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], signed: bool = False) -> str:
    mean, std = _mean_std(values)
    sign = "+" if signed else ""
    return f"{mean:{sign}.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:{sign}.3f}"


def pair_deltas(results: dict[str, Any], alpha_rule: str) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per (source, target): lists over seeds of metric(α chosen by `alpha_rule`) − metric(α = 0)."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for per_target in results["per_seed"].values():
        for target, res in per_target.items():
            for source, transfer in res["transfer"].items():
                alpha = transfer[alpha_rule] if alpha_rule != "1" else 1.0
                sweep = transfer["sweep"]
                chosen, zero = sweep.get(f"{alpha:g}"), sweep["0"]
                if chosen is None:
                    continue
                entry = out.setdefault(
                    (source, target), {m: [] for m in (*METRICS, "alpha", "top1_agreement")}
                )
                for metric in METRICS:
                    entry[metric].append(chosen[metric] - zero[metric])
                entry["alpha"].append(alpha)
                entry["top1_agreement"].append(chosen["top1_agreement"])
    return out


def crossover(results: dict[str, Any], metric: str = "pearson", alpha_rule: str = "recommended_alpha"):
    """Smallest Kernel SHAP budget whose `metric` reaches the transferred map's, per (source, target, seed)."""
    rows = []
    for seed, per_target in results["per_seed"].items():
        for target, res in per_target.items():
            curve = res.get("kernel_shap")
            if not curve:
                continue
            for source, transfer in res["transfer"].items():
                alpha = transfer[alpha_rule]
                value = transfer["sweep"][f"{alpha:g}"][metric]
                better = lambda a, b: a <= b if metric == "deletion" else a >= b  # noqa: E731
                # Budgets in numeric order: results.json sorts its keys as strings ("1024" before "64").
                budget = next(
                    (int(b) for b in sorted(curve, key=int) if better(curve[b][metric], value)), None
                )
                # How close Kernel SHAP comes below B*: on a coarse grid, and with Kernel SHAP ill-conditioned
                # near 2n evaluations, B* alone can overstate how many evaluations the map is worth.
                below = [b for b in curve if budget is None or int(b) < budget]
                closest = max(
                    below, key=lambda b: curve[b][metric] * (-1 if metric == "deletion" else 1), default=None
                )
                rows.append(
                    {
                        "seed": seed,
                        "source": source,
                        "target": target,
                        "alpha": alpha,
                        "value": value,
                        "budget": budget,
                        "closest_below": None if closest is None else (int(closest), curve[closest][metric]),
                    }
                )
    return rows


def write_report(results: dict[str, Any], report_dir: str | Path, command: str) -> Path:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    cfg = results["config"]
    seeds = cfg["seeds"]
    lines = [
        f"# Explanation transfer: `{cfg['name']}` suite",
        "",
        f"Produced by `{command}` (seeds {seeds}); {_wall_text(results)} on "
        f"{results['environment']['machine']} (torch {results['environment']['torch']}, transformers "
        f"{results['environment']['transformers']}). Raw numbers: `results.json`; the config is reproduced at the end.",
        "",
        "Every number is a mean over the evaluated target test images; with several seeds, `mean ± std` over seeds.",
        "Δ = metric after adding the vector − the same metric for the target's own patch scores (α = 0, no transfer).",
        "Insertion: higher is better; deletion: lower is better (on every evaluated image, "
        f"{cfg['auc_steps']} steps). Pearson, Spearman and top-10% overlap: agreement with a Kernel SHAP reference "
        f"of the target model (budget {cfg['reference_budget']}, {_design(cfg)}, on the first {cfg['num_reference']} "
        "images); maps "
        f"live on a {results['grid'][0]}×{results['grid'][1]} player grid (the patch grid), baseline `{cfg['baseline']}`.",
        "",
    ]
    if results.get("in_domain"):
        lines += _in_domain_section(results)
    for rule, title in (
        ("recommended_alpha", "α recommended on the source's validation images"),
        (
            "label_free_alpha",
            f"α chosen label-free on unlabelled target images (top-1 agreement ≥ {cfg['agreement_threshold']})",
        ),
        ("1", "α = 1"),
    ):
        deltas = pair_deltas(results, rule)
        lines += [
            f"## Transfer matrix, {title}",
            "",
            "| source → target | α | Δinsertion | Δdeletion | Δpearson | Δspearman | Δtop-10% | Δaccuracy | top-1 kept |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (source, target), entry in sorted(deltas.items()):
            lines.append(
                f"| {source} → {target} | {_fmt(entry['alpha'])} | {_fmt(entry['insertion'], True)} | "
                f"{_fmt(entry['deletion'], True)} | {_fmt(entry['pearson'], True)} | {_fmt(entry['spearman'], True)} | "
                f"{_fmt(entry['top10_overlap'], True)} | {_fmt(entry['accuracy'], True)} | "
                f"{_fmt(entry['top1_agreement'])} |"
            )
        improved = [
            k for k, e in deltas.items() if _mean_std(e["insertion"])[0] - _mean_std(e["deletion"])[0] > 0
        ]
        failed = [k for k in deltas if k not in improved]
        lines += [
            "",
            f"Faithfulness (Δinsertion − Δdeletion > 0) improved on {len(improved)} of {len(deltas)} pairs."
            + (
                f" **Transfer failed on:** {', '.join(f'{s} → {t}' for s, t in sorted(failed))}."
                if failed
                else ""
            ),
            "",
        ]

    lines += _paired_section(results)
    lines += _blend_section(results)
    lines += ["## Explainers on the target models (no vector)", "", _explainer_table(results), ""]
    lines += ["## α sweep", "", _sweep_table(results), "", "![metrics vs alpha](alpha_sweep.png)", ""]
    cross = crossover(results)
    if cross:
        lines += [
            "## Kernel SHAP crossover",
            "",
            "Smallest Kernel SHAP budget (model evaluations per image) whose Pearson with the reference reaches the "
            "single-pass transferred map's (recommended α); `none` means the map beats every budget tested. The "
            "last column is Kernel SHAP's best Pearson at a smaller budget: " + _coarse_grid_caveat(cfg),
            "",
            "| seed | source → target | α | transferred map's Pearson | B* | Kernel SHAP's best below B* |",
            "|---|---|---|---|---|---|",
        ]
        for row in cross:
            budget = "none (map is better than all budgets)" if row["budget"] is None else row["budget"]
            if row["budget"] is not None and row["budget"] == min(cfg["kernel_shap_budgets"]):
                budget = f"≤ {budget} (the smallest tested)"
            closest = row.get("closest_below")
            closest = "—" if closest is None else f"{closest[1]:.3f} (at {closest[0]})"
            lines.append(
                f"| {row['seed']} | {row['source']} → {row['target']} | {row['alpha']:g} | {row['value']:.3f} | "
                f"{budget} | {closest} |"
            )
        lines += ["", "![quality vs Kernel SHAP budget](kernel_shap_budget.png)", ""]
    if (report_dir / "heatmaps.png").exists():
        lines += ["## Heatmaps", "", "![heatmaps before and after](heatmaps.png)", ""]
    lines += ["## Config", "", "```json", json.dumps(cfg, indent=2, sort_keys=True), "```", ""]
    (report_dir / "report.md").write_text("\n".join(lines))
    _plots(results, report_dir)
    return report_dir / "report.md"


def _in_domain_section(results: dict[str, Any]) -> list[str]:
    """In-domain fidelity of each source's self-explaining model, against a reference of the same model."""
    cfg = results["config"]
    lines = [
        "## In-domain fidelity (source test images)",
        "",
        "The source's self-explaining model explains its own predictions in one forward pass. Reference: Kernel SHAP "
        f"of the same model at {cfg['reference_budget']} evaluations ({_design(cfg)}); its convergence is the "
        "Pearson between two reference seeds. B*: the smallest Kernel SHAP budget whose Pearson with the reference "
        "reaches the single pass's (`< b`: already the smallest budget tested; `> b`: none tested does).",
        "",
        "| source | accuracy (pred-only → self-explaining) | reference seeds agree | explainer | insertion | deletion | "
        "pearson | spearman | top-10% | B* |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple[str, str], dict[str, list]] = {}
    for per_source in results["in_domain"].values():
        for source, res in per_source.items():
            for name, entry in res["explainers"].items():
                slot = rows.setdefault(
                    (source, name), {"acc_p": [], "acc_s": [], "agree": [], "B": [], **{m: [] for m in entry}}
                )
                for m, v in entry.items():
                    slot[m].append(v)
                slot["acc_p"].append(res["accuracy_prediction_only"])
                slot["acc_s"].append(res["accuracy_self_explaining"])
                slot["agree"].append(res["reference_seed_agreement"])
                if name == "self_explaining":
                    slot["B"].append(_budget_text(res["budget_match"]))
    for (source, name), slot in sorted(
        rows.items(), key=lambda r: (r[0][0], r[0][1] != "self_explaining", r[0][1])
    ):
        lines.append(
            f"| {source} | {_fmt(slot['acc_p'])} → {_fmt(slot['acc_s'])} | {_fmt(slot['agree'])} | {name} | "
            f"{_fmt(slot['insertion'])} | {_fmt(slot['deletion'])} | {_fmt(slot['pearson'])} | {_fmt(slot['spearman'])} | "
            f"{_fmt(slot['top10_overlap'])} | {', '.join(slot['B']) or '—'} |"
        )
    curve_rows = []
    for seed, per_source in results["in_domain"].items():
        for source, res in per_source.items():
            cells = " | ".join(
                f"{res['kernel_shap'][b]['pearson']:.3f}" for b in sorted(res["kernel_shap"], key=int)
            )
            curve_rows.append(f"| {seed} | {source} | {cells} |")
    budgets = sorted(next(iter(next(iter(results["in_domain"].values())).values()))["kernel_shap"], key=int)
    lines += [
        "",
        "Kernel SHAP's own Pearson with the reference, by budget (evaluations per image):",
        "",
        "| seed | source | " + " | ".join(budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
        *curve_rows,
        "",
    ]
    return lines


def _wall_text(results: dict[str, Any]) -> str:
    """This invocation's wall time, and the units' own (a resumed suite reads finished units back in seconds)."""
    text = f"this invocation's wall time {results['wall_time_s'] / 60:.1f} min"
    units = results.get("unit_wall_s")
    if units:
        longest = max(units, key=units.get)
        text += (
            f" (the {len(units)} units took {sum(units.values()) / 60:.0f} min of worker time in all when computed, "
            f"the longest `{longest}` {units[longest] / 60:.1f} min; a resumed run reads finished units back)"
        )
    return text


def _ci_text(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "—"
    low, high = entry["ci95"]
    star = "" if low <= 0 <= high else " *"
    return f"{entry['mean_diff']:+.3f} [{low:+.3f}, {high:+.3f}]{star}"


def _blend_section(results: dict[str, Any]) -> list[str]:
    """The transferred map blended with the target's attention rollout, beside both, per seed and pair."""
    rows = []
    for seed, per_target in results["per_seed"].items():
        for target, res in sorted(per_target.items()):
            rollout = res["explainers"]["attention_rollout"]
            for source, transfer in sorted(res["transfer"].items()):
                blend = transfer.get("blend_with_rollout")
                if not blend:  # a unit computed before the blend was part of the suite
                    continue
                alpha = f"{transfer['recommended_alpha']:g}"
                single = transfer["sweep"][alpha]
                paired = blend["paired_vs_rollout"]
                rows.append(
                    f"| {seed} | {source} → {target} | {alpha} | {single['pearson']:.3f} | {rollout['pearson']:.3f} | "
                    f"{blend['pearson']:.3f} | {single['insertion'] - single['deletion']:.3f} | "
                    f"{rollout['insertion'] - rollout['deletion']:.3f} | "
                    f"{blend['insertion'] - blend['deletion']:.3f} | "
                    f"{_ci_text(paired['insertion_minus_deletion'])} | {_ci_text(paired['pearson'])} |"
                )
    if not rows:
        return []
    return [
        "## Transferred map blended with attention rollout",
        "",
        "The transferred map (α recommended on the source) and the target's attention rollout, each standardised "
        "per image and averaged (`selfexplain.standardized_blend`; nothing fitted): if the vector carried nothing "
        "rollout lacks, the blend could not beat rollout. Pearson with the reference; insertion − deletion; and the "
        "blend − rollout paired differences on the same images (95 % bootstrap CI, `*`: excludes 0).",
        "",
        "| seed | source → target | α | Pearson: transferred | rollout | blend | ins − del: transferred | rollout | "
        "blend | blend − rollout: Δ(ins − del) [95% CI] | ΔPearson [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _paired_section(results: dict[str, Any]) -> list[str]:
    """Paired per-image differences with 95 % bootstrap CIs (``*``: the interval excludes 0), per seed."""
    in_domain_rows, transfer_rows = [], []
    for seed, per_source in results.get("in_domain", {}).items():
        for source, res in sorted(per_source.items()):
            for other, measures in sorted(res.get("paired", {}).items()):
                if other == "random":  # beating random is no news; its absolute numbers are in the tables
                    continue
                in_domain_rows.append(
                    f"| {seed} | {source} | {other} | {_ci_text(measures.get('insertion_minus_deletion'))} | "
                    f"{_ci_text(measures.get('pearson'))} | "
                    f"{measures['insertion_minus_deletion']['better_share']:.2f} |"
                )
    for seed, per_target in results["per_seed"].items():
        for target, res in sorted(per_target.items()):
            for source, transfer in sorted(res["transfer"].items()):
                for other, measures in sorted(transfer.get("paired", {}).items()):
                    if other == "random":
                        continue
                    transfer_rows.append(
                        f"| {seed} | {source} → {target} | {transfer['recommended_alpha']:g} | {other} | "
                        f"{_ci_text(measures.get('insertion_minus_deletion'))} | "
                        f"{_ci_text(measures.get('pearson'))} | "
                        f"{measures['insertion_minus_deletion']['better_share']:.2f} |"
                    )
    if not in_domain_rows and not transfer_rows:
        return []
    header = (
        "| seed | {what} | compared with | Δ(insertion − deletion) [95% CI] | ΔPearson [95% CI] | "
        "images where the map is better |"
    )
    lines = [
        "## Paired comparisons (same images)",
        "",
        "Per-image differences `map − other` (insertion − deletion on every evaluated image, Pearson with the "
        "reference on the reference images), mean and 95 % bootstrap confidence interval over images; `*` marks an "
        "interval that excludes 0. The last column is the share of images on which the map's insertion − deletion "
        "is the higher.",
        "",
    ]
    if in_domain_rows:
        lines += [
            "In-domain: the self-explaining source model's single pass against the other maps of the same model.",
            "",
            header.format(what="source"),
            "|---|---|---|---|---|---|",
            *in_domain_rows,
            "",
        ]
    if transfer_rows:
        lines += [
            "Transfer: the patched target's map (α recommended on the source) against the target's own map "
            "(`no_transfer`), the explainers that need no training, and the oracle when the suite trains one.",
            "",
            header.format(what="source → target | α"),
            "|---|---|---|---|---|---|---|",
            *transfer_rows,
            "",
        ]
    return lines


def _budget_text(match: dict[str, Any] | None) -> str:
    if not match:
        return "—"
    if match["relation"] == "above":
        return f"> {match['largest_tested']}"
    if match["relation"] == "below":
        return f"≤ {match['budget']}"
    return str(match["budget"])


def _explainer_table(results: dict[str, Any]) -> str:
    rows = {}
    for per_target in results["per_seed"].values():
        for target, res in per_target.items():
            for name, entry in res["explainers"].items():
                slot = rows.setdefault(
                    (target, name),
                    {
                        m: []
                        for m in (
                            "insertion",
                            "deletion",
                            "pearson",
                            "spearman",
                            "top10_overlap",
                            "pointing_game",
                        )
                    },
                )
                for m in slot:
                    if m in entry:
                        slot[m].append(entry[m])
    out = [
        "| target | explainer | insertion | deletion | pearson | spearman | top-10% | pointing game |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (target, name), slot in sorted(rows.items()):
        pg = _fmt(slot["pointing_game"]) if slot["pointing_game"] else "n/a"
        out.append(
            f"| {target} | {name} | {_fmt(slot['insertion'])} | {_fmt(slot['deletion'])} | {_fmt(slot['pearson'])} | "
            f"{_fmt(slot['spearman'])} | {_fmt(slot['top10_overlap'])} | {pg} |"
        )
    return "\n".join(out)


def _sweep_table(results: dict[str, Any]) -> str:
    rows: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for per_target in results["per_seed"].values():
        for target, res in per_target.items():
            for source, transfer in res["transfer"].items():
                for alpha, entry in transfer["sweep"].items():
                    slot = rows.setdefault(
                        (source, target, alpha), {m: [] for m in (*METRICS, "top1_agreement")}
                    )
                    for m in slot:
                        slot[m].append(entry[m])
    out = [
        "| source → target | α | insertion | deletion | pearson | spearman | accuracy | top-1 kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (source, target, alpha), slot in sorted(
        rows.items(), key=lambda r: (r[0][0], r[0][1], float(r[0][2]))
    ):
        out.append(
            f"| {source} → {target} | {alpha} | {_fmt(slot['insertion'])} | {_fmt(slot['deletion'])} | "
            f"{_fmt(slot['pearson'])} | {_fmt(slot['spearman'])} | {_fmt(slot['accuracy'])} | {_fmt(slot['top1_agreement'])} |"
        )
    return "\n".join(out)


def _plots(results: dict[str, Any], report_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    curves: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for per_target in results["per_seed"].values():
        for target, res in per_target.items():
            for source, transfer in res["transfer"].items():
                for alpha, entry in transfer["sweep"].items():
                    curves.setdefault(f"{source}→{target}", {}).setdefault(float(alpha), []).append(
                        (entry["insertion"] - entry["deletion"], entry["pearson"])
                    )
    for label, points in curves.items():
        alphas = sorted(points)
        for i, ax in enumerate(axes):
            ax.plot(
                alphas, [statistics.fmean(p[i] for p in points[a]) for a in alphas], marker="o", label=label
            )
    axes[0].set(xlabel="α", ylabel="insertion − deletion", title="Faithfulness vs α")
    axes[1].set(xlabel="α", ylabel="Pearson with Kernel SHAP reference", title="Agreement vs α")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report_dir / "alpha_sweep.png", dpi=110)
    plt.close(fig)

    cross_fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for per_target in results["per_seed"].values():
        for target, res in per_target.items():
            curve = res.get("kernel_shap")
            if not curve:
                continue
            keys = sorted(curve, key=int)
            line = ax.plot(
                [int(b) for b in keys],
                [curve[b]["pearson"] for b in keys],
                marker="o",
                label=f"Kernel SHAP, {target}",
            )
            for source, transfer in res["transfer"].items():
                value = transfer["sweep"][f"{transfer['recommended_alpha']:g}"]["pearson"]
                ax.axhline(
                    value,
                    linestyle="--",
                    color=line[0].get_color(),
                    alpha=0.7,
                    label=f"{source}→{target} map (1 pass)",
                )
            plotted = True
        break
    if plotted:
        ax.set(
            xscale="log",
            xlabel="model evaluations per image",
            ylabel="Pearson with reference",
            title="Quality vs Kernel SHAP budget",
        )
        ax.legend(fontsize=6)
        cross_fig.tight_layout()
        cross_fig.savefig(report_dir / "kernel_shap_budget.png", dpi=110)
    plt.close(cross_fig)


def _design(cfg: dict[str, Any]) -> str:
    """How the suite's Kernel SHAP draws its coalitions (every Kernel SHAP of the report: reference and curve)."""
    if cfg.get("kernel_shap_sampler", "kernel") == "leverage":
        design = "Leverage SHAP's design: every coalition size alike, without replacement, paired"
    else:
        design = "shap's design: paired sampling, the smallest and largest sizes first"
    if cfg.get("kernel_shap_ridge", "none") == "gcv":
        design += "; fitted with a ridge penalty chosen by generalised cross-validation"
    return design


def _coarse_grid_caveat(cfg: dict[str, Any]) -> str:
    if cfg.get("kernel_shap_ridge", "none") == "gcv":  # the ridge removes the error peak near 2n evaluations
        return (
            "the grid is coarse, so a B* far above a budget that comes within a few hundredths of the map says "
            "less than it seems."
        )
    return (
        "the grid is coarse, and Kernel SHAP without a ridge is ill-conditioned near 2 × the number of players, so "
        "a B* far above a budget that comes within a few hundredths of the map says less than it seems."
    )
