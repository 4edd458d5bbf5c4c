"""timm Vision Transformer checkpoints: load one as a self-explaining ViT, and save a ViT classifier as one.

timm publishes its ViTs on the Hub as a `config.json` of timm's own (`architecture`, `num_classes`,
`global_pool`, `label_names`, `pretrained_cfg`, sometimes `model_args`) next to `model.safetensors` with timm's
key names (`blocks.0.attn.qkv.weight`, ...). The plain ViT of timm is the same network as transformers' ViT, so
its weights are converted the way transformers' own `convert_vit_timm_to_pytorch.py` does (the fused `qkv`
projection split into query, key and value) and the logits are the same. timm itself is never imported, the
config is read as data (no repo code runs) and only safetensors weights are read.

```python
from selfexplain import apply_explanation_vector, load_timm_checkpoint, save_timm_checkpoint

model = load_timm_checkpoint("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")  # or a local folder
out = model(pixel_values)                       # timm's logits, plus out.explanation
explaining = apply_explanation_vector(model, "me/vit-b16-explanation-vector")
save_timm_checkpoint(explaining, "out")  # timm.create_model("local-dir:out", pretrained=True) loads it
```

Only the plain variant fits: a class token read by a linear head after the final norm, which the same head then
compares with every patch token. Variants that transformers' ViT cannot reproduce exactly are refused with an
`UnsupportedModelError` naming each feature, before anything is built: other pooling (`global_pool` "avg",
"map", ...), no class token, register tokens, layer scale (`init_values`), `fc_norm`, a pre-norm (`norm_pre`),
qk-norm, position embeddings without the class token (`no_embed_class`), a dynamic image size, and other
architectures. A checkpoint without a classification head (`num_classes` 0) is a `MissingClassifierError`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

from .cards import IMAGE_PROCESSOR_ATTRIBUTE
from .errors import MissingClassifierError, NotAModelError, UnsupportedModelError
from .hub import could_be_repo_id
from .modeling_self_explaining_vit import ViTForSelfExplainingClassification
from .vectors.checkpoint_keys import serialized_names, serialized_state_dict
from .vectors.config import BASE_MODEL_ATTRIBUTE
from .vectors.io import write_files_atomically

TIMM_CONFIG_NAME = "config.json"
TIMM_WEIGHTS_NAME = "model.safetensors"
#: The explanation extension (`explainer.*`) of a saved self-explaining model: timm has no counterpart.
EXPLAINER_WEIGHTS_NAME = "selfexplain_explainer.safetensors"
#: The model config attribute that records where a model loaded from a timm checkpoint came from.
TIMM_SOURCE_ATTRIBUTE = "selfexplain_timm_source"
#: timm's ViT norms: `partial(nn.LayerNorm, eps=1e-6)` (transformers' ViT default is 1e-12).
TIMM_LAYER_NORM_EPS = 1e-6

#: The plain ViTs of timm 1.0.31 (class token, token pooling, no layer scale, ...): their width and number of
#: attention heads. Neither the weights nor a Hub `config.json` without `model_args` record the heads (the
#: architecture's entry point sets them), so they come from here, for these exact names only
#: (`vit_base_patch16_gap_224`, for example, has 16 heads, not the 12 of the other bases), and only when the
#: weights have the standard width (a checkpoint built with other arguments may have other heads too).
TIMM_VIT_WIDTH_AND_HEADS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("vit_tiny_patch16_224", "vit_tiny_patch16_384", "deit_tiny_patch16_224"), (192, 3)),
    **dict.fromkeys(
        (
            "vit_small_patch8_224",
            "vit_small_patch16_224",
            "vit_small_patch16_384",
            "vit_small_patch32_224",
            "vit_small_patch32_384",
            "deit_small_patch16_224",
        ),
        (384, 6),
    ),
    **dict.fromkeys(
        (
            "vit_base_patch8_224",
            "vit_base_patch16_224",
            "vit_base_patch16_224_miil",
            "vit_base_patch16_384",
            "vit_base_patch32_224",
            "vit_base_patch32_384",
            "deit_base_patch16_224",
            "deit_base_patch16_384",
        ),
        (768, 12),
    ),
    **dict.fromkeys(
        (
            "vit_large_patch14_224",
            "vit_large_patch16_224",
            "vit_large_patch16_384",
            "vit_large_patch32_224",
            "vit_large_patch32_384",
        ),
        (1024, 16),
    ),
    "vit_huge_patch14_224": (1280, 16),
    "vit_giant_patch14_224": (1408, 16),
    "vit_gigantic_patch14_224": (1664, 16),
}

#: Architecture-name prefixes of timm's ViT family (vision_transformer.py, deit.py, eva.py share them).
_VIT_FAMILY_PREFIXES = ("vit_", "deit_", "deit3_", "flexivit_")

# Key names: timm on the left, transformers' ViT (under `vit.` / `classifier.`) on the right.
_TOP_LEVEL_RENAMES = (
    ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "vit.layernorm.weight"),
    ("norm.bias", "vit.layernorm.bias"),
    ("head.weight", "classifier.weight"),
    ("head.bias", "classifier.bias"),
)
_BLOCK_RENAMES = (
    ("norm1", "layernorm_before"),
    ("attn.proj", "attention.output.dense"),
    ("norm2", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)
_QKV = ("query", "key", "value")  # the order of the rows of timm's fused `attn.qkv`

# Why each variant cannot be a ViTForSelfExplainingClassification. The model is transformers' ViT: its logits are
# the classifier applied to the class token after the final norm, and its explanation is the same classifier
# applied to each patch token. A variant must give timm's logits exactly and keep that token layout.
_UNSUPPORTED: dict[str, str] = {
    "global_pool": (
        "pooling {value} (`global_pool`): the logits must be the classifier applied to the class token alone, "
        "the token the patch scores are compared with; transformers' ViT has no other pooling"
    ),
    "class_token": "no class token (`class_token=False`): transformers' ViT classifies its class token",
    "reg_tokens": (
        "register tokens (`reg_tokens`, key `reg_token`): transformers' ViT has none, and they are not patches "
        "of the explanation grid"
    ),
    "init_values": (
        "layer scale (`init_values`, keys `ls1.gamma`/`ls2.gamma`): transformers' ViT blocks have no per-channel "
        "residual scale"
    ),
    "fc_norm": (
        "a norm after pooling (`fc_norm`): the classifier would read the class token through a norm that the "
        "patch tokens it explains never pass"
    ),
    "pre_norm": "a norm after the embeddings (`pre_norm`, key `norm_pre`, CLIP-style): transformers' ViT has none",
    "qk_norm": "normalised queries and keys (`qk_norm`, keys `attn.q_norm`/`attn.k_norm`): transformers' ViT has none",
    "no_embed_class": (
        "position embeddings for the patches only (`no_embed_class`): transformers' ViT adds one to the class "
        "token too"
    ),
    "dynamic_img_size": (
        "a dynamic image size (`dynamic_img_size`/`dynamic_img_pad`, or `fixed_input_size: false`): "
        "transformers' ViT has a fixed input size and resizes its position embeddings differently"
    ),
    "pos_embed": "no learned position embedding (`pos_embed` other than 'learn')",
    "final_norm": "no final norm (`final_norm=False`): transformers' ViT normalises the last hidden states",
    "attn_pool": "attention pooling (`global_pool='map'`, keys `attn_pool.*`)",
    "distilled": "a distillation token and head (DeiT distilled: `dist_token`, `head_dist`)",
    "hybrid": "a convolutional stem (hybrid ViT: `patch_embed.backbone.*`)",
    "inner_norms": "norms inside attention or MLP (`scale_attn_norm`/`scale_mlp_norm`)",
    "embed_norm": "a norm on the patch embeddings (`embed_norm_layer`, key `patch_embed.norm`)",
    "proj_bias": "projections without bias (`proj_bias=False`): transformers' ViT projections have one",
    "layers": "{value}: transformers' ViT cannot hold these layers (a custom block, norm or activation)",
    "rope": (
        "rotary position embeddings (a `_rope` architecture, timm's Eva): they have no weights to check, and "
        "transformers' ViT has learned absolute position embeddings only"
    ),
}
# Keys that name an unsupported feature.
_FEATURE_KEYS = (
    ("reg_tokens", re.compile(r"^reg_token$")),
    ("init_values", re.compile(r"\.(ls[12]\.gamma|gamma_[12])$")),
    ("fc_norm", re.compile(r"^fc_norm\.")),
    ("pre_norm", re.compile(r"^norm_pre\.")),
    ("qk_norm", re.compile(r"\.attn\.[qk]_norm\.")),
    ("attn_pool", re.compile(r"^attn_pool\.")),
    ("distilled", re.compile(r"^(dist_token$|head_dist\.)")),
    ("hybrid", re.compile(r"^patch_embed\.backbone\.")),
    ("inner_norms", re.compile(r"\.(attn|mlp)\.norm\.")),
    ("embed_norm", re.compile(r"^patch_embed\.norm\.")),
)
# Keys whose absence names an unsupported feature (the head is a `MissingClassifierError` instead).
_FEATURE_OF_MISSING_KEY = {"cls_token": "class_token", "pos_embed": "pos_embed", "norm.weight": "final_norm"}
# `model_args` (timm's constructor arguments) and the values a plain ViT has; any other value is refused.
_PLAIN_MODEL_ARGS: dict[str, tuple[Any, ...]] = {
    "global_pool": ("token",),
    "class_token": (True,),
    "reg_tokens": (0, None),
    "init_values": (None, 0, 0.0),
    "fc_norm": (None, False),
    "pre_norm": (False,),
    "qk_norm": (False,),
    "no_embed_class": (False,),
    "dynamic_img_size": (False,),
    "dynamic_img_pad": (False,),
    "pos_embed": ("learn",),
    "final_norm": (True,),
    "proj_bias": (True,),
    "scale_attn_norm": (False,),
    "scale_mlp_norm": (False,),
    "act_layer": (None, "gelu"),
    "norm_layer": (None,),
    "embed_norm_layer": (None,),
}
# `model_args` named after another feature of _UNSUPPORTED than their own name.
_FEATURE_OF_MODEL_ARG = {
    "dynamic_img_pad": "dynamic_img_size",
    "scale_attn_norm": "inner_norms",
    "scale_mlp_norm": "inner_norms",
    "embed_norm_layer": "embed_norm",
    "act_layer": "layers",
    "norm_layer": "layers",
}
# `model_args` that do not change the network at inference (shapes are read from the weights).
_FREE_MODEL_ARGS = frozenset(
    {
        "img_size",
        "patch_size",
        "in_chans",
        "num_classes",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "pool_include_prefix",  # only used by the pooling kinds refused above
        "drop_rate",
        "pos_drop_rate",
        "patch_drop_rate",
        "proj_drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
        "weight_init",
        "fix_init",
    }
)
# `pretrained_cfg` entries that point at the source weights: a saved copy must not send timm back to them.
_SOURCE_POINTERS = (
    "url",
    "file",
    "hf_hub_id",
    "hf_hub_filename",
    "source",
    "state_dict",
    "tag",
    "label_offset",
)


@dataclass(frozen=True)
class TimmViTShape:
    """The architecture of a plain timm ViT, as read from its weights (and its config for the heads)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    num_channels: int
    qkv_bias: bool
    num_labels: int


