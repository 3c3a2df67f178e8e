"""``tk.diagnose``: train a copy of a model for a few batches and report its gradient health."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from transferkit.diagnostics.health import GradientHealth
from transferkit.diagnostics.verdicts import GradientHealthReport
from transferkit.errors import NonFiniteLossError
from transferkit.training.trainer import Trainer

__all__ = ["diagnose"]


class _StopWhenRecorded(Callback):
    def __init__(self, health: GradientHealth) -> None:
        self.health = health

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.health.report is not None and not self.health.recording:
            trainer.should_stop = True


def diagnose(
    model: L.LightningModule,
    train_dataloaders: Any = None,
    datamodule: L.LightningDataModule | None = None,
    batches: int = 5,
    **trainer_kwargs: Any,
) -> GradientHealthReport:
    """Train a copy of ``model`` for ``batches`` batches with :class:`GradientHealth` and return its report.

    A real :class:`transferkit.Trainer` runs the module's own ``training_step`` and optimizers, so
    what is measured is what training does. The model passed in is not changed (a deep copy trains).
    A non-finite loss ends the recording early; the report then says so and its verdict is
    ``exploding``.

    Args:
        model: any LightningModule (e.g. a :class:`transferkit.TransferClassifier`).
        train_dataloaders: the training batches (or pass ``datamodule``).
        datamodule: a data module with a ``train_dataloader``; its frozen-feature cache is switched
            off for the run (features are not worth caching for a few batches).
        batches: training batches to record.
        **trainer_kwargs: passed to the Trainer; e.g. ``max_epochs`` of the real run, so the learning-rate
            schedule is the one training will use (default 1000: the start of a long run), ``accelerator``,
            ``precision``, ``gradient_clip_val``. Validation, checkpoints and logging are off.

    Returns:
        The :class:`GradientHealthReport`.
    """
    health = GradientHealth(batches=batches)
    callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    settings: dict[str, Any] = {
        "max_epochs": 1000,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **trainer_kwargs,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "callbacks": [*callbacks, health, _StopWhenRecorded(health)],
    }
    trainer = Trainer(**settings)
    copied = copy.deepcopy(model)  # the Trainer's FreezeAndCache has its caches off: every layer runs
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*val_dataloader.*")
            trainer.fit(copied, train_dataloaders=train_dataloaders, datamodule=datamodule)
    except NonFiniteLossError:
        pass  # GradientHealth.on_exception recorded what was measured, with the error
    if health.report is None:
        raise RuntimeError(
            "no training batch was recorded: the training data is empty, or every layer was skipped; "
            "check the train dataloader (and limit_train_batches / max_steps)."
        )
    return health.report
