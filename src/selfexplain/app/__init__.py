"""An interactive page for explanation vectors (Gradio): ``selfexplain serve``, or the Space in ``space/``.

```python
from selfexplain.app import build_app, launch_app

app = build_app("outputs/demo/work/seed0/digits-prediction_only", "outputs/demo/work/seed0/mnist-vector")
launch_app(app)  # http://127.0.0.1:7860
```

``core`` (loading, caching, explaining, errors as sentences) needs only the package; ``build_app`` and
``launch_app`` need Gradio, from the optional extra: ``pip install "selfexplain[app]"``.
"""

from __future__ import annotations

from .core import DEMO_MODEL, DEMO_VECTOR, AppError, ExplanationService, default_sources, example_images

INSTALL_HINT = 'The page needs Gradio: pip install "selfexplain[app]"'


def __getattr__(name: str):
    # Gradio is imported only when the page is built, so that `selfexplain.app.core` works without the extra.
    if name in ("build_app", "launch_app"):
        try:
            from . import ui
        except ImportError as err:
            if getattr(err, "name", None) and err.name.split(".")[0] == "gradio":
                raise ImportError(f"{INSTALL_HINT} ({err}).") from err
            raise
        return getattr(ui, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEMO_MODEL",
    "DEMO_VECTOR",
    "INSTALL_HINT",
    "AppError",
    "ExplanationService",
    "build_app",
    "default_sources",
    "example_images",
    "launch_app",
]
