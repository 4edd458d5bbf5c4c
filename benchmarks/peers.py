"""Adapters that run the peer libraries (shap, Captum, pytorch-grad-cam) on the same model, players and baseline
as selfexplain.

Devices: every adapter runs the model where ``pixel_values`` live (``_common.device()``). shap works in numpy on the
CPU, so its value functions move each batch of masked images to the images' device and bring the scores back with
``.cpu()``; Captum and pytorch-grad-cam take the model, inputs, baselines and feature masks on that device (their
own bookkeeping, Captum's linear fit and pytorch-grad-cam's map scaling, runs on the CPU). Maps come back on the
images' device, except shap's Partition maps, which are numpy arrays (pixel maps, as that library returns them).

Every sampling adapter explains images on a ``(grid_h, grid_w)`` player grid, replaces removed players by the same
baseline image (:func:`selfexplain.attribution.masking.make_baseline`) and scores softmax probabilities, so their estimates
are comparable with :func:`selfexplain.attribution.shapley.kernel_shap_values`. The model is a
:class:`_common.LogitsModel`, whose counter checks the evaluation budget each library really spends.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch
from _common import LogitsModel, Peer, load_peer
from _torchvision_workaround import fake_kernel_registration_disabled
from torch import nn

from selfexplain.attribution.masking import grid_to_pixel_mask, make_baseline, mask_images

# --------------------------------------------------------------------------------------------------------
# shap
# --------------------------------------------------------------------------------------------------------


def shap_kernel(
    shap: ModuleType,
    model: LogitsModel,
    pixel_values: torch.Tensor,
    grid: tuple[int, int],
    budget: int,
    classes: torch.Tensor | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """``shap.KernelExplainer`` over grid players, one image at a time, ``budget`` evaluations per image.

    The explainer sees binary coalition vectors; the model function turns them into masked images. The
    background is the empty coalition (every player shows the baseline) and ``x`` the full one, so shap spends
    1 + 1 + ``nsamples`` evaluations: ``nsamples = budget - 2``. ``l1_reg=False`` keeps it plain Kernel SHAP (no
    LARS feature selection), like ours. With ``classes=None`` every class is explained from the same
    evaluations ``(B, num_classes, gh, gw)``; with one class per image only that output ``(B, gh, gw)``. shap
    samples and fits in numpy on the CPU; the masked images are composed and scored on ``pixel_values``' device, and
    the maps are returned there.
    """
    num_players = grid[0] * grid[1]
    baseline = make_baseline(pixel_values, "mean")
    maps = []
    for index in range(pixel_values.shape[0]):
        image, base = pixel_values[index : index + 1], baseline[index : index + 1]
        target = None if classes is None else int(classes[index])

        def value(coalitions: np.ndarray, image=image, base=base, target=target) -> np.ndarray:
            masks = torch.from_numpy(coalitions > 0.5).view(1, -1, *grid).to(image.device)
            outputs = []
            with torch.inference_mode():
                for chunk in masks.split(batch_size, dim=1):
                    probs = model(mask_images(image, base, chunk)).softmax(-1)
                    outputs.append(probs if target is None else probs[:, target : target + 1])
            return torch.cat(outputs).double().cpu().numpy()

        explainer = shap.KernelExplainer(value, np.zeros((1, num_players)))
        phi = explainer.shap_values(np.ones((1, num_players)), nsamples=budget - 2, l1_reg=False, silent=True)
        phi = np.asarray(phi, dtype=np.float64).reshape(num_players, -1)  # (players, outputs)
        maps.append(torch.from_numpy(phi.T.copy()).float().view(-1, *grid))
    stacked = torch.stack(maps).to(pixel_values.device)
    return stacked if classes is None else stacked[:, 0]


def shap_partition(
    shap: ModuleType, model: LogitsModel, pixel_values: torch.Tensor, classes: torch.Tensor, budget: int
) -> list[np.ndarray]:
    """shap's image explainer (``PartitionExplainer`` + ``maskers.Image``) at ``max_evals=budget``, per image.

    The masker fills hidden pixels with the same per-image mean colour as our baseline. Partition explains
    hierarchical pixel regions (Owen values), not a fixed patch grid, so its maps are pixel maps. shap masks the
    images in numpy on the CPU; each batch is moved to ``pixel_values``' device to be scored.
    """
    maps = []
    height, width = pixel_values.shape[-2:]
    for index in range(pixel_values.shape[0]):
        target = int(classes[index])
        image_hwc = pixel_values[index].permute(1, 2, 0).detach().cpu().numpy()
        mean_colour = np.broadcast_to(image_hwc.mean(axis=(0, 1)), image_hwc.shape).copy()

        def value(images_hwc: np.ndarray, target=target) -> np.ndarray:
            batch = torch.from_numpy(np.ascontiguousarray(images_hwc, dtype=np.float32)).permute(0, 3, 1, 2)
            with torch.inference_mode():
                scores = model(batch.to(pixel_values.device)).softmax(-1)
                return scores[:, target : target + 1].double().cpu().numpy()

        masker = shap.maskers.Image(mean_colour, shape=(height, width, 3))
        explainer = shap.PartitionExplainer(value, masker)
        explanation = explainer(image_hwc[None], max_evals=budget, batch_size=budget, silent=True)
        maps.append(np.asarray(explanation.values)[0, ..., 0].sum(-1))
    return maps


# --------------------------------------------------------------------------------------------------------
# Coalition games: shap, shapiq and Captum on one value function of binary coalition masks
# --------------------------------------------------------------------------------------------------------

# The libraries below see only coalitions and values, in numpy (shap, shapiq) or as small CPU tensors (Captum's
# inputs are the coalition masks themselves): they run on the CPU on every device. The game itself (numpy masks in,
# numpy values out) runs the model where it lives and brings the values back to the CPU.

#: ``(M, n)`` bool coalition masks -> ``(M,)`` float64 values (one class); the equal-error benchmark's games.
CoalitionGame = Callable[[np.ndarray], np.ndarray]


def shap_kernel_game(
    shap: ModuleType, game: CoalitionGame, num_players: int, budget: int, seed: int
) -> np.ndarray:
    """``shap.KernelExplainer`` on a coalition game: ``(n,)`` values from ``budget`` evaluations.

    The background is the empty coalition and ``x`` the full one, which shap evaluates apart from its samples:
    ``nsamples = budget - 2``. ``l1_reg=False`` keeps plain Kernel SHAP. shap samples with numpy's global RNG.
    """
    np.random.seed(seed)
    explainer = shap.KernelExplainer(lambda z: game(z > 0.5), np.zeros((1, num_players)))
    phi = explainer.shap_values(np.ones((1, num_players)), nsamples=budget - 2, l1_reg=False, silent=True)
    return np.asarray(phi, dtype=np.float64).reshape(num_players)


def shapiq_kernel_shap_game(
    shapiq: ModuleType, game: CoalitionGame, num_players: int, budget: int, seed: int, leverage: bool
) -> np.ndarray:
    """shapiq's ``KernelSHAP`` on a coalition game, paired; ``leverage=True`` makes it Leverage SHAP.

    shapiq 1.4 has no class of that name: Leverage SHAP (Musco & Witter 2025) is its Kernel SHAP with sampling
    weights equal over sizes (the leverage scores), which the shapiq authors' own benchmarks use. Its budget
    counts the empty and full coalitions; sizes whose expected draws exceed their count are enumerated (its
    border trick); the rest is drawn with replacement and a repeat is counted, not re-evaluated.
    """
    weights = np.ones(num_players + 1) if leverage else None
    approximator = shapiq.KernelSHAP(
        num_players, pairing_trick=True, sampling_weights=weights, random_state=seed
    )
    with warnings.catch_warnings():  # "budget close to the number of coalitions" is the point of a curve
        warnings.simplefilter("ignore")
        values = approximator.approximate(budget, lambda coalitions: game(np.asarray(coalitions, dtype=bool)))
    return np.asarray(values.get_n_order_values(1), dtype=np.float64)


def captum_kernel_shap_game(
    captum_attr: ModuleType, game: CoalitionGame, num_players: int, budget: int, seed: int
) -> np.ndarray:
    """Captum ``KernelShap`` on a coalition game: input all ones, baseline all zeros, one feature per player.

    Captum perturbs the input to ``mask * 1 + (1 - mask) * 0 = mask``, so its forward sees the coalition masks;
    ``n_samples=budget`` (its first two samples are the full and empty coalitions). It samples with torch's
    global RNG, evaluates a repeated coalition again, and fits with scikit-learn's linear regression.
    """
    torch.manual_seed(seed)

    def forward(masks: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(game(masks.detach().cpu().numpy() > 0.5))

    explainer = captum_attr.KernelShap(forward)
    with torch.no_grad():
        phi = explainer.attribute(
            torch.ones(1, num_players),
            baselines=torch.zeros(1, num_players),
            feature_mask=torch.arange(num_players).unsqueeze(0),
            n_samples=budget,
            perturbations_per_eval=budget,
        )
    return phi[0].to(torch.float64).cpu().numpy()


# --------------------------------------------------------------------------------------------------------
# Captum
# --------------------------------------------------------------------------------------------------------


def player_feature_mask(pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(1, C, H, W)`` long tensor: the player index of every pixel (same cells as ``mask_images``), on
    ``pixel_values``' device (Captum combines it with the inputs and baselines)."""
    ids = torch.arange(grid[0] * grid[1], dtype=torch.float32, device=pixel_values.device).view(1, *grid)
    pixel_ids = grid_to_pixel_mask(ids, tuple(pixel_values.shape[-2:])).long()  # (1, H, W)
    return pixel_ids.unsqueeze(1).expand(1, pixel_values.shape[1], -1, -1).contiguous()


