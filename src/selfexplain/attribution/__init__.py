"""Attribution: Shapley values of image patches, and explanation targets computed from them.

- :mod:`.model_call`: the one way every module calls a classifier and reads its logits, its patch grid, and
  which classes to explain.
- :mod:`.masking`: removing patches (baseline images, masks on the player grid).
- :mod:`.token_dropping`: removing a ViT's patches by dropping their tokens (``removal="tokens"``: cheaper, and a
  different value function).
- :mod:`.shapley`: exact enumeration and batched Kernel SHAP, every class at once.
- :mod:`.targets`: Kernel SHAP targets for a whole dataset, sharded and resumable.
"""

from .shapley import exact_shapley_values, kernel_shap_values
from .targets import add_explanation_targets

__all__ = ["add_explanation_targets", "exact_shapley_values", "kernel_shap_values"]
