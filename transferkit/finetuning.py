"""Which backbone layers train when: groups, the freeze schedule, the BatchNorm policy, parameter groups.

The backbone is split once into ordered groups (bottom to top) from timm's own ``group_matcher``. Which
groups are frozen is a pure function of ``(epoch, schedule)``, so a resumed run is in exactly the state
an uninterrupted one would be. A frozen group is frozen by how it runs, not by rebuilding the optimizer:

- its parameters stop requiring gradients, so autograd records nothing below the lowest trainable
  group and no backward pass runs through it (the optimizer skips parameters whose grad is ``None``);
- with ``bn_policy="frozen"`` its BatchNorm layers are kept in eval mode on every ``train()`` call, so
  their running statistics do not move.

Every optimizer parameter group is built up front (head first, then the backbone from the top down),
each with its own learning rate, so schedulers never see groups appear or disappear mid-run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from timm.models import group_parameters
from torch import nn

from transferkit.backbones import Backbone

__all__ = [
    "Trunk",
    "value_at",
    "FreezeSchedule",
    "backbone_groups",
    "apply_freeze",
    "set_batchnorm_modes",
    "group_learning_rates",
]

BNPolicy = Literal["frozen", "train", "eval"]


def value_at(milestones: Mapping[int, Any], epoch: int, default: Any = None) -> Any:
    """The value of the latest milestone at or before ``epoch`` in ``{epoch: value}`` (``default``
    before the first one)."""
    reached = [e for e in milestones if e <= epoch]
    return milestones[max(reached)] if reached else default


@dataclass
class FreezeSchedule:
    """When each backbone group starts training. Groups are counted from the top (the head side).

    Three ways to say it (the first that is set wins):

    - ``milestones``: ``{epoch: number of trainable backbone groups from the top}`` (``-1`` = all). Before
      the first milestone the whole backbone is frozen.
    - ``unfreeze_every``: after ``frozen_epochs`` head-only epochs, one more group from the top becomes
      trainable, then another every ``unfreeze_every`` epochs (gradual unfreezing).
    - otherwise: the whole backbone is frozen for ``frozen_epochs`` epochs, then all of it trains.

    Args:
        frozen_epochs: epochs at the start during which only the head trains.
        unfreeze_every: for gradual unfreezing, epochs between two unfreezes.
        milestones: explicit schedule, e.g. ``{0: 0, 2: 3, 5: -1}``.
        bn_policy: ``frozen`` keeps BatchNorm layers of frozen groups in eval mode (running statistics
            untouched); ``train`` lets them update like the trainable ones; ``eval`` keeps every backbone
            BatchNorm in eval mode, unfrozen groups included (their scale and shift still train): the
            usual advice for fine-tuning EfficientNets on small batches. On ELPV (batch 32) it is far
            better than batch statistics: with ``frozen`` the validation loss never got under the
            head-only epochs' and the run stopped early at 0.825 binary accuracy (0.898 with ``eval``).
        warmup_steps: a group unfrozen mid-run ramps its learning rate linearly from 0 over this many
            optimizer steps (0 = no warm-up), so its first large gradients do not wreck pretrained weights.

    Example:
        >>> s = FreezeSchedule(frozen_epochs=2, unfreeze_every=1)
        >>> [s.trainable_groups(epoch, num_groups=4) for epoch in range(7)]
        [0, 0, 1, 2, 3, 4, 4]
    """

    frozen_epochs: int = 0
    unfreeze_every: int | None = None
    milestones: dict[int, int] | None = None
    bn_policy: BNPolicy = "frozen"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.frozen_epochs < 0:
            raise ValueError(f"frozen_epochs must be >= 0, got {self.frozen_epochs}.")
        if self.unfreeze_every is not None and self.unfreeze_every < 1:
            raise ValueError(f"unfreeze_every must be >= 1 epoch, got {self.unfreeze_every}.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.bn_policy not in ("frozen", "train", "eval"):
            raise ValueError(f"bn_policy must be 'frozen', 'train' or 'eval', got {self.bn_policy!r}.")
        if self.milestones is not None:
            self.milestones = {int(k): int(v) for k, v in self.milestones.items()}
            bad = {k: v for k, v in self.milestones.items() if k < 0 or v < -1}
            if bad:
                raise ValueError(
                    f"milestones map epoch (>= 0) -> trainable groups (>= 0, or -1 for all); got {bad}."
                )

    def trainable_groups(self, epoch: int, num_groups: int) -> int:
        """How many backbone groups, counted from the top, train during ``epoch`` (0-based)."""
        if self.milestones:
            n = value_at(self.milestones, epoch, 0)
        elif self.unfreeze_every is not None:
            n = 0 if epoch < self.frozen_epochs else 1 + (epoch - self.frozen_epochs) // self.unfreeze_every
        else:
            n = 0 if epoch < self.frozen_epochs else num_groups
        return num_groups if n < 0 else min(n, num_groups)

    @property
    def active(self) -> bool:
        """Whether anything is ever frozen (the default schedule trains everything from the start)."""
        return bool(self.frozen_epochs or self.unfreeze_every or self.milestones)

    def unfreeze_epoch(self, depth: int, num_groups: int, max_epochs: int) -> int | None:
        """The first epoch in which the group ``depth`` places from the top (1 = top) trains, if any."""
        for epoch in range(max_epochs):
            if self.trainable_groups(epoch, num_groups) >= depth:
                return epoch
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so a checkpoint holding it loads with ``weights_only=True``."""
        return asdict(self)

    @classmethod
    def coerce(cls, value: FreezeSchedule | Mapping[str, Any] | None) -> FreezeSchedule:
        """Accept a schedule, its dict form (from a checkpoint or YAML) or ``None`` (everything trains)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        raise TypeError(f"freeze_schedule must be a FreezeSchedule or a dict, got {type(value).__name__}.")


def backbone_groups(backbone: Backbone) -> list[list[str]]:
    """Parameter names of the backbone, split into ordered groups from bottom (stem) to top.

    Names are relative to ``backbone.model``. Uses timm's coarse ``group_matcher`` (stem, each stage,
    the final layers).
    """
    matcher = backbone.group_matcher(coarse=True)
    grouped = group_parameters(backbone.model, matcher)
    return [grouped[k] for k in sorted(grouped) if grouped[k]]


def _modules_of(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The modules that directly own the given parameters."""
    owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in names}
    return [module for module_name, module in model.named_modules() if module_name in owners]


