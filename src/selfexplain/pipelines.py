"""`pipeline("image-explanation")`: top labels and the model's own heatmap per image, in one forward pass.

Registered with transformers' `PIPELINE_REGISTRY` when `selfexplain` is imported, the way transformers
registers custom pipelines, so that the usual factory works:

    >>> import selfexplain  # registers "image-explanation"
    >>> from transformers import pipeline
    >>> explain = pipeline("image-explanation", model="outputs/demo/work/seed0/digits-prediction_only")
    >>> result = explain("digit.png", top_k=3)
    >>> result["labels"]           # [{"label": "7", "score": 0.93}, ...]: as "image-classification" returns
    >>> result["explanation"]      # (grid_h, grid_w) numpy array: the explained class's patch scores
    >>> result["overlay"].save("digit-heatmap.png")  # the map over the image, at the image's resolution

`model` may be a folder or Hub id of a self-explaining model, of an applied model (`apply_explanation_vector`
+ `save_pretrained`), or of a plain ViT classifier (then the map is its untrained head's: apply a vector first),
or a loaded `ViTForSelfExplainingClassification`. Batches (`batch_size=`) and devices (`device=`) work as for
every transformers pipeline. `"image-classification"` keeps working on the same models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from .evaluation.explainers import attention_rollout, standardized_blend
from .modeling_self_explaining_vit import ViTForSelfExplainingClassification
from .visualize import explanation_to_heatmap, overlay_heatmap

#: The task name under which the pipeline is registered.
IMAGE_EXPLANATION_TASK = "image-explanation"


class ImageExplanationPipeline(Pipeline):
    """Per image: the top labels with softmax scores and the explanation of one class (the predicted one by
    default) as patch scores, as a heatmap at the image's resolution and as an overlay picture.

    Call arguments:
        top_k (int, default 5): labels returned.
        explain ("predicted", an int class index or a label name; default "predicted"): the class explained.
        overlay (bool, default True): also return the overlay picture (`visualize.overlay_heatmap`, signed
            colours: red for the class, blue against it).
        blend_rollout (bool, default False): return the model's map blended with its attention rollout
            (`evaluation.explainers.blend_with_rollout`: per-image z-scores averaged, unitless; the overlay's red
            and blue then mean above and below the image's average, not for and against the class). On the offline
            suite this is more faithful than a *transferred* map alone on related domains, and less faithful
            than an in-domain self-explaining map (docs/results/transfer_blend.md).
        timeout (float): as in `"image-classification"`, for images given as URLs.

    Returns, per image, a dict: `labels` (list of `{"label", "score"}`), `explained_label`, `explained_class`,
    `explanation` (`(grid_h, grid_w)` float32 array), `heatmap` (`(height, width)` float32 array, the raw
    scores upsampled to the image) and `overlay` (a PIL image, when asked).
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, ViTForSelfExplainingClassification):
            raise TypeError(
                f"The {IMAGE_EXPLANATION_TASK!r} pipeline needs a ViTForSelfExplainingClassification, got "
                f"{type(self.model).__name__}: load the model with ViTForSelfExplainingClassification.from_pretrained "
                "or apply an explanation vector first (selfexplain.apply_explanation_vector)."
            )
        if self.image_processor is None:
            raise ValueError(
                f"The {IMAGE_EXPLANATION_TASK!r} pipeline needs an image processor: pass image_processor=... or "
                "save one with the model (AutoImageProcessor.from_pretrained(base).save_pretrained(folder))."
            )

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        explain: str | int | None = None,
        overlay: bool | None = None,
        timeout: float | None = None,
        blend_rollout: bool | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        preprocess: dict[str, Any] = {}
        forward: dict[str, Any] = {}
        postprocess: dict[str, Any] = {}
        if timeout is not None:
            preprocess["timeout"] = timeout
        if explain is not None:
            forward["explain"] = self._class_index(explain)
        if blend_rollout is not None:
            forward["blend_rollout"] = bool(blend_rollout)
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            postprocess["top_k"] = top_k
        if overlay is not None:
            postprocess["overlay"] = bool(overlay)
        return preprocess, forward, postprocess

    def _class_index(self, explain: str | int) -> str | int:
        if explain == "predicted":
            return explain
        num_labels = self.model.config.num_labels
        if isinstance(explain, (int, np.integer)) and not isinstance(explain, bool):
            if not 0 <= int(explain) < num_labels:
                raise ValueError(
                    f"explain={explain} is not a class index of this model (0..{num_labels - 1})."
                )
            return int(explain)
        if isinstance(explain, str):
            label2id = {str(k): int(v) for k, v in self.model.config.label2id.items()}
            if explain in label2id:
                return label2id[explain]
            raise ValueError(
                f"explain={explain!r} is not a label of this model; labels: {sorted(label2id)[:20]}"
                + (" …" if len(label2id) > 20 else "")
                + ' (or use "predicted" or a class index).'
            )
        raise TypeError(f'explain must be "predicted", a class index or a label name, got {explain!r}.')

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:
        image = load_image(image, timeout=timeout)
        inputs = self.image_processor(images=image.convert("RGB"), return_tensors="pt")
        # A list entry: transformers' collate and unbatching pass non-tensors through untouched, so the original
        # picture reaches `postprocess` (the overlay is drawn at its resolution, not the model's input size).
        return {"pixel_values": inputs["pixel_values"].to(self.dtype), "images": [image]}

    def _forward(
        self, model_inputs: dict[str, Any], explain: str | int = "predicted", blend_rollout: bool = False
    ) -> dict[str, Any]:
        pixel_values = model_inputs["pixel_values"]
        if not isinstance(explain, str):
            explain = torch.full((len(pixel_values),), explain, dtype=torch.long, device=pixel_values.device)
        out = self.model(pixel_values=pixel_values, explain=explain)
        explanation = out.explanation
        if blend_rollout:
            explanation = standardized_blend(explanation, attention_rollout(self.model, pixel_values))
        return {
            "logits": out.logits,
            "explanation": explanation,
            "explained_classes": out.explained_classes,
            "images": model_inputs["images"],
        }

    def postprocess(
        self, model_outputs: dict[str, Any], top_k: int = 5, overlay: bool = True
    ) -> dict[str, Any]:
        image = model_outputs["images"]
        image = image[0] if isinstance(image, list) else image
        logits = model_outputs["logits"][0].float()
        scores = torch.softmax(logits, dim=-1)
        order = torch.argsort(scores, descending=True)[: min(top_k, len(scores))]
        id2label = self.model.config.id2label
        explanation = model_outputs["explanation"][0].float()
        explained = int(model_outputs["explained_classes"].reshape(-1)[0])
        heatmap = explanation_to_heatmap(explanation, image=image, normalize=False)
        result: dict[str, Any] = {
            "labels": [{"label": id2label[int(i)], "score": float(scores[i])} for i in order],
            "explained_label": id2label[explained],
            "explained_class": explained,
            "explanation": explanation.numpy(),
            "heatmap": heatmap.numpy(),
        }
        if overlay:
            result["overlay"] = overlay_heatmap(image.convert("RGB"), heatmap, signed=True)
        return result


def register_pipelines() -> None:
    """Register `"image-explanation"` with transformers (done when `selfexplain` is imported)."""
    if IMAGE_EXPLANATION_TASK in PIPELINE_REGISTRY.get_supported_tasks():
        return
    PIPELINE_REGISTRY.register_pipeline(
        IMAGE_EXPLANATION_TASK,
        pipeline_class=ImageExplanationPipeline,
        pt_model=ViTForSelfExplainingClassification,
        type="image",
    )


__all__ = ["IMAGE_EXPLANATION_TASK", "ImageExplanationPipeline", "register_pipelines"]
