"""What the page does, without Gradio: load a classifier and a vector once, apply the vector once per α, explain
an image before (α = 0) and after, export the patched model as a zip, and turn every failure into a sentence.

Kept apart from the Gradio layout (`ui.py`) so that it is tested without a browser and without Gradio installed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..cards import IMAGE_PROCESSOR_ATTRIBUTE
from ..cli._common import CLIError
from ..cli.explain import _heatmap, explanation_is_trained
from ..data import default_image_processor
from ..errors import ExplanationVectorError
from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification
from ..vectors import ExplanationVector, apply_explanation_vector
from ..vectors.apply import load_image_processor
from ..vectors.config import VECTOR_CONFIG_NAME
from ..vectors.io import classify_source, offline_message
from ..visualize import label_image, overlay_heatmap

logger = logging.getLogger(__name__)

# What `selfexplain demo` trains (run from the repository root): the target classifier and the MNIST vector, so
# that the page works offline, with no arguments, after the demo.
DEMO_MODEL = "outputs/demo/work/seed0/digits-prediction_only"
DEMO_VECTOR = "outputs/demo/work/seed0/mnist-vector"
EXAMPLES_DIR = Path(__file__).with_name("examples")

# An uploaded image is decoded in memory: bound the file and the pixel count before decoding, so that one
# upload cannot exhaust the server's memory (PIL's own bomb limit, ~179 MP, is far above what a page needs).
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 25_000_000
# α is a slider value: keys are rounded so that 0.5 and 0.5000000001 share one applied model.
ALPHA_DECIMALS = 4


class AppError(Exception):
    """A problem to show on the page as it is: what went wrong and what to do, never a traceback."""


def readable(err: BaseException) -> str:
    """One sentence for the page. Errors about the user's inputs keep their own message (the library writes
    them for users); anything else is named by its type, and its traceback goes to the server's log only."""
    if isinstance(err, (AppError, CLIError)):
        return str(err)
    if isinstance(err, ExplanationVectorError):
        return f"{type(err).__name__}: {err}"
    if isinstance(err, (OSError, ValueError)):
        return f"{type(err).__name__}: {err}"
    logger.error("Unexpected error in the selfexplain page", exc_info=err)
    return (
        f"Unexpected error ({type(err).__name__}: {err}). The server keeps running; see its log for details."
    )


