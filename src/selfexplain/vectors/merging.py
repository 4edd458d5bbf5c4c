"""Merging several explanation vectors into one: task arithmetic, TIES and DARE (docs/design.md §8).

The tensor math, one key at a time, with the semantics of PEFT's ``utils/merge_utils.py``:

- **task arithmetic** (Ilharco et al., *Editing Models with Task Arithmetic*, arXiv:2212.04089): Σ wᵢ·τᵢ;
- **magnitude prune**: the same sum after keeping each τᵢ's top-k magnitudes;
- **TIES** (Yadav et al., *TIES-Merging: Resolving Interference When Merging Models*, arXiv:2306.01708):
  *trim* each τᵢ to its top-k magnitudes, *elect* per entry the sign of the summed trimmed values ("total", the
  paper's mass) or of the count of signs ("frequency"), and take the *disjoint mean*: the mean of the weighted
  values that have the elected sign (entries where none has it stay 0);
- **DARE** (Yu et al., *Language Models are Super Mario*, arXiv:2311.03099): drop each entry with probability
  p = 1 − density and rescale the rest by 1 / density, then sum (``dare_linear``) or TIES (``dare_ties``).

As in PEFT, the sign is elected on the trimmed vectors before weighting and the weights scale the disjoint
mean's terms. The orchestration (loading, compatibility, provenance) is `ExplanationVector.merge`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import IncompatibleExplanationVectorError
from .compatibility import FINGERPRINT_FIELDS
from .compression import dare, seeded_generator, top_k
from .config import ExplanationVectorConfig

MERGE_METHODS = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
_USES_DENSITY = ("magnitude_prune", "ties", "dare_linear", "dare_ties")
_USES_SIGN = ("ties", "dare_ties")
_USES_SEED = ("dare_linear", "dare_ties")
#: Methods whose result averages the inputs by itself (the disjoint mean); the others sum them.
_AVERAGING = ("ties", "dare_ties")


def elect_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Per entry, which inputs (dim 0) carry the elected sign (TIES "elect").

    ``"total"``: the sign of the sum over inputs (the sign with the larger total magnitude); ``"frequency"``: the
    sign most inputs have. A tie (sum 0) elects +. Zeros never carry a sign, so they are never in the mask.
    """
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority_sign must be one of {SIGN_METHODS}, got {method!r}.")
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return stacked.sign() == elected


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σᵢ maskᵢ·xᵢ / max(1, Σᵢ maskᵢ): the mean over the inputs that agree with the elected sign (TIES "merge")."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


