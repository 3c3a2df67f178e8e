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
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from transferkit.errors import ConfigError
from transferkit.settings import SettingsGroup

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "LRMultiplier",
    "LRScheduleSettings",
    "OptimizerSettings",
    "create_optimization",
    "create_optimizer",
    "create_scheduler",
    "run_length",
]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam")
SCHEDULES = ("exponential", "piecewise", "performance", "onecycle", "cosine", "none")


@dataclass(frozen=True)
class OptimizerSettings(SettingsGroup):
    """The optimizer and its learning rates (``model.optimizer`` in a recipe).

    Args:
        name: ``adam`` (default), ``adamw``, ``nadam``, ``sgd``, ``momentum``, ``nesterov``, ``adagrad``,
            ``rmsprop``.
        lr: learning rate of the head; backbone groups get ``lr * layer_decay ** depth`` unless
            ``backbone_lr`` is set. ``auto``: found by a range test when training starts
            (:func:`transferkit.training.lr_finder.lr_find`, run by :meth:`transferkit.Trainer.fit`): the
            head's in the frozen phase and, for a recipe that unfreezes, ``backbone_lr`` at the first
            unfreeze; the values chosen are logged and stored in the checkpoint.
        backbone_lr: learning rate of the top backbone group, the groups below it ``layer_decay`` times
            less each; ``None`` = ``lr * layer_decay``. Well under ``lr``, it keeps more pretrained features.
        layer_decay: factor between the learning rates of two neighbouring backbone groups (deeper = smaller).
        weight_decay: L2 weight decay in the optimizer, on every trained parameter (decoupled for ``adamw``).
        momentum: momentum of ``momentum``/``nesterov``.
        betas: Adam/AdamW/NAdam's decay rates of the gradient's mean and of its square (beta1, beta2).
        eps: the term added to the denominator of the adaptive optimizers (AdaGrad, RMSProp, Adam...).
        rho: RMSProp's decay rate of the squared-gradient average.

    Example:
        >>> OptimizerSettings(name="adamw", lr=3e-4, weight_decay=0.05).backbone_lr_top
        0.00024
        >>> OptimizerSettings(name="adamm")
        Traceback (most recent call last):
        ...
        transferkit.errors.ConfigError: model.optimizer.name must be one of sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw, nadam, got 'adamm'.
    """

    where = "model.optimizer"

    name: str = "adam"
    lr: float | Literal["auto"] = 1e-3
    backbone_lr: float | None = None
    layer_decay: float = 0.8
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    rho: float = 0.9

    def __post_init__(self) -> None:
        self.require(self.name in OPTIMIZERS, "name", f"one of {', '.join(OPTIMIZERS)}")
        self.require(
            self.lr == "auto" or (_number(self.lr) and self.lr > 0),
            "lr",
            "a number > 0 or 'auto' (found by a range test when training starts)",
        )
        self.require(
            self.backbone_lr is None or (_number(self.backbone_lr) and self.backbone_lr > 0),
            "backbone_lr",
            "a number > 0, or null for lr * layer_decay",
        )
        self.require(_number(self.layer_decay) and 0 < self.layer_decay <= 1, "layer_decay", "in (0, 1]")
        self.require(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", ">= 0")
        self.require(_number(self.momentum) and self.momentum >= 0, "momentum", ">= 0")
        self.require(_number(self.eps) and self.eps >= 0, "eps", ">= 0")
        self.require(_number(self.rho) and 0 <= self.rho <= 1, "rho", "in [0, 1]")
        betas = tuple(self.betas)
        self.require(
            len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas),
            "betas",
            "two decay rates in [0, 1), e.g. [0.9, 0.999]",
        )
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))

    @property
    def backbone_lr_top(self) -> float:
        """The top backbone group's learning rate: ``backbone_lr``, else ``lr * layer_decay``."""
        if self.lr == "auto":
            raise ConfigError("model.optimizer.lr is 'auto' and no range test has set it yet.")
        return (
            float(self.backbone_lr) if self.backbone_lr is not None else round(self.lr * self.layer_decay, 12)
        )


