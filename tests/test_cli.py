"""The `selfexplain` command line on tiny models (in process, as a user would call it)."""

import json

import pytest
import torch
from PIL import Image

from selfexplain import ExplanationVector, ViTForSelfExplainingClassification
from selfexplain.cli import main
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining


@pytest.fixture()
def models(tmp_path):
    tiny_self_explaining(seed=50).save_pretrained(tmp_path / "se")
    tiny_classifier(seed=51).save_pretrained(tmp_path / "po")
    labels = {0: "cat", 1: "dog", 2: "bird"}
    tiny_classifier(seed=52, id2label=labels, label2id={v: k for k, v in labels.items()}).save_pretrained(
        tmp_path / "target"
    )
    return tmp_path


def test_extract_apply_explain_round_trip(models, capsys):
    root = models
    assert (
        main(
            [
                "extract-vector",
                "--self-explaining",
                str(root / "se"),
                "--prediction-only",
                str(root / "po"),
                "--output-dir",
                str(root / "vec"),
                "--alpha",
                "0.5",
                "--source-dataset",
                "builtin:mnist",
            ]
        )
        == 0
    )
    vector = ExplanationVector.from_pretrained(root / "vec")
    assert (
        vector.config.recommended_alpha == 0.5
        and vector.config.provenance["source_dataset"] == "builtin:mnist"
    )

    assert (
        main(
            [
                "apply",
                "--model",
                str(root / "target"),
                "--vector",
                str(root / "vec"),
                "--output-dir",
                str(root / "out"),
            ]
        )
        == 0
    )
    model = ViTForSelfExplainingClassification.from_pretrained(root / "out").eval()
    assert model.config.id2label[1] == "dog"
    assert "α = 0.5" in (root / "out" / "README.md").read_text()
    expected = vector.apply_to(ViTForSelfExplainingClassification.from_pretrained(root / "target"))
    with torch.no_grad():
        assert torch.equal(model(pixels(1)).logits, expected.eval()(pixels(1)).logits)

    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), color=(200, 30, 30) if name == "a.png" else (10, 200, 10)).save(
            root / name
        )
    assert (
        main(
            [
                "explain",
                "--model",
                str(root / "out"),
                str(root / "a.png"),
                str(root / "b.png"),
                "--output-dir",
                str(root / "maps"),
            ]
        )
        == 0
    )
    predictions = json.loads((root / "maps" / "predictions.json").read_text())
    assert [p["label"] in {"cat", "dog", "bird"} for p in predictions] == [True, True]
    # The image's own resolution, enlarged by a whole factor (16 px × 14) so that the written label is readable.
    assert Image.open(root / "maps" / "a_explanation.png").size == (224, 224)
    assert "a.png" in capsys.readouterr().out


