"""Map between a model's in-memory parameter names and the names its checkpoint uses on disk.

transformers 5 renames modules in memory (`vit.layers.0.attention.q_proj.weight`) but `save_pretrained`
writes the historical names (`vit.encoder.layer.0.attention.attention.query.weight`), which is also what every
checkpoint written by transformers 4.x contains. Explanation vectors are keyed by the *serialized* names: they
are the stable contract between library versions.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion


def serialized_names(model: PreTrainedModel) -> dict[str, str]:
    """Return `{serialized checkpoint name: in-memory state-dict name}` for every tensor of `model`.

    Uses transformers' own reverse conversion (the one `save_pretrained` applies). Each tensor is replaced by
    a one-element marker holding its index, so the mapping can be read back without copying any weights.
    """
    names = list(model.state_dict().keys())
    markers = {name: torch.tensor([float(i)]) for i, name in enumerate(names)}
    reverted = revert_weight_conversion(model, markers)
    mapping: dict[str, str] = {}
    for serialized, marker in reverted.items():
        if not isinstance(marker, torch.Tensor) or marker.numel() != 1:
            raise NotImplementedError(
                f"{type(model).__name__} merges or splits tensors when saving ({serialized!r}); "
                "explanation vectors support checkpoints whose tensors map one-to-one to parameters."
            )
        mapping[serialized] = names[int(marker.item())]
    if len(mapping) != len(names):
        raise NotImplementedError(
            f"Could not map every parameter of {type(model).__name__} to a checkpoint name."
        )
    return mapping


def serialized_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """`model.state_dict()` keyed by the names `save_pretrained` writes (tensors are not copied)."""
    state = model.state_dict()
    return {serialized: state[name] for serialized, name in serialized_names(model).items()}
