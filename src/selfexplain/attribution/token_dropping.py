"""Removal by token dropping: a coalition's value is the ViT's output on its kept patch tokens alone.

The default removal (:mod:`.masking`) fills a removed player's pixels with a baseline and runs the whole image
through the model. A ViT whose players are its own patches can instead *drop* the removed patches' tokens:
the CLS token and the kept patch tokens, each with its own position embedding already added, go through the
encoder, and the classifier reads the CLS token as usual. The model never sees a baseline pixel, and a
forward pass costs in proportion to the tokens it keeps.

This is a **different value function** from baseline filling, not a faster way to compute the same one:
``f(S)`` is the model's output on the tokens of ``S`` only (``f(empty)`` is the CLS token alone), so
Shapley values computed with ``removal="tokens"`` differ from those with ``removal="baseline"`` and the two
must not be mixed (e.g. as targets of one training run, or in one comparison table).

Coalitions of equal size keep equally many tokens, so they are evaluated as one dense batch (no padding, no
attention mask): the patch tokens of every image are embedded once, and each forward pass gathers the kept
tokens of its coalitions.

Example:
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    >>> pixel_values = torch.randn(2, 3, 16, 16)
    >>> coalitions = torch.rand(2, 5, 16) < 0.5  # (images, coalitions per image, players = patches)
    >>> token_dropping_values(model, pixel_values, coalitions).shape  # (images, coalitions, classes)
    torch.Size([2, 5, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn
from transformers import ViTForImageClassification

from .._progress import progress_bar
from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification
from .model_call import eval_mode, model_device_dtype, patch_grid

__all__ = [
    "REMOVAL_KINDS",
    "RemovalKind",
    "check_removal",
    "check_token_dropping",
    "embed_patch_tokens",
    "kept_token_logits",
    "token_dropping_values",
]

RemovalKind = Literal["baseline", "tokens"]
REMOVAL_KINDS: tuple[str, ...] = ("baseline", "tokens")

#: Classifiers whose forward is exactly embeddings -> encoder -> layernorm -> classifier(CLS). A subclass with
#: another forward would get a value function that is not its own, so only these (and subclasses) qualify.
_TOKEN_DROPPING_MODELS = (ViTForImageClassification, ViTForSelfExplainingClassification)


def check_removal(removal: str, model: Callable, pixel_values: torch.Tensor, grid: tuple[int, int]) -> None:
    """Validate a ``removal`` argument of the Shapley estimators (and the model and grid for ``"tokens"``)."""
    if removal not in REMOVAL_KINDS:
        raise ValueError(f"removal must be one of {REMOVAL_KINDS}, got {removal!r}.")
    if removal == "tokens":
        check_token_dropping(model, pixel_values, grid)


def check_token_dropping(model: Callable, pixel_values: torch.Tensor, grid: tuple[int, int]) -> None:
    """Raise unless ``model`` is a ViT classifier whose tokens can be dropped and ``grid`` is its patch grid.

    Example:
        >>> check_token_dropping(model, torch.zeros(1, 3, 16, 16), grid=(2, 2))
        Traceback (most recent call last):
        ValueError: removal="tokens" needs the players to be the model's patches: ...
    """
    if not isinstance(model, _TOKEN_DROPPING_MODELS):
        raise TypeError(
            'removal="tokens" runs the encoder of a ViT classifier on the kept patch tokens, so it needs a '
            "transformers ViTForImageClassification or a selfexplain ViTForSelfExplainingClassification; got "
            f'{type(model).__name__}. Use removal="baseline" for other models.'
        )
    vit = model.vit
    missing = [name for name in ("embeddings", "layernorm") if not hasattr(vit, name)]
    if not (hasattr(vit, "layers") or hasattr(vit, "encoder")):
        missing.append("layers (or encoder)")
    if missing or not isinstance(model.classifier, nn.Linear):
        raise TypeError(
            f'removal="tokens" needs `vit.embeddings`, `vit.layers`, `vit.layernorm` and a linear `classifier`; '
            f"this {type(model).__name__} lacks {missing or ['a linear classifier']} (transformers version?)."
        )
    patches = patch_grid(model, pixel_values)
    if tuple(grid) != patches:
        raise ValueError(
            f'removal="tokens" needs the players to be the model\'s patches: grid={tuple(grid)} but the model '
            f"lays a {patches[0]}x{patches[1]} patch grid over these {pixel_values.shape[-2]}x"
            f'{pixel_values.shape[-1]} images. Pass grid={patches}, or use removal="baseline" for a coarser grid.'
        )


def token_dropping_values(
    model: ViTForImageClassification | ViTForSelfExplainingClassification,
    pixel_values: torch.Tensor,
    coalitions: torch.Tensor,
    batch_size: int = 256,
    value: Literal["probs", "logits"] = "logits",
    progress: bool = False,
) -> torch.Tensor:
    """Values ``(B, M, num_classes)`` (float64, CPU) of the coalitions ``(B, M, n)`` of every image, by dropping
    the tokens of the removed patches.

    Players are the model's patches in row-major order (``n = grid_h * grid_w``). Each image is embedded once
    (patch embedding plus position embeddings, CLS token first); every coalition then runs the encoder on the
    CLS token and its kept patch tokens, and its value is the classifier's output on the final CLS token.
    Coalitions are grouped by size; a forward pass holds at most as many tokens as ``batch_size`` whole images
    (``batch_size * (n + 1)``), so memory stays within that of baseline filling at the same ``batch_size`` and
    small coalitions share large batches. Results do not depend on ``batch_size`` (up to float rounding).

    Args:
        model: a ``ViTForImageClassification`` or ``ViTForSelfExplainingClassification`` (run in eval mode).
        pixel_values: ``(B, C, H, W)`` images at the model's ``config.image_size``.
        coalitions: ``(B, M, n)`` boolean masks over the patch grid (``True`` = kept).
        batch_size: whole-image equivalents of tokens per forward pass.
        value: ``"logits"`` or ``"probs"`` (softmax).
        progress: show a progress bar over forward passes.

    Example:
        >>> full = torch.ones(2, 1, 16, dtype=torch.bool)
        >>> torch.allclose(token_dropping_values(model, pixel_values, full)[:, 0].float(),
        ...                model(pixel_values=pixel_values).logits, atol=1e-5)
        True
    """
    num_images, num_coalitions, num_players = coalitions.shape
    device, dtype = model_device_dtype(model, pixel_values)
    flat = coalitions.reshape(-1, num_players).to(device=device, dtype=torch.bool)
    values = None
    with eval_mode(model), torch.inference_mode():
        tokens = embed_patch_tokens(model, pixel_values.to(device=device, dtype=dtype))  # (B, 1 + n, D)
        if tokens.shape[1] != num_players + 1:
            raise ValueError(
                f"coalitions have {num_players} players but the model makes {tokens.shape[1] - 1} patch tokens."
            )
        passes = list(_passes_by_size(flat, batch_size * (num_players + 1)))
        for rows in progress_bar(passes, desc="token-dropping forward passes", disable=not progress):
            positions = _kept_positions(flat[rows])
            kept = tokens[(rows // num_coalitions).unsqueeze(1), positions]  # (rows, 1 + size, D)
            scores = kept_token_logits(model, kept).float()
            if value == "probs":
                scores = scores.softmax(dim=-1)
            if values is None:
                values = torch.empty(len(flat), scores.shape[-1], device=device)
            values[rows] = scores
    return values.to(device="cpu", dtype=torch.float64).view(num_images, num_coalitions, -1)


def embed_patch_tokens(
    model: ViTForImageClassification | ViTForSelfExplainingClassification, pixel_values: torch.Tensor
) -> torch.Tensor:
    """``(B, 1 + n, D)``: the CLS token and the patch tokens, position embeddings added, before the encoder.

    The model's own ``vit.embeddings`` with ``interpolate_pos_encoding=False``, as the model's forward does by
    default: images of another size than ``config.image_size`` are refused exactly as the model refuses them
    (baseline filling calls the model the same way, so both removals accept the same inputs).
    """
    return model.vit.embeddings(pixel_values, interpolate_pos_encoding=False)


def kept_token_logits(
    model: ViTForImageClassification | ViTForSelfExplainingClassification, tokens: torch.Tensor
) -> torch.Tensor:
    """``(R, num_classes)`` logits from ``(R, T, D)`` embedded tokens (CLS first): encoder, layernorm, classifier.

    Example:
        >>> tokens = embed_patch_tokens(model, pixel_values)
        >>> torch.allclose(kept_token_logits(model, tokens), model(pixel_values=pixel_values).logits, atol=1e-5)
        True
    """
    vit = model.vit
    hidden = _encode(vit, tokens)
    return model.classifier(vit.layernorm(hidden[:, 0]))


def _encode(vit: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The ViT encoder without an attention mask: ``vit.layers`` (transformers 5) or ``vit.encoder`` (older)."""
    layers = getattr(vit, "layers", None)
    if layers is None:
        output = vit.encoder(hidden)
        return output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
    for layer in layers:
        output = layer(hidden)
        # Some transformers versions return a tuple (hidden_states, attentions?) per layer.
        hidden = output[0] if isinstance(output, (tuple, list)) else output
    return hidden


