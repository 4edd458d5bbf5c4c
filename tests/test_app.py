"""The interactive page's logic without a browser: caching, the patched model and its zip, readable errors."""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from selfexplain import ExplanationVector, ViTForSelfExplainingClassification, apply_explanation_vector
from selfexplain.app.core import (
    AppError,
    ExplanationService,
    LRUCache,
    default_sources,
    example_images,
    open_image,
    readable,
)
from selfexplain.cli import main
from selfexplain.data import default_image_processor
from tests._tiny import tiny_classifier, tiny_self_explaining

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = {0: "circle", 1: "square", 2: "triangle"}


def build_models(root: Path, *, with_processor: bool = True) -> dict[str, str]:
    """A tiny labelled classifier, a vector for it (recommended α 0.5), a vector for another architecture."""
    classifier = root / "classifier"
    tiny_classifier(seed=1, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}).save_pretrained(
        classifier
    )
    if with_processor:
        default_image_processor(16).save_pretrained(classifier)
    ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=2),
        prediction_only=tiny_classifier(seed=3),
        base_model="tiny",
        recommended_alpha=0.5,
    ).save_pretrained(root / "vector")
    ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=2, hidden_size=48),
        prediction_only=tiny_classifier(seed=3, hidden_size=48),
        base_model="tiny-wide",
    ).save_pretrained(root / "wrong-vector")
    return {
        "model": str(classifier),
        "vector": str(root / "vector"),
        "wrong_vector": str(root / "wrong-vector"),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("app-models"))


@pytest.fixture()
def image(tmp_path) -> str:
    path = tmp_path / "digit.png"
    Image.open(example_images()[0]).save(path)
    return str(path)


def test_vector_is_applied_once_per_alpha_and_models_are_not_reloaded(models, image, tmp_path):
    service = ExplanationService(work_dir=tmp_path / "work")
    first = service.explain(models["model"], models["vector"], image, 0.5)
    # α = 0 is the loaded classifier itself; α = 0.5 one application of the vector.
    assert (service.models.misses, service.vectors.misses, service.patched.misses) == (1, 1, 2)
    patched = service.patched_model(models["model"], models["vector"], 0.5)
    second = service.explain(models["model"], models["vector"], image, 0.5)
    # The same (model, vector, α), with the folder named another way and α a float away: nothing is redone.
    assert service.patched_model(models["model"] + "/", models["vector"], 0.5 + 1e-9) is patched
    assert (service.models.misses, service.vectors.misses, service.patched.misses) == (1, 1, 2)
    assert second.after_scores == first.after_scores
    service.explain(models["model"], models["vector"], image, 1.0)
    assert (service.models.misses, service.patched.misses) == (1, 3)
    assert service.patched_model(models["model"], models["vector"], 0.0) is service.model(models["model"])


def test_patched_model_is_the_librarys_apply_and_changes_the_map(models, image, tmp_path):
    service = ExplanationService(work_dir=tmp_path / "work")
    result = service.explain(models["model"], models["vector"], image, 0.5)
    reference = apply_explanation_vector(models["model"], models["vector"], alpha=0.5).eval()
    patched = service.patched_model(models["model"], models["vector"], 0.5)
    pixel_values = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = reference(pixel_values), patched(pixel_values)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.explanation, expected.explanation)
    assert set(result.after_scores) == set(LABELS.values())
    assert abs(sum(result.before_scores.values()) - 1) < 1e-5
    # Small images are enlarged for the page; the map differs once the vector is applied.
    assert result.before_overlay.size == result.after_overlay.size == (224, 224)
    assert result.before_overlay.tobytes() != result.after_overlay.tobytes()
    assert "prediction-only" in result.message


def test_recommended_alpha_and_labels_on_load(models, tmp_path):
    loaded = ExplanationService(work_dir=tmp_path / "work").load(models["model"], models["vector"])
    assert loaded.recommended_alpha == 0.5
    assert loaded.labels == ("circle", "square", "triangle")
    assert loaded.grid == (4, 4)
    assert "α = 0.5" in loaded.message


def test_zip_holds_a_loadable_patched_model(models, tmp_path):
    service = ExplanationService(work_dir=tmp_path / "work")
    archive = service.export_zip(models["model"], models["vector"], 0.5)
    assert service.export_zip(models["model"], models["vector"], 0.5) == archive  # made once
    assert archive.parent.parent == tmp_path / "work"
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "unzipped")
    folder = tmp_path / "unzipped" / "classifier-explaining-alpha0.5"
    assert {
        f"{folder.name}/{n}" for n in ("config.json", "model.safetensors", "preprocessor_config.json")
    } <= names
    reloaded = ViTForSelfExplainingClassification.from_pretrained(folder).eval()
    pixel_values = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(
            reloaded(pixel_values).logits,
            service.patched_model(models["model"], models["vector"], 0.5)(pixel_values).logits,
        )
    assert reloaded.config.selfexplain_applied_vector["alpha"] == 0.5
    assert reloaded.config.selfexplain_applied_vector["vector"].endswith("vector")
    with pytest.raises(AppError, match="α = 0"):
        service.export_zip(models["model"], models["vector"], 0)
    # Zips beyond the cache's size are deleted from the disk, oldest first.
    for alpha in (0.6, 0.7, 0.8, 0.9):
        assert service.export_zip(models["model"], models["vector"], alpha).is_file()
    assert not archive.exists()


