"""timm ViT checkpoints: built by timm itself, loaded as self-explaining ViTs, refused, and saved back for timm.

timm (1.0.31) is not installed in the main environment: `.ci/run` creates `.venv-timm` (torch 2.13.0,
torchvision 0.28.0, timm 1.0.31), and tests/timm_builder.py runs there. It builds real checkpoints with
`timm.create_model` and timm's own `save_for_hf` (random weights, every one perturbed so that no bias is zero and
no norm is the identity), and loads saved checkpoints back with
`timm.create_model("local-dir:...", pretrained=True)`, writing every logit as safetensors for the comparisons here. Without `.venv-timm` those tests are skipped and say how
to create it; the tests that need no timm (saving and reloading through selfexplain alone) always run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfexplain import (
    ExplanationVector,
    MissingClassifierError,
    NotAModelError,
    UnsupportedModelError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
    is_timm_config,
    load_timm_checkpoint,
    save_timm_checkpoint,
)
from selfexplain.timm_checkpoints import (
    EXPLAINER_WEIGHTS_NAME,
    TIMM_SOURCE_ATTRIBUTE,
    TIMM_VIT_WIDTH_AND_HEADS,
    check_timm_checkpoint,
    timm_to_vit_state_dict,
    vit_to_timm_state_dict,
)
from selfexplain.vectors.checkpoint_keys import serialized_names, serialized_state_dict
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TIMM_PYTHON = REPO / ".venv-timm" / "bin" / "python"
BUILDER = REPO / "tests" / "timm_builder.py"
CREATE_TIMM_VENV = (
    "python3 -m venv .venv-timm && .venv-timm/bin/pip install torch==2.13.0 torchvision==0.28.0 "
    "timm==1.0.31 safetensors"
)

# A small timm ViT whose head count differs from its architecture's (so `model_args` must carry it).
SMALL = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 3}
ONE_BLOCK = {**SMALL, "depth": 1}
LABELS = ["cat", "dog", "bird"]
TINY_LABELS = [f"c{i}" for i in range(5)]

#: name: (timm architecture, create_model kwargs, input tensor, save_for_hf model_config, safetensors?)
CHECKPOINTS: dict[str, tuple[str, dict, str, dict | None, bool]] = {
    "small": ("vit_tiny_patch16_224", SMALL, "x32", {"label_names": LABELS}, True),
    "vit_tiny": ("vit_tiny_patch16_224", {"num_classes": 4}, "x224", None, True),
    "rect_no_qkv_bias": (
        "vit_tiny_patch16_224",
        {**ONE_BLOCK, "img_size": [32, 48], "qkv_bias": False},
        "x32x48",
        None,
        True,
    ),
    # The architecture of tests/_tiny.py, so that the vectors made there apply to it.
    "tiny_arch": (
        "vit_tiny_patch16_224",
        {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
        | {"num_classes": 5},
        "x16",
        {"label_names": TINY_LABELS},
        True,
    ),
    # Variants that must be refused, each built by timm with the option.
    "avg_pool": ("vit_tiny_patch16_224", {**ONE_BLOCK, "global_pool": "avg"}, "x32", None, True),
    "no_class_token": (
        "vit_tiny_patch16_224",
        {**ONE_BLOCK, "class_token": False, "global_pool": "avg"},
        "x32",
        None,
        True,
    ),
    "registers": ("vit_tiny_patch16_224", {**ONE_BLOCK, "reg_tokens": 4}, "x32", None, True),
    "layer_scale": ("vit_tiny_patch16_224", {**ONE_BLOCK, "init_values": 1e-5}, "x32", None, True),
    "fc_norm": ("vit_tiny_patch16_224", {**ONE_BLOCK, "fc_norm": True}, "x32", None, True),
    "pre_norm": ("vit_tiny_patch16_224", {**ONE_BLOCK, "pre_norm": True}, "x32", None, True),
    "qk_norm": ("vit_tiny_patch16_224", {**ONE_BLOCK, "qk_norm": True}, "x32", None, True),
    "no_embed_class": ("vit_tiny_patch16_224", {**ONE_BLOCK, "no_embed_class": True}, "x32", None, True),
    "dynamic_size": ("vit_tiny_patch16_224", {**ONE_BLOCK, "dynamic_img_size": True}, "x32", None, True),
    "headless": ("vit_tiny_patch16_224", {**ONE_BLOCK, "num_classes": 0}, "x32", None, True),
    "resnet": ("test_resnet", {"num_classes": 3}, "x32", None, True),
    "pickled": ("vit_tiny_patch16_224", ONE_BLOCK, "x32", None, False),
}
LOADABLE = ("small", "vit_tiny", "rect_no_qkv_bias", "tiny_arch")


def run_in_timm_venv(jobs: list[dict], inputs: Path, work: Path) -> dict:
    """Run tests/timm_builder.py on `jobs` in `.venv-timm` (skip when it is missing); its results."""
    if not TIMM_PYTHON.exists():
        pytest.skip(f"{TIMM_PYTHON} is missing: create it as .ci/run does ({CREATE_TIMM_VENV})")
    jobs_file, results_file = work / "jobs.json", work / "results.json"
    jobs_file.write_text(json.dumps({"inputs": str(inputs), "jobs": jobs}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # Offline, with a cache of its own: timm must read the local folders, never the Hub.
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(TIMM_PYTHON), str(BUILDER), str(jobs_file), str(results_file)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(results_file.read_text())
    assert results["timm"] == "1.0.31", results
    return results


@dataclass
class Built:
    root: Path
    inputs: dict[str, torch.Tensor]

    def folder(self, name: str) -> Path:
        return self.root / "checkpoints" / name

    def logits(self, name: str) -> torch.Tensor:
        return load_file(self.root / f"{name}.logits.safetensors")["logits"]

    def input_of(self, name: str) -> torch.Tensor:
        return self.inputs[CHECKPOINTS[name][2]]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """Every checkpoint of CHECKPOINTS, built and saved by timm, with timm's logits (one timm process)."""
    root = tmp_path_factory.mktemp("timm")
    generator = torch.Generator().manual_seed(0)
    inputs = {
        name: torch.randn(2, 3, *size, generator=generator)
        for name, size in {"x16": (16, 16), "x32": (32, 32), "x32x48": (32, 48), "x224": (224, 224)}.items()
    }
    save_file(inputs, root / "inputs.safetensors")
    jobs = [
        {
            "op": "build",
            "name": name,
            "arch": arch,
            "kwargs": kwargs,
            "folder": str(root / "checkpoints" / name),
            "input": input_name,
            "model_config": model_config,
            "safe": safe,
            "seed": index,
        }
        | ({"logits": str(root / f"{name}.logits.safetensors")} if name in LOADABLE else {})
        for index, (name, (arch, kwargs, input_name, model_config, safe)) in enumerate(CHECKPOINTS.items())
    ]
    run_in_timm_venv(jobs, root / "inputs.safetensors", root)
    return Built(root, inputs)


