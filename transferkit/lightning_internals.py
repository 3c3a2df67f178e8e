"""Every use of a Lightning attribute that is not public API, in one place, each with the reason.

Lightning gives no public way to do a few things transferkit needs (resuming a run in the middle of an
epoch on the batches it would have trained, writing ``last.ckpt`` every epoch, telling DDP before it
wraps the model that frozen groups get no gradients). Those private attributes change between Lightning
releases without notice, so each is read here, through :func:`_private`, which fails with a message that
names the attribute and the Lightning versions transferkit is tested with. ``tests/test_lightning_internals.py``
runs every accessor on a real Trainer, so a Lightning release that renames one fails that test by name.

:data:`SUPPORTED` is the range of Lightning releases the test suite passed on; ``pyproject.toml`` allows
exactly that range.
"""

from __future__ import annotations

from typing import Any

import lightning
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging

from transferkit.errors import LightningInternalsError

__all__ = [
    "SUPPORTED",
    "USED",
    "CheckpointHyperparameters",
    "attached_trainer",
    "averaged_model",
    "batches_done_in_epoch",
    "callback_state_key",
    "epoch_about_to_run",
    "epoch_batches_all_ran",
    "epoch_not_started",
    "last_saved_step",
    "latest_update_step",
    "restart_train_iteration",
    "restarted_mid_epoch",
    "restarting",
    "rewind_epoch_not_started",
    "save_last_checkpoint",
    "saves_on_train_epoch_end",
    "set_ddp_find_unused_parameters",
    "set_latest_update_step",
    "strategy_checkpoint_io",
    "train_loaders",
    "wrapped_sampler",
]

SUPPORTED = ">=2.6.1,<2.7"

# owner -> the attributes read here that Lightning does not document as public
USED = {
    "LightningModule": ["_trainer"],
    "DDPStrategy": ["_ddp_kwargs"],
    "Strategy": ["_checkpoint_io"],
    "_FitLoop": ["_combined_loader", "_data_fetcher", "restarting", "restarted_mid_epoch", "epoch_progress"],
    "_TrainingEpochLoop": ["_num_ready_batches_reached", "batch_progress", "restarted_on_train_batch_end"],
    "ModelCheckpoint": [
        "_should_save_on_train_epoch_end",
        "_last_global_step_saved",
        "_save_last_checkpoint",
        "_monitor_candidates",
    ],
    "WeightAveraging": ["_average_model", "_latest_update_step"],
    "_DatasetSamplerWrapper": ["_sampler"],
    "Callback": ["_generate_state_key"],
    "LightningCLI": ["_parse_ckpt_path"],
}


def _private(owner: Any, name: str) -> Any:
    """``owner.<name>``, or an error that names it and the Lightning versions transferkit supports."""
    try:
        return getattr(owner, name)
    except AttributeError:
        raise LightningInternalsError(
            f"transferkit relies on Lightning's private attribute {type(owner).__name__}.{name}, which lightning "
            f"{lightning.__version__} does not have. transferkit is tested with lightning{SUPPORTED}: "
            f"pip install 'lightning{SUPPORTED}'."
        ) from None


# --- the module and its strategy --------------------------------------------------------------------


def attached_trainer(module: lightning.LightningModule) -> lightning.Trainer | None:
    """The Trainer ``module`` is attached to, or ``None``: ``module.trainer`` raises when there is none,
    and a model is also used outside a Trainer (checkpoints saved by hand, ``plan``, inference)."""
    return _private(module, "_trainer")


def set_ddp_find_unused_parameters(strategy: Any) -> None:
    """Make DDP look for parameters without gradients every step: frozen groups get none, and groups
    unfrozen mid-run start getting them. It must be set before DDP wraps the model, and the strategy
    object takes it only as a constructor argument."""
    _private(strategy, "_ddp_kwargs")["find_unused_parameters"] = True


def strategy_checkpoint_io(strategy: Any) -> Any:
    """The checkpoint writer a strategy object was built with (``None`` for a strategy given by name),
    so the Trainer adds its atomic writer only where the user chose none."""
    return getattr(strategy, "_checkpoint_io", None)


# --- the fit loop: where a resumed run is --------------------------------------------------------------


def restarting(trainer: lightning.Trainer) -> bool:
    """Whether the fit loop is replaying the epoch a checkpoint was written in."""
    return bool(_private(trainer.fit_loop, "restarting"))


def restarted_mid_epoch(trainer: lightning.Trainer) -> bool:
    """Whether the run resumed from a checkpoint written in the middle of an epoch (no
    ``on_train_epoch_start`` runs for that epoch)."""
    return bool(_private(trainer.fit_loop, "restarted_mid_epoch"))


def epoch_about_to_run(trainer: lightning.Trainer) -> int:
    """The epoch number Lightning is about to hand to ``set_epoch`` (also before a resumed run's loop
    state reaches ``trainer.current_epoch``)."""
    return int(_private(trainer.fit_loop, "epoch_progress").current.processed)


def epoch_not_started(trainer: lightning.Trainer) -> bool:
    """Whether the fit loop counted an epoch as ready but not as started: it is inside the epoch's
    ``on_train_epoch_start`` hooks."""
    current = _private(_private(trainer.fit_loop, "epoch_progress"), "current")
    return current.ready > current.started


