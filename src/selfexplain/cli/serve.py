"""``selfexplain serve``: the interactive page (Gradio) on 127.0.0.1.

After ``selfexplain demo`` it needs no arguments: the demo's target classifier and MNIST vector are the
defaults, and everything runs offline.
"""

from __future__ import annotations

import argparse

from ._common import CLIError

DEFAULT_PORT = 7860


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``."""
    p = sub.add_parser(
        "serve",
        help="An interactive page: classifier + vector + image → labels and heatmaps before/after, α slider.",
        description="Serve the interactive page (needs the extra: pip install 'selfexplain[app]').",
    )
    p.add_argument(
        "--model",
        default=None,
        help="Classifier: folder or Hub id (default: the demo's outputs/demo/work/seed0/digits-prediction_only, "
        "when present).",
    )
    p.add_argument(
        "--vector",
        default=None,
        help="Explanation vector: folder or Hub id (default: the demo's outputs/demo/work/seed0/mnist-vector, "
        "when present).",
    )
    # Loopback by default: the page loads any folder or Hub id it is given, which is for its own user only.
    p.add_argument(
        "--host", default="127.0.0.1", help="Address to bind (default: 127.0.0.1, this machine only)."
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default: {DEFAULT_PORT}).")
    p.add_argument("--top-k", type=int, default=5, help="Labels shown per model (default: 5).")
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}.")
    if args.top_k < 1:
        raise CLIError(f"--top-k must be at least 1, got {args.top_k}.")
    from ..app import INSTALL_HINT, default_sources

    try:
        from ..app import build_app, launch_app
    except ImportError as err:
        raise CLIError(f"{INSTALL_HINT}.") from err
    demo_model, demo_vector = default_sources()
    model = args.model or demo_model
    vector = args.vector or demo_vector
    if model is None or vector is None:
        print(
            "No --model/--vector given and no demo models found (run `selfexplain demo` first, or enter a "
            "classifier and a vector on the page)."
        )
    app = build_app(model, vector, top_k=args.top_k)
    print(f"selfexplain page on http://{args.host}:{args.port} (Ctrl+C to stop)")
    launch_app(app, host=args.host, port=args.port)