def without_model_args(folder: Path, into: Path) -> Path:
    """A copy whose config.json has no `model_args`, as the configs of many timm checkpoints on the Hub."""
    shutil.copytree(folder, into)
    config = json.loads((into / "config.json").read_text())
    config.pop("model_args", None)
    (into / "config.json").write_text(json.dumps(config))
    return into


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", LOADABLE)
def test_loaded_checkpoint_gives_timms_logits_and_explains(built, name):
    model = load_timm_checkpoint(built.folder(name))
    assert isinstance(model, ViTForSelfExplainingClassification) and not model.training
    x = built.input_of(name)
    with torch.no_grad():
        out = model(x, explain="all")
    assert torch.allclose(out.logits, built.logits(name), atol=1e-5, rtol=1e-5)
    assert out.explanation.shape == (2, model.config.num_labels, *model.patch_grid(x))
    assert model.config.layer_norm_eps == 1e-6 and model.config.hidden_act == "gelu"


def test_config_facts_labels_and_source_come_from_timms_config(built):
    small = load_timm_checkpoint(built.folder("small"))
    config = small.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.intermediate_size, config.patch_size, config.image_size) == (256, 4, 32)
    assert config.qkv_bias is True
    assert config.id2label == dict(enumerate(LABELS))
    assert config.label2id == {label: i for i, label in enumerate(LABELS)}
    source = getattr(config, TIMM_SOURCE_ATTRIBUTE)
    assert source["architecture"] == "vit_tiny_patch16_224" and source["source"] == str(built.folder("small"))
    assert source["pretrained_cfg"]["input_size"] == [3, 32, 32]
    # No label_names: transformers' LABEL_i. The head count of vit_tiny comes from its name (no num_heads).
    tiny = load_timm_checkpoint(built.folder("vit_tiny")).config
    assert tiny.id2label == {i: f"LABEL_{i}" for i in range(4)}
    assert (tiny.num_attention_heads, tiny.hidden_size, tiny.image_size, tiny.patch_size) == (3, 192, 224, 16)
    rect = load_timm_checkpoint(built.folder("rect_no_qkv_bias")).config
    assert rect.image_size == [32, 48] and rect.qkv_bias is False


