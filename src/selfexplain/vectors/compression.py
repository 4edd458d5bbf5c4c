"""Compact storage of explanation vectors: sparse (top-k or DARE drop-and-rescale) and low-rank tensors.

A compressed vector is still one safetensors file and one JSON config (format version 2, docs/design.md §8):

- the config's ``tensors`` keeps every tensor's *dense* shape (so every size check and `apply_explanation_vector`
  work unchanged) and says how it is encoded: ``"encoding": "dense"`` (the default, stored under its own name),
  ``"sparse"`` (``nnz`` entries: ``<key>::indices``, flat row-major positions in increasing order, int16/32/64,
  and ``<key>::values``) or ``"low_rank"`` (``rank`` r: ``<key>::low_rank_a`` of shape (m, r) and
  ``<key>::low_rank_b`` of shape (r, n), the tensor being their product);
- the config's ``compression`` records the setting that produced the file (:class:`VectorCompression`).

Loading reconstructs dense float32 tensors one at a time, after checking every stored tensor's shape and dtype
against the config (header) and every index range and value (data) before the dense tensor is built.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidExplanationVectorError
from .checks import _INDEX_DTYPES, _SAFETENSORS_DTYPES, all_finite

#: Separator between a tensor's key and the part of its encoding a stored tensor holds (``::`` never occurs in
#: serialized checkpoint names, so a stored name can never collide with a dense tensor's).
PART_SEPARATOR = "::"
SPARSE_PARTS = ("indices", "values")
LOW_RANK_PARTS = ("low_rank_a", "low_rank_b")
SPARSITY_METHODS = ("top_k", "dare")
_ALIASES = {"topk": "top_k", "top-k": "top_k", "top_k": "top_k", "dare": "dare", "lowrank": "low_rank",
            "low-rank": "low_rank", "low_rank": "low_rank"}  # fmt: skip
_TORCH_INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


@dataclass(frozen=True)
class VectorCompression:
    """How `ExplanationVector.save_pretrained(..., compression=...)` stores a vector compactly.

    Attributes:
        sparsity: ``"top_k"`` keeps the ``density`` fraction of each tensor's entries with the largest magnitude
            (exact: the loaded entries equal the kept ones); ``"dare"`` keeps each entry with probability
            ``density`` and rescales the kept ones by ``1 / density``, so that the expected tensor is the original
            (DARE, Yu et al., *Language Models are Super Mario*, arXiv:2311.03099; drop rate p = 1 − density).
            ``None``: no sparsification.
        density: the fraction of entries kept per tensor (top-k keeps ``round(density · numel)``, at least 1).
        rank: store each 2-D matrix as a rank-``rank`` truncated SVD ``A @ B`` (the best rank-r approximation in
            Frobenius norm, Eckart–Young). A matrix is stored dense instead when ``rank · (m + n) ≥ m · n``: that
            is no larger and exact. With ``sparsity`` too, the matrices are low-rank and the other tensors
            (biases, LayerNorm, embeddings that are not matrices) are sparsified.
        seed: the DARE mask's seed (each tensor's mask depends on the seed and its key only).

    Strings are accepted wherever a `VectorCompression` is: ``"top_k:0.1"``, ``"dare:0.9"`` (the *drop rate*
    p, as in the DARE paper), ``"low_rank:8"``, and combinations joined by ``+`` (``"low_rank:8+top_k:0.1"``).

    Example:
        ```python
        >>> from selfexplain import ExplanationVector, VectorCompression
        >>> vec.save_pretrained("vec-top5", compression="top_k:0.05")         # 5 % of the entries, ~8x smaller
        >>> vec.save_pretrained("vec-r8", compression=VectorCompression(rank=8))
        >>> vec.save_pretrained("vec-dare", compression=VectorCompression.dare(drop_rate=0.9, seed=0))
        >>> ExplanationVector.from_pretrained("vec-top5")                     # dense float32 tensors again
        ```
    """

    sparsity: str | None = None
    density: float | None = None
    rank: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sparsity is not None and self.sparsity not in SPARSITY_METHODS:
            raise ValueError(f"sparsity must be one of {SPARSITY_METHODS} or None, got {self.sparsity!r}.")
        if self.sparsity is None and self.density is not None:
            raise ValueError("density is given but no sparsity method ('top_k' or 'dare').")
        if self.sparsity is not None:
            if not _is_number(self.density) or not 0.0 < float(self.density) <= 1.0:
                raise ValueError(f"density must be a number in (0, 1], got {self.density!r}.")
            object.__setattr__(self, "density", float(self.density))
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {self.rank!r}.")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer below 2**63, got {self.seed!r}.")
        if self.sparsity is None and self.rank is None:
            raise ValueError("A VectorCompression needs a sparsity method, a rank, or both.")

    # ------------------------------------------------------------------ construction
    @classmethod
    def top_k(cls, density: float) -> VectorCompression:
        """Keep the ``density`` fraction of each tensor's entries with the largest magnitude."""
        return cls(sparsity="top_k", density=density)

    @classmethod
    def dare(cls, drop_rate: float, seed: int = 0) -> VectorCompression:
        """Drop each entry with probability ``drop_rate`` and rescale the rest by ``1 / (1 - drop_rate)``."""
        if not _is_number(drop_rate) or not 0.0 <= float(drop_rate) < 1.0:
            raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}.")
        return cls(sparsity="dare", density=1.0 - float(drop_rate), seed=seed)

    @classmethod
    def low_rank(cls, rank: int) -> VectorCompression:
        """Store every 2-D matrix as a rank-``rank`` truncated SVD (other tensors dense)."""
        return cls(rank=rank)

    @classmethod
    def parse(cls, spec: VectorCompression | str | Mapping[str, Any]) -> VectorCompression:
        """A `VectorCompression` from itself, a string (``"top_k:0.1+low_rank:8"``) or its `to_dict` form."""
        if isinstance(spec, VectorCompression):
            return spec
        if isinstance(spec, Mapping):
            return cls(**dict(spec))
        if not isinstance(spec, str):
            raise TypeError(
                f"compression must be a VectorCompression, a str or a dict, got {type(spec).__name__}."
            )
        fields: dict[str, Any] = {}
        for part in spec.replace(" ", "").split("+"):
            name, _, value = part.partition(":")
            method = _ALIASES.get(name.lower())
            try:
                if method == "low_rank" and "rank" not in fields:
                    fields["rank"] = int(value)
                elif method == "top_k" and "sparsity" not in fields:
                    fields.update(sparsity="top_k", density=float(value))
                elif method == "dare" and "sparsity" not in fields:
                    seed_text = value.partition("@")[2]  # "dare:0.9@3": drop rate 0.9, seed 3
                    drop = float(value.partition("@")[0])
                    fields.update(sparsity="dare", density=1.0 - drop, seed=int(seed_text or 0))
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"Cannot read compression {spec!r}: expected 'top_k:DENSITY', 'dare:DROP_RATE[@SEED]', "
                    "'low_rank:RANK', or a low-rank and a sparse part joined by '+'."
                ) from None
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form recorded as ``compression`` in the vector config."""
        return {"sparsity": self.sparsity, "density": self.density, "rank": self.rank, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> VectorCompression:
        """Read the config's ``compression`` record (untrusted): every field's type and range is checked."""
        if not isinstance(data, Mapping) or set(data) - {"sparsity", "density", "rank", "seed"}:
            raise InvalidExplanationVectorError(
                f"{source}: `compression` must be an object with sparsity, density, rank and seed, got {data!r:.120}."
            )
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as err:
            raise InvalidExplanationVectorError(f"{source}: `compression` is invalid: {err}") from err

    def describe(self) -> str:
        """One line for model cards and tables, e.g. ``"top-k (density 0.05)"``."""
        parts = []
        if self.rank is not None:
            parts.append(f"low-rank (rank {self.rank} per matrix)")
        if self.sparsity == "top_k":
            parts.append(f"top-k magnitude (density {self.density:g})")
        elif self.sparsity == "dare":
            parts.append(f"DARE drop-and-rescale (drop rate {1 - self.density:g}, seed {self.seed})")
        return " + ".join(parts)


# ---------------------------------------------------------------------------------------------- the math


def keep_count(density: float, numel: int) -> int:
    """How many entries top-k keeps: ``round(density · numel)``, at least one of a non-empty tensor.

    PEFT's ``magnitude_based_pruning`` truncates (``int(density · numel)``); rounding is used here because
    truncation turns 0.29 · 100 into 28 through float error, and at least one entry is kept so that a small
    tensor (a 64-entry LayerNorm at density 0.01) is never dropped entirely.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, round(density * numel)))


