"""Reading and writing vector files: atomic writes, local folder or Hub download, the config checked before the
weights, and the weights streamed one tensor at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors import safe_open

from ..errors import InvalidExplanationVectorError, NotAnExplanationVectorError
from .checks import (
    _SAFETENSORS_DTYPES,
    MAX_CONFIG_BYTES,
    MAX_JSON_DEPTH,
    _check_declared_tensors,
    _check_header_size,
    _json_depth,
    all_finite,
)
from .config import VECTOR_CONFIG_NAME, VECTOR_WEIGHTS_NAME, ExplanationVectorConfig


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