def merge_tensors(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Merge one tensor of each input (float32) with ``method`` (see the module docstring).

    ``generators`` (one per input) draw the DARE masks; they are needed by the ``dare_*`` methods only.
    """
    if method in ("magnitude_prune", "ties"):
        tensors = [top_k(t, density) if density < 1.0 else t for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        if generators is None or len(generators) != len(tensors):
            raise ValueError("DARE needs one random generator per input.")
        tensors = [dare(t, density, g) for t, g in zip(tensors, generators, strict=True)]
    elif method != "task_arithmetic":
        raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}.")
    stacked = torch.stack([t.to(torch.float32) for t in tensors])
    scale = torch.tensor(list(weights), dtype=torch.float32).reshape(-1, *([1] * (stacked.dim() - 1)))
    if method in _USES_SIGN:
        mask = elect_sign_mask(stacked, majority_sign)
        return disjoint_mean(stacked * scale, mask)
    return (stacked * scale).sum(dim=0)


def check_merge_arguments(
    method: str,
    num_inputs: int,
    weights: Sequence[float] | None,
    density: float,
    majority_sign: str,
    seed: int,
) -> list[float]:
    """Validate the settings of a merge; return the weights (the defaults filled in)."""
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}.")
    if num_inputs < 1:
        raise ValueError("merge needs at least one explanation vector.")
    if method in _USES_DENSITY and (
        isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0
    ):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}.")
    if majority_sign not in SIGN_METHODS:
        raise ValueError(f"majority_sign must be one of {SIGN_METHODS}, got {majority_sign!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative integer below 2**63, got {seed!r}.")
    if weights is None:
        # The disjoint mean already averages; a plain sum of n vectors would be n times as strong, so the
        # summing methods average by default too (pass weights=[1.0] * n for the paper's plain sum).
        return [1.0] * num_inputs if method in _AVERAGING else [1.0 / num_inputs] * num_inputs
    weights = list(weights)
    if len(weights) != num_inputs or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
    ):
        raise ValueError(f"weights must be {num_inputs} finite numbers (one per vector), got {weights!r}.")
    return [float(w) for w in weights]


def check_mergeable(
    configs: Sequence[ExplanationVectorConfig],
    shapes: Sequence[Mapping[str, tuple[int, ...]]],
    names: Sequence[str],
) -> None:
    """Refuse vectors that cannot be merged, listing every difference with the first one.

    They must be for the same model type and architecture, cover the same keys with the same shapes, and come
    from the same base (and base revision) where recorded: task vectors only add up over a shared θ0.
    """
    first, first_shapes = configs[0], shapes[0]
    problems = []
    for name, config, theirs in zip(names[1:], configs[1:], shapes[1:], strict=True):
        if config.model_type != first.model_type:
            problems.append(f"{name}: model_type {config.model_type!r}, {names[0]}: {first.model_type!r}")
        for field_name in FINGERPRINT_FIELDS:
            mine, other = first.architecture.get(field_name), config.architecture.get(field_name)
            if mine != other:
                problems.append(f"{name}: {field_name} {other!r}, {names[0]}: {mine!r}")
        missing, extra = sorted(set(first_shapes) - set(theirs)), sorted(set(theirs) - set(first_shapes))
        if missing or extra:
            problems.append(f"{name}: keys differ (missing {missing[:3]}, extra {extra[:3]})")
        else:
            differing = [k for k in sorted(theirs) if tuple(theirs[k]) != tuple(first_shapes[k])]
            if differing:
                problems.append(f"{name}: shapes differ for {differing[:3]}")
        if config.extension_input_layer != first.extension_input_layer:  # their extensions read other tokens
            problems.append(
                f"{name}: extension_input_layer {config.extension_input_layer!r}, "
                f"{names[0]}: {first.extension_input_layer!r}"
            )
        if config.extension_route != first.extension_route:  # their extensions' tokens go elsewhere
            problems.append(
                f"{name}: extension_route {config.extension_route!r}, {names[0]}: {first.extension_route!r}"
            )
        for attribute in ("base_model", "base_model_revision"):
            mine, other = getattr(first, attribute), getattr(config, attribute)
            if mine is not None and other is not None and mine != other:
                problems.append(f"{name}: {attribute} {other!r}, {names[0]}: {mine!r}")
    if problems:
        raise IncompatibleExplanationVectorError(
            "These explanation vectors cannot be merged: " + "; ".join(problems) + "."
        )


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a vector's float32 tensors, keys in order: identifies an input in a merge's provenance."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].to(torch.float32).contiguous()
        digest.update(key.encode() + b"\0" + repr(list(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def input_record(
    config: ExplanationVectorConfig, tensors: Mapping[str, torch.Tensor], source: str | None, name: str | None
) -> dict[str, Any]:
    """What the merged vector's provenance says about one input."""
    provenance = config.provenance
    return {
        "name": name,
        "source": source,
        "base_model": config.base_model,
        "recommended_alpha": config.recommended_alpha,
        "source_dataset": provenance.get("source_dataset"),
        "sha256": tensors_sha256(tensors),
    }


def dare_generator(seed: int, index: int, key: str) -> torch.Generator:
    """The DARE generator of input ``index`` for ``key``: seeded by (seed, index, key), so order-independent."""
    return seeded_generator(seed, "merge", index, key)
