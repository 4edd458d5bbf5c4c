"""transformers pipelines on selfexplain models: "image-classification" keeps working, "image-explanation" explains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import ViTImageProcessor

import selfexplain
from selfexplain import ExplanationVector, ViTForSelfExplainingClassification, apply_explanation_vector

from ._tiny import tiny_classifier, tiny_self_explaining

LABELS = {0: "cat", 1: "dog", 2: "fox"}


def _processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 16, "width": 16})


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(16, 16), (40, 24), (23, 31)]  # other sizes and aspect ratios than the model's input
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def applied_folder(tmp_path_factory):
    """A plain classifier with an explanation vector applied, saved as a user would."""
    root = tmp_path_factory.mktemp("pipelines")
    kwargs = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    target = tiny_classifier(seed=3, **kwargs)
    vector = ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=1), prediction_only=tiny_self_explaining(seed=2)
    )
    patched = apply_explanation_vector(target, vector, alpha=1.0)
    patched.save_pretrained(root / "applied")
    _processor().save_pretrained(root / "applied")
    return root / "applied"


def test_image_explanation_pipeline_matches_the_model(applied_folder):
    explain = transformers.pipeline("image-explanation", model=str(applied_folder))
    assert isinstance(explain, selfexplain.ImageExplanationPipeline)
    model = ViTForSelfExplainingClassification.from_pretrained(applied_folder).eval()
    image = _images()[1]
    result = explain(image, top_k=2)

    pixel_values = _processor()(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values)
    probs = out.logits.softmax(-1)[0]
    best = probs.argsort(descending=True)[:2]
    assert [r["label"] for r in result["labels"]] == [LABELS[int(i)] for i in best]
    assert result["labels"][0]["score"] == pytest.approx(float(probs[best[0]]), abs=1e-5)
    assert result["explained_class"] == int(best[0]) and result["explained_label"] == LABELS[int(best[0])]
    np.testing.assert_allclose(result["explanation"], out.explanation[0].numpy(), atol=1e-5)
    # The heatmap and the overlay are at the picture's resolution, not the model's 16×16 input.
    assert result["heatmap"].shape == (image.height, image.width)
    assert result["overlay"].size == image.size


def test_image_explanation_pipeline_batches_and_explains_a_chosen_class(applied_folder):
    explain = transformers.pipeline("image-explanation", model=str(applied_folder))
    images = _images()
    one_by_one = [explain(img, explain="fox", overlay=False) for img in images]
    batched = explain(images, batch_size=2, explain="fox", overlay=False)
    assert len(batched) == len(images)
    for single, many, img in zip(one_by_one, batched, images, strict=True):
        assert many["explained_label"] == "fox" and many["explained_class"] == 2
        assert "overlay" not in many and many["heatmap"].shape == (img.height, img.width)
        np.testing.assert_allclose(many["explanation"], single["explanation"], atol=1e-5)
        assert [r["label"] for r in many["labels"]] == [r["label"] for r in single["labels"]]
    by_index = explain(images[0], explain=2, overlay=False)
    np.testing.assert_allclose(by_index["explanation"], one_by_one[0]["explanation"], atol=1e-6)


def test_image_explanation_pipeline_refuses_bad_arguments(applied_folder):
    explain = transformers.pipeline("image-explanation", model=str(applied_folder))
    image = _images()[0]
    with pytest.raises(ValueError, match="not a label of this model"):
        explain(image, explain="wolf")
    with pytest.raises(ValueError, match="not a class index"):
        explain(image, explain=7)
    with pytest.raises(ValueError, match="top_k"):
        explain(image, top_k=0)
    # A plain classifier object has no explanation head: a clear error, not a crash in forward().
    with pytest.raises(TypeError, match="ViTForSelfExplainingClassification"):
        selfexplain.ImageExplanationPipeline(model=tiny_classifier(), image_processor=_processor())


def test_image_classification_pipeline_agrees_with_image_explanation(applied_folder):
    classify = transformers.pipeline("image-classification", model=str(applied_folder))
    explain = transformers.pipeline(
        "image-explanation",
        model=ViTForSelfExplainingClassification.from_pretrained(applied_folder),
        image_processor=_processor(),
    )
    for image in _images():
        labels = classify(image, top_k=3)
        explained = explain(image, top_k=3, overlay=False)["labels"]
        assert [r["label"] for r in labels] == [r["label"] for r in explained]
        np.testing.assert_allclose([r["score"] for r in labels], [r["score"] for r in explained], atol=1e-5)


def test_image_explanation_pipeline_can_blend_the_map_with_attention_rollout(applied_folder):
    explain = transformers.pipeline("image-explanation", model=str(applied_folder))
    model = ViTForSelfExplainingClassification.from_pretrained(applied_folder).eval()
    image = _images()[2]
    plain, blended = explain(image, overlay=False), explain(image, overlay=False, blend_rollout=True)
    pixel_values = _processor()(images=image, return_tensors="pt")["pixel_values"]
    expected = selfexplain.blend_with_rollout(model, pixel_values)[0].numpy()
    np.testing.assert_allclose(blended["explanation"], expected, atol=1e-5)
    assert not np.allclose(blended["explanation"], plain["explanation"])
    assert blended["labels"] == plain["labels"]  # the blend changes the map, never the prediction
