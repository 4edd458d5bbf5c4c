# Copyright 2026 The selfexplain developers. Licensed under the Apache License, Version 2.0.
"""A Vision Transformer classifier that explains its own predictions in the same forward pass.

This file only imports `torch` and `transformers` on purpose: `save_pretrained` copies it next to the
weights so that a pushed model also loads with
`AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)`. As remote code it runs on
whatever transformers the user has, so what older releases (tested back to 4.36) lack is used behind a guard.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import wraps

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.vit.modeling_vit import ViTModel, ViTPreTrainedModel
from transformers.utils import ModelOutput

try:  # recent transformers (it is missing from 4.46, for example)
    from transformers.utils.generic import can_return_tuple
except ImportError:  # older releases: the same contract, written out (remote code must run there too)

    def can_return_tuple(func):
        """Return `output.to_tuple()` when `return_dict=False` is passed or set in the config."""

        @wraps(func)
        def wrapper(self, *args, **kwargs):
            return_dict = kwargs.pop("return_dict", None)
            if return_dict is None:
                return_dict = getattr(self.config, "use_return_dict", True)
            output = func(self, *args, **kwargs)
            return output if return_dict or isinstance(output, tuple) else output.to_tuple()

        return wrapper


try:  # transformers 5: init functions that leave weights already loaded from a checkpoint alone
    from transformers.initialization import zeros_ as _init_zeros
except ImportError:  # older releases initialise before loading, so torch's own is right there
    _init_zeros = nn.init.zeros_

try:  # transformers >= 4.46 picks a model's loss from `loss_type`; image classification joined that map later
    from transformers.loss.loss_utils import LOSS_MAPPING

    _HAS_IMAGE_CLASSIFICATION_LOSS = "ForImageClassification" in LOSS_MAPPING
except ImportError:
    _HAS_IMAGE_CLASSIFICATION_LOSS = False

# `ViTModel.forward` changed over the releases this file runs on: older ones take no `attention_mask` (4.55
# refuses it) and take `return_dict` themselves (returning a tuple when the config says `return_dict=False`).
# Its signature (read through the decorators' `__wrapped__`) says which kind this one is.
_VIT_FORWARD_PARAMETERS = frozenset(inspect.signature(ViTModel.forward).parameters)

#: Settings the self-explaining model reads from a stock `ViTConfig`, with the value used when a
#: config (for example the config of a plain `ViTForImageClassification`) does not carry them.
SELF_EXPLAINING_CONFIG_DEFAULTS: dict[str, object] = {
    # λ: weight of the explanation loss in `loss = classification + λ · explanation`.
    "explanation_loss_weight": 1.0,
    # "mse": mean squared error against targets multiplied by `explanation_target_scale`;
    # "pearson": 1 − Pearson correlation over the player grid, per image and class (scale- and shift-free).
    "explanation_loss": "mse",
    # Targets are Shapley values of class *probabilities*: they sum to f(x) − f(baseline) and are therefore
    # tiny per patch. Multiplying them by the number of players puts them on the scale of one whole-image
    # probability change, which is the scale the shared classifier head produces for a single token.
    "explanation_target_scale": "num_players",
    # "shared": the patch tokens of the last layer are scored by the classifier (no extra parameters);
    # "extension": they first pass through `explanation_extension_layers` extra transformer blocks of their own
    # (`ViTExplanationExtension`), which only the explanation reads: the logits do not depend on them.
    "explanation_head": "shared",
    "explanation_extension_layers": 1,
    # What the extension reads: None, the final normed sequence (what the classifier reads); k, the backbone's
    # `hidden_states[k]` (0: the embeddings, k: the output of block k). Fine-tuning moves the later blocks of two
    # fine-tunes of one base furthest apart, so an extension that reads an earlier block is less tied to the
    # backbone it was trained on.
    "explanation_extension_input_layer": None,
    # Where the extension's tokens go: "classifier", straight to the classifier; "backbone" (an inner-block
    # extension only), back into the model's own later blocks as query tokens — each reads the image's tokens
    # like the CLS token does, none is read by them — then the final layer norm and the classifier. With
    # "backbone" the target's own later blocks turn the extension's output into its map, so the extension
    # only has to be right in the early blocks' representation, where fine-tunes of one base differ least.
    "explanation_extension_route": "classifier",
}

EXPLANATION_HEADS: tuple[str, ...] = ("shared", "extension")
EXTENSION_ROUTES: tuple[str, ...] = ("classifier", "backbone")

ExplainSpec = str | int | Sequence[int] | torch.Tensor | None


class ViTExplanationBlock(nn.Module):
    """A pre-norm transformer block (attention + MLP, residual) on the final tokens, for the explanation only.

    Every parameter at zero makes it the identity (the normed input is 0, so attention, projections and MLP all
    output 0): a model without an extension behaves exactly as one with an all-zero extension. That is what makes
    the extension's weights an explanation-vector *delta* like any other (τ = W − 0), scaled by α and merged by
    the same arithmetic. Trained blocks start as the identity too (the output projections are zero-initialised),
    so training starts from the shared head's map.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        hidden = config.hidden_size
        if hidden % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden} is not a multiple of num_attention_heads {config.num_attention_heads}."
            )
        self.num_heads = config.num_attention_heads
        self.norm1 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=config.qkv_bias)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(hidden, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, hidden)
        self.act = ACT2FN[config.hidden_act]
        for output in (
            self.proj,
            self.fc2,
        ):  # zero-initialised (see `_init_weights`): the block starts as the identity
            output._zero_init = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = hidden_states.shape
        qkv = self.qkv(self.norm1(hidden_states))
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, hidden // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, hidden)
        hidden_states = hidden_states + self.proj(attended)
        return hidden_states + self.fc2(self.act(self.fc1(self.norm2(hidden_states))))


