"""The training loop: one recipe for λ = 0 and λ > 0, resumable, multi-process, and the shared base θ0."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, DatasetDict
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from safetensors.torch import load_file
from transformers import AutoImageProcessor, ViTForImageClassification

from selfexplain import ViTForSelfExplainingClassification
from selfexplain.attribution.targets import add_explanation_targets
from selfexplain.data import build_transform, default_image_processor
from selfexplain.training import TrainingConfig, latest_checkpoint, pretrain_base, train
from selfexplain.vectors.config import BASE_MODEL_ATTRIBUTE
from tests._squares import IMAGE_SIZE, LABELS, coloured_squares
from tests._tiny import tiny_classifier

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return coloured_squares(48, seed=0), coloured_squares(24, seed=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A base with another label set (5 classes) and dropout, so the model uses the global RNG."""
    path = tmp_path_factory.mktemp("base")
    tiny_classifier(seed=0, num_labels=5, hidden_dropout_prob=0.1).save_pretrained(path)
    default_image_processor(IMAGE_SIZE).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory) -> str:
    """A base without dropout: dropout masks come from each process's RNG, so they differ between process
    layouts and batch splits; without dropout those runs can be compared weight by weight."""
    path = tmp_path_factory.mktemp("plain-base")
    tiny_classifier(seed=0, num_labels=5).save_pretrained(path)
    default_image_processor(IMAGE_SIZE).save_pretrained(path)
    return str(path)


def config(base: str, output_dir: Path, **overrides) -> TrainingConfig:
    values = dict(
        base=base,
        output_dir=str(output_dir),
        num_epochs=2,
        batch_size=8,
        learning_rate=3e-3,
        warmup_ratio=0.1,
        log_every=1,
        checkpoint_every=None,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def weights(output_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def log_records(output_dir: str | Path, kind: str = "train") -> list[dict]:
    lines = (Path(output_dir) / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["type"] == kind]


@pytest.fixture(scope="module")
def prediction_only_run(base, data, tmp_path_factory):
    train_data, eval_data = data
    output_dir = tmp_path_factory.mktemp("pred")
    metrics = train(config(base, output_dir, num_epochs=6, checkpoint_every="epoch"), train_data, eval_data)
    return output_dir, metrics


# ----------------------------------------------------------------------------------------------------------


def test_lambda_pair_sees_identical_batches_and_lambda_zero_ignores_targets(base, data, tmp_path):
    train_data, _ = data
    runs = {
        "pred": (0.0, train_data),
        "expl": (1.0, train_data),
        "pred-no-targets": (0.0, train_data.remove_columns("explanation_targets")),
    }
    for name, (weight, dataset) in runs.items():
        train(config(base, tmp_path / name, explanation_loss_weight=weight, record_batches=True), dataset)

    batches = {name: (tmp_path / name / "batches.jsonl").read_text() for name in runs}
    assert batches["pred"] == batches["expl"] == batches["pred-no-targets"]
    records = [json.loads(line) for line in batches["pred"].splitlines()]
    assert len(records) == 2 * 6 and [r["step"] for r in records] == list(range(1, 13))
    epoch_orders = [sum((r["indices"] for r in records if r["epoch"] == e), []) for e in (0, 1)]
    assert sorted(epoch_orders[0]) == sorted(epoch_orders[1]) == list(range(48))
    assert epoch_orders[0] != epoch_orders[1]

    # λ = 0 does not read the targets: bit-identical weights with or without the column.
    assert max_difference(weights(tmp_path / "pred"), weights(tmp_path / "pred-no-targets")) == 0.0
    # The supervision is the only difference between the pair, and it changes the weights.
    assert max_difference(weights(tmp_path / "pred"), weights(tmp_path / "expl")) > 1e-4
    # Same data and same fresh head for the pair: their first classification losses agree.
    first = [log_records(tmp_path / name)[0] for name in ("pred", "expl")]
    assert first[0]["classification_loss"] == pytest.approx(first[1]["classification_loss"], abs=1e-6)


def test_augmentation_depends_on_seed_epoch_and_index_only(base, data, tmp_path):
    train_data, _ = data
    train(config(base, tmp_path / "a", record_batches=True, max_steps=3), train_data)
    train(config(base, tmp_path / "b", record_batches=True, max_steps=3, seed=1), train_data)
    a = [json.loads(line) for line in (tmp_path / "a" / "batches.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b" / "batches.jsonl").read_text().splitlines()]
    assert [r["indices"] for r in a] != [r["indices"] for r in b]
    # Rebuild the first batch of run `a` by hand from (seed, epoch, index): same pixels.
    transform = build_transform(default_image_processor(IMAGE_SIZE), train=True, augment_seed=0)
    rows = train_data.select(a[0]["indices"])[:]
    pixels = torch.stack(
        transform({"image": rows["image"], "example_index": a[0]["indices"]})["pixel_values"]
    )
    assert hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest() == a[0]["pixel_sha1"]


def test_loss_decreases_and_accuracy_is_evaluated_every_epoch(prediction_only_run):
    output_dir, metrics = prediction_only_run
    losses = [r["loss"] for r in log_records(output_dir)]
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])
    evals = log_records(output_dir, "eval")
    assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert metrics["eval_accuracy"] == evals[-1]["eval_accuracy"] > 0.8
    assert metrics["global_step"] == 6 * 6 and metrics["epoch"] == 6.0
    assert {"lr", "loss", "classification_loss"} <= set(log_records(output_dir)[0])


