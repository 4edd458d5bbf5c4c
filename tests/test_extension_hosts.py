"""Extension hosts: one explanation extension trained on several frozen classifiers of the same base
(`TrainingConfig.extension_hosts`), so that it explains classifiers it was not trained with."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import ClassLabel
from safetensors.torch import load_file

from selfexplain import ExplanationVector, ViTForSelfExplainingClassification, apply_explanation_vector
from selfexplain.attribution.shapley import kernel_shap_values
from selfexplain.cli import main as cli_main
from selfexplain.data import default_image_processor
from selfexplain.evaluation.metrics import pearson
from selfexplain.training import TrainingConfig, train
from tests._extension import COMMON, extension_config
from tests._squares import IMAGE_SIZE, coloured_squares
from tests._tiny import tiny_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _red_or_not(num_examples: int, seed: int):
    """The host's task: the same kind of images, another label set (is the square red?)."""
    data = coloured_squares(num_examples, seed=seed).remove_columns("explanation_targets")
    data = data.map(lambda row: {"label": int(row["label"] == 0)})
    return data.cast_column("label", ClassLabel(names=["not red", "red"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base, two prediction-only classifiers of it (colours; red or not), and extensions trained on the
    colour classifier alone and with the red-or-not classifier as a host."""
    root = tmp_path_factory.mktemp("hosts")
    base = root / "base"
    tiny_classifier(seed=0, num_labels=3, id2label={0: "red", 1: "green", 2: "blue"}).save_pretrained(base)
    default_image_processor(IMAGE_SIZE).save_pretrained(base)
    colours = coloured_squares(64, seed=0).remove_columns("explanation_targets")
    red = _red_or_not(64, seed=1)
    pred, host = root / "pred", root / "host"
    train(TrainingConfig(base=str(base), output_dir=str(pred), **COMMON), colours)
    train(TrainingConfig(base=str(base), output_dir=str(host), **COMMON), red)
    host_file = (host / "model.safetensors").read_bytes()
    alone = root / "alone"
    train(extension_config(root, pred, "alone"), colours)
    hosted_config = extension_config(root, pred, "hosted", extension_hosts=[{"model": str(host)}])
    train(hosted_config, colours, host_datasets=[red])
    return {"root": root, "base": base, "pred": pred, "host": host, "alone": alone, "hosted": root / "hosted",
            "colours": colours, "red": red, "host_file": host_file}  # fmt: skip


def test_hosts_stay_frozen_and_the_trained_model_keeps_its_logits(runs):
    assert (runs["host"] / "model.safetensors").read_bytes() == runs["host_file"]
    pred, hosted = (
        load_file(runs["pred"] / "model.safetensors"),
        load_file(runs["hosted"] / "model.safetensors"),
    )
    assert all(torch.equal(hosted[k], v) for k, v in pred.items())  # only explainer.* is new
    assert {k for k in hosted if k not in pred} == {k for k in hosted if k.startswith("explainer.")}


def test_the_host_loss_is_logged_and_the_hosts_are_recorded(runs):
    log = [json.loads(line) for line in (runs["hosted"] / "log.jsonl").read_text().splitlines()]
    host_losses = [r["host_explanation_loss"] for r in log if r["type"] == "train"]
    # One small host batch per step makes the logged loss noisy; that the extension learns the host is the
    # next test's business. Here: a loss for every logged step, finite.
    assert len(host_losses) == len([r for r in log if r["type"] == "train"]) >= 3
    assert all(0 < loss < float("inf") for loss in host_losses)
    alone_log = (runs["alone"] / "log.jsonl").read_text()
    assert "host_explanation_loss" not in alone_log
    config = json.loads((runs["hosted"] / "config.json").read_text())
    assert config["selfexplain_targets"]["extension_hosts"] == [{"model": str(runs["host"])}]


def test_an_extension_trained_with_a_host_explains_that_host_better(runs):
    """What hosts are for: the extension, put on a classifier it was trained with only as a host, agrees
    better with that classifier's Kernel SHAP values than the extension trained on the source alone."""
    host = ViTForSelfExplainingClassification.from_pretrained(runs["host"]).eval()
    pred = ViTForSelfExplainingClassification.from_pretrained(runs["pred"]).eval()
    held_out = list(_red_or_not(24, seed=7)["image"])
    images = default_image_processor(IMAGE_SIZE)(held_out, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        classes = host(images, explain=None).logits.argmax(-1)
    reference = kernel_shap_values(host, images, grid=(4, 4), budget=2048, baseline="zero", seed=0)
    reference = reference[torch.arange(len(images)), classes].flatten(1)
    agreement = {}
    for name in ("alone", "hosted"):
        se = ViTForSelfExplainingClassification.from_pretrained(runs[name]).eval()
        vector = ExplanationVector.from_models(
            self_explaining=se, prediction_only=pred, base_model=str(runs["base"])
        )
        patched = apply_explanation_vector(host, vector, alpha=1.0).eval()
        with torch.no_grad():
            maps = patched(images, explain=classes).explanation.flatten(1)
        agreement[name] = float(torch.nan_to_num(pearson(maps, reference)).mean())
    assert agreement["hosted"] > agreement["alone"] + 0.2, agreement


def test_the_same_hosted_run_gives_the_same_extension(runs, tmp_path):
    config = extension_config(tmp_path, runs["pred"], "again", extension_hosts=[{"model": str(runs["host"])}])
    train(config, runs["colours"], host_datasets=[runs["red"]])
    first, second = (
        load_file(runs["hosted"] / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_hosts_are_validated_before_training(runs, tmp_path):
    pred, host = str(runs["pred"]), str(runs["host"])
    with pytest.raises(ValueError, match='trainable="extension"'):
        TrainingConfig(base=pred, output_dir=str(tmp_path), extension_hosts=[{"model": host}])
    for bad in (
        "runs/host",
        [{"data": "builtin:mnist"}],
        [{"model": host, "labels": 2}],
        [{"model": host, "data": 3}],
    ):
        with pytest.raises(ValueError, match="extension_hosts"):
            extension_config(tmp_path, pred, "x", extension_hosts=bad)
    config = extension_config(tmp_path, pred, "x", extension_hosts=[{"model": host}], max_steps=1)
    with pytest.raises(ValueError, match='has no "data"'):
        train(config, runs["colours"])
    with pytest.raises(ValueError, match="one per host"):
        train(config, runs["colours"], host_datasets=[runs["red"], runs["red"]])
    wider = tmp_path / "wider"
    tiny_classifier(seed=1, hidden_size=48, num_labels=2).save_pretrained(wider)
    config = extension_config(tmp_path, pred, "x", extension_hosts=[{"model": str(wider)}], max_steps=1)
    with pytest.raises(ValueError, match="hidden_size"):
        train(config, runs["colours"], host_datasets=[runs["red"]])


def test_the_command_line_trains_with_a_host_read_from_its_data(runs, tmp_path):
    colours, red = tmp_path / "colours", tmp_path / "red"
    runs["colours"].train_test_split(test_size=0.25, seed=0).save_to_disk(colours)
    red.mkdir()
    runs["red"].train_test_split(test_size=0.25, seed=0).save_to_disk(red)
    hosts = json.dumps([{"model": str(runs["host"]), "data": str(red)}])
    out = tmp_path / "cli"
    cli_main([
        "train", "--train-data", str(colours), "--eval-split", "none", "--base", str(runs["pred"]),
        "--output-dir", str(out), "--explanation-loss-weight", "10", "--explanation-objective", "shapley",
        "--value-model", str(runs["pred"]), "--coalitions-per-image", "8", "--explanation-head", "extension",
        "--trainable", "extension", "--extension-hosts", hosts, "--max-steps", "2", "--batch-size", "8",
        "--log-every", "1",
    ])  # fmt: skip
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "host_explanation_loss" in r] == [1, 2]


def test_a_suite_trains_each_host_once_per_seed_before_the_sources_and_never_hosts_a_target():
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig

    settings = dict(
        name="t", sources=["mnist", "union"], targets=["digits"], seeds=[0, 1], trainable="extension"
    )
    units = Experiment(
        ExperimentConfig(**settings, extension_hosts=["shapes-on-clutter"]), log=lambda m: None
    ).units()
    for seed in (0, 1):
        assert units[("host", seed, "shapes-on-clutter")] == [("base", seed, "")]
        assert ("host", seed, "shapes-on-clutter") in units[("source", seed, "mnist")]
    assert list(units).index(("host", 0, "shapes-on-clutter")) < list(units).index(("source", 0, "mnist"))
    with pytest.raises(ValueError, match="targets"):
        ExperimentConfig(**settings, extension_hosts=["digits"])
    with pytest.raises(ValueError, match="trainable"):
        ExperimentConfig(**{**settings, "trainable": "all"}, extension_hosts=["shapes-on-clutter"])


def test_a_replica_host_is_another_fine_tune_of_the_same_images_with_another_seed(tmp_path):
    """`"mnist@1"` beside the source `mnist`: an independent fine-tune of the source's own domain (the kind of
    difference between a source's and a target's classifier), trained on mnist's images with another seed."""
    from selfexplain.experiments.experiment import (
        REPLICA_SEED_STRIDE,
        Experiment,
        ExperimentConfig,
        host_domain,
    )

    assert host_domain("mnist") == ("mnist", 0) and host_domain("mnist@2") == ("mnist", 2)
    settings = dict(name="t", sources=["mnist"], targets=["digits"], trainable="extension")
    for bad in ("mnist@0", "mnist@x", "@1", "mnist@"):
        with pytest.raises(ValueError, match="positive integer"):
            ExperimentConfig(**settings, extension_hosts=[bad])
    with pytest.raises(ValueError, match="targets"):  # a replica of a target is the target's images
        ExperimentConfig(**settings, extension_hosts=["digits@1"])

    config = ExperimentConfig(
        **settings, extension_hosts=["mnist@1"], output_dir=str(tmp_path / "suite"), num_train=64,
        base={"image_size": 16, "patch_size": 4}, train={"num_epochs": 1, "batch_size": 32},
    )  # fmt: skip
    experiment = Experiment(config, log=lambda message: None)
    tiny_classifier(seed=0).save_pretrained(tmp_path / "suite" / "work" / "seed0" / "base")
    plain, replica = experiment.finetune(0, "mnist", 0.0), experiment.finetune(0, "mnist@1", 0.0)
    assert replica.name == "mnist@1-prediction_only"
    recorded = [TrainingConfig.from_json_file(path / "training_config.json") for path in (plain, replica)]
    assert [c.seed for c in recorded] == [0, REPLICA_SEED_STRIDE]
    assert [c.source_dataset for c in recorded] == ["builtin:mnist"] * 2
    weights = [load_file(str(path / "model.safetensors")) for path in (plain, replica)]
    assert weights[0].keys() == weights[1].keys()
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert experiment.units()[("source", 0, "mnist")] == [("base", 0, ""), ("host", 0, "mnist@1")]