def test_bad_inputs_name_the_input(models, capsys):
    root = models
    (root / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "explain",
                "--model",
                str(root / "target"),
                str(root / "notes.txt"),
                "--output-dir",
                str(root / "maps"),
            ]
        )
    assert info.value.code == 2 and "notes.txt: not an image file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(
            [
                "apply",
                "--model",
                str(root / "target"),
                "--vector",
                str(root / "po"),
                "--output-dir",
                str(root / "x"),
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--vector {root / 'po'} is a model, not an explanation vector" in err


@pytest.mark.parametrize(
    "command",
    ["pretrain-base", "shapley-targets", "train", "extract-vector", "apply", "explain", "experiment", "demo"],
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and "usage: selfexplain" in capsys.readouterr().out


def test_shapley_targets_feed_self_explaining_training(tmp_path):
    """The README's chain: targets from a prediction-only model, then `train` with λ > 0 on them."""
    tiny_classifier(seed=53, num_labels=2).save_pretrained(tmp_path / "pred")
    tiny_classifier(seed=54, num_labels=2).save_pretrained(tmp_path / "base")
    common = ["--output-dir", str(tmp_path / "targets")]
    args = [
        "shapley-targets",
        "--model",
        str(tmp_path / "pred"),
        "--dataset",
        "builtin:faces",
        "--num-samples",
        "8",
    ]
    assert main([*args, "--grid", "2", "2", "--budget", "8", *common]) == 0
    assert (
        main(
            [
                "train",
                "--base",
                str(tmp_path / "base"),
                "--train-data",
                str(tmp_path / "targets" / "dataset"),
                "--eval-split",
                "none",
                "--explanation-loss-weight",
                "1",
                "--num-epochs",
                "1",
                "--batch-size",
                "4",
                "--checkpoint-every",
                "none",
                "--output-dir",
                str(tmp_path / "se"),
            ]
        )
        == 0
    )
    log = [json.loads(line) for line in (tmp_path / "se" / "log.jsonl").read_text().splitlines()]
    assert any(entry.get("explanation_loss") is not None for entry in log)
    assert (
        ViTForSelfExplainingClassification.from_pretrained(tmp_path / "se").config.explanation_loss_weight
        == 1.0
    )


def test_explain_accepts_any_mode_and_size_and_refuses_bombs(models, capsys, monkeypatch):
    root = models
    Image.new("L", (5, 3), color=128).save(root / "gray.png")
    Image.new("RGBA", (1, 1), color=(1, 2, 3, 4)).save(root / "tiny.png")
    Image.new("P", (300, 200)).save(root / "palette.png")
    files = [str(root / n) for n in ("gray.png", "tiny.png", "palette.png")]
    assert main(["explain", "--model", str(root / "target"), *files, "--output-dir", str(root / "maps")]) == 0
    assert len(json.loads((root / "maps" / "predictions.json").read_text())) == 3
    # PIL refuses images over twice its pixel limit before decoding them: a clear error, not an OOM.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(SystemExit) as info:
        main(
            [
                "explain",
                "--model",
                str(root / "target"),
                str(root / "palette.png"),
                "--output-dir",
                str(root / "m2"),
            ]
        )
    assert info.value.code == 2 and "too large to open safely" in capsys.readouterr().err


def test_explain_can_refine_the_single_pass_with_kernel_shap(models, capsys):
    root = models
    Image.new("RGB", (16, 16), color=(200, 30, 90)).save(root / "a.png")
    Image.effect_noise((16, 16), 60).convert("RGB").save(root / "b.png")
    files = [str(root / "a.png"), str(root / "b.png")]
    assert main(["explain", "--model", str(root / "se"), *files, "--output-dir", str(root / "single")]) == 0
    command = ["explain", "--model", str(root / "se"), *files, "--refine-budget", "34"]
    assert main([*command, "--output-dir", str(root / "refined")]) == 0
    single = json.loads((root / "single" / "predictions.json").read_text())
    refined = json.loads((root / "refined" / "predictions.json").read_text())
    assert [r["explanation"] for r in single] == ["single pass"] * 2
    assert [r["explanation"] for r in refined] == ["Kernel SHAP, 34 evaluations, prior: the single pass"] * 2
    assert [r["class_index"] for r in refined] == [r["class_index"] for r in single]  # same predictions
    noisy = [Image.open(root / d / "b_explanation.png") for d in ("single", "refined")]
    assert noisy[0].tobytes() != noisy[1].tobytes()  # another map over the same image
    with pytest.raises(SystemExit) as info:
        main([*command[:-1], "1", "--output-dir", str(root / "bad")])
    assert info.value.code == 2 and "--refine-budget must be 0" in capsys.readouterr().err


def test_explain_can_blend_the_single_pass_with_attention_rollout(models, capsys):
    root = models
    Image.effect_noise((16, 16), 60).convert("RGB").save(root / "n.png")
    base = ["explain", "--model", str(root / "se"), str(root / "n.png")]
    assert main([*base, "--output-dir", str(root / "one")]) == 0
    assert main([*base, "--blend-rollout", "--output-dir", str(root / "blend")]) == 0
    single = json.loads((root / "one" / "predictions.json").read_text())
    blended = json.loads((root / "blend" / "predictions.json").read_text())
    assert [r["explanation"] for r in blended] == ["single pass blended with attention rollout"]
    assert blended[0]["class_index"] == single[0]["class_index"]
    pictures = [Image.open(root / d / "n_explanation.png") for d in ("one", "blend")]
    assert pictures[0].tobytes() != pictures[1].tobytes()
    with pytest.raises(SystemExit) as info:
        main([*base, "--blend-rollout", "--refine-budget", "34", "--output-dir", str(root / "both")])
    assert info.value.code == 2 and "cannot be combined" in capsys.readouterr().err


def test_apply_fits_alpha_on_unlabelled_images_and_stores_a_compact_vector(models, capsys):
    root = models
    common = ["--self-explaining", str(root / "se"), "--prediction-only", str(root / "po")]
    assert (
        main(["extract-vector", *common, "--compression", "low_rank:2", "--output-dir", str(root / "vec")])
        == 0
    )
    assert ExplanationVector.from_pretrained(root / "vec").config.compression["rank"] == 2
    images = root / "unlabelled"
    images.mkdir()
    for i in range(6):
        Image.fromarray(
            pixels(batch=1, seed=i)[0].permute(1, 2, 0).mul(60).add(128).clamp(0, 255).byte().numpy()
        ).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image: skipped by suffix")
    args = [
        "apply",
        "--model",
        str(root / "target"),
        "--vector",
        str(root / "vec"),
        "--output-dir",
        str(root / "out"),
    ]
    assert main([*args, "--fit-alpha-on", str(images), "--global-alpha", "--min-agreement", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "Fitted α on 6 unlabelled images" in out
    applied = json.loads((root / "out" / "config.json").read_text())["selfexplain_applied_vector"]
    assert applied["alpha_fit"]["num_images"] == 6 and applied["alpha_fit"]["min_agreement"] == 0.5
    assert isinstance(applied["alpha"], float)  # --global-alpha: one α
    assert "fitted by `fit_alpha` on 6 unlabelled images" in (root / "out" / "README.md").read_text()
    # A malformed compression is refused before anything is written.
    with pytest.raises(SystemExit) as exit_info:
        main(["extract-vector", *common, "--compression", "bogus", "--output-dir", str(root / "v2")])
    assert exit_info.value.code == 2 and "--compression bogus" in capsys.readouterr().err
    assert not (root / "v2").exists()


def test_packaged_bases_load_and_name_the_command_that_made_them():
    import json

    from transformers import ViTForImageClassification

    from selfexplain.experiments.experiment import PACKAGED_BASES, packaged_base

    assert PACKAGED_BASES[0] == "patch4-union"  # the demo's
    for name in PACKAGED_BASES:
        path = packaged_base(name)
        model = ViTForImageClassification.from_pretrained(path)
        assert (model.config.image_size, model.config.patch_size, model.config.hidden_size) == (32, 4, 64)
        metrics = json.loads((path / "pretraining_metrics.json").read_text())
        # the command regenerates this very folder, and the recorded run is the one shipped
        assert f"--output-dir src/selfexplain/experiments/bases/{name} " in metrics["command"]
        assert metrics["output_dir"].endswith(name) and 0.0 < metrics["eval_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="patch4-union-96ep"):
        packaged_base("patch4-union-1000ep")


def test_packaged_suites_load_and_an_unknown_name_lists_them(capsys):
    from selfexplain.cli.experiments import packaged_config, packaged_suites
    from selfexplain.experiments.experiment import ExperimentConfig

    names = packaged_suites()
    assert {"demo", "full", "shared_head", "extension_representation"} <= set(names)
    for name in names:
        config = ExperimentConfig.from_json_file(packaged_config(name))
        # a suite's name is its file's, and its outputs are its own (two suites never share a work folder)
        assert config.name == name and config.output_dir == f"outputs/{name}"
        assert config.grid() == (8, 8)  # reads the base it names (a packaged one must ship with the package)
    assert ExperimentConfig.from_json_file(packaged_config("full")).explanation_head == "extension"
    with pytest.raises(SystemExit) as info:
        main(["experiment", "--config", "no_such_suite"])
    err = capsys.readouterr().err
    assert info.value.code != 0 and "no_such_suite" in err and "shared_head" in err
