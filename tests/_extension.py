"""The tiny recipe the extension tests share: a prediction-only classifier, and an explanation extension trained
alone on it with the amortised Shapley objective."""

from __future__ import annotations

from selfexplain.data import default_image_processor
from selfexplain.training import TrainingConfig, train
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
