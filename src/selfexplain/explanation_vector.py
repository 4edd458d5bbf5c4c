"""Explanation vectors: τ = θ(self-explaining) − θ(prediction-only), as a Hub artefact.

A vector is a set of float32 tensors keyed by serialized checkpoint names (see `checkpoint_keys`) plus a JSON
config that says which architecture it fits. It supports task arithmetic (`+`, `-`, scalar `*`, `sum`) and is
saved as `explanation_vector.safetensors` + `explanation_vector_config.json` + a `README.md` model card.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel

from .checkpoint_keys import serialized_state_dict
from .errors import InvalidExplanationVectorError, NotAnExplanationVectorError

VECTOR_WEIGHTS_NAME = "explanation_vector.safetensors"
VECTOR_CONFIG_NAME = "explanation_vector_config.json"
FORMAT_VERSION = 1

#: Config fields that must agree between a vector and a model for the vector to apply.
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "image_size",
    "num_channels",
    "qkv_bias",
    "hidden_act",
)
DEFAULT_INCLUDE: tuple[str, ...] = ("vit.*",)
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def architecture_fingerprint(config: PretrainedConfig) -> dict[str, Any]:
    """The architecture facts of a ViT config that decide whether a vector fits it (JSON-friendly)."""
    fingerprint = {}
    for name in FINGERPRINT_FIELDS:
        value = getattr(config, name, None)
        fingerprint[name] = list(value) if isinstance(value, (tuple, list)) else value
    return fingerprint


@dataclass
class ExplanationVectorConfig:
    """What `explanation_vector_config.json` holds. Every field is plain JSON."""

    model_type: str
    architecture: dict[str, Any]
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_model: str | None = None
    base_model_revision: str | None = None
    recommended_alpha: float = 1.0
    storage_dtype: str = "float32"
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    library_name: str = "selfexplain"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> ExplanationVectorConfig:
        """Build from parsed JSON, checking every field's type (a vector comes from strangers)."""
        if not isinstance(data, Mapping):
            raise InvalidExplanationVectorError(
                f"{source}: expected a JSON object, got {type(data).__name__}."
            )
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise InvalidExplanationVectorError(
                f"{source}: `format_version` must be an integer, got {version!r}."
            )
        if version > FORMAT_VERSION:
            raise InvalidExplanationVectorError(
                f"{source}: format_version {version} is newer than this selfexplain supports ({FORMAT_VERSION}); "
                "upgrade selfexplain."
            )
        expected: dict[str, tuple[type, ...]] = {
            "model_type": (str,),
            "architecture": (dict,),
            "tensors": (dict,),
            "base_model": (str, type(None)),
            "base_model_revision": (str, type(None)),
            "recommended_alpha": (int, float),
            "storage_dtype": (str,),
            "provenance": (dict,),
        }
        kwargs: dict[str, Any] = {"format_version": version}
        for name, types in expected.items():
            if name not in data:
                if name in ("model_type", "architecture", "tensors"):
                    raise InvalidExplanationVectorError(f"{source}: required field `{name}` is missing.")
                continue
            value = data[name]
            if not isinstance(value, types) or isinstance(value, bool):
                wanted = " or ".join(t.__name__ for t in types)
                raise InvalidExplanationVectorError(
                    f"{source}: field `{name}` must be {wanted}, got {type(value).__name__} ({value!r:.80})."
                )
            kwargs[name] = value
        alpha = float(kwargs.get("recommended_alpha", 1.0))
        if not math.isfinite(alpha) or abs(alpha) > 1e3:
            raise InvalidExplanationVectorError(
                f"{source}: `recommended_alpha` {alpha!r} is not a sensible scale."
            )
        kwargs["recommended_alpha"] = alpha
        if kwargs.get("storage_dtype", "float32") not in STORAGE_DTYPES:
            raise InvalidExplanationVectorError(
                f"{source}: `storage_dtype` must be one of {sorted(STORAGE_DTYPES)}, got {kwargs['storage_dtype']!r}."
            )
        for key, spec in kwargs["tensors"].items():
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise InvalidExplanationVectorError(
                    f"{source}: tensor {key!r} needs a `shape` list of non-negative ints."
                )
        return cls(**kwargs)


class ExplanationVector:
    """The difference between a self-explaining and a prediction-only model trained from the same base.

    Adding it (scaled by α) to a prediction-only classifier fine-tuned from that base transfers the ability to
    explain, with no training on the target.

    Example:
        ```python
        >>> from selfexplain import ExplanationVector, apply_explanation_vector
        >>> vec = ExplanationVector.from_models(self_explaining=se_model, prediction_only=p_model,
        ...                                     base_model="google/vit-base-patch16-224-in21k")
        >>> vec.save_pretrained("my-vector")            # safetensors + config json + model card
        >>> vec.push_to_hub("me/vit-b16-explanation-vector")
        >>> vec = ExplanationVector.from_pretrained("me/vit-b16-explanation-vector", revision="main")
        >>> explaining = apply_explanation_vector("their-org/vit-cats-vs-dogs", vec, alpha=1.0)
        >>> half = 0.5 * vec; merged = sum([vec_a, vec_b]) * 0.5   # task arithmetic, in float32
        ```
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], config: ExplanationVectorConfig):
        self.tensors: dict[str, torch.Tensor] = {k: v.detach().to(torch.float32) for k, v in tensors.items()}
        self.config = config
        self.config.tensors = {
            k: {"shape": list(v.shape), "dtype": config.storage_dtype}
            for k, v in sorted(self.tensors.items())
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(
        cls,
        self_explaining: PreTrainedModel,
        prediction_only: PreTrainedModel,
        *,
        base_model: str | None = None,
        base_model_revision: str | None = None,
        include: Iterable[str] = DEFAULT_INCLUDE,
        exclude: Iterable[str] = (),
        recommended_alpha: float = 1.0,
        provenance: Mapping[str, Any] | None = None,
    ) -> ExplanationVector:
        """τ = θ(self_explaining) − θ(prediction_only) over the serialized keys matching `include` and not `exclude`.

        `include`/`exclude` are `fnmatch` patterns on serialized names; the default covers the backbone (`vit.*`)
        and leaves out the classifier, whose label set differs between source and target.
        """
        from .apply import check_compatible  # local import: apply imports this module

        fingerprint = architecture_fingerprint(self_explaining.config)
        mismatch = check_compatible(
            fingerprint,
            self_explaining.config.model_type,
            prediction_only.config,
        )
        if mismatch:
            raise InvalidExplanationVectorError(
                "The two models do not share an architecture: " + "; ".join(mismatch) + "."
            )
        explaining_state = serialized_state_dict(self_explaining)
        predicting_state = serialized_state_dict(prediction_only)
        keys = _select_keys(explaining_state, include, exclude)
        if not keys:
            raise ValueError(f"No parameter matches include={list(include)} and exclude={list(exclude)}.")
        tensors = {}
        for key in keys:
            if key not in predicting_state or predicting_state[key].shape != explaining_state[key].shape:
                raise InvalidExplanationVectorError(
                    f"`prediction_only` has no tensor {key!r} of the same shape."
                )
            tensors[key] = (
                explaining_state[key].detach().float().cpu() - predicting_state[key].detach().float().cpu()
            )
        config = ExplanationVectorConfig(
            model_type=self_explaining.config.model_type,
            architecture=fingerprint,
            base_model=base_model,
            base_model_revision=base_model_revision,
            recommended_alpha=float(recommended_alpha),
            provenance=dict(provenance or {}),
        )
        return cls(tensors, config)

    # ------------------------------------------------------------------ arithmetic (always float32)
    def _combine(self, other: ExplanationVector, sign: float) -> ExplanationVector:
        if not isinstance(other, ExplanationVector):
            return NotImplemented
        if self.config.architecture != other.config.architecture or set(self.tensors) != set(other.tensors):
            raise ValueError(
                "Explanation vectors can only be combined when they cover the same architecture and keys."
            )
        tensors = {k: v + sign * other.tensors[k] for k, v in self.tensors.items()}
        return ExplanationVector(tensors, self._derived_config({"combined": True}))

    def __add__(self, other: ExplanationVector) -> ExplanationVector:
        return self._combine(other, 1.0)

    def __radd__(self, other: Any) -> ExplanationVector:
        # `sum([...])` starts from the integer 0.
        if isinstance(other, (int, float)) and other == 0:
            return self
        return self.__add__(other)

    def __sub__(self, other: ExplanationVector) -> ExplanationVector:
        return self._combine(other, -1.0)

    def __neg__(self) -> ExplanationVector:
        return self * -1.0

    def __mul__(self, scale: float) -> ExplanationVector:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        return ExplanationVector(
            {k: v * float(scale) for k, v in self.tensors.items()}, self._derived_config()
        )

    __rmul__ = __mul__

    def _derived_config(self, extra_provenance: Mapping[str, Any] | None = None) -> ExplanationVectorConfig:
        config = copy.deepcopy(self.config)
        config.provenance = {**config.provenance, **(extra_provenance or {})}
        return config

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self.tensors.values())
        return (
            f"ExplanationVector(base_model={self.config.base_model!r}, tensors={len(self.tensors)}, "
            f"parameters={numel:,}, recommended_alpha={self.config.recommended_alpha})"
        )

    def norm(self) -> float:
        """The L2 norm of the whole vector."""
        return float(torch.sqrt(sum((t.double() ** 2).sum() for t in self.tensors.values())))

    def apply_to(self, model: PreTrainedModel | str | os.PathLike, alpha: float | None = None, **kwargs: Any):
        """Shortcut for `apply_explanation_vector(model, self, alpha=alpha, **kwargs)`."""
        from .apply import apply_explanation_vector

        return apply_explanation_vector(model, self, alpha=alpha, **kwargs)

    # ------------------------------------------------------------------ serialization
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        storage_dtype: str | torch.dtype | None = None,
        model_card: bool = True,
        push_to_hub: bool = False,
        **push_kwargs: Any,
    ) -> str | None:
        """Write `explanation_vector.safetensors`, `explanation_vector_config.json` and a `README.md` card.

        `storage_dtype` ("float16"/"bfloat16") halves the files; loading turns them back into float32.
        With `push_to_hub=True`, the folder is then pushed to `push_kwargs["repo_id"]` (default: the folder name).
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        if storage_dtype is not None:
            config.storage_dtype = _dtype_name(storage_dtype)
        dtype = STORAGE_DTYPES[config.storage_dtype]
        config.tensors = {
            k: {"shape": list(v.shape), "dtype": config.storage_dtype}
            for k, v in sorted(self.tensors.items())
        }
        tensors = {k: v.to(dtype).contiguous() for k, v in self.tensors.items()}
        # Write to temporary names and rename, so an interrupted save never leaves a half-written vector behind.
        _atomic_write(
            save_directory / VECTOR_WEIGHTS_NAME,
            lambda p: save_file(
                tensors, str(p), metadata={"format": "pt", "selfexplain_format_version": str(FORMAT_VERSION)}
            ),
        )
        _atomic_write(
            save_directory / VECTOR_CONFIG_NAME,
            lambda p: Path(p).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"),
        )
        if model_card:
            from .cards import render_vector_card

            render_vector_card(config).save(save_directory / "README.md")
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", save_directory.name)
            return self._upload_folder(save_directory, repo_id, **push_kwargs)
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload explanation vector",
        storage_dtype: str | torch.dtype | None = None,
        create_pr: bool = False,
    ) -> str:
        """Save to a temporary folder and upload it in one commit with `huggingface_hub`. Returns the commit URL."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, storage_dtype=storage_dtype)
            return self._upload_folder(
                Path(tmp),
                repo_id,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    @staticmethod
    def _upload_folder(
        folder: Path,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload explanation vector",
        create_pr: bool = False,
    ) -> str:
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            allow_patterns=[VECTOR_WEIGHTS_NAME, VECTOR_CONFIG_NAME, "README.md"],
        )
        return str(info)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_vector_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
    ) -> ExplanationVector:
        """Load a vector from a local folder or a Hub repo id (only safetensors and JSON are ever read)."""
        source = str(pretrained_vector_name_or_path)
        config_path, weights_path = _resolve_vector_files(
            source,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
        )
        config = _read_config(config_path, source)
        tensors = _read_tensors(weights_path, config, source)
        return cls(tensors, config)


# ---------------------------------------------------------------------- helpers


def _select_keys(state: Mapping[str, Any], include: Iterable[str], exclude: Iterable[str]) -> list[str]:
    include, exclude = list(include), list(exclude)
    return sorted(
        k
        for k in state
        if any(fnmatch.fnmatchcase(k, p) for p in include)
        and not any(fnmatch.fnmatchcase(k, p) for p in exclude)
    )


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")
    return name


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _resolve_vector_files(source: str, **download_kwargs: Any) -> tuple[str, str]:
    if os.path.isdir(source):
        config_path = os.path.join(source, VECTOR_CONFIG_NAME)
        weights_path = os.path.join(source, VECTOR_WEIGHTS_NAME)
        missing = [p for p in (config_path, weights_path) if not os.path.isfile(p)]
        if missing:
            raise _not_a_vector(source, os.listdir(source), missing)
        return config_path, weights_path
    if os.path.exists(source):
        raise NotAnExplanationVectorError(
            f"{source} is a file; pass the folder that holds {VECTOR_CONFIG_NAME}."
        )
    try:
        config_path = hf_hub_download(source, VECTOR_CONFIG_NAME, **download_kwargs)
    except RemoteEntryNotFoundError as err:
        raise _not_a_vector(source, _list_repo_files(source, download_kwargs), [VECTOR_CONFIG_NAME]) from err
    try:
        weights_path = hf_hub_download(source, VECTOR_WEIGHTS_NAME, **download_kwargs)
    except RemoteEntryNotFoundError as err:
        raise InvalidExplanationVectorError(
            f"{source} has {VECTOR_CONFIG_NAME} but no {VECTOR_WEIGHTS_NAME}."
        ) from err
    return config_path, weights_path


def _list_repo_files(repo_id: str, download_kwargs: Mapping[str, Any]) -> list[str]:
    try:
        return HfApi(token=download_kwargs.get("token")).list_repo_files(
            repo_id, revision=download_kwargs.get("revision")
        )
    except Exception:  # only used to improve an error message
        return []


def _not_a_vector(source: str, files: Iterable[str], missing: Iterable[str]) -> NotAnExplanationVectorError:
    files = sorted(files)
    hint = ""
    if "config.json" in files or any(f.endswith((".safetensors", ".bin")) for f in files):
        hint = " It looks like a model; load it with `ViTForSelfExplainingClassification.from_pretrained`."
    if any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files):
        hint += " (Pickle files are never read by selfexplain.)"
    return NotAnExplanationVectorError(
        f"{source} is not an explanation vector: missing {', '.join(os.path.basename(m) for m in missing)}."
        f" It contains {files[:10]}.{hint}"
    )


def _read_config(path: str, source: str) -> ExplanationVectorConfig:
    where = f"{source}/{VECTOR_CONFIG_NAME}"
    if os.path.getsize(path) > 64 * 1024 * 1024:
        raise InvalidExplanationVectorError(f"{where} is larger than 64 MiB; refusing to parse it.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidExplanationVectorError(f"{where} is not valid JSON: {err}.") from err
    return ExplanationVectorConfig.from_dict(data, source=where)


def _read_tensors(path: str, config: ExplanationVectorConfig, source: str) -> dict[str, torch.Tensor]:
    where = f"{source}/{VECTOR_WEIGHTS_NAME}"
    try:
        handle = safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise InvalidExplanationVectorError(f"{where} is not a readable safetensors file: {err}.") from err
    with handle as f:
        keys = set(f.keys())
        declared = set(config.tensors)
        if keys != declared:
            raise InvalidExplanationVectorError(
                f"{where} does not hold the tensors its config declares: "
                f"missing {sorted(declared - keys)[:5]}, unexpected {sorted(keys - declared)[:5]}."
            )
        tensors = {}
        for key in sorted(keys):
            expected_shape = config.tensors[key]["shape"]
            view = f.get_slice(key)
            if list(view.get_shape()) != expected_shape:
                raise InvalidExplanationVectorError(
                    f"{where}: tensor {key!r} has shape {view.get_shape()}, the config declares {expected_shape}."
                )
            dtype = view.get_dtype()
            if dtype not in ("F32", "F16", "BF16"):
                raise InvalidExplanationVectorError(
                    f"{where}: tensor {key!r} is {dtype}; explanation vectors hold float32/float16/bfloat16."
                )
            try:
                tensor = f.get_tensor(key).to(torch.float32)
            except Exception as err:
                raise InvalidExplanationVectorError(
                    f"{where}: tensor {key!r} could not be read: {err}."
                ) from err
            if not torch.isfinite(tensor).all():
                raise InvalidExplanationVectorError(f"{where}: tensor {key!r} contains NaN or Inf values.")
            tensors[key] = tensor
    return tensors


__all__ = [
    "ExplanationVector",
    "ExplanationVectorConfig",
    "FINGERPRINT_FIELDS",
    "VECTOR_CONFIG_NAME",
    "VECTOR_WEIGHTS_NAME",
    "architecture_fingerprint",
]
