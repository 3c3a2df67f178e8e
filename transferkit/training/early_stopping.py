"""Early stopping that judges each phase of a freeze schedule on its own."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

__all__ = ["DEFAULT_EARLY_STOPPING", "PhaseEarlyStopping"]

# every run's early stopping unless the run says otherwise (the CLI's `early_stopping.*` keys start here)
DEFAULT_EARLY_STOPPING: dict[str, Any] = {"monitor": "val_loss", "mode": "min", "patience": 5}


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
