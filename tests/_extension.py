"""The tiny recipe the extension tests share: a prediction-only classifier, and an explanation extension trained
alone on it with the amortised Shapley objective."""

from __future__ import annotations

from selfexplain.training import TrainingConfig

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
