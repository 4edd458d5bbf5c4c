"""Explanation vectors: τ = θ(self-explaining) − θ(prediction-only), a Hub artefact that patches classifiers.

- :mod:`.vector`: :class:`ExplanationVector`, the type: task arithmetic, save / push / load.
- :mod:`.config`: :class:`ExplanationVectorConfig`, what ``explanation_vector_config.json`` holds.
- :mod:`.compatibility`: the architecture fingerprint and what differs between a vector and a model.
- :mod:`.checks`: the checks on files from strangers (sizes, depth, declared tensors) before anything is read.
- :mod:`.io`: atomic writes, Hub downloads, the weights streamed one tensor at a time.
- :mod:`.apply`: :func:`apply_explanation_vector`, θ_T + α·τ, validated first and never half-applied.
- :mod:`.merging`: the tensor math of `ExplanationVector.merge` (task arithmetic, TIES, DARE).
- :mod:`.compression`: :class:`VectorCompression`, compact storage (sparse top-k / DARE, low-rank) and its decoding.
- :mod:`.checkpoint_keys`: the serialized checkpoint names that key a vector.
"""

from .apply import apply_explanation_vector
from .compatibility import FINGERPRINT_FIELDS, architecture_fingerprint, check_compatible
from .compression import VectorCompression
from .config import (
    BASE_MODEL_ATTRIBUTE,
    VECTOR_CONFIG_NAME,
    VECTOR_WEIGHTS_NAME,
    ExplanationVectorConfig,
)
from .merging import MERGE_METHODS
from .vector import ExplanationVector

__all__ = [
    "BASE_MODEL_ATTRIBUTE",
    "FINGERPRINT_FIELDS",
    "MERGE_METHODS",
    "VECTOR_CONFIG_NAME",
    "VECTOR_WEIGHTS_NAME",
    "ExplanationVector",
    "ExplanationVectorConfig",
    "VectorCompression",
    "apply_explanation_vector",
    "architecture_fingerprint",
    "check_compatible",
]
