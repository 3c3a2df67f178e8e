"""Where the model looks: Grad-CAM maps from the backbone's last feature map, with the ``grad-cam`` package.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a feature map by the mean gradient of one class's
logit with respect to it, sums the channels and keeps the positive part: a coarse map, at the feature map's
resolution, of the regions that raise that class. :func:`gradcam_maps` picks the layer from what the timm
model describes itself as:

- a CNN (``forward_features`` gives ``(B, C, h, w)``): the module whose output is that feature map (e.g.
  EfficientNet's ``bn2``, ResNet's ``layer4``, ConvNeXt's ``norm_pre``);
- a ViT-style model (``(B, prefix + h * w, C)`` tokens): the last block's first norm, the usual choice,
  because after the final norm only the class token reaches the head; the patch tokens are laid out on their
  ``h x w`` grid (:attr:`patch_embed.grid_size`), the prefix (class, register) tokens dropped.

Other layouts (channels-last ``(B, h, w, C)`` feature maps, hybrid models) are refused with a message
naming the shape. The maps are upsampled to the input's size and scaled to [0, 1] per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.errors import ConfigError

__all__ = ["gradcam_layer", "gradcam_maps"]


def _timm_model(model: Any) -> nn.Module:
    backbone = getattr(model, "backbone", None)
    return getattr(backbone, "model", backbone) if backbone is not None else model


@torch.no_grad()
def gradcam_layer(
    model: Any, side: int
) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """The layer Grad-CAM reads for ``model`` (a :class:`~transferkit.TransferClassifier` or a timm model),
    a transform from its output to ``(B, C, h, w)`` (``None`` when it already is one), and a description
    such as ``bn2 (256 x 7 x 7)``. ``side``: the input's side, for one probing forward pass."""
    timm_model = _timm_model(model)
    parameter = next(timm_model.parameters())
    probe = torch.zeros(1, 3, side, side, dtype=parameter.dtype, device=parameter.device)
    outputs: list[tuple[str, Any]] = []  # held, so that no tensor is freed and its id reused

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
            outputs.append((name, out))

        return hook

    hooks = [
        module.register_forward_hook(record(name)) for name, module in timm_model.named_modules() if name
    ]
    was_training = timm_model.training
    timm_model.eval()
    try:
        features = timm_model.forward_features(probe)
    finally:
        for hook in hooks:
            hook.remove()
        timm_model.train(was_training)
    name = type(timm_model).__name__
    shape = tuple(features.shape)
    num_features = getattr(timm_model, "num_features", None)
    if features.ndim == 4 and shape[1] == num_features:
        # the outermost module that returned the feature map itself (hooks fire inner modules first)
        layer_name = next((name for name, out in reversed(outputs) if out is features), None)
        if layer_name is None:
            raise ConfigError(
                f"Grad-CAM: no module of {name} returns its last feature map {shape} (it is computed outside "
                "a module); this architecture is not supported."
            )
        return timm_model.get_submodule(layer_name), None, f"{layer_name} ({' x '.join(map(str, shape[1:]))})"
    blocks = getattr(timm_model, "blocks", None)
    grid = getattr(getattr(timm_model, "patch_embed", None), "grid_size", None)
    prefix = int(getattr(timm_model, "num_prefix_tokens", 0))
    if features.ndim == 3 and blocks is not None and len(blocks) and hasattr(blocks[-1], "norm1") and grid:
        patch = getattr(timm_model.patch_embed, "patch_size", None)
        h, w = (side // int(patch[0]), side // int(patch[1])) if patch else (int(grid[0]), int(grid[1]))
        if shape[1] != prefix + h * w:
            raise ConfigError(
                f"Grad-CAM: {name}'s {shape[1]} tokens are not {prefix} prefix tokens plus a {h} x {w} grid of "
                "patches; this architecture is not supported."
            )

        def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
            patches = tokens[:, prefix:, :]
            return patches.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)

        return blocks[-1].norm1, tokens_to_map, f"blocks.{len(blocks) - 1}.norm1 (tokens on a {h} x {w} grid)"
    raise ConfigError(
        f"Grad-CAM supports CNNs whose last feature map is (B, C, h, w) and ViT-style models with patch tokens; "
        f"{name}'s forward_features gives {shape}. Leave Grad-CAM out for this backbone (--no-gradcam)."
    )


def gradcam_maps(
    model: Any,
    images: torch.Tensor,
    classes: Sequence[int] | None = None,
    batch_size: int = 16,
    layer: tuple[nn.Module, Any, str] | None = None,
) -> np.ndarray:
    """Grad-CAM maps ``(B, H, W)`` in [0, 1] for images ``(B, 3, H, W)`` (already through the eval pipeline),
    each for the class in ``classes`` (default: the predicted one). The model is used in eval mode and left
    as it was found; its weights are not changed.

    Example:
        >>> import transferkit as tk
        >>> model = tk.TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False)
        >>> gradcam_maps(model, torch.randn(3, 3, 64, 64), classes=[0, 1, 1]).shape
        (3, 64, 64)
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if images.ndim != 4:
        raise ValueError(f"images must be a batch (B, 3, H, W), got shape {tuple(images.shape)}.")
    if classes is not None and len(classes) != len(images):
        raise ValueError(f"{len(classes)} classes for {len(images)} images.")
    # ``layer``: what gradcam_layer returned for this model and size, to reuse it over several calls
    target, reshape, _ = layer if layer is not None else gradcam_layer(model, int(images.shape[-1]))
    was_training = model.training
    parameter = next(model.parameters())
    maps = []
    try:
        with GradCAM(model=model, target_layers=[target], reshape_transform=reshape) as cam:
            # a frozen backbone's parameters need no gradient; a gradient on the input still reaches the layer
            cam.compute_input_gradient = True
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(parameter.device, parameter.dtype)
                targets = None
                if classes is not None:
                    targets = [ClassifierOutputTarget(int(c)) for c in classes[start : start + batch_size]]
                maps.append(cam(input_tensor=batch, targets=targets))
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return np.concatenate(maps).astype(np.float32)