def is_timm_config(config_dict: Mapping[str, Any]) -> bool:
    """Whether a `config.json` (read as a dict) is timm's: it names an `architecture` and no `model_type`.

    Example:
        ```python
        >>> is_timm_config({"architecture": "vit_base_patch16_224", "num_classes": 1000})
        True
        >>> is_timm_config({"model_type": "vit", "architectures": ["ViTForImageClassification"]})
        False
        ```
    """
    return (
        isinstance(config_dict, Mapping) and "architecture" in config_dict and "model_type" not in config_dict
    )


def load_timm_checkpoint(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    dtype: torch.dtype | str | None = None,
) -> ViTForSelfExplainingClassification:
    """Load a timm ViT classifier (a Hub repo id or a local folder) as a `ViTForSelfExplainingClassification`.

    The timm `config.json` is read as data and checked first; then `model.safetensors` (never a pickled
    `pytorch_model.bin`) is downloaded, its key names checked from its header, and its tensors converted to
    transformers' ViT names. The model gives timm's logits (same weights, same network; `layer_norm_eps=1e-6`
    as timm) and explains them; `id2label` comes from timm's `label_names` (else `LABEL_i`). The config records
    the source in `selfexplain_timm_source` (`architecture`, `source`, `revision`, `pretrained_cfg`, ...), which
    `save_timm_checkpoint` uses to write timm's preprocessing back. No image processor is attached: timm's
    preprocessing (`input_size`, `crop_pct`, `mean`, `std`) is in that record's `pretrained_cfg`.

    The number of attention heads is not in timm's weights: it comes from `model_args.num_heads` when the config
    has it, else from the architecture name (`TIMM_VIT_WIDTH_AND_HEADS`), else the checkpoint is refused.

    Args:
        source: a Hub repo id (downloaded with `huggingface_hub.hf_hub_download`) or a local folder.
        revision / token / cache_dir / local_files_only: Hub options, as for `from_pretrained`.
        dtype: the model's dtype (`torch.float32`, `"bfloat16"`, ...); `None` or `"auto"` keeps the dtype the
            weights were saved in.

    Raises:
        UnsupportedModelError: a timm variant transformers' ViT cannot reproduce (see the module docstring), or
            a config that is not timm's; the message names every unsupported feature.
        MissingClassifierError: a checkpoint without a classification head (`num_classes` 0).
        NotAModelError: a folder without `config.json`, or a file.
        OSError: no `model.safetensors` (a repo with only pickled weights is refused: loading a pickle can run
            code), or a Hub error.

    Example:
        ```python
        >>> model = load_timm_checkpoint("timm/vit_small_patch16_224.augreg_in21k_ft_in1k")
        >>> out = model(pixel_values)      # the logits timm gives, plus out.explanation (patch grid)
        >>> model.config.selfexplain_timm_source["architecture"]
        'vit_small_patch16_224'
        ```
    """
    source = os.fspath(source)
    hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    config_dict = read_timm_config(source, hub)
    architecture = _architecture_name(config_dict)
    # What the config alone refuses is refused before the weights are downloaded.
    _raise_if_unsupported(source, architecture, _config_problems(config_dict, architecture))
    weights_file = _find_file(source, TIMM_WEIGHTS_NAME, hub)
    if weights_file is None:
        raise OSError(_no_safetensors_message(source))
    shape = check_timm_checkpoint(config_dict, _weight_shapes(weights_file), source=source)

    config = _vit_config(shape, config_dict)
    setattr(config, TIMM_SOURCE_ATTRIBUTE, _source_record(source, revision, architecture, config_dict))
    config._name_or_path = source
    state = timm_to_vit_state_dict(load_file(weights_file), shape.num_hidden_layers)
    extension = _explainer_state(source, config_dict, hub)
    if extension:
        config.explanation_head = "extension"
        config.explanation_extension_layers = _extension_layers(source, extension)
        layer = config_dict["selfexplain"].get("explanation_extension_input_layer")
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise ValueError(
                f"{source}: `explanation_extension_input_layer` must be an int, got {layer!r:.40}."
            )
        config.explanation_extension_input_layer = layer  # the model checks it is a block of this ViT
        state.update(extension)
    for name, value in dict(config_dict.get("selfexplain", {}).get("config", {})).items():
        if name in (BASE_MODEL_ATTRIBUTE, "selfexplain_applied_vector"):  # provenance written by a save
            setattr(config, name, value)
    return _build_model(config, state, _resolve_dtype(dtype))


