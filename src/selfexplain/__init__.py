"""selfexplain: Vision Transformer classifiers that explain their own predictions, with no extra training.

```python
from selfexplain import ViTForSelfExplainingClassification, ExplanationVector, apply_explanation_vector

model = ViTForSelfExplainingClassification.from_pretrained("some-org/vit-finetuned-on-x")
out = model(pixel_values)                     # out.logits, out.explanation (predicted class, patch grid)
vec = ExplanationVector.from_models(self_explaining=se_model, prediction_only=p_model, base_model="...")
explaining = apply_explanation_vector("their-org/vit-cats-vs-dogs", vec, alpha=1.0)
```

The package, a folder per concept (see docs/design.md):

- ``modeling_self_explaining_vit``: the model (self-contained: it is also saved next to the weights as remote code);
- ``vectors``: the explanation vector, its config, compatibility, file checks, IO and ``apply``;
- ``attribution``: one way to call a model, removal of patches, exact and Kernel SHAP, explanation targets;
- ``evaluation``: faithfulness, agreement and localisation metrics, baseline explainers, ``evaluate`` modules;
- ``data``: built-in offline domains, loading any dataset, preprocessing;
- ``training``: the config, deterministic sampling, the ``accelerate`` loop, checkpoints, the offline base;
- ``experiments``: the transfer suite and its report; ``cli``: the ``selfexplain`` command;
- ``timm_checkpoints``: timm ViT checkpoints in (without importing timm) and out;
- ``hub`` (one publish path), ``cards`` (model cards), ``visualize`` (heatmaps), ``errors``.
"""

from . import _moved_modules
from .attribution.shapley import exact_shapley_values, kernel_shap_values
from .attribution.targets import add_explanation_targets
from .data import load_builtin_domain, load_image_dataset
from .errors import (
    ExplanationVectorError,
    IncompatibleExplanationVectorError,
    InvalidExplanationVectorError,
    MissingClassifierError,
    NotAModelError,
    NotAnExplanationVectorError,
    UnsupportedModelError,
)
from .evaluation.alpha_fitting import fit_alpha
from .evaluation.explainers import blend_with_rollout, standardized_blend
from .hub import publish_folder
from .modeling_self_explaining_vit import (
    SelfExplainingImageClassifierOutput,
    ViTExplanationExtension,
    ViTForSelfExplainingClassification,
)
from .pipelines import IMAGE_EXPLANATION_TASK, ImageExplanationPipeline, register_pipelines
from .timm_checkpoints import is_timm_config, load_timm_checkpoint, save_timm_checkpoint
from .training import TrainingConfig, pretrain_base, train
from .vectors import (
    ExplanationVector,
    ExplanationVectorConfig,
    VectorCompression,
    apply_explanation_vector,
    architecture_fingerprint,
)
from .vectors.alpha import AlphaFit, LayerAlpha
from .visualize import explanation_to_heatmap, label_image, overlay_heatmap

_moved_modules.install()
register_pipelines()  # pipeline("image-explanation", model=...) works once selfexplain is imported

__version__ = "0.2.0"

__all__ = [
    "AlphaFit",
    "ExplanationVector",
    "ExplanationVectorConfig",
    "ExplanationVectorError",
    "IMAGE_EXPLANATION_TASK",
    "ImageExplanationPipeline",
    "IncompatibleExplanationVectorError",
    "InvalidExplanationVectorError",
    "LayerAlpha",
    "MissingClassifierError",
    "NotAModelError",
    "NotAnExplanationVectorError",
    "SelfExplainingImageClassifierOutput",
    "TrainingConfig",
    "UnsupportedModelError",
    "VectorCompression",
    "ViTExplanationExtension",
    "ViTForSelfExplainingClassification",
    "__version__",
    "add_explanation_targets",
    "apply_explanation_vector",
    "architecture_fingerprint",
    "blend_with_rollout",
    "exact_shapley_values",
    "fit_alpha",
    "is_timm_config",
    "explanation_to_heatmap",
    "kernel_shap_values",
    "label_image",
    "load_builtin_domain",
    "load_image_dataset",
    "load_timm_checkpoint",
    "overlay_heatmap",
    "pretrain_base",
    "publish_folder",
    "save_timm_checkpoint",
    "standardized_blend",
    "train",
]
