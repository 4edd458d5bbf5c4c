"""The tiny recipe the extension tests share: a prediction-only classifier, and an explanation extension trained
alone on it with the amortised Shapley objective."""

from __future__ import annotations

import json

import pytest

from selfexplain import (
    ExplanationVector,
    IncompatibleExplanationVectorError,
    InvalidExplanationVectorError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
)
from selfexplain.data import default_image_processor
from selfexplain.training import TrainingConfig, train
from selfexplain.vectors.config import VECTOR_CONFIG_NAME
from tests._squares import IMAGE_SIZE, coloured_squares
from tests._tiny import tiny_classifier

#: A few seconds per run on the coloured squares.
COMMON = dict(
    num_epochs=6, batch_size=16, learning_rate=3e-3, log_every=4, augment=False, checkpoint_every=None
)


def extension_config(root, pred, name, **kwargs) -> TrainingConfig:
    """An extension on the frozen classifier `pred` (also the value model unless given), in `root / name`."""
    return TrainingConfig(
        base=str(pred),
        output_dir=str(root / name),
        explanation_loss_weight=10.0,
        explanation_objective="shapley",
        coalitions_per_image=8,
        removal_baseline="zero",
        explanation_head="extension",
        trainable="extension",
        **{**COMMON, "num_epochs": 20, "value_model": str(pred), **kwargs},
    )


def colour_classifier(root):
    """A prediction-only classifier of coloured squares, trained in `root / "pred"`; returns it and its data."""
    base = root / "base"
    tiny_classifier(seed=0, num_labels=3, id2label={0: "red", 1: "green", 2: "blue"}).save_pretrained(base)
    default_image_processor(IMAGE_SIZE).save_pretrained(base)
    data = coloured_squares(64, seed=0).remove_columns("explanation_targets")
    pred = root / "pred"
    train(TrainingConfig(base=str(base), output_dir=str(pred), **COMMON), data)
    return pred, data


def trained_vector(root) -> ExplanationVector:
    """The vector of the extension trained in `root / "se"` on the classifier in `root / "pred"`."""
    return ExplanationVector.from_models(
        self_explaining=ViTForSelfExplainingClassification.from_pretrained(root / "se"),
        prediction_only=ViTForSelfExplainingClassification.from_pretrained(root / "pred"),
    )


def assert_config_edits_refused(vector: ExplanationVector, folder, edits) -> None:
    """Save `vector` to `folder`; each `(changes, message)` edit of its config must make loading fail with it."""
    vector.save_pretrained(folder)
    path = folder / VECTOR_CONFIG_NAME
    good = json.loads(path.read_text())
    for changes, message in edits:
        path.write_text(json.dumps({**good, **changes}))
        with pytest.raises(InvalidExplanationVectorError, match=message):
            ExplanationVector.from_pretrained(folder)


def assert_never_combined(
    vector: ExplanationVector, other_model, root, tmp_path, setting: str, apply_message: str
) -> dict:
    """`other_model`'s extension differs from `vector`'s in `setting`: their vectors are never merged or added,
    and neither `other_model` nor its saved copy takes `vector`. Returns the other vector's saved config."""
    other = ExplanationVector.from_models(
        self_explaining=other_model,
        prediction_only=ViTForSelfExplainingClassification.from_pretrained(root / "pred"),
    )
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=setting):
        ExplanationVector.merge([vector, other], method="task_arithmetic")
    with pytest.raises(ValueError, match="same architecture"):
        vector + other
    with pytest.raises(IncompatibleExplanationVectorError, match=apply_message):
        apply_explanation_vector(other_model, vector)
    other_model.save_pretrained(tmp_path / "other-model")
    with pytest.raises(IncompatibleExplanationVectorError, match=apply_message):
        apply_explanation_vector(str(tmp_path / "other-model"), vector)
    return json.loads((tmp_path / "other" / VECTOR_CONFIG_NAME).read_text())