def top_k_indices(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Flat indices (increasing) of the ``keep_count`` largest-magnitude entries; ties go to the lower index.

    A stable sort, not `torch.topk`, so that the same vector always keeps the same entries (and the same bytes).
    """
    flat = tensor.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    return order[: keep_count(density, flat.numel())].sort().values


def top_k(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """The tensor with all but its top-k magnitudes set to zero (the "trim" step of TIES-merging)."""
    flat = tensor.reshape(-1)
    out = torch.zeros_like(flat)
    kept = top_k_indices(tensor, density)
    out[kept] = flat[kept]
    return out.reshape(tensor.shape)


def seeded_generator(seed: int, *labels: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``labels`` (e.g. an input's position and a tensor's key).

    The seed is a hash of the labels, not a counter, so each tensor's random draw depends on its key alone and
    not on how many tensors were drawn before it, in this process or any other.
    """
    digest = hashlib.sha256(repr((seed, *labels)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare_mask(
    shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator
) -> torch.Tensor:
    """Bernoulli(``density``) keep mask: each entry kept independently with probability ``density``."""
    return torch.rand(shape, generator=generator) < density


def dare(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 − density`` and rescale the rest by ``1 / density``.

    Unbiased: E[dare(τ)] = τ (Yu et al., arXiv:2311.03099, as PEFT's ``random_pruning(rescale=True)``).
    """
    if density >= 1.0:
        return tensor.clone()
    return torch.where(
        dare_mask(tensor.shape, density, generator), tensor / density, torch.zeros_like(tensor)
    )


def low_rank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``A @ B`` the best rank-``rank`` approximation of ``matrix`` (truncated SVD).

    Computed in float64. The singular values are split evenly (A = U·√S, B = √S·Vᵀ) so that both factors
    have the same scale, which keeps float16 storage of either factor within range.
    """
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(torch.float32), (root[:, None] * vh[:rank]).to(torch.float32)


def _uses_low_rank(shape: tuple[int, ...] | list[int], rank: int | None) -> bool:
    return rank is not None and len(shape) == 2 and rank * (shape[0] + shape[1]) < shape[0] * shape[1]


def index_dtype_for(numel: int) -> str:
    """The smallest signed integer type that holds every flat index of a tensor with ``numel`` entries."""
    for name, dtype in _TORCH_INDEX_DTYPES.items():
        if numel - 1 <= torch.iinfo(dtype).max:
            return name
    raise ValueError(f"A tensor with {numel} entries cannot be indexed by int64.")  # pragma: no cover


def encode_tensors(
    tensors: Mapping[str, torch.Tensor], compression: VectorCompression, storage: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """What a compressed file stores: ``({stored name: tensor}, {key: config spec})`` for every key.

    Values and factors are cast to ``storage`` (the vector's storage dtype); indices keep their integer type.
    """
    dtype_name = next(name for name, dt in _TORCH_DTYPES.items() if dt == storage)
    stored: dict[str, torch.Tensor] = {}
    specs: dict[str, dict[str, Any]] = {}
    for key in sorted(tensors):
        tensor = tensors[key].to(torch.float32)
        spec: dict[str, Any] = {"shape": list(tensor.shape), "dtype": dtype_name}
        if _uses_low_rank(tuple(tensor.shape), compression.rank):
            a, b = low_rank_factors(tensor, compression.rank)
            spec.update(encoding="low_rank", rank=compression.rank)
            stored[part_name(key, "low_rank_a")] = a.to(storage).contiguous()
            stored[part_name(key, "low_rank_b")] = b.to(storage).contiguous()
        elif compression.sparsity is not None:
            flat = tensor.reshape(-1)
            if compression.sparsity == "top_k":
                indices, values = _top_k_entries(flat, compression.density)
            else:
                keep = dare_mask(flat.shape, compression.density, seeded_generator(compression.seed, key))
                indices = keep.nonzero().reshape(-1)
                values = flat[indices] / compression.density
            index_dtype = index_dtype_for(flat.numel())
            spec.update(encoding="sparse", nnz=int(indices.numel()), index_dtype=index_dtype)
            stored[part_name(key, "indices")] = indices.to(_TORCH_INDEX_DTYPES[index_dtype]).contiguous()
            stored[part_name(key, "values")] = values.to(storage).contiguous()
        else:
            stored[key] = tensor.to(storage).contiguous()
        specs[key] = spec
    return stored, specs


def _top_k_entries(flat: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    indices = top_k_indices(flat, density)
    return indices, flat[indices]


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- the layout


def part_name(key: str, part: str) -> str:
    """The stored name of one part of an encoded tensor, e.g. ``"vit.x.weight::indices"``."""
    return f"{key}{PART_SEPARATOR}{part}"


def stored_layout(
    tensors: Mapping[str, Mapping[str, Any]], storage_dtype: str
) -> dict[str, tuple[list[int], str]]:
    """Every tensor a file with these (checked) config specs must hold: ``{stored name: (shape, safetensors dtype)}``.

    Derived from the config alone, so the safetensors header can be checked against it before any data is read.
    """
    layout: dict[str, tuple[list[int], str]] = {}
    for key, spec in tensors.items():
        value_dtype = _SAFETENSORS_DTYPES[spec.get("dtype", storage_dtype)]
        encoding = spec.get("encoding", "dense")
        shape = list(spec["shape"])
        if encoding == "sparse":
            layout[part_name(key, "indices")] = ([spec["nnz"]], _INDEX_DTYPES[spec["index_dtype"]])
            layout[part_name(key, "values")] = ([spec["nnz"]], value_dtype)
        elif encoding == "low_rank":
            layout[part_name(key, "low_rank_a")] = ([shape[0], spec["rank"]], value_dtype)
            layout[part_name(key, "low_rank_b")] = ([spec["rank"], shape[1]], value_dtype)
        else:
            layout[key] = (shape, value_dtype)
    return layout


def decode_tensor(
    key: str, spec: Mapping[str, Any], read: Callable[[str], torch.Tensor], where: str
) -> torch.Tensor:
    """The dense float32 tensor of ``key``, rebuilt from its stored parts (``read(stored name)``).

    The parts' shapes and dtypes were checked against the header; here their *data* is checked before the
    dense tensor is allocated: indices in ``[0, numel)`` and strictly increasing (no entry written twice),
    values and factors finite.
    """
    encoding = spec.get("encoding", "dense")
    shape = list(spec["shape"])
    if encoding == "dense":
        return read(key).to(torch.float32)
    if encoding == "sparse":
        indices = read(part_name(key, "indices"))
        values = read(part_name(key, "values"))
        numel = math.prod(shape)
        if indices.dim() != 1 or values.shape != indices.shape or indices.numel() != spec["nnz"]:
            raise InvalidExplanationVectorError(
                f"{where}: tensor {key!r}: {indices.numel()} indices and {values.numel()} values, the config "
                f"declares {spec['nnz']}."
            )
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise InvalidExplanationVectorError(f"{where}: tensor {key!r}: indices must be integers.")
        indices = indices.to(torch.int64)
        if indices.numel():
            if int(indices.min()) < 0 or int(indices.max()) >= numel:
                raise InvalidExplanationVectorError(
                    f"{where}: tensor {key!r}: indices must lie in [0, {numel}) for shape {shape}, "
                    f"got [{int(indices.min())}, {int(indices.max())}]."
                )
            if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
                raise InvalidExplanationVectorError(
                    f"{where}: tensor {key!r}: indices must be strictly increasing (no entry stored twice)."
                )
        if not all_finite(values):
            raise InvalidExplanationVectorError(f"{where}: tensor {key!r} contains NaN or Inf values.")
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[indices] = values.to(torch.float32)
        return dense.reshape(shape)
    if encoding == "low_rank":
        a = read(part_name(key, "low_rank_a"))
        b = read(part_name(key, "low_rank_b"))
        rank = spec["rank"]
        if list(a.shape) != [shape[0], rank] or list(b.shape) != [rank, shape[1]]:
            raise InvalidExplanationVectorError(
                f"{where}: tensor {key!r}: low-rank factors of shapes {list(a.shape)} and {list(b.shape)}, "
                f"expected {[shape[0], rank]} and {[rank, shape[1]]}."
            )
        if not (all_finite(a) and all_finite(b)):
            raise InvalidExplanationVectorError(f"{where}: tensor {key!r} contains NaN or Inf values.")
        return a.to(torch.float32) @ b.to(torch.float32)
    raise InvalidExplanationVectorError(f"{where}: tensor {key!r} has unknown encoding {encoding!r:.40}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