class ViTExplanationExtension(nn.Module):
    """`config.explanation_extension_layers` blocks that turn the backbone's tokens into explanation tokens.

    It reads a whole sequence (CLS and patches) of the backbone — the final normed one, or the output of block
    `config.explanation_extension_input_layer` — and returns new patch tokens for the classifier to score; the CLS
    token the logits come from never passes through it, so the logits are the same with or without it.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        layers = int(config.explanation_extension_layers)
        if layers < 1:
            raise ValueError(f"`explanation_extension_layers` must be >= 1, got {layers}.")
        self.blocks = nn.ModuleList([ViTExplanationBlock(config) for _ in range(layers)])

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        hidden_states = sequence_output
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states[:, 1:, :]


@dataclass
class SelfExplainingImageClassifierOutput(ModelOutput):
    """Output of [`ViTForSelfExplainingClassification`].

    Args:
        loss: `classification_loss + λ · explanation_loss` (whichever parts were computed).
        logits: `(batch, num_labels)` class scores from the CLS token, identical to `ViTForImageClassification`.
        explanation: per-patch scores on the patch grid: `(batch, grid_h, grid_w)` when one class per image
            was explained (the default: the predicted class), `(batch, num_explained, grid_h, grid_w)` otherwise.
        explained_classes: the class indices the explanation is for: `(batch,)` or `(batch, num_explained)`.
        classification_loss: the classification part of `loss`, when `labels` were given.
        explanation_loss: the (unweighted) explanation part of `loss`, when `explanation_targets` were given.
        explanation_tokens: `(batch, num_patches, hidden_size)` the patch tokens the classifier scores into the
            explanation (the extension's output, or the final patch tokens of the shared head), when
            `output_explanation_tokens=True`. Any linear head reads its own map from them.
        hidden_states: as in `ViTForImageClassification`, when `output_hidden_states=True`.
        attentions: as in `ViTForImageClassification`, when `output_attentions=True`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    explanation: torch.FloatTensor | None = None
    explained_classes: torch.LongTensor | None = None
    classification_loss: torch.FloatTensor | None = None
    explanation_loss: torch.FloatTensor | None = None
    explanation_tokens: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ViTForSelfExplainingClassification(ViTPreTrainedModel):
    """`ViTForImageClassification` that also returns a per-patch explanation, at almost no extra cost.

    The final, layer-normed patch tokens are scored by the *same* linear classifier that scores the CLS token
    (`explanation[b, c, j] = W_c · h_j + b_c`). Nothing is added to the model, so any `ViTForImageClassification`
    checkpoint loads with no missing or unexpected keys and produces identical logits, and a prediction-only
    model and a self-explaining model trained from the same base have identical parameter sets: their
    difference, the *explanation vector*, lives on the backbone.

    With `config.explanation_head = "extension"` the patch tokens first pass through a small
    `ViTExplanationExtension` (`explainer.*`, extra transformer blocks); the classifier still scores them, so a
    target's own label set is explained, and the logits never depend on the extension. A model without the
    extension is the same as one whose extension weights are all zero. An extension that reads an inner block
    (`config.explanation_extension_input_layer = k`) can send its tokens through the model's own blocks after `k`
    first (`config.explanation_extension_route = "backbone"`: query tokens that read the image's tokens in each
    block and are read by none), so that a target's own later blocks and head turn them into its map.

    Example:
        ```python
        >>> from selfexplain import ViTForSelfExplainingClassification
        >>> model = ViTForSelfExplainingClassification.from_pretrained("org/vit-finetuned")  # any ViT classifier
        >>> out = model(pixel_values)                 # logits + map of the predicted class
        >>> out.explanation.shape                     # (batch, grid_h, grid_w)
        >>> out = model(pixel_values, explain="all")  # (batch, num_labels, grid_h, grid_w)
        >>> out = model(pixel_values, explain=[3, 7]) # chosen classes; explain=None for none
        ```
    """

    def __init__(self, config: ViTConfig, **settings):
        # `from_pretrained(path, explanation_head="extension")` on a checkpoint whose config predates a setting
        # passes it here (transformers only assigns the keys a config already has).
        unknown = sorted(set(settings) - set(SELF_EXPLAINING_CONFIG_DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}.")
        for key, value in settings.items():
            setattr(config, key, value)
        for key, value in SELF_EXPLAINING_CONFIG_DEFAULTS.items():
            if not hasattr(config, key):
                setattr(config, key, value)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTModel(config, add_pooling_layer=False)
        if config.num_labels <= 0:
            raise ValueError(
                "ViTForSelfExplainingClassification needs `num_labels > 0`: the classifier scores the patches."
            )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        if config.explanation_head not in EXPLANATION_HEADS:
            raise ValueError(
                f"`explanation_head` must be one of {EXPLANATION_HEADS}, got {config.explanation_head!r}."
            )
        layer = config.explanation_extension_input_layer
        if layer is not None and (
            not isinstance(layer, int)
            or isinstance(layer, bool)
            or not 0 <= layer <= config.num_hidden_layers
        ):
            raise ValueError(
                f"`explanation_extension_input_layer` must be None (the final normed tokens) or a block index in "
                f"[0, {config.num_hidden_layers}] (0: the embeddings), got {layer!r}."
            )
        route = config.explanation_extension_route
        if route not in EXTENSION_ROUTES:
            raise ValueError(
                f"`explanation_extension_route` must be one of {EXTENSION_ROUTES}, got {route!r}."
            )
        if (
            config.explanation_head == "extension"
            and route == "backbone"
            and (layer is None or layer >= config.num_hidden_layers)
        ):
            raise ValueError(
                '`explanation_extension_route="backbone"` sends the extension\'s tokens through the blocks after '
                "the one it reads, so `explanation_extension_input_layer` must be a block index below "
                f"{config.num_hidden_layers}, got {layer!r}."
            )
        self.explainer = ViTExplanationExtension(config) if config.explanation_head == "extension" else None
        self.post_init()
        # transformers picks the loss from the class name; ours does not end in "ForImageClassification".
        self.loss_type = "ForImageClassification"

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(
            module, "_zero_init", False
        ):  # the extension's output projections: it starts as the identity
            _init_zeros(module.weight)
            _init_zeros(module.bias)
            return
        super()._init_weights(module)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, use_safetensors: bool | None = True, **kwargs
    ) -> ViTForSelfExplainingClassification:
        """`PreTrainedModel.from_pretrained`, except that only safetensors weights are read by default, and that a
        checkpoint without a usable classifier is *warned* about.

        Loading a pickled checkpoint (`pytorch_model.bin`) unpickles a file from whoever published the repo;
        `use_safetensors=True` (the default here; transformers' is `None`) refuses such repos with a clear
        error instead. Pass `use_safetensors=None` to fall back to a pickled checkpoint you trust.

        The classifier scores the CLS token *and* the patches, so a model whose `classifier.*` weights did not
        come from the checkpoint predicts and explains noise. When they are missing (a backbone such as
        `ViTModel`, or a `ViTForMaskedImageModeling`) or were re-initialised for a size mismatch
        (`ignore_mismatched_sizes=True`), a `UserWarning` says so. It is a warning, not an error, because a
        backbone with a new head is how fine-tuning starts: asking for a new label set (`num_labels`,
        `id2label` or `label2id`) says the new head is intended and keeps the load quiet, as does
        `output_loading_info=True` (the caller reads what did not load). `apply_explanation_vector` refuses
        such checkpoints outright.

        Example:
            ```python
            >>> model = ViTForSelfExplainingClassification.from_pretrained("google/vit-base-patch16-224")
            >>> out = model(pixel_values)  # logits as ViTForImageClassification, plus out.explanation
            >>> to_finetune = ViTForSelfExplainingClassification.from_pretrained(
            ...     "google/vit-base-patch16-224-in21k", num_labels=10)  # a new head, on purpose: no warning
            ```
        """
        wants_loading_info = bool(kwargs.pop("output_loading_info", False))
        new_head_asked = any(key in kwargs for key in ("num_labels", "id2label", "label2id"))
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                use_safetensors=use_safetensors,
                output_loading_info=True,
                **kwargs,
            )
        except OSError as err:
            folder = str(pretrained_model_name_or_path)
            if os.path.isfile(os.path.join(folder, "explanation_vector_config.json")):
                raise OSError(
                    f"{folder} is an explanation vector, not a model: apply it to a classifier with "
                    f"selfexplain.apply_explanation_vector(model, {folder!r})."
                ) from err
            pickled = os.path.isdir(folder) and any(
                f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(folder)
            )
            # transformers' own message says which safetensors file is missing; add why and the way out.
            if use_safetensors and "safetensors" in str(err) and (pickled or not os.path.isdir(folder)):
                raise OSError(
                    f"{err}\nselfexplain reads safetensors weights only: a pickled checkpoint (pytorch_model.bin) "
                    "can run code when it is loaded. If you trust this one, pass `use_safetensors=None`."
                ) from err
            raise
        if wants_loading_info:
            return model, loading_info
        if not new_head_asked:
            _warn_if_classifier_not_loaded(pretrained_model_name_or_path, loading_info)
        return model

    def save_pretrained(self, save_directory, *args, repo_id: str | None = None, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`; with selfexplain installed, a model made by
        `apply_explanation_vector` also gets its model card (`README.md`: which vector, which α, which base)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        _give_weights_the_umask_mode(save_directory)
        try:  # optional: this file also runs as remote code where selfexplain is not installed
            from selfexplain.cards import write_applied_model_files
        except ImportError:
            return
        write_applied_model_files(self, save_directory, repo_id=repo_id)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        explanation_targets: torch.Tensor | None = None,
        explain: ExplainSpec = "predicted",
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_explanation_tokens: bool = False,
        **kwargs,
    ) -> SelfExplainingImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Class labels for the classification loss (same semantics as `ViTForImageClassification`).
        explanation_targets (`torch.FloatTensor`, *optional*):
            Target patch attributions (e.g. Kernel SHAP values) on a player grid `(gh, gw)` that is the patch grid
            or a coarser grid dividing it: `(batch, num_labels, gh, gw)` for every class, or `(batch, gh, gw)` for
            the class in `labels` (required then). Adds `λ · explanation_loss` to the loss.
        explain (`str`, `int`, `Sequence[int]`, `torch.LongTensor` or `None`, defaults to `"predicted"`):
            Which explanation to return: `"predicted"` (the argmax class of each image), `"all"` classes, one
            class index for every image, a list of class indices (the same for every image), a `(batch,)` tensor
            (one class per image) or a `(batch, k)` tensor, or `None` (no explanation).
        output_explanation_tokens (`bool`, defaults to `False`):
            Also return the patch tokens the explanation is scored from (`explanation_tokens`), e.g. to train
            the extension on a game with vector values (`explanation_game="representation"` in training).
        """
        if pixel_values is None:
            raise ValueError("You have to specify `pixel_values`.")
        if attention_mask is not None or "attention_mask" in _VIT_FORWARD_PARAMETERS:
            kwargs["attention_mask"] = attention_mask
        if "return_dict" in _VIT_FORWARD_PARAMETERS:  # older transformers: the output object, never a tuple
            kwargs["return_dict"] = True
        wants_explanation = (
            explain is not None or explanation_targets is not None or output_explanation_tokens
        )
        extension_layer = (
            self.config.explanation_extension_input_layer if self.explainer is not None else None
        )
        asked = kwargs.get(
            "output_hidden_states"
        )  # None (passed or not): the config decides, as in transformers
        return_hidden_states = bool(self.config.output_hidden_states if asked is None else asked)
        if wants_explanation and extension_layer is not None:
            kwargs["output_hidden_states"] = True  # the extension reads an inner block's output
        outputs: BaseModelOutputWithPooling = self.vit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        sequence_output = outputs.last_hidden_state
        logits = self.classifier(sequence_output[:, 0, :])

        grid = self.patch_grid(pixel_values)
        if self.explainer is not None and wants_explanation:
            read = sequence_output if extension_layer is None else outputs.hidden_states[extension_layer]
            patch_tokens = self.explainer(read)
            if self.config.explanation_extension_route == "backbone":
                patch_tokens = self._route_through_backbone(
                    patch_tokens, outputs.hidden_states, extension_layer
                )
        else:
            patch_tokens = sequence_output[:, 1:, :]

        explanation, explained_classes = None, None
        if explain is not None:
            explained_classes = self._resolve_explained_classes(explain, logits)
            explanation = self._score_patches(patch_tokens, explained_classes, grid)

        classification_loss = None
        if labels is not None:
            if _HAS_IMAGE_CLASSIFICATION_LOSS:
                classification_loss = self.loss_function(labels, logits, self.config)
            else:  # older transformers would pick its default (causal LM) loss
                classification_loss = _image_classification_loss(labels, logits, self.config)

        explanation_loss = None
        if explanation_targets is not None:
            explanation_loss = self.explanation_loss(patch_tokens, grid, explanation_targets, labels)

        loss = None
        if classification_loss is not None or explanation_loss is not None:
            loss = classification_loss if classification_loss is not None else logits.new_zeros(())
            if explanation_loss is not None:
                loss = loss + float(self.config.explanation_loss_weight) * explanation_loss

        return SelfExplainingImageClassifierOutput(
            loss=loss,
            logits=logits,
            explanation=explanation,
            explained_classes=explained_classes,
            classification_loss=classification_loss,
            explanation_loss=explanation_loss,
            explanation_tokens=patch_tokens if output_explanation_tokens else None,
            hidden_states=outputs.hidden_states if return_hidden_states else None,
            attentions=outputs.attentions,
        )

    def _route_through_backbone(
        self, queries: torch.Tensor, hidden_states: tuple[torch.Tensor, ...], first: int
    ) -> torch.Tensor:
        """Run the extension's tokens through blocks `first + 1 ...` of the backbone as query tokens.

        In block `l` each query token attends to the image's sequence entering that block (`hidden_states[l]`:
        keys and values) and not to the other queries; the image's own sequence is not changed, so neither
        are the logits. A query equal to patch token `j` therefore stays equal to it through every block: the
        zero extension's map is exactly the model's own (shared-head) map.
        """
        # transformers 5 names the blocks `vit.layers`, 4 `vit.encoder.layer`.
        layers = self.vit.layers if hasattr(self.vit, "layers") else self.vit.encoder.layer
        heads = self.config.num_attention_heads
        batch, length, hidden = queries.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            """(batch, tokens, hidden) -> (batch, heads, tokens, head_dim)"""
            return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

        for index, layer in enumerate(layers[first:], start=first):
            parts = _vit_layer_parts(layer)
            context = parts.layernorm_before(hidden_states[index])
            normed = parts.layernorm_before(queries)
            attended = F.scaled_dot_product_attention(
                split(parts.query(normed)), split(parts.key(context)), split(parts.value(context))
            )
            queries = queries + parts.attention_output(
                attended.transpose(1, 2).reshape(batch, length, hidden)
            )
            queries = queries + parts.mlp_output(
                parts.activation(parts.mlp_input(parts.layernorm_after(queries)))
            )
        return self.vit.layernorm(queries)

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The `(grid_h, grid_w)` patch grid of an input, following its real size (not `config.image_size`)."""
        patch = self.config.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw

    def _resolve_explained_classes(self, explain: ExplainSpec, logits: torch.Tensor) -> torch.Tensor:
        batch, num_labels = logits.shape
        if isinstance(explain, str):
            if explain == "predicted":
                classes = logits.argmax(dim=-1)
            elif explain == "all":
                classes = torch.arange(num_labels, device=logits.device).expand(batch, num_labels)
            else:
                raise ValueError(
                    f'`explain` must be "predicted", "all", class indices or None, got {explain!r}.'
                )
        elif isinstance(explain, int):
            classes = torch.full((batch,), explain, dtype=torch.long, device=logits.device)
        elif isinstance(explain, torch.Tensor):
            classes = explain.to(device=logits.device, dtype=torch.long)
            if classes.dim() not in (1, 2) or classes.shape[0] != batch:
                raise ValueError(
                    f"A tensor `explain` must be shaped (batch,) or (batch, k) with batch={batch}, got {tuple(classes.shape)}."
                )
        else:
            classes = torch.as_tensor(list(explain), dtype=torch.long, device=logits.device).expand(batch, -1)
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_labels):
            raise ValueError(f"`explain` asks for class indices outside [0, {num_labels - 1}]: {explain!r}.")
        return classes

    def _score_patches(
        self, patch_tokens: torch.Tensor, classes: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Score patch tokens with the classifier rows of `classes` only: O(N·D) per requested class."""
        if classes.dim() == 2 and classes.shape[1] == self.config.num_labels and _is_arange_rows(classes):
            # Every class: one matmul with the classifier, no per-image copy of its weight.
            scores = self.classifier(patch_tokens).transpose(1, 2)
            return scores.reshape(scores.shape[0], scores.shape[1], *grid)
        weight = self.classifier.weight[classes]  # (B, D) or (B, K, D)
        bias = self.classifier.bias[classes]
        if classes.dim() == 1:
            scores = torch.einsum("bnd,bd->bn", patch_tokens, weight) + bias[:, None]
            return scores.reshape(-1, *grid)
        scores = torch.einsum("bnd,bkd->bkn", patch_tokens, weight) + bias[..., None]
        return scores.reshape(scores.shape[0], scores.shape[1], *grid)

    def explanation_loss(
        self,
        patch_tokens: torch.Tensor,
        grid: tuple[int, int],
        explanation_targets: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss between the shared-head patch scores and target attributions (see `forward`)."""
        batch = patch_tokens.shape[0]
        targets = explanation_targets.to(patch_tokens.dtype)
        if targets.dim() == 3:
            if labels is None:
                raise ValueError(
                    "`explanation_targets` for one class per image `(batch, gh, gw)` need `labels`."
                )
            classes = labels.to(torch.long).view(batch)
            targets = targets[:, None]
            classes = classes[:, None]
        elif targets.dim() == 4:
            if targets.shape[1] != self.config.num_labels:
                raise ValueError(
                    f"`explanation_targets` has {targets.shape[1]} classes, the model has {self.config.num_labels}."
                )
            classes = torch.arange(self.config.num_labels, device=patch_tokens.device).expand(batch, -1)
        else:
            raise ValueError(
                "`explanation_targets` must be (batch, num_labels, gh, gw) or (batch, gh, gw), "
                f"got {tuple(explanation_targets.shape)}."
            )
        scores = self._score_patches(patch_tokens, classes, grid)  # (B, K, grid_h, grid_w)
        scores = pool_to_player_grid(scores, tuple(targets.shape[-2:]))
        num_players = targets.shape[-1] * targets.shape[-2]

        kind = self.config.explanation_loss
        if kind == "mse":
            scale = self.config.explanation_target_scale
            scale = float(num_players) if scale == "num_players" else float(scale)
            return F.mse_loss(scores, targets * scale)
        if kind == "pearson":
            return (1.0 - _pearson(scores.flatten(2), targets.flatten(2))).mean()
        raise ValueError(f'Unknown `config.explanation_loss` {kind!r}; expected "mse" or "pearson".')


@dataclass(frozen=True)
class _LayerParts:
    layernorm_before: nn.Module
    query: nn.Module
    key: nn.Module
    value: nn.Module
    attention_output: nn.Module
    layernorm_after: nn.Module
    mlp_input: nn.Module
    activation: nn.Module
    mlp_output: nn.Module


def _vit_layer_parts(layer: nn.Module) -> _LayerParts:
    """The modules of one `ViTLayer`, under transformers 5's names (`q_proj`, `mlp.fc1`) or 4's (`query`)."""
    attention = layer.attention
    if hasattr(attention, "q_proj"):  # transformers >= 5
        return _LayerParts(
            layer.layernorm_before, attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
            layer.layernorm_after, layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2,
        )  # fmt: skip
    own = attention.attention
    activation = layer.intermediate.intermediate_act_fn
    return _LayerParts(
        layer.layernorm_before, own.query, own.key, own.value, attention.output.dense,
        layer.layernorm_after, layer.intermediate.dense, activation, layer.output.dense,
    )  # fmt: skip


def pool_to_player_grid(scores: torch.Tensor, player_grid: tuple[int, int]) -> torch.Tensor:
    """Average patch scores `(..., grid_h, grid_w)` over the patches of each player of a coarser grid.

    The patch grid must be a multiple of the player grid, so that every player covers whole patches.
    """
    grid = tuple(scores.shape[-2:])
    if grid == tuple(player_grid):
        return scores
    if grid[0] % player_grid[0] or grid[1] % player_grid[1]:
        raise ValueError(f"The target grid {tuple(player_grid)} must divide the patch grid {grid}.")
    lead = scores.shape[:-2]
    pooled = F.avg_pool2d(
        scores.reshape(-1, 1, *grid), (grid[0] // player_grid[0], grid[1] // player_grid[1])
    )
    return pooled.reshape(*lead, *player_grid)


def _image_classification_loss(labels: torch.Tensor, logits: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """`ViTForImageClassification`'s loss, for transformers releases whose loss map lacks it."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise RuntimeError(f"Invalid problem type: {config.problem_type}")


def _warn_if_classifier_not_loaded(source, loading_info: dict) -> None:
    """Say, in terms of this model, that its head is random (transformers only logs a table of keys)."""
    missing = sorted(
        _key_name(key)
        for key in loading_info.get("missing_keys", ())
        if _key_name(key).startswith("classifier.")
    )
    mismatched = sorted(
        _key_name(key)
        for key in loading_info.get("mismatched_keys", ())
        if _key_name(key).startswith("classifier.")
    )
    if not missing and not mismatched:
        return
    what = (
        f"has no image-classification head ({', '.join(missing)} missing: it is a backbone or another "
        "task's model)"
        if missing
        else f"has a classifier of another size ({', '.join(mismatched)} re-initialised)"
    )
    warnings.warn(
        f"{source} {what}: the classifier of this ViTForSelfExplainingClassification is randomly initialised, "
        "so its predictions and explanations are noise until it is fine-tuned. To fine-tune a new head on "
        "purpose, pass your labels (`num_labels=` or `id2label=`) and this warning goes away; to explain a "
        "model's predictions, load a fine-tuned classifier instead.",
        UserWarning,
        stacklevel=3,
    )


def _key_name(key) -> str:
    """A key of transformers' loading info: a name, or a `(name, shape, shape)` tuple for size mismatches."""
    return key[0] if isinstance(key, (tuple, list)) else str(key)


def _give_weights_the_umask_mode(save_directory) -> None:
    """safetensors writes through a private temporary file (mode 0600); give the weights the mode any new file
    gets (0644 under the usual umask), so other accounts, web servers and shared caches can read them."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(save_directory):
        if name.endswith(".safetensors"):
            os.chmod(os.path.join(save_directory, name), 0o666 & ~umask)


def _is_arange_rows(classes: torch.Tensor) -> bool:
    return bool((classes == torch.arange(classes.shape[1], device=classes.device)).all())


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


ViTForSelfExplainingClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "EXPLANATION_HEADS",
    "SELF_EXPLAINING_CONFIG_DEFAULTS",
    "SelfExplainingImageClassifierOutput",
    "ViTExplanationBlock",
    "ViTExplanationExtension",
    "ViTForSelfExplainingClassification",
    "pool_to_player_grid",
]
