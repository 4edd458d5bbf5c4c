"""Model cards for explanation vectors and self-explaining models, rendered from `model_cards/` templates."""

from __future__ import annotations

import os
from importlib import resources
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from .hub import could_be_repo_id

if TYPE_CHECKING:
    from .vectors.vector import ExplanationVectorConfig

#: Private attribute on which `apply_explanation_vector` keeps the source model's image processor, so that the
#: applied model's `save_pretrained` writes it (`write_applied_model_files`).
IMAGE_PROCESSOR_ATTRIBUTE = "_selfexplain_image_processor"

TAGS = ["selfexplain", "explainability", "vision-transformer", "image-classification"]


def _template(name: str) -> str:
    return resources.files("selfexplain").joinpath("model_cards", name).read_text(encoding="utf-8")


def _metrics_table(metrics: dict[str, Any] | None, header: str = "metric") -> str:
    if not metrics:
        return ""
    rows = [f"| {header} | value |", "|---|---|"]
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append(f"| {key} | {shown} |")
    return "\n".join(rows)


def render_vector_card(config: ExplanationVectorConfig, repo_id: str | None = None) -> ModelCard:
    """The `README.md` of an explanation vector repo (metadata the Hub understands + usage + limitations)."""
    from .vectors.config import format_version_for

    provenance = dict(config.provenance)
    source_dataset = provenance.get("source_dataset")
    card_data = ModelCardData(
        library_name="selfexplain",
        base_model=config.base_model,
        pipeline_tag="image-classification",
        tags=list(TAGS) + ["explanation-vector", "task-arithmetic"],
        datasets=_card_datasets(source_dataset, provenance.get("merge")),
        license=provenance.get("license", "apache-2.0"),
        base_model_relation="adapter" if config.base_model else None,
    )
    num_parameters = sum(_numel(spec["shape"]) for spec in config.tensors.values())
    merge = provenance.get("merge")
    return ModelCard.from_template(
        card_data,
        template_str=_template("explanation_vector.md"),
        title=f"Explanation vector{f' for {config.base_model}' if config.base_model else ''}",
        repo_id=repo_id or provenance.get("repo_id") or "me/explanation-vector",
        base_model=config.base_model,
        base_model_revision=config.base_model_revision,
        source_dataset=source_dataset,
        explanation_loss_weight=provenance.get("explanation_loss_weight"),
        explanation_loss=provenance.get("explanation_loss"),
        targets=provenance.get("targets"),
        recipe=provenance.get("recipe"),
        num_tensors=len(config.tensors),
        num_parameters=f"{num_parameters:,}",
        key_patterns=provenance.get("include", "vit.*, explainer.*" if config.extension_layers else "vit.*"),
        extension_layers=config.extension_layers,
        extension_input_layer=config.extension_input_layer,
        extension_route=config.extension_route,
        format_version=format_version_for(
            config.tensors,
            config.compression is not None,
            config.extension_input_layer,
            config.extension_route,
        ),
        storage_dtype=config.storage_dtype,
        compression=_compression_line(config),
        recommended_alpha=config.recommended_alpha,
        metrics_table=_metrics_table(provenance.get("metrics")),
        merge_summary=_merge_summary(merge),
        merge_table=_merge_table(merge),
    )


def render_model_card(
    repo_id: str,
    *,
    base_model: str | None = None,
    applied_vector: str | None = None,
    alpha: float | None = None,
    resized: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    label_names: list[str] | None = None,
    training: dict[str, Any] | None = None,
    prediction_only: bool = False,
) -> ModelCard:
    """The `README.md` of a self-explaining model repo.

    `training` (shown as a table; from `selfexplain.training.train`) says how the model was trained;
    `prediction_only` describes a classifier trained with explanation loss weight 0 (the partner of a
    self-explaining one when an explanation vector is extracted), whose explanation output was never trained.
    """
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base_model if _is_hub_id(base_model) else None,
        pipeline_tag="image-classification",
        tags=list(TAGS) + ["self-explaining"],
        license="apache-2.0",
    )
    return ModelCard.from_template(
        card_data,
        template_str=_template("self_explaining_model.md"),
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        applied_vector=applied_vector,
        alpha=alpha,
        resized_from="×".join(str(n) for n in resized["from"]) if resized else None,
        resized_to="×".join(str(n) for n in resized["to"]) if resized else None,
        metrics_table=_metrics_table(metrics),
        label_names=label_names,
        prediction_only=prediction_only,
        training_table=_metrics_table(training, header="setting"),
    )


