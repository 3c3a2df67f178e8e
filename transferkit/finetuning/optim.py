"""Optimizer and learning-rate schedule factories.

Adam is the default optimizer and exponential decay the default schedule:
``lr(t) = lr0 * decay_rate ** (t / decay_steps)``, stepped after every optimizer step.

Every schedule except ``performance`` is a per-step multiplier of each parameter group's own base LR,
so discriminative learning rates keep their ratios, and a group unfrozen mid-run can ramp its LR up
from zero (warm-up) without disturbing the others. All multipliers are pure functions of the step, so
a resumed run follows exactly the LRs of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from transferkit.errors import ConfigError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "LRMultiplier",
    "check_optimization",
    "create_optimization",
    "create_optimizer",
    "create_scheduler",
]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam")
SCHEDULES = ("exponential", "piecewise", "performance", "onecycle", "cosine", "none")


def check_optimization(
    optimizer: str,
    lr: float,
    lr_schedule: str,
    backbone_lr: float | None = None,
    weight_decay: float = 0.0,
    layer_decay: float = 1.0,
    decay_rate: float = 0.1,
) -> None:
    """Refuse, before any training, settings :func:`create_optimizer` and :func:`create_scheduler` cannot
    use, with the value seen and the range or the choices."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{optimizer}'; choose one of {', '.join(OPTIMIZERS)}.")
    if lr_schedule not in SCHEDULES:
        raise ConfigError(f"unknown lr_schedule '{lr_schedule}'; choose one of {', '.join(SCHEDULES)}.")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}.")
    if backbone_lr is not None and not backbone_lr > 0:
        raise ConfigError(f"backbone_lr must be > 0 (or null for lr * layer_decay), got {backbone_lr}.")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}.")
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    if not 0 < decay_rate <= 1:
        raise ConfigError(f"decay_rate must be in (0, 1], got {decay_rate}.")


def create_optimizer(
    name: str,
    param_groups: Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    rho: float = 0.9,
) -> torch.optim.Optimizer:
    """An optimizer by name over ``param_groups`` (each group may carry its own ``lr``).

    ``momentum`` is SGD with momentum, ``nesterov`` SGD with Nesterov momentum (both use ``momentum``);
    RMSProp decays its squared-gradient average by ``rho`` (0.9, as Hinton proposed; torch's ``alpha``);
    Adam, AdamW and NAdam use ``betas`` (momentum and squared-gradient decay) and ``eps``.
    """
    groups = list(param_groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "nesterov":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, weight_decay=weight_decay, eps=eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=rho, eps=eps, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "nadam":
        return torch.optim.NAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}.")


class LRMultiplier:
    """The factor a group's base LR is multiplied by at optimizer step ``t``: ``schedule(t) * warmup(t)``.

    A picklable object of plain fields, so the scheduler's state saves in a ``weights_only`` checkpoint.

    Args:
        schedule: ``exponential``, ``piecewise``, ``onecycle``, ``cosine`` or ``none``.
        total_steps: optimizer steps in the whole run.
        decay_rate: ``exponential``: factor per ``decay_steps``; ``piecewise``: factor at each milestone.
        decay_steps: ``exponential`` only (default: ``total_steps``).
        milestone_steps: ``piecewise`` only: steps at which the LR is multiplied by ``decay_rate``.
        unfreeze_step: the step this group starts training (0 for groups trainable from the start).
        warmup_steps: after ``unfreeze_step``, the LR ramps linearly from 0 over this many steps.
    """

    def __init__(
        self,
        schedule: str,
        total_steps: int,
        decay_rate: float = 0.1,
        decay_steps: int | None = None,
        milestone_steps: Sequence[int] = (),
        unfreeze_step: int = 0,
        warmup_steps: int = 0,
    ) -> None:
        self.schedule = schedule
        self.total_steps = max(int(total_steps), 1)
        self.decay_rate = float(decay_rate)
        self.decay_steps = int(decay_steps or self.total_steps)
        self.milestone_steps = [int(s) for s in milestone_steps]
        self.unfreeze_step = int(unfreeze_step)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        return self.base(step) * self.warmup(step)

    def warmup(self, step: int) -> float:
        if self.warmup_steps <= 0 or self.unfreeze_step == 0:
            return 1.0
        return min(1.0, max(0.0, (step - self.unfreeze_step + 1) / self.warmup_steps))

    def base(self, step: int) -> float:
        t = min(step, self.total_steps)
        if self.schedule == "exponential":
            return self.decay_rate ** (step / self.decay_steps)
        if self.schedule == "piecewise":
            return self.decay_rate ** sum(step >= m for m in self.milestone_steps)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t / self.total_steps))
        if self.schedule == "onecycle":
            # Smith's 1cycle as Geron describes it: up from lr/10 to lr over the first 45 %, back down
            # to lr/10 by 90 %, then down to lr/1000 over the last 10 %
            up, down = 0.45 * self.total_steps, 0.9 * self.total_steps
            if t <= up:
                return 0.1 + 0.9 * t / up
            if t <= down:
                return 1.0 - 0.9 * (t - up) / (down - up)
            return 0.1 - 0.099 * (t - down) / (self.total_steps - down)
        return 1.0


