"""Baseline explainers that the self-explaining map is compared against.

Every explainer returns one map per image on the model's patch grid, shaped ``(B, grid_h, grid_w)``, so the
evaluation can rank patches the same way for every method. They work on a stock ``transformers``
``ViTForImageClassification`` and on any subclass with the same ``vit`` + ``classifier`` structure (such as
``selfexplain``'s self-explaining model), and pass ``interpolate_pos_encoding`` through for inputs whose size
differs from ``config.image_size``.

- :func:`grad_cam`: Grad-CAM (Selvaraju et al., 2017) with the usual Vision Transformer adaptation of
  ``pytorch-grad-cam`` (``tutorials/vision_transformers.md`` and ``usage_examples/vit_example.py`` in
  jacobgil/pytorch-grad-cam): the patch tokens of the *first* LayerNorm of the last encoder layer are the
  "channels x positions" activation map. The last layer's own output cannot be used: the classifier reads only
  the CLS token and the final LayerNorm acts per token, so the gradient of the logits with respect to the
  patch tokens there is exactly zero.
- :func:`attention_rollout`: attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in
  Transformers"), following jacobgil/vit-explain (``vit_rollout.py``) for head fusion and ``discard_ratio``.
- :func:`random_explanation`: seeded uniform noise, the floor every explainer should beat.
- :func:`standardized_blend` and :func:`blend_with_rollout`: a map combined with attention rollout (per-image
  z-scores, averaged; nothing fitted). On the offline suite a *transferred* map blended so beats both the
  transferred map and rollout on the related pairs (``docs/results/transfer_blend.md``).

These are implemented here rather than by wrapping ``pytorch-grad-cam`` or ``captum`` so that the package gains
no runtime dependency for a benchmark baseline.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from ..attribution.model_call import check_pixel_values, eval_mode, patch_grid, resolve_target

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")

__all__ = [
    "attention_rollout",
    "blend_with_rollout",
    "grad_cam",
    "patch_grid",
    "random_explanation",
    "standardized_blend",
]


def grad_cam(
    model: nn.Module,
    pixel_values: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    interpolate_pos_encoding: bool | None = None,
) -> torch.Tensor:
    """Grad-CAM maps of a ViT classifier on the patch grid, shaped ``(B, grid_h, grid_w)``, float32, >= 0.

    With ``A`` the patch tokens at the output of ``model.vit.layers[-1].layernorm_before`` (``(N, D)`` per
    image) and ``y_c`` the logit of the target class, the map is ``ReLU(sum_k w_k A[:, k])`` with channel
    weights ``w_k = mean_j dy_c / dA[j, k]``. Maps are not rescaled (rank-based metrics do not need it).

    Args:
        model: a ``ViTForImageClassification`` or a subclass with the same ``vit`` + ``classifier`` layout.
        pixel_values: ``(B, C, H, W)`` normalised images.
        target: class to explain: ``None`` for each image's predicted class, an ``int`` for all images, or one
            class per image (sequence or tensor of length ``B``).
        interpolate_pos_encoding: passed to the model, needed for inputs of a size other than
            ``config.image_size``.

    One forward and one backward pass. The model is run in eval mode; training flags, ``requires_grad`` and
    parameters are left as they were, no ``.grad`` is written and the hook is removed, also when the model is
    frozen or the call is made under ``torch.no_grad()``.

    Example:
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3))
        >>> grad_cam(model, torch.randn(2, 3, 16, 16), target=[0, 2]).shape
        torch.Size([2, 4, 4])
    """
    vit = _vit_backbone(model)
    grid_h, grid_w = patch_grid(model, pixel_values)
    captured: dict[str, torch.Tensor] = {}

    def capture_activation(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # Cut the graph here and make the activation a leaf: gradients stop at it, so no parameter (frozen or
        # not) needs `requires_grad` and no `.grad` is ever accumulated.
        activation = output.detach().requires_grad_(True)
        captured["activation"] = activation
        return activation

    handle = vit.layers[-1].layernorm_before.register_forward_hook(capture_activation)
    try:
        with eval_mode(model), torch.enable_grad():
            logits = model(
                pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
            ).logits
            if "activation" not in captured:
                raise RuntimeError(
                    f"{type(model).__name__} did not call `vit.layers[-1].layernorm_before` in its forward."
                )
            classes = resolve_target(target, logits)
            # Images are independent in a ViT, so one backward of the summed scores gives per-image gradients.
            score = logits.gather(1, classes[:, None]).sum()
            (gradient,) = torch.autograd.grad(score, captured["activation"])
    finally:
        handle.remove()

    activation = captured["activation"].detach()[:, 1:].float()  # drop the CLS token
    gradient = gradient[:, 1:].float()
    _check_token_count(activation, grid_h, grid_w)
    channel_weights = gradient.mean(dim=1, keepdim=True)
    cam = torch.relu((channel_weights * activation).sum(dim=-1))
    return cam.reshape(-1, grid_h, grid_w)


def attention_rollout(
    model: nn.Module,
    pixel_values: torch.Tensor,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    *,
    interpolate_pos_encoding: bool | None = None,
) -> torch.Tensor:
    """Attention rollout from the CLS token to the patches, shaped ``(B, grid_h, grid_w)``, float32.

    Per layer, the attention of the heads is fused (``head_fusion``: mean, max or min over heads), the
    ``discard_ratio`` fraction of lowest fused weights of each image is set to zero (never the CLS-to-CLS one),
    the residual connection is modelled by ``0.5 * A + 0.5 * I`` and rows are renormalised to sum to one. The
    rollout is the product ``A_L ... A_1`` of these matrices; the map is its CLS row over the patch tokens.
    Every value is >= 0 and a map sums to at most one (the rest stays on the CLS token). Maps are not rescaled.

    Rollout is **class-agnostic**: it depends on the image only, not on a target class, which is why it takes no
    ``target``.

    Attention weights need the eager attention implementation. A model running another one (``"sdpa"``, the
    default in ``transformers`` 5) is switched to ``"eager"`` with ``model.set_attn_implementation`` for this
    call and switched back afterwards. The model is run in eval mode and its training flags are restored.

    Example:
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
        >>> maps = attention_rollout(model, torch.randn(2, 3, 16, 16), head_fusion="max", discard_ratio=0.5)
        >>> maps.shape, model.config._attn_implementation
        (torch.Size([2, 4, 4]), 'sdpa')
    """
    _vit_backbone(model)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"Unknown head_fusion {head_fusion!r}; expected one of {HEAD_FUSIONS}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}.")
    grid_h, grid_w = patch_grid(model, pixel_values)

    with eval_mode(model), _eager_attention(model), torch.no_grad():
        attentions = model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=True,
        ).attentions
    if not attentions or any(layer_attention is None for layer_attention in attentions):
        raise RuntimeError(
            f"{type(model).__name__} returned no attention weights with `output_attentions=True` even with the "
            "eager attention implementation."
        )

    rollout = None
    for layer_attention in attentions:  # (B, heads, T, T), first layer first
        layer_flow = _residual_flow(
            _discard_lowest(_fuse_heads(layer_attention.float(), head_fusion), discard_ratio)
        )
        rollout = layer_flow if rollout is None else layer_flow @ rollout
    cls_to_patches = rollout[:, 0, 1:]
    _check_token_count(cls_to_patches[..., None], grid_h, grid_w)
    return cls_to_patches.reshape(-1, grid_h, grid_w)


def standardized_blend(*maps: torch.Tensor) -> torch.Tensor:
    """The equal-weight mean of the maps' per-image z-scores, shaped like each map, float32.

    Each map is standardised per image (its mean over the players subtracted, divided by its standard deviation;
    a constant map contributes zeros), then the maps are averaged. Nothing is fitted: the rankings insertion and
    deletion read and the Pearson correlation with a reference are unchanged by a per-image affine map, so equal
    weights on z-scores are the one combination that needs neither labels nor a reference. The result is unitless
    (not Shapley values: it does not add up to the logit).

    Example:
        >>> a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
        >>> torch.allclose(standardized_blend(a, 10 * a + 5), standardized_blend(a))
        True
        >>> standardized_blend(a, torch.ones_like(a)).flatten().tolist()
        [-0.5809..., -0.1936..., 0.1936..., 0.5809...]
    """
    if not maps:
        raise ValueError("standardized_blend needs at least one map.")
    shape = maps[0].shape
    if any(m.shape != shape for m in maps):
        raise ValueError(f"The maps must have one shape, got {[tuple(m.shape) for m in maps]}.")
    if len(shape) < 2:
        raise ValueError(f"Expected maps shaped (B, ...) with at least one player each, got {tuple(shape)}.")
    total = torch.zeros(shape, dtype=torch.float32, device=maps[0].device)
    for m in maps:
        flat = m.detach().flatten(1).float()
        centred = flat - flat.mean(1, keepdim=True)
        scale = flat.std(1, keepdim=True) if flat.shape[1] > 1 else torch.ones_like(centred[:, :1])
        total += torch.where(scale > 0, centred / scale.clamp_min(1e-12), torch.zeros_like(centred)).view(
            shape
        )
    return total / len(maps)


def blend_with_rollout(
    model: nn.Module, pixel_values: torch.Tensor, explain: str | torch.Tensor = "predicted"
) -> torch.Tensor:
    """A self-explaining model's own map blended with its attention rollout (:func:`standardized_blend`),
    shaped ``(B, grid_h, grid_w)``, float32.

    Why: rollout needs no training and the transferred map and rollout err in partly different places. On the
    offline suite (``docs/results/transfer_blend.md``) the blend of a transferred map with rollout is more
    faithful than either on the related pairs (MNIST → `digits`: Pearson 0.64 against 0.54 and 0.56); in-domain,
    where the self-explaining map is far ahead of rollout, the blend is worse than the map alone. Which to use on
    a given model can be told without labels: the insertion − deletion of each on unlabelled images of its domain.

    ``model`` is a ``ViTForSelfExplainingClassification`` (trained, or with an explanation vector applied);
    ``explain`` is what its forward takes (``"predicted"`` or one class index per image).

    Example:
        >>> from selfexplain import ViTForSelfExplainingClassification
        >>> from transformers import ViTConfig
        >>> model = ViTForSelfExplainingClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3))
        >>> blend_with_rollout(model, torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 4, 4])
    """
    from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification

    if not isinstance(model, ViTForSelfExplainingClassification):
        raise TypeError(
            f"blend_with_rollout needs a self-explaining model (ViTForSelfExplainingClassification), got "
            f"{type(model).__name__}."
        )
    with eval_mode(model), torch.no_grad():
        own = model(pixel_values=pixel_values, explain=explain).explanation
    return standardized_blend(own, attention_rollout(model, pixel_values))


def random_explanation(pixel_values: torch.Tensor, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Uniform random maps in ``[0, 1)``, shaped ``(B, grid_h, grid_w)``, float32, on ``pixel_values.device``.

    The same ``seed`` and shapes give the same maps on every device (they are drawn on the CPU), and the global
    random state is not touched.

    Example:
        >>> x = torch.zeros(2, 3, 16, 16)
        >>> torch.equal(random_explanation(x, (4, 4), seed=1), random_explanation(x, (4, 4), seed=1))
        True
    """
    check_pixel_values(pixel_values)
    try:
        grid_h, grid_w = (operator.index(size) for size in grid)
    except (TypeError, ValueError):
        grid_h = grid_w = 0
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be a pair of positive ints (grid_h, grid_w), got {grid!r}.")
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand((pixel_values.shape[0], grid_h, grid_w), generator=generator)
    return maps.to(pixel_values.device)


