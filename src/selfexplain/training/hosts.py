"""Extension hosts: other frozen classifiers of the same base θ0 that an explanation extension learns to explain.

A transferred extension meets a backbone it was not trained on: the target's fine-tune of θ0, on the target's
images, scored by the target's classifier. Trained on one frozen classifier (the source's), the extension
learns that classifier; trained on several (the source's and a few *hosts*: prediction-only classifiers
fine-tuned from the same θ0 on other domains, each on its own images), it has to learn what explains any
fine-tune of θ0, which is what a vector is for (docs/design.md §3, "Extension hosts").

Each host holds a reference to the trained model's ``explainer`` module, so one extension gets the gradients of
every host's amortised Shapley loss. A host's logits never depend on the extension, so the host itself is its
own frozen value model.

Example:
    >>> config = TrainingConfig(
    ...     base="runs/mnist-pred", output_dir="runs/mnist-ext", explanation_loss_weight=100.0,
    ...     explanation_objective="shapley", value_model="runs/mnist-pred", explanation_head="extension",
    ...     trainable="extension",
    ...     extension_hosts=[{"model": "runs/shapes-pred", "data": "builtin:shapes-on-clutter"}])
    >>> train(config, mnist["train"])  # each step: a batch of MNIST and a batch of shapes for the shapes host
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from ..attribution.amortized import (
    amortized_shapley_loss,
    coalition_values,
    example_generators,
    shapley_kernel_coalitions,
)
from ..data import detect_columns
from ..data.loading import load_image_dataset
from ..modeling_self_explaining_vit import ViTForSelfExplainingClassification
from .sampling import INDEX_KEY, _collate, _Examples

# Stream of `numpy.random.SeedSequence([seed, step, micro, _HOST_STREAM, host])` (see sampling.py's streams).
_HOST_STREAM = 2
# Host coalitions are drawn from `example_generators(seed, step, ...)` with the example index offset by this per
# host, so they never coincide with the training data's own (seed, epoch, index) streams.
_HOST_INDEX_OFFSET = 1 << 40

#: Settings an extension reads: a host must have the same, or the shared extension cannot run on its tokens.
_SHAPE_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size", "image_size", "patch_size")


@dataclass
class ExtensionHost:
    """One frozen host: its model (sharing the trained extension) and its own training images."""

    name: str
    model: ViTForSelfExplainingClassification
    examples: _Examples
    index: int

    def batch(self, seed: int, step: int, micro: int, batch_size: int) -> dict[str, torch.Tensor]:
        """``batch_size`` examples drawn without replacement from ``(seed, step, micro, host)`` alone: the
        same for a resumed run, and independent of the training data's order."""
        state = np.random.SeedSequence([seed, step, micro, _HOST_STREAM, self.index]).generate_state(
            1, dtype=np.uint64
        )[0]
        generator = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        count = min(batch_size, len(self.examples))
        indices = torch.randperm(len(self.examples), generator=generator)[:count].tolist()
        return _collate(self.examples.__getitems__([(step, index) for index in indices]))

    def shapley_loss(
        self,
        batch: dict[str, torch.Tensor],
        seed: int,
        step: int,
        coalitions_per_image: int,
        baseline: str,
        game: str = "probs",
    ) -> torch.Tensor:
        """The amortised Shapley loss of the extension on this host (values from the host's own probabilities,
        or its own CLS representation for ``game="representation"``)."""
        pixel_values = batch["pixel_values"].to(self.model.device)
        grid = self.model.patch_grid(pixel_values)
        num_players = grid[0] * grid[1]
        if game == "representation":
            tokens = self.model(pixel_values=pixel_values, explain=None, output_explanation_tokens=True)
            explanation = tokens.explanation_tokens.transpose(1, 2)
        else:
            explanation = self.model(pixel_values=pixel_values, explain="all").explanation.flatten(2)
        offset = (self.index + 1) * _HOST_INDEX_OFFSET
        generators = example_generators(seed, step, [offset + i for i in batch[INDEX_KEY].tolist()])
        coalitions = shapley_kernel_coalitions(num_players, coalitions_per_image // 2, generators)
        values, v_empty, v_full = coalition_values(
            self.model, pixel_values, coalitions.to(pixel_values.device), grid, baseline, game=game
        )
        return amortized_shapley_loss(explanation / num_players, coalitions, values, v_empty, v_full)


def load_extension_hosts(
    hosts: Sequence[dict[str, str]],
    model: ViTForSelfExplainingClassification,
    transform: Any,
    datasets: Sequence[Dataset] | None,
    seed: int,
    device: torch.device,
) -> list[ExtensionHost]:
    """Load every host (frozen), give it the trained model's extension, and wrap its training images.

    ``datasets`` (one per host, in order) replaces the hosts' ``"data"``; without it each ``"data"`` is read
    with :func:`selfexplain.data.load_image_dataset` (split ``"train"``; built-in domains with ``seed``).
    """
    if datasets is not None and len(datasets) != len(hosts):
        raise ValueError(
            f"{len(datasets)} host datasets for {len(hosts)} extension hosts: give one per host."
        )
    if model.explainer is None:
        raise ValueError(
            "extension_hosts need a model with an explanation extension (explanation_head='extension')."
        )
    loaded = []
    for index, spec in enumerate(hosts):
        host = ViTForSelfExplainingClassification.from_pretrained(spec["model"])
        different = {
            key: (getattr(host.config, key, None), getattr(model.config, key, None))
            for key in _SHAPE_KEYS
            if getattr(host.config, key, None) != getattr(model.config, key, None)
        }
        if different:
            details = ", ".join(f"{k}: host {a!r}, trained model {b!r}" for k, (a, b) in different.items())
            raise ValueError(
                f"Extension host {spec['model']!r} does not fit the extension ({details}): a host must be a "
                "classifier of the same architecture, fine-tuned from the same base."
            )
        if datasets is not None:
            dataset = datasets[index]
        elif "data" in spec:
            kwargs = {"seed": seed} if spec["data"].startswith("builtin:") else {}
            dataset = load_image_dataset(spec["data"], split="train", **kwargs)
        else:
            raise ValueError(f'Extension host {spec["model"]!r} has no "data": pass its training dataset.')
        image_column, label_column = detect_columns(dataset, None, None)
        host.requires_grad_(False)
        host.config.explanation_head = "extension"
        # the shared extension reads the same block of every host
        host.config.explanation_extension_input_layer = model.config.explanation_extension_input_layer
        host.config.explanation_extension_route = model.config.explanation_extension_route
        host.explainer = model.explainer  # shared: the host's loss trains the one extension
        host.to(device).eval()
        examples = _Examples(dataset, transform, {image_column: "image", label_column: "label"})
        loaded.append(ExtensionHost(name=spec["model"], model=host, examples=examples, index=index))
    return loaded
