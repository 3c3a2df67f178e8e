"""Exact resumption: a run resumed from a checkpoint ends with the weights an uninterrupted one would.

Lightning restores the weights, the optimizer, the schedulers and the loop's counters. Three things it
does not restore, :class:`ExactResume` does (the transferkit Trainer adds one to every run):

- the CPU random state (dropout masks), saved with every checkpoint and set again where the run left it;
- the order and augmentations of the resumed epoch's batches: the loaders' samplers are moved to that
  epoch, and for a checkpoint written mid-epoch to the batch after the last one trained
  (:func:`align_train_loader`);
- the step of a plateau scheduler (``lr_schedule: performance``) at the end of the epoch the run resumed
  in, which Lightning skips for want of the validation metric; the checkpoint holds that metric.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from transferkit.data.samplers import epoch_sampler
from transferkit.lightning_internals import (
    batches_done_in_epoch,
    epoch_about_to_run,
    epoch_batches_all_ran,
    restart_train_iteration,
    restarted_mid_epoch,
    restarting,
    train_loaders,
)

__all__ = ["ExactResume", "align_train_loader", "catch_up_plateau_schedulers"]

# the checkpoint keys (top level, as older checkpoints have them)
RNG_STATE = "transferkit_rng_state"
EPOCH_METRICS = "transferkit_epoch_metrics"


def align_train_loader(trainer: L.Trainer) -> bool:
    """Restart the training loader's iteration if it drew another epoch's order than the one the run
    is at; returns whether it did.

    Lightning iterates the train loader once when it first sets it up (reached from
    ``estimated_stepping_batches`` in ``configure_optimizers``), which is before a resumed run's loop
    state is restored and before ``set_epoch``, and it does not iterate again for the first resumed
    epoch. A loader with workers draws its first indices right at that iteration, so without this the
    first epoch after a resume would replay epoch 0's order and augmentations.

    A run resumed in the middle of an epoch (a checkpoint written on SIGTERM, or by a callback after a
    batch) goes on with that epoch's next batch: the epoch's order starts after the images of the
    batches the loop counts as trained (in every process, under DDP:
    :class:`~transferkit.data.samplers.TrainLoader` has DDP deal the order out as it is). A Ctrl+C can
    land inside a training step, whose batch is then trained again. Not covered: a SIGTERM inside a
    window of ``accumulate_grad_batches`` (the window's gradients so far are not in the checkpoint).
    """
    loaders = train_loaders(trainer)
    if loaders is None:
        return False
    epoch = epoch_about_to_run(trainer)
    done = 0  # batches of that epoch trained before the run stopped
    if restarted_mid_epoch(trainer):
        done = batches_done_in_epoch(trainer)
        if done >= trainer.num_training_batches:
            done = 0
    realign = False
    for dataloader in loaders:
        outer = getattr(dataloader, "sampler", None)
        sampler = epoch_sampler(outer)
        if sampler is None:
            continue
        # DDP's sampler deals the order out in turn: each process's next batch starts num_replicas
        # batches further on per batch trained
        start = done * (dataloader.batch_size or 0) * getattr(outer, "num_replicas", 1)
        if start or sampler.drawn_epoch not in (None, epoch):
            for s in {id(outer): outer, id(sampler): sampler}.values():
                if hasattr(s, "set_epoch"):
                    s.set_epoch(epoch)
            sampler.start = start
            realign = True
    if realign:
        restart_train_iteration(trainer)
    return realign


def catch_up_plateau_schedulers(trainer: L.Trainer, epochs_ended: int, saved: dict[str, float]) -> None:
    """Step each plateau scheduler (``lr_schedule: performance``) that has seen fewer epoch ends than
    ``epochs_ended``, as an uninterrupted run would have, on the metric it watches: this process's
    validation, or the value the resumed checkpoint holds (``saved``)."""
    metrics = {**saved, **_scalars(trainer.callback_metrics)}
    for config in trainer.lr_scheduler_configs:
        if not config.reduce_on_plateau or config.interval != "epoch" or config.frequency != 1:
            continue
        if config.scheduler.last_epoch < epochs_ended and config.monitor in metrics:
            config.scheduler.step(metrics[config.monitor])


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-number entries of a metrics dict, as floats."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) or (torch.is_tensor(value) and value.numel() == 1)
    }


class ExactResume(Callback):
    """Make a resumed ``fit`` continue exactly where the checkpoint left it (see the module's doc).

    It keeps no state of its own between runs: what it needs is written into every checkpoint (the CPU
    RNG state and the epoch-end metrics) and read back when a fit resumes from one.

    Example:
        >>> from transferkit import Trainer
        >>> trainer = Trainer(logger=False)  # adds one
        >>> sum(isinstance(c, ExactResume) for c in trainer.callbacks)
        1
    """

    def __init__(self) -> None:
        self._rng_state: torch.Tensor | None = None  # to set when the resumed run's first epoch starts
        self._saved_metrics: dict[str, float] = {}  # the resumed checkpoint's epoch-end metrics

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RNG_STATE] = torch.get_rng_state()
        checkpoint[EPOCH_METRICS] = _scalars(trainer.callback_metrics)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":
            return
        self._rng_state = checkpoint.get(RNG_STATE)
        self._saved_metrics = dict(checkpoint.get(EPOCH_METRICS) or {})

    def _restore_rng(self) -> None:
        if self._rng_state is not None:
            torch.set_rng_state(self._rng_state)  # resume with the RNG where the run left it
            self._rng_state = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if restarted_mid_epoch(trainer):
            self._restore_rng()  # Lightning calls no on_train_epoch_start for an epoch resumed mid-way
        catch_up_plateau_schedulers(trainer, trainer.current_epoch, self._saved_metrics)
        align_train_loader(trainer)  # a resumed run's first epoch gets its own order, not epoch 0's

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_rng()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if restarting(trainer) and epoch_batches_all_ran(trainer):
            # Lightning steps no plateau scheduler at the end of the epoch a run resumes in
            catch_up_plateau_schedulers(trainer, trainer.current_epoch + 1, self._saved_metrics)
        self._saved_metrics = {}