def test_dtype_is_applied(built):
    model = load_timm_checkpoint(built.folder("small"), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_timm_checkpoint(built.folder("small")).parameters()} == {torch.float32}


@pytest.mark.parametrize("strip_model_args", [False, True], ids=["config", "hub-style-config"])
@pytest.mark.parametrize(
    ("name", "error", "says"),
    [
        ("avg_pool", UnsupportedModelError, "pooling 'avg' (`global_pool`)"),
        ("no_class_token", UnsupportedModelError, "no class token (`class_token=False`)"),
        ("registers", UnsupportedModelError, "register tokens"),
        ("layer_scale", UnsupportedModelError, "layer scale (`init_values`"),
        ("fc_norm", UnsupportedModelError, "a norm after pooling (`fc_norm`)"),
        ("pre_norm", UnsupportedModelError, "(`pre_norm`, key `norm_pre`"),
        ("qk_norm", UnsupportedModelError, "(`qk_norm`"),
        ("no_embed_class", UnsupportedModelError, "(`no_embed_class`)"),
        ("dynamic_size", UnsupportedModelError, "a dynamic image size"),
        ("resnet", UnsupportedModelError, "'test_resnet' is not a timm Vision Transformer"),
        ("headless", MissingClassifierError, "without a classification head (num_classes=0"),
        ("pickled", OSError, "safetensors only"),
    ],
)
def test_unsupported_variants_are_refused_naming_what_and_why(
    built, tmp_path, name, error, says, strip_model_args
):
    folder = (
        without_model_args(built.folder(name), tmp_path / name) if strip_model_args else built.folder(name)
    )
    with pytest.raises(error) as info:
        load_timm_checkpoint(folder)
    message = str(info.value)
    if strip_model_args and name == "no_class_token":
        # Refused from the config's `global_pool` alone, before the weights (that show no class token) are read.
        says = "pooling 'avg' (`global_pool`)"
    assert says in message, message
    if error is UnsupportedModelError:
        assert "nothing was loaded" in message and "transformers' ViT" in message


def test_pickled_checkpoint_is_never_unpickled(built, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(OSError, match=r"has no model\.safetensors \(it has pytorch_model\.bin\)"):
        load_timm_checkpoint(built.folder("pickled"))


def test_unknown_head_count_is_refused_with_the_way_out(built, tmp_path):
    # Its architecture's name says 3 heads at width 192; these weights are 64 wide (built with num_heads=4).
    folder = without_model_args(built.folder("small"), tmp_path / "small")
    with pytest.raises(UnsupportedModelError, match="has width 192 in timm, these weights 64") as info:
        load_timm_checkpoint(folder)
    assert "model_args={'num_heads': ...}" in str(info.value)


def test_other_folders_are_refused(tmp_path):
    tiny_classifier().save_pretrained(tmp_path / "transformers")
    with pytest.raises(UnsupportedModelError, match="ViTForSelfExplainingClassification.from_pretrained"):
        load_timm_checkpoint(tmp_path / "transformers")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAModelError, match="has no config.json"):
        load_timm_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_timm_checkpoint(tmp_path / "missing")


