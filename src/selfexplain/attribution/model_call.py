"""The one way selfexplain calls a classifier: every module that evaluates a model goes through here.

Shapley values, insertion/deletion metrics, baseline explainers and the experiment all accept the same models:
a 🤗 ``PreTrainedModel`` (called as ``model(pixel_values=x)``), any ``nn.Module`` or plain callable (called as
``model(x)``), returning logits as a tensor, a tuple/list whose first item is the logits, a ``ModelOutput``
or a dict with ``"logits"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification

__all__ = [
    "call_model",
    "eval_mode",
    "logits_of",
    "model_device_dtype",
    "model_logits",
    "patch_grid",
    "resolve_target",
]


@contextmanager
def eval_mode(model: nn.Module | Callable) -> Iterator[None]:
    """Run in eval mode (no dropout), then restore every submodule's own training flag.

    `model.train(was_training)` would not do: it sets every submodule alike, and a user may have frozen some
    in eval mode on purpose. Plain callables (no modules) pass through.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def call_model(model: Callable, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
    """``model(pixel_values=x, **kwargs)`` when its forward names that argument (transformers), else ``model(x)``."""
    if _takes_pixel_values(model):
        return model(pixel_values=pixel_values, **kwargs)
    return model(pixel_values, **kwargs)


def logits_of(output: Any) -> torch.Tensor:
    """The ``(batch, num_classes)`` logits in any classifier output (tensor, tuple, ``ModelOutput``, dict)."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, Mapping):  # dicts and ModelOutput (a Mapping too)
        logits = output.get("logits")
    else:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise TypeError(
            "The model must return (batch, num_classes) logits: a tensor, a tuple starting with one, or an "
            f"output with `.logits` / ['logits']; got {type(output).__name__}."
        )
    return logits


def model_logits(model: Callable, pixel_values: torch.Tensor) -> torch.Tensor:
    """``logits_of(call_model(model, pixel_values))``; a self-explaining model is asked for no explanation."""
    if isinstance(model, ViTForSelfExplainingClassification):
        return model(pixel_values=pixel_values, explain=None).logits
    return logits_of(call_model(model, pixel_values))


def model_device_dtype(model: Callable, pixel_values: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Where and in which float dtype the model computes: its first floating parameter, else the input's."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            if parameter.is_floating_point():
                return parameter.device, parameter.dtype
    dtype = pixel_values.dtype if pixel_values.is_floating_point() else torch.float32
    return pixel_values.device, dtype


def patch_grid(model: nn.Module, pixel_values: torch.Tensor) -> tuple[int, int]:
    """Return the ``(grid_h, grid_w)`` patch grid that ``model`` lays over ``pixel_values``.

    The grid follows the real input size, not ``config.image_size``, so it is also right for inputs run with
    ``interpolate_pos_encoding=True``. Like the patch-embedding convolution, it drops a partial last patch.

    Example:
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
        >>> patch_grid(model, torch.zeros(1, 3, 12, 20))
        (3, 5)
    """
    check_pixel_values(pixel_values)
    config = getattr(model, "config", model)
    patch_size = getattr(config, "patch_size", None)
    if patch_size is None:
        raise TypeError(f"{type(model).__name__} has no `config.patch_size`; expected a ViT model.")
    patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    height, width = pixel_values.shape[-2:]
    grid_h, grid_w = height // patch_h, width // patch_w
    if grid_h < 1 or grid_w < 1:
        raise ValueError(
            f"pixel_values of size {height}x{width} is smaller than one {patch_h}x{patch_w} patch."
        )
    return grid_h, grid_w


def resolve_target(
    target: int | Sequence[int] | torch.Tensor | None,
    logits: torch.Tensor | None = None,
    *,
    num_images: int | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """One class index per image: the predicted class of ``logits`` where ``target`` is None, else ``target``
    (an int for every image or one per image) checked for dtype, shape and range.

    Without ``logits``, ``num_images`` (and optionally ``num_classes``) say what to check against.
    """
    if logits is not None:
        num_images, num_classes = logits.shape
        if target is None:
            return logits.argmax(dim=-1)
    if target is None:
        raise ValueError("`target` is None: pass the logits to explain the predicted classes.")
    device = logits.device if logits is not None else None
    classes = torch.as_tensor(target, device=device)
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {classes.dtype}.")
    classes = classes.long()
    if classes.ndim == 0:
        classes = classes.expand(num_images)
    if classes.shape != (num_images,):
        raise ValueError(
            f"target must be an int or hold one class per image ({num_images}), got {tuple(classes.shape)}."
        )
    too_high = num_classes is not None and bool((classes >= num_classes).any())
    if bool((classes < 0).any()) or too_high:
        bound = f"in [0, {num_classes})" if num_classes is not None else "non-negative"
        raise ValueError(f"target classes must be {bound}, got {classes.tolist()}.")
    return classes


def check_pixel_values(pixel_values: torch.Tensor) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}.")


def _takes_pixel_values(model: Callable) -> bool:
    target = model.forward if isinstance(model, nn.Module) else model
    try:
        return "pixel_values" in inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return False