def create_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int = 1,
    decay_rate: float = 0.1,
    decay_steps: int | None = None,
    milestones: Sequence[int] = (),
    plateau_patience: int = 2,
    monitor: str = "val_loss",
    unfreeze_steps: Sequence[int] | None = None,
    warmup_steps: int = 0,
) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config for ``optimizer``.

    Args:
        name: one of :data:`SCHEDULES`:
            ``exponential`` (default): ``lr0 * decay_rate ** (t / decay_steps)`` per step;
            ``piecewise``: constant, multiplied by ``decay_rate`` at each epoch in ``milestones``;
            ``performance``: multiplied by ``decay_rate`` when ``monitor`` stops improving for
            ``plateau_patience`` epochs (ReduceLROnPlateau);
            ``onecycle``: Smith's 1cycle over the run;
            ``cosine``: cosine annealing to 0 over the run;
            ``none``: constant.
        total_steps: optimizer steps in the whole run (``trainer.estimated_stepping_batches``).
        steps_per_epoch: optimizer steps per epoch (converts epoch milestones to steps).
        decay_steps: ``exponential``: steps per ``decay_rate`` factor; ``None`` = the whole run, so the LR
            ends at ``lr0 * decay_rate``.
        unfreeze_steps: per parameter group, the step at which it starts training (for warm-up).
        warmup_steps: a group unfrozen mid-run ramps its LR from 0 over this many steps.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"unknown lr_schedule '{name}'; choose one of {', '.join(SCHEDULES)}.")
    if not 0 < decay_rate <= 1:
        raise ConfigError(f"decay_rate must be in (0, 1], got {decay_rate}.")
    if name == "performance":
        if warmup_steps:
            raise ConfigError(
                "warm-up of unfrozen groups needs a step-wise schedule; lr_schedule 'performance' has none."
            )
        scheduler = ReduceLROnPlateau(optimizer, mode="min", factor=decay_rate, patience=plateau_patience)
        return {"scheduler": scheduler, "interval": "epoch", "frequency": 1, "monitor": monitor, "name": "lr"}
    if name == "piecewise" and not milestones:
        raise ConfigError("lr_schedule 'piecewise' needs lr_milestones: the epochs at which the LR drops.")
    unfreeze = list(unfreeze_steps) if unfreeze_steps is not None else [0] * len(optimizer.param_groups)
    multipliers = [
        LRMultiplier(
            name,
            total_steps,
            decay_rate=decay_rate,
            decay_steps=decay_steps,
            milestone_steps=[m * steps_per_epoch for m in milestones],
            unfreeze_step=step,
            warmup_steps=warmup_steps,
        )
        for step in unfreeze
    ]
    scheduler = LambdaLR(optimizer, multipliers)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}


def create_optimization(
    recipe: Mapping[str, Any],
    param_groups: Iterable[dict[str, Any]],
    total_steps: int,
    steps_per_epoch: int,
    unfreeze_steps: Sequence[int] | None = None,
    warmup_steps: int = 0,
) -> dict[str, Any]:
    """``{"optimizer": ..., "lr_scheduler": ...}`` (what ``configure_optimizers`` returns) from a model's
    optimisation recipe: the keys ``optimizer``, ``lr``, ``weight_decay``, ``momentum``, ``betas``, ``eps``,
    ``rho``, ``lr_schedule``, ``decay_rate``, ``decay_steps``, ``lr_milestones`` and ``plateau_patience`` of
    :class:`~transferkit.TransferClassifier`'s hyperparameters."""
    optimizer = create_optimizer(
        recipe["optimizer"],
        param_groups,
        lr=recipe["lr"],
        weight_decay=recipe["weight_decay"],
        momentum=recipe["momentum"],
        betas=tuple(recipe["betas"]),
        eps=recipe["eps"],
        rho=recipe["rho"],
    )
    scheduler = create_scheduler(
        recipe["lr_schedule"],
        optimizer,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        decay_rate=recipe["decay_rate"],
        decay_steps=recipe["decay_steps"],
        milestones=recipe["lr_milestones"] or (),
        plateau_patience=recipe["plateau_patience"],
        unfreeze_steps=unfreeze_steps,
        warmup_steps=warmup_steps,
    )
    return {"optimizer": optimizer, "lr_scheduler": scheduler}