def write_applied_model_files(
    model: Any, save_directory: str | os.PathLike, repo_id: str | None = None
) -> None:
    """Write what a model made by :func:`~selfexplain.apply_explanation_vector` needs beside its weights
    (called by its ``save_pretrained``, after the weights and config):

    - the image processor of the model it was made from (``preprocessor_config.json``), when that model had one,
      so that the saved folder runs in ``pipeline("image-classification", model=folder)``;
    - its ``README.md``: which vector, which α, which base.

    Models that no vector was applied to are left alone.
    """
    processor = getattr(model, IMAGE_PROCESSOR_ATTRIBUTE, None)
    if processor is not None:
        processor.save_pretrained(save_directory)
    applied = getattr(model.config, "selfexplain_applied_vector", None)
    if not applied:
        return
    card = render_model_card(
        repo_id or os.path.basename(os.path.abspath(save_directory)),
        base_model=applied.get("vector_base_model"),
        applied_vector=applied.get("vector") or "an explanation vector in memory",
        alpha=_alpha_text(applied.get("alpha"), applied.get("alpha_fit")),
        resized=applied.get("resized_position_embeddings"),
    )
    card.save(os.path.join(save_directory, "README.md"))


def _alpha_text(alpha: Any, fit: dict[str, Any] | None) -> str:
    """α as a card says it: a number, or one per transformer block; and how it was chosen, when fitted."""
    if isinstance(alpha, dict):
        blocks = ", ".join(f"{value:g}" for value in alpha.get("blocks", []))
        text = f"{alpha.get('other', 0.0):g} outside the blocks and [{blocks}] for transformer blocks 0, 1, …"
    else:
        text = f"{alpha:g}" if isinstance(alpha, (int, float)) else str(alpha)
    if fit:
        text += (
            f" (fitted by `fit_alpha` on {fit.get('num_images')} unlabelled images, {fit.get('forward_passes'):,} "
            f"forward passes: insertion − deletion of the model's own map {fit.get('unpatched_objective', 0):.4f} at "
            f"α = 0 → {fit.get('objective', 0):.4f}, top-1 predictions kept {fit.get('top1_agreement', 0):.3f})"
        )
    return text


#: The name `ViTForSelfExplainingClassification.save_pretrained` calls (kept: saved models' remote code uses it).
write_applied_model_card = write_applied_model_files


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` can be a Hub repo id (a local folder, e.g. an offline base, is not card metadata)."""
    return bool(name) and not os.path.exists(name) and could_be_repo_id(name)


def _card_datasets(source_dataset: Any, merge: Any) -> list[str] | None:
    """Hub dataset ids for the card metadata: the source data, or every merged input's (ids only, not names)."""
    names = [source_dataset]
    if isinstance(merge, dict) and isinstance(merge.get("inputs"), list):
        names += [i.get("source_dataset") for i in merge["inputs"] if isinstance(i, dict)]
    found = [n for n in names if isinstance(n, str) and "/" in n and could_be_repo_id(n)]
    return list(dict.fromkeys(found)) or None


def _cell(value: Any, limit: int = 80) -> str:
    """A table cell from a value of a config read from strangers: plain text, one line, bounded, no pipes."""
    if value is None:
        return "—"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _compression_line(config: ExplanationVectorConfig) -> str | None:
    """How the file's tensors are encoded (the config's `compression` record), for the card; None when dense."""
    record = config.compression
    if not isinstance(record, dict):
        return None
    parts = []
    if record.get("rank") is not None:
        parts.append(f"low-rank, rank {_cell(record['rank'], 12)} per matrix (truncated SVD)")
    density = record.get("density")
    if record.get("sparsity") == "top_k":
        parts.append(f"top-k magnitude, {_cell(density, 12)} of the entries kept")
    elif record.get("sparsity") == "dare" and isinstance(density, (int, float)):
        parts.append(
            f"DARE drop-and-rescale, drop rate {_cell(1 - density, 12)}, seed {_cell(record.get('seed'), 24)}"
        )
    return " + ".join(parts) or None


def _merge_summary(merge: Any) -> str | None:
    if not isinstance(merge, dict):
        return None
    parts = [f"method `{_cell(merge.get('method'), 40)}`"]
    for name in ("density", "seed", "majority_sign"):
        if merge.get(name) is not None:
            parts.append(f"{name.replace('_', ' ')} {_cell(merge.get(name), 40)}")
    return ", ".join(parts)


def _merge_table(merge: Any) -> str:
    """One row per merged input: name, source, weight, base, recommended α, source data, SHA-256 prefix."""
    if not isinstance(merge, dict) or not isinstance(merge.get("inputs"), list):
        return ""
    weights = merge.get("weights") if isinstance(merge.get("weights"), list) else []
    rows = [
        "| input | source | weight | base model | recommended α | source data | SHA-256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, item in enumerate(merge["inputs"][:100]):
        item = item if isinstance(item, dict) else {}
        weight = weights[index] if index < len(weights) else None
        sha = item.get("sha256")
        cells = [item.get("name"), item.get("source"), weight, item.get("base_model"),
                 item.get("recommended_alpha"), item.get("source_dataset"), sha[:12] if isinstance(sha, str) else None]  # fmt: skip
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