def rewind_epoch_not_started(trainer: lightning.Trainer) -> None:
    """Count an epoch that was stopped inside its start hooks as not begun. A checkpoint written in that
    window otherwise holds the previous epoch's batch counts under the new epoch, and Lightning resumes
    past the whole epoch without training it."""
    progress = _private(trainer.fit_loop, "epoch_progress")
    for counts in (_private(progress, "current"), _private(progress, "total")):
        counts.ready = counts.started


def batches_done_in_epoch(trainer: lightning.Trainer) -> int:
    """Training batches of the resumed epoch that the checkpoint counts as trained (a checkpoint written
    in ``on_train_batch_end`` counts its batch only on restart)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    completed = _private(epoch_loop, "batch_progress").current.completed
    return int(completed) + int(_private(epoch_loop, "restarted_on_train_batch_end"))


def epoch_batches_all_ran(trainer: lightning.Trainer) -> bool:
    """Whether every batch of the current epoch has run (the epoch end is real, not a stop)."""
    return bool(_private(trainer.fit_loop.epoch_loop, "_num_ready_batches_reached")())


def train_loaders(trainer: lightning.Trainer) -> list[Any] | None:
    """The training DataLoaders as the fit loop holds them (rebuilt by Lightning, e.g. for DDP), or
    ``None`` before it set them up."""
    combined = _private(trainer.fit_loop, "_combined_loader")
    return None if combined is None else list(combined.flattened)


def restart_train_iteration(trainer: lightning.Trainer) -> bool:
    """Start a new iteration of the training loaders (their samplers draw again; persistent workers
    are reused). Lightning iterates them once before a resumed run's state is restored."""
    fetcher = _private(trainer.fit_loop, "_data_fetcher")
    if fetcher is None:
        return False
    iter(fetcher)
    return True


def wrapped_sampler(sampler: Any) -> Any | None:
    """The sampler that Lightning's ``DistributedSamplerWrapper`` deals out to the processes under DDP
    (it keeps it as ``dataset._sampler``); ``None`` for any other sampler."""
    return getattr(getattr(sampler, "dataset", None), "_sampler", None)


# --- callbacks -------------------------------------------------------------------------------------


def saves_on_train_epoch_end(callback: ModelCheckpoint, trainer: lightning.Trainer) -> bool:
    """Whether the checkpoint callback saves at the end of the training epoch (no validation in the
    epoch) rather than after validation."""
    return bool(_private(callback, "_should_save_on_train_epoch_end")(trainer))


def last_saved_step(callback: ModelCheckpoint) -> int:
    """The global step of the callback's latest write (Lightning writes ``last.ckpt`` itself only in a
    step that also saved a top-k checkpoint)."""
    return int(_private(callback, "_last_global_step_saved"))


def save_last_checkpoint(callback: ModelCheckpoint, trainer: lightning.Trainer) -> None:
    """Write the callback's ``last.ckpt`` now, as it does after a new best."""
    candidates = _private(callback, "_monitor_candidates")(trainer)
    _private(callback, "_save_last_checkpoint")(trainer, candidates)


def averaged_model(callback: WeightAveraging) -> Any:
    """The ``AveragedModel`` a weight-averaging callback keeps (``None`` before fit sets it up)."""
    return _private(callback, "_average_model")


def latest_update_step(callback: WeightAveraging) -> int:
    """The global step of the average's latest update."""
    return int(_private(callback, "_latest_update_step"))


def set_latest_update_step(callback: WeightAveraging, step: int) -> None:
    """Record an update of the average made outside ``WeightAveraging.on_train_batch_end``."""
    _private(callback, "_latest_update_step")  # fails by name if Lightning dropped it
    callback._latest_update_step = step


def callback_state_key(callback: Callback, **kwargs: Any) -> str:
    """A callback's ``state_key`` made of its class and ``kwargs``: the helper Lightning's docs of
    ``Callback.state_key`` tell subclasses to use."""
    return _private(callback, "_generate_state_key")(**kwargs)


# --- the command line -------------------------------------------------------------------------------


class CheckpointHyperparameters:
    """A LightningCLI mixin for ``--ckpt_path``: LightningCLI reads the checkpoint's ``hyper_parameters``
    back into the model's config (``LightningCLI._parse_ckpt_path``, which is private) and stops the run
    when one is not an argument of the model: the flat settings of a checkpoint an earlier transferkit
    wrote, or the range test's ``lr_found``. The subclass's :meth:`checkpoint_hparams` says what to read
    back instead; the rest is Lightning's own logic.
    """

    def checkpoint_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """The model's arguments among a checkpoint's ``hyper_parameters`` (default: all of them)."""
        return hparams

    def _parse_ckpt_path(self) -> None:
        import sys
        from pathlib import Path

        import torch
        from lightning.pytorch.cli import LightningCLI

        _private(LightningCLI, "_parse_ckpt_path")  # the method this one replaces must still exist
        config = self.config  # type: ignore[attr-defined]
        if not config.get("subcommand"):
            return
        ckpt_path = config[config.subcommand].get("ckpt_path")
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if "_class_path" in hparams:
            class_path = hparams.pop("_class_path")
            model = {"class_path": class_path, "dict_kwargs": self.checkpoint_hparams(hparams)}
        else:
            model = self.checkpoint_hparams(hparams)
        if not model:
            return
        try:
            self.config = self.parser.parse_object({config.subcommand: {"model": model}}, config)  # type: ignore[attr-defined]
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise
