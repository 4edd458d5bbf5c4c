"""Explanation vectors: τ = θ(self-explaining) − θ(prediction-only), as a Hub artefact.

A vector is a set of float32 tensors keyed by serialized checkpoint names (see `checkpoint_keys`) plus a JSON
config that says which architecture it fits. It supports task arithmetic (`+`, `-`, scalar `*`, `sum`) and is
saved as `explanation_vector.safetensors` + `explanation_vector_config.json` + a `README.md` model card.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from .checkpoint_keys import serialized_names, serialized_state_dict
from .errors import InvalidExplanationVectorError, NotAnExplanationVectorError

VECTOR_WEIGHTS_NAME = "explanation_vector.safetensors"
VECTOR_CONFIG_NAME = "explanation_vector_config.json"
FORMAT_VERSION = 1

# Limits on what a vector from a stranger may ask of the loader. A ViT-22B vector's config is ~100 KiB and its
# safetensors header ~80 KiB, so these are far above real files and far below anything that hurts.
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 1 << 20
#: Deepest nesting of JSON objects/arrays accepted in a config (deeper ones exhaust recursion in deepcopy/asdict).
MAX_JSON_DEPTH = 32
#: Largest classifier a vector may cover (ImageNet-21k has 21,843 classes).
MAX_NUM_LABELS = 100_000
#: Largest value accepted for each numeric architecture field: far above any published ViT (ViT-22B has hidden
#: size 6144 and 48 layers) and small enough that no shape derived from them overflows int64.
ARCHITECTURE_LIMITS: dict[str, int] = {
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12,
    "intermediate_size": 1 << 18,
    "patch_size": 1 << 12,
    "image_size": 1 << 14,
    "num_channels": 1 << 10,
}

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
#: The safetensors header's name for each storage dtype.
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_MAX_TENSOR_DIMS = 8
# At most 6 digits, so `int()` of the index never meets Python's limit on long integer strings.
_LAYER_KEY = re.compile(r"vit\.encoder\.layer\.(0|[1-9][0-9]{0,5})\.(.+)")


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
        if version < 1:
            raise InvalidExplanationVectorError(f"{source}: `format_version` must be >= 1, got {version}.")
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
        _check_architecture(kwargs["architecture"], source)
        storage_dtype = kwargs.get("storage_dtype", "float32")
        for key, spec in kwargs["tensors"].items():
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if (
                not isinstance(shape, list)
                or len(shape) > _MAX_TENSOR_DIMS
                or not all(_is_int(d) and d >= 0 for d in shape)
            ):
                raise InvalidExplanationVectorError(
                    f"{source}: tensor {key!r} needs a `shape` list of at most {_MAX_TENSOR_DIMS} non-negative "
                    f"ints, got {shape!r:.80}."
                )
            dtype = spec.get("dtype", storage_dtype)
            if dtype not in STORAGE_DTYPES:
                raise InvalidExplanationVectorError(
                    f"{source}: tensor {key!r} has `dtype` {dtype!r:.40}; expected one of {sorted(STORAGE_DTYPES)}."
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
        # One metadata entry only: safetensors writes several in random (hash) order, and the same vector must
        # always give the same bytes. The format version lives in the config.
        _atomic_write(
            save_directory / VECTOR_WEIGHTS_NAME,
            lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
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
        download_kwargs = {
            "revision": revision,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "token": token,
            "force_download": force_download,
        }
        config = load_vector_config(source, download_kwargs)
        weights_file = resolve_vector_weights(source, config, download_kwargs)
        return cls(dict(iter_vector_tensors(weights_file, config, source)), config)


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


def _resolve_config_file(source: str, download_kwargs: Mapping[str, Any]) -> str:
    if os.path.isdir(source):
        # Check both files up front: a folder without them is most likely something else (e.g. a model).
        missing = [
            os.path.join(source, name)
            for name in (VECTOR_CONFIG_NAME, VECTOR_WEIGHTS_NAME)
            if not os.path.isfile(os.path.join(source, name))
        ]
        if missing:
            raise _not_a_vector(source, os.listdir(source), missing)
        return os.path.join(source, VECTOR_CONFIG_NAME)
    if os.path.exists(source):
        raise NotAnExplanationVectorError(
            f"{source} is a file; pass the folder that holds {VECTOR_CONFIG_NAME}."
        )
    try:
        return hf_hub_download(source, VECTOR_CONFIG_NAME, **download_kwargs)
    except RemoteEntryNotFoundError as err:
        raise _not_a_vector(source, _list_repo_files(source, download_kwargs), [VECTOR_CONFIG_NAME]) from err


def _resolve_weights_file(source: str, download_kwargs: Mapping[str, Any]) -> str:
    if os.path.isdir(source):
        return os.path.join(source, VECTOR_WEIGHTS_NAME)
    try:
        return hf_hub_download(source, VECTOR_WEIGHTS_NAME, **download_kwargs)
    except RemoteEntryNotFoundError as err:
        raise InvalidExplanationVectorError(
            f"{source} has {VECTOR_CONFIG_NAME} but no {VECTOR_WEIGHTS_NAME}."
        ) from err


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
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)  # bounded: never reads a huge file into memory
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidExplanationVectorError(
            f"{where} is larger than {MAX_CONFIG_BYTES:,} bytes; refusing to parse it."
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    # ValueError covers malformed JSON, bad UTF-8 and integers too long to convert.
    except ValueError as err:
        raise InvalidExplanationVectorError(f"{where} is not valid JSON: {str(err)[:200]}.") from err
    except RecursionError as err:
        raise InvalidExplanationVectorError(
            f"{where} is nested too deeply to parse (more than {MAX_JSON_DEPTH} levels are refused)."
        ) from err
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise InvalidExplanationVectorError(
            f"{where} is nested deeper than {MAX_JSON_DEPTH} levels; refusing it."
        )
    return ExplanationVectorConfig.from_dict(data, source=where)


def _json_depth(data: Any) -> int:
    """How deeply JSON objects/arrays nest in `data` (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend(
                (child, depth + 1) for child in (value.values() if isinstance(value, dict) else value)
            )
    return deepest


def load_vector_config(source: str, download_kwargs: Mapping[str, Any]) -> ExplanationVectorConfig:
    """Read and check a vector's config (local folder or Hub repo) without touching its weights.

    The config is checked against the architecture it names, so a vector that declares more than its
    architecture can hold never costs a download, a read or memory.
    """
    config = _read_config(_resolve_config_file(source, download_kwargs), source)
    _check_declared_tensors(config, f"{source}/{VECTOR_CONFIG_NAME}")
    return config


def resolve_vector_weights(
    source: str, config: ExplanationVectorConfig, download_kwargs: Mapping[str, Any]
) -> str:
    """The local path of the vector's safetensors file (downloaded if needed), its header checked against `config`.

    Every header entry (keys, shapes, dtypes) is checked before any tensor data is read.
    """
    path = _resolve_weights_file(source, download_kwargs)
    where = f"{source}/{VECTOR_WEIGHTS_NAME}"
    _check_header_size(path, where)
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
        for key in sorted(keys):
            spec = config.tensors[key]
            view = f.get_slice(key)
            if list(view.get_shape()) != spec["shape"]:
                raise InvalidExplanationVectorError(
                    f"{where}: tensor {key!r} has shape {view.get_shape()}, the config declares {spec['shape']}."
                )
            expected_dtype = _SAFETENSORS_DTYPES[spec.get("dtype", config.storage_dtype)]
            if view.get_dtype() != expected_dtype:
                raise InvalidExplanationVectorError(
                    f"{where}: tensor {key!r} is {view.get_dtype()}, the config declares {expected_dtype} "
                    "(explanation vectors hold float32, float16 or bfloat16)."
                )
    return path


def iter_vector_tensors(
    path: str, config: ExplanationVectorConfig, source: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(key, float32 tensor)` in key order, one tensor in memory at a time, each checked to be finite.

    `path` must have passed `resolve_vector_weights`. The file is mapped anew for each tensor: a mapping keeps
    every page read through it in the process's resident memory until it is closed, so one mapping for the
    whole file would hold a second copy of the vector while `apply_explanation_vector` streams it into a model.
    """
    where = f"{source}/{VECTOR_WEIGHTS_NAME}"
    for key in sorted(config.tensors):
        try:
            with safe_open(path, framework="pt") as f:
                tensor = f.get_tensor(key).to(torch.float32)
        except Exception as err:
            raise InvalidExplanationVectorError(f"{where}: tensor {key!r} could not be read: {err}.") from err
        # The file may have been replaced since its header was checked.
        if list(tensor.shape) != config.tensors[key]["shape"]:
            raise InvalidExplanationVectorError(
                f"{where}: tensor {key!r} has shape {list(tensor.shape)}, the config declares "
                f"{config.tensors[key]['shape']}."
            )
        if not all_finite(tensor):
            raise InvalidExplanationVectorError(f"{where}: tensor {key!r} contains NaN or Inf values.")
        yield key, tensor


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of `tensor` is finite, in one reduction for the common (finite) case.

    A sum is finite only if every term is (NaN and ±Inf propagate), so a finite float32 sum settles it without
    materialising a boolean mask; an infinite sum can also be an overflow of finite terms: check element-wise.
    """
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def _check_header_size(path: str, where: str) -> None:
    """Refuse a safetensors file whose JSON header is larger than `MAX_HEADER_BYTES`, before parsing it."""
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        raise InvalidExplanationVectorError(
            f"{where} is not a readable safetensors file: it has {len(prefix)} bytes, fewer than the 8-byte header size."
        )
    header_bytes = int.from_bytes(prefix, "little")
    if header_bytes > MAX_HEADER_BYTES:
        raise InvalidExplanationVectorError(
            f"{where} declares a {header_bytes:,}-byte header, more than the {MAX_HEADER_BYTES:,} bytes allowed."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_architecture(architecture: Mapping[str, Any], source: str) -> None:
    """Every fingerprint field is present with a sane type and range (the size checks build on them)."""
    missing = [name for name in FINGERPRINT_FIELDS if name not in architecture]
    if missing:
        raise InvalidExplanationVectorError(f"{source}: `architecture` lacks {missing}.")
    for name, limit in ARCHITECTURE_LIMITS.items():
        value = architecture[name]
        # image_size and patch_size may be (height, width) pairs.
        pair = isinstance(value, list) and name in ("image_size", "patch_size")
        values = value if pair else [value]
        if len(values) != (2 if pair else 1) or not all(_is_int(v) and 1 <= v <= limit for v in values):
            raise InvalidExplanationVectorError(
                f"{source}: `architecture.{name}` must be an int in [1, {limit}], got {value!r:.80}."
            )
    if architecture["hidden_size"] % architecture["num_attention_heads"]:
        raise InvalidExplanationVectorError(
            f"{source}: `architecture.hidden_size` {architecture['hidden_size']} is not a multiple of "
            f"`architecture.num_attention_heads` {architecture['num_attention_heads']}."
        )
    if not isinstance(architecture["qkv_bias"], bool):
        raise InvalidExplanationVectorError(
            f"{source}: `architecture.qkv_bias` must be true or false, got {architecture['qkv_bias']!r:.80}."
        )
    if not isinstance(architecture["hidden_act"], str) or architecture["hidden_act"] not in ACT2FN:
        raise InvalidExplanationVectorError(
            f"{source}: `architecture.hidden_act` must be one of {sorted(ACT2FN)}, "
            f"got {architecture['hidden_act']!r:.80}."
        )


def _check_declared_tensors(config: ExplanationVectorConfig, source: str) -> None:
    """Refuse a config whose tensors do not belong to the architecture it names, before any tensor is read.

    Every declared key must be a serialized tensor name of a ViT with `config.architecture`, with exactly its
    shape (the classifier may have up to `MAX_NUM_LABELS` rows), so a vector never declares more values than
    its architecture has parameters, and a lying config costs neither a download nor memory.
    """
    if config.model_type != "vit":
        raise InvalidExplanationVectorError(
            f"{source}: model_type {config.model_type!r:.80} is not supported; explanation vectors fit 'vit' models."
        )
    if not config.tensors:
        raise InvalidExplanationVectorError(f"{source}: the vector declares no tensors.")
    fingerprint = {name: config.architecture[name] for name in FINGERPRINT_FIELDS}
    try:
        layer_shapes, other_shapes = _architecture_shapes(json.dumps(fingerprint, sort_keys=True))
    except Exception as err:  # defensive: transformers may refuse a combination the checks above allow
        raise InvalidExplanationVectorError(
            f"{source}: `architecture` {fingerprint} does not describe a ViT transformers can build: {err!r}"
        ) from err
    num_layers, hidden = fingerprint["num_hidden_layers"], fingerprint["hidden_size"]

    # The total first (Python ints, so giant shapes cannot overflow): the clearest message for a size attack.
    declared = sum(math.prod(spec["shape"]) for spec in config.tensors.values())
    capacity = _parameter_capacity(config, layer_shapes, other_shapes)
    if declared > capacity:
        largest = max(config.tensors, key=lambda k: math.prod(config.tensors[k]["shape"]))
        raise InvalidExplanationVectorError(
            f"{source}: the config declares {declared:,} values (the largest tensor: {largest!r:.120} with shape "
            f"{config.tensors[largest]['shape']}), more than the {capacity:,} parameters of a ViT with this "
            f"architecture ({num_layers} layers, hidden size {hidden}); refusing before reading any tensor data."
        )
    for key, spec in config.tensors.items():
        shape = tuple(spec["shape"])
        expected = _expected_shape(key, shape, layer_shapes, other_shapes, num_layers, hidden)
        if expected is None:
            raise InvalidExplanationVectorError(
                f"{source}: tensor {key!r:.120} (shape {list(shape)}) is not a tensor of a ViT with this "
                f"architecture ({num_layers} layers, hidden size {hidden}, at most {MAX_NUM_LABELS:,} classes)."
            )
        if shape != expected:
            raise InvalidExplanationVectorError(
                f"{source}: tensor {key!r} is declared with shape {list(shape)}; a ViT with this architecture "
                f"has {list(expected)}."
            )


def _parameter_capacity(
    config: ExplanationVectorConfig,
    layer_shapes: Mapping[str, tuple[int, ...]],
    other_shapes: Mapping[str, tuple[int, ...]],
) -> int:
    """Parameters of the vector's architecture, with as many classes as its classifier declares (capped)."""
    rows = [
        spec["shape"][0]
        for k, spec in config.tensors.items()
        if k.startswith("classifier.") and spec["shape"]
    ]
    num_labels = min(max(rows, default=1), MAX_NUM_LABELS)
    return (
        config.architecture["num_hidden_layers"] * sum(math.prod(shape) for shape in layer_shapes.values())
        + sum(math.prod(shape) for k, shape in other_shapes.items() if not k.startswith("classifier."))
        + num_labels * (config.architecture["hidden_size"] + 1)
    )


def _expected_shape(
    key: str,
    shape: tuple[int, ...],
    layer_shapes: Mapping[str, tuple[int, ...]],
    other_shapes: Mapping[str, tuple[int, ...]],
    num_layers: int,
    hidden: int,
) -> tuple[int, ...] | None:
    """The shape `key` has in the architecture, or None when the architecture has no such tensor."""
    layer = _LAYER_KEY.fullmatch(key)
    if layer:
        return layer_shapes.get(layer.group(2)) if int(layer.group(1)) < num_layers else None
    # The classifier's row count is the target's label count, which the architecture does not fix.
    if key == "classifier.weight" and len(shape) == 2 and 1 <= shape[0] <= MAX_NUM_LABELS:
        return (shape[0], hidden)
    if key == "classifier.bias" and len(shape) == 1 and 1 <= shape[0] <= MAX_NUM_LABELS:
        return shape
    return None if key.startswith("classifier.") else other_shapes.get(key)


@functools.lru_cache(maxsize=16)
def _architecture_shapes(
    architecture_json: str,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Serialized tensor shapes of a ViT: `({per-layer suffix: shape}, {other key: shape})`.

    Built from a one-layer model on the meta device (no memory for weights), so the shapes are exactly those
    transformers creates, activation parameters and all; the layers are identical, so one stands for all.
    """
    from transformers import ViTConfig

    from .modeling_self_explaining_vit import ViTForSelfExplainingClassification

    fields = {**json.loads(architecture_json), "num_hidden_layers": 1, "num_labels": 1}
    with torch.device("meta"):
        model = ViTForSelfExplainingClassification(ViTConfig(**fields))
    state = model.state_dict()
    layer_shapes, other_shapes = {}, {}
    for serialized, name in serialized_names(model).items():
        layer = _LAYER_KEY.fullmatch(serialized)
        if layer:
            layer_shapes[layer.group(2)] = tuple(state[name].shape)
        else:
            other_shapes[serialized] = tuple(state[name].shape)
    return layer_shapes, other_shapes


__all__ = [
    "ExplanationVector",
    "ExplanationVectorConfig",
    "FINGERPRINT_FIELDS",
    "VECTOR_CONFIG_NAME",
    "VECTOR_WEIGHTS_NAME",
    "architecture_fingerprint",
]
