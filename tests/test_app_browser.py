"""The interactive page in a real browser: headless Chromium (Debian's package) driven by Playwright.

The page is served on 127.0.0.1 (a free port) by this process, on tiny models built here. The test loads it,
uploads an image, moves the α slider, checks the labels and that the "after" heatmap changed, uploads a file
that is not an image, and saves a screenshot (in pytest's tmp folder, and in $SELFEXPLAIN_ARTIFACTS if set).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from selfexplain import ViTForSelfExplainingClassification, apply_explanation_vector
from selfexplain.app.core import ExplanationService, example_images
from selfexplain.data import default_image_processor
from tests.test_app import LABELS, build_models

gradio = pytest.importorskip("gradio", reason='Gradio is not installed: pip install -e ".[app]"')
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="Playwright is not installed: pip install playwright (no browser download needed)",
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Debian's chromium; another build can be named by SELFEXPLAIN_CHROMIUM. Playwright's own browser download is
# never used: CI installs the distribution's package (.ci/run).
CHROMIUM = os.environ.get("SELFEXPLAIN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# The machine's network is closed: without these flags Chromium waits on connections to Google's services.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000

if not os.path.isfile(CHROMIUM):
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver, or set SELFEXPLAIN_CHROMIUM)",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from selfexplain.app import build_app, launch_app

    paths = build_models(tmp_path_factory.mktemp("browser-models"))
    service = ExplanationService(work_dir=tmp_path_factory.mktemp("browser-work"))
    app = build_app(paths["model"], paths["vector"], service=service)
    port = _free_port()
    launch_app(app, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "service": service, **paths}
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir per run
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


def _expected_top_label(model: str, vector: str, alpha: float, image: Path) -> str:
    """The prediction at `alpha`, computed here with the library's own calls, without the page's code."""
    if alpha == 0:
        classifier = ViTForSelfExplainingClassification.from_pretrained(model)
    else:
        classifier = apply_explanation_vector(model, vector, alpha=alpha)
    pixel_values = default_image_processor(16)(images=Image.open(image).convert("RGB"), return_tensors="pt")
    with torch.inference_mode():
        return LABELS[int(classifier.eval()(pixel_values["pixel_values"]).logits.argmax())]


def _labels(page, elem_id: str) -> tuple[str, dict[str, float]]:
    """What a `gr.Label` shows: its title, the top label in large type, then each label and its percentage."""
    lines = [line.strip() for line in page.locator(f"#{elem_id}").inner_text().splitlines() if line.strip()]
    scores = dict(zip(lines[2::2], (float(p.rstrip("%")) for p in lines[3::2]), strict=True))
    return lines[1], scores


def _wait_for_status(page, text: str) -> str:
    status = page.locator("#status")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        shown = status.inner_text()
        if text in shown:
            return shown
        page.wait_for_timeout(100)
    raise AssertionError(f"status never said {text!r}; it says {status.inner_text()!r}")


def _image_src(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} img").first.get_attribute("src") or ""


def _wait_for_new_src(page, elem_id: str, old: str) -> str:
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        src = _image_src(page, elem_id) if page.locator(f"#{elem_id} img").count() else ""
        if src and src != old:
            return src
        page.wait_for_timeout(100)
    raise AssertionError(f"#{elem_id} never showed a new image (still {old!r})")


def test_page_in_a_real_browser(served, browser_page, tmp_path):
    page = browser_page
    page.goto(served["url"])
    # On load the page loads both and pre-selects the vector's recommended α (0.5).
    _wait_for_status(page, "vector recommends α = 0.5")
    number = page.locator("#alpha input[type=number]")
    assert float(number.input_value()) == 0.5

    image = tmp_path / "digit.png"
    shutil.copy(example_images()[0], image)
    page.locator("#upload input[type=file]").set_input_files(str(image))
    _wait_for_status(page, "Explained at α = 0.5")
    before_src = _wait_for_new_src(page, "before-heatmap", "")
    after_src = _wait_for_new_src(page, "after-heatmap", "")
    for elem_id, alpha in (("before-labels", 0.0), ("after-labels", 0.5)):
        top, scores = _labels(page, elem_id)
        # The top label is the model's prediction; every label of the tiny model is listed with its score.
        assert top == _expected_top_label(served["model"], served["vector"], alpha, image)
        assert set(scores) == set(LABELS.values()) and max(scores, key=scores.get) == top
        assert abs(sum(scores.values()) - 100) <= 2

    # Move the slider (keyboard on the range input: what a user does, and it fires the slider's events).
    slider = page.locator("#alpha input[type=range]")
    slider.focus()
    for _ in range(10):  # 10 steps of 0.05: α = 1.0
        slider.press("ArrowRight")
    _wait_for_status(page, "Explained at α = 1")
    top, _ = _labels(page, "after-labels")
    assert top == _expected_top_label(served["model"], served["vector"], 1.0, image)
    new_after_src = _wait_for_new_src(page, "after-heatmap", after_src)
    assert new_after_src != after_src
    assert float(number.input_value()) == 1.0
    # Every request reused the classifier and the vector loaded at the start.
    service = served["service"]
    assert (service.models.misses, service.vectors.misses) == (1, 1)

    screenshot = tmp_path / "selfexplain-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    artefacts = os.environ.get("SELFEXPLAIN_ARTIFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artefacts) / screenshot.name)

    # The patched model's folder, as a zip the browser can download.
    page.locator("#build-zip").click()
    _wait_for_status(page, "Patched model ready: classifier-explaining-alpha1.zip")
    link = page.locator("#download a").first
    href = link.get_attribute("href")
    response = page.request.get(href if href.startswith("http") else served["url"].rstrip("/") + href)
    assert response.ok and response.body()[:2] == b"PK"

    # A file that is not an image: a readable sentence on the page, no traceback, and the server keeps serving.
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not pixels")
    page.locator("#upload").get_by_label("Clear").click()  # a shown file first gives way to the drop zone
    page.locator("#upload input[type=file]").set_input_files(str(notes))
    shown = _wait_for_status(page, "notes.txt is not an image this page can read")
    assert shown.startswith("Error:") and "Traceback" not in page.content()
    page.locator("#upload").get_by_label("Clear").click()
    page.locator("#upload input[type=file]").set_input_files(str(image))
    _wait_for_status(page, "Explained at α = 1")
    assert _wait_for_new_src(page, "before-heatmap", "") == before_src  # α = 0 is the same model
