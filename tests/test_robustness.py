"""Bad input, atomic updates and security for explanation vectors and `apply_explanation_vector` (issue 7).

The fuzz test writes a few hundred broken vector folders from a seeded generator and checks, for each, that
`ExplanationVector.from_pretrained` + `apply_explanation_vector` raise the expected `ExplanationVectorError`
subclass (or succeed silently for the tolerable cases), never another exception type, never hang, and never
change the target model's bits.

Tolerable (loads and applies with no warning): a missing or garbage `README.md` model card (the card is
documentation, never read), unknown extra config fields (forward compatibility inside a format version), a
vector covering a subset of the architecture's tensors, float16/bfloat16 storage, string safetensors metadata,
extra files (including pickles, which are never opened), and JSON nested up to `MAX_JSON_DEPTH` levels.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import gc
import json
import logging
import math
import pathlib
import pickle
import random
import resource
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import logging as hf_logging

import selfexplain
from selfexplain import (
    ExplanationVector,
    ExplanationVectorError,
    IncompatibleExplanationVectorError,
    InvalidExplanationVectorError,
    NotAnExplanationVectorError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
)
from selfexplain.vectors.checks import MAX_CONFIG_BYTES, MAX_HEADER_BYTES, MAX_JSON_DEPTH, MAX_NUM_LABELS
from selfexplain.vectors.compression import VectorCompression, encode_tensors
from selfexplain.vectors.config import FORMAT_VERSION, VECTOR_CONFIG_NAME, VECTOR_WEIGHTS_NAME
from tests._tiny import tiny_classifier, tiny_config, tiny_self_explaining

FUZZ_SEED = 20240707
FUZZ_CASES = 342  # 6 draws of each of the 57 generators
CASE_TIME_LIMIT_S = 10.0

CONFIG, WEIGHTS, CARD = VECTOR_CONFIG_NAME, VECTOR_WEIGHTS_NAME, "README.md"
DIRECTORY = b"<a directory>"  # a file content meaning "make this path a directory"
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


# ---------------------------------------------------------------------------------------------- file helpers


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor],
    *,
    edit_header: Callable[[dict], None] | None = None,
    metadata: object = None,
    header_length: int | None = None,
) -> bytes:
    """A safetensors file written by hand, so that tests can make its header lie."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    blobs, offset = [], 0
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {
            "dtype": _ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    if edit_header is not None:
        edit_header(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    length = len(text) if header_length is None else header_length
    return length.to_bytes(8, "little") + text + b"".join(blobs)


class _TouchOnUnpickle:
    """Unpickling this creates `path`: a stand-in for a malicious pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weight": _TouchOnUnpickle(marker)})


@dataclass
class Base:
    """A valid tiny vector: its parsed config, float32 tensors and model card bytes."""

    config: dict
    tensors: dict[str, torch.Tensor]
    card: bytes
    marker: Path  # created if any pickle written by a case is ever unpickled

    def config_with(self, edit: Callable[[dict], object]) -> bytes:
        config = copy.deepcopy(self.config)
        edit(config)
        return json.dumps(config).encode()

    def tensors_with(self, edit: Callable[[dict], object]) -> dict[str, torch.Tensor]:
        tensors = {k: v.clone() for k, v in self.tensors.items()}
        edit(tensors)
        return tensors


@dataclass
class Case:
    """One fuzzed vector folder and what loading and applying it must do."""

    kind: str
    files: dict[str, bytes | None] = field(default_factory=dict)  # overrides; None removes the file
    expect: type[ExplanationVectorError] | None = None  # None: loads and applies silently
    mention: str = ""  # text the error message must contain


def write_case(folder: Path, case: Case, base: Base) -> Path:
    files: dict[str, bytes | None] = {
        CONFIG: json.dumps(base.config).encode(),
        WEIGHTS: safetensors_bytes(base.tensors),
        CARD: base.card,
    }
    files.update(case.files)
    folder.mkdir(parents=True)
    for name, content in files.items():
        if content is DIRECTORY:
            (folder / name).mkdir()
        elif content is not None:
            (folder / name).write_bytes(content)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("base")
    vector = ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=70),
        prediction_only=tiny_classifier(seed=71),
        base_model="org/tiny-base",
        recommended_alpha=0.5,
        provenance={"source_dataset": "builtin:mnist"},
    )
    vector.save_pretrained(root)
    return Base(
        config=json.loads((root / CONFIG).read_text()),
        tensors=dict(vector.tensors),
        card=(root / CARD).read_bytes(),
        marker=tmp_path_factory.mktemp("pickle") / "UNPICKLED",
    )


# ---------------------------------------------------------------------------------------------- generators
# Each generator draws one case of a class of bad (or tolerable) input; the fuzz loop cycles through them.


def _key(rng: random.Random, base: Base) -> str:
    return rng.choice(sorted(base.tensors))


def gen_missing_file(rng, base):
    name = rng.choice([CONFIG, WEIGHTS])
    return Case("missing file", {name: None}, NotAnExplanationVectorError, name)


def gen_file_is_a_directory(rng, base):
    name = rng.choice([CONFIG, WEIGHTS])
    return Case("file is a directory", {name: DIRECTORY}, NotAnExplanationVectorError, name)


def gen_pickle_only(rng, base):
    name = rng.choice(["pytorch_model.bin", "explanation_vector.bin", "vector.pt", "weights.pkl"])
    files = {CONFIG: None, WEIGHTS: None, CARD: None, name: malicious_pickle(base.marker)}
    return Case("only a pickle", files, NotAnExplanationVectorError, "never read")


def gen_truncated_weights(rng, base):
    data = safetensors_bytes(base.tensors)
    return Case(
        "truncated safetensors",
        {WEIGHTS: data[: rng.randrange(len(data))]},
        InvalidExplanationVectorError,
        WEIGHTS,
    )


def gen_garbage_weights(rng, base):
    data = rng.randbytes(rng.choice([0, 3, 8, 64, 4096]))
    if rng.random() < 0.5:  # a plausible small header length followed by garbage
        data = rng.randrange(1, 256).to_bytes(8, "little") + data
    return Case("garbage safetensors", {WEIGHTS: data}, InvalidExplanationVectorError, WEIGHTS)


def gen_lying_offsets(rng, base):
    key, shift = _key(rng, base), rng.choice([-8, -4, -1, 1, 4, 1 << 20, 1 << 40])
    which = rng.randrange(2)

    def edit(header):
        header[key]["data_offsets"][which] += shift

    data = safetensors_bytes(base.tensors, edit_header=edit)
    return Case("header lies about offsets", {WEIGHTS: data}, InvalidExplanationVectorError, WEIGHTS)


def gen_lying_header_shape(rng, base):
    key = _key(rng, base)
    new_shape = [rng.choice([0, 1, 7, 10**6, 2**62])] + list(base.tensors[key].shape)

    def edit(header):
        header[key]["shape"] = new_shape

    data = safetensors_bytes(base.tensors, edit_header=edit)
    return Case("header lies about a shape", {WEIGHTS: data}, InvalidExplanationVectorError, WEIGHTS)


def gen_lying_header_length(rng, base):
    real = len(safetensors_bytes(base.tensors)) - sum(t.numel() * 4 for t in base.tensors.values()) - 8
    length = rng.choice([0, 1, real - 8, real + 8, real * 3, MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1])
    data = safetensors_bytes(base.tensors, header_length=length)
    return Case("header length lies", {WEIGHTS: data}, InvalidExplanationVectorError, WEIGHTS)


def gen_huge_real_header(rng, base):
    metadata = {"format": "pt", "padding": "x" * (MAX_HEADER_BYTES + rng.randrange(1, 1000))}
    data = safetensors_bytes(base.tensors, metadata=metadata)
    return Case("header over the size limit", {WEIGHTS: data}, InvalidExplanationVectorError, "header")


def gen_wrong_dtype(rng, base):
    key = _key(rng, base)
    dtype = rng.choice(
        [torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.float16]
    )

    def edit(tensors):
        tensors[key] = tensors[key] > 0 if dtype is torch.bool else tensors[key].to(dtype)

    data = safetensors_bytes(base.tensors_with(edit))
    return Case("wrong dtype", {WEIGHTS: data}, InvalidExplanationVectorError, key)


def gen_declared_dtype_mismatch(rng, base):
    key, dtype = _key(rng, base), rng.choice(["float16", "bfloat16"])
    config = base.config_with(lambda c: c["tensors"][key].update(dtype=dtype))
    return Case("config dtype differs from file", {CONFIG: config}, InvalidExplanationVectorError, key)


def _set_storage_dtype(config: dict, name: str) -> None:
    config["storage_dtype"] = name
    for spec in config["tensors"].values():
        spec["dtype"] = name


def gen_non_finite(rng, base):
    key, value = _key(rng, base), rng.choice([math.nan, math.inf, -math.inf])
    name = rng.choice(["float32", "float16", "bfloat16"])

    def edit(tensors):
        tensors[key].view(-1)[rng.randrange(tensors[key].numel())] = value
        for k in tensors:
            tensors[k] = tensors[k].to(getattr(torch, name))

    files = {
        WEIGHTS: safetensors_bytes(base.tensors_with(edit)),
        CONFIG: base.config_with(lambda c: _set_storage_dtype(c, name)),
    }
    return Case("NaN/Inf values", files, InvalidExplanationVectorError, key)


def gen_overflowing_values(rng, base):
    key = _key(rng, base)
    # alpha * value > 3.4e38, the largest float32: finite in the file, infinite once applied.
    alpha, value = rng.choice([10.0, 100.0, 1000.0]), rng.choice([1e38, 3e38, -3e38])

    def edit(tensors):
        tensors[key].view(-1)[rng.randrange(tensors[key].numel())] = value

    files = {
        WEIGHTS: safetensors_bytes(base.tensors_with(edit)),
        CONFIG: base.config_with(lambda c: c.update(recommended_alpha=alpha)),
    }
    return Case("finite values that overflow the model", files, ExplanationVectorError, key)


def gen_key_missing_from_file(rng, base):
    key = _key(rng, base)
    data = safetensors_bytes(base.tensors_with(lambda t: t.pop(key)))
    return Case("declared key missing from file", {WEIGHTS: data}, InvalidExplanationVectorError, key)


def gen_extra_key_in_file(rng, base):
    key = rng.choice(
        ["classifier.weight", "vit.encoder.layer.5.output.dense.weight", "extra", "vit.pooler.dense.bias"]
    )
    data = safetensors_bytes(base.tensors_with(lambda t: t.update({key: torch.zeros(3)})))
    return Case("extra key in file", {WEIGHTS: data}, InvalidExplanationVectorError, key)


def gen_renamed_key(rng, base):
    old = _key(rng, base)
    new = rng.choice(
        [
            old.replace("vit.", "vit_", 1),
            old + ".orig",
            old.replace("layer.0", "layer.2").replace("layer.1", "layer.7"),
            old.replace("layer.0", "layer.00").replace("layer.1", "layer.01"),
            "vit.encoder.layer." + "9" * 5000 + ".output.dense.weight",
            "classifier.extra",
            "",
            "vit.\u00e9mbeddings.cls_token",
        ]
    )
    if new == old:
        new = old + "_renamed"

    def rename(mapping):
        mapping[new] = mapping.pop(old)

    files = {
        CONFIG: base.config_with(lambda c: rename(c["tensors"])),
        WEIGHTS: safetensors_bytes(base.tensors_with(rename)),
    }
    mention = new[:60] if new.isascii() and len(new) < 100 else ""
    return Case("renamed key (config and file agree)", files, InvalidExplanationVectorError, mention)


def gen_subset_of_keys(rng, base):
    dropped = rng.sample(sorted(base.tensors), rng.randrange(1, len(base.tensors)))

    def drop(mapping):
        for key in dropped:
            mapping.pop(key)

    files = {
        CONFIG: base.config_with(lambda c: drop(c["tensors"])),
        WEIGHTS: safetensors_bytes(base.tensors_with(drop)),
    }
    return Case("subset of the architecture's keys (tolerable)", files)


def gen_empty_vector(rng, base):
    files = {CONFIG: base.config_with(lambda c: c.update(tensors={})), WEIGHTS: safetensors_bytes({})}
    return Case("no tensors at all", files, InvalidExplanationVectorError, "no tensors")


def gen_wrong_shape_everywhere(rng, base):
    key = _key(rng, base)
    shape = list(base.tensors[key].shape)
    new_shape = rng.choice([shape[::-1] + [1], [1, *shape], [max(shape) + 1], [2, 2, 2]])

    def reshape_tensor(tensors):
        tensors[key] = torch.zeros(new_shape)

    files = {
        CONFIG: base.config_with(lambda c: c["tensors"][key].update(shape=new_shape)),
        WEIGHTS: safetensors_bytes(base.tensors_with(reshape_tensor)),
    }
    return Case("wrong shape (config and file agree)", files, InvalidExplanationVectorError, key)


def gen_shape_lie_in_config(rng, base):
    key = _key(rng, base)
    new_shape = rng.choice([[1], [3, 3], list(base.tensors[key].shape) + [1]])
    config = base.config_with(lambda c: c["tensors"][key].update(shape=new_shape))
    return Case("config lies about a shape", {CONFIG: config}, InvalidExplanationVectorError, key)


def gen_shape_lie_in_file(rng, base):
    key = _key(rng, base)

    def reshape_tensor(tensors):
        tensors[key] = tensors[key].reshape(1, -1) if tensors[key].dim() == 1 else tensors[key].reshape(-1)

    data = safetensors_bytes(base.tensors_with(reshape_tensor))
    return Case("file holds another shape", {WEIGHTS: data}, InvalidExplanationVectorError, key)


def gen_malformed_json(rng, base):
    text = json.dumps(base.config).encode()
    choice = rng.randrange(5)
    if choice == 0:
        data = text[: rng.randrange(len(text) - 1)]  # always drops the closing brace
    elif choice == 1:
        data = rng.randbytes(rng.randrange(1, 300))
    elif choice == 2:
        data = b"\xff\xfe" + text
    elif choice == 3:
        data = text[:-1] + b",}"
    else:
        data = b""
    return Case("malformed JSON", {CONFIG: data}, InvalidExplanationVectorError, CONFIG)


def gen_not_an_object(rng, base):
    data = rng.choice([b"[]", b'"vit"', b"42", b"null", b"true", json.dumps([base.config]).encode()])
    return Case("JSON that is not an object", {CONFIG: data}, InvalidExplanationVectorError, CONFIG)


_WRONG_TYPES = {
    "model_type": [1, None, ["vit"], {"vit": 1}],
    "architecture": [[], "vit", None, 3],
    "tensors": [[], "x", None, 1.5],
    "base_model": [1, ["a"], {}, True],
    "base_model_revision": [2, [], {"sha": "x"}],
    "recommended_alpha": ["1.0", True, None, [1]],
    "storage_dtype": [32, "float64", "int8", None],
    "provenance": [[], "mnist", 3, None],
    "format_version": ["1", 1.0, True, None, [1]],
}


def gen_wrong_field_type(rng, base):
    name = rng.choice(sorted(_WRONG_TYPES))
    value = rng.choice(_WRONG_TYPES[name])
    return Case(
        "wrong field type",
        {CONFIG: base.config_with(lambda c: c.update({name: value}))},
        InvalidExplanationVectorError,
        name,
    )


def gen_missing_required_field(rng, base):
    name = rng.choice(["model_type", "architecture", "tensors", "format_version"])
    return Case(
        "missing required field",
        {CONFIG: base.config_with(lambda c: c.pop(name))},
        InvalidExplanationVectorError,
        name,
    )


def gen_bad_tensor_spec(rng, base):
    key = _key(rng, base)
    spec = rng.choice(
        [
            None,
            [],
            {"dtype": "float32"},
            {"shape": "32"},
            {"shape": [-1]},
            {"shape": [True]},
            {"shape": [2.0]},
            {"shape": [1] * 64},
            {"shape": list(base.tensors[key].shape), "dtype": "float64"},
            {"shape": list(base.tensors[key].shape), "dtype": None},
        ]
    )
    config = base.config_with(lambda c: c["tensors"].update({key: spec}))
    return Case("bad tensor spec", {CONFIG: config}, InvalidExplanationVectorError, key)


def gen_future_or_invalid_version(rng, base):
    version = rng.choice([FORMAT_VERSION + 1, FORMAT_VERSION + 2, 99, 10**6, 10**30, 0, -1])
    mention = "newer" if version > 1 else "format_version"
    config = base.config_with(lambda c: c.update(format_version=version))
    return Case("unknown format_version", {CONFIG: config}, InvalidExplanationVectorError, mention)


def gen_huge_alpha(rng, base):
    literal = rng.choice(["1e308", "-1e308", "1e999", "-1e999", "NaN", "Infinity", "1e4"])
    text = base.config_with(lambda c: c.update(recommended_alpha="@ALPHA@")).replace(
        b'"@ALPHA@"', literal.encode()
    )
    return Case(
        "huge or non-finite recommended_alpha",
        {CONFIG: text},
        InvalidExplanationVectorError,
        "recommended_alpha",
    )


def gen_giant_shape(rng, base):
    key = _key(rng, base)
    shape = [10 ** rng.randrange(6, 40) for _ in range(rng.randrange(1, 4))]

    def edit(header):
        header[key]["shape"] = shape  # the header agrees with the config; no data could back it

    files = {
        CONFIG: base.config_with(lambda c: c["tensors"][key].update(shape=shape)),
        WEIGHTS: safetensors_bytes(base.tensors, edit_header=edit),
    }
    return Case("giant declared shape", files, InvalidExplanationVectorError, key)


def gen_giant_architecture(rng, base):
    name = rng.choice(
        [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
            "num_channels",
        ]
    )
    value = rng.choice([10**9, 2**63, 10**40, 0, -3, 2.5, "32", None, True, [16], [16, 16, 16]])
    config = base.config_with(lambda c: c["architecture"].update({name: value}))
    return Case("giant or invalid architecture value", {CONFIG: config}, InvalidExplanationVectorError, name)


def gen_unbuildable_architecture(rng, base):
    edit = rng.choice(
        [
            {"num_attention_heads": 3},  # 32 is not divisible by 3
            {"hidden_act": "no-such-activation"},
            {"hidden_act": 1},
            {"qkv_bias": "yes"},
        ]
    )
    missing = rng.random() < 0.3
    field_name = rng.choice(["hidden_size", "qkv_bias"]) if missing else next(iter(edit))

    def change(config):
        if missing:
            config["architecture"].pop(field_name)
        else:
            config["architecture"].update(edit)

    return Case(
        "unbuildable architecture",
        {CONFIG: base.config_with(change)},
        InvalidExplanationVectorError,
        field_name,
    )


def gen_other_architecture(rng, base):
    edit, expect, mention = rng.choice(
        [
            ({"hidden_act": "relu"}, IncompatibleExplanationVectorError, "hidden_act"),
            ({"hidden_act": "gelu_new"}, IncompatibleExplanationVectorError, "hidden_act"),
            ({"qkv_bias": False}, InvalidExplanationVectorError, "ViT with this architecture"),
            ({"image_size": 32}, InvalidExplanationVectorError, "position_embeddings"),
            ({"num_hidden_layers": 1}, InvalidExplanationVectorError, "1 layers"),
        ]
    )
    return Case(
        "vector for another architecture",
        {CONFIG: base.config_with(lambda c: c["architecture"].update(edit))},
        expect,
        mention,
    )


def gen_other_model_type(rng, base):
    model_type = rng.choice(["deit", "clip", "", "vit " * 100])
    config = base.config_with(lambda c: c.update(model_type=model_type))
    return Case("unsupported model_type", {CONFIG: config}, InvalidExplanationVectorError, "model_type")


def gen_huge_integer_literal(rng, base):
    digits = rng.choice([5000, 20000])
    where = rng.choice(["recommended_alpha", "format_version", "provenance"])
    text = base.config_with(lambda c: c.update({where: "@BIG@"})).replace(b'"@BIG@"', b"9" * digits)
    return Case(
        "integer literal with thousands of digits", {CONFIG: text}, InvalidExplanationVectorError, CONFIG
    )


def gen_deep_nesting(rng, base):
    depth = int(10 ** rng.uniform(0, 5.5))
    text = base.config_with(lambda c: c.update(provenance={"deep": "@DEEP@"})).replace(
        b'"@DEEP@"', b"[" * depth + b"]" * depth
    )
    total_depth = depth + 2  # the top-level object and `provenance` itself
    if total_depth <= MAX_JSON_DEPTH:
        return Case("nested JSON within the limit (tolerable)", {CONFIG: text})
    return Case("deeply nested JSON", {CONFIG: text}, InvalidExplanationVectorError, "nested")


def gen_oversized_config(rng, base):
    padding = "x" * (MAX_CONFIG_BYTES + rng.randrange(1, 10_000))
    config = base.config_with(lambda c: c["provenance"].update(notes=padding))
    return Case("config over the size limit", {CONFIG: config}, InvalidExplanationVectorError, "larger than")


def gen_oversized_classifier(rng, base):
    rows = MAX_NUM_LABELS + rng.choice([1, 10**6, 10**12])
    hidden = base.config["architecture"]["hidden_size"]

    def edit(config):
        config["tensors"]["classifier.weight"] = {"shape": [rows, hidden], "dtype": "float32"}

    return Case(
        "classifier with too many classes",
        {CONFIG: base.config_with(edit)},
        InvalidExplanationVectorError,
        "classifier.weight",
    )


def gen_bad_metadata(rng, base):
    metadata = rng.choice([{"format": 1}, ["pt"], {"format": None}, "pt"])
    data = safetensors_bytes(base.tensors, metadata=metadata)
    return Case("non-string safetensors metadata", {WEIGHTS: data}, InvalidExplanationVectorError, WEIGHTS)


def gen_missing_card(rng, base):
    return Case("missing model card (tolerable)", {CARD: None})


def gen_garbage_card(rng, base):
    return Case("garbage model card (tolerable)", {CARD: rng.randbytes(rng.randrange(1, 200))})


def _add_unknown_fields(config: dict) -> None:
    config["future_field"] = {"x": 1}
    config["architecture"]["layer_scale"] = True
    next(iter(config["tensors"].values()))["note"] = "hi"


def gen_unknown_fields(rng, base):
    return Case("unknown extra fields (tolerable)", {CONFIG: base.config_with(_add_unknown_fields)})


def gen_extra_pickle(rng, base):
    return Case(
        "a pickle next to a valid vector (tolerable)", {"pytorch_model.bin": malicious_pickle(base.marker)}
    )


def gen_string_metadata(rng, base):
    data = safetensors_bytes(
        base.tensors, metadata={"format": "pt", "note": rng.choice(["hello", "", "\u00e9"])}
    )
    return Case("string metadata (tolerable)", {WEIGHTS: data})


def gen_half_storage(rng, base):
    name = rng.choice(["float16", "bfloat16"])
    config = base.config_with(lambda c: _set_storage_dtype(c, name))
    data = safetensors_bytes({k: v.to(getattr(torch, name)) for k, v in base.tensors.items()})
    return Case("half-precision storage (tolerable)", {CONFIG: config, WEIGHTS: data})


# Compact storage (format 2): sparse and low-rank files whose config or data lie. Each starts from a valid
# compressed vector that the library itself wrote, then breaks one thing.
_SPARSE_LOW_RANK = "low_rank:4+top_k:0.25"


def _compressed(base: Base, setting: str = _SPARSE_LOW_RANK) -> tuple[dict, dict[str, torch.Tensor]]:
    compression = VectorCompression.parse(setting)
    stored, specs = encode_tensors(base.tensors, compression, torch.float32)
    config = copy.deepcopy(base.config)
    config.update(tensors=specs, format_version=2, compression=compression.to_dict())
    return config, stored


def _encoded_key(config: dict, rng: random.Random, encoding: str) -> str:
    return rng.choice(sorted(k for k, s in config["tensors"].items() if s.get("encoding") == encoding))


def _files(config: dict, stored: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {CONFIG: json.dumps(config).encode(), WEIGHTS: safetensors_bytes(stored)}


def gen_compressed_tolerable(rng, base):
    setting = rng.choice(["top_k:0.1", "dare:0.9@1", "low_rank:2", _SPARSE_LOW_RANK, "top_k:1.0"])
    config, stored = _compressed(base, setting)
    return Case("compressed vector (tolerable)", _files(config, stored))


def gen_sparse_index_out_of_range(rng, base):
    config, stored = _compressed(base)
    key = _encoded_key(config, rng, "sparse")
    indices = stored[key + "::indices"]
    numel = math.prod(config["tensors"][key]["shape"])
    bad = rng.choice([numel, numel + 7, -1, torch.iinfo(indices.dtype).max, torch.iinfo(indices.dtype).min])
    indices[rng.choice([0, -1])] = bad
    return Case("sparse index out of range", _files(config, stored), InvalidExplanationVectorError, key)


def gen_sparse_indices_not_increasing(rng, base):
    config, stored = _compressed(base)
    key = rng.choice(
        [k for k, s in config["tensors"].items() if s.get("encoding") == "sparse" and s["nnz"] > 1]
    )
    indices = stored[key + "::indices"]
    if rng.random() < 0.5:
        indices[1] = indices[0]  # an entry stored twice
    else:
        stored[key + "::indices"] = indices.flip(0).contiguous()
    return Case(
        "sparse indices repeat or decrease",
        _files(config, stored),
        InvalidExplanationVectorError,
        "increasing",
    )


def gen_sparse_nnz_lies(rng, base):
    config, stored = _compressed(base)
    key = _encoded_key(config, rng, "sparse")
    numel = math.prod(config["tensors"][key]["shape"])
    nnz = rng.choice([config["tensors"][key]["nnz"] + 1, numel + 1, 10**12, -1, 2.5, None, "3"])
    config["tensors"][key]["nnz"] = nnz
    mention = "nnz" if not isinstance(nnz, int) or nnz < 0 or nnz > numel else key
    return Case("sparse nnz lies", _files(config, stored), InvalidExplanationVectorError, mention)


def gen_sparse_index_dtype(rng, base):
    config, stored = _compressed(base)
    key = _encoded_key(config, rng, "sparse")
    if rng.random() < 0.5:  # the file stores indices as another type than the config says
        dtype = rng.choice([torch.float32, torch.int8, torch.uint8, torch.float64, torch.int64])
        if dtype is torch.int64 and config["tensors"][key]["index_dtype"] == "int64":
            dtype = torch.int32
        stored[key + "::indices"] = stored[key + "::indices"].to(dtype)
        mention = key
    else:  # the config names an index type that is not allowed
        config["tensors"][key]["index_dtype"] = rng.choice(["float32", "uint8", None, 16])
        mention = "index_dtype"
    return Case("sparse index dtype", _files(config, stored), InvalidExplanationVectorError, mention)


def gen_low_rank_rank_out_of_bounds(rng, base):
    config, stored = _compressed(base)
    key = _encoded_key(config, rng, "low_rank")
    shape = config["tensors"][key]["shape"]
    rank = rng.choice([min(shape) + 1, 10**9, 0, -2, 1.5, None])
    config["tensors"][key]["rank"] = rank
    if isinstance(rank, int) and rank > 0 and rank < 10**6:  # the file agrees: factors of that rank
        stored[key + "::low_rank_a"] = torch.zeros(shape[0], rank)
        stored[key + "::low_rank_b"] = torch.zeros(rank, shape[1])
    return Case("low-rank rank out of bounds", _files(config, stored), InvalidExplanationVectorError, "rank")


def gen_low_rank_factor_shapes(rng, base):
    config, stored = _compressed(base)
    key = _encoded_key(config, rng, "low_rank")
    part = rng.choice(["::low_rank_a", "::low_rank_b"])
    shape = list(stored[key + part].shape)
    stored[key + part] = torch.zeros(
        rng.choice([shape[::-1], [shape[0] + 1, shape[1]], [shape[0] * shape[1]]])
    )
    return Case(
        "low-rank factor of the wrong shape", _files(config, stored), InvalidExplanationVectorError, key
    )


def gen_low_rank_not_a_matrix(rng, base):
    config, stored = _compressed(base)
    key = _encoded_key(config, rng, "sparse")  # a bias or LayerNorm: 1-D
    config["tensors"][key].update(encoding="low_rank", rank=1)
    return Case("low-rank 1-D tensor", _files(config, stored), InvalidExplanationVectorError, "only matrices")


def gen_encoded_parts_missing_or_extra(rng, base):
    config, stored = _compressed(base)
    key = _encoded_key(config, rng, rng.choice(["sparse", "low_rank"]))
    choice = rng.randrange(3)
    if choice == 0:  # a part is missing
        stored.pop(rng.choice([name for name in stored if name.startswith(key + "::")]))
    elif choice == 1:  # the dense tensor instead of its parts
        for name in [name for name in stored if name.startswith(key + "::")]:
            stored.pop(name)
        stored[key] = base.tensors[key].clone()
    else:  # an extra part
        stored[key + "::extra"] = torch.zeros(3)
    return Case("encoded parts missing or extra", _files(config, stored), InvalidExplanationVectorError, key)


def gen_unknown_encoding(rng, base):
    config, stored = _compressed(base)
    key = _encoded_key(config, rng, "sparse")
    config["tensors"][key]["encoding"] = rng.choice(["zstd", "", None, 3, ["sparse"]])
    return Case("unknown encoding", _files(config, stored), InvalidExplanationVectorError, "encoding")


def gen_compression_in_format_1(rng, base):
    config, stored = _compressed(base)
    config["format_version"] = 1
    if rng.random() < 0.5:
        config.pop("compression")  # the per-tensor encodings alone need format 2 too
    return Case(
        "compression in a format-1 file",
        _files(config, stored),
        InvalidExplanationVectorError,
        "format_version 2",
    )


def gen_bad_compression_record(rng, base):
    config, stored = _compressed(base)
    config["compression"] = rng.choice(
        [
            "top_k",
            [0.1],
            {"sparsity": "gzip", "density": 0.1, "rank": None, "seed": 0},
            {"sparsity": "top_k", "density": 7, "rank": None, "seed": 0},
            {"sparsity": None, "density": None, "rank": -3, "seed": 0},
            {"sparsity": "top_k", "density": 0.1, "rank": None, "seed": 0, "exec": "rm -rf"},
        ]
    )
    return Case(
        "bad compression record", _files(config, stored), InvalidExplanationVectorError, "compression"
    )


def gen_non_finite_compressed(rng, base):
    config, stored = _compressed(base)
    name = rng.choice(sorted(n for n in stored if n.endswith(("::values", "::low_rank_a", "::low_rank_b"))))
    stored[name].view(-1)[rng.randrange(stored[name].numel())] = rng.choice([math.nan, math.inf, -math.inf])
    return Case(
        "NaN/Inf in compressed parts",
        _files(config, stored),
        InvalidExplanationVectorError,
        name.split("::")[0],
    )


GENERATORS = [
    gen_missing_file,
    gen_file_is_a_directory,
    gen_pickle_only,
    gen_truncated_weights,
    gen_garbage_weights,
    gen_lying_offsets,
    gen_lying_header_shape,
    gen_lying_header_length,
    gen_huge_real_header,
    gen_wrong_dtype,
    gen_declared_dtype_mismatch,
    gen_non_finite,
    gen_overflowing_values,
    gen_key_missing_from_file,
    gen_extra_key_in_file,
    gen_renamed_key,
    gen_subset_of_keys,
    gen_empty_vector,
    gen_wrong_shape_everywhere,
    gen_shape_lie_in_config,
    gen_shape_lie_in_file,
    gen_malformed_json,
    gen_not_an_object,
    gen_wrong_field_type,
    gen_missing_required_field,
    gen_bad_tensor_spec,
    gen_future_or_invalid_version,
    gen_huge_alpha,
    gen_giant_shape,
    gen_giant_architecture,
    gen_unbuildable_architecture,
    gen_other_architecture,
    gen_other_model_type,
    gen_huge_integer_literal,
    gen_deep_nesting,
    gen_oversized_config,
    gen_oversized_classifier,
    gen_bad_metadata,
    gen_missing_card,
    gen_garbage_card,
    gen_unknown_fields,
    gen_extra_pickle,
    gen_string_metadata,
    gen_half_storage,
    gen_compressed_tolerable,
    gen_sparse_index_out_of_range,
    gen_sparse_indices_not_increasing,
    gen_sparse_nnz_lies,
    gen_sparse_index_dtype,
    gen_low_rank_rank_out_of_bounds,
    gen_low_rank_factor_shapes,
    gen_low_rank_not_a_matrix,
    gen_encoded_parts_missing_or_extra,
    gen_unknown_encoding,
    gen_compression_in_format_1,
    gen_bad_compression_record,
    gen_non_finite_compressed,
]


# ---------------------------------------------------------------------------------------------- fuzz driver


class CaseTimedOut(BaseException):
    """Raised by the alarm when one case runs too long (a BaseException so no `except Exception` hides it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise CaseTimedOut(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def model_state(model: torch.nn.Module) -> dict[str, tuple[bytes, int, int]]:
    """Every tensor's exact bytes, version counter (bumped by any in-place write) and storage pointer."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return {
        name: (t.detach().reshape(-1).view(torch.uint8).numpy().tobytes(), t._version, t.data_ptr())
        for name, t in tensors.items()
    }


def run_case(folder: Path, case: Case, target, explaining, explaining_state) -> str | None:
    """Load and apply one case; return a description of what went wrong, or None."""
    vector = outcome = None
    # Event loops that earlier tests (the Hub server, the app) leave to the garbage collector warn "unclosed event
    # loop" when collected: collect them before the window, so that a warning in it is this case's own.
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            vector = ExplanationVector.from_pretrained(folder)
            patched = apply_explanation_vector(target, vector)
        except ExplanationVectorError as err:
            outcome = err
        except Exception as err:  # the failure this test hunts for
            return f"crashed with {type(err).__name__}: {str(err)[:200]}"
    # The loader runs no asyncio: such a warning can only come from an earlier test's loop collected in the window.
    caught = [w for w in caught if not str(w.message).startswith("unclosed event loop")]
    if case.expect is None:
        if outcome is not None:
            return f"refused a tolerable input: {type(outcome).__name__}: {str(outcome)[:200]}"
        if caught:
            return f"warned: {[str(w.message)[:100] for w in caught]}"
        if not isinstance(patched, ViTForSelfExplainingClassification):
            return f"returned a {type(patched).__name__}"
        # A tolerable vector must survive a save/load round trip too.
        vector.save_pretrained(folder / "resaved")
        ExplanationVector.from_pretrained(folder / "resaved")
        return None
    if type(outcome) is not case.expect:
        got = "success" if outcome is None else f"{type(outcome).__name__}: {str(outcome)[:200]}"
        return f"expected {case.expect.__name__}, got {got}"
    message = str(outcome)
    if case.mention not in message:
        return f"message does not mention {case.mention!r}: {message[:200]}"
    if vector is None:  # refused while loading: the message names the file
        return None if str(folder) in message else f"message does not name the folder: {message[:200]}"
    # Refused by apply: the in-place path must refuse it as well and leave the model as it was.
    try:
        apply_explanation_vector(explaining, vector, inplace=True)
    except ExplanationVectorError as err:
        if type(err) is not case.expect:
            return f"in place: expected {case.expect.__name__}, got {type(err).__name__}"
    else:
        return "the in-place path accepted what the default path refused"
    return None if model_state(explaining) == explaining_state else "the in-place path changed the model"


def test_fuzzed_vector_folders_fail_cleanly_and_never_change_the_model(tmp_path, base):
    rng = random.Random(FUZZ_SEED)
    target, explaining = tiny_classifier(seed=72), tiny_self_explaining(seed=73)
    target_state, explaining_state = model_state(target), model_state(explaining)
    counts: Counter[str] = Counter()
    failures: list[str] = []
    slowest = 0.0
    for index in range(FUZZ_CASES):
        case = GENERATORS[index % len(GENERATORS)](rng, base)
        counts[case.kind] += 1
        folder = write_case(tmp_path / f"case{index:03d}", case, base)
        start = time.perf_counter()
        try:
            with time_limit(CASE_TIME_LIMIT_S):
                problem = run_case(folder, case, target, explaining, explaining_state)
        except CaseTimedOut as err:
            problem = f"hung ({err})"
        slowest = max(slowest, time.perf_counter() - start)
        if model_state(target) != target_state:
            problem = (problem or "") + " / the input model was touched"
        if problem:
            failures.append(f"case {index} [{case.kind}]: {problem}")
    print(
        f"\nfuzz: {sum(counts.values())} cases, {len(counts)} classes, {len(failures)} failures, slowest {slowest:.2f}s"
    )
    assert not failures, "\n".join(failures)
    assert sum(counts.values()) >= 200 and len(counts) >= 40
    assert not base.marker.exists(), "a pickle was unpickled"


def test_generators_cover_every_expected_outcome(base):
    rng = random.Random(FUZZ_SEED)
    outcomes = {GENERATORS[i % len(GENERATORS)](rng, base).expect for i in range(FUZZ_CASES)}
    assert outcomes == {
        None,
        ExplanationVectorError,
        InvalidExplanationVectorError,
        IncompatibleExplanationVectorError,
        NotAnExplanationVectorError,
    }


# ---------------------------------------------------------------------------------------------- atomicity


@pytest.fixture(scope="module")
def vector() -> ExplanationVector:
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=70), prediction_only=tiny_classifier(seed=71)
    )


def same_bits(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a
    )


class CopyFailsOnce(torch.nn.Parameter):
    """A parameter whose `copy_` raises on the `fail_at`-th call across all such parameters (then never again)."""

    calls = 0
    fail_at = 3
    error: BaseException = RuntimeError("injected failure during the update")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            CopyFailsOnce.calls += 1
            if CopyFailsOnce.calls == CopyFailsOnce.fail_at:
                raise CopyFailsOnce.error
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})


def with_parameter_class(model: torch.nn.Module, cls: type[torch.nn.Parameter]) -> torch.nn.Module:
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = cls(param.detach().clone(), requires_grad=param.requires_grad)
    return model


@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()])
def test_a_failure_halfway_through_an_inplace_update_leaves_the_model_unchanged(vector, error):
    model = with_parameter_class(tiny_self_explaining(seed=74), CopyFailsOnce)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    CopyFailsOnce.calls, CopyFailsOnce.error = 0, error
    with pytest.raises(type(error)):
        apply_explanation_vector(model, vector, alpha=1.0, inplace=True)
    # The failure hit the third copy, after two parameters had been overwritten, and they were restored.
    assert CopyFailsOnce.calls > CopyFailsOnce.fail_at
    assert same_bits(model.state_dict(), before)
    assert model.config.to_dict() == config_before
    # The same call succeeds once nothing fails, and it does change the model.
    applied = apply_explanation_vector(model, vector, alpha=1.0, inplace=True)
    assert applied is model and not same_bits(model.state_dict(), before)


class ReadOnlyParameter(torch.nn.Parameter):
    """A parameter that refuses every in-place operation."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], ReadOnlyParameter):
            raise AssertionError(f"in-place {name} on an input parameter")
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})


@pytest.mark.parametrize("make", [tiny_classifier, tiny_self_explaining])
def test_the_default_path_never_writes_to_the_input_model(vector, make):
    model = with_parameter_class(make(seed=75), ReadOnlyParameter)
    before = model_state(model)
    patched = apply_explanation_vector(model, vector, alpha=1.0)
    assert patched is not model
    assert model_state(model) == before  # same bytes, same version counters, same storage
    assert not same_bits(patched.state_dict(), model.state_dict())


def test_overflow_is_refused_before_any_parameter_changes(vector):
    model = tiny_self_explaining(seed=76).to(torch.float16)
    before = model_state(model)
    with pytest.raises(ExplanationVectorError, match="overflow"):
        apply_explanation_vector(model, vector * 1e9, alpha=1.0, inplace=True)
    assert model_state(model) == before


# ---------------------------------------------------------------------------------------------- security


def test_the_malicious_pickle_is_real(tmp_path):
    canary = tmp_path / "canary"
    pickle.loads(malicious_pickle(canary))
    assert canary.exists()  # so a missing marker elsewhere means the pickle was never unpickled


def test_a_folder_with_only_a_pickle_is_refused_and_the_pickle_never_opened(tmp_path, vector):
    marker = tmp_path / "UNPICKLED"
    folder = tmp_path / "pickle-only"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(malicious_pickle(marker))
    with pytest.raises(NotAnExplanationVectorError, match="Pickle files are never read") as info:
        ExplanationVector.from_pretrained(folder)
    assert "pytorch_model.bin" in str(info.value)
    with pytest.raises(NotAnExplanationVectorError):
        apply_explanation_vector(tiny_classifier(), folder)
    # A vector whose weights come as a pickle instead of safetensors is refused the same way.
    vector.save_pretrained(folder)
    (folder / WEIGHTS).unlink()
    (folder / "explanation_vector.bin").write_bytes(malicious_pickle(marker))
    with pytest.raises(NotAnExplanationVectorError, match=WEIGHTS):
        ExplanationVector.from_pretrained(folder)
    assert not marker.exists()


def _pickle_only_classifier(folder: Path, marker: Path) -> Path:
    """A classifier folder whose weights are only a pickle that creates `marker` when unpickled."""
    folder.mkdir()
    tiny_classifier(seed=78).config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(malicious_pickle(marker))
    return folder


def test_a_classifier_with_only_pickled_weights_is_refused_and_never_unpickled(tmp_path, vector):
    marker = tmp_path / "UNPICKLED"
    folder = _pickle_only_classifier(tmp_path / "pickled-classifier", marker)
    with pytest.raises(OSError, match="safetensors weights only") as info:
        ViTForSelfExplainingClassification.from_pretrained(folder)
    assert "use_safetensors=None" in str(info.value)
    with pytest.raises(OSError, match="safetensors weights only"):
        apply_explanation_vector(folder, vector)
    assert not marker.exists()
    # The way out the message names works, for a checkpoint one trusts (here: real weights, torch.save'd).
    torch.save(tiny_classifier(seed=78).state_dict(), folder / "pytorch_model.bin")
    loaded = ViTForSelfExplainingClassification.from_pretrained(folder, use_safetensors=None)
    assert torch.equal(loaded.classifier.weight, tiny_classifier(seed=78).classifier.weight)


def test_a_pickled_classifier_on_the_hub_is_refused_before_its_weights_are_downloaded(hub, tmp_path, vector):
    marker = tmp_path / "UNPICKLED"
    hub.create_repo_from_folder(
        "robust/pickled-classifier", _pickle_only_classifier(tmp_path / "pickled", marker)
    )
    with pytest.raises(OSError, match="safetensors weights only"):
        apply_explanation_vector("robust/pickled-classifier", vector)
    assert hub.download_count("robust/pickled-classifier", "pytorch_model.bin") == 0
    assert not marker.exists()


def _trust_remote_code_uses(source: str, filename: str) -> list[str]:
    """Every call keyword or dict key named `trust_remote_code` in `source` (docstrings may mention it)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Call) and any(kw.arg == "trust_remote_code" for kw in node.keywords):
            found.append(f"{filename}:{node.lineno}")
        if isinstance(node, ast.Dict) and any(
            isinstance(key, ast.Constant) and key.value == "trust_remote_code" for key in node.keys
        ):
            found.append(f"{filename}:{node.lineno}")
    return found


def test_selfexplain_never_passes_trust_remote_code():
    sources = sorted(Path(selfexplain.__file__).parent.rglob("*.py"))
    assert len(sources) > 5
    assert [hit for path in sources for hit in _trust_remote_code_uses(path.read_text(), path.name)] == []
    # The scanner does see both spellings.
    probe = 'AutoModel.from_pretrained(r, trust_remote_code=True)\nf(**{"trust_remote_code": True})'
    assert _trust_remote_code_uses(probe, "probe.py") == ["probe.py:1", "probe.py:2"]


def _write_remote_code_model(folder: Path, marker: Path, model_type: str) -> None:
    """A classifier folder whose config points `auto_map` at code that creates `marker` when imported."""
    tiny_classifier(seed=77).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "remote_code.EvilConfig",
        "AutoModelForImageClassification": "remote_code.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import ViTConfig, ViTForImageClassification\n"
        "class EvilConfig(ViTConfig):\n    pass\n"
        "class EvilModel(ViTForImageClassification):\n    pass\n"
    )


def test_a_model_repo_with_remote_code_is_loaded_without_running_it(tmp_path, vector, monkeypatch):
    marker = tmp_path / "REMOTE_CODE_RAN"
    _write_remote_code_model(tmp_path / "vit", marker, "vit")
    patched = apply_explanation_vector(tmp_path / "vit", vector)
    assert isinstance(patched, ViTForSelfExplainingClassification)
    # An unknown model type with remote code: AutoConfig would ask on stdin whether to run the code. selfexplain
    # reads the config as data and refuses it; any prompt would fail this test instead of waiting.
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("selfexplain offered to run remote code"))
    _write_remote_code_model(tmp_path / "evil", marker, "evil-vit")
    with pytest.raises(
        IncompatibleExplanationVectorError, match="model_type: vector 'vit', model 'evil-vit'"
    ):
        apply_explanation_vector(tmp_path / "evil", vector)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- size limits


def _parameter_count(**overrides) -> int:
    with torch.device("meta"):
        model = ViTForSelfExplainingClassification(tiny_config(**overrides))
    return sum(p.numel() for p in model.parameters())


def _huge_vector_folder(folder: Path, base: Base, shape: list[int]) -> Path:
    """A vector whose config and safetensors header agree on a giant `position_embeddings` (no data behind it)."""
    key = "vit.embeddings.position_embeddings"

    def edit(header):
        header[key]["shape"] = shape
        header[key]["data_offsets"][1] = header[key]["data_offsets"][0] + 4 * math.prod(shape)

    files = {
        CONFIG: base.config_with(lambda c: c["tensors"][key].update(shape=shape)),
        WEIGHTS: safetensors_bytes(base.tensors, edit_header=edit),
    }
    return write_case(folder, Case("huge", files), base)


def test_declared_tensors_beyond_the_parameter_count_are_refused_before_reading(tmp_path, base):
    folder = _huge_vector_folder(tmp_path / "huge", base, [1, 10**6, 10**6])  # 4 TB of float32
    # The architecture is the tiny ViT with one class (the vector declares no classifier).
    capacity = _parameter_count(num_labels=1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(
        InvalidExplanationVectorError, match="refusing before reading any tensor data"
    ) as info:
        ExplanationVector.from_pretrained(folder)
    assert f"more than the {capacity:,} parameters" in str(info.value)
    assert "vit.embeddings.position_embeddings" in str(info.value) and CONFIG in str(info.value)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # KiB on Linux
    assert grown_kib < 64 * 1024  # nothing close to the declared size was allocated


def test_a_vector_as_large_as_its_architecture_is_accepted(tmp_path, base):
    # Every backbone tensor plus a 1000-class classifier: exactly the architecture's parameters.
    tensors = dict(base.tensors)
    tensors["classifier.weight"], tensors["classifier.bias"] = torch.zeros(1000, 32), torch.zeros(1000)

    def add_classifier(config):
        config["tensors"]["classifier.weight"] = {"shape": [1000, 32], "dtype": "float32"}
        config["tensors"]["classifier.bias"] = {"shape": [1000], "dtype": "float32"}

    folder = write_case(
        tmp_path / "full",
        Case("full", {CONFIG: base.config_with(add_classifier), WEIGHTS: safetensors_bytes(tensors)}),
        base,
    )
    loaded = ExplanationVector.from_pretrained(folder)
    assert sum(t.numel() for t in loaded.tensors.values()) == _parameter_count(num_labels=1000)


def test_config_and_header_size_limits(tmp_path, base):
    folder = write_case(
        tmp_path / "config", Case("big config", {CONFIG: b" " * MAX_CONFIG_BYTES + b"{}"}), base
    )
    with pytest.raises(InvalidExplanationVectorError, match=f"larger than {MAX_CONFIG_BYTES:,} bytes"):
        ExplanationVector.from_pretrained(folder)
    header = safetensors_bytes(base.tensors, header_length=2**40)
    folder = write_case(tmp_path / "header", Case("big header", {WEIGHTS: header}), base)
    with pytest.raises(
        InvalidExplanationVectorError, match=f"more than the {MAX_HEADER_BYTES:,} bytes allowed"
    ):
        ExplanationVector.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- over the Hub


def test_bad_vector_repos_are_refused_before_their_weights_are_downloaded(hub, tmp_path, base):
    marker = tmp_path / "UNPICKLED"
    pickle_only = tmp_path / "pickle-only"
    pickle_only.mkdir()
    (pickle_only / "pytorch_model.bin").write_bytes(malicious_pickle(marker))
    hub.create_repo_from_folder("robust/pickle-only", pickle_only)
    with pytest.raises(NotAnExplanationVectorError, match="Pickle files are never read"):
        ExplanationVector.from_pretrained("robust/pickle-only")
    with pytest.raises(NotAnExplanationVectorError):
        apply_explanation_vector(tiny_classifier(), "robust/pickle-only")
    assert hub.download_count("robust/pickle-only", "pytorch_model.bin") == 0 and not marker.exists()

    hub.create_repo_from_folder(
        "robust/huge", _huge_vector_folder(tmp_path / "huge", base, [1, 10**6, 10**6])
    )
    with pytest.raises(InvalidExplanationVectorError, match="refusing before reading"):
        ExplanationVector.from_pretrained("robust/huge")
    assert hub.download_count("robust/huge", WEIGHTS) == 0

    future = write_case(
        tmp_path / "future",
        Case("future", {CONFIG: base.config_with(lambda c: c.update(format_version=FORMAT_VERSION + 1))}),
        base,
    )
    hub.create_repo_from_folder("robust/future", future)
    with pytest.raises(InvalidExplanationVectorError, match="newer"):
        ExplanationVector.from_pretrained("robust/future")
    assert hub.download_count("robust/future", WEIGHTS) == 0

    garbage = write_case(tmp_path / "garbage", Case("garbage", {WEIGHTS: b"\x00" * 64}), base)
    hub.create_repo_from_folder("robust/garbage", garbage)
    with pytest.raises(InvalidExplanationVectorError, match="robust/garbage/explanation_vector.safetensors"):
        ExplanationVector.from_pretrained("robust/garbage")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.name}: {record.getMessage()} {record.args!r}")


@contextlib.contextmanager
def all_logs_at_debug() -> Iterator[_Records]:
    names = ["", "selfexplain", "huggingface_hub", "transformers", "httpx", "httpcore", "urllib3", "filelock"]
    loggers = [logging.getLogger(name) for name in names]
    handler, levels = _Records(), [logger.level for logger in loggers]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_debug()
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        if logger is loggers[0] or not logger.propagate:  # the root sees every logger that propagates
            logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
        hf_logging.set_verbosity(verbosity)


def test_tokens_are_never_printed_or_logged_during_a_push(hub, vector, tmp_path, capfd):
    with all_logs_at_debug() as logs:
        vector.push_to_hub("robust/token-check", token=hub.token)
        vector.save_pretrained(
            tmp_path / "vec", push_to_hub=True, repo_id="robust/token-check-2", token=hub.token
        )
        with pytest.raises(HfHubHTTPError) as failed:  # the loopback Hub refuses pull requests
            vector.push_to_hub("robust/token-check", token=hub.token, create_pr=True)
    out, err = capfd.readouterr()
    text = "\n".join([*logs.lines, out, err, str(failed.value), repr(failed.value)])
    assert hub.token not in text
    # The capture did see the authenticated requests of the push.
    assert any("robust/token-check" in line and "authenticated: True" in line for line in logs.lines)


def test_saving_the_same_vector_twice_gives_identical_bytes(tmp_path, vector):
    # safetensors orders several metadata entries at random: 8 saves would differ with probability 1 - 2**-7.
    for index in range(8):
        vector.save_pretrained(tmp_path / str(index), storage_dtype="float16", model_card=False)
    assert len({(tmp_path / str(index) / WEIGHTS).read_bytes() for index in range(8)}) == 1