def _passes_by_size(masks: torch.Tensor, tokens_per_pass: int) -> Iterator[torch.Tensor]:
    """Row indices of ``masks`` ``(R, n)`` grouped into forward passes of one coalition size each.

    A pass of size-``k`` coalitions holds up to ``tokens_per_pass // (k + 1)`` rows (at least one), so every
    pass is a dense batch and small coalitions share large batches.
    """
    sizes = masks.sum(dim=1)
    order = torch.argsort(sizes, stable=True)
    sorted_sizes = sizes[order]
    unique_sizes, counts = torch.unique_consecutive(sorted_sizes, return_counts=True)
    start = 0
    for size, count in zip(unique_sizes.tolist(), counts.tolist(), strict=True):
        rows_per_pass = max(1, tokens_per_pass // (size + 1))
        group = order[start : start + count]
        yield from group.split(rows_per_pass)
        start += count


def _kept_positions(masks: torch.Tensor) -> torch.Tensor:
    """``(R, 1 + k)`` token positions for ``R`` coalitions of the same size ``k``: the CLS token (0) first, then
    the kept patches in ascending order (patch ``j`` is token ``j + 1``)."""
    rows, size = masks.shape[0], int(masks[0].sum())
    patches = masks.nonzero()[:, 1].view(rows, size) + 1  # nonzero is row-major: each row's members in order
    return torch.cat([patches.new_zeros(rows, 1), patches], dim=1)
