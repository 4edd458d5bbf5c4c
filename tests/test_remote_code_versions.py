"""The modeling file saved with every model runs as remote code on older transformers releases.

A model is applied and saved with the current transformers; a real older transformers, in its own virtual
environment and without selfexplain, loads it with
`AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)`, and its logits, maps and
loss must be those of the current library. The current release is covered in-process by
`tests/test_modeling.py`.

`.ci/run` creates `.venv-tf4` (transformers 4.46.3, the release that first showed the failure); the other
releases the README states (4.36.2, 4.40.2, 4.55.4, 4.57.3) ran through this test with their interpreters named,
separated by the path separator, in `SELFEXPLAIN_OLD_TRANSFORMERS_PYTHONS`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfexplain import ExplanationVector, apply_explanation_vector
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OLD_VENV = REPO / ".venv-tf4"


def _old_pythons() -> list[pytest.param]:
    named = [p for p in os.environ.get("SELFEXPLAIN_OLD_TRANSFORMERS_PYTHONS", "").split(os.pathsep) if p]
    params = [pytest.param(Path(p), id=Path(p).parent.parent.name) for p in named]
    default = DEFAULT_OLD_VENV / "bin" / "python"
    if default.exists() or not named:
        params.insert(0, pytest.param(default, id=DEFAULT_OLD_VENV.name))
    return params


# Runs in the old environment: load with remote code, run the model, write every output as safetensors.
LOAD_AND_RUN = r"""
import importlib.util, json, sys
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification

folder, inputs, out = sys.argv[1:4]
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
x = load_file(inputs)["pixel_values"]
labels = torch.tensor([0, 4])
with torch.no_grad():
    predicted = model(x)
    every = model(x, explain="all")
    chosen = model(x, explain=[1, 3])
    with_loss = model(x, labels=labels)
    as_tuple = model(x, return_dict=False)
outputs = {
    "logits": predicted.logits,
    "explanation": predicted.explanation,
    "explained_classes": predicted.explained_classes,
    "explanation_all": every.explanation,
    "explanation_chosen": chosen.explanation,
    "loss": with_loss.loss.reshape(1),
    "tuple_logits": as_tuple[0],
}
save_file({name: tensor.contiguous() for name, tensor in outputs.items()}, out)
print(json.dumps({
    "transformers": transformers.__version__,
    "class": type(model).__name__,
    "module": type(model).__module__,
    "tuple": isinstance(as_tuple, tuple),
    "selfexplain_importable": importlib.util.find_spec("selfexplain") is not None,
}))
"""


#: The heads the old release must run: the shared head, an extension on the final tokens, and an extension on
#: block 1 whose tokens go through the later blocks (which the modeling file runs from the blocks' own modules).
HEADS = {
    "shared": {"explanation_head": "shared"},
    "extension": {"explanation_head": "extension"},
    "routed": {
        "explanation_head": "extension",
        "explanation_extension_input_layer": 1,
        "explanation_extension_route": "backbone",
    },
}


@pytest.fixture(scope="module", params=list(HEADS))
def applied(request, tmp_path_factory):
    """An applied model saved by the current transformers, the inputs, and the outputs it must give: with the
    shared head, and with an explanation extension that the vector adds (trained weights stand-in: random)."""
    labels = {i: f"c{i}" for i in range(5)}
    target = tiny_classifier(
        seed=50, num_labels=5, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    explaining = tiny_self_explaining(seed=51, num_labels=5, **HEADS[request.param])
    if explaining.explainer is not None:  # its output projections start at zero: make it do something
        with torch.no_grad():
            for param in explaining.explainer.parameters():
                param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
    vector = ExplanationVector.from_models(
        self_explaining=explaining,
        prediction_only=tiny_classifier(seed=52, num_labels=5),
        base_model="org/tiny-base",
        recommended_alpha=0.5,
    )
    model = apply_explanation_vector(target, vector).eval()
    root = tmp_path_factory.mktemp("remote")
    model.save_pretrained(root / "model")
    x = pixels(2, seed=3)
    save_file({"pixel_values": x}, root / "inputs.safetensors")
    with torch.no_grad():
        expected = {
            "logits": model(x).logits,
            "explanation": model(x).explanation,
            "explained_classes": model(x).explained_classes,
            "explanation_all": model(x, explain="all").explanation,
            "explanation_chosen": model(x, explain=[1, 3]).explanation,
            "loss": model(x, labels=torch.tensor([0, 4])).loss.reshape(1),
        }
    expected["tuple_logits"] = expected["logits"]
    return root, expected


@pytest.mark.parametrize("python", _old_pythons())
def test_remote_code_gives_the_same_outputs_on_an_older_transformers(python, applied, tmp_path):
    if not python.exists():
        pytest.skip(
            f"{python} is missing: create it as .ci/run does (python3 -m venv .venv-tf4 && .venv-tf4/bin/pip "
            'install torch==2.13.0 "transformers==4.46.3" safetensors)'
        )
    root, expected = applied
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # Offline, with a module cache of its own: the old release imports its own copy of the modeling file.
    env.update(
        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error"
    )
    out = tmp_path / "outputs.safetensors"
    result = subprocess.run(
        [str(python), "-c", LOAD_AND_RUN, str(root / "model"), str(root / "inputs.safetensors"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["class"] == "ViTForSelfExplainingClassification"
    assert facts["module"].startswith("transformers_modules"), facts  # the copy saved with the model
    assert not facts["selfexplain_importable"], "the old environment must not see selfexplain"
    assert facts["tuple"]
    got = load_file(out)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        if want.dtype.is_floating_point:
            assert torch.allclose(got[name], want, atol=1e-5, rtol=1e-5), (facts["transformers"], name)
        else:
            assert torch.equal(got[name], want), (facts["transformers"], name)
