"""Reading and writing vector files: atomic writes, what a path or id names, local folder or Hub download, the
config checked before the weights, and the weights streamed one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors import safe_open

from ..errors import InvalidExplanationVectorError, NotAnExplanationVectorError
from ..hub import could_be_repo_id
from .checks import (
    MAX_CONFIG_BYTES,
    MAX_JSON_DEPTH,
    _check_declared_tensors,
    _check_header_size,
    _json_depth,
    all_finite,
)
from .compression import PART_SEPARATOR, decode_tensor, stored_layout
from .config import VECTOR_CONFIG_NAME, VECTOR_WEIGHTS_NAME, ExplanationVectorConfig

# ---------------------------------------------------------------------------------------------- atomic writes

#: Every temporary folder a save makes starts with this; one left by a killed save is removed by the next
#: save or load of that folder (see `remove_stale_temporaries`).
TEMPORARY_PREFIX = ".selfexplain-tmp-"
_TEMPORARY_NAME = re.compile(re.escape(TEMPORARY_PREFIX) + r"(?P<host>.*)-(?P<pid>\d+)-[^-]*$")
# Names of the temporary files of selfexplain <= 0.2 (one per interrupted save, named after the dead process).
_LEGACY_TEMPORARY_NAME = re.compile(
    r"\.(?:" + re.escape(VECTOR_WEIGHTS_NAME) + "|" + re.escape(VECTOR_CONFIG_NAME) + r")\.tmp-(?P<pid>\d+)$"
)
#: A temporary folder this old is stale even when its writer cannot be checked (another host, a reused pid).
STALE_AFTER_S = 24 * 3600


def write_files_atomically(
    folder: str | os.PathLike, writers: Mapping[str, Callable[[Path], object]]
) -> None:
    """Write files into `folder` so that none is ever seen half-written, and nothing is left behind.

    Each ``writers[name](path)`` writes one file into a private temporary folder inside `folder` (so on the same
    file system; safetensors' own temporary file lands there too), and the files are then renamed into place,
    in the order given. A process killed meanwhile leaves the old files as they were and, at most, one
    ``.selfexplain-tmp-*`` folder, which the next save or load of `folder` removes. The files get the mode of
    any newly created file (0666 less the umask, e.g. 0644), whatever mode the writer gave them.
    """
    folder = Path(folder)
    remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{_host()}-{os.getpid()}-", dir=folder))
    try:
        mode = _new_file_mode(tmp)
        for name, write in writers.items():
            write(tmp / name)
            os.chmod(tmp / name, mode)
        for name in writers:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary folders (and files of older versions) that killed saves left in `folder`.

    A temporary is removed when the process that made it is gone (same host) or it is older than a day;
    a save in progress in another process is left alone. Best effort: errors (a read-only folder) are ignored.
    Returns the names removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        current = _TEMPORARY_NAME.match(entry.name)
        legacy = _LEGACY_TEMPORARY_NAME.match(entry.name)
        if current is None and legacy is None:
            continue
        host = current["host"] if current else _host()
        pid = int((current or legacy)["pid"])
        try:
            if not _is_stale(entry.path, host, pid):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass
    return removed


def _is_stale(path: str, host: str, pid: int) -> bool:
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for child in os.scandir(path):
            newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
    if time.time() - newest > STALE_AFTER_S:
        return True
    return host == _host() and not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: rely on the age only
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _new_file_mode(folder: Path) -> int:
    """The permission bits a new file gets here (0666 less the umask), read without changing the umask."""
    probe = folder / ".mode"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.unlink(probe)


# ---------------------------------------------------------------------------------- what a path or id names

MODEL_CONFIG_NAME = "config.json"
_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
_TABLE_EXTENSIONS = (".parquet", ".arrow", ".csv", ".jsonl")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_KIND_NAMES = {
    "model": "a model folder",
    "vector": "an explanation vector",
    "dataset": "a dataset folder",
    "file": "a file",
    "folder": "a folder with neither a model nor an explanation vector",
    "missing": "a path that does not exist",
    "hub": "a Hub repo id",
}


@dataclass(frozen=True)
class Source:
    """What a ``--model`` / ``--vector`` argument names; see :func:`classify_source`.

    kind: ``"model"`` (a folder, or a cached Hub repo, with ``config.json``), ``"vector"`` (one with
        ``explanation_vector_config.json``), ``"dataset"`` (``save_to_disk``, a folder of images or of tables),
        ``"file"``, ``"folder"`` (anything else), ``"missing"`` (a path that cannot be a Hub id and does not
        exist) or ``"hub"`` (a Hub repo id, not looked up: nothing is downloaded to classify it).
    local: whether it names something on this machine (a Hub repo found in the cache while offline is not).
    contents: the first entries of a folder, for messages.
    """

    name: str
    kind: str
    local: bool
    contents: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return _KIND_NAMES[self.kind]

    @property
    def offline_miss(self) -> bool:
        """A Hub id while the Hub is offline (``HF_HUB_OFFLINE=1``) and nothing of it is in the cache."""
        return self.kind == "hub" and is_offline_mode()


def classify_source(
    name: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Source:
    """Say what `name` is, from the file system (and the Hub cache when offline) only: no network.

    Used by `apply_explanation_vector`, `ExplanationVector.from_pretrained` and every command that takes a
    ``--model`` or ``--vector``, so that each says what it was given instead of failing further down.
    """
    path = os.fspath(name)
    if os.path.isdir(path):
        try:
            entries = sorted(os.listdir(path))
        except OSError:
            entries = []
        if VECTOR_CONFIG_NAME in entries:
            kind = "vector"
        elif MODEL_CONFIG_NAME in entries:
            kind = "model"
        elif _looks_like_dataset(path, entries):
            kind = "dataset"
        else:
            kind = "folder"
        return Source(path, kind, True, tuple(entries[:20]))
    if os.path.exists(path):
        return Source(path, "file", True)
    if not could_be_repo_id(path):
        return Source(path, "missing", True)
    if is_offline_mode():
        for filename, kind in ((VECTOR_CONFIG_NAME, "vector"), (MODEL_CONFIG_NAME, "model")):
            cached = try_to_load_from_cache(path, filename, cache_dir=cache_dir, revision=revision)
            if isinstance(cached, str):
                return Source(path, kind, False)
    return Source(path, "hub", False)


def _looks_like_dataset(path: str, entries: list[str]) -> bool:
    if any(marker in entries for marker in _DATASET_MARKERS):
        return True
    lowered = [e.lower() for e in entries]
    if any(e.endswith(_TABLE_EXTENSIONS) or e.endswith(_IMAGE_EXTENSIONS) for e in lowered):
        return True
    for entry in entries[:50]:  # an image folder: class subfolders of images (bounded: a peek, not a walk)
        sub = os.path.join(path, entry)
        if os.path.isdir(sub):
            try:
                names = sorted(os.listdir(sub))[:50]
            except OSError:
                continue
            if any(n.lower().endswith(_IMAGE_EXTENSIONS + _TABLE_EXTENSIONS) for n in names):
                return True
    return False


def offline_message(name: str) -> str:
    return (
        f"{name}: no such local folder, and the Hub is offline (HF_HUB_OFFLINE=1) with no cached copy of a "
        "repo of that name. Pass a local folder, or download the repo once while online."
    )


# ---------------------------------------------------------------------------------------------- reading


def _resolve_config_file(source: str, download_kwargs: Mapping[str, Any]) -> str:
    found = classify_source(
        source, revision=download_kwargs.get("revision"), cache_dir=download_kwargs.get("cache_dir")
    )
    if found.kind == "missing":
        raise FileNotFoundError(f"{source}: no such folder.")
    if found.offline_miss:
        raise OSError(offline_message(source))
    if os.path.isdir(source):
        remove_stale_temporaries(source)
        # Check both files up front: a folder without them is most likely something else (e.g. a model).
        missing = [
            os.path.join(source, name)
            for name in (VECTOR_CONFIG_NAME, VECTOR_WEIGHTS_NAME)
            if not os.path.isfile(os.path.join(source, name))
        ]
        if missing:
            raise _not_a_vector(source, os.listdir(source), missing, found.kind)
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


def _not_a_vector(
    source: str, files: Iterable[str], missing: Iterable[str], kind: str | None = None
) -> NotAnExplanationVectorError:
    files = sorted(files)
    hint = ""
    if "config.json" in files or any(f.endswith((".safetensors", ".bin")) for f in files):
        hint = " It looks like a model; load it with `ViTForSelfExplainingClassification.from_pretrained`."
    elif kind == "dataset":
        hint = " It looks like a dataset."
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
    # What the file must hold, from the (checked) config: a dense tensor under its key, a sparse or low-rank one
    # as its parts (format 2, see `compression`).
    layout = stored_layout(config.tensors, config.storage_dtype)
    with handle as f:
        keys = set(f.keys())
        declared = set(layout)
        if keys != declared:
            raise InvalidExplanationVectorError(
                f"{where} does not hold the tensors its config declares: "
                f"missing {sorted(declared - keys)[:5]}, unexpected {sorted(keys - declared)[:5]}."
            )
        for key in sorted(keys):
            shape, expected_dtype = layout[key]
            view = f.get_slice(key)
            if list(view.get_shape()) != shape:
                raise InvalidExplanationVectorError(
                    f"{where}: tensor {key!r} has shape {view.get_shape()}, the config declares {shape}."
                )
            if view.get_dtype() != expected_dtype:
                kind = "indices" if key.endswith(PART_SEPARATOR + "indices") else "values"
                raise InvalidExplanationVectorError(
                    f"{where}: tensor {key!r} is {view.get_dtype()}, the config declares {expected_dtype} "
                    + (
                        "(sparse indices are int16, int32 or int64)."
                        if kind == "indices"
                        else "(explanation vectors hold float32, float16 or bfloat16)."
                    )
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
                # A dense tensor is read as it is; a sparse or low-rank one is rebuilt from its parts, whose data
                # (index ranges, finiteness) `decode_tensor` checks before the dense tensor is allocated.
                tensor = decode_tensor(key, config.tensors[key], f.get_tensor, where)
        except InvalidExplanationVectorError:
            raise
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