class LRUCache:
    """A small least-recently-used cache whose `hits` and `misses` say how often `factory` really ran.

    `get_or_create` holds the cache's lock while it builds a missing value: two requests for the same key
    build it once (loading a model twice in parallel would only waste memory). A failed `factory` caches
    nothing, so a corrected input is tried again.
    """

    def __init__(self, maxsize: int, on_evict: Callable[[Any], None] | None = None):
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}.")
        self.maxsize = maxsize
        self.on_evict = on_evict
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.RLock()

    def get_or_create(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self.hits += 1
                self._data.move_to_end(key)
                return self._data[key]
            self.misses += 1
            value = factory()
            self._data[key] = value
            while len(self._data) > self.maxsize:
                _, evicted = self._data.popitem(last=False)
                if self.on_evict is not None:
                    self.on_evict(evicted)
            return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


@dataclass(frozen=True)
class Loaded:
    """What the page shows once a classifier and a vector are loaded."""

    recommended_alpha: float
    labels: tuple[str, ...]
    grid: tuple[int, int]
    message: str


@dataclass(frozen=True)
class Explanation:
    """One image explained before (α = 0, the classifier as it is) and after applying the vector at `alpha`."""

    image: Image.Image
    before_scores: dict[str, float]
    after_scores: dict[str, float]
    before_overlay: Image.Image
    after_overlay: Image.Image
    alpha: float
    message: str


def open_image(path: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS):
    """An uploaded file as an RGB image, or an `AppError` that says why not (not an image, too large)."""
    path = Path(path)
    name = path.name
    if path.is_dir():
        raise AppError(f"{name} is a folder, not an image file.")
    if not path.is_file():
        raise AppError(f"{name}: no such file (upload it again).")
    size = path.stat().st_size
    if size > max_bytes:
        raise AppError(
            f"{name} is {size / 2**20:.1f} MB; the page takes images up to {max_bytes / 2**20:.0f} MB. "
            "Resize it first: the model sees it at its own input size anyway."
        )
    try:
        with Image.open(path) as img:
            # The header alone gives the size: refuse before any pixel is decoded.
            width, height = img.size
            if width * height > max_pixels:
                raise AppError(
                    f"{name} is {width}×{height} pixels ({width * height / 1e6:.0f} MP); the page takes images "
                    f"up to {max_pixels / 1e6:.0f} MP. Resize it first: the model sees it at its own input "
                    "size anyway."
                )
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return img.convert("RGB")
    except AppError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL refuses by itself, at opening, images beyond twice its own limit.
        raise AppError(
            f"{name} is too large to decode safely ({err}); the page takes images up to "
            f"{max_pixels / 1e6:.0f} MP. Resize it first."
        ) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise AppError(
            f"{name} is not an image this page can read (PNG, JPEG, WebP, BMP, GIF, TIFF ...): {err}"
        ) from err


def example_images() -> list[Path]:
    """Small images of the built-in domains (32×32, shipped with the package), for the page's examples."""
    return sorted(EXAMPLES_DIR.glob("*.png"))


def default_sources(root: str | os.PathLike = ".") -> tuple[str | None, str | None]:
    """The demo's classifier and vector under `root`, each `None` when `selfexplain demo` has not made it."""
    root = Path(root)
    model = root / DEMO_MODEL
    vector = root / DEMO_VECTOR
    return (
        str(model) if (model / "config.json").is_file() else None,
        str(vector) if (vector / VECTOR_CONFIG_NAME).is_file() else None,
    )


def _source_key(source: str | None, what: str) -> str:
    """The cache key of a classifier or vector: a folder by its real path (``./x`` and ``x`` are one), a Hub id
    as written."""
    source = (source or "").strip()
    if not source:
        raise AppError(f"Enter {what}: a Hub id (org/name) or a local folder.")
    return os.path.realpath(source) if os.path.isdir(source) else source


def _alpha_key(alpha: float | None) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError) as err:
        raise AppError(f"α must be a number, got {alpha!r}.") from err
    if not math.isfinite(alpha):
        raise AppError(f"α must be a finite number, got {alpha!r}.")
    return round(alpha, ALPHA_DECIMALS)


