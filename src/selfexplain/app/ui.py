"""The Gradio page: pick a classifier and a vector, drop an image, watch the map change with α.

Every handler returns a status line instead of raising: a wrong vector, a file that is not an image or one too
large shows as a sentence on the page, and the server goes on serving.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

# Set before Gradio is imported, which reads it then: the page never reports usage to Gradio's servers.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from .core import AppError, ExplanationService, example_images, readable  # noqa: E402

logger = logging.getLogger(__name__)

INTRO = """\
# selfexplain: explanation vectors, interactively

Pick a ViT classifier and an **explanation vector** (each a Hub id or a local folder), then upload an image or
click an example. The page shows the classifier's top labels and its per-patch map **before** (α = 0, the
classifier as it is) and **after** adding α·τ to its weights — no training. Red patches speak for the predicted
class, blue ones against it. Move α to see the map change; download the patched model as a folder (zip).
"""

# System fonts only: Gradio's default theme asks the browser to fetch fonts from Google, which a page meant to
# run offline (and without contacting third parties) must not do.
THEME = gr.themes.Base(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)


def _error(message: str) -> str:
    return f"**Error:** {message}"


def build_app(
    model: str | None = None,
    vector: str | None = None,
    *,
    service: ExplanationService | None = None,
    examples: Sequence[str | os.PathLike] | None = None,
    top_k: int = 5,
) -> gr.Blocks:
    """The page as a `gr.Blocks`, with `model` and `vector` (Hub ids or folders) filled in when given.

    `service` holds the loaded models (a new one by default); `examples` are image files offered for a click
    (default: small images of the built-in domains shipped with the package).
    """
    service = service or ExplanationService(top_k=top_k)
    example_files = [str(p) for p in (example_images() if examples is None else examples)]

    def on_load(model_source: str, vector_source: str):
        try:
            loaded = service.load(model_source, vector_source)
        except Exception as err:  # noqa: BLE001 - every failure becomes a sentence on the page
            return _error(readable(err)), gr.update()
        top = max(2.0, 2 * loaded.recommended_alpha)
        return loaded.message, gr.update(value=loaded.recommended_alpha, maximum=top)

    def on_explain(model_source: str, vector_source: str, image: str | None, alpha: float):
        empty = (None, None, None, None, None)
        if not image:
            # The status is left as it is: it may say what loading found (the slider's update on load lands here).
            return (*empty, gr.update())
        try:
            result = service.explain(model_source, vector_source, image, alpha)
        except Exception as err:  # noqa: BLE001 - every failure becomes a sentence on the page
            return (*empty, _error(readable(err)))
        return (
            result.image,
            result.before_overlay,
            result.before_scores,
            result.after_overlay,
            result.after_scores,
            result.message,
        )

    def on_zip(model_source: str, vector_source: str, alpha: float):
        try:
            archive = service.export_zip(model_source, vector_source, alpha)
        except Exception as err:  # noqa: BLE001 - every failure becomes a sentence on the page
            return None, _error(readable(err))
        return str(
            archive
        ), f"Patched model ready: {Path(archive).name} (weights, config, image processor, card)."

    with gr.Blocks(title="selfexplain: explanation vectors", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            model_box = gr.Textbox(
                label="Classifier (Hub id or local folder)",
                value=model or "",
                placeholder="org/vit-finetuned or path/to/folder",
                elem_id="model-source",
                scale=3,
            )
            vector_box = gr.Textbox(
                label="Explanation vector (Hub id or local folder)",
                value=vector or "",
                placeholder="org/explanation-vector or path/to/folder",
                elem_id="vector-source",
                scale=3,
            )
            load_button = gr.Button("Load", variant="primary", elem_id="load", scale=1)
        status = gr.Markdown(
            "Loading the classifier and the vector ..."
            if model and vector
            else "Enter a classifier and a vector, then upload an image or click an example.",
            elem_id="status",
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                upload = gr.File(
                    label="Image (PNG, JPEG, WebP, ...)",
                    type="filepath",
                    file_count="single",
                    elem_id="upload",
                )
                preview = gr.Image(label="Your image", interactive=False, height=160, elem_id="preview")
                if example_files:
                    gr.Examples(
                        examples=[[path] for path in example_files],
                        inputs=[upload],
                        example_labels=[Path(path).stem for path in example_files],
                        label="Examples (built-in domains, 32×32)",
                    )
                alpha = gr.Slider(
                    0.0,
                    2.0,
                    value=1.0,
                    step=0.05,
                    label="α (0: the classifier as it is; the vector's recommended α is pre-selected)",
                    elem_id="alpha",
                )
                zip_button = gr.Button("Build the patched model (zip)", elem_id="build-zip")
                download = gr.File(
                    label="Patched model folder", interactive=False, height=90, elem_id="download"
                )
            # The pictures carry their own caption (label, probability) in the top-left corner, where Gradio
            # would draw the component's label: the titles are written above them instead.
            with gr.Column(scale=1, min_width=300):
                gr.Markdown("### Before (α = 0): the classifier as it is")
                before_image = gr.Image(
                    show_label=False, interactive=False, format="png", elem_id="before-heatmap"
                )
                before_labels = gr.Label(
                    num_top_classes=top_k, label="Before: top labels", elem_id="before-labels"
                )
            with gr.Column(scale=1, min_width=300):
                gr.Markdown("### After: θ + α·τ")
                after_image = gr.Image(
                    show_label=False, interactive=False, format="png", elem_id="after-heatmap"
                )
                after_labels = gr.Label(
                    num_top_classes=top_k, label="After: top labels", elem_id="after-labels"
                )

        sources = [model_box, vector_box]
        outputs = [preview, before_image, before_labels, after_image, after_labels, status]
        explain_inputs = [model_box, vector_box, upload, alpha]
        # Loading sets α to the vector's recommendation, which re-explains the current image (if any).
        load_button.click(on_load, sources, [status, alpha]).then(on_explain, explain_inputs, outputs)
        if model and vector:
            app.load(on_load, sources, [status, alpha])
        upload.change(on_explain, explain_inputs, outputs)
        # "always_last": while the slider is dragged only the latest α is computed, not every step on the way.
        alpha.change(on_explain, explain_inputs, outputs, trigger_mode="always_last")
        zip_button.click(on_zip, [model_box, vector_box, alpha], [download, status])
    app.selfexplain_service = service  # the caches, for whoever launches or tests the page
    return app


def launch_app(
    app: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
):
    """Serve `app` on `host:port` (loopback by default) with no share link, no usage reports, and downloads
    allowed from the service's own folder only."""
    service = getattr(app, "selfexplain_service", None)
    allowed = [str(service.work_dir)] if service is not None else []
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        # Node-based server rendering would need a Node.js runtime; the page renders in the browser.
        ssr_mode=False,
        show_error=False,
        allowed_paths=allowed,
        max_file_size="50mb",
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        theme=THEME,
    )


__all__ = ["AppError", "build_app", "launch_app"]