#: timm architectures that are not the plain ViT, one per kind of difference (all refused).
OTHER_VITS = (
    "vit_base_patch16_gap_224",  # average pooling, no class token; 16 heads at width 768
    "vit_base_patch16_clip_224",  # pre-norm
    "vit_base_patch16_siglip_224",  # attention pooling
    "vit_small_patch14_reg4_dinov2",  # registers, layer scale
    "deit_small_distilled_patch16_224",  # distillation token and head
    "deit3_small_patch16_224",  # layer scale
    "vit_small_patch16_18x2_224",  # parallel blocks
    "vit_small_r26_s32_224",  # convolutional stem
    "vit_relpos_small_patch16_224",  # relative positions
    "vit_base_patch16_rope_ape_224",  # rotary positions (Eva), layer scale
    "flexivit_small",  # position embeddings without the class token
)


@pytest.mark.slow  # ~20 s: 37 architectures built by timm (on the meta device)
def test_every_plain_timm_vit_is_accepted_with_its_head_count_and_the_others_refused(tmp_path):
    """Against timm itself (built on the meta device, from its config as `save_for_hf` writes it, with and without
    `model_args`): the plain ViTs of TIMM_VIT_WIDTH_AND_HEADS pass with timm's width and heads (or are refused as
    backbones), the other kinds are refused."""
    names = [*TIMM_VIT_WIDTH_AND_HEADS, *OTHER_VITS]
    jobs = [{"op": "describe", "name": name, "arch": name, "folder": str(tmp_path / name)} for name in names]
    save_file({"unused": torch.zeros(1)}, tmp_path / "none.safetensors")
    described = run_in_timm_venv(jobs, tmp_path / "none.safetensors", tmp_path)["jobs"]
    for name in names:
        facts = described[name]
        for config in (facts["config"], {k: v for k, v in facts["config"].items() if k != "model_args"}):
            if name in OTHER_VITS:
                with pytest.raises(UnsupportedModelError):
                    check_timm_checkpoint(config, facts["shapes"], source=name)
            elif config["num_classes"] == 0:  # timm's in21k / backbone-only defaults
                with pytest.raises(MissingClassifierError):
                    check_timm_checkpoint(config, facts["shapes"], source=name)
            else:
                shape = check_timm_checkpoint(config, facts["shapes"], source=name)
                assert (shape.hidden_size, shape.num_attention_heads) == (facts["width"], facts["heads"]), (
                    name
                )
                assert TIMM_VIT_WIDTH_AND_HEADS[name] == (facts["width"], facts["heads"]), name


def test_is_timm_config():
    assert is_timm_config({"architecture": "vit_base_patch16_224", "num_classes": 1000})
    assert not is_timm_config({"architecture": "x", "model_type": "vit"})
    assert not is_timm_config({"model_type": "vit", "architectures": ["ViTForImageClassification"]})
    assert not is_timm_config(["architecture"])


def test_load_from_the_hub_downloads_the_config_first(hub, built, tmp_path):
    """The real Hub code path (hf_hub_download over HTTP, olah on 127.0.0.1): a refused variant is decided from its
    config.json before its weights are downloaded, and a repo with only pickled weights is refused."""
    sha = hub.create_repo_from_folder("timm/vit-small-selfexplain", built.folder("small"))
    cache = tmp_path / "cache"
    model = load_timm_checkpoint("timm/vit-small-selfexplain", revision=sha, cache_dir=cache)
    with torch.no_grad():
        assert torch.allclose(
            model(built.input_of("small")).logits, built.logits("small"), atol=1e-5, rtol=1e-5
        )
    assert getattr(model.config, TIMM_SOURCE_ATTRIBUTE)["revision"] == sha

    hub.create_repo_from_folder("timm/vit-avg-pool", built.folder("avg_pool"))
    with pytest.raises(UnsupportedModelError, match="global_pool"):
        load_timm_checkpoint("timm/vit-avg-pool", cache_dir=cache)
    assert not list(cache.glob("models--timm--vit-avg-pool/**/model.safetensors"))

    hub.create_repo_from_folder("timm/vit-pickled", built.folder("pickled"))
    with pytest.raises(OSError, match="safetensors only"):
        load_timm_checkpoint("timm/vit-pickled", cache_dir=cache)
    assert not list(cache.glob("models--timm--vit-pickled/**/*.bin"))


# ------------------------------------------------------------------------------------------ vector patching


