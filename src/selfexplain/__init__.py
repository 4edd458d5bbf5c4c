"""selfexplain: Vision Transformer classifiers that explain their own predictions, with no extra training.

```python
from selfexplain import ViTForSelfExplainingClassification, ExplanationVector, apply_explanation_vector

model = ViTForSelfExplainingClassification.from_pretrained("some-org/vit-finetuned-on-x")
out = model(pixel_values)                     # out.logits, out.explanation (predicted class, patch grid)
vec = ExplanationVector.from_models(self_explaining=se_model, prediction_only=p_model, base_model="...")
explaining = apply_explanation_vector("their-org/vit-cats-vs-dogs", vec, alpha=1.0)
```
"""

from .apply import apply_explanation_vector
from .errors import (
    ExplanationVectorError,
    IncompatibleExplanationVectorError,
    InvalidExplanationVectorError,
    NotAnExplanationVectorError,
)
from .explanation_vector import ExplanationVector, ExplanationVectorConfig, architecture_fingerprint
from .modeling_self_explaining_vit import (
    SelfExplainingImageClassifierOutput,
    ViTForSelfExplainingClassification,
)
from .shapley import exact_shapley_values, kernel_shap_values
from .visualize import explanation_to_heatmap, overlay_heatmap

__version__ = "0.1.0"

__all__ = [
    "ExplanationVector",
    "ExplanationVectorConfig",
    "ExplanationVectorError",
    "IncompatibleExplanationVectorError",
    "InvalidExplanationVectorError",
    "NotAnExplanationVectorError",
    "SelfExplainingImageClassifierOutput",
    "ViTForSelfExplainingClassification",
    "__version__",
    "apply_explanation_vector",
    "architecture_fingerprint",
    "exact_shapley_values",
    "explanation_to_heatmap",
    "kernel_shap_values",
    "overlay_heatmap",
]