def _vit_backbone(model: nn.Module) -> nn.Module:
    vit = getattr(model, "vit", None)
    if vit is None or not hasattr(vit, "layers") or not hasattr(model, "classifier"):
        raise TypeError(
            f"{type(model).__name__} is not a ViT classifier: expected `.vit.layers` and `.classifier` like "
            "transformers' ViTForImageClassification."
        )
    return vit


def _check_token_count(patch_tokens: torch.Tensor, grid_h: int, grid_w: int) -> None:
    if patch_tokens.shape[1] != grid_h * grid_w:
        raise ValueError(
            f"The model produced {patch_tokens.shape[1]} patch tokens but the input's patch grid is "
            f"{grid_h}x{grid_w}; expected one CLS token followed by one token per patch."
        )


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eager attention (the only one that returns weights) for the block, then back."""
    previous = model.config._attn_implementation
    if previous == "eager":
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"{type(model).__name__} uses {previous!r} attention and has no `set_attn_implementation` to switch "
            "to 'eager'; load it with attn_implementation='eager'."
        )
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _fuse_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    return attention.amin(dim=1)


def _discard_lowest(attention: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the ``discard_ratio`` fraction of lowest weights of each ``(T, T)`` matrix, keeping CLS-to-CLS."""
    batch_size, tokens, _ = attention.shape
    num_discarded = int(tokens * tokens * discard_ratio)
    if num_discarded == 0:
        return attention
    flat = attention.reshape(batch_size, -1).clone()
    ranking = flat.clone()
    ranking[:, 0] = float("inf")  # as in vit-explain: the CLS token's attention to itself is never dropped
    lowest = ranking.topk(num_discarded, dim=-1, largest=False).indices
    flat.scatter_(1, lowest, 0.0)
    return flat.reshape(batch_size, tokens, tokens)


def _residual_flow(attention: torch.Tensor) -> torch.Tensor:
    """``0.5 * A + 0.5 * I`` for the skip connection, with rows renormalised to sum to one."""
    identity = torch.eye(attention.shape[-1], device=attention.device, dtype=attention.dtype)
    flow = 0.5 * attention + 0.5 * identity
    return flow / flow.sum(dim=-1, keepdim=True)
