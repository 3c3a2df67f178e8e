"""The freezing controller: which backbone groups train in an epoch, and what that leaves cacheable.

A :class:`FreezeController` owns a backbone's groups and its :class:`~transferkit.finetuning.schedule.FreezeSchedule`.
At the start of every training epoch the model asks it to apply the epoch's state (``start_epoch``);
after every ``train()`` call it puts the BatchNorm layers of frozen groups back into eval mode
(``keep_batchnorm_modes``). Everything it decides is a function of the epoch, so it needs no state
saved in checkpoints beyond what the epoch already says.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from transferkit.errors import BackboneError, ConfigError, warn
from transferkit.finetuning.groups import (
    apply_freeze,
    backbone_groups,
    group_learning_rates,
    set_batchnorm_modes,
)
from transferkit.finetuning.schedule import FreezeSchedule
from transferkit.finetuning.trunk import Trunk

__all__ = ["FreezeController"]

StageKind = Literal["features", "trunk"]


class FreezeController:
    """Applies a freeze schedule to a backbone, epoch by epoch.

    Args:
        backbone: the backbone whose groups are frozen and unfrozen.
        schedule: when each group starts training.

    Attributes:
        trainable_groups: backbone groups (from the top) that train in the current epoch; ``None``
            before training starts (nothing frozen yet).

    Example:
        >>> from transferkit.models.backbones import create_backbone
        >>> controller = FreezeController(create_backbone("test_efficientnet", pretrained=False),
        ...                               FreezeSchedule(frozen_epochs=1))
        >>> [controller.trainable_at(epoch) for epoch in range(3)] == [0, len(controller.groups), len(controller.groups)]
        True
    """

    def __init__(self, backbone: nn.Module, schedule: FreezeSchedule) -> None:
        self.backbone = backbone
        self.schedule = schedule
        self.trainable_groups: int | None = None
        self._groups: list[list[str]] | None = None
        self._trunks: dict[int, Trunk] = {}
        if schedule.active:
            self._check_schedule_fits()

    @property
    def groups(self) -> list[list[str]]:
        """Backbone parameter names in ordered groups, bottom (stem) to top; built once."""
        if self._groups is None:
            try:
                self._groups = backbone_groups(self.backbone)
            except BackboneError:
                if self.schedule.active:
                    raise
                # nothing to freeze: the whole backbone is one group
                self._groups = [[name for name, _ in self.backbone.model.named_parameters()]]
        return self._groups

    def _check_schedule_fits(self) -> None:
        groups = len(self.groups)  # a backbone that cannot be split fails here, before any training
        milestones = self.schedule.milestones or {}
        most = max(milestones.values()) if milestones else 0
        if most > groups:
            epoch = next(e for e, n in milestones.items() if n == most)
            raise ConfigError(
                f"freeze_schedule.milestones asks for {most} trainable backbone groups (at epoch {epoch}), "
                f"but '{self.backbone.name}' has {groups}; use at most {groups}, or -1 for all of "
                "them (python -m transferkit plan --config <recipe> shows the groups)."
            )

    def trainable_at(self, epoch: int) -> int:
        """Backbone groups, counted from the top, that train during ``epoch``."""
        if not self.schedule.active:
            return len(self.groups)
        return self.schedule.trainable_groups(epoch, len(self.groups))

    def start_epoch(self, epoch: int) -> int | None:
        """Freeze and unfreeze for ``epoch``; returns its trainable groups, or ``None`` when the schedule
        never freezes anything and leaves BatchNorm alone (nothing to do)."""
        if not self.schedule.active and self.schedule.bn_policy != "eval":
            return None
        self.trainable_groups = self.trainable_at(epoch)
        apply_freeze(self.backbone, self.groups, self.trainable_groups, self.schedule.bn_policy)
        return self.trainable_groups

    def keep_batchnorm_modes(self) -> None:
        """Put the BatchNorm layers of frozen groups back in eval mode after a ``train()`` call."""
        if self.trainable_groups is not None:
            set_batchnorm_modes(self.backbone, self.groups, self.trainable_groups, self.schedule.bn_policy)

    def trunk(self, frozen_groups: int) -> Trunk:
        """The bottom ``frozen_groups`` groups as a :class:`~transferkit.finetuning.trunk.Trunk`."""
        if frozen_groups not in self._trunks:
            self._trunks[frozen_groups] = Trunk(self.backbone, self.groups, frozen_groups)
        return self._trunks[frozen_groups]

    def frozen_stage(
        self, epoch: int, features: bool = True, trunk: bool = True
    ) -> tuple[StageKind, nn.Module] | None:
        """The part of the backbone whose output for an image stays the same throughout ``epoch``, of the
        kinds asked for: ``("features", backbone)`` while the whole backbone is frozen (pooled features
        ``(B, F)``), ``("trunk", Trunk)`` while only its top trains (feature maps ``(B, C, H, W)``);
        ``None`` when all of it trains, or when BatchNorm statistics keep moving (``bn_policy='train'``)."""
        if not self.schedule.active:
            return None
        trainable = self.trainable_at(epoch)
        if trainable == len(self.groups) or not (trunk if trainable else features):
            return None
        if self.schedule.bn_policy == "train":
            warn(
                "feature_cache and trunk_cache are ignored with bn_policy='train': BatchNorm statistics keep "
                "changing, so the frozen backbone's features are not fixed."
            )
            return None
        if trainable == 0:
            return "features", self.backbone
        return "trunk", self.trunk(len(self.groups) - trainable)

    def parameter_groups(
        self, head: list[nn.Parameter], lr: float, layer_decay: float, backbone_lr: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups, all built up front so that no scheduler sees one appear mid-run: the
        head's parameters at ``lr``, then each backbone group from the top down, the top one at
        ``backbone_lr`` (default ``lr * layer_decay``) and each one below ``layer_decay`` times less."""
        named = dict(self.backbone.model.named_parameters())
        lrs = group_learning_rates(lr, len(self.groups), layer_decay, backbone_lr)
        groups = [{"name": "head", "params": head, "lr": lr}]
        for index in reversed(range(len(self.groups))):
            params = [named[n] for n in self.groups[index]]
            groups.append({"name": f"backbone.{index}", "params": params, "lr": lrs[index]})
        return groups

    def unfreeze_steps(self, steps_per_epoch: int, max_epochs: int) -> list[int]:
        """Per optimizer group (head, then backbone top to bottom): the step at which it starts training."""
        steps = [0]
        for depth in range(1, len(self.groups) + 1):
            if not self.schedule.active:
                steps.append(0)
                continue
            epoch = self.schedule.unfreeze_epoch(depth, len(self.groups), max_epochs)
            steps.append(epoch * steps_per_epoch if epoch is not None else 10**9)
        return steps