@pytest.fixture(scope="module")
def vector() -> ExplanationVector:
    """A vector from two tiny ViTs of tests/_tiny.py, whose architecture `tiny_arch` was built with in timm."""
    explaining = tiny_self_explaining(seed=60, explanation_head="extension")
    with torch.no_grad():  # the extension's outputs start at zero: make it do something
        for param in explaining.explainer.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(8)))
    return ExplanationVector.from_models(
        self_explaining=explaining,
        prediction_only=tiny_classifier(seed=61),
        base_model="org/tiny-base",
        recommended_alpha=0.5,
    )


def test_apply_explanation_vector_to_a_loaded_timm_model(built, vector):
    model = load_timm_checkpoint(built.folder("tiny_arch"))
    before = {name: tensor.clone() for name, tensor in serialized_state_dict(model).items()}
    patched = apply_explanation_vector(model, vector, alpha=0.5)
    after = serialized_state_dict(patched)
    for key, tau in vector.tensors.items():
        base = before.get(key, torch.zeros_like(tau))  # the extension is new: it starts at zero
        assert torch.equal(after[key], base + 0.5 * tau), key
    assert torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert patched.config.id2label == dict(enumerate(TINY_LABELS))
    assert getattr(patched.config, TIMM_SOURCE_ATTRIBUTE)["architecture"] == "vit_tiny_patch16_224"
    with torch.no_grad():
        unpatched = apply_explanation_vector(model, vector, alpha=0.0)(built.input_of("tiny_arch")).logits
    assert torch.allclose(unpatched, built.logits("tiny_arch"), atol=1e-5, rtol=1e-5)


def test_apply_explanation_vector_to_a_timm_folder_is_the_loaded_path(built, vector, tmp_path):
    """A timm folder given to `apply_explanation_vector` is converted, patched, and gives the same bits as
    patching the loaded model; a refused variant is refused with the reason there too."""
    folder = built.folder("tiny_arch")
    from_folder = apply_explanation_vector(folder, vector, alpha=0.5)
    from_loaded = apply_explanation_vector(load_timm_checkpoint(folder), vector, alpha=0.5)
    assert serialized_state_dict(from_folder).keys() == serialized_state_dict(from_loaded).keys()
    for key, tensor in serialized_state_dict(from_loaded).items():
        assert torch.equal(serialized_state_dict(from_folder)[key], tensor), key
    assert from_folder.config.selfexplain_applied_vector["alpha"] == 0.5
    with pytest.raises(UnsupportedModelError, match="avg"):
        apply_explanation_vector(built.folder("avg_pool"), vector)


# ------------------------------------------------------------------------------------------------ saving


@pytest.mark.parametrize(
    "input_layer", [None, 1]
)  # the extension reads the final tokens, or block 1's output
def test_save_and_load_through_selfexplain_restores_the_model(tmp_path, input_layer):
    model = tiny_self_explaining(
        seed=70,
        explanation_head="extension",
        explanation_extension_input_layer=input_layer,
        layer_norm_eps=1e-6,
        num_labels=5,
    )
    model.config.id2label = dict(enumerate(TINY_LABELS))
    model.config.label2id = {label: i for i, label in enumerate(TINY_LABELS)}
    with torch.no_grad():
        for param in model.explainer.parameters():
            param.add_(0.1)
    folder = save_timm_checkpoint(model, tmp_path / "out")
    weights = load_file(folder / "model.safetensors")
    assert "blocks.1.attn.qkv.weight" in weights and "head.weight" in weights
    assert not any(name.startswith(("vit.", "explainer.")) for name in weights)
    config = json.loads((folder / "config.json").read_text())
    assert config["label_names"] == TINY_LABELS and config["global_pool"] == "token"
    assert config["model_args"]["num_heads"] == 2 and config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert (folder / EXPLAINER_WEIGHTS_NAME).is_file()

    loaded = load_timm_checkpoint(folder)
    assert loaded.explainer is not None and loaded.config.explanation_extension_input_layer == input_layer
    assert serialized_state_dict(loaded).keys() == serialized_state_dict(model).keys()
    for key, tensor in serialized_state_dict(model).items():
        assert torch.equal(serialized_state_dict(loaded)[key], tensor), key
    x = pixels(2)
    with torch.no_grad():
        want, got = model(x, explain="all"), loaded(x, explain="all")
    assert torch.equal(got.logits, want.logits) and torch.equal(got.explanation, want.explanation)

    # A model without an extension saved into the same folder leaves no stale extension behind.
    save_timm_checkpoint(tiny_classifier(seed=71, layer_norm_eps=1e-6), folder)
    assert not (folder / EXPLAINER_WEIGHTS_NAME).exists()
    assert load_timm_checkpoint(folder).explainer is None


