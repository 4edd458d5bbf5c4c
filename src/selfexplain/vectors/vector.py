"""Explanation vectors: τ = θ(self-explaining) − θ(prediction-only), as a Hub artefact.

A vector is a set of float32 tensors keyed by serialized checkpoint names (see `checkpoint_keys`) plus a JSON
config that says which architecture it fits. It supports task arithmetic (`+`, `-`, scalar `*`, `sum`) and is
saved as `explanation_vector.safetensors` + `explanation_vector_config.json` + a `README.md` model card.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo
from safetensors.torch import save_file
from transformers import PreTrainedModel

from ..cards import render_vector_card
from ..errors import InvalidExplanationVectorError
from ..hub import publish_folder
from .apply import apply_explanation_vector
from .checkpoint_keys import serialized_state_dict
from .checks import EXTENSION_PREFIX
from .compatibility import architecture_fingerprint, check_compatible
from .compression import VectorCompression, encode_tensors
from .config import (
    DEFAULT_INCLUDE,
    STORAGE_DTYPES,
    VECTOR_CONFIG_NAME,
    VECTOR_WEIGHTS_NAME,
    ExplanationVectorConfig,
    extension_layers,
    format_version_for,
)
from .io import iter_vector_tensors, load_vector_config, resolve_vector_weights, write_files_atomically
from .merging import (
    _USES_DENSITY,
    _USES_SEED,
    _USES_SIGN,
    check_merge_arguments,
    check_mergeable,
    dare_generator,
    input_record,
    merge_tensors,
)


class ExplanationVector:
    """The difference between a self-explaining and a prediction-only model trained from the same base.

    Adding it (scaled by α) to a prediction-only classifier fine-tuned from that base transfers the ability to
    explain, with no training on the target.

    Example:
        ```python
        >>> from selfexplain import ExplanationVector, apply_explanation_vector
        >>> vec = ExplanationVector.from_models(self_explaining=se_model, prediction_only=p_model,
        ...                                     base_model="google/vit-base-patch16-224-in21k")
        >>> vec.save_pretrained("my-vector")            # safetensors + config json + model card
        >>> vec.push_to_hub("me/vit-b16-explanation-vector")
        >>> vec = ExplanationVector.from_pretrained("me/vit-b16-explanation-vector", revision="main")
        >>> explaining = apply_explanation_vector("their-org/vit-cats-vs-dogs", vec, alpha=1.0)
        >>> half = 0.5 * vec; merged = sum([vec_a, vec_b]) * 0.5   # task arithmetic, in float32
        >>> ties = ExplanationVector.merge([vec_a, "me/other-vector"], method="ties", density=0.2)
        >>> vec.save_pretrained("small", compression="top_k:0.05")       # sparse: 5 % of the entries
        ```
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], config: ExplanationVectorConfig):
        self.tensors: dict[str, torch.Tensor] = {k: v.detach().to(torch.float32) for k, v in tensors.items()}
        self.config = config
        #: Where `from_pretrained` read the vector (folder or repo id, and revision); None for one made in memory.
        self.source: str | None = None
        self.source_revision: str | None = None
        self.config.tensors = {
            k: {"shape": list(v.shape), "dtype": config.storage_dtype}
            for k, v in sorted(self.tensors.items())
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(
        cls,
        self_explaining: PreTrainedModel,
        prediction_only: PreTrainedModel,
        *,
        base_model: str | None = None,
        base_model_revision: str | None = None,
        include: Iterable[str] = DEFAULT_INCLUDE,
        exclude: Iterable[str] = (),
        recommended_alpha: float = 1.0,
        provenance: Mapping[str, Any] | None = None,
    ) -> ExplanationVector:
        """τ = θ(self_explaining) − θ(prediction_only) over the serialized keys matching `include` and not `exclude`.

        `include`/`exclude` are `fnmatch` patterns on serialized names; the default covers the backbone (`vit.*`)
        and the explanation extension (`explainer.*`), and leaves out the classifier, whose label set differs
        between source and target. A prediction-only model without the self-explaining model's extension counts
        as having an all-zero one (which is the identity), so the vector carries the extension's weights whole.
        """
        fingerprint = architecture_fingerprint(self_explaining.config)
        mismatch = check_compatible(
            fingerprint,
            self_explaining.config.model_type,
            prediction_only.config,
        )
        if mismatch:
            raise InvalidExplanationVectorError(
                "The two models do not share an architecture: " + "; ".join(mismatch) + "."
            )
        explaining_state = serialized_state_dict(self_explaining)
        predicting_state = serialized_state_dict(prediction_only)
        keys = _select_keys(explaining_state, include, exclude)
        if not keys:
            raise ValueError(f"No parameter matches include={list(include)} and exclude={list(exclude)}.")
        tensors = {}
        for key in keys:
            if key.startswith(EXTENSION_PREFIX) and key not in predicting_state:
                tensors[key] = explaining_state[key].detach().float().cpu().clone()
                continue
            if key not in predicting_state or predicting_state[key].shape != explaining_state[key].shape:
                raise InvalidExplanationVectorError(
                    f"`prediction_only` has no tensor {key!r} of the same shape."
                )
            tensors[key] = (
                explaining_state[key].detach().float().cpu() - predicting_state[key].detach().float().cpu()
            )
        config = ExplanationVectorConfig(
            model_type=self_explaining.config.model_type,
            architecture=fingerprint,
            base_model=base_model,
            base_model_revision=base_model_revision,
            recommended_alpha=float(recommended_alpha),
            provenance=dict(provenance or {}),
            # what the extension it carries reads: it runs on those tokens wherever it is applied
            extension_input_layer=(
                getattr(self_explaining.config, "explanation_extension_input_layer", None)
                if extension_layers(tensors)
                else None
            ),
            extension_route=(
                getattr(self_explaining.config, "explanation_extension_route", "classifier")
                if extension_layers(tensors)
                else "classifier"
            ),
        )
        return cls(tensors, config)

    @classmethod
    def merge(
        cls,
        vectors: Sequence[ExplanationVector | str | os.PathLike],
        method: str = "ties",
        *,
        weights: Sequence[float] | None = None,
        density: float = 0.2,
        seed: int = 0,
        majority_sign: str = "total",
        names: Sequence[str] | None = None,
        recommended_alpha: float | None = None,
        **load_kwargs: Any,
    ) -> ExplanationVector:
        """Merge several explanation vectors of the same base into one (docs/design.md §8).

        Args:
            vectors: `ExplanationVector`s, or folders / Hub ids of them (loaded with `from_pretrained`, with
                ``load_kwargs`` such as ``revision`` or ``token``).
            method: ``"task_arithmetic"`` (Σ wᵢ·τᵢ; Ilharco et al., arXiv:2212.04089), ``"magnitude_prune"``
                (the same after keeping each τᵢ's top-k magnitudes), ``"ties"`` (trim to the top-k magnitudes,
                elect each entry's sign, disjoint mean; Yadav et al., arXiv:2306.01708), ``"dare_linear"`` /
                ``"dare_ties"`` (drop each entry with probability 1 − density, rescale by 1 / density, then sum /
                TIES; Yu et al., arXiv:2311.03099). The semantics are those of PEFT's ``merge_utils``.
            weights: one per vector. Default: 1/n each for the summing methods (their mean) and 1 each for the
                TIES methods (whose disjoint mean already averages).
            density: the fraction of entries kept per tensor by top-k (TIES, magnitude prune) or DARE.
            seed: DARE's seed; the mask of input i for tensor k depends on (seed, i, k) only.
            majority_sign: TIES sign election, ``"total"`` (sign of the summed values, the paper's) or
                ``"frequency"`` (the sign most inputs have).
            names: labels of the inputs for the provenance record (default: their folder / repo id).
            recommended_alpha: α of the merged vector; default: the mean of the inputs' recommended α.

        Returns:
            The merged vector; its ``config.provenance["merge"]`` records the method, weights, density, seed and
            each input (name, source, base, recommended α, source data, SHA-256 of its tensors), and its model
            card shows them.

        Raises:
            IncompatibleExplanationVectorError: the vectors differ in architecture, keys, shapes or base.
            ValueError: an unknown method, or weights / density / seed out of range.

        Example:
            ```python
            >>> from selfexplain import ExplanationVector
            >>> merged = ExplanationVector.merge(["me/mnist-vector", "me/shapes-vector"], method="ties", density=0.2)
            >>> merged.config.provenance["merge"]["method"]
            'ties'
            >>> merged.save_pretrained("merged-vector")
            ```
        """
        loaded: list[ExplanationVector] = []
        for item in vectors:
            if isinstance(item, ExplanationVector):
                loaded.append(item)
            elif isinstance(item, (str, os.PathLike)):
                loaded.append(cls.from_pretrained(item, **load_kwargs))
            else:
                raise TypeError(
                    f"merge takes ExplanationVectors, folders or Hub ids, got {type(item).__name__}."
                )
        weights = check_merge_arguments(method, len(loaded), weights, density, majority_sign, seed)
        if names is not None and len(names) != len(loaded):
            raise ValueError(f"names must hold {len(loaded)} labels (one per vector), got {len(names)}.")
        labels = [
            str(names[i])
            if names is not None
            else (v.source or v.config.provenance.get("repo_id") or f"vector {i}")
            for i, v in enumerate(loaded)
        ]
        check_mergeable(
            [v.config for v in loaded],
            [{k: tuple(t.shape) for k, t in v.tensors.items()} for v in loaded],
            labels,
        )
        bases = {v.config.base_model for v in loaded} - {None}
        if len(bases) == 1 and any(v.config.base_model is None for v in loaded):
            warnings.warn(
                f"Some of the merged vectors record no base model; assuming all were made from {next(iter(bases))}.",
                stacklevel=2,
            )
        keys = sorted(loaded[0].tensors)
        merged = {}
        for key in keys:
            generators = (
                [dare_generator(seed, i, key) for i in range(len(loaded))] if method in _USES_SEED else None
            )
            merged[key] = merge_tensors(
                [v.tensors[key] for v in loaded],
                weights,
                method,
                density=float(density),
                majority_sign=majority_sign,
                generators=generators,
            )
        first = loaded[0].config
        if recommended_alpha is None:
            recommended_alpha = sum(v.config.recommended_alpha for v in loaded) / len(loaded)
        record = {
            "method": method,
            "weights": weights,
            "density": float(density) if method in _USES_DENSITY else None,
            "seed": seed if method in _USES_SEED else None,
            "majority_sign": majority_sign if method in _USES_SIGN else None,
            "inputs": [
                {**input_record(v.config, v.tensors, _source_label(v), label)}
                for v, label in zip(loaded, labels, strict=True)
            ],
        }
        storage = {v.config.storage_dtype for v in loaded}
        config = ExplanationVectorConfig(
            model_type=first.model_type,
            architecture=copy.deepcopy(first.architecture),
            base_model=next(iter(bases), None),
            base_model_revision=next(
                (v.config.base_model_revision for v in loaded if v.config.base_model_revision), None
            ),
            recommended_alpha=float(recommended_alpha),
            storage_dtype=storage.pop() if len(storage) == 1 else "float32",
            provenance={"merge": record},
            extension_input_layer=first.extension_input_layer,  # the same for all: `check_mergeable`
            extension_route=first.extension_route,
        )
        return cls(merged, config)

    # ------------------------------------------------------------------ arithmetic (always float32)
    def _combine(self, other: ExplanationVector, sign: float) -> ExplanationVector:
        if not isinstance(other, ExplanationVector):
            return NotImplemented
        if (
            self.config.architecture != other.config.architecture
            or set(self.tensors) != set(other.tensors)
            or self.config.extension_input_layer != other.config.extension_input_layer
            or self.config.extension_route != other.config.extension_route
        ):
            raise ValueError(
                "Explanation vectors can only be combined when they cover the same architecture and keys."
            )
        tensors = {k: v + sign * other.tensors[k] for k, v in self.tensors.items()}
        return ExplanationVector(tensors, self._derived_config({"combined": True}))

    def __add__(self, other: ExplanationVector) -> ExplanationVector:
        return self._combine(other, 1.0)

    def __radd__(self, other: Any) -> ExplanationVector:
        # `sum([...])` starts from the integer 0.
        if isinstance(other, (int, float)) and other == 0:
            return self
        return self.__add__(other)

    def __sub__(self, other: ExplanationVector) -> ExplanationVector:
        return self._combine(other, -1.0)

    def __neg__(self) -> ExplanationVector:
        return self * -1.0

    def __mul__(self, scale: float) -> ExplanationVector:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        return ExplanationVector(
            {k: v * float(scale) for k, v in self.tensors.items()}, self._derived_config()
        )

    __rmul__ = __mul__

    def _derived_config(self, extra_provenance: Mapping[str, Any] | None = None) -> ExplanationVectorConfig:
        config = copy.deepcopy(self.config)
        config.provenance = {**config.provenance, **(extra_provenance or {})}
        return config

    @property
    def recommended_alpha(self) -> float:
        """The scale α the vector's author recommends (read-only: `config.recommended_alpha`).

        `apply_explanation_vector(model, vector)` and `vector.apply_to(model)` use it when no `alpha` is given.
        """
        return self.config.recommended_alpha

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self.tensors.values())
        return (
            f"ExplanationVector(base_model={self.config.base_model!r}, tensors={len(self.tensors)}, "
            f"parameters={numel:,}, recommended_alpha={self.config.recommended_alpha})"
        )

    def norm(self) -> float:
        """The L2 norm of the whole vector."""
        return float(torch.sqrt(sum((t.double() ** 2).sum() for t in self.tensors.values())))

    def apply_to(self, model: PreTrainedModel | str | os.PathLike, alpha: float | None = None, **kwargs: Any):
        """Shortcut for `apply_explanation_vector(model, self, alpha=alpha, **kwargs)`."""
        return apply_explanation_vector(model, self, alpha=alpha, **kwargs)

    # ------------------------------------------------------------------ serialization
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        storage_dtype: str | torch.dtype | None = None,
        compression: VectorCompression | str | Mapping[str, Any] | None = None,
        model_card: bool = True,
        push_to_hub: bool = False,
        **push_kwargs: Any,
    ) -> CommitInfo | None:
        """Write `explanation_vector.safetensors`, `explanation_vector_config.json` and a `README.md` card.

        `storage_dtype` ("float16"/"bfloat16") halves the files; loading turns them back into float32.
        `compression` stores the tensors compactly (format version 2; see `VectorCompression`): ``"top_k:0.05"``
        keeps the 5 % largest-magnitude entries of each tensor, ``"dare:0.9"`` drops 90 % at random and rescales
        the rest, ``"low_rank:8"`` stores each matrix as a rank-8 truncated SVD. Loading rebuilds dense float32
        tensors (the compressed ones, not the original: top-k and low-rank are lossy). Without it the file is
        dense, format version 1, readable by every selfexplain version.
        With `push_to_hub=True`, the folder is then pushed to `push_kwargs["repo_id"]` (default: the folder name).

        Example:
            ```python
            >>> vec.save_pretrained("vec-small", compression="top_k:0.05", storage_dtype="float16")
            ```
        """
        save_directory = Path(save_directory)
        config = copy.deepcopy(self.config)
        if storage_dtype is not None:
            config.storage_dtype = _dtype_name(storage_dtype)
        dtype = STORAGE_DTYPES[config.storage_dtype]
        if compression is None:
            config.format_version = format_version_for(
                self.tensors, False, config.extension_input_layer, config.extension_route
            )
            config.compression = None
            config.tensors = {
                k: {"shape": list(v.shape), "dtype": config.storage_dtype}
                for k, v in sorted(self.tensors.items())
            }
            tensors = {k: v.to(dtype).contiguous() for k, v in self.tensors.items()}
        else:
            settings = VectorCompression.parse(compression)
            tensors, config.tensors = encode_tensors(self.tensors, settings, dtype)
            config.format_version = format_version_for(
                self.tensors, True, config.extension_input_layer, config.extension_route
            )
            config.compression = settings.to_dict()
        # Only now, with every setting checked and the tensors encoded: a refused save leaves no folder behind.
        save_directory.mkdir(parents=True, exist_ok=True)
        # Written into a temporary folder inside `save_directory` and renamed into place: an interrupted save never
        # leaves a half-written vector, and the temporary folder a killed one leaves is removed by the next save
        # or load (`write_files_atomically`). One metadata entry only: safetensors writes several in random
        # (hash) order, and the same vector must always give the same bytes. The format version lives in the config.
        writers = {
            VECTOR_WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            VECTOR_CONFIG_NAME: lambda p: Path(p).write_text(
                json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
            ),
        }
        if model_card:
            card = render_vector_card(config)
            writers["README.md"] = lambda p: card.save(p)
        write_files_atomically(save_directory, writers)
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", save_directory.name)
            push_kwargs.setdefault("commit_message", "Upload explanation vector")
            return publish_folder(
                save_directory,
                repo_id,
                allow_patterns=[VECTOR_WEIGHTS_NAME, VECTOR_CONFIG_NAME, "README.md"],
                **push_kwargs,
            )
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload explanation vector",
        storage_dtype: str | torch.dtype | None = None,
        create_pr: bool = False,
        compression: VectorCompression | str | Mapping[str, Any] | None = None,
    ) -> CommitInfo:
        """Save to a temporary folder and upload it in one commit. Returns the ``CommitInfo`` (a ``str``: its URL).

        `storage_dtype` and `compression` are those of `save_pretrained`.
        """
        return publish_folder(
            lambda folder: self.save_pretrained(folder, storage_dtype=storage_dtype, compression=compression),
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            allow_patterns=[VECTOR_WEIGHTS_NAME, VECTOR_CONFIG_NAME, "README.md"],
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_vector_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
    ) -> ExplanationVector:
        """Load a vector from a local folder or a Hub repo id (only safetensors and JSON are ever read)."""
        source = str(pretrained_vector_name_or_path)
        download_kwargs = {
            "revision": revision,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "token": token,
            "force_download": force_download,
        }
        config = load_vector_config(source, download_kwargs)
        weights_file = resolve_vector_weights(source, config, download_kwargs)
        vector = cls(dict(iter_vector_tensors(weights_file, config, source)), config)
        vector.source, vector.source_revision = source, revision
        return vector


# ---------------------------------------------------------------------- helpers


def _select_keys(state: Mapping[str, Any], include: Iterable[str], exclude: Iterable[str]) -> list[str]:
    include, exclude = list(include), list(exclude)
    return sorted(
        k
        for k in state
        if any(fnmatch.fnmatchcase(k, p) for p in include)
        and not any(fnmatch.fnmatchcase(k, p) for p in exclude)
    )


def _source_label(vector: ExplanationVector) -> str | None:
    """Where an input of a merge came from: folder or repo id, with ``@revision`` when one was asked for."""
    if vector.source is None:
        return vector.config.provenance.get("repo_id")
    return vector.source + (f"@{vector.source_revision}" if vector.source_revision else "")


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")
    return name
