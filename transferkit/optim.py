"""Optimizer and learning-rate schedule factories.

Adam is the default optimizer and exponential decay the default schedule:
``lr(t) = lr0 * decay_rate ** (t / decay_steps)``, stepped after every optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = ["OPTIMIZERS", "SCHEDULES", "create_optimizer", "create_scheduler"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam")
SCHEDULES = ("exponential", "none")


def create_optimizer(
    name: str,
    param_groups: Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """An optimizer by name over ``param_groups`` (each group may carry its own ``lr``).

    ``momentum`` is SGD with momentum, ``nesterov`` SGD with Nesterov momentum (both use ``momentum``);
    RMSProp decays its squared-gradient average with ``alpha=0.9``, as Hinton proposed.
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
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=eps, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "nadam":
        return torch.optim.NAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}.")


class _ExponentialDecay:
    """``decay_rate ** (step / decay_steps)``: a picklable callable, so the scheduler state saves cleanly."""

    def __init__(self, decay_rate: float, decay_steps: float) -> None:
        self.decay_rate = decay_rate
        self.decay_steps = decay_steps

    def __call__(self, step: int) -> float:
        return self.decay_rate ** (step / self.decay_steps)


def create_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    decay_rate: float = 0.1,
    decay_steps: int | None = None,
) -> dict[str, Any] | None:
    """A Lightning ``lr_scheduler`` config for ``optimizer``, or ``None`` for a constant LR.

    Args:
        name: ``exponential`` (default) or ``none``.
        total_steps: optimizer steps in the whole run (``trainer.estimated_stepping_batches``).
        decay_rate: factor the LR is multiplied by every ``decay_steps`` steps.
        decay_steps: steps per ``decay_rate`` factor; ``None`` = the whole run, so the LR ends at
            ``lr0 * decay_rate``.
    """
    if name == "none":
        return None
    if name == "exponential":
        if not 0 < decay_rate <= 1:
            raise ValueError(f"decay_rate must be in (0, 1], got {decay_rate}.")
        steps = decay_steps or max(int(total_steps), 1)
        scheduler: LRScheduler = LambdaLR(optimizer, _ExponentialDecay(decay_rate, steps))
        return {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}
    raise ValueError(f"unknown lr_schedule '{name}'; choose one of {', '.join(SCHEDULES)}.")
