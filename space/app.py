"""The selfexplain page as a Hugging Face Space (this folder is the Space: app.py, requirements.txt, README.md).

Which classifier and vector the page opens with: the Space's variables SELFEXPLAIN_MODEL and SELFEXPLAIN_VECTOR
(Hub ids), else the models of `selfexplain demo` when run from a checkout that has them; a visitor can enter
any others on the page. Locally: `python space/app.py` from the repository root (or `selfexplain serve`).
"""

import os

# Before Gradio is imported (selfexplain.app imports it): no usage reports to Gradio's servers.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from selfexplain.app import build_app, default_sources, launch_app  # noqa: E402

demo_model, demo_vector = default_sources()
demo = build_app(
    os.environ.get("SELFEXPLAIN_MODEL") or demo_model,
    os.environ.get("SELFEXPLAIN_VECTOR") or demo_vector,
)

if __name__ == "__main__":
    # A Space sets GRADIO_SERVER_NAME=0.0.0.0 (its container's port is published by the Hub); anywhere else the
    # page stays on this machine's loopback.
    launch_app(
        demo,
        host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
