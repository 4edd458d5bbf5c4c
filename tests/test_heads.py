"""No silent heads: a model without an image-classification head is refused by `apply_explanation_vector` on
every path (folder, Hub id, loaded model), and `from_pretrained` warns when a checkpoint's classifier did not
load, except when a new head is asked for (the training code's path).

The headless checkpoints are built by transformers itself (`ViTModel`, `ViTForMaskedImageModeling`).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from transformers import ViTForImageClassification, ViTForMaskedImageModeling, ViTModel

from selfexplain import (
    ExplanationVector,
    ExplanationVectorError,
    IncompatibleExplanationVectorError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
)
from selfexplain.errors import MissingClassifierError
from selfexplain.training.config import TrainingConfig
from selfexplain.training.setup import _load_model
from tests._tiny import pixels, tiny_classifier, tiny_config, tiny_self_explaining

pytestmark = pytest.mark.usefixtures("one_thread")

HEADLESS = {"backbone": ViTModel, "masked-image-modeling": ViTForMaskedImageModeling}


@pytest.fixture(scope="module")
def vector() -> ExplanationVector:
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=40),
        prediction_only=tiny_classifier(seed=41),
        base_model="org/tiny-base",
        recommended_alpha=0.5,
    )


@pytest.fixture(scope="module")
def headless_dirs(tmp_path_factory):
    """A folder per headless class, saved by transformers with the tiny config."""
    root = tmp_path_factory.mktemp("headless")
    dirs = {}
    for name, cls in HEADLESS.items():
        torch.manual_seed(0)
        cls(tiny_config()).save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def _our_warnings(records) -> list[str]:
    """selfexplain's warnings about a random head (from `from_pretrained` or `apply_explanation_vector`)."""
    return [
        str(r.message)
        for r in records
        if "randomly initialised" in str(r.message) or "head is random" in str(r.message)
    ]


@pytest.mark.parametrize("kind", sorted(HEADLESS))
def test_a_headless_folder_is_refused_from_its_config_alone(tmp_path, headless_dirs, vector, kind):
    folder = tmp_path / kind
    folder.mkdir()
    # Only the config: a refusal that needed the weights would fail on their absence instead.
    (folder / "config.json").write_text((headless_dirs[kind] / "config.json").read_text())
    with pytest.raises(MissingClassifierError, match=r"without an image-classification head") as info:
        apply_explanation_vector(folder, vector)
    message = str(info.value)
    assert HEADLESS[kind].__name__ in message
    assert "fine-tune a classifier" in message
    assert isinstance(info.value, ExplanationVectorError)  # the library's error family (a ValueError)


def test_a_headless_folder_whose_config_names_no_class_is_refused_after_loading(
    tmp_path, headless_dirs, vector
):
    folder = tmp_path / "anonymous"
    folder.mkdir()
    config = json.loads((headless_dirs["backbone"] / "config.json").read_text())
    del config["architectures"]  # old or hand-made configs: nothing to decide from
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((headless_dirs["backbone"] / "model.safetensors").read_bytes())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        with pytest.raises(MissingClassifierError, match=r"classifier\.bias.*fine-tune a classifier"):
            apply_explanation_vector(folder, vector)
    assert _our_warnings(records) == []  # an error, not a warning and then an error


@pytest.mark.parametrize("kind", sorted(HEADLESS))
def test_a_loaded_headless_model_is_refused_and_left_untouched(headless_dirs, vector, kind):
    model = HEADLESS[kind].from_pretrained(headless_dirs[kind])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        MissingClassifierError, match=f"This {HEADLESS[kind].__name__} has no image-classification"
    ):
        apply_explanation_vector(model, vector)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_of_another_type_still_gets_the_model_type_message(vector):
    other = copy.deepcopy(vector)
    other.config.model_type = "deit"
    with pytest.raises(IncompatibleExplanationVectorError, match="model_type: vector 'deit', model 'vit'"):
        apply_explanation_vector(ViTModel(tiny_config()), other)


def test_a_classifier_with_a_head_from_a_backbone_checkpoint_warns_but_applies(headless_dirs, vector):
    # transformers gives the class a random head; selfexplain cannot tell whether it was trained since.
    model = ViTForImageClassification.from_pretrained(headless_dirs["backbone"], num_labels=3)
    with pytest.warns(UserWarning, match="loaded from a ViTModel checkpoint, which has no classifier"):
        patched = apply_explanation_vector(model, vector)
    assert isinstance(patched, ViTForSelfExplainingClassification)


def test_a_subclass_with_other_weights_gets_the_librarys_error(vector):
    class WithExtra(ViTForImageClassification):
        def __init__(self, config):
            super().__init__(config)
            self.extra = torch.nn.Linear(2, 2)

    torch.manual_seed(0)
    model = WithExtra(tiny_config())
    with pytest.raises(IncompatibleExplanationVectorError, match="not those of a ViT classifier"):
        apply_explanation_vector(model, vector)


def test_a_headless_hub_repo_is_refused_after_fetching_only_its_config(hub, headless_dirs, vector):
    hub.create_repo_from_folder("heads/backbone", headless_dirs["backbone"])
    with pytest.raises(MissingClassifierError, match="heads/backbone is a ViTModel checkpoint"):
        apply_explanation_vector("heads/backbone", vector)
    assert hub.download_count("heads/backbone") == hub.download_count("heads/backbone", "config.json") == 1


@pytest.mark.parametrize("kind", sorted(HEADLESS))
def test_from_pretrained_warns_about_a_missing_classifier(headless_dirs, kind):
    with pytest.warns(
        UserWarning, match=r"has no image-classification head \(classifier\.bias, classifier\.weight"
    ):
        ViTForSelfExplainingClassification.from_pretrained(headless_dirs[kind])


def test_from_pretrained_warns_about_a_reinitialised_classifier(tmp_path):
    tiny_classifier(seed=1).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}  # the config no longer matches the weights
    config["label2id"] = {f"c{i}": i for i in range(5)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(
        UserWarning, match=r"classifier of another size \(classifier\.bias, classifier\.weight"
    ):
        ViTForSelfExplainingClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_labels": 4}, {"id2label": {0: "a", 1: "b"}}, {"output_loading_info": True}],
    ids=["num_labels", "id2label", "loading_info"],
)
def test_from_pretrained_is_quiet_when_a_new_head_is_asked_for(headless_dirs, kwargs):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loaded = ViTForSelfExplainingClassification.from_pretrained(headless_dirs["backbone"], **kwargs)
    assert _our_warnings(records) == []
    if kwargs.get("output_loading_info"):
        model, info = loaded
        assert {"classifier.weight", "classifier.bias"} <= set(info["missing_keys"])
    else:
        model = loaded
    assert isinstance(model, ViTForSelfExplainingClassification)


def test_a_classifier_loads_quietly_and_predicts_as_saved(tmp_path):
    classifier = tiny_classifier(seed=2)
    classifier.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model = ViTForSelfExplainingClassification.from_pretrained(tmp_path)
    assert _our_warnings(records) == []
    x = pixels(2)
    with torch.no_grad():
        assert torch.equal(model(x).logits, classifier(x).logits)


def test_training_from_a_backbone_stays_quiet(tmp_path, headless_dirs):
    config = TrainingConfig(base=str(headless_dirs["backbone"]), output_dir=str(tmp_path / "run"))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model = _load_model(config, ["a", "b", "c"])
    assert _our_warnings(records) == []
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
