"""Explanation quality as a local `evaluate` metric script: agreement with reference maps and localisation.

Load it offline with ``selfexplain.metrics.load_explanation_metric(config)`` or
``evaluate.load("<path to this file>", config)``. The numbers come from the plain functions in
:mod:`selfexplain.metrics`, so both routes always agree. Insertion/deletion AUC needs the model itself,
which an `evaluate` metric never sees: use ``selfexplain.metrics.insertion_deletion_auc`` for it.
"""

import itertools
import math

import datasets
import evaluate
import torch

from selfexplain.evaluation.metrics import pearson, pointing_game, relevance_mass, spearman, topk_overlap

_DESCRIPTION = """
Explanation quality of per-example explanation maps (one score per patch/player on a grid).

Configs:
- "agreement" (default): agreement of `predictions` with reference explanation maps `references` (e.g. a
  high-budget Kernel SHAP of the same model): mean Spearman rank correlation (average ties), mean Pearson
  correlation and mean top-k overlap of the flattened maps.
- "localization": localisation against object masks given as `references`: pointing-game accuracy (is the
  top cell on the object?) and mean relevance mass (share of positive relevance inside the mask). Maps are
  upsampled to the mask size (nearest), and the test is done at pixel level.
- "all": `predictions`, reference maps `references` and object masks `masks`: all five scores.

Insertion/deletion AUC needs the model and is not part of this metric; see
`selfexplain.metrics.insertion_deletion_auc`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per-example explanation maps, each a nested list (grid_h x grid_w) or a flat list of
        grid_h * grid_w scores (then pass `grid_shape` for the localisation scores).
    references: "agreement"/"all": per-example reference maps with as many entries as the prediction;
        "localization": per-example object masks (0/1), nested (H x W) or flat (pass `mask_shape`).
    masks: "all" only: per-example object masks, nested or flat (pass `mask_shape`).
    grid_shape (`tuple[int, int]`, *optional*): grid of flat prediction maps.
    mask_shape (`tuple[int, int]`, *optional*): shape of flat masks; defaults to `grid_shape`.
    k (`int`, *optional*): size of the top-k sets; defaults to ceil(number of players / 10).

Returns:
    "agreement": spearman, pearson, topk_overlap (means over examples; a constant map makes its
        correlations, hence the mean, NaN).
    "localization": pointing_game, relevance_mass (means; an example without positive relevance makes
        relevance_mass NaN).
    "all": the five keys above.

Examples:
    >>> from selfexplain.evaluation.metrics import load_explanation_metric
    >>> metric = load_explanation_metric("agreement")
    >>> scores = metric.compute(predictions=[[[0.0, 1.0], [2.0, 3.0]]], references=[[[0.0, 1.0], [3.0, 2.0]]], k=2)
    >>> {name: round(score, 4) for name, score in scores.items()}
    {'spearman': 0.8, 'pearson': 0.8, 'topk_overlap': 1.0}
"""

_CITATION = """
@article{yoshikawa2025transferring,
  title={Transferring Visual Explainability of Self-Explaining Models to Prediction-Only Models without
         Additional Training},
  author={Yoshikawa, Yuya and Shimizu, Ryotaro and Kawashima, Takahiro and Saito, Yuki},
  journal={arXiv preprint arXiv:2507.04380},
  year={2025}
}
"""

_COLUMNS = {
    "agreement": ("predictions", "references"),
    "localization": ("predictions", "references"),
    "all": ("predictions", "references", "masks"),
}
_FLAT = datasets.Sequence(datasets.Value("float32"))
_NESTED = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExplanationQuality(evaluate.Metric):
    def _info(self):
        config = "agreement" if self.config_name == "default" else self.config_name
        if config not in _COLUMNS:
            raise ValueError(
                f"Unknown explanation_quality config {self.config_name!r}; expected one of {list(_COLUMNS)}."
            )
        columns = _COLUMNS[config]
        # Every column may be flat or nested, independently: one feature option per combination.
        options = [
            datasets.Features(dict(zip(columns, kinds, strict=True)))
            for kinds in itertools.product((_NESTED, _FLAT), repeat=len(columns))
        ]
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=options,
            reference_urls=["https://arxiv.org/abs/2507.04380"],
        )

    def _compute(self, predictions, references, masks=None, grid_shape=None, mask_shape=None, k=None):
        config = "agreement" if self.config_name == "default" else self.config_name
        mask_shape = mask_shape or grid_shape
        if config == "agreement":
            return _agreement(
                _as_maps(predictions, grid_shape, "predictions"),
                _as_maps(references, grid_shape, "references"),
                k,
            )
        if config == "localization":
            return _localization(
                _as_maps(predictions, grid_shape, "predictions", need_2d=True),
                _as_maps(references, mask_shape, "references", need_2d=True),
            )
        maps = _as_maps(predictions, grid_shape, "predictions", need_2d=True)
        return {
            **_agreement(maps, _as_maps(references, grid_shape, "references"), k),
            **_localization(maps, _as_maps(masks, mask_shape, "masks", need_2d=True)),
        }


def _agreement(maps, references, k):
    def overlap(a, b):
        return topk_overlap(a, b, k if k is not None else max(1, math.ceil(a[0].numel() / 10)))

    return {
        "spearman": _mean_per_example(spearman, maps, references),
        "pearson": _mean_per_example(pearson, maps, references),
        "topk_overlap": _mean_per_example(overlap, maps, references),
    }


def _localization(maps, masks):
    return {
        "pointing_game": _mean_per_example(pointing_game, maps, masks),
        "relevance_mass": _mean_per_example(relevance_mass, maps, masks),
    }


def _as_maps(rows, shape, name, need_2d=False):
    """Per-example tensors: nested rows stay 2-D, flat rows are reshaped to ``shape`` (or kept 1-D)."""
    maps = []
    for i, row in enumerate(rows):
        values = torch.tensor(row, dtype=torch.float32)
        if values.ndim == 1 and shape is not None:
            if values.numel() != math.prod(shape):
                raise ValueError(
                    f"{name}[{i}] has {values.numel()} values, which does not fit the shape {tuple(shape)}."
                )
            values = values.view(*shape)
        if need_2d and values.ndim != 2:
            raise ValueError(
                f"{name}[{i}] is a flat list; pass nested lists or the 2-D shape (`grid_shape` for predictions, "
                "`mask_shape` for masks) to compute localisation scores."
            )
        maps.append(values)
    return maps


def _mean_per_example(fn, *columns):
    # Stack when every example has the same shape (one batched call); otherwise score examples one by one.
    if all(len({tuple(t.shape) for t in column}) == 1 for column in columns):
        scores = fn(*(torch.stack(column) for column in columns))
    else:
        scores = torch.cat([fn(*(t.unsqueeze(0) for t in row)) for row in zip(*columns, strict=True)])
    return float(scores.mean())
