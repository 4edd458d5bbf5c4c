"""End to end: the README's main job (`selfexplain demo`) and the quickstart notebook that builds on it.

The demo trains real (tiny) models on the built-in offline domains: about 5 minutes on 2 CPU cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
# Margins below what the demo measured (see the closing lines of each test's docstring and the README).
IN_DOMAIN_MARGIN = 0.15
TRANSFER_MARGIN = 0.05


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "selfexplain.cli", "demo", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_demo_prints_a_summary_and_writes_report_and_heatmaps(demo):
    out, stdout = demo
    assert "In-domain: one pass of the self-explaining source model" in stdout and "mnist → digits" in stdout
    report = out / "report"
    assert (report / "heatmaps.png").stat().st_size > 10_000
    assert (report / "alpha_sweep.png").exists() and (report / "kernel_shap_budget.png").exists()
    text = (report / "report.md").read_text()
    assert (
        "selfexplain demo --output-dir" in text
        and "## In-domain fidelity" in text
        and "## Transfer matrix" in text
    )
    # B* and every agreement number depend on which Kernel SHAP is the yardstick: the report names it.
    assert "Leverage SHAP's design" in text and "ridge penalty chosen by generalised cross-validation" in text


@pytest.mark.slow
def test_demo_self_explaining_model_agrees_with_kernel_shap_in_domain(demo):
    """On held-out MNIST images, the one-pass map of the model trained with the amortised Shapley objective
    agrees with a Kernel SHAP reference of the same model far better than the untrained head of its
    prediction-only partner does, and keeps that partner's accuracy."""
    out, _ = demo
    results = json.loads((out / "report" / "results.json").read_text())
    mnist = results["in_domain"]["0"]["mnist"]
    own, untrained = mnist["explainers"]["self_explaining"], mnist["explainers"]["prediction_only_head"]
    assert own["pearson"] > untrained["pearson"] + IN_DOMAIN_MARGIN
    assert own["deletion"] < untrained["deletion"]
    assert mnist["accuracy_self_explaining"] >= mnist["accuracy_prediction_only"] - 0.03


@pytest.mark.slow
def test_demo_vector_makes_the_target_explain_itself(demo):
    """The direction on the related pair mnist → digits: adding the MNIST vector at the α recommended on MNIST
    brings the target's own map closer to Kernel SHAP of the target and makes it more faithful, keeping its
    predictions. A failure here means the method stopped working at this scale, not a flaky threshold."""
    out, _ = demo
    results = json.loads((out / "report" / "results.json").read_text())
    transfer = results["per_seed"]["0"]["digits"]["transfer"]["mnist"]
    alpha = transfer["recommended_alpha"]
    assert alpha > 0
    before, after = transfer["sweep"]["0"], transfer["sweep"][f"{alpha:g}"]
    vector_config = json.loads(
        (out / "work" / "seed0" / "mnist-vector" / "explanation_vector_config.json").read_text()
    )
    assert vector_config["recommended_alpha"] == alpha  # what the vector recommends is what was selected
    assert after["pearson"] > before["pearson"] + TRANSFER_MARGIN
    assert after["insertion"] - after["deletion"] > before["insertion"] - before["deletion"]
    assert after["accuracy"] >= before["accuracy"] - 0.05


@pytest.mark.slow
def test_demo_blend_of_the_transferred_map_with_rollout_is_reported(demo):
    """The suite blends the transferred map with the target's attention rollout and scores it like every map.
    On the demo the blend beats the transferred map alone (0.659 against 0.552) and rollout (0.596)."""
    out, stdout = demo
    results = json.loads((out / "report" / "results.json").read_text())
    res = results["per_seed"]["0"]["digits"]
    transfer = res["transfer"]["mnist"]
    single, blend = transfer["sweep"][f"{transfer['recommended_alpha']:g}"], transfer["blend_with_rollout"]
    assert blend["pearson"] > single["pearson"] + TRANSFER_MARGIN
    assert blend["pearson"] > res["explainers"]["attention_rollout"]["pearson"]
    assert blend["paired_vs_rollout"]["pearson"]["n"] == results["per_seed"]["0"]["digits"]["num_reference"]
    assert "blended with rollout" in stdout
    assert "## Transferred map blended with attention rollout" in (out / "report" / "report.md").read_text()


