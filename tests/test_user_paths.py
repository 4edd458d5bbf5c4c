"""What a new user hits: the README's heatmap calls, saved files, α, complete applied models, `explain`'s
pictures, and errors that say what an argument is. Each at the level the user touches; CLI errors by their text.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from PIL import Image, ImageDraw

from selfexplain import (
    ExplanationVector,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
    explanation_to_heatmap,
    overlay_heatmap,
)
from selfexplain.cli import main
from selfexplain.cli.explain import _seen_region
from selfexplain.data import default_image_processor
from selfexplain.errors import NotAModelError
from selfexplain.vectors.io import TEMPORARY_PREFIX, classify_source, remove_stale_temporaries
from tests._tiny import tiny_classifier, tiny_self_explaining

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
VECTOR_FILES = {"README.md", "explanation_vector.safetensors", "explanation_vector_config.json"}


def make_vector(seed: int = 60, alpha: float = 0.5) -> ExplanationVector:
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=seed),
        prediction_only=tiny_classifier(seed=seed + 1),
        recommended_alpha=alpha,
    )


def same_tensors(a: ExplanationVector, b: ExplanationVector) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


@pytest.fixture()
def folders(tmp_path):
    """A classifier with an image processor, a prediction-only one without, a vector, a dataset folder."""
    labels = {0: "cat", 1: "dog", 2: "bird"}
    tiny_classifier(seed=52, id2label=labels, label2id={v: k for k, v in labels.items()}).save_pretrained(
        tmp_path / "target"
    )
    default_image_processor(16).save_pretrained(tmp_path / "target")
    tiny_classifier(seed=53).save_pretrained(tmp_path / "plain")
    make_vector().save_pretrained(tmp_path / "vec")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    return tmp_path


# ------------------------------------------------------------------------------------------ 1. heatmaps


def wide_image() -> Image.Image:
    image = Image.new("RGB", (200, 100), (240, 200, 120))  # PIL size: (width, height)
    ImageDraw.Draw(image).ellipse((20, 20, 80, 80), fill=(30, 120, 30))
    return image


def test_the_readme_heatmap_calls_work_for_one_image(tmp_path):
    image = wide_image()
    explanation = torch.tensor([[[-1.0, 0.0, 0.5, 2.0], [-0.5, 0.0, 0.0, 1.0]]])  # a batch of one: (1, 2, 4)
    for heat in (
        explanation_to_heatmap(explanation, size=image.size),  # PIL's (width, height), by name
        explanation_to_heatmap(explanation, image=image),
        explanation_to_heatmap(explanation, image),  # a PIL image where the size goes
        explanation_to_heatmap(explanation[0], (image.height, image.width)),  # tensor order, positionally
    ):
        assert heat.shape[-2:] == (100, 200)  # (height, width): oriented as the image
        picture = overlay_heatmap(image, heat)  # (1, H, W) and (H, W) both accepted
        assert picture.size == image.size and picture.mode == "RGB"
    heat = explanation_to_heatmap(explanation, size=image.size)[0]
    assert heat[50, 5] < heat[50, 195]  # the grid's left column lands on the image's left
    # The map itself, signed: blue where it is negative (left), red where it is positive (right).
    picture = np.asarray(overlay_heatmap(image, explanation[0]), dtype=int)
    left, right = picture[10, 5], picture[10, 195]
    assert left[2] > left[0] + 25 and right[0] > right[2] + 25
    overlay_heatmap(image, explanation_to_heatmap(explanation, image=image, normalize="signed")).save(
        tmp_path / "signed.png"
    )


def test_signed_maps_use_diverging_colours_centred_on_zero():
    image = Image.new("RGB", (40, 20), (128, 128, 128))
    heat = torch.zeros(20, 40)
    heat[:, :10], heat[:, 30:] = -1.0, 1.0
    picture = np.asarray(overlay_heatmap(image, heat, alpha=1.0), dtype=int)
    blue, neutral, red = picture[10, 2], picture[10, 20], picture[10, 37]
    assert blue[2] > 80 and blue[0] < 20  # dark blue
    assert red[0] > 80 and red[2] < 50  # dark red
    assert neutral.min() > 240  # white: zero is neutral
    # Unsigned maps ([0, 1], e.g. min-max normalised) get a light-to-dark sequential ramp instead.
    ramp = np.asarray(overlay_heatmap(image, heat.clamp(min=0), alpha=1.0, signed=False), dtype=int)
    assert ramp[10, 2].sum() > ramp[10, 37].sum()


def test_overlay_refuses_transposed_stretched_and_batched_maps():
    image = wide_image()
    explanation = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="transposed.*image.size"):
        overlay_heatmap(image, explanation_to_heatmap(explanation, image.size))  # (W, H) read as (H, W)
    with pytest.raises(ValueError, match="aspect ratios differ"):
        overlay_heatmap(image, torch.randn(4, 4))
    assert overlay_heatmap(image, torch.randn(4, 4), stretch=True).size == image.size
    assert overlay_heatmap(image, torch.randn(50, 100)).size == image.size  # same aspect: upsampled
    with pytest.raises(ValueError, match=r"heatmap\[i\]"):
        overlay_heatmap(image, torch.randn(2, 100, 200))
    with pytest.raises(TypeError, match="exactly one of"):
        explanation_to_heatmap(explanation, (100, 200), image=image)
    with pytest.raises(TypeError, match="exactly one of"):
        explanation_to_heatmap(explanation)


def test_seen_region_follows_a_cropping_processor():
    resize_only = SimpleNamespace(do_resize=True, size={"height": 32, "width": 32}, do_center_crop=False)
    assert _seen_region(resize_only, 512, 256) == (0.0, 0.0, 512.0, 256.0)
    deit = SimpleNamespace(
        do_resize=True,
        size={"height": 256, "width": 256},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
    )
    assert _seen_region(deit, 512, 256) == (32.0, 16.0, 480.0, 240.0)


# -------------------------------------------------------------------------------- 2. saved vector files


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_vector_files_get_the_mode_of_a_normal_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        make_vector().save_pretrained(tmp_path / "vec")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "vec").iterdir()}
    assert modes == dict.fromkeys(VECTOR_FILES, mode)


KILLED_SAVE = r"""
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from selfexplain import ExplanationVector
from selfexplain.vectors import vector as vector_module
from tests._tiny import tiny_classifier, tiny_self_explaining