def apply_freeze(backbone: Backbone, groups: list[list[str]], trainable: int, bn_policy: BNPolicy) -> None:
    """Make the top ``trainable`` groups trainable and freeze the rest (see module doc for what that means)."""
    params = dict(backbone.model.named_parameters())
    frozen_count = len(groups) - trainable
    for index, names in enumerate(groups):
        requires_grad = index >= frozen_count
        for name in names:
            params[name].requires_grad_(requires_grad)
    set_batchnorm_modes(backbone, groups, trainable, bn_policy)


def set_batchnorm_modes(
    backbone: Backbone, groups: list[list[str]], trainable: int, bn_policy: BNPolicy
) -> None:
    """Set every backbone BatchNorm's mode: eval everywhere (``eval``), in frozen groups (``frozen``),
    the backbone's own mode elsewhere (so a group unfrozen mid-run starts updating its statistics)."""
    frozen_count = len(groups) - trainable
    for index, names in enumerate(groups):
        keep_eval = bn_policy == "eval" or (bn_policy == "frozen" and index < frozen_count)
        for module in _modules_of(backbone.model, names):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(backbone.training and not keep_eval)


def group_learning_rates(
    head_lr: float, num_groups: int, layer_decay: float, top_lr: float | None = None
) -> list[float]:
    """Backbone groups' learning rates, bottom to top: the top group gets ``top_lr`` (default
    ``head_lr * layer_decay``), the one below it that times ``layer_decay``, and so on (deeper = smaller)."""
    top = head_lr * layer_decay if top_lr is None else top_lr
    return [top * layer_decay ** (num_groups - 1 - index) for index in range(num_groups)]


class Trunk(nn.Module):
    """The frozen bottom of a backbone as a module of its own, and the forward pass of the rest.

    With the bottom ``frozen_groups`` groups frozen (BatchNorm in eval mode), their output for an image
    never changes, so it can be computed once and cached; :meth:`rest` then runs the trainable top from
    that output to the backbone's pooled features: ``rest(trunk(x)) == backbone(x)``. On a CPU the
    bottom is where most of an EfficientNet's time goes (its high-resolution stages: ~62 % of
    EfficientNet-Lite0's forward pass at 224 px for the stem and the first two block stages).

    Supported: timm's EfficientNet family (``efficientnet_*``, ``tf_efficientnet_*``, lite, MixNet,
    MnasNet...), split between block stages. ``name`` and ``model`` make it usable wherever a backbone's
    features are cached (:func:`transferkit.features.backbone_fingerprint` hashes the trunk's own
    weights only).

    Args:
        backbone: the transferkit backbone.
        groups: its parameter groups, bottom to top (:func:`backbone_groups`).
        frozen_groups: how many groups from the bottom are frozen (>= 1, fewer than all).
    """

    def __init__(self, backbone: Backbone, groups: list[list[str]], frozen_groups: int) -> None:
        super().__init__()
        model = backbone.model
        if type(model).__name__ != "EfficientNet" or not hasattr(model, "blocks"):
            raise ValueError(
                f"the trunk cache splits timm EfficientNet-family backbones between block stages; "
                f"'{backbone.name}' is a {type(model).__name__}. Set data.trunk_cache: off."
            )
        if not 1 <= frozen_groups < len(groups):
            raise ValueError(f"a trunk needs 1 to {len(groups) - 1} frozen groups, got {frozen_groups}.")
        first_trainable = groups[frozen_groups][0]
        match = re.match(r"blocks\.(\d+)\.", first_trainable)
        if match is None:
            raise ValueError(
                f"the first trainable parameter '{first_trainable}' does not start a block stage, so "
                f"'{backbone.name}' cannot be split there; set data.trunk_cache: off."
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
