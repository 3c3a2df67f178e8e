"""When each backbone group trains: the freeze schedule, a pure function of the epoch.

Which groups are frozen depends only on ``(epoch, schedule)``, so a resumed run is in exactly the state an
uninterrupted one would be.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from transferkit.errors import ConfigError

__all__ = ["BNPolicy", "FreezeSchedule", "value_at"]

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
            usual advice for fine-tuning EfficientNets on small batches, whose batch statistics are noisy
            (docs/elpv.md compares the two).
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
            raise ConfigError(f"frozen_epochs must be >= 0, got {self.frozen_epochs}.")
        if self.unfreeze_every is not None and self.unfreeze_every < 1:
            raise ConfigError(f"unfreeze_every must be >= 1 epoch, got {self.unfreeze_every}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.bn_policy not in ("frozen", "train", "eval"):
            raise ConfigError(f"bn_policy must be 'frozen', 'train' or 'eval', got {self.bn_policy!r}.")
        if self.milestones is not None:
            self.milestones = {int(k): int(v) for k, v in self.milestones.items()}
            bad = {k: v for k, v in self.milestones.items() if k < 0 or v < -1}
            if bad:
                raise ConfigError(
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
        raise ConfigError(f"freeze_schedule must be a FreezeSchedule or a dict, got {type(value).__name__}.")
