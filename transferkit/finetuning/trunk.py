"""The frozen bottom of a backbone as a module of its own, so its output can be cached."""

from __future__ import annotations

import re

import torch
from torch import nn

from transferkit.errors import ConfigError

__all__ = ["Trunk"]


class Trunk(nn.Module):
    """The frozen bottom of a backbone as a module of its own, and the forward pass of the rest.

    With the bottom ``frozen_groups`` groups frozen (BatchNorm in eval mode), their output for an image
    never changes, so it can be computed once and cached; :meth:`rest` then runs the trainable top from
    that output to the backbone's pooled features: ``rest(trunk(x)) == backbone(x)``. On a CPU the
    bottom is where most of an EfficientNet's time goes (its high-resolution stages; docs/benchmarks.md).

    Supported: timm's EfficientNet family (``efficientnet_*``, ``tf_efficientnet_*``, lite, MixNet,
    MnasNet...), split between block stages. ``name`` and ``model`` make it usable wherever a backbone's
    features are cached (:func:`transferkit.data.features.backbone_fingerprint` hashes the trunk's own
    weights only).

    Args:
        backbone: the transferkit backbone.
        groups: its parameter groups, bottom to top (:func:`backbone_groups`).
        frozen_groups: how many groups from the bottom are frozen (>= 1, fewer than all).
    """

    def __init__(self, backbone: nn.Module, groups: list[list[str]], frozen_groups: int) -> None:
        super().__init__()
        model = backbone.model
        if type(model).__name__ != "EfficientNet" or not hasattr(model, "blocks"):
            raise ConfigError(
                f"the trunk cache splits timm EfficientNet-family backbones between block stages; "
                f"'{backbone.name}' is a {type(model).__name__}. Set caches.trunk_cache: off."
            )
        if not 1 <= frozen_groups < len(groups):
            raise ConfigError(f"a trunk needs 1 to {len(groups) - 1} frozen groups, got {frozen_groups}.")
        first_trainable = groups[frozen_groups][0]
        match = re.match(r"blocks\.(\d+)\.", first_trainable)
        if match is None:
            raise ConfigError(
                f"the first trainable parameter '{first_trainable}' does not start a block stage, so "
                f"'{backbone.name}' cannot be split there; set caches.trunk_cache: off."
            )
        self.stages = int(match.group(1))  # block stages in the trunk
        self.frozen_groups = frozen_groups
        self.name = f"{backbone.name}:trunk[{frozen_groups}]"
        self.model = nn.ModuleDict(
            {"conv_stem": model.conv_stem, "bn1": model.bn1, "blocks": model.blocks[: self.stages]}
        )
        # not submodules: the top is not part of the trunk (built once, not per step)
        self._top = [model, model.blocks[self.stages :]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model["blocks"](self.model["bn1"](self.model["conv_stem"](x)))

    def rest(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, num_features)`` from the trunk's output."""
        model, blocks = self._top
        return model.forward_head(model.bn2(model.conv_head(blocks(x))))

    def train(self, mode: bool = True) -> Trunk:
        return self  # the modules' modes belong to the model they are part of
