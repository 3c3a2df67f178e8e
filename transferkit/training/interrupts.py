"""Ctrl+C and SIGTERM during training: a checkpoint to resume from, and the command that does it."""

from __future__ import annotations

import os
import sys

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transferkit.lightning_internals import epoch_not_started, rewind_epoch_not_started

__all__ = ["InterruptCheckpoint"]


class InterruptCheckpoint(Callback):
    """On Ctrl+C (SIGINT) or SIGTERM during ``fit``, write ``interrupted.ckpt`` into the run's checkpoint
    directory (atomically, see :class:`AtomicCheckpointIO`) and say how to resume from it.

    Lightning stops at the next batch boundary after a SIGTERM and at once after a Ctrl+C; both reach
    this callback's ``on_exception``. The checkpoint holds the loop's progress, so ``fit(...,
    ckpt_path=<it>)`` continues from that step (a Ctrl+C while an epoch's start hooks run resumes at
    that epoch's first batch).

    Args:
        filename: the file name, in the checkpoint callback's ``dirpath`` (or
            ``<default_root_dir>/checkpoints`` without one).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[InterruptCheckpoint()], logger=False)  # transferkit's Trainer adds one
        >>> [type(c).__name__ for c in trainer.callbacks if isinstance(c, InterruptCheckpoint)]
        ['InterruptCheckpoint']
    """

    def __init__(self, filename: str = "interrupted.ckpt") -> None:
        self.filename = filename
        self.path: str | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != "fit":
            return
        if trainer.sanity_checking or trainer.global_step == 0 and trainer.current_epoch == 0:
            return  # nothing trained yet: nothing to resume
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(folder, self.filename)
        signal_name = "Ctrl+C (SIGINT)" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        if epoch_not_started(trainer):
            rewind_epoch_not_started(trainer)  # the run is over: its loop counts may be set back
        try:
            trainer.save_checkpoint(path)
        except Exception as err:  # the interruption is the news; a failed save must not hide it
            print(
                f"\n{signal_name}: training stopped; the interrupted state could not be saved: {err}",
                file=sys.stderr,
            )
            return
        self.path = path
        print(
            f"\n{signal_name}: training stopped at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"saved '{path}'.\nResume with: python -m transferkit fit --config <your recipe> --ckpt_path {path}"
            f"\n  (or trainer.fit(model, datamodule=dm, ckpt_path={path!r}))",
            file=sys.stderr,
        )