def test_key_conversion_is_its_own_inverse():
    model = tiny_classifier(seed=72)
    state = serialized_state_dict(model)
    back = timm_to_vit_state_dict(vit_to_timm_state_dict(state, 2), 2)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert set(serialized_names(model)) == set(state)


def test_save_warns_about_another_layer_norm_eps_and_refuses_another_activation(tmp_path):
    with pytest.warns(UserWarning, match="layer_norm_eps is 1e-12; timm's ViT uses 1e-06"):
        save_timm_checkpoint(tiny_classifier(seed=73), tmp_path / "eps")
    with pytest.raises(UnsupportedModelError, match="'gelu_new'"):
        save_timm_checkpoint(tiny_classifier(seed=73, hidden_act="gelu_new"), tmp_path / "act")
    assert not (tmp_path / "act" / "model.safetensors").exists()


@dataclass
class Reloaded:
    root: Path
    by_timm: dict[str, torch.Tensor]  # the logits timm computes from each saved folder
    by_selfexplain: dict[str, torch.Tensor]  # the logits of the model that was saved


@pytest.fixture(scope="module")
def reloaded(built, vector, tmp_path_factory) -> Reloaded:
    """Models saved with `save_timm_checkpoint` and loaded back by timm (one timm process): a timm checkpoint
    loaded and saved again (loaded by timm two ways), the same kind with a vector applied (an explanation
    extension included), and a transformers ViT classifier."""
    root = tmp_path_factory.mktemp("timm-reloaded")
    labels = dict(enumerate(TINY_LABELS))
    models = {
        "small": (load_timm_checkpoint(built.folder("small")), "x32"),
        "applied": (apply_explanation_vector(load_timm_checkpoint(built.folder("tiny_arch")), vector), "x16"),
        "transformers": (
            tiny_classifier(seed=74, num_labels=5, layer_norm_eps=1e-6, id2label=labels),
            "x16",
        ),
    }
    jobs, by_selfexplain = [], {}
    for name, (model, input_name) in models.items():
        save_timm_checkpoint(model, root / name)
        with torch.no_grad():
            by_selfexplain[name] = model(built.inputs[input_name]).logits
        job = {"op": "load", "name": name, "folder": str(root / name), "input": input_name}
        jobs.append(job | {"logits": str(root / f"{name}.logits.safetensors")})
    jobs.append(
        jobs[0] | {"name": "small_overlay", "how": "overlay", "logits": str(root / "overlay.safetensors")}
    )
    by_selfexplain["small_overlay"] = by_selfexplain["small"]
    results = run_in_timm_venv(jobs, built.root / "inputs.safetensors", root)
    assert {job["class"] for job in results["jobs"].values()} == {"VisionTransformer"}, results
    by_timm = {job["name"]: load_file(job["logits"])["logits"] for job in jobs}
    return Reloaded(root, by_timm, by_selfexplain)


@pytest.mark.parametrize("name", ["small", "small_overlay", "applied", "transformers"])
def test_saved_checkpoint_loads_in_timm_with_the_same_logits(reloaded, name):
    assert torch.allclose(reloaded.by_timm[name], reloaded.by_selfexplain[name], atol=1e-5, rtol=1e-5)


def test_saved_timm_config_keeps_the_source_preprocessing(built, reloaded):
    root = reloaded.root
    source = json.loads((built.folder("small") / "config.json").read_text())
    saved = json.loads((root / "small" / "config.json").read_text())
    assert saved["architecture"] == source["architecture"] and saved["label_names"] == LABELS
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        assert saved["pretrained_cfg"][key] == source["pretrained_cfg"][key], key
    applied = json.loads((root / "applied" / "config.json").read_text())
    assert applied["selfexplain"]["explanation_extension_layers"] == 1
    assert (
        applied["selfexplain"]["config"]["selfexplain_applied_vector"]["vector_base_model"] == "org/tiny-base"
    )
    assert (root / "applied" / EXPLAINER_WEIGHTS_NAME).is_file()