def test_classifier_without_processor_gets_the_default_one(tmp_path, image):
    paths = build_models(tmp_path / "m", with_processor=False)
    result = ExplanationService(work_dir=tmp_path / "work").explain(
        paths["model"], paths["vector"], image, 0.5
    )
    assert set(result.after_scores) == set(LABELS.values())


def _readable_failure(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    message = readable(info.value)
    assert "Traceback" not in message and 'File "' not in message
    return message


def test_errors_become_readable_messages_and_the_service_keeps_working(models, image, tmp_path):
    service = ExplanationService(work_dir=tmp_path / "work")
    wrong = _readable_failure(lambda: service.load(models["model"], models["wrong_vector"]))
    assert "IncompatibleExplanationVectorError" in wrong and "hidden_size: vector 48, model 32" in wrong
    swapped = _readable_failure(lambda: service.load(models["vector"], models["model"]))
    assert "is an explanation vector, not a classifier" in swapped
    as_vector = _readable_failure(lambda: service.load(models["model"], models["model"]))
    assert "is a model, not an explanation vector" in as_vector
    missing = _readable_failure(lambda: service.load(str(tmp_path / "nothing"), models["vector"]))
    assert "no such folder" in missing
    assert "Enter a classifier" in _readable_failure(lambda: service.load("  ", models["vector"]))

    text = tmp_path / "notes.png"
    text.write_text("not pixels")
    assert "notes.png is not an image" in _readable_failure(
        lambda: service.explain(models["model"], models["vector"], text, 0.5)
    )
    assert "finite" in _readable_failure(
        lambda: service.explain(models["model"], models["vector"], image, float("nan"))
    )
    # The failures cached nothing broken: the right pair still works on the same service.
    result = service.explain(models["model"], models["vector"], image, 0.5)
    assert set(result.after_scores) == set(LABELS.values())
    # An unexpected error is named, without its traceback.
    assert readable(RuntimeError("boom")).startswith("Unexpected error (RuntimeError: boom)")


def _png_claiming_size(path: Path, width: int, height: int) -> None:
    """A valid 1×1 PNG whose header claims `width`×`height`: what a decompression bomb looks like to a reader
    that checks the header before decoding (the pixels are never reached)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_huge_images_are_refused_before_decoding(tmp_path):
    large = tmp_path / "large.png"
    _png_claiming_size(large, 6_000, 6_000)
    with pytest.raises(AppError, match=r"large.png is 6000×6000 pixels \(36 MP\).*up to 25 MP"):
        open_image(large)
    huge = tmp_path / "huge.png"
    _png_claiming_size(huge, 20_000, 20_000)  # beyond PIL's own limit: PIL refuses it at opening
    with pytest.raises(AppError, match=r"huge.png is too large to decode safely.*up to 25 MP"):
        open_image(huge)
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    with pytest.raises(AppError, match="up to 0 MB"):
        open_image(big, max_bytes=10)
    assert open_image(big).size == (64, 64)
    with pytest.raises(AppError, match="a folder, not an image file"):
        open_image(tmp_path)


def test_lru_cache_evicts_the_least_recently_used_and_caches_no_failure():
    cache = LRUCache(2)
    built = []

    def make(key):
        built.append(key)
        return key.upper()

    assert cache.get_or_create("a", lambda: make("a")) == "A"
    cache.get_or_create("b", lambda: make("b"))
    cache.get_or_create("a", lambda: make("a"))  # a is now the most recent
    cache.get_or_create("c", lambda: make("c"))  # evicts b
    assert "b" not in cache and "a" in cache and len(cache) == 2
    with pytest.raises(ZeroDivisionError):
        cache.get_or_create("d", lambda: 1 / 0)
    assert "d" not in cache
    assert built == ["a", "b", "c"] and (cache.hits, cache.misses) == (1, 4)


def test_defaults_are_the_demo_models_when_present(tmp_path):
    assert default_sources(tmp_path) == (None, None)
    paths = build_models(tmp_path / "outputs/demo/work/seed0")
    Path(paths["model"]).rename(tmp_path / "outputs/demo/work/seed0/digits-prediction_only")
    Path(paths["vector"]).rename(tmp_path / "outputs/demo/work/seed0/mnist-vector")
    model, vector = default_sources(tmp_path)
    assert model.endswith("digits-prediction_only") and vector.endswith("mnist-vector")


def test_examples_are_small_images_of_the_builtin_domains():
    examples = example_images()
    assert {p.name.split("-")[0] for p in examples} >= {"digits", "mnist"}
    for path in examples:
        assert open_image(path).size == (32, 32)


def test_serve_refuses_bad_arguments_without_starting(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "0"])
    assert info.value.code == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--top-k", "0"])
    assert "--top-k must be at least 1" in capsys.readouterr().err


def test_space_folder_builds_the_page_with_its_metadata(models, monkeypatch):
    gradio = pytest.importorskip("gradio", reason='Gradio is not installed: pip install -e ".[app]"')
    import runpy

    space = Path(__file__).resolve().parents[1] / "space"
    front_matter = (space / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front_matter and "app_file: app.py" in front_matter
    assert "selfexplain[app]" in (space / "requirements.txt").read_text()
    monkeypatch.setenv("SELFEXPLAIN_MODEL", models["model"])
    monkeypatch.setenv("SELFEXPLAIN_VECTOR", models["vector"])
    namespace = runpy.run_path(str(space / "app.py"), run_name="space_app")  # built, not launched
    page = namespace["demo"]
    assert isinstance(page, gradio.Blocks)
    sources = [
        block.value for block in page.blocks.values() if getattr(block, "elem_id", None) == "model-source"
    ]
    assert sources == [models["model"]]
