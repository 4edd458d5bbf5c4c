"""What `explanation_vector_config.json` holds (:class:`ExplanationVectorConfig`), the file names, and the
architecture fingerprint that decides whether a vector fits a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import InvalidExplanationVectorError
from .checks import (
    _MAX_TENSOR_DIMS,
    EXTENSION_KEY,
    EXTENSION_PREFIX,
    _check_architecture,
    _check_tensor_encoding,
    _is_int,
)
from .compression import VectorCompression

VECTOR_WEIGHTS_NAME = "explanation_vector.safetensors"
VECTOR_CONFIG_NAME = "explanation_vector_config.json"
#: The newest format this library reads. 1: dense tensors. 2: tensors may be sparse or low-rank (`compression`).
#: 3: the vector may carry an explanation extension (`explainer.blocks.N.*` tensors, see
#: `ViTExplanationExtension`). 4: the extension reads an inner block's output (`extension_input_layer`): a reader
#: that ignored the field would run it on the wrong tokens. 5: the extension's tokens go through the model's own later
#: blocks (`extension_route="backbone"`): a reader that ignored the field would score them unprocessed. Each vector is written in the oldest format that holds
#: it, so that older selfexplain versions keep reading what they can apply, and refuse the rest with "upgrade
#: selfexplain".
FORMAT_VERSION = 5
#: The format of a vector whose tensors are all dense.
DENSE_FORMAT_VERSION = 1
#: The format of a compressed vector (without an extension).
COMPRESSED_FORMAT_VERSION = 2
#: The format of a vector with an explanation extension.
EXTENSION_FORMAT_VERSION = 3
#: The format of a vector whose explanation extension reads an inner block (`extension_input_layer`).
INNER_EXTENSION_FORMAT_VERSION = 4
#: The format of a vector whose explanation extension's tokens go through the model's later blocks.
ROUTED_EXTENSION_FORMAT_VERSION = 5
#: `extension_route` values: the extension's tokens are scored by the classifier directly (what formats < 5 mean),
#: or pass through the model's own blocks after `extension_input_layer` first.
EXTENSION_ROUTES: tuple[str, ...] = ("classifier", "backbone")
#: Config attribute in which selfexplain records the base a model was fine-tuned from.
BASE_MODEL_ATTRIBUTE = "selfexplain_base_model"


DEFAULT_INCLUDE: tuple[str, ...] = ("vit.*", "explainer.*")
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: The safetensors header's name for each storage dtype.


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
    format_version: int = DENSE_FORMAT_VERSION
    library_name: str = "selfexplain"
    #: How the file's tensors were compressed (`VectorCompression.to_dict()`), or None for a dense file.
    compression: dict[str, Any] | None = None
    #: Which tokens the vector's explanation extension reads (`explanation_extension_input_layer` of the model it
    #: came from): None, the final normed sequence; k, the output of block k (0: the embeddings).
    extension_input_layer: int | None = None
    #: Where the extension's tokens go (`explanation_extension_route` of the model it came from): "classifier"
    #: (scored directly) or "backbone" (through the model's own blocks after `extension_input_layer` first).
    extension_route: str = "classifier"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("compression", "extension_input_layer"):  # absent: what older formats wrote
            if data[optional] is None:
                del data[optional]
        if data["extension_route"] == "classifier":  # absent: what formats < 5 mean
            del data["extension_route"]
        return data

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
            "compression": (dict, type(None)),
            "extension_input_layer": (int, type(None)),
            "extension_route": (str,),
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
        if kwargs.get("compression") is not None:
            if version < 2:
                raise InvalidExplanationVectorError(
                    f"{source}: `compression` needs format_version 2 (the config says {version})."
                )
            from_record = VectorCompression.from_dict(kwargs["compression"], source)
            kwargs["compression"] = from_record.to_dict()
        _check_architecture(kwargs["architecture"], source)
        layer = kwargs.get("extension_input_layer")
        if layer is not None:
            depth = kwargs["architecture"].get("num_hidden_layers")
            if version < INNER_EXTENSION_FORMAT_VERSION:
                raise InvalidExplanationVectorError(
                    f"{source}: `extension_input_layer` needs format_version {INNER_EXTENSION_FORMAT_VERSION} "
                    f"(the config says {version})."
                )
            if layer < 0 or (isinstance(depth, int) and layer > depth):
                raise InvalidExplanationVectorError(
                    f"{source}: `extension_input_layer` {layer} is not a block of a {depth}-block ViT."
                )
            if not extension_layers(kwargs["tensors"]):
                raise InvalidExplanationVectorError(
                    f"{source}: `extension_input_layer` is set but the vector carries no explanation extension."
                )
        route = kwargs.get("extension_route", "classifier")
        if route not in EXTENSION_ROUTES:
            raise InvalidExplanationVectorError(
                f"{source}: `extension_route` must be one of {EXTENSION_ROUTES}, got {route!r:.80}."
            )
        if route == "backbone":
            if version < ROUTED_EXTENSION_FORMAT_VERSION:
                raise InvalidExplanationVectorError(
                    f'{source}: `extension_route` "backbone" needs format_version '
                    f"{ROUTED_EXTENSION_FORMAT_VERSION} (the config says {version})."
                )
            depth = kwargs["architecture"].get("num_hidden_layers")
            if layer is None or (isinstance(depth, int) and layer >= depth):
                raise InvalidExplanationVectorError(
                    f'{source}: `extension_route` "backbone" needs an `extension_input_layer` below the last '
                    f"block (the blocks after it carry the tokens), got {layer!r}."
                )
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
            _check_tensor_encoding(key, spec, version, source)
            if key.startswith(EXTENSION_PREFIX) and version < EXTENSION_FORMAT_VERSION:
                raise InvalidExplanationVectorError(
                    f"{source}: tensor {key!r:.120} belongs to an explanation extension, which needs "
                    f"format_version {EXTENSION_FORMAT_VERSION} (the config says {version})."
                )
        return cls(**kwargs)

    @property
    def extension_layers(self) -> int:
        """Blocks of the explanation extension the vector carries (0: none), read from its tensor keys."""
        return extension_layers(self.tensors)


def extension_layers(keys: Iterable[str]) -> int:
    """Number of explanation-extension blocks that tensor keys `explainer.blocks.N.*` name (0 when none)."""
    indices = [int(match.group(1)) for key in keys if (match := EXTENSION_KEY.fullmatch(key))]
    return max(indices) + 1 if indices else 0


def format_version_for(
    keys: Iterable[str],
    compressed: bool,
    extension_input_layer: int | None = None,
    extension_route: str = "classifier",
) -> int:
    """The oldest format that holds a vector with these tensor keys (compressed or not)."""
    if extension_layers(keys):
        if extension_route != "classifier":
            return ROUTED_EXTENSION_FORMAT_VERSION
        return EXTENSION_FORMAT_VERSION if extension_input_layer is None else INNER_EXTENSION_FORMAT_VERSION
    return COMPRESSED_FORMAT_VERSION if compressed else DENSE_FORMAT_VERSION