@pytest.mark.slow
def test_readme_python_block_runs_verbatim_on_the_demo_models(demo, tmp_path):
    """The README's usage block, exactly as written, from a folder whose outputs/demo is the demo's output."""
    out, _ = demo
    text = (ROOT / "README.md").read_text()
    usage = text.split("## Usage", 1)[1].split("### Command line", 1)[0]
    # Every python block of the section, in order, as one program (the pipeline block uses the first's image).
    block = "\n".join(part.split("```", 1)[0] for part in usage.split("```python\n")[1:])
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "demo").symlink_to(out, target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ExplanationVector(" in proc.stdout
    assert (tmp_path / "explanation.png").stat().st_size > 1000
    assert (tmp_path / "pipeline-explanation.png").stat().st_size > 1000
    saved = {path.name for path in (tmp_path / "digits-explaining").iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= saved


@pytest.mark.slow
def test_quickstart_notebook_runs(demo):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out, _ = demo
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    os.environ["SELFEXPLAIN_DEMO_DIR"] = str(out)
    try:
        client = nbclient.NotebookClient(
            notebook,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        )
        client.execute()
    finally:
        os.environ.pop("SELFEXPLAIN_DEMO_DIR", None)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "insertion" in text and "deletion" in text


def test_kernel_shap_values_are_cached_by_what_they_depend_on(tmp_path):
    """The suite's references and budget curves are read back when the same computation comes again (a rerun,
    or another suite on the same prediction-only models), and recomputed when anything they depend on differs."""
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig
    from tests._tiny import pixels, tiny_self_explaining

    config = ExperimentConfig(
        name="cache",
        sources=["mnist"],
        targets=["digits"],
        output_dir=str(tmp_path / "suite"),
        base={"image_size": 16, "patch_size": 4},
        baseline="zero",
    )
    experiment = Experiment(config, log=lambda message: None)
    model, x = tiny_self_explaining(seed=90), pixels(2)
    first = experiment.kernel_shap(model, x, 32, seed=0)
    cache = tmp_path / "suite" / "work" / "kernel_shap_cache"
    (entry,) = cache.glob("*.safetensors")
    # Read back, not recomputed: a marker written into the entry comes out.
    marker = torch.full(first.shape, 7.0)
    save_file({"values": marker}, str(entry))
    assert torch.equal(experiment.kernel_shap(model, x, 32, seed=0), marker)
    # The explanation extension cannot change a logit, so it is not part of the key …
    extended = tiny_self_explaining(seed=5, explanation_head="extension")
    extended.load_state_dict(model.state_dict(), strict=False)  # the same backbone and head
    torch.nn.init.normal_(extended.explainer.blocks[0].fc2.weight)
    assert torch.equal(experiment.kernel_shap(extended, x, 32, seed=0), marker)
    # … but the budget, seed, images and backbone weights are.
    for changed in (
        lambda: experiment.kernel_shap(model, x, 33, seed=0),
        lambda: experiment.kernel_shap(model, x, 32, seed=1),
        lambda: experiment.kernel_shap(model, pixels(2, seed=1), 32, seed=0),
        lambda: experiment.kernel_shap(tiny_self_explaining(seed=91), x, 32, seed=0),
    ):
        assert not torch.equal(changed(), marker)
    assert len(list(cache.glob("*.safetensors"))) == 5
    # … and so is the design: a suite on Leverage SHAP's computes its own values, with that design.
    from dataclasses import replace

    from selfexplain.attribution.shapley import kernel_shap_values

    leverage = Experiment(replace(config, kernel_shap_sampler="leverage"), log=lambda message: None)
    values = leverage.kernel_shap(model, x, 32, seed=0)
    assert not torch.equal(values, marker)
    expected = kernel_shap_values(
        model, x, grid=(4, 4), budget=32, baseline="zero", seed=0, sampler="leverage"
    )
    assert torch.equal(values, expected)
    assert len(list(cache.glob("*.safetensors"))) == 6
    assert not list(cache.glob("*.partial"))


def test_an_unknown_kernel_shap_sampler_is_refused():
    from selfexplain.experiments.experiment import ExperimentConfig

    with pytest.raises(ValueError, match="kernel_shap_sampler must be one of"):
        ExperimentConfig(name="x", sources=["mnist"], targets=["digits"], kernel_shap_sampler="shapiq")


def test_a_finished_model_trained_with_other_settings_is_not_reused(tmp_path):
    """A suite resumed after its config changed must not report numbers of models the new config did not make:
    a finished model whose training config differs (other than where things are) is refused, not reused."""
    from selfexplain.experiments.experiment import Experiment, ExperimentConfig
    from selfexplain.training import TrainingConfig
    from tests._tiny import tiny_classifier

    config = ExperimentConfig(
        name="stale",
        sources=["mnist"],
        targets=["digits"],
        output_dir=str(tmp_path / "suite"),
        base={"image_size": 16, "patch_size": 4},
        train={"num_epochs": 2},
    )
    experiment = Experiment(config, log=lambda message: None)
    seed_dir = tmp_path / "suite" / "work" / "seed0"
    tiny_classifier(seed=0).save_pretrained(seed_dir / "base")
    finished = seed_dir / "mnist-prediction_only"
    tiny_classifier(seed=1).save_pretrained(finished)
    trained_as = dict(
        base=str(seed_dir / "base"), output_dir=str(finished), seed=0, source_dataset="builtin:mnist",
        num_epochs=2, batch_size=64, learning_rate=1e-3, checkpoint_every=None, log_every=20,
    )  # fmt: skip
    TrainingConfig(**trained_as).to_json_file(finished / "training_config.json")
    assert experiment.finetune(0, "mnist", 0.0) == finished  # the same settings: reused, not retrained
    # Recorded at another path (a benchmark linking the suite's models): the same training, reused.
    TrainingConfig(**{**trained_as, "base": "elsewhere/base", "output_dir": "elsewhere/m"}).to_json_file(
        finished / "training_config.json"
    )
    assert experiment.finetune(0, "mnist", 0.0) == finished
    TrainingConfig(**{**trained_as, "num_epochs": 3}).to_json_file(finished / "training_config.json")
    weights = (finished / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="num_epochs: trained with 3, asked 2"):
        experiment.finetune(0, "mnist", 0.0)
    assert (finished / "model.safetensors").read_bytes() == weights  # nothing deleted


def test_a_finished_unit_computed_with_other_settings_is_not_reported(tmp_path):
    """A unit's result file records the settings it was computed with: a resumed suite reads it back when they
    match (paths, workers, threads and seeds may differ) and refuses it when a setting its numbers depend on
    changed, instead of reporting old numbers under the new config. Files from before the record are read back."""
    from dataclasses import replace

    from selfexplain.experiments.experiment import ExperimentConfig, _compute_unit, _unit_file, run_units

    config = ExperimentConfig(
        name="stale", sources=["mnist"], targets=["digits"], output_dir=str(tmp_path / "suite"),
        base={"packaged": "patch4-union"},
    )  # fmt: skip
    work, unit = tmp_path / "suite" / "work", ("base", 0, "")
    calls = []

    def compute(config_dict, unit):  # the suite's own unit runner, counted
        calls.append(unit)
        return _compute_unit(config_dict, unit)

    def run(config):
        return run_units({unit: []}, config, work, compute=compute, log=lambda message: None)[unit]

    first = run(config)
    assert calls == [unit] and first["settings"]["coalitions_per_image"] == 2
    moved = replace(config, name="renamed", output_dir="elsewhere", workers=2, num_threads=None, seeds=[0, 1])
    assert run(moved) == first and calls == [unit]  # read back, not recomputed
    path = _unit_file(work, unit)
    before = path.read_bytes()
    changed = replace(config, coalitions_per_image=8)
    with pytest.raises(ValueError, match="coalitions_per_image: computed with 2, asked 8"):
        run(changed)
    assert path.read_bytes() == before and calls == [unit]  # nothing deleted or recomputed
    # A setting added to the suite after the file was written counts as its default there.
    record = json.loads(before)
    del record["settings"]["explanation_extension_route"]
    path.write_text(json.dumps(record))
    assert run(config)["result"] == first["result"] and calls == [unit]
    with pytest.raises(ValueError, match="explanation_extension_route: computed with 'classifier'"):
        run(replace(config, explanation_extension_route="backbone"))
    # A result file written before units recorded their settings is read back as it is.
    old = {key: value for key, value in first.items() if key != "settings"}
    path.write_text(json.dumps(old))
    assert run(changed) == old