def test_saved_folder_reloads_with_labels_base_and_processor(prediction_only_run, base, data):
    output_dir, metrics = prediction_only_run
    model = ViTForSelfExplainingClassification.from_pretrained(output_dir).eval()
    assert model.config.id2label == dict(enumerate(LABELS))
    assert getattr(model.config, BASE_MODEL_ATTRIBUTE) == base
    assert model.config.explanation_loss_weight == 0.0
    assert model.config.selfexplain_recipe["seed"] == 0
    processor = AutoImageProcessor.from_pretrained(output_dir)
    _, eval_data = data
    pixel_values = torch.stack(build_transform(processor)(eval_data[:])["pixel_values"])
    with torch.no_grad():
        predictions = model(pixel_values, explain=None).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(eval_data["label"])).float().mean().item()
    assert accuracy == pytest.approx(metrics["eval_accuracy"])
    # Checkpoints are complete folders; `save_total_limit=2` keeps the newest two.
    checkpoints = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-00000030", "checkpoint-00000036"]
    assert latest_checkpoint(output_dir).name == "checkpoint-00000036"


def test_explanation_loss_decreases_with_lambda(base, data, tmp_path):
    train_data, eval_data = data
    metrics = train(config(base, tmp_path, explanation_loss_weight=5.0, num_epochs=4), train_data, eval_data)
    records = log_records(tmp_path)
    explanation = [r["explanation_loss"] for r in records]
    assert np.mean(explanation[-4:]) < 0.5 * np.mean(explanation[:4])
    for r in records:
        assert r["loss"] == pytest.approx(r["classification_loss"] + 5.0 * r["explanation_loss"], rel=1e-5)
    assert "train_explanation_loss" in metrics and metrics["eval_accuracy"] > 0.5
    model = ViTForSelfExplainingClassification.from_pretrained(tmp_path)
    assert model.config.explanation_loss_weight == 5.0
    card = ModelCard.load(tmp_path / "README.md")
    assert "A **self-explaining** Vision Transformer" in card.text and "prediction-only" not in card.text
    assert f"| eval_accuracy | {metrics['eval_accuracy']:.4g} |" in card.text
    assert "| explanation loss weight λ | 5 |" in card.text and "| explanation loss | mse |" in card.text


class CrashingProcessor:
    """An image processor that fails on its n-th call: a stand-in for a killed job."""

    def __init__(self, processor, fail_on_call: int) -> None:
        self.processor = processor
        self.fail_on_call = fail_on_call
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return self.processor(*args, **kwargs)


def test_resume_after_a_crash_reaches_the_uninterrupted_weights(base, data, tmp_path):
    train_data, _ = data
    processor = default_image_processor(IMAGE_SIZE)
    # λ > 0, dropout in the base, logs every 3 steps: the checkpoint at step 8 falls inside a logging window.
    recipe = dict(explanation_loss_weight=1.0, log_every=3)
    uninterrupted = train(config(base, tmp_path / "full", **recipe), train_data)

    interrupted = config(base, tmp_path / "run", checkpoint_every=4, **recipe)
    with pytest.raises(RuntimeError, match="simulated crash"):
        # 6 steps per epoch: the crash hits step 10 (epoch 1); the newest checkpoint is step 8.
        train(interrupted, train_data, image_processor=CrashingProcessor(processor, fail_on_call=10))
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-00000008"

    resumed_config = config(base, tmp_path / "run", checkpoint_every=4, resume=True, **recipe)
    resumed = train(resumed_config, train_data, image_processor=processor)
    assert resumed["resumed_from"].endswith("checkpoint-00000008")
    assert max_difference(weights(tmp_path / "full"), weights(tmp_path / "run")) == 0.0
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    # The log reads as one run: replayed steps are not duplicated, the window across the checkpoint is whole.
    assert [r["step"] for r in log_records(tmp_path / "run")] == [3, 6, 9, 12]
    assert log_records(tmp_path / "run") == log_records(tmp_path / "full")

    with pytest.raises(ValueError, match=r"recipe.learning_rate: checkpoint 0.003, now 0.001"):
        train(dataclasses.replace(resumed_config, learning_rate=1e-3), train_data)


