"""Evaluation of explanations: faithfulness without ground truth (insertion / deletion), agreement with a
reference, localisation (pointing game, relevance mass), accuracy, and the baseline explainers that need no
training (attention rollout, Grad-CAM, random).

- :mod:`.metrics`: the metrics, batched.
- :mod:`.explainers`: the baseline explainers.
- ``metrics_module/``: the same metrics as 🤗 ``evaluate`` modules, loadable offline.
"""
