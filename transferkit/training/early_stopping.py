"""Early stopping that judges each phase of a freeze schedule on its own, and the check that a monitored
metric is one the model's kind logs (shared with the checkpoint callback)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from transferkit.errors import ConfigError
from transferkit.models.tasks import MultiLabel, Regression, SingleLabel

__all__ = ["DEFAULT_EARLY_STOPPING", "PhaseEarlyStopping", "check_monitor", "monitored_metrics"]

# every run's early stopping unless the run says otherwise (the CLI's `early_stopping.*` keys start here)
DEFAULT_EARLY_STOPPING: dict[str, Any] = {"monitor": "val_loss", "mode": "min", "patience": 5}


def monitored_metrics(task: Any) -> dict[str, str]:
    """The per-epoch figures a model of ``task``'s kind logs that a monitor can watch, each with the ``mode``
    that means better (``min`` or ``max``): ``val_loss``, ``val_<metric>`` of the kind's metric names,
    ``train_loss`` and the kind's training score.

    Example:
        >>> monitored_metrics(Regression(["level"]))
        {'val_loss': 'min', 'val_mae': 'min', 'val_rmse': 'min', 'val_r2': 'max', 'train_loss': 'min', 'train_mae': 'min'}
    """
    modes = {"val_loss": "min"}
    modes |= {f"val_{name}": _mode(task, name) for name in task.metric_names}
    modes |= {"train_loss": "min", task.train_metric: _mode(task, task.train_metric.removeprefix("train_"))}
    return modes


def _mode(task: Any, name: str) -> str:
    # the training score of multi-label is an accuracy of label decisions (train_label_acc): higher is better
    return "max" if task.higher_is_better.get(name, True) else "min"


# every figure some kind logs: a monitor naming one that this model's kind does not log is a recipe written
# for another kind (val_acc on a regression model), never a metric another callback adds
_ANY_KIND = {
    name: kind.kind
    for kind in (SingleLabel, MultiLabel, Regression)
    for split in ("val", "train")
    for name in (f"{split}_{metric}" for metric in kind.metric_names)
} | {kind.train_metric: kind.kind for kind in (SingleLabel, MultiLabel, Regression)}


def check_monitor(monitor: str | None, mode: str, pl_module: Any, setting: str) -> None:
    """Refuse, when a fit starts, a ``monitor`` that the model's kind of target does not log, and a ``mode``
    that contradicts the monitored figure (``val_mae`` with ``max``): either would never stop the run, or
    keep the worst checkpoint, silently. ``setting`` names the recipe's section in the message
    (``early_stopping``, ``checkpoint``). A module without a task (not a
    :class:`~transferkit.TransferClassifier`) is left to Lightning's own checks.

    Raises:
        ConfigError: naming the kind, the figures it logs with their modes, and the fix.
    """
    task = getattr(pl_module, "task", None)
    if monitor is None or task is None or not hasattr(task, "metric_names"):
        return
    logged = monitored_metrics(task)
    listed = ", ".join(f"{name} ({how})" for name, how in logged.items())
    if monitor not in logged and monitor in _ANY_KIND:
        raise ConfigError(
            f"{setting}.monitor: {monitor} is a {_ANY_KIND[monitor]} figure, but this is a {task.kind} model, "
            f"which logs {listed}; set {setting}.monitor to one of them (with its mode), e.g. "
            f"{setting}.monitor: val_loss, {setting}.mode: min."
        )
    if monitor in logged and mode != logged[monitor]:
        better = "lower" if logged[monitor] == "min" else "higher"
        raise ConfigError(
            f"{setting}.mode: {mode} contradicts {setting}.monitor: {monitor}, which is better when {better}: "
            f"set {setting}.mode: {logged[monitor]} (a {task.kind} model logs {listed})."
        )


class PhaseEarlyStopping(EarlyStopping):
    """:class:`~lightning.pytorch.callbacks.EarlyStopping` that judges each phase of a freeze schedule on
    its own: when more backbone groups start training, the patience count and the best score start
    afresh.

    Right after an unfreeze the validation loss usually jumps (the newly trained groups leave the
    ImageNet optimum) and takes several epochs to come back under the head-only phase's best, so a
    patience counted across phases can stop a run before the unfrozen model had a chance. The best
    checkpoint is still chosen over the whole run by the checkpoint callback. The current phase (the
    model's ``trainable_groups``) is saved with the callback's state, so a resumed run stops where an
    uninterrupted one would.

    When a fit starts, a ``monitor`` that the model's kind of target does not log (``val_acc`` on a
    regression model) or a ``mode`` that contradicts it is refused (:func:`check_monitor`).

    Args: those of ``EarlyStopping``.

    Example:
        >>> stopper = PhaseEarlyStopping(monitor="val_loss", patience=3)
        >>> stopper.load_state_dict({**stopper.state_dict(), "phase": 2}); stopper.phase
        2
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase: int | None = None  # the trainable groups of the epoch last checked

    def _follow_phase(self, trainer: L.Trainer) -> None:
        phase = getattr(trainer.lightning_module, "trainable_groups", None)
        if self.phase is not None and phase != self.phase:
            self.wait_count = 0
            self.best_score = torch.tensor(torch.inf if self.monitor_op == torch.lt else -torch.inf)
        self.phase = phase

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            check_monitor(self.monitor, self.mode, pl_module, "early_stopping")

    # the check runs in one of these two hooks (Lightning picks which); the phase is followed in both
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._follow_phase(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._follow_phase(trainer)
        super().on_validation_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "phase": self.phase}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.phase = state_dict.get("phase")