def _softmax_model(model: LogitsModel):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x).softmax(-1)

    return forward


def captum_kernel_shap(
    captum_attr: ModuleType,
    model: LogitsModel,
    pixel_values: torch.Tensor,
    grid: tuple[int, int],
    classes: torch.Tensor,
    budget: int,
) -> torch.Tensor:
    """Captum ``KernelShap`` with a player feature mask, ``n_samples=budget`` in one batch, one class per image.

    Captum explains one target per call (its Lime base fits one scalar output), and loops over the images of
    the batch internally. Returns ``(B, gh, gw)``.
    """
    mask = player_feature_mask(pixel_values, grid)
    explainer = captum_attr.KernelShap(_softmax_model(model))
    # Captum warns that several images mean several fits: that is the point here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are providing multiple inputs for Lime")
        attributions = explainer.attribute(
            pixel_values,
            baselines=make_baseline(pixel_values, "mean"),
            target=classes,
            feature_mask=mask.expand(pixel_values.shape[0], -1, -1, -1),
            n_samples=budget,
            perturbations_per_eval=budget,
        )
    return _pool_to_grid(attributions, mask, grid)


def captum_feature_ablation(
    captum_attr: ModuleType,
    model: LogitsModel,
    pixel_values: torch.Tensor,
    grid: tuple[int, int],
    classes: torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """Captum ``FeatureAblation`` (occlusion of one player at a time by the baseline): ``n + 1`` evaluations."""
    mask = player_feature_mask(pixel_values, grid)
    explainer = captum_attr.FeatureAblation(_softmax_model(model))
    with torch.no_grad():
        attributions = explainer.attribute(
            pixel_values,
            baselines=make_baseline(pixel_values, "mean"),
            target=classes,
            feature_mask=mask.expand(pixel_values.shape[0], -1, -1, -1),
            perturbations_per_eval=batch_size,
        )
    return _pool_to_grid(attributions, mask, grid)


def _pool_to_grid(attributions: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Captum repeats a player's attribution on each of its pixels; read one pixel (channel 0) per player."""
    num_players = grid[0] * grid[1]
    flat_mask = mask[0, 0].flatten().cpu()  # looked up on the CPU: one device sync, not one per player
    first_pixel = torch.stack([(flat_mask == p).nonzero()[0, 0] for p in range(num_players)])
    return attributions[:, 0].flatten(1)[:, first_pixel.to(attributions.device)].view(-1, *grid).float()


class _ChannelsFirst(nn.Module):
    """``(B, T, D) -> (B, D, T)``: lets Captum's conv-style Grad-CAM average gradients over tokens."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2)


class _TokensLast(nn.Module):
    def forward(self, channels_first: torch.Tensor) -> torch.Tensor:
        return channels_first.transpose(1, 2)


class CaptumLayerGradCam:
    """Captum ``LayerGradCam`` on the output of the last block's ``layernorm_before``, like ``selfexplain``'s.

    ``LayerGradCam`` averages gradients over the dimensions after the channel dimension; ViT tokens are
    ``(B, T, D)``, so a copy of the model routes that activation through a ``(B, D, T)`` view for Captum to hook
    (the usual ``reshape_transform`` of pytorch-grad-cam). Maps are ReLU'd and drop the CLS token. Captum's
    channel weights average the gradients over all tokens, the CLS token included (ours: patches only), so the
    maps differ from ``selfexplain.evaluation.explainers.grad_cam`` by well under 1 %.
    """

    def __init__(self, captum_attr: ModuleType, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        block = self.model.vit.layers[-1]
        self.hooked = _ChannelsFirst()
        block.layernorm_before = nn.Sequential(block.layernorm_before, self.hooked, _TokensLast())
        self.explainer = captum_attr.LayerGradCam(lambda x: self.model(pixel_values=x).logits, self.hooked)

    def __call__(
        self, pixel_values: torch.Tensor, classes: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        cam = self.explainer.attribute(pixel_values, target=classes, relu_attributions=True)  # (B, 1, T)
        return cam[:, 0, 1:].reshape(-1, *grid).detach()


# --------------------------------------------------------------------------------------------------------
# pytorch-grad-cam
# --------------------------------------------------------------------------------------------------------

#: pytorch-grad-cam is not in the [bench] extra: it needs torchvision, and an unpinned torchvision makes pip replace
#: torch 2.13.0+cpu by torch 2.14 with CUDA wheels. It lives in its own environment, torch and torchvision pinned in
#: one command (the torchvision wheel is CUDA-linked: see `_torchvision_workaround`).
GRAD_CAM_INSTALL = (
    "python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 torchvision==0.28.0 grad-cam "
    "-e '.[bench]'"
)


def load_grad_cam() -> Peer:
    """pytorch-grad-cam as a :class:`_common.Peer`, imported with the torchvision workaround
    (:mod:`_torchvision_workaround`: registering torchvision's fake kernels is skipped during the import)."""
    with fake_kernel_registration_disabled():
        peer = load_peer("pytorch_grad_cam", "pytorch-grad-cam")
    if peer.available and peer.version == "unknown":  # the package has no __version__
        from importlib.metadata import version

        peer.version = version("grad-cam")
    return peer


class _Logits(nn.Module):
    """``model(x) -> logits``: pytorch-grad-cam indexes the model's output as a ``(B, num_classes)`` tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def vit_tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam's ``reshape_transform`` for a ViT: ``(B, 1 + N, D)`` tokens -> ``(B, D, h, w)``, CLS dropped."""
    patches = tokens[:, 1:, :]
    return patches.reshape(patches.shape[0], *grid, patches.shape[-1]).permute(0, 3, 1, 2)


class PytorchGradCam:
    """pytorch-grad-cam's ``GradCAM`` on the output of the last block's ``layernorm_before`` (the layer of
    ``selfexplain.evaluation.explainers.grad_cam``), CLS token dropped by the ``reshape_transform``.

    Its channel weights average the gradients over the patch tokens, like ours; it then min-max scales each map to
    [0, 1] and resizes it to the input's pixels (OpenCV bilinear), so its maps equal ours up to that scaling and
    the upsampling. Returns those ``(B, H, W)`` pixel maps, as the library does, on ``pixel_values``' device. Runs
    on a copy of the model (the library calls ``zero_grad`` and ``backward``, which would write ``.grad`` into the
    caller's parameters).
    """

    def __init__(self, grad_cam_module: ModuleType, model: nn.Module, grid: tuple[int, int]) -> None:
        wrapped = _Logits(copy.deepcopy(model).eval())
        self.cam = grad_cam_module.GradCAM(
            model=wrapped,
            target_layers=[wrapped.model.vit.layers[-1].layernorm_before],
            reshape_transform=lambda tokens: vit_tokens_to_grid(tokens, grid),
        )

    def __call__(self, pixel_values: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        # The library runs on its model's device (the input is moved there) and returns numpy maps.
        return torch.from_numpy(self.cam(input_tensor=pixel_values, targets=targets)).to(pixel_values.device)