def check_timm_checkpoint(
    config_dict: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], *, source: str = "This checkpoint"
) -> TimmViTShape:
    """Whether `load_timm_checkpoint` accepts a timm checkpoint, from its config and its tensors' names and shapes.

    A safetensors header is enough (no tensor is read): `load_timm_checkpoint` calls this before it reads the
    weights. Returns the architecture, or raises the error `load_timm_checkpoint` would raise.

    Example:
        ```python
        >>> from safetensors import safe_open
        >>> with safe_open("folder/model.safetensors", "pt") as f:
        ...     shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
        >>> check_timm_checkpoint(json.load(open("folder/config.json")), shapes).num_attention_heads
        12
        ```
    """
    shapes = {name: tuple(int(n) for n in shape) for name, shape in shapes.items()}
    architecture = _architecture_name(config_dict)
    _raise_if_unsupported(source, architecture, _config_problems(config_dict, architecture))
    _raise_if_unsupported(source, architecture, _key_problems(shapes))
    _require_head(source, config_dict, shapes)
    return _shape_from_weights(source, architecture, config_dict, shapes)


def save_timm_checkpoint(
    model: ViTForSelfExplainingClassification | ViTForImageClassification, folder: str | os.PathLike
) -> Path:
    """Save a ViT classifier as a timm checkpoint: `model.safetensors` with timm's key names, timm's `config.json`.

    The inverse of `load_timm_checkpoint`, for the classifier (`vit.*` and `classifier.*`): timm loads it and gives
    the same logits, with `timm.create_model("local-dir:FOLDER", pretrained=True)` (or `"hf-hub:ORG/NAME"` once
    the folder is pushed; `pretrained=True` is what loads the weights). The config holds `architecture`, `num_classes`, `num_features`, `global_pool: "token"`, `label_names` (from
    `id2label`), `model_args` (every shape, so any size builds) and `pretrained_cfg` (timm's preprocessing:
    `input_size`, `mean`, `std`, ... copied from the source timm config when the model came from one, else from
    the image processor saved with the model, else ViT's 0.5 / 0.5).

    timm has no counterpart of the explanation: with the shared head (the default) nothing is lost, since the
    explanation is the classifier applied to the patch tokens, which any timm user can compute from
    `forward_features`. An explanation extension (`explainer.*`) is written to `selfexplain_explainer.safetensors`
    next to the weights (timm ignores it; `load_timm_checkpoint` restores it), so a self-explaining model survives
    the round trip. A model with `layer_norm_eps` other than timm's 1e-6 (transformers' default is 1e-12) is
    saved with a warning: timm uses 1e-6, so its logits differ slightly.

    Returns:
        The folder.

    Raises:
        UnsupportedModelError: not a ViT classifier timm's plain ViT can hold (another activation, extra keys).
        MissingClassifierError: the model has no classifier.

    Example:
        ```python
        >>> explaining = apply_explanation_vector(load_timm_checkpoint("timm/vit_base_patch16_224"), vector)
        >>> save_timm_checkpoint(explaining, "vit-explaining-timm")
        >>> # timm: timm.create_model("local-dir:vit-explaining-timm", pretrained=True): same logits
        ```
    """
    config = model.config
    _require_exportable(model)
    if config.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        warnings.warn(
            f"This model's layer_norm_eps is {config.layer_norm_eps}; timm's ViT uses {TIMM_LAYER_NORM_EPS}, so "
            "the logits timm computes from the saved checkpoint differ slightly from this model's.",
            UserWarning,
            stacklevel=2,
        )
    # The names `save_pretrained` writes (transformers 5 renames some modules in memory): the conversion's keys.
    state = {name: tensor.detach().cpu() for name, tensor in serialized_state_dict(model).items()}
    explainer = {name: state.pop(name).contiguous() for name in list(state) if name.startswith("explainer.")}
    tensors = vit_to_timm_state_dict(state, int(config.num_hidden_layers))
    timm_config = _timm_config(model, bool(explainer))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writers = {TIMM_WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"})}
    if explainer:
        writers[EXPLAINER_WEIGHTS_NAME] = lambda path: save_file(explainer, path, metadata={"format": "pt"})
    writers[TIMM_CONFIG_NAME] = lambda path: path.write_text(json.dumps(timm_config, indent=2) + "\n")
    write_files_atomically(folder, writers)
    if not explainer:  # one left by an earlier save would not match these weights
        (folder / EXPLAINER_WEIGHTS_NAME).unlink(missing_ok=True)
    return folder


# ------------------------------------------------------------------------------------------- key names


def timm_to_vit_state_dict(tensors: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """timm ViT tensors under transformers' ViT names (`vit.*`, `classifier.*`), the fused `qkv` split in three.

    As transformers' `convert_vit_timm_to_pytorch.py`: the rows of `attn.qkv` are query, key, value in that order.
    Every tensor is a copy of its own (safetensors refuses to save tensors that share memory).
    """
    state = {vit: tensors[timm].clone() for timm, vit in _TOP_LEVEL_RENAMES}
    for i in range(num_layers):
        block, layer = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for timm_name, vit_name in _BLOCK_RENAMES:
            for kind in ("weight", "bias"):
                state[f"{layer}{vit_name}.{kind}"] = tensors[f"{block}{timm_name}.{kind}"].clone()
        for kind in ("weight", "bias"):
            fused = tensors.get(f"{block}attn.qkv.{kind}")
            if fused is None:  # qkv_bias=False: no bias
                continue
            for name, part in zip(_QKV, fused.chunk(3, dim=0), strict=True):
                state[f"{layer}attention.attention.{name}.{kind}"] = part.clone()
    return state


def vit_to_timm_state_dict(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `timm_to_vit_state_dict`: transformers' ViT classifier tensors under timm's names.

    Raises `UnsupportedModelError` when `state` holds keys a plain timm ViT has no place for.
    """
    remaining = dict(state)
    tensors = {timm: remaining.pop(vit) for timm, vit in _TOP_LEVEL_RENAMES}
    for i in range(num_layers):
        block, layer = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for timm_name, vit_name in _BLOCK_RENAMES:
            for kind in ("weight", "bias"):
                tensors[f"{block}{timm_name}.{kind}"] = remaining.pop(f"{layer}{vit_name}.{kind}")
        for kind in ("weight", "bias"):
            parts = [remaining.pop(f"{layer}attention.attention.{name}.{kind}", None) for name in _QKV]
            if any(part is None for part in parts):
                if kind == "bias" and all(part is None for part in parts):  # qkv_bias=False
                    continue
                raise UnsupportedModelError(f"Layer {i} lacks some of its query/key/value {kind}s.")
            tensors[f"{block}attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    if remaining:
        raise UnsupportedModelError(
            f"These weights have no place in a timm ViT: {sorted(remaining)[:5]}; nothing was saved."
        )
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def _expected_keys(num_layers: int, qkv_bias: bool) -> set[str]:
    keys = {timm for timm, _ in _TOP_LEVEL_RENAMES}
    for i in range(num_layers):
        keys.update(f"blocks.{i}.{name}.{kind}" for name, _ in _BLOCK_RENAMES for kind in ("weight", "bias"))
        keys.add(f"blocks.{i}.attn.qkv.weight")
        if qkv_bias:
            keys.add(f"blocks.{i}.attn.qkv.bias")
    return keys


# ----------------------------------------------------------------------------------------------- reading


def read_timm_config(source: str, hub: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `config.json` of a folder or Hub repo, as data (nothing from the repo is imported or run).

    Raises `NotAModelError` when there is none, and `UnsupportedModelError` when it is not timm's.
    """
    path = _find_file(source, TIMM_CONFIG_NAME, hub or {})
    if path is None:
        raise NotAModelError(f"{source} has no {TIMM_CONFIG_NAME}: it is not a timm model.")
    with open(path, encoding="utf-8") as file:
        config_dict = json.load(file)
    if not is_timm_config(config_dict):
        model_type = config_dict.get("model_type") if isinstance(config_dict, dict) else None
        hint = (
            f" It is a transformers config (model_type {model_type!r}): load it with "
            "ViTForSelfExplainingClassification.from_pretrained."
            if model_type
            else ""
        )
        raise UnsupportedModelError(
            f"{source}/{TIMM_CONFIG_NAME} is not a timm config (no `architecture`).{hint}"
        )
    return config_dict


def _find_file(source: str, filename: str, hub: Mapping[str, Any]) -> str | None:
    """The path of `filename` in a local folder or Hub repo (downloaded), or None when the repo has none."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.isfile(path) else None
    if os.path.exists(source):
        raise NotAModelError(f"{source} is a file; pass the folder that holds the timm {TIMM_CONFIG_NAME}.")
    if not could_be_repo_id(source):
        raise FileNotFoundError(f"{source}: no such folder.")
    try:
        return hf_hub_download(source, filename, **{k: v for k, v in hub.items() if v is not None})
    except RemoteEntryNotFoundError:
        return None


def _no_safetensors_message(source: str) -> str:
    pickles = []
    if os.path.isdir(source):
        pickles = sorted(
            n for n in os.listdir(source) if n.endswith((".bin", ".pth", ".pt", ".pth.tar", ".ckpt"))
        )
    found = f" (it has {', '.join(pickles)})" if pickles else ""
    return (
        f"{source} has no {TIMM_WEIGHTS_NAME}{found}: selfexplain reads timm checkpoints from safetensors only, "
        "because loading a pickled checkpoint (pytorch_model.bin, *.pth) can run code. Use a repo that has "
        f"{TIMM_WEIGHTS_NAME}, or convert one you trust: with timm, "
        "`timm.models.save_for_hf(model, folder, safe_serialization=True)`."
    )


def _weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors header alone (no tensor is read)."""
    with safe_open(path, framework="pt") as file:
        return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}


def _explainer_state(source: str, config_dict: Mapping[str, Any], hub: Mapping[str, Any]) -> dict[str, Any]:
    """The explanation extension a save wrote next to the weights, when its config says there is one."""
    if not config_dict.get("selfexplain", {}).get("explanation_extension_layers"):
        return {}
    path = _find_file(source, EXPLAINER_WEIGHTS_NAME, hub)
    if path is None:
        raise OSError(
            f"{source}/{TIMM_CONFIG_NAME} records an explanation extension, but {EXPLAINER_WEIGHTS_NAME} is missing."
        )
    state = load_file(path)
    if not state or any(not name.startswith("explainer.") for name in state):
        raise UnsupportedModelError(
            f"{source}/{EXPLAINER_WEIGHTS_NAME} holds tensors other than `explainer.*`."
        )
    return state


def _extension_layers(source: str, extension: Mapping[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for name in extension if (m := re.match(r"explainer\.blocks\.(\d+)\.", name))}
    if not indices or indices != set(range(len(indices))):
        raise UnsupportedModelError(f"{source}/{EXPLAINER_WEIGHTS_NAME}: its blocks are not numbered 0..n-1.")
    return len(indices)


# ------------------------------------------------------------------------------------------------ checks


def _architecture_name(config_dict: Mapping[str, Any]) -> str:
    # A pretrained tag (`vit_base_patch16_224.augreg_in1k`) names weights, not a network.
    return str(config_dict.get("architecture", "")).split(".", 1)[0]


def _pretrained_cfg(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    # Old timm configs are one flat dict; newer ones nest the preprocessing under `pretrained_cfg` (as timm reads).
    nested = config_dict.get("pretrained_cfg")
    return dict(nested) if isinstance(nested, Mapping) else dict(config_dict)


def _model_args(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    args = config_dict.get("model_args")
    return dict(args) if isinstance(args, Mapping) else {}


def _config_problems(config_dict: Mapping[str, Any], architecture: str) -> dict[str, str]:
    """Unsupported features that the config alone shows (checked before any weights are downloaded)."""
    problems: dict[str, str] = {}
    if not architecture.startswith(_VIT_FAMILY_PREFIXES):
        problems["architecture"] = (
            f"architecture {architecture!r} is not a timm Vision Transformer (vit_*, deit_*): selfexplain "
            "explains ViT classifiers"
        )
        return problems  # the rest would describe another network's arguments
    if "rope" in architecture.split("_"):
        problems["rope"] = _UNSUPPORTED["rope"]
    model_args = _model_args(config_dict)
    pool = config_dict.get("global_pool", model_args.get("global_pool", "token"))
    if pool != "token":
        problems["global_pool"] = _UNSUPPORTED["global_pool"].format(value=repr(pool))
    for name, value in model_args.items():
        if name in _FREE_MODEL_ARGS or (name in _PLAIN_MODEL_ARGS and value in _PLAIN_MODEL_ARGS[name]):
            continue
        if name == "global_pool":
            continue  # said above
        feature = _FEATURE_OF_MODEL_ARG.get(name, name)
        if feature in _UNSUPPORTED:
            problems.setdefault(feature, _UNSUPPORTED[feature].format(value=f"{name}={value!r}"))
        else:
            problems[f"model_args.{name}"] = (
                f"model argument {name}={value!r}, which this converter does not know"
            )
    if _pretrained_cfg(config_dict).get("fixed_input_size") is False:
        problems.setdefault("dynamic_img_size", _UNSUPPORTED["dynamic_img_size"])
    return problems


def _key_problems(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Unsupported features that the key names show: extra keys of known variants, missing plain-ViT keys."""
    problems: dict[str, str] = {}
    names = set(shapes)
    depth = _depth(names)
    known = _expected_keys(depth, qkv_bias="blocks.0.attn.qkv.bias" in names) | {"head.weight", "head.bias"}
    unexplained = []
    for name in sorted(names - known):
        feature = next((f for f, pattern in _FEATURE_KEYS if pattern.search(name)), None)
        if feature is None:
            unexplained.append(name)
        else:
            problems.setdefault(feature, _UNSUPPORTED[feature])
    for name, feature in _FEATURE_OF_MISSING_KEY.items():
        if name not in names:
            problems.setdefault(feature, _UNSUPPORTED[feature])
    if "blocks.0.attn.proj.weight" in names and "blocks.0.attn.proj.bias" not in names:
        problems["proj_bias"] = _UNSUPPORTED["proj_bias"]
    missing = sorted(known - names - set(_FEATURE_OF_MISSING_KEY) - {"head.weight", "head.bias"})
    if depth == 0:
        problems["blocks"] = "no transformer blocks (`blocks.0.*`): not a timm ViT"
    if unexplained:
        problems["unexpected_keys"] = (
            f"{len(unexplained)} key(s) a plain ViT does not have, e.g. {unexplained[:4]} (another block or "
            "layer type)"
        )
    if missing and depth:
        problems["missing_keys"] = f"{len(missing)} key(s) of a plain ViT missing, e.g. {missing[:4]}"
    return problems


def _depth(names: set[str]) -> int:
    indices = {int(m.group(1)) for name in names if (m := re.match(r"blocks\.(\d+)\.", name))}
    return max(indices) + 1 if indices else 0


def _raise_if_unsupported(source: str, architecture: str, problems: Mapping[str, str]) -> None:
    if not problems:
        return
    raise UnsupportedModelError(
        f"{source} is a timm {architecture or 'model'} checkpoint that selfexplain cannot load as a self-explaining "
        "ViT (transformers' ViT, whose classifier reads the class token after the final norm and explains by "
        "scoring each patch token the same way); nothing was loaded:\n  - "
        + "\n  - ".join(problems.values())
        + "\nUse a plain timm ViT (class token, `global_pool='token'`), such as "
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k or timm/deit_small_patch16_224.fb_in1k."
    )


def _require_head(source: str, config_dict: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    num_classes = config_dict.get("num_classes", _pretrained_cfg(config_dict).get("num_classes"))
    if num_classes == 0 or "head.weight" not in shapes or "head.bias" not in shapes:
        raise MissingClassifierError(
            f"{source} is a timm ViT without a classification head (num_classes={num_classes}, no `head.*` "
            "weights): a backbone. A vector patches a classifier and keeps its head and labels, so fine-tune a "
            "classifier from it first (with timm: `timm.create_model(..., pretrained=True, num_classes=N)` and "
            "your training), then load that."
        )
    rows = shapes["head.weight"][0]
    if num_classes is not None and num_classes != rows:
        raise UnsupportedModelError(
            f"{source}: config.json says num_classes={num_classes}, but the head has {rows} rows; the checkpoint "
            "is inconsistent, nothing was loaded."
        )


def _shape_from_weights(
    source: str, architecture: str, config_dict: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> TimmViTShape:
    """The architecture from the tensors' shapes (and the heads from the config or name), every shape checked."""
    hidden, channels, *patch = shapes["patch_embed.proj.weight"]
    depth = _depth(set(shapes))
    mlp = shapes["blocks.0.mlp.fc1.weight"][0]
    # The image size first: a position embedding without the class token's slot is a variant, refused as such.
    image_size = _image_size(source, architecture, config_dict, shapes["pos_embed"][1], (patch[0], patch[1]))
    heads = _num_heads(source, architecture, config_dict, hidden)
    shape = TimmViTShape(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        patch_size=(patch[0], patch[1]),
        image_size=image_size,
        num_channels=channels,
        qkv_bias="blocks.0.attn.qkv.bias" in shapes,
        num_labels=shapes["head.weight"][0],
    )
    wrong = [
        f"{name}: {shapes[name]}, expected {want}"
        for name, want in _expected_shapes(shape).items()
        if tuple(shapes[name]) != want
    ]
    if wrong:
        raise UnsupportedModelError(
            f"{source}: {len(wrong)} tensor(s) of unexpected shape for a plain ViT, e.g. {wrong[:3]}; nothing was "
            "loaded."
        )
    return shape


def _num_heads(source: str, architecture: str, config_dict: Mapping[str, Any], hidden: int) -> int:
    heads = _model_args(config_dict).get("num_heads")
    if heads is None:
        width, heads = TIMM_VIT_WIDTH_AND_HEADS.get(architecture, (None, None))
        if heads is None or width != hidden:
            known = (
                f"{architecture!r} has width {width} in timm, these weights {hidden}: built with other arguments"
                if heads is not None
                else f"{architecture!r} is not one of the {len(TIMM_VIT_WIDTH_AND_HEADS)} timm ViTs whose head "
                "count selfexplain knows (`selfexplain.timm_checkpoints.TIMM_VIT_WIDTH_AND_HEADS`)"
            )
            raise UnsupportedModelError(
                f"{source}: timm's weights do not record the number of attention heads, its config.json has no "
                f"`model_args.num_heads`, and {known}. Save it again with timm, naming the heads: "
                "`save_for_hf(model, folder, model_args={'num_heads': ...}, safe_serialization=True)`."
            )
    if not isinstance(heads, int) or heads < 1 or hidden % heads:
        raise UnsupportedModelError(f"{source}: {heads!r} attention heads do not divide the width {hidden}.")
    return heads


def _image_size(
    source: str, architecture: str, config_dict: Mapping[str, Any], tokens: int, patch: tuple[int, int]
) -> tuple[int, int]:
    """The input size whose patch grid, plus the class token, has as many tokens as the position embedding.

    The config's size (`model_args.img_size`, `pretrained_cfg.input_size`) is preferred when it fits, since a
    grid need not be square; otherwise a square grid. A position embedding the size of the grid itself (no slot
    for the class token) is `no_embed_class`.
    """
    grids = []
    for size in _configured_sizes(config_dict):
        if size[0] % patch[0] == 0 and size[1] % patch[1] == 0:
            grids.append((size, (size[0] // patch[0]) * (size[1] // patch[1])))
    for size, cells in grids:
        if cells + 1 == tokens:
            return size
    side = math.isqrt(tokens - 1)
    if side * side == tokens - 1 and not any(cells == tokens for _, cells in grids):
        return side * patch[0], side * patch[1]
    if any(cells == tokens for _, cells in grids) or math.isqrt(tokens) ** 2 == tokens:
        _raise_if_unsupported(source, architecture, {"no_embed_class": _UNSUPPORTED["no_embed_class"]})
    raise UnsupportedModelError(
        f"{source}: a position embedding of {tokens} tokens fits no input size with {patch} patches and a class "
        "token; nothing was loaded."
    )


def _configured_sizes(config_dict: Mapping[str, Any]) -> list[tuple[int, int]]:
    sizes = []
    img_size = _model_args(config_dict).get("img_size")
    if isinstance(img_size, int):
        sizes.append((img_size, img_size))
    elif isinstance(img_size, (list, tuple)) and len(img_size) == 2:
        sizes.append((int(img_size[0]), int(img_size[1])))
    input_size = _pretrained_cfg(config_dict).get("input_size")
    if isinstance(input_size, (list, tuple)) and len(input_size) == 3:
        sizes.append((int(input_size[1]), int(input_size[2])))
    return sizes


def _expected_shapes(shape: TimmViTShape) -> dict[str, tuple[int, ...]]:
    d, mlp = shape.hidden_size, shape.intermediate_size
    grid = (shape.image_size[0] // shape.patch_size[0]) * (shape.image_size[1] // shape.patch_size[1])
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, grid + 1, d),
        "patch_embed.proj.weight": (d, shape.num_channels, *shape.patch_size),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "head.weight": (shape.num_labels, d),
        "head.bias": (shape.num_labels,),
    }
    for i in range(shape.num_hidden_layers):
        b = f"blocks.{i}."
        shapes.update(
            {
                f"{b}norm1.weight": (d,),
                f"{b}norm1.bias": (d,),
                f"{b}attn.qkv.weight": (3 * d, d),
                f"{b}attn.proj.weight": (d, d),
                f"{b}attn.proj.bias": (d,),
                f"{b}norm2.weight": (d,),
                f"{b}norm2.bias": (d,),
                f"{b}mlp.fc1.weight": (mlp, d),
                f"{b}mlp.fc1.bias": (mlp,),
                f"{b}mlp.fc2.weight": (d, mlp),
                f"{b}mlp.fc2.bias": (d,),
            }
        )
        if shape.qkv_bias:
            shapes[f"{b}attn.qkv.bias"] = (3 * d,)
    return shapes


# ---------------------------------------------------------------------------------------------- building


def _vit_config(shape: TimmViTShape, config_dict: Mapping[str, Any]) -> ViTConfig:
    id2label = _id2label(config_dict, shape.num_labels)
    return ViTConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        hidden_act="gelu",  # timm's nn.GELU: the exact (erf) form, as transformers' "gelu"
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=TIMM_LAYER_NORM_EPS,
        image_size=_int_if_square(shape.image_size),
        patch_size=_int_if_square(shape.patch_size),
        num_channels=shape.num_channels,
        qkv_bias=shape.qkv_bias,
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
        architectures=[ViTForSelfExplainingClassification.__name__],
    )


def _id2label(config_dict: Mapping[str, Any], num_labels: int) -> dict[int, str]:
    """timm's `label_names` (a list, or a dict of index to name) as `id2label`; `LABEL_i` where it has none."""
    names = config_dict.get("label_names", _pretrained_cfg(config_dict).get("label_names"))
    if isinstance(names, Mapping):
        named = {int(index): str(name) for index, name in names.items()}
    elif isinstance(names, (list, tuple)) and len(names) == num_labels:
        named = {index: str(name) for index, name in enumerate(names)}
    else:  # none, or a list for another head: the indices say nothing about those names
        named = {}
    return {index: named.get(index, f"LABEL_{index}") for index in range(num_labels)}


def _int_if_square(size: tuple[int, int]) -> int | list[int]:
    return size[0] if size[0] == size[1] else [size[0], size[1]]


def _source_record(
    source: str, revision: str | None, architecture: str, config_dict: Mapping[str, Any]
) -> dict[str, Any]:
    record = {
        "architecture": architecture,
        "source": source,
        "revision": revision,
        "pretrained_cfg": _pretrained_cfg(config_dict),
    }
    if config_dict.get("model_args"):
        record["model_args"] = _model_args(config_dict)
    return record


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(
                f"Unknown dtype {dtype!r}; pass a torch.dtype, a name such as 'float16', or 'auto'."
            )
        return resolved
    return dtype


def _build_model(
    config: ViTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> ViTForSelfExplainingClassification:
    """The model holding exactly `state`, keyed by checkpoint names (every key; built on the meta device, so no
    memory goes to weights that are replaced right away)."""
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    with torch.device("meta"):
        model = ViTForSelfExplainingClassification(config)
    # Checkpoint names (`...attention.attention.query.weight`) to the names of this transformers in memory.
    in_memory = serialized_names(model)
    model.load_state_dict(
        {in_memory[name]: tensor for name, tensor in state.items()}, strict=True, assign=True
    )
    tensors = [*model.named_parameters(), *model.named_buffers()]
    left = [name for name, tensor in tensors if tensor.is_meta]
    if left:  # a parameter or buffer the state did not set would be unusable
        raise RuntimeError(f"Not set from the checkpoint: {left[:5]}")
    dtypes = {tensor.dtype for tensor in state.values()}
    if len(dtypes) == 1:
        model.config.dtype = next(iter(dtypes))
    return model.eval()


# ----------------------------------------------------------------------------------------------- writing


def _require_exportable(model: Any) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "vit" or not isinstance(
        model, (ViTForSelfExplainingClassification, ViTForImageClassification)
    ):
        raise UnsupportedModelError(
            f"save_timm_checkpoint saves a ViTForImageClassification or ViTForSelfExplainingClassification, "
            f"not a {type(model).__name__}."
        )
    if not isinstance(getattr(model, "classifier", None), torch.nn.Linear):
        raise MissingClassifierError("This model has no linear classifier: timm's ViT needs its `head`.")
    if config.hidden_act != "gelu":
        raise UnsupportedModelError(
            f"This model's activation is {config.hidden_act!r}; timm's plain ViT uses exact GELU ('gelu'), so it "
            "would compute other logits. Nothing was saved."
        )


def _timm_config(model: Any, has_explainer: bool) -> dict[str, Any]:
    """timm's `config.json` for `model`: what `timm.create_model("local-dir:...", pretrained=True)` reads."""
    config = model.config
    source = getattr(config, TIMM_SOURCE_ATTRIBUTE, None) or {}
    image_size = _pair(config.image_size)
    patch_size = _pair(config.patch_size)
    hidden, num_labels = int(config.hidden_size), int(config.num_labels)
    model_args = {
        "img_size": list(image_size),
        "patch_size": _int_if_square(patch_size),
        "in_chans": int(config.num_channels),
        "embed_dim": hidden,
        "depth": int(config.num_hidden_layers),
        "num_heads": int(config.num_attention_heads),
        "mlp_ratio": _mlp_ratio(hidden, int(config.intermediate_size)),
        "qkv_bias": bool(config.qkv_bias),
        "num_classes": num_labels,
        "global_pool": "token",
        "class_token": True,
    }
    timm_config: dict[str, Any] = {
        "architecture": source.get("architecture") or _architecture_for(config, patch_size, image_size),
        "num_classes": num_labels,
        "num_features": hidden,
        "global_pool": "token",
    }
    labels = [config.id2label.get(index, f"LABEL_{index}") for index in range(num_labels)]
    if labels != [f"LABEL_{index}" for index in range(num_labels)]:
        timm_config["label_names"] = labels
    timm_config["model_args"] = model_args
    timm_config["pretrained_cfg"] = _export_pretrained_cfg(model, source, image_size, num_labels)
    selfexplain: dict[str, Any] = {}
    if has_explainer:
        selfexplain["explanation_extension_layers"] = int(config.explanation_extension_layers)
        if getattr(config, "explanation_extension_input_layer", None) is not None:
            selfexplain["explanation_extension_input_layer"] = int(config.explanation_extension_input_layer)
    provenance = {
        name: getattr(config, name)
        for name in (BASE_MODEL_ATTRIBUTE, "selfexplain_applied_vector")
        if getattr(config, name, None) is not None
    }
    if provenance:
        selfexplain["config"] = provenance
    if selfexplain:  # timm reads only the keys it knows: this one is selfexplain's own
        timm_config["selfexplain"] = selfexplain
    return timm_config


def _export_pretrained_cfg(
    model: Any, source: Mapping[str, Any], image_size: tuple[int, int], num_labels: int
) -> dict[str, Any]:
    """timm's preprocessing and head facts: the source timm checkpoint's, else the saved image processor's."""
    channels = int(model.config.num_channels)
    if source.get("pretrained_cfg"):
        cfg = {k: v for k, v in source["pretrained_cfg"].items() if k not in _SOURCE_POINTERS}
        cfg.pop("label_names", None)  # top-level `label_names` is the truth; a stale copy would disagree
        cfg.pop("label_descriptions", None)
    else:
        cfg = _pretrained_cfg_from_processor(getattr(model, IMAGE_PROCESSOR_ATTRIBUTE, None), channels)
    cfg.update(
        input_size=[channels, *image_size],
        fixed_input_size=True,
        num_classes=num_labels,
        first_conv="patch_embed.proj",
        classifier="head",
        custom_load=False,
    )
    return cfg


def _pretrained_cfg_from_processor(processor: Any, channels: int) -> dict[str, Any]:
    """A transformers ViT image processor's preprocessing in timm's terms (it resizes without cropping)."""
    mean = list(getattr(processor, "image_mean", None) or [0.5] * channels)
    std = list(getattr(processor, "image_std", None) or [0.5] * channels)
    resample = getattr(processor, "resample", None)  # PIL's codes: 0 nearest, 2 bilinear, 3 bicubic
    interpolation = {0: "nearest", 3: "bicubic"}.get(int(resample) if resample is not None else 2, "bilinear")
    return {
        "interpolation": interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "pool_size": None,
    }


def _architecture_for(config: Any, patch_size: tuple[int, int], image_size: tuple[int, int]) -> str:
    """A timm entry point for a transformers ViT: the standard name of its size when there is one, else any ViT
    entry point (`model_args` carries every shape, so the name only picks timm's builder)."""
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}.get(int(config.hidden_size))
    if size and patch_size[0] == patch_size[1] and image_size[0] == image_size[1]:
        name = f"vit_{size}_patch{patch_size[0]}_{image_size[0]}"
        if TIMM_VIT_WIDTH_AND_HEADS.get(name) == (int(config.hidden_size), int(config.num_attention_heads)):
            return name
    return "vit_base_patch16_224"


def _mlp_ratio(hidden: int, intermediate: int) -> float:
    # timm builds `int(dim * mlp_ratio)` hidden units: nudge a ratio that float rounding would truncate one short.
    ratio = intermediate / hidden
    return ratio if int(hidden * ratio) == intermediate else (intermediate + 0.5) / hidden


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


__all__ = [
    "EXPLAINER_WEIGHTS_NAME",
    "TIMM_SOURCE_ATTRIBUTE",
    "TIMM_VIT_WIDTH_AND_HEADS",
    "TimmViTShape",
    "check_timm_checkpoint",
    "is_timm_config",
    "load_timm_checkpoint",
    "read_timm_config",
    "save_timm_checkpoint",
    "timm_to_vit_state_dict",
    "vit_to_timm_state_dict",
]
