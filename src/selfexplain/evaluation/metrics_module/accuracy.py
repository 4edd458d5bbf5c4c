"""Accuracy as a local `evaluate` metric script, so that training and evaluation work without the Hub.

Same inputs, configs and output as the Hub's ``evaluate-metric/accuracy``, computed with numpy instead of
scikit-learn. Load it with ``selfexplain.metrics.load_accuracy_metric()`` or
``evaluate.load("<path to this file>")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the examples:
Accuracy = (TP + TN) / (TP + TN + FP + FN). With `normalize=False` it is the number of correct predictions.
The "multilabel" config counts an example as correct only when all of its labels are predicted exactly.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels (lists of 0/1 per example for the "multilabel" config).
    references (`list` of `int`): Ground truth labels, shaped like `predictions`.
    normalize (`bool`, defaults to `True`): If `False`, return the number of correctly classified examples.
    sample_weight (`list` of `float`, *optional*): Per-example weights. Defaults to `None` (equal weights).

Returns:
    accuracy (`float` or `int`): In [0, 1] when `normalize=True`, else the (weighted) count of correct examples.

Examples:
    >>> from selfexplain.evaluation.metrics import load_accuracy_metric
    >>> accuracy_metric = load_accuracy_metric()
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        if self.config_name == "multilabel":
            label = datasets.Sequence(datasets.Value("int32"))
        elif self.config_name == "default":
            label = datasets.Value("int32")
        else:
            raise ValueError(
                f"Unknown accuracy config {self.config_name!r}; expected 'default' or 'multilabel'."
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": label, "references": label}),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"`predictions` {predictions.shape} and `references` {references.shape} must have the same shape."
            )
        if len(references) == 0:
            raise ValueError("No examples were given; accuracy is undefined.")
        correct = predictions == references
        if correct.ndim > 1:  # multilabel: an example is correct only if every label matches
            correct = correct.all(axis=tuple(range(1, correct.ndim)))
        weights = (
            np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        )
        if weights.shape != correct.shape:
            raise ValueError(
                f"`sample_weight` must hold one weight per example ({len(correct)}), got {weights.shape}."
            )
        hits = float(np.sum(weights * correct))
        if not normalize:
            return {"accuracy": hits if sample_weight is not None else int(hits)}
        return {"accuracy": hits / float(np.sum(weights))}
