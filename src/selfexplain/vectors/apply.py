"""`apply_explanation_vector`: θ_T + α·τ, validated first, computed in float32, never half-applied."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoImageProcessor, PretrainedConfig, PreTrainedModel, ViTConfig
from transformers.image_processing_base import ImageProcessingMixin

from .._load_report import quiet_load_report
from ..cards import IMAGE_PROCESSOR_ATTRIBUTE
from ..errors import (
    ExplanationVectorError,
    IncompatibleExplanationVectorError,
    MissingClassifierError,
    NotAModelError,
)
from ..modeling_self_explaining_vit import ViTExplanationExtension, ViTForSelfExplainingClassification
from ..timm_checkpoints import load_timm_checkpoint, read_timm_config
from .alpha import AlphaFit, LayerAlpha, alpha_record
from .checkpoint_keys import serialized_names
from .checks import all_finite
from .compatibility import check_compatible
from .config import BASE_MODEL_ATTRIBUTE, VECTOR_CONFIG_NAME, ExplanationVectorConfig, extension_layers
from .io import (
    _list_repo_files,
    classify_source,
    iter_vector_tensors,
    load_vector_config,
    offline_message,
    resolve_vector_weights,
)
from .resolution import grid_change, resized_shapes, resizing_deltas

if TYPE_CHECKING:
    from .vector import ExplanationVector

logger = logging.getLogger(__name__)


def apply_explanation_vector(
    model: PreTrainedModel | str | os.PathLike,
    vector: ExplanationVector | str | os.PathLike,
    alpha: float | LayerAlpha | AlphaFit | Mapping[str, Any] | None = None,
    *,
    inplace: bool = False,
    resize_position_embeddings: bool = False,
    revision: str | None = None,
    vector_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    **from_pretrained_kwargs: Any,
) -> ViTForSelfExplainingClassification:
    """Give a prediction-only ViT classifier the ability to explain itself: θ + α·τ, no training.

    Args:
        model: a loaded `ViTForImageClassification` / `ViTForSelfExplainingClassification`, or a Hub id / folder
            of one (loaded with `ViTForSelfExplainingClassification.from_pretrained`, never with remote code), or
            of a timm ViT checkpoint (`timm/vit_*`: converted by `load_timm_checkpoint`, which refuses the timm
            variants the design does not fit; `save_timm_checkpoint` writes the result back in timm's layout).
        vector: an `ExplanationVector`, or a Hub id / folder of one.
        alpha: scale of the vector; `None` uses the vector's `recommended_alpha`. `alpha=0` returns the
            original weights exactly (plus, for a vector with an extension, an all-zero one: the identity on the
            tokens it reads, so the model's own map when it reads the final tokens, but the classifier applied to
            block k's tokens for an extension that reads block k; compare with the model itself there).
            A `LayerAlpha` (e.g. from `fit_alpha`) scales each transformer block by its own α (its serialised
            dict, as an applied model's config records it, is accepted too); the `AlphaFit` that `fit_alpha`
            returns applies its α and records the fit in the config and card.
        inplace: update a loaded `ViTForSelfExplainingClassification` in place instead of returning a new model.
            A `ViTForImageClassification` is never changed: a new self-explaining model is returned.
        resize_position_embeddings: allow a model whose image size (so patch grid) differs from the vector's,
            e.g. a 384 px fine-tune of the vector's 224 px backbone: the vector's position-embedding delta is
            resized to the model's patch grid (bicubic, class row kept, as transformers interpolates position
            embeddings) and the resize is recorded in the config and card. The patch size must still match.
            Off by default: a vector is validated at its own resolution unless asked.
        revision / vector_revision / token / cache_dir / local_files_only: Hub options for `model` / `vector`.
        from_pretrained_kwargs: passed to `from_pretrained` when `model` is an id or folder (e.g. `dtype`).

    Returns:
        A `ViTForSelfExplainingClassification` with the target's own classifier, `id2label` and `label2id`.

    Raises:
        MissingClassifierError: the model has no image-classification head (a `ViTModel` backbone, a
            `ViTForMaskedImageModeling`, …): fine-tune a classifier from it first. Decided from an id's or
            folder's `config.json` (`architectures`) before its weights are downloaded; for a config that names
            no known class, from the weights that did not load.
        IncompatibleExplanationVectorError: the vector does not fit the model (architecture, keys or shapes);
            the message lists every difference and the model is unchanged.
        InvalidExplanationVectorError: the vector's files are corrupt, lie, or exceed the size limits.
        ExplanationVectorError: θ + α·τ would not be finite in the parameter's dtype (e.g. an overflowing α).

    The update is all or nothing: if anything fails while an in-place update is being written (even a
    `KeyboardInterrupt`), the parameters already written are restored before the error propagates.

    Memory: given a Hub id or folder for both, the fastest and leanest path, the vector is never held whole:
    its tensors are read one at a time and added into the freshly loaded model where it lives, so the peak is
    the model plus one tensor. A loaded `ViTForImageClassification` costs one copy of the model (the new one);
    `inplace=True` holds one copy of the updated tensors, so that a refused vector never touches the model.

    Example:
        ```python
        >>> from selfexplain import apply_explanation_vector
        >>> explaining = apply_explanation_vector("their-org/vit-cats-vs-dogs", "me/vit-b16-explanation-vector")
        >>> out = explaining(pixel_values)          # out.logits as before, out.explanation: the heatmap
        >>> explaining.save_pretrained("out")        # or .push_to_hub("me/vit-cats-vs-dogs-explaining")
        ```
    """
    owned = not isinstance(model, PreTrainedModel)
    if owned:  # say what a wrong path or id names before anything is read or downloaded
        _require_model_source(str(model), revision, cache_dir)
        hub = {
            "revision": revision,
            "token": token,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
        }
        timm_model = _load_if_timm(str(model), hub, from_pretrained_kwargs)
        if timm_model is not None:  # converted to a self-explaining model nobody else holds: patched in place
            model, owned, inplace = timm_model, False, True
    if not isinstance(vector, (str, os.PathLike)):  # an `ExplanationVector` in memory
        config = vector.config
        vector_source = None
        # The tensors are the truth for a vector in memory (its `tensors` dict may have been edited).
        shapes = {key: tuple(tensor.shape) for key, tensor in vector.tensors.items()}
    else:
        # Only the config now: the weights are downloaded once the model is known to fit, and then streamed.
        vector_source = str(vector)
        vector_download = {
            "revision": vector_revision,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "token": token,
        }
        config = load_vector_config(vector_source, vector_download)
        shapes = {key: tuple(spec["shape"]) for key, spec in config.tensors.items()}
    alpha = config.recommended_alpha if alpha is None else alpha
    fit_record = None
    if isinstance(alpha, AlphaFit):
        fit_record, alpha = alpha.to_dict(), alpha.alpha
    if isinstance(alpha, Mapping):
        alpha = LayerAlpha.from_dict(alpha)
    if not isinstance(alpha, LayerAlpha):
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}.")
    scale_of = _scale_of(alpha)
    # A vector with an explanation extension gives a model without one an all-zero (identity) extension first.
    layers = extension_layers(shapes)

    # Everything that can be checked from configs is checked before any weights are downloaded or read.
    if owned:
        source = str(model)
        model_config, change = _check_config_before_loading(
            source, config, revision, token, cache_dir, local_files_only, resize_position_embeddings
        )
        adds_extension = bool(layers) and model_config.get("explanation_head") != "extension"
        if layers and not adds_extension:
            _require_same_extension_input(
                source,
                model_config.get("explanation_extension_input_layer"),
                model_config.get("explanation_extension_route", "classifier"),
                config,
            )
        if change is not None:
            shapes = resized_shapes(shapes, change[1])
    else:
        if getattr(model.config, "model_type", None) == config.model_type:  # else `_validate` says what it is
            _require_classifier_head(model)
        adds_extension = bool(layers) and getattr(model, "explainer", None) is None
        if layers and not adds_extension:
            _require_same_extension_input(
                type(model).__name__,
                getattr(model.config, "explanation_extension_input_layer", None),
                getattr(model.config, "explanation_extension_route", "classifier"),
                config,
            )
        change = grid_change(config.architecture, model.config) if resize_position_embeddings else None
        if change is not None:
            shapes = resized_shapes(shapes, change[1])
        # The extension's keys are checked against the extension the model gets, once it has it.
        _validate(model, config, _without_extension(shapes) if adds_extension else shapes, change)
    if vector_source is not None:
        weights_file = resolve_vector_weights(vector_source, config, vector_download)
        deltas = iter_vector_tensors(weights_file, config, vector_source)
    else:
        deltas = iter(sorted(vector.tensors.items()))
    if change is not None:
        deltas = resizing_deltas(deltas, *change)
    if owned:
        extension = (
            {
                "explanation_head": "extension",
                "explanation_extension_layers": layers,
                "explanation_extension_input_layer": config.extension_input_layer,
                "explanation_extension_route": config.extension_route,
            }
            if adds_extension
            else {}
        )
        # The loading info replaces from_pretrained's warning about a missing head: here it is an error.
        with quiet_load_report() if adds_extension else contextlib.nullcontext():
            model, loading_info = ViTForSelfExplainingClassification.from_pretrained(
                source,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                **{**from_pretrained_kwargs, **extension, "output_loading_info": True},
            )
        _require_loaded_classifier(source, loading_info)
        if adds_extension:
            _zero_extension(model)
        name_map = _validate(model, config, shapes, change)
        # Carried along so that `save_pretrained` writes it too: the saved model then runs in `pipeline()`.
        image_processor = load_image_processor(source, revision, token, cache_dir, local_files_only)
    else:
        image_processor = getattr(model, IMAGE_PROCESSOR_ATTRIBUTE, None)
    _warn_on_base_mismatch(model.config, config)
    if isinstance(
        alpha, LayerAlpha
    ):  # before any weight changes: a depth mismatch leaves the model as it was
        alpha.check_model(int(model.config.num_hidden_layers))

    if owned:
        # Nobody else holds this model: if anything fails it is dropped, so it is updated as the vector streams in.
        target = model
        _stream_into(_named_tensors(target), name_map, deltas, scale_of)
    elif inplace and isinstance(model, ViTForSelfExplainingClassification):
        target = model
        if adds_extension:
            _add_zero_extension(target, layers, config.extension_input_layer, config.extension_route)
        try:
            name_map = _validate(target, config, shapes, change)
            tensors = _named_tensors(target)
            _copy_all_or_nothing(tensors, _updated_tensors(tensors, name_map, deltas, scale_of))
        except BaseException:
            if adds_extension:  # all or nothing: the model leaves as it came
                _remove_extension(target)
            raise
    else:
        target = _new_self_explaining_model(
            model, layers if adds_extension else 0, config.extension_input_layer, config.extension_route
        )
        name_map = _validate(target, config, shapes, change)
        _stream_into(_named_tensors(target), name_map, deltas, scale_of)
    provenance = {
        "vector": vector_source,
        "vector_base_model": config.base_model,
        "alpha": alpha_record(alpha),
    }
    if fit_record is not None:
        provenance["alpha_fit"] = fit_record
    if change is not None:
        provenance["resized_position_embeddings"] = {"from": list(change[0]), "to": list(change[1])}
    target.config.selfexplain_applied_vector = provenance
    if image_processor is not None:
        setattr(target, IMAGE_PROCESSOR_ATTRIBUTE, image_processor)
    return target


def _load_if_timm(
    source: str, hub: Mapping[str, Any], from_pretrained_kwargs: Mapping[str, Any]
) -> ViTForSelfExplainingClassification | None:
    """A timm ViT checkpoint (its `config.json` is timm's: `architecture`, no `model_type`) loaded as a
    self-explaining model (refused with the reason when its variant does not fit); None for any other source."""
    # The raw file: transformers' own reader rewrites a timm config into its `timm_wrapper` model type.
    try:
        read_timm_config(source, hub)
    except (ExplanationVectorError, OSError, ValueError):  # not timm's: the regular path takes it from here
        return None
    return load_timm_checkpoint(source, **hub, dtype=from_pretrained_kwargs.get("dtype"))


def _require_model_source(source: str, revision: str | None, cache_dir: str | os.PathLike | None) -> None:
    """Refuse, with what it is, a path or id that cannot hold a model (from the file system alone)."""
    found = classify_source(source, revision=revision, cache_dir=cache_dir)
    if found.kind in ("model", "hub") and not found.offline_miss:
        return
    if found.kind == "missing":
        raise FileNotFoundError(f"{source}: no such folder.")
    if found.offline_miss:
        raise OSError(offline_message(source))
    if found.kind == "vector":
        raise NotAModelError(
            f"{source} is an explanation vector, not a model: pass it as the `vector` argument, "
            f"e.g. apply_explanation_vector(model, {source!r})."
        )
    if found.kind == "file":
        raise NotAModelError(f"{source} is a file; pass the folder that holds the model's config.json.")
    raise NotAModelError(
        f"{source} is {found.description}, not a model (no config.json); it contains {list(found.contents[:10])}."
    )


def load_image_processor(
    source: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Any:
    """The image processor saved with the model (`preprocessor_config.json`), or None when it has none.

    Its config is read as data first: one that names code from the repo (`auto_map`) or no processor class is
    skipped, so transformers never considers running (or asks about) the repo's code.
    """
    hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(source, **hub)
        if not isinstance(config, dict) or "auto_map" in config or not config.get("image_processor_type"):
            logger.info("Not carrying over the image processor of %s: no plain processor class.", source)
            return None
        return AutoImageProcessor.from_pretrained(source, **hub)
    except Exception as err:  # none saved, or one this transformers cannot build: the model is still fine
        logger.info("No image processor carried over from %s: %s", source, err)
        return None


def _named_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return tensors


def _scale_of(alpha: float | LayerAlpha) -> Callable[[str], float]:
    """α of each vector key: the LayerAlpha's entry for its block, or the one float."""
    if isinstance(alpha, LayerAlpha):
        return alpha.alpha_for
    return lambda key: alpha


def _stream_into(
    params: Mapping[str, torch.Tensor],
    name_map: Mapping[str, str],
    deltas: Iterator[tuple[str, torch.Tensor]],
    scale_of: Callable[[str], float],
) -> None:
    """θ ← θ + α·τ tensor by tensor as the deltas arrive, for a model no caller holds (it is dropped on error).

    Beside the model, this holds one of the vector's tensors and at most one temporary at a time.
    """
    with torch.no_grad():
        for key, delta in deltas:
            param, alpha = params[name_map[key]], scale_of(key)
            if param.dtype == torch.float32:
                _check_shape(key, delta, param)
                if alpha != 0.0:
                    was_finite = all_finite(param)
                    param.add_(_scaled(delta, alpha, param.device))  # where it lives: no second copy
                    _check_finite(key, param, was_finite, alpha, name_map[key])
            else:
                new = _updated(key, param, delta, alpha, name_map[key])
                if new is not None:
                    param.copy_(new)


def _updated_tensors(
    params: Mapping[str, torch.Tensor],
    name_map: Mapping[str, str],
    deltas: Iterator[tuple[str, torch.Tensor]],
    scale_of: Callable[[str], float],
) -> dict[str, torch.Tensor]:
    """Every θ + α·τ, computed and checked before anything is written (a refused vector never touches θ)."""
    updates = {}
    with torch.no_grad():
        for key, delta in deltas:
            new = _updated(key, params[name_map[key]], delta, scale_of(key), name_map[key])
            if new is not None:
                updates[name_map[key]] = new
    return updates


def _updated(
    key: str, param: torch.Tensor, delta: torch.Tensor, alpha: float, name: str
) -> torch.Tensor | None:
    """θ + α·τ as a new tensor in θ's dtype, computed in float32 (None when α = 0: θ stays as it is)."""
    _check_shape(key, delta, param)
    if alpha == 0.0:
        return None
    new = (param.detach().to(torch.float32) + _scaled(delta, alpha, param.device)).to(param.dtype)
    _check_finite(key, new, all_finite(param), alpha, name)
    return new


def _scaled(delta: torch.Tensor, alpha: float, device: torch.device) -> torch.Tensor:
    # α·τ rounded first, then added: the same bits as computing `θ + α * τ` by hand (a fused add would not be).
    delta = delta.to(device)
    return delta if alpha == 1.0 else delta * alpha


def _check_shape(key: str, delta: torch.Tensor, param: torch.Tensor) -> None:
    if tuple(delta.shape) != tuple(param.shape):  # adding would broadcast a smaller tensor
        raise IncompatibleExplanationVectorError(
            f"The vector's {key!r} has shape {tuple(delta.shape)}, the model's {tuple(param.shape)}."
        )


def _check_finite(key: str, new: torch.Tensor, was_finite: bool, alpha: float, name: str) -> None:
    if was_finite and not all_finite(new):
        raise ExplanationVectorError(
            f"alpha={alpha} times the vector's {key!r} makes {name!r} overflow {new.dtype} "
            "(or the vector holds NaN/Inf); the model was not changed."
        )


def _copy_all_or_nothing(params: Mapping[str, torch.Tensor], updates: dict[str, torch.Tensor]) -> None:
    """Copy each update into its parameter in place; if any copy fails, restore those already written.

    Copying (rather than swapping storage) keeps every parameter's identity and storage, so optimizers, hooks
    and views held by the caller stay valid. Each original is saved just before it is overwritten and each
    update is dropped once written, so the peak extra memory stays one copy of the updated tensors.
    """
    originals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        try:
            for name in list(updates):
                originals[name] = params[name].detach().clone()
                params[name].copy_(updates.pop(name))
        except BaseException:  # including KeyboardInterrupt: never leave a half-applied vector behind
            for name, original in originals.items():
                params[name].copy_(original)
            raise


#: Class-name endings of the ViT checkpoints that carry an image-classification head.
_CLASSIFIER_ARCHITECTURES = ("ForImageClassification", ViTForSelfExplainingClassification.__name__)
#: Class-name endings of ViT checkpoints without one: backbones and other pre-training or task heads.
_HEADLESS_ARCHITECTURES = ("Model", "ForMaskedImageModeling", "ForPreTraining")

_FINE_TUNE_FIRST = (
    "An explanation vector patches a classifier and keeps its head and labels, so fine-tune a classifier on "
    "your labels first (for example `selfexplain train --base {base} ...`, or "
    "`ViTForImageClassification.from_pretrained({base!r}, num_labels=...)` and your own training), then apply "
    "the vector to that classifier."
)


def _require_classifier_head(model: PreTrainedModel) -> None:
    """Refuse a loaded model whose class has no linear `classifier` (a `ViTModel`, a masked-image model, …)."""
    if isinstance(getattr(model, "classifier", None), nn.Linear):
        if _architectures_verdict(getattr(model.config, "architectures", None)) == "headless":
            # The class has a head, but the checkpoint it came from had none: random unless trained since.
            warnings.warn(
                f"This {type(model).__name__} was loaded from a {model.config.architectures[0]} checkpoint, "
                "which has no classifier: unless it was fine-tuned since, its head is random and so are its "
                "predictions and explanations.",
                UserWarning,
                stacklevel=3,
            )
        return
    raise MissingClassifierError(
        f"This {type(model).__name__} has no image-classification head (no linear `classifier`); the model was "
        "not changed. " + _FINE_TUNE_FIRST.format(base=getattr(model.config, "_name_or_path", "") or "BASE")
    )


def _architectures_verdict(architectures: Any) -> str:
    """What a config's `architectures` say: `classifier`, `headless`, or `unknown` (none, or unknown names)."""
    names = [name for name in architectures or () if isinstance(name, str)]
    if any(name.endswith(_CLASSIFIER_ARCHITECTURES) for name in names):
        return "classifier"
    if names and all(name.endswith(_HEADLESS_ARCHITECTURES) for name in names):
        return "headless"
    return "unknown"


def _require_loaded_classifier(source: str, loading_info: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose classifier weights did not load (its config named no known class)."""
    not_loaded = sorted(
        {
            key[0] if isinstance(key, (tuple, list)) else str(key)
            for kind in ("missing_keys", "mismatched_keys")
            for key in loading_info.get(kind, ())
        }
    )
    head = [key for key in not_loaded if key.startswith("classifier.")]
    if head:
        raise MissingClassifierError(
            f"{source} has no image-classification head: its checkpoint lacks {head} (they would start "
            "random). " + _FINE_TUNE_FIRST.format(base=source)
        )


def _validate(
    model: PreTrainedModel,
    config: ExplanationVectorConfig,
    shapes: Mapping[str, tuple[int, ...]],
    change: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> dict[str, str]:
    """Check the vector's architecture, keys and shapes against `model`; return serialized → model names.

    `change`: the (vector, model) patch grids when the position embeddings are resized (`shapes` are then the
    resized ones and the image size is not compared).
    """
    problems = _architecture_problems(config, model.config, change)
    name_map = serialized_names(model)
    state_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, wrong_shape = [], []
    for key, shape in shapes.items():
        if key not in name_map:
            missing.append(key)
        elif state_shapes[name_map[key]] != shape:
            wrong_shape.append(f"{key}: vector {shape}, model {state_shapes[name_map[key]]}")
    if missing:
        problems.append(f"{len(missing)} vector key(s) not in the model, e.g. {missing[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
    if problems:
        raise IncompatibleExplanationVectorError(
            f"The explanation vector (base {config.base_model!r}) does not fit this "
            f"{type(model).__name__}; the model was not changed:\n  - " + "\n  - ".join(problems)
        )
    return name_map


def _architecture_problems(
    config: ExplanationVectorConfig,
    model_config: PretrainedConfig,
    change: tuple[tuple[int, int], tuple[int, int]] | None,
) -> list[str]:
    """Every architecture difference; the image size is allowed to differ when the vector is being resized."""
    fingerprint = dict(config.architecture)
    if change is not None:
        fingerprint.pop("image_size", None)
    problems = check_compatible(fingerprint, config.model_type, model_config)
    problems += _family_notes(getattr(model_config, "model_type", None), config.model_type)
    if change is None and grid_change(config.architecture, model_config) is not None:
        problems.append(
            "only the image size differs: pass resize_position_embeddings=True (CLI: --resize-position-embeddings) "
            "to resize the vector's position embeddings to the model's patch grid, as transformers interpolates them"
        )
    return problems


#: Why a model family that looks like a ViT classifier is not one a ViT vector can patch.
_UNSUPPORTED_FAMILIES = {
    "deit": (
        "DeiT checkpoints of model_type 'deit' (DeiTForImageClassification, DeiTForImageClassificationWithTeacher) "
        "are not supported: beside the class token they carry a distillation token (position embeddings with 2 + "
        "patches rows, a `distillation_token` tensor), and the distilled ones predict the mean of two heads, so a "
        "ViT vector's tensors do not fit them and their predictions are not what a ViT vector was trained to "
        "explain. A DeiT saved as a ViT classifier (model_type 'vit', ViTForImageClassification) is one and works"
    ),
}


def _family_notes(model_type: str | None, vector_model_type: str) -> list[str]:
    note = _UNSUPPORTED_FAMILIES.get(model_type) if model_type != vector_model_type else None
    return [note] if note else []


def _check_config_before_loading(
    source: str,
    vector_config: ExplanationVectorConfig,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    resize: bool = False,
) -> tuple[dict[str, Any], tuple[tuple[int, int], tuple[int, int]] | None]:
    """Reject an incompatible model from its config alone, before downloading its weights.

    Returns the raw config and, with `resize`, the (vector, model) patch grids when only the image size differs.

    The raw `config.json` is read as data: `AutoConfig` would consult the repo's `auto_map` and, for an unknown
    model type, offer to run the repo's code; this never imports anything from the repo.
    """
    hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source, **hub)
    except OSError as err:
        _raise_if_vector_repo(source, hub, err)
        raise
    model_type = config_dict.get("model_type")
    if model_type is None:
        _raise_if_vector_repo(source, hub, None)
    architectures = config_dict.get("architectures")
    if model_type == vector_config.model_type and _architectures_verdict(architectures) == "headless":
        raise MissingClassifierError(
            f"{source} is a {' / '.join(architectures)} checkpoint: a model without an image-classification "
            "head (no `classifier` weights), so applying a vector would give it a random one. "
            + _FINE_TUNE_FIRST.format(base=source)
        )
    change = None
    if model_type != vector_config.model_type:
        problems = [f"model_type: vector {vector_config.model_type!r}, model {model_type!r}"]
        problems += _family_notes(model_type, vector_config.model_type)
    else:
        model_config = ViTConfig.from_dict(config_dict)
        change = grid_change(vector_config.architecture, model_config) if resize else None
        problems = _architecture_problems(vector_config, model_config, change)
    if problems:
        raise IncompatibleExplanationVectorError(
            f"The explanation vector (base {vector_config.base_model!r}) does not fit {source}:\n  - "
            + "\n  - ".join(problems)
        )
    return config_dict, change


def _raise_if_vector_repo(source: str, hub: Mapping[str, Any], cause: BaseException | None) -> None:
    """A Hub repo without a model config that holds an explanation vector: say so (one listing request)."""
    if os.path.isdir(source) or hub.get("local_files_only"):
        return
    if VECTOR_CONFIG_NAME in _list_repo_files(source, hub):
        raise NotAModelError(
            f"{source} is an explanation vector on the Hub, not a model: pass it as the `vector` argument."
        ) from cause


def _warn_on_base_mismatch(config: PretrainedConfig, vector_config: ExplanationVectorConfig) -> None:
    model_base = getattr(config, BASE_MODEL_ATTRIBUTE, None)
    vector_base = vector_config.base_model
    if model_base and vector_base and model_base != vector_base:
        warnings.warn(
            f"The model records base {model_base!r} but the vector was made from base {vector_base!r}. "
            "Explanation vectors transfer between models fine-tuned from the same base; expect poor results.",
            UserWarning,
            stacklevel=3,
        )


def _without_extension(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {key: shape for key, shape in shapes.items() if not key.startswith("explainer.")}


def _zero_extension(model: ViTForSelfExplainingClassification) -> None:
    """An all-zero extension is the identity: the model explains as before, and θ + α·τ gives α·τ."""
    with torch.no_grad():
        for param in model.explainer.parameters():
            param.zero_()


def _require_same_extension_input(
    source: str, model_layer: int | None, model_route: str, config: ExplanationVectorConfig
) -> None:
    """A model that already has an extension must read the tokens the vector's extension was trained on, and
    send its tokens where the vector's extension was trained to send them."""
    if model_layer != config.extension_input_layer:
        raise IncompatibleExplanationVectorError(
            f"{source}'s explanation extension reads {_extension_input(model_layer)}, the vector's reads "
            f"{_extension_input(config.extension_input_layer)}: the vector's extension would run on other tokens."
        )
    if model_route != config.extension_route:
        raise IncompatibleExplanationVectorError(
            f"{source}'s explanation extension sends its tokens to the {model_route}, the vector's to the "
            f"{config.extension_route} (`explanation_extension_route`): the vector's tokens would be read wrong."
        )


def _extension_input(layer: int | None) -> str:
    return "the final normed tokens" if layer is None else f"the output of block {layer}"


def _add_zero_extension(
    model: ViTForSelfExplainingClassification,
    layers: int,
    input_layer: int | None = None,
    route: str = "classifier",
) -> None:
    """Give a loaded self-explaining model an all-zero (identity) extension of `layers` blocks, in place."""
    model.config.explanation_head = "extension"
    model.config.explanation_extension_layers = layers
    model.config.explanation_extension_input_layer = input_layer
    model.config.explanation_extension_route = route
    reference = model.classifier.weight
    model.explainer = ViTExplanationExtension(model.config).to(device=reference.device, dtype=reference.dtype)
    model.explainer.train(model.training)
    _zero_extension(model)


def _remove_extension(model: ViTForSelfExplainingClassification) -> None:
    model.explainer = None
    model.config.explanation_head = "shared"
    model.config.explanation_extension_input_layer = None
    model.config.explanation_extension_route = "classifier"


def _new_self_explaining_model(
    model: PreTrainedModel,
    extension_layers: int = 0,
    extension_input_layer: int | None = None,
    extension_route: str = "classifier",
) -> ViTForSelfExplainingClassification:
    """A `ViTForSelfExplainingClassification` holding copies of `model`'s tensors (the input is never written),
    with an all-zero explanation extension of `extension_layers` blocks added when that is > 0."""
    config = copy.deepcopy(model.config)
    config.architectures = [ViTForSelfExplainingClassification.__name__]
    if extension_layers:
        config.explanation_head = "extension"
        config.explanation_extension_layers = extension_layers
        config.explanation_extension_input_layer = extension_input_layer
        config.explanation_extension_route = extension_route
    # Build on the meta device: no memory is allocated for weights that are replaced right away.
    with torch.device("meta"):
        new = ViTForSelfExplainingClassification(config)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if extension_layers:
        reference = model.classifier.weight
        state.update(
            {
                f"explainer.{name}": torch.zeros(tensor.shape, dtype=reference.dtype, device=reference.device)
                for name, tensor in new.explainer.state_dict().items()
            }
        )
    try:
        new.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # a subclass with extra or renamed weights: not a plain ViT classifier
        raise IncompatibleExplanationVectorError(
            f"This {type(model).__name__}'s weights are not those of a ViT classifier "
            f"(ViTForImageClassification); the model was not changed:\n{err}"
        ) from err
    new.train(model.training)
    return new


__all__ = ["BASE_MODEL_ATTRIBUTE", "apply_explanation_vector", "check_compatible"]