folder, mode = Path(sys.argv[1]), sys.argv[2]
new = ExplanationVector.from_models(
    self_explaining=tiny_self_explaining(seed=70), prediction_only=tiny_classifier(seed=71)
)
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if mode == "writing":  # killed inside safetensors' write: its own half-written temporary file is there
    def save_file(tensors, path, metadata=None):
        (Path(path).parent / ".tmpAb12Cd").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        die()
    vector_module.save_file = save_file
elif mode == "renaming":  # every file complete in the temporary folder, killed before the first rename
    os.replace = die
print("ready", flush=True)
while True:  # "external": saved over and over until the parent kills it
    new.save_pretrained(folder)
    if mode != "external":
        break
"""


@pytest.mark.slow  # three child processes, each importing torch
def test_a_save_killed_with_sigkill_keeps_the_old_vector_and_leaves_nothing(tmp_path):
    old = make_vector(seed=60)
    new = ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=70), prediction_only=tiny_classifier(seed=71)
    )
    children = {}
    for mode in ("writing", "renaming", "external"):
        old.save_pretrained(tmp_path / mode)
        children[mode] = subprocess.Popen(
            [sys.executable, "-c", KILLED_SAVE, str(tmp_path / mode), mode, str(ROOT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    external, folder = children["external"], tmp_path / "external"
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(TEMPORARY_PREFIX) for p in folder.iterdir()):
        assert external.poll() is None and time.monotonic() < deadline, external.stderr.read()
    external.send_signal(signal.SIGKILL)  # wherever the child happens to be in a save
    for mode, child in children.items():
        assert child.wait(timeout=300) == -signal.SIGKILL, (mode, child.stderr.read())

    for mode in ("writing", "renaming"):
        left = {p.name for p in (tmp_path / mode).iterdir()} - VECTOR_FILES
        assert len(left) == 1 and next(iter(left)).startswith(TEMPORARY_PREFIX), (
            left
        )  # one recognisable folder
    # The next load removes it (and still reads the old vector); so does the next save.
    assert same_tensors(ExplanationVector.from_pretrained(tmp_path / "writing"), old)
    assert {p.name for p in (tmp_path / "writing").iterdir()} == VECTOR_FILES
    assert same_tensors(ExplanationVector.from_pretrained(tmp_path / "renaming"), old)
    old.save_pretrained(tmp_path / "renaming")
    assert {p.name for p in (tmp_path / "renaming").iterdir()} == VECTOR_FILES
    # Killed anywhere: a whole vector, the old or the new one, and nothing else after the next load.
    loaded = ExplanationVector.from_pretrained(folder)
    assert same_tensors(loaded, old) or same_tensors(loaded, new)
    assert {p.name for p in folder.iterdir()} == VECTOR_FILES


def test_only_stale_temporaries_are_removed(tmp_path):
    from selfexplain.vectors.io import _host

    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(finished.stdout)
    names = {
        "mine": f"{TEMPORARY_PREFIX}{_host()}-{os.getpid()}-abcd1234",  # a save in progress here: kept
        "dead": f"{TEMPORARY_PREFIX}{_host()}-{dead}-abcd1234",
        "other host": f"{TEMPORARY_PREFIX}elsewhere-{os.getpid()}-abcd1234",  # cannot be checked: kept a day
        "old": f"{TEMPORARY_PREFIX}elsewhere-1-abcd1234",
        "legacy": f".explanation_vector.safetensors.tmp-{dead}",
        "unrelated": ".tmp-something-else",
    }
    for kind, name in names.items():
        if kind in ("legacy", "unrelated"):
            (tmp_path / name).write_text("x")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "explanation_vector.safetensors").write_text("partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (tmp_path / names["old"], tmp_path / names["old"] / "explanation_vector.safetensors"):
        os.utime(path, (two_days_ago, two_days_ago))
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([names["dead"], names["old"], names["legacy"]])
    assert {p.name for p in tmp_path.iterdir()} == {names["mine"], names["other host"], names["unrelated"]}


# ------------------------------------------------------------------------------- 3. recommended α


def test_recommended_alpha_is_a_read_only_property_and_the_default(folders):
    vector = ExplanationVector.from_pretrained(folders / "vec")
    assert vector.recommended_alpha == 0.5 == vector.config.recommended_alpha
    with pytest.raises(AttributeError):
        vector.recommended_alpha = 2.0
    default = apply_explanation_vector(folders / "target", folders / "vec")  # alpha=None
    explicit = apply_explanation_vector(folders / "target", folders / "vec", alpha=0.5)
    assert default.config.selfexplain_applied_vector["alpha"] == 0.5
    assert all(
        torch.equal(a, b)
        for a, b in zip(default.state_dict().values(), explicit.state_dict().values(), strict=True)
    )
    other = apply_explanation_vector(folders / "target", folders / "vec", alpha=1.0)
    assert not all(
        torch.equal(a, b)
        for a, b in zip(other.state_dict().values(), default.state_dict().values(), strict=True)
    )
    assert (
        make_vector(alpha=0.25).apply_to(tiny_classifier(seed=52)).config.selfexplain_applied_vector["alpha"]
        == 0.25
    )


# ---------------------------------------------------------------------- 4. applied models are complete


def test_an_applied_and_saved_model_runs_in_a_pipeline(folders):
    import transformers

    applied = apply_explanation_vector(folders / "target", folders / "vec")
    applied.save_pretrained(folders / "out")
    assert (folders / "out" / "preprocessor_config.json").is_file()
    classify = transformers.pipeline("image-classification", model=str(folders / "out"))
    predictions = classify(wide_image())
    assert {p["label"] for p in predictions} == {"cat", "dog", "bird"}
    # A loaded model passed on keeps the processor; one without a processor saves none.
    again = apply_explanation_vector(applied, folders / "vec", alpha=0.0)
    again.save_pretrained(folders / "again")
    assert (folders / "again" / "preprocessor_config.json").is_file()
    apply_explanation_vector(folders / "plain", folders / "vec").save_pretrained(folders / "bare")
    assert not (folders / "bare" / "preprocessor_config.json").exists()


def test_an_image_processor_that_names_repo_code_is_left_behind_unrun(folders, tmp_path):
    marker = tmp_path / "REMOTE_CODE_RAN"
    shutil.copytree(folders / "target", tmp_path / "custom")
    config_file = tmp_path / "custom" / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoImageProcessor": "processor.EvilProcessor"}
    config_file.write_text(json.dumps(config))
    (tmp_path / "custom" / "processor.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import ViTImageProcessor\nclass EvilProcessor(ViTImageProcessor):\n    pass\n"
    )
    apply_explanation_vector(tmp_path / "custom", folders / "vec").save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "preprocessor_config.json").exists() and not marker.exists()


def test_cli_apply_writes_the_processor(folders, capsys):
    argv = ["apply", "--model", str(folders / "target"), "--vector", str(folders / "vec")]
    assert main([*argv, "--output-dir", str(folders / "out")]) == 0
    assert (folders / "out" / "preprocessor_config.json").is_file()
    assert "α = 0.5" in capsys.readouterr().out
    argv[2] = str(folders / "plain")
    assert main([*argv, "--output-dir", str(folders / "bare")]) == 0
    assert "has no image processor" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- 5. explain


def run_explain(model: Path, *images, out: Path) -> int:
    return main(["explain", "--model", str(model), *map(str, images), "--output-dir", str(out)])


def test_explain_writes_labelled_maps_at_the_images_own_resolution(folders, capsys, tmp_path):
    assert main(["apply", "--model", str(folders / "target"), "--vector", str(folders / "vec"),
                 "--output-dir", str(folders / "applied")]) == 0  # fmt: skip
    capsys.readouterr()
    big = Image.new("RGB", (300, 240), (30, 160, 90))
    ImageDraw.Draw(big).rectangle((200, 100, 290, 230), fill=(250, 250, 250))
    big.save(tmp_path / "big.png")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "small.png")
    assert (
        run_explain(folders / "applied", tmp_path / "big.png", tmp_path / "small.png", out=tmp_path / "maps")
        == 0
    )
    captured = capsys.readouterr()
    assert "prediction-only" not in captured.err
    predictions = json.loads((tmp_path / "maps" / "predictions.json").read_text())
    assert [p["label"] in {"cat", "dog", "bird"} for p in predictions] == [True, True]
    picture = Image.open(tmp_path / "maps" / "big_explanation.png").convert("RGB")
    assert picture.size == (300, 240)  # the image's own size
    assert Image.open(tmp_path / "maps" / "small_explanation.png").size == (224, 224)  # 16 px × 14, readable
    # The class and probability are written on the picture: white text on a dark box, top left.
    box = np.asarray(picture, dtype=int)[:20, :80]
    assert (box.min(axis=-1) > 200).sum() > 20 and np.median(box.max(axis=-1)) < 100
    assert f"{predictions[0]['probability']:.1%}" in captured.out


def test_explain_skips_bad_files_explains_the_rest_and_fails_at_the_end(folders, capsys, tmp_path):
    Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit) as info:
        run_explain(folders / "target", tmp_path / "notes.txt", tmp_path / "good.png", tmp_path / "gone.png",
                    out=tmp_path / "maps")  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "2 of 3 file(s) could not be explained" in err
    assert "notes.txt: not an image file" in err and "gone.png: no such file" in err
    assert (tmp_path / "maps" / "good_explanation.png").is_file()
    assert [p["image"] for p in json.loads((tmp_path / "maps" / "predictions.json").read_text())] == [
        str(tmp_path / "good.png")
    ]


def test_explain_warns_that_a_prediction_only_models_map_means_nothing(folders, capsys, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    assert run_explain(folders / "plain", tmp_path / "x.png", out=tmp_path / "a") == 0  # the key is missing
    assert "prediction-only model" in capsys.readouterr().err
    zero = tiny_self_explaining(seed=54)
    zero.config.explanation_loss_weight = 0.0
    zero.save_pretrained(tmp_path / "zero")
    assert run_explain(tmp_path / "zero", tmp_path / "x.png", out=tmp_path / "b") == 0
    assert "prediction-only model" in capsys.readouterr().err
    tiny_self_explaining(seed=55).save_pretrained(tmp_path / "se")  # explanation_loss_weight 1
    assert run_explain(tmp_path / "se", tmp_path / "x.png", out=tmp_path / "c") == 0
    assert "prediction-only" not in capsys.readouterr().err


# ------------------------------------------------------------------------------- 6. what an argument is


def cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    return err


@pytest.mark.parametrize(
    ("command", "option", "name", "message"),
    [
        (
            "explain",
            "--model",
            "vec",
            "--model {} is an explanation vector, not a model: pass it as --vector",
        ),
        ("apply", "--model", "vec", "--model {} is an explanation vector, not a model: pass it as --vector"),
        ("extract-vector", "--prediction-only", "vec", "--prediction-only {} is an explanation vector"),
        (
            "apply",
            "--vector",
            "target",
            "--vector {} is a model, not an explanation vector: pass it as --model",
        ),
        ("apply", "--model", "data", "--model {} is a dataset folder, not a model"),
        ("apply", "--vector", "data", "--vector {} is a dataset folder, not an explanation vector"),
        ("explain", "--model", "missing/a/b", "--model {}: no such folder."),
        ("apply", "--vector", "./missing", "--vector {}: no such folder."),
        (
            "apply",
            "--model",
            "target/config.json",
            "--model {} is a file: pass the folder that holds config.json",
        ),
        ("apply", "--model", "data/train", "--model {} holds no config.json (a model)"),
    ],
)
def test_wrong_arguments_say_what_they_are(folders, capsys, command, option, name, message, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    path = str(folders / name)
    args = {
        "explain": ["explain", "--model", str(folders / "target"), str(tmp_path / "x.png")],
        "apply": ["apply", "--model", str(folders / "target"), "--vector", str(folders / "vec")],
        "extract-vector": [
            "extract-vector",
            "--self-explaining",
            str(folders / "target"),
            "--prediction-only",
            str(folders / "target"),
        ],  # fmt: skip
    }[command]
    args[args.index(option) + 1] = path
    err = cli_error([*args, "--output-dir", str(tmp_path / "out")], capsys)
    assert message.format(path) in err
    assert not (tmp_path / "out").exists()


def test_library_errors_say_what_the_model_argument_is(folders):
    with pytest.raises(NotAModelError, match="is an explanation vector, not a model"):
        apply_explanation_vector(folders / "vec", folders / "vec")
    with pytest.raises(NotAModelError, match="is a dataset folder, not a model"):
        apply_explanation_vector(folders / "data", folders / "vec")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        apply_explanation_vector(folders / "nowhere", folders / "vec")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ExplanationVector.from_pretrained(folders / "nowhere")


def test_a_hub_id_while_offline_fails_at_once(folders, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    called = []
    monkeypatch.setattr(
        ViTForSelfExplainingClassification, "from_pretrained", lambda *a, **k: called.append(a)
    )
    for argv in (
        ["apply", "--model", "org/not-cached", "--vector", str(folders / "vec")],
        ["apply", "--model", str(folders / "target"), "--vector", "org/not-cached"],
        ["explain", "--model", "org/not-cached", str(folders / "x.png")],
    ):
        err = cli_error([*argv, "--output-dir", str(tmp_path / "out")], capsys)
        assert "org/not-cached: no such local folder, and the Hub is offline (HF_HUB_OFFLINE=1)" in err
    assert called == []
    with pytest.raises(OSError, match="the Hub is offline"):
        apply_explanation_vector("org/not-cached", folders / "vec")


@pytest.mark.slow  # a child process importing torch
def test_a_hub_id_while_offline_fails_at_once_from_the_shell(folders):
    """The same as a user runs it: `HF_HUB_OFFLINE=1 selfexplain apply --model <hub id> ...`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfexplain.cli",
            "apply",
            "--model",
            "org/not-cached",
            "--vector",
            str(folders / "vec"),
            "--output-dir",
            str(folders / "out"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert "the Hub is offline (HF_HUB_OFFLINE=1)" in result.stderr
    assert "couldn't connect" not in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 300  # no retries or timeouts (the rest is importing torch)


def test_offline_hub_ids_in_the_cache_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    for repo, filename in (
        ("org/cached-model", "config.json"),
        ("org/cached-vector", "explanation_vector_config.json"),
    ):
        repo_dir = tmp_path / f"models--{repo.replace('/', '--')}"
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text("0" * 40)
        (repo_dir / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (repo_dir / "snapshots" / ("0" * 40) / filename).write_text("{}")
    assert classify_source("org/cached-model", cache_dir=tmp_path).kind == "model"
    assert classify_source("org/cached-vector", cache_dir=tmp_path).kind == "vector"
    found = classify_source("org/other", cache_dir=tmp_path)
    assert found.kind == "hub" and found.offline_miss