def test_gradient_accumulation_matches_one_large_batch(plain_base, data, tmp_path):
    train_data, _ = data
    train(config(plain_base, tmp_path / "large", explanation_loss_weight=1.0, batch_size=8), train_data)
    train(
        config(
            plain_base,
            tmp_path / "accumulated",
            explanation_loss_weight=1.0,
            batch_size=4,
            gradient_accumulation_steps=2,
        ),
        train_data,
    )
    assert max_difference(weights(tmp_path / "large"), weights(tmp_path / "accumulated")) < 1e-4


def test_push_to_hub_uploads_the_final_model(hub, plain_base, data, tmp_path):
    train_data, _ = data
    cfg = config(plain_base, tmp_path, max_steps=2, checkpoint_every=1, record_batches=True, push_to_hub=True,
                 hub_model_id="trainer/tiny-pred", hub_token=hub.token)  # fmt: skip
    metrics = train(cfg, train_data)
    files = set(HfApi(token=hub.token).list_repo_files("trainer/tiny-pred", revision=metrics["hub_commit"]))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "log.jsonl", "README.md"} <= files
    card = ModelCard.load(hf_hub_download("trainer/tiny-pred", "README.md", revision=metrics["hub_commit"]))
    card.validate()  # the loopback Hub's validate-yaml, as a push through the Hub would
    assert "A **prediction-only** Vision Transformer" in card.text
    assert (
        card.data.library_name == "transformers" and card.data.base_model is None
    )  # the base is a local folder
    assert not any(name.startswith("checkpoints/") for name in files) and "batches.jsonl" not in files
    pulled = ViTForSelfExplainingClassification.from_pretrained(
        "trainer/tiny-pred", revision=metrics["hub_commit"]
    )
    assert pulled.config.id2label == dict(enumerate(LABELS))
    local = ViTForSelfExplainingClassification.from_pretrained(tmp_path)
    assert max_difference(pulled.state_dict(), local.state_dict()) == 0.0


@pytest.mark.parametrize("base_labels", [["x", "y", "z"], LABELS])
def test_new_label_set_gets_a_fresh_head_even_with_the_same_size(base_labels, data, tmp_path):
    train_data, _ = data
    base = tiny_classifier(
        seed=0, id2label=dict(enumerate(base_labels)), label2id={n: i for i, n in enumerate(base_labels)}
    )
    base.save_pretrained(tmp_path / "base")
    # A learning rate so small that training itself moves no weight measurably.
    train(config(str(tmp_path / "base"), tmp_path / "run", max_steps=1, learning_rate=1e-12), train_data)
    trained = ViTForSelfExplainingClassification.from_pretrained(tmp_path / "run").state_dict()
    before = base.state_dict()
    head_change = float((trained["classifier.weight"] - before["classifier.weight"]).abs().max())
    backbone_change = max(float((trained[k] - before[k]).abs().max()) for k in before if k.startswith("vit."))
    assert backbone_change < 1e-6
    if base_labels == LABELS:
        assert head_change < 1e-6  # the same label set keeps its head
    else:
        assert head_change > 1e-3


def test_config_round_trips_and_never_writes_the_token(tmp_path):
    cfg = TrainingConfig(base="b", output_dir=str(tmp_path), hub_token="hf_secret", checkpoint_every="25")
    assert cfg.checkpoint_every == 25
    cfg.to_json_file(tmp_path / "cfg.json")
    assert "hf_secret" not in (tmp_path / "cfg.json").read_text()
    assert TrainingConfig.from_json_file(tmp_path / "cfg.json") == TrainingConfig(
        base="b", output_dir=str(tmp_path), checkpoint_every=25
    )
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainingConfig(base="b", output_dir="o", lr_scheduler="step")
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainingConfig(base="b", output_dir="o", checkpoint_every="sometimes")
    (tmp_path / "bad.json").write_text(json.dumps({"base": "b", "output_dir": "o", "epochs": 3}))
    with pytest.raises(ValueError, match="epochs"):
        TrainingConfig.from_json_file(tmp_path / "bad.json")


def test_bad_inputs_are_named(base, data, tmp_path):
    train_data, _ = data
    without_targets = train_data.remove_columns("explanation_targets")
    with pytest.raises(ValueError, match="'explanation_targets' column"):
        train(config(base, tmp_path, explanation_loss_weight=1.0), without_targets)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(config(base, tmp_path, batch_size=64), train_data)
    with pytest.raises(ValueError, match="differ from the training labels"):
        other = train_data.cast_column("label", ClassLabel(names=["a", "b", "c"]))
        train(config(base, tmp_path), train_data, other)


