"""α per transformer block: finer control than one global scale of the vector (docs/design.md §4).

`apply_explanation_vector(model, vector, alpha=LayerAlpha(...))` scales the vector's tensors of block ``i``
(``vit.encoder.layer.<i>.*``) by ``blocks[i]`` and every other tensor (embeddings, final layer norm) by ``other``.
A float α is the special case where every entry is equal. `fit_alpha` chooses one on unlabelled target images and
returns an `AlphaFit` (defined here, beside the type it carries, so that `apply` accepts it).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_BLOCK_KEY = re.compile(r"^vit\.encoder\.layer\.(\d+)\.")

#: The `type` field of a serialised `LayerAlpha` (the applied model's config and card record it).
LAYER_ALPHA_TYPE = "per_layer"


@dataclass(frozen=True)
class LayerAlpha:
    """Scales of an explanation vector per transformer block.

    Args:
        blocks: α of block ``i`` at position ``i``; one entry per block of the model it is applied to.
        other: α of the tensors outside the blocks (patch and position embeddings, final layer norm).

    Example:
        >>> LayerAlpha(blocks=(0.0, 0.5, 1.0, 1.0), other=0.5).alpha_for("vit.encoder.layer.2.output.dense.weight")
        1.0
        >>> LayerAlpha.uniform(0.5, num_blocks=4) == LayerAlpha((0.5,) * 4, 0.5)
        True
    """

    blocks: tuple[float, ...]
    other: float

    def __post_init__(self) -> None:
        if isinstance(self.blocks, (str, bytes)) or not isinstance(self.blocks, Sequence):
            raise TypeError(f"blocks must be a sequence of numbers, got {type(self.blocks).__name__}.")
        blocks = tuple(_finite(value, f"blocks[{i}]") for i, value in enumerate(self.blocks))
        if not blocks:
            raise ValueError("blocks must hold one α per transformer block, got none.")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "other", _finite(self.other, "other"))

    @classmethod
    def uniform(cls, alpha: float, num_blocks: int) -> LayerAlpha:
        """The same α everywhere: what a float α means."""
        return cls(blocks=(float(alpha),) * int(num_blocks), other=float(alpha))

    @property
    def is_uniform(self) -> bool:
        return all(value == self.other for value in self.blocks)

    def alpha_for(self, key: str) -> float:
        """α of one vector tensor, by its checkpoint key."""
        match = _BLOCK_KEY.match(key)
        if match is None:
            return self.other
        index = int(match.group(1))
        if index >= len(self.blocks):
            raise ValueError(
                f"{key!r} belongs to block {index}, but this LayerAlpha has {len(self.blocks)} block entries."
            )
        return self.blocks[index]

    def check_model(self, num_hidden_layers: int) -> None:
        """Refuse an α made for a model of another depth (before any weight is touched)."""
        if len(self.blocks) != num_hidden_layers:
            raise ValueError(
                f"This LayerAlpha has {len(self.blocks)} block entries; the model has {num_hidden_layers} "
                "transformer blocks."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"type": LAYER_ALPHA_TYPE, "blocks": list(self.blocks), "other": self.other}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerAlpha:
        if not isinstance(data, Mapping) or data.get("type") != LAYER_ALPHA_TYPE:
            raise ValueError(
                f'A serialised LayerAlpha is a dict with "type": "{LAYER_ALPHA_TYPE}", got {data!r}.'
            )
        unknown = set(data) - {"type", "blocks", "other"}
        if unknown:
            raise ValueError(f"Unknown LayerAlpha fields {sorted(unknown)}.")
        return cls(blocks=tuple(data["blocks"]), other=data["other"])

    def __str__(self) -> str:
        if self.is_uniform:
            return f"{self.other:g}"
        return f"blocks [{', '.join(f'{v:g}' for v in self.blocks)}], other {self.other:g}"


@dataclass
class AlphaFit:
    """What `fit_alpha` chose and what it cost.

    `apply_explanation_vector(model, vector, alpha=fit)` applies `fit.alpha` and records the fit (α, objective,
    cost) in the applied model's config and card; `alpha=fit.alpha` applies the same weights without the record. `global_alpha` is the
    best single α of the grid (the per-block search starts from it). Objectives are mean insertion − deletion AUC
    of the patched model's own map on the fitting images; `forward_passes` counts images pushed through a model.
    """

    alpha: LayerAlpha | float
    objective: float
    top1_agreement: float
    global_alpha: float
    global_objective: float
    unpatched_objective: float
    forward_passes: int
    num_images: int
    min_agreement: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": alpha_record(self.alpha),
            "objective": self.objective,
            "top1_agreement": self.top1_agreement,
            "global_alpha": self.global_alpha,
            "global_objective": self.global_objective,
            "unpatched_objective": self.unpatched_objective,
            "forward_passes": self.forward_passes,
            "num_images": self.num_images,
            "min_agreement": self.min_agreement,
        }


def alpha_record(alpha: float | LayerAlpha) -> float | dict[str, Any]:
    """What an applied model's config and card record of α: the float, or the LayerAlpha's dict."""
    return alpha.to_dict() if isinstance(alpha, LayerAlpha) else float(alpha)


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return value