@dataclass(frozen=True)
class LRScheduleSettings(SettingsGroup):
    """How the learning rate changes over the run (``model.lr_schedule`` in a recipe).

    Args:
        name: ``exponential`` (default), ``piecewise``, ``performance`` (reduce on plateau of
            ``val_loss``), ``onecycle``, ``cosine`` or ``none``.
        decay_rate: exponential decay: ``lr(t) = lr0 * decay_rate ** (t / decay_steps)``; also the factor
            of each ``piecewise`` milestone and of each ``performance`` reduction.
        decay_steps: optimizer steps per ``decay_rate`` factor; ``None`` = the whole run.
        milestones: ``piecewise``: epochs at which the LR is multiplied by ``decay_rate``.
        plateau_patience: ``performance``: epochs without improvement before the LR drops.

    Example:
        >>> LRScheduleSettings(name="piecewise", milestones=[5, 8]).to_dict()
        {'name': 'piecewise', 'decay_rate': 0.1, 'decay_steps': None, 'milestones': [5, 8], 'plateau_patience': 2}
    """

    where = "model.lr_schedule"

    name: str = "exponential"
    decay_rate: float = 0.1
    decay_steps: int | None = None
    milestones: list[int] | None = None
    plateau_patience: int = 2

    def __post_init__(self) -> None:
        self.require(self.name in SCHEDULES, "name", f"one of {', '.join(SCHEDULES)}")
        self.require(_number(self.decay_rate) and 0 < self.decay_rate <= 1, "decay_rate", "in (0, 1]")
        self.require(
            self.decay_steps is None or (isinstance(self.decay_steps, int) and self.decay_steps >= 1),
            "decay_steps",
            "an integer >= 1, or null for the whole run",
        )
        self.require(
            self.milestones is None or all(isinstance(m, int) and m >= 0 for m in self.milestones),
            "milestones",
            "a list of epochs (integers >= 0)",
        )
        if self.milestones is not None:
            object.__setattr__(self, "milestones", sorted(self.milestones))
        self.require(
            self.name != "piecewise" or bool(self.milestones),
            "milestones",
            "the epochs at which the LR drops, for name: piecewise (e.g. [5, 8])",
        )
        self.require(
            isinstance(self.plateau_patience, int) and self.plateau_patience >= 0, "plateau_patience", ">= 0"
        )


def _number(value: Any) -> bool:
    """A real number (NumPy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
        raise ConfigError("lr_schedule 'piecewise' needs milestones: the epochs at which the LR drops.")
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
    optimizer: OptimizerSettings,
    schedule: LRScheduleSettings,
    param_groups: Iterable[dict[str, Any]],
    total_steps: int,
    steps_per_epoch: int,
    unfreeze_steps: Sequence[int] | None = None,
    warmup_steps: int = 0,
) -> dict[str, Any]:
    """``{"optimizer": ..., "lr_scheduler": ...}`` (what ``configure_optimizers`` returns) from a model's
    optimizer and learning-rate schedule settings."""
    if optimizer.lr == "auto":
        raise ConfigError(
            "model.optimizer.lr is 'auto' and no range test has set it: transferkit.Trainer.fit runs one; "
            "with another Trainer, call transferkit.lr_find(model, datamodule) first."
        )
    created = create_optimizer(
        optimizer.name,
        param_groups,
        lr=optimizer.lr,
        weight_decay=optimizer.weight_decay,
        momentum=optimizer.momentum,
        betas=optimizer.betas,
        eps=optimizer.eps,
        rho=optimizer.rho,
    )
    scheduler = create_scheduler(
        schedule.name,
        created,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        decay_rate=schedule.decay_rate,
        decay_steps=schedule.decay_steps,
        milestones=schedule.milestones or (),
        plateau_patience=schedule.plateau_patience,
        unfreeze_steps=unfreeze_steps,
        warmup_steps=warmup_steps,
    )
    return {"optimizer": created, "lr_scheduler": scheduler}


def run_length(trainer: Any) -> tuple[int, int, int]:
    """``(total_steps, steps_per_epoch, max_epochs)`` of the run a Lightning ``trainer`` is about to make
    (``(1, 1, 1)`` without one; a run without ``max_epochs`` counts as 10 000 epochs)."""
    if trainer is None:
        return 1, 1, 1
    total_steps = int(trainer.estimated_stepping_batches)
    max_epochs = trainer.max_epochs or 0
    steps_per_epoch = max(total_steps // max_epochs, 1) if max_epochs > 0 else total_steps
    return total_steps, steps_per_epoch, max_epochs if max_epochs > 0 else 10_000
