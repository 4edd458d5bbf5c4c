"""Training: one `accelerate` loop for prediction-only (λ = 0) and self-explaining (λ > 0) ViT classifiers.

- :mod:`.config`: :class:`TrainingConfig`, the recipe (every field has help text, shown by ``--help``).
- :mod:`.sampling`: the deterministic data order and global batches that make a λ = 0 and a λ > 0 run see
  the same data.
- :mod:`.loop`: :func:`train`, the loop itself (evaluation, logging, checkpoints, resume, model card, push).
- :mod:`.setup`: the model, image processor and optimizer a run starts from, and the dataset checks.
- :mod:`.distributed`: the accelerator, CPU multi-process launches, per-process slices.
- :mod:`.checkpoints`: the files of a run.
- :mod:`.pretrain`: :func:`pretrain_base`, the offline base θ0.

``python -m selfexplain.training`` (or ``accelerate launch -m selfexplain.training``) runs :func:`train` from
the command line, like ``selfexplain train``.
"""

from .checkpoints import CHECKPOINTS_DIR, LOG_NAME, latest_checkpoint
from .config import TrainingConfig
from .distributed import cpu_only_launch
from .loop import train
from .pretrain import pretrain_base
from .sampling import epoch_order

__all__ = [
    "CHECKPOINTS_DIR",
    "LOG_NAME",
    "TrainingConfig",
    "cpu_only_launch",
    "epoch_order",
    "latest_checkpoint",
    "pretrain_base",
    "train",
]