def test_targets_from_a_source_model_feed_self_explaining_training(base, data, tmp_path):
    train_data, _ = data
    source = tiny_classifier(seed=3)
    with_targets = add_explanation_targets(
        train_data.remove_columns("explanation_targets"),
        source,
        image_processor=default_image_processor(IMAGE_SIZE),
        grid=(2, 2),
        budget=16,
        cache_dir=tmp_path / "targets",
        progress=False,
    )
    metrics = train(config(base, tmp_path / "run", explanation_loss_weight=1.0, max_steps=4), with_targets)
    assert metrics["global_step"] == 4 and np.isfinite(metrics["train_explanation_loss"])


# ----------------------------------------------------------------------------------------------------------
# Multi-process and θ0 (slow)
# ----------------------------------------------------------------------------------------------------------


def _run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # Hide GPUs: these tests are about CPU processes (gloo), also on a machine that has a GPU.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(plain_base, data, tmp_path):
    train_data, _ = data
    base = plain_base
    DatasetDict({"train": train_data}).save_to_disk(tmp_path / "data")
    common = ["--train-data", str(tmp_path / "data"), "--eval-split", "none"]
    for name, batch_size in (("one", 8), ("two", 4)):
        config(base, tmp_path / name, explanation_loss_weight=1.0, batch_size=batch_size).to_json_file(
            tmp_path / f"{name}.json"
        )
    _run([sys.executable, "-m", "selfexplain.training", "--config", "one.json", *common], tmp_path)
    launched = _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         "-m", "selfexplain.training", "--config", "two.json", *common],
        tmp_path,
    )  # fmt: skip
    assert "on 2 process(es) [MULTI_CPU" in launched.stderr  # gloo processes, not two separate runs
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    difference = max_difference(one, two)
    print(f"max |w_1proc - w_2proc| = {difference:.3g}")
    assert 0.0 < difference < 1e-4  # not bitwise (different reduction order), equal up to float rounding
    # The two processes split every global batch: same examples, same order as the single process.
    losses = [[r["loss"] for r in log_records(tmp_path / name)] for name in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


@pytest.mark.slow
def test_targets_on_two_processes_equal_one_process(base, data, tmp_path):
    train_data, _ = data
    images = train_data.remove_columns("explanation_targets")
    images.save_to_disk(tmp_path / "images")
    tiny_classifier(seed=3).save_pretrained(tmp_path / "source")
    script = tmp_path / "targets_job.py"  # written at test time: the lead's CLI will replace it
    script.write_text(
        "import sys\n"
        "from datasets import load_from_disk\n"
        "from transformers import ViTForImageClassification\n"
        "from accelerate import PartialState\n"
        "from selfexplain.data import default_image_processor\n"
        "from selfexplain.attribution.targets import add_explanation_targets\n"
        "out = add_explanation_targets(load_from_disk('images'), ViTForImageClassification.from_pretrained('source'),\n"
        f"    image_processor=default_image_processor({IMAGE_SIZE}), grid=(2, 2), budget=8, cache_dir=sys.argv[1],\n"
        "    num_shards=4, progress=False)\n"
        "if PartialState().is_main_process:\n"
        "    out.save_to_disk(sys.argv[2])\n"
    )
    _run([sys.executable, str(script), "cache1", "out1"], tmp_path)
    _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         str(script), "cache2", "out2"],
        tmp_path,
    )  # fmt: skip
    from datasets import load_from_disk

    one = np.asarray(load_from_disk(tmp_path / "out1").with_format("numpy")["explanation_targets"])
    two = np.asarray(load_from_disk(tmp_path / "out2").with_format("numpy")["explanation_targets"])
    np.testing.assert_allclose(one, two, atol=1e-6)
    assert len(list((tmp_path / "cache2").glob("*/shard-*.arrow"))) == 4


@pytest.mark.slow
def test_pretrain_base_is_deterministic_and_saves_a_plain_vit_classifier(tmp_path):
    kwargs = dict(hidden_size=32, layers=2, heads=2, epochs=1, num_samples=200, domains=("digits", "faces"))
    info = pretrain_base(tmp_path / "base", **kwargs)
    pretrain_base(tmp_path / "again", **kwargs)
    assert max_difference(weights(tmp_path / "base"), weights(tmp_path / "again")) == 0.0
    assert info["num_labels"] == 12 and 0.0 <= info["eval_accuracy"] <= 1.0

    base = ViTForImageClassification.from_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and "auto_map" not in config
    assert BASE_MODEL_ATTRIBUTE not in config and "explanation_loss_weight" not in config
    assert base.config.id2label[0] == "digits/0" and base.config.id2label[11] == "faces/face"
    assert AutoImageProcessor.from_pretrained(tmp_path / "base").size == {"height": 32, "width": 32}
