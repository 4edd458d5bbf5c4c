"""The exceptions selfexplain raises for bad explanation vectors and incompatible models.

All derive from `ExplanationVectorError`, itself a `ValueError`, so `except ValueError` keeps working for
callers that do not care about the details.
"""


class ExplanationVectorError(ValueError):
    """Base class of every error about an explanation vector or the model it is applied to."""


class InvalidExplanationVectorError(ExplanationVectorError):
    """The files of a vector are missing, corrupt, or inconsistent with its config."""


class NotAnExplanationVectorError(InvalidExplanationVectorError):
    """The repository or folder holds something else (for example a model) where a vector was expected."""


class NotAModelError(ExplanationVectorError, OSError):
    """Where a model was expected, the folder or repo holds something else (an explanation vector, a dataset).

    Also an `OSError`, like transformers' own errors for a folder or repo without a model.
    """


class IncompatibleExplanationVectorError(ExplanationVectorError):
    """The vector and the model differ in architecture, keys or shapes; nothing was changed."""


class MissingClassifierError(ExplanationVectorError):
    """The model has no image-classification head: a backbone (`ViTModel`, such as the in21k or DINO bases) or
    another task's model (`ViTForMaskedImageModeling`). A vector patches a classifier and keeps its head and
    labels, so a classifier must be fine-tuned first; nothing was changed."""


class UnsupportedModelError(ExplanationVectorError):
    """The checkpoint is a model selfexplain cannot make self-explaining as it is: for example a timm ViT with
    average pooling, register tokens or layer scale, which transformers' ViT cannot reproduce. The message names
    each unsupported feature and why; nothing was loaded."""


__all__ = [
    "ExplanationVectorError",
    "IncompatibleExplanationVectorError",
    "InvalidExplanationVectorError",
    "MissingClassifierError",
    "NotAModelError",
    "NotAnExplanationVectorError",
    "UnsupportedModelError",
]
