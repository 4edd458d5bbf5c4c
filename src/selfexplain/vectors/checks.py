"""Checks on vector files from strangers, run before anything is trusted or allocated: size limits, JSON
depth, the architecture's ranges, and every declared tensor's key and shape against that architecture.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers import ViTConfig
from transformers.activations import ACT2FN

from ..errors import InvalidExplanationVectorError
from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification
from .checkpoint_keys import serialized_names
from .compatibility import FINGERPRINT_FIELDS

if TYPE_CHECKING:
    from .config import ExplanationVectorConfig

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


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: Integer types the indices of a sparse tensor may be stored as (format 2), and their safetensors names.
_INDEX_DTYPES = {"int16": "I16", "int32": "I32", "int64": "I64"}
#: How a tensor may be encoded in a vector file; anything but "dense" needs format version 2.
ENCODINGS = ("dense", "sparse", "low_rank")
_MAX_TENSOR_DIMS = 8
# At most 6 digits, so `int()` of the index never meets Python's limit on long integer strings.
_LAYER_KEY = re.compile(r"vit\.encoder\.layer\.(0|[1-9][0-9]{0,5})\.(.+)")
#: Tensors of an explanation extension (`ViTExplanationExtension`), block index first.
EXTENSION_PREFIX = "explainer."
EXTENSION_KEY = re.compile(r"explainer\.blocks\.(0|[1-9][0-9]{0,5})\.(.+)")
#: Most explanation-extension blocks a vector may carry (the extension is meant to be small).
MAX_EXTENSION_LAYERS = 64


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


def _check_tensor_encoding(key: str, spec: Mapping[str, Any], format_version: int, source: str) -> None:
    """A declared tensor's encoding (format 2) is known and its sizes are bounded by its dense shape.

    Run on the config, before the safetensors header is read: ``nnz`` ≤ the tensor's entries and
    ``1 ≤ rank ≤ min(m, n)`` of a matrix, so a compressed file never holds more than about twice the values of the
    dense tensor (which `_check_declared_tensors` bounds by the architecture) and a lying config costs nothing.
    """
    encoding = spec.get("encoding", "dense")
    if encoding == "dense":
        return
    if encoding not in ENCODINGS:
        raise InvalidExplanationVectorError(
            f"{source}: tensor {key!r} has `encoding` {encoding!r:.40}; expected one of {list(ENCODINGS)}."
        )
    if format_version < 2:
        raise InvalidExplanationVectorError(
            f"{source}: tensor {key!r} is {encoding!r}, which needs format_version 2 (the config says {format_version})."
        )
    shape = spec["shape"]
    if encoding == "sparse":
        nnz, numel = spec.get("nnz"), math.prod(shape)
        if not _is_int(nnz) or not 0 <= nnz <= numel:
            raise InvalidExplanationVectorError(
                f"{source}: sparse tensor {key!r} needs `nnz`, an int in [0, {numel}] (its entries), got {nnz!r:.40}."
            )
        if spec.get("index_dtype") not in _INDEX_DTYPES:
            raise InvalidExplanationVectorError(
                f"{source}: sparse tensor {key!r} needs `index_dtype` in {sorted(_INDEX_DTYPES)}, "
                f"got {spec.get('index_dtype')!r:.40}."
            )
        return
    rank = spec.get("rank")
    if len(shape) != 2:
        raise InvalidExplanationVectorError(
            f"{source}: tensor {key!r} of shape {list(shape)} is declared low-rank; only matrices can be."
        )
    if not _is_int(rank) or not 1 <= rank <= min(shape):
        raise InvalidExplanationVectorError(
            f"{source}: low-rank tensor {key!r} of shape {list(shape)} needs `rank`, an int in "
            f"[1, {min(shape)}], got {rank!r:.40}."
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
    extension_shapes = _extension_shapes(json.dumps(fingerprint, sort_keys=True))
    extension_blocks = {
        int(match.group(1)) for key in config.tensors if (match := EXTENSION_KEY.fullmatch(key))
    }
    if extension_blocks and max(extension_blocks) >= MAX_EXTENSION_LAYERS:
        raise InvalidExplanationVectorError(
            f"{source}: the vector declares an explanation extension of {max(extension_blocks) + 1} blocks; at "
            f"most {MAX_EXTENSION_LAYERS} are accepted."
        )

    # The total first (Python ints, so giant shapes cannot overflow): the clearest message for a size attack.
    declared = sum(math.prod(spec["shape"]) for spec in config.tensors.values())
    capacity = _parameter_capacity(config, layer_shapes, other_shapes) + len(extension_blocks) * sum(
        math.prod(shape) for shape in extension_shapes.values()
    )
    if declared > capacity:
        largest = max(config.tensors, key=lambda k: math.prod(config.tensors[k]["shape"]))
        raise InvalidExplanationVectorError(
            f"{source}: the config declares {declared:,} values (the largest tensor: {largest!r:.120} with shape "
            f"{config.tensors[largest]['shape']}), more than the {capacity:,} parameters of a ViT with this "
            f"architecture ({num_layers} layers, hidden size {hidden}); refusing before reading any tensor data."
        )
    for key, spec in config.tensors.items():
        shape = tuple(spec["shape"])
        extension = EXTENSION_KEY.fullmatch(key)
        if extension:
            expected = extension_shapes.get(extension.group(2))
        else:
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
def _extension_shapes(architecture_json: str) -> dict[str, tuple[int, ...]]:
    """`{per-block suffix: shape}` of an explanation-extension block for this architecture (meta device)."""
    fields = {
        **json.loads(architecture_json),
        "num_hidden_layers": 1,
        "num_labels": 1,
        "explanation_head": "extension",
        "explanation_extension_layers": 1,
    }
    with torch.device("meta"):
        model = ViTForSelfExplainingClassification(ViTConfig(**fields))
    return {
        name.removeprefix("blocks.0."): tuple(tensor.shape)
        for name, tensor in model.explainer.state_dict().items()
    }


@functools.lru_cache(maxsize=16)
def _architecture_shapes(
    architecture_json: str,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Serialized tensor shapes of a ViT: `({per-layer suffix: shape}, {other key: shape})`.

    Built from a one-layer model on the meta device (no memory for weights), so the shapes are exactly those
    transformers creates, activation parameters and all; the layers are identical, so one stands for all.
    """
    fields = {**json.loads(architecture_json), "num_hidden_layers": 1, "num_labels": 1}
    with torch.device("meta"):
        model = ViTForSelfExplainingClassification(ViTConfig(**fields))
    state = model.state_dict()
    layer_shapes, other_shapes = {}, {}
    for serialized, name in serialized_names(model).items():
        layer = _LAYER_KEY.fullmatch(serialized)
        if serialized.startswith(EXTENSION_PREFIX):
            continue
        if layer:
            layer_shapes[layer.group(2)] = tuple(state[name].shape)
        else:
            other_shapes[serialized] = tuple(state[name].shape)
    return layer_shapes, other_shapes
