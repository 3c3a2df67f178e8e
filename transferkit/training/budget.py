"""A wall-clock deadline for training: the phase and the time left each epoch, and a stop that leaves time to test."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["TimeBudget"]


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class TimeBudget(Callback):
    """Say at each epoch's start which phase runs and how much of a budget is left, and stop training when
    the time that is left is what testing and the report need.

    It only stops a run that overruns its plan: a run that keeps to it trains exactly as without this
    callback (it reads the clock, changes nothing). A stop comes at a batch boundary; the best checkpoint
    validated so far is the one tested.

    Args:
        deadline: ``time.time()`` at which the results must be printed.
        reserve_s: seconds kept back for what follows training (the test split, the report).
        stream: where the progress lines go (standard error by default).

    Example:
        >>> import time
        >>> budget = TimeBudget(deadline=time.time() + 600, reserve_s=30)
        >>> round(budget.left() / 60)
        10
        >>> budget.state_dict()
        {'stopped_at_epoch': None}
    """

    def __init__(self, deadline: float, reserve_s: float = 0.0, stream: Any = None) -> None:
        self.deadline = float(deadline)
        self.reserve_s = float(reserve_s)
        self.stream = stream
        self.stopped_at_epoch: int | None = None

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.time()

    def _say(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        freezing = getattr(pl_module, "freezing", None)
        phase = "training"
        if freezing is not None:
            trainable = freezing.trainable_at(trainer.current_epoch)
            total = len(freezing.groups)
            phase = (
                "head only"
                if trainable == 0
                else (
                    "the whole backbone" if trainable >= total else f"the top {trainable} of {total} groups"
                )
            )
        self._say(
            f"auto: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, {phase}; "
            f"{_clock(self.left())} of the budget left"
        )

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.stopped_at_epoch is None and self.left() < self.reserve_s:
            self.stopped_at_epoch = trainer.current_epoch
            trainer.should_stop = True
            self._say(
                f"auto: stopping training in epoch {trainer.current_epoch + 1}: {_clock(self.left())} left, "
                f"{_clock(self.reserve_s)} kept for the test split and the report"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"stopped_at_epoch": self.stopped_at_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback states from every checkpoint it loads, also for ``test(ckpt_path=best)``
        # after this fit: a best checkpoint saved before the stop must not erase the stop this run made
        if self.stopped_at_epoch is None:
            self.stopped_at_epoch = state_dict.get("stopped_at_epoch")