class ExplanationService:
    """Loaded classifiers, vectors and patched models, each cached, shared by every request of one server.

    A request never reloads a model: classifiers are cached by source (`models`), vectors by source
    (`vectors`), and the vector is applied once per (classifier, vector, α) (`patched`); each cache is a small
    LRU, since every entry of `models` and `patched` is a whole model in memory.
    """

    def __init__(
        self,
        *,
        max_models: int = 2,
        max_vectors: int = 4,
        max_patched: int = 4,
        top_k: int = 5,
        max_bytes: int = MAX_FILE_BYTES,
        max_pixels: int = MAX_PIXELS,
        work_dir: str | os.PathLike | None = None,
    ):
        self.models = LRUCache(max_models)
        self.vectors = LRUCache(max_vectors)
        self.patched = LRUCache(max_patched)
        # A long-running server would otherwise fill its disk with zips: an evicted one is deleted.
        self.zips = LRUCache(
            max_patched, on_evict=lambda path: shutil.rmtree(path.parent, ignore_errors=True)
        )
        self.top_k = top_k
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        # Zips of patched models are written here; the server lets the browser download files from it only.
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="selfexplain-app-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ loading (cached)
    def model(self, source: str) -> ViTForSelfExplainingClassification:
        """The classifier named by `source`, loaded once, with its image processor attached."""
        key = _source_key(source, "a classifier")
        return self.models.get_or_create(key, lambda: self._load_model(key))

    def vector(self, source: str) -> ExplanationVector:
        key = _source_key(source, "an explanation vector")
        return self.vectors.get_or_create(key, lambda: self._load_vector(key))

    def patched_model(self, model: str, vector: str, alpha: float) -> ViTForSelfExplainingClassification:
        """θ + α·τ, applied once per (classifier, vector, α); α = 0 is the classifier itself (exactly)."""
        model_key = _source_key(model, "a classifier")
        vector_key = _source_key(vector, "an explanation vector")
        alpha = _alpha_key(alpha)
        return self.patched.get_or_create(
            (model_key, vector_key, alpha), lambda: self._apply(model_key, vector_key, alpha)
        )

    def _load_model(self, source: str) -> ViTForSelfExplainingClassification:
        found = classify_source(source)
        if found.offline_miss:
            raise AppError(offline_message(source))
        if found.kind == "missing":
            raise AppError(f"Classifier {source}: no such folder, and not a Hub id (org/name).")
        if found.kind == "vector":
            raise AppError(
                f"{source} is an explanation vector, not a classifier: enter it under “Explanation vector”, "
                "and a ViT classifier (a folder with config.json, or a Hub id) under “Classifier”."
            )
        if found.kind in ("dataset", "file", "folder"):
            raise AppError(
                f"Classifier {source} is {found.description}, not a model: pass the folder that holds "
                f"config.json and the weights (it contains: {', '.join(found.contents[:8]) or 'nothing'})."
            )
        # Never remote code: the model class is ours, and transformers is not asked to run the repo's code.
        model = ViTForSelfExplainingClassification.from_pretrained(source).eval()
        processor = load_image_processor(source)
        if processor is None:
            size = model.config.image_size
            processor = default_image_processor(size if isinstance(size, int) else size[0])
        # `apply_explanation_vector` carries this attribute to the patched model, whose `save_pretrained` then
        # writes the processor too: the downloaded folder runs in `pipeline("image-classification")`.
        setattr(model, IMAGE_PROCESSOR_ATTRIBUTE, processor)
        # Read from the raw config once here, not per request (for a Hub id that would ask the Hub each time).
        model._selfexplain_app_trained = _explanation_is_trained(source)
        return model

    def _load_vector(self, source: str) -> ExplanationVector:
        found = classify_source(source)
        if found.offline_miss:
            raise AppError(offline_message(source))
        if found.kind == "missing":
            raise AppError(f"Explanation vector {source}: no such folder, and not a Hub id (org/name).")
        if found.kind == "model":
            raise AppError(
                f"{source} is a model, not an explanation vector: enter it under “Classifier”. A vector is "
                "made from two models with `selfexplain extract-vector`."
            )
        return ExplanationVector.from_pretrained(source)

    def _apply(self, model: str, vector: str, alpha: float) -> ViTForSelfExplainingClassification:
        base = self.model(model)
        if alpha == 0:
            return base
        loaded = self.vector(vector)
        patched = apply_explanation_vector(base, loaded, alpha).eval()
        # Applied from memory, the provenance has no vector source; name it, for the model card of the zip.
        patched.config.selfexplain_applied_vector = {
            **(patched.config.selfexplain_applied_vector or {}),
            "vector": vector,
        }
        return patched

    # ------------------------------------------------------------------ what the page calls
    def load(self, model: str, vector: str) -> Loaded:
        """Load both and apply the vector at its recommended α, so that a wrong pair is reported at once."""
        base = self.model(model)
        loaded = self.vector(vector)
        alpha = loaded.recommended_alpha
        self.patched_model(model, vector, alpha)
        config = base.config
        labels = tuple(config.id2label[i] for i in sorted(config.id2label))
        image = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        grid = (image // config.patch_size, image // config.patch_size)
        trained = base._selfexplain_app_trained
        note = (
            ""
            if not trained
            else " The classifier already explains itself (trained with an explanation loss, or patched)."
        )
        message = f"Loaded: {len(labels)} classes, {grid[0]}×{grid[1]} patches; vector recommends α = {alpha:g}.{note}"
        return Loaded(alpha, labels, grid, message)

    def explain(self, model: str, vector: str, image: str | os.PathLike, alpha: float) -> Explanation:
        """Top-k scores and signed heatmap overlays of `image` before (α = 0) and after (α) the vector."""
        picture = open_image(image, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
        alpha = _alpha_key(alpha)
        before = self.patched_model(model, vector, 0.0)
        after = self.patched_model(model, vector, alpha)
        before_scores, before_overlay = self._explain_one(before, picture)
        after_scores, after_overlay = self._explain_one(after, picture)
        trained = before._selfexplain_app_trained
        message = (
            f"Explained at α = {alpha:g}. Red: patches that speak for the predicted class, blue: against."
        )
        if not trained:
            message += (
                " Before (α = 0) the classifier is prediction-only: its map comes from a head never trained to "
                "explain, and means nothing."
            )
        return Explanation(
            picture, before_scores, after_scores, before_overlay, after_overlay, alpha, message
        )

    def _explain_one(self, model: ViTForSelfExplainingClassification, image: Image.Image):
        processor = getattr(model, IMAGE_PROCESSOR_ATTRIBUTE)
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = model(pixel_values)
        probabilities = torch.softmax(out.logits[0].float(), -1)
        k = min(self.top_k, probabilities.numel())
        top = torch.topk(probabilities, k)
        labels = model.config.id2label
        scores = {
            labels.get(int(i), str(int(i))): float(p) for p, i in zip(top.values, top.indices, strict=True)
        }
        cls = int(out.explained_classes[0])
        heat = _heatmap(out.explanation[0], image, processor)
        overlay = overlay_heatmap(image, heat, signed=True)
        caption = f"{labels.get(cls, str(cls))} {float(probabilities[cls]):.1%}"
        return scores, label_image(overlay, [caption])

    def export_zip(self, model: str, vector: str, alpha: float) -> Path:
        """The patched model's folder (weights, config, image processor, model card) as a zip, made once per
        (classifier, vector, α)."""
        model_key = _source_key(model, "a classifier")
        vector_key = _source_key(vector, "an explanation vector")
        alpha = _alpha_key(alpha)
        if alpha == 0:
            raise AppError("At α = 0 the classifier is unchanged: move the α slider before downloading.")
        key = (model_key, vector_key, alpha)
        return self.zips.get_or_create(key, lambda: self._write_zip(model_key, vector_key, alpha))

    def _write_zip(self, model: str, vector: str, alpha: float) -> Path:
        patched = self.patched_model(model, vector, alpha)
        name = f"{_safe_name(model)}-explaining-alpha{alpha:g}"
        folder = Path(tempfile.mkdtemp(prefix="zip-", dir=self.work_dir))
        try:
            patched.save_pretrained(folder / name)
            archive = folder / f"{name}.zip"
            with zipfile.ZipFile(archive, "w") as zf:
                for file in sorted((folder / name).rglob("*")):
                    if file.is_file():
                        # Weights hardly compress; storing them saves seconds on a large model.
                        kind = zipfile.ZIP_STORED if file.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                        zf.write(file, file.relative_to(folder), compress_type=kind)
            shutil.rmtree(folder / name)
            return archive
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise


def _safe_name(source: str) -> str:
    tail = Path(source.rstrip("/")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in tail)


def _explanation_is_trained(source: str) -> bool:
    try:
        return explanation_is_trained(source)
    except (OSError, ValueError):  # the config was readable when the model loaded; a later glitch is no error
        return False


__all__ = [
    "DEMO_MODEL",
    "DEMO_VECTOR",
    "AppError",
    "Explanation",
    "ExplanationService",
    "LRUCache",
    "Loaded",
    "default_sources",
    "example_images",
    "open_image",
    "readable",
]
