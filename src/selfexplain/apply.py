"""`apply_explanation_vector`: θ_T + α·τ, validated first, computed in float32, never half-applied."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, ViTConfig

from .checkpoint_keys import serialized_names
from .errors import ExplanationVectorError, IncompatibleExplanationVectorError
from .explanation_vector import FINGERPRINT_FIELDS, ExplanationVector, architecture_fingerprint
from .modeling_self_explaining_vit import ViTForSelfExplainingClassification

logger = logging.getLogger(__name__)

#: Config attribute in which selfexplain records the base a model was fine-tuned from.
BASE_MODEL_ATTRIBUTE = "selfexplain_base_model"


def check_compatible(fingerprint: dict[str, Any], model_type: str, config: PretrainedConfig) -> list[str]:
    """List every difference between a vector's architecture and a model config (empty when compatible)."""
    problems = []
    if config.model_type != model_type:
        problems.append(f"model_type: vector {model_type!r}, model {config.model_type!r}")
    theirs = architecture_fingerprint(config)
    for name in FINGERPRINT_FIELDS:
        if name in fingerprint and fingerprint[name] != theirs[name]:
            problems.append(f"{name}: vector {fingerprint[name]!r}, model {theirs[name]!r}")
    return problems


def apply_explanation_vector(
    model: PreTrainedModel | str | os.PathLike,
    vector: ExplanationVector | str | os.PathLike,
    alpha: float | None = None,
    *,
    inplace: bool = False,
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
            of one (loaded with `ViTForSelfExplainingClassification.from_pretrained`, never with remote code).
        vector: an `ExplanationVector`, or a Hub id / folder of one.
        alpha: scale of the vector; `None` uses the vector's `recommended_alpha`. `alpha=0` returns the
            original weights exactly.
        inplace: update a loaded `ViTForSelfExplainingClassification` in place instead of returning a new model.
            A `ViTForImageClassification` is never changed: a new self-explaining model is returned.
        revision / vector_revision / token / cache_dir / local_files_only: Hub options for `model` / `vector`.
        from_pretrained_kwargs: passed to `from_pretrained` when `model` is an id or folder (e.g. `dtype`).

    Returns:
        A `ViTForSelfExplainingClassification` with the target's own classifier, `id2label` and `label2id`.

    Raises:
        IncompatibleExplanationVectorError: the vector does not fit the model (architecture, keys or shapes);
            the message lists every difference and the model is unchanged.
        InvalidExplanationVectorError: the vector's files are corrupt, lie, or exceed the size limits.
        ExplanationVectorError: θ + α·τ would not be finite in the parameter's dtype (e.g. an overflowing α).

    The update is all or nothing: if anything fails while an in-place update is being written (even a
    `KeyboardInterrupt`), the parameters already written are restored before the error propagates.

    Example:
        ```python
        >>> from selfexplain import apply_explanation_vector
        >>> explaining = apply_explanation_vector("their-org/vit-cats-vs-dogs", "me/vit-b16-explanation-vector")
        >>> out = explaining(pixel_values)          # out.logits as before, out.explanation: the heatmap
        >>> explaining.save_pretrained("out")        # or .push_to_hub("me/vit-cats-vs-dogs-explaining")
        ```
    """
    if not isinstance(vector, ExplanationVector):
        vector = ExplanationVector.from_pretrained(
            vector,
            revision=vector_revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    alpha = vector.config.recommended_alpha if alpha is None else float(alpha)
    if not torch.isfinite(torch.tensor(alpha)):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}.")

    owned = not isinstance(model, PreTrainedModel)
    if owned:
        source = str(model)
        _check_config_before_loading(source, vector, revision, token, cache_dir, local_files_only)
        model = ViTForSelfExplainingClassification.from_pretrained(
            source,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            **from_pretrained_kwargs,
        )

    name_map = _validate(model, vector)
    _warn_on_base_mismatch(model.config, vector)

    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    # Compute every new tensor before touching the model: an error here leaves it exactly as it was, and the
    # whole update holds one extra copy of the vector's tensors (the backbone), never a second full model.
    updates: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, delta in vector.tensors.items():
            param = params[name_map[key]]
            if alpha == 0.0:
                continue
            new = (param.detach().to(torch.float32) + alpha * delta.to(device=param.device)).to(param.dtype)
            if not torch.isfinite(new).all() and torch.isfinite(param).all():
                raise ExplanationVectorError(
                    f"alpha={alpha} times the vector's {key!r} makes {name_map[key]!r} overflow {param.dtype} "
                    "(or the vector holds NaN/Inf); the model was not changed."
                )
            updates[name_map[key]] = new

    if owned or (inplace and isinstance(model, ViTForSelfExplainingClassification)):
        target = model
        _copy_all_or_nothing(params, updates)
    else:
        target = _new_self_explaining_model(model, updates)
    provenance = {"vector_base_model": vector.config.base_model, "alpha": alpha}
    target.config.selfexplain_applied_vector = provenance
    return target


def _copy_all_or_nothing(params: dict[str, torch.Tensor], updates: dict[str, torch.Tensor]) -> None:
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


def _validate(model: PreTrainedModel, vector: ExplanationVector) -> dict[str, str]:
    problems = check_compatible(vector.config.architecture, vector.config.model_type, model.config)
    name_map = serialized_names(model)
    state_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, wrong_shape = [], []
    for key, delta in vector.tensors.items():
        if key not in name_map:
            missing.append(key)
        elif state_shapes[name_map[key]] != tuple(delta.shape):
            wrong_shape.append(f"{key}: vector {tuple(delta.shape)}, model {state_shapes[name_map[key]]}")
    if missing:
        problems.append(f"{len(missing)} vector key(s) not in the model, e.g. {missing[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
    if problems:
        raise IncompatibleExplanationVectorError(
            f"The explanation vector (base {vector.config.base_model!r}) does not fit this "
            f"{type(model).__name__}; the model was not changed:\n  - " + "\n  - ".join(problems)
        )
    return name_map


def _check_config_before_loading(
    source: str,
    vector: ExplanationVector,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> None:
    """Reject an incompatible model from its config alone, before downloading its weights.

    The raw `config.json` is read as data: `AutoConfig` would consult the repo's `auto_map` and, for an unknown
    model type, offer to run the repo's code; this never imports anything from the repo.
    """
    config_dict, _ = PretrainedConfig.get_config_dict(
        source, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    model_type = config_dict.get("model_type")
    if model_type != vector.config.model_type:
        problems = [f"model_type: vector {vector.config.model_type!r}, model {model_type!r}"]
    else:
        problems = check_compatible(
            vector.config.architecture, vector.config.model_type, ViTConfig.from_dict(config_dict)
        )
    if problems:
        raise IncompatibleExplanationVectorError(
            f"The explanation vector (base {vector.config.base_model!r}) does not fit {source}:\n  - "
            + "\n  - ".join(problems)
        )


def _warn_on_base_mismatch(config: PretrainedConfig, vector: ExplanationVector) -> None:
    model_base = getattr(config, BASE_MODEL_ATTRIBUTE, None)
    vector_base = vector.config.base_model
    if model_base and vector_base and model_base != vector_base:
        warnings.warn(
            f"The model records base {model_base!r} but the vector was made from base {vector_base!r}. "
            "Explanation vectors transfer between models fine-tuned from the same base; expect poor results.",
            UserWarning,
            stacklevel=3,
        )


def _new_self_explaining_model(
    model: PreTrainedModel, updates: dict[str, torch.Tensor]
) -> ViTForSelfExplainingClassification:
    """A `ViTForSelfExplainingClassification` holding `updates` and copies of `model`'s other tensors."""
    config = copy.deepcopy(model.config)
    config.architectures = [ViTForSelfExplainingClassification.__name__]
    # Build on the meta device: no memory is allocated for weights that are replaced right away.
    with torch.device("meta"):
        new = ViTForSelfExplainingClassification(config)
    state = {
        name: updates[name] if name in updates else tensor.detach().clone()
        for name, tensor in model.state_dict().items()
    }
    new.load_state_dict(state, strict=True, assign=True)
    new.train(model.training)
    return new


__all__ = ["BASE_MODEL_ATTRIBUTE", "apply_explanation_vector", "check_compatible"]
