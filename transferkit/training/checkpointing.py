"""Checkpoints that survive a crash mid-write, and a ``last.ckpt`` that is rewritten after every epoch."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transferkit.files import atomic_write
from transferkit.lightning_internals import last_saved_step, save_last_checkpoint, saves_on_train_epoch_end
from transferkit.training.early_stopping import check_monitor

__all__ = ["DEFAULT_CHECKPOINT", "AtomicCheckpointIO", "RunCheckpoint"]

# what every run's checkpoint callback is, unless the run says otherwise: the best epoch by validation
# loss, and last.ckpt after every epoch (the CLI's `checkpoint.*` keys start from the same values)
DEFAULT_CHECKPOINT: dict[str, Any] = {
    "monitor": "val_loss",
    "mode": "min",
    "save_last": True,
    "filename": "best-{epoch:02d}-{val_loss:.4f}",
}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, flushed to disk, then moved over it
    with ``os.replace`` (:func:`transferkit.files.atomic_write`): a crash, a kill or a full disk while
    writing leaves the previous checkpoint intact (and no half-written file). Remote paths (``s3://``
    ...) go through Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised first: a failing torch.save never touches the disk
        atomic_write(
            Path(path),
            buffer.getbuffer(),
            what="checkpoint",
            advice="Free disk space or set another checkpoint directory.",
        )


class RunCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that rewrites ``last.ckpt`` after every
    epoch (with ``save_last=True``), not only in epochs that also save a new best, so a killed run
    resumes from its latest epoch with ``ckpt_path=last``. When a fit starts, a ``monitor`` that the model's
    kind of target does not log, or a ``mode`` that contradicts it, is refused
    (:func:`~transferkit.training.early_stopping.check_monitor`).

    Args: those of ``ModelCheckpoint``.

    Example:
        >>> from transferkit import Trainer
        >>> trainer = Trainer(callbacks=[RunCheckpoint(monitor="val_loss", save_last=True)], logger=False)
        >>> trainer.checkpoint_callback.save_last
        True
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            check_monitor(self.monitor, self.mode, pl_module, "checkpoint")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if saves_on_train_epoch_end(self, trainer):
            self._write_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not saves_on_train_epoch_end(self, trainer):
            self._write_last(trainer)

    def _write_last(self, trainer: L.Trainer) -> None:
        skip = trainer.fast_dev_run or trainer.sanity_checking
        # Lightning wrote last.ckpt itself if this step saved a checkpoint
        if self.save_last and not skip and last_saved_step(self) != trainer.global_step:
            save_last_checkpoint(self, trainer)
