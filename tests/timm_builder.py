"""Runs inside `.venv-timm` (timm 1.0.31), never in the main environment: builds real timm checkpoints and loads
checkpoints back with timm, for tests/test_timm.py.

    .venv-timm/bin/python tests/timm_builder.py JOBS.json RESULTS.json

JOBS.json: `{"inputs": "inputs.safetensors", "jobs": [...]}`; each job is
- `{"op": "build", "name", "arch", "kwargs", "folder", "logits", "input", "seed", "model_config", "safe"}`:
  `timm.create_model(arch, **kwargs)` with every weight perturbed (so that no bias is zero and no norm is the
  identity: a wrong mapping cannot hide), written with timm's own `save_for_hf`, and its logits on the input;
- `{"op": "load", "name", "folder", "logits", "input", "how"}`: the folder loaded by timm (`"local-dir"`:
  `create_model("local-dir:FOLDER", pretrained=True)`; `"overlay"`: `create_model(architecture, pretrained=True,
  pretrained_cfg_overlay=dict(file=FOLDER/model.safetensors, num_classes=N), **model_args)`) and its logits.
- `{"op": "describe", "name", "arch"}`: the architecture built on the meta device (no memory, no weights), its
  config.json as `save_for_hf` writes it, its tensors' shapes, and its width and heads, in RESULTS.json.
Logits are written as safetensors; RESULTS.json holds facts about each job (timm's version, the class built).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def import_torchvision_with_cpu_torch() -> None:
    """Import torchvision (which timm imports) against the CPU build of torch.

    torchvision 0.28's wheel registers fake (meta) kernels for its compiled operators at import; with the CPU
    build of torch those operators are missing, so `torch.library.register_fake` fails with "operator
    torchvision::nms does not exist". The fake kernels only matter for torch.compile and meta tensors of
    detection ops, which timm's ViTs never use: register nothing while torchvision is imported, then put
    `register_fake` back. This lives in the tests only, never in selfexplain.
    """
    original = torch.library.register_fake

    def register_nothing(*args, **kwargs):
        return lambda fn: fn

    torch.library.register_fake = register_nothing
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = original


import_torchvision_with_cpu_torch()

import timm  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from timm.models._hub import save_config_for_hf, save_for_hf  # noqa: E402


def build(job: dict, inputs: dict[str, torch.Tensor]) -> dict:
    torch.manual_seed(job.get("seed", 0))
    model = timm.create_model(job["arch"], pretrained=False, **job.get("kwargs", {})).eval()
    generator = torch.Generator().manual_seed(job.get("seed", 0) + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    save_for_hf(
        model, job["folder"], model_config=job.get("model_config"), safe_serialization=job.get("safe", True)
    )
    return {"class": type(model).__name__, **_logits(model, job, inputs)}


def load(job: dict, inputs: dict[str, torch.Tensor]) -> dict:
    folder = Path(job["folder"])
    if job.get("how", "local-dir") == "local-dir":
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)  # without it: random weights
    else:
        config = json.loads((folder / "config.json").read_text())
        # The overlay's num_classes too: where it differs from the architecture's default cfg (1000), timm drops
        # the checkpoint's head and keeps a random one.
        overlay = {"file": str(folder / "model.safetensors"), "num_classes": config["num_classes"]}
        model = timm.create_model(
            config["architecture"],
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            **config.get("model_args", {}),
        )
    model.eval()
    return {"class": type(model).__name__, "num_classes": model.num_classes, **_logits(model, job, inputs)}


def describe(job: dict, inputs: dict[str, torch.Tensor]) -> dict:
    with torch.device("meta"):
        model = timm.create_model(job["arch"], pretrained=False)
    config_file = Path(job["folder"]) / "config.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    save_config_for_hf(model, str(config_file))
    first_block = model.blocks[0] if hasattr(model, "blocks") else None
    attention = getattr(first_block, "attn", None)
    return {
        "class": type(model).__name__,
        "config": json.loads(config_file.read_text()),
        "shapes": {name: list(tensor.shape) for name, tensor in model.state_dict().items()},
        "width": getattr(model, "embed_dim", None),
        "heads": getattr(attention, "num_heads", None),
    }


def _logits(model: torch.nn.Module, job: dict, inputs: dict[str, torch.Tensor]) -> dict:
    if "logits" not in job:
        return {}
    with torch.no_grad():
        logits = model(inputs[job["input"]])
    save_file({"logits": logits.contiguous()}, job["logits"])
    return {"logits_shape": list(logits.shape)}


def main(jobs_file: str, results_file: str) -> None:
    spec = json.loads(Path(jobs_file).read_text())
    inputs = load_file(spec["inputs"])
    torch.set_num_threads(1)  # tiny models: one thread is fastest on shared cores
    results = {"timm": timm.__version__, "torch": torch.__version__, "jobs": {}}
    for job in spec["jobs"]:
        run = {"build": build, "load": load, "describe": describe}[job["op"]]
        results["jobs"][job["name"]] = run(job, inputs)
    Path(results_file).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
