"""Lightning's Trainer plus ``finetune``: fit, test the best checkpoint, write the results."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transferkit.diagnostics import NonFiniteLossGuard
from transferkit.runtime import tune_allocator

__all__ = ["AtomicCheckpointIO", "InterruptCheckpoint", "PhaseEarlyStopping", "RunCheckpoint", "Trainer"]

_CHUNK = 1 << 20


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, flushed to disk, then moved over it
    with ``os.replace``: a crash, a kill or a full disk while writing leaves the previous checkpoint
    intact (and no half-written file). Remote paths (``s3://`` ...) go through Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = _serialise(checkpoint)
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            view = memoryview(buffer)
            while view:
                written = os.write(fd, view[:_CHUNK])
                view = view[written:]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(temp, path)
        except BaseException as err:
            if fd >= 0:
                os.close(fd)
            Path(temp).unlink(missing_ok=True)
            if isinstance(err, OSError):
                kept = f"the previous '{path.name}' is unchanged" if path.exists() else "nothing was written"
                raise OSError(
                    err.errno,
                    f"could not write checkpoint '{path}' ({os.strerror(err.errno) if err.errno else err}); "
                    f"{kept}. Free disk space or set another checkpoint directory.",
                ) from err
            raise


def _serialise(checkpoint: dict[str, Any]) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


class RunCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that rewrites ``last.ckpt`` after every
    epoch (with ``save_last=True``), not only in epochs that also save a new best, so a killed run
    resumes from its latest epoch with ``ckpt_path=last``.

    Args: those of ``ModelCheckpoint``.

    Example:
        >>> trainer = Trainer(callbacks=[RunCheckpoint(monitor="val_loss", save_last=True)])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm, ckpt_path="last")  # resumes where it stopped  # doctest: +SKIP
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    def _save_last_every_epoch(self, trainer: L.Trainer) -> None:
        skip = trainer.fast_dev_run or trainer.sanity_checking
        if self.save_last and not skip and getattr(self, "_last_step_of_last", None) != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step_of_last = trainer.global_step


class PhaseEarlyStopping(EarlyStopping):
    """:class:`~lightning.pytorch.callbacks.EarlyStopping` that judges each phase of a freeze schedule on
    its own: when more backbone groups start training, the patience count and the best score start
    afresh.

    Right after an unfreeze the validation loss usually jumps (the newly trained groups leave the
    ImageNet optimum) and takes several epochs to come back under the head-only phase's best, so a
    patience counted across phases can stop a run before the unfrozen model had a chance (on ELPV it
    stopped one at epoch 10 of 16 and tested a head-only checkpoint). The best checkpoint is still
    chosen over the whole run by the checkpoint callback. The current phase is saved with the
    callback's state, so a resumed run stops where an uninterrupted one would.

    Args: those of ``EarlyStopping``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase: int | None = None  # the trainable groups of the epoch last checked

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        phase = getattr(trainer.lightning_module, "trainable_groups", None)
        if self.phase is not None and phase != self.phase:
            self.wait_count = 0
            self.best_score = torch.tensor(torch.inf if self.monitor_op == torch.lt else -torch.inf)
        self.phase = phase
        super()._run_early_stopping_check(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "phase": self.phase}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.phase = state_dict.get("phase")


class InterruptCheckpoint(Callback):
    """On Ctrl+C (SIGINT) or SIGTERM during ``fit``, write ``interrupted.ckpt`` into the run's checkpoint
    directory (atomically, see :class:`AtomicCheckpointIO`) and say how to resume from it.

    Lightning stops at the next batch boundary after a SIGTERM and at once after a Ctrl+C; both reach
    this callback's ``on_exception``. The checkpoint holds the loop's progress, so ``fit(...,
    ckpt_path=<it>)`` continues from that step.

    Args:
        filename: the file name, in the checkpoint callback's ``dirpath`` (or
            ``<default_root_dir>/checkpoints`` without one).

    Example:
        >>> trainer = Trainer(callbacks=[InterruptCheckpoint()])  # the transferkit Trainer adds it anyway
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


class Trainer(L.Trainer):
    """Lightning's :class:`~lightning.pytorch.Trainer` with one more entry point, :meth:`finetune`.

    Creating one also tunes the memory allocator for CPU training (:func:`transferkit.runtime.tune_allocator`),
    and shows a Rich progress bar unless ``enable_progress_bar=False`` or another progress bar is given.
    A :class:`~transferkit.diagnostics.NonFiniteLossGuard` stops training at the first NaN/inf loss, before
    its optimizer step, with an error that says why and what to do.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tune_allocator()
        callbacks = kwargs.get("callbacks") or []
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        defaults = [(NonFiniteLossGuard, NonFiniteLossGuard), (InterruptCheckpoint, InterruptCheckpoint)]
        if kwargs.get("enable_progress_bar", True) is not False:
            defaults.insert(0, (ProgressBar, RichProgressBar))
        for kind, make in defaults:  # each one only where the caller gave none of its kind
            if not any(isinstance(c, kind) for c in callbacks):
                callbacks.append(make())
        kwargs["callbacks"] = callbacks
        plugins = kwargs.get("plugins")
        plugins = [] if plugins is None else plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins) and not _strategy_has_io(
            kwargs.get("strategy")
        ):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        super().__init__(*args, **kwargs)

    def fit(
        self,
        model: L.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | Path | None = None,
        weights_only: bool | None = None,
    ) -> None:
        """Lightning's ``fit``; a checkpoint to resume from is read with ``weights_only=True`` (never
        running code from the file) unless ``weights_only=False`` is passed, and one holding pickled
        code is refused with a :class:`~transferkit.serving.CheckpointError`.

        A datamodule without a validation split (``val_fraction=0``) trains on every non-test image:
        validation and early stopping are off, and the checkpoint callbacks keep the latest epoch's
        checkpoint as their best, so :meth:`finetune` tests the model the last epoch ends with.
        """
        if (
            datamodule is not None
            and val_dataloaders is None
            and not getattr(datamodule, "has_validation", True)
        ):
            self._train_without_validation(model)
        named = str(ckpt_path) in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")
        if (
            ckpt_path is not None
            and not named
            and "://" not in str(ckpt_path)
            and not Path(ckpt_path).is_file()
        ):
            from transferkit.serving import CheckpointError

            raise CheckpointError(
                f"no checkpoint to resume from at '{ckpt_path}'; pass the .ckpt file a run wrote "
                "(its checkpoints/ folder), or ckpt_path=last for the latest one of this run."
            )
        try:
            super().fit(
                model,
                train_dataloaders,
                val_dataloaders,
                datamodule,
                ckpt_path,
                weights_only=True if weights_only is None else weights_only,
            )
        except pickle.UnpicklingError as err:
            raise pickled_code_error(ckpt_path, err) from err
        except SIGTERMException as err:
            # Lightning stops with exit status 0; a scheduler should see the run was terminated
            raise SystemExit(128 + signal.SIGTERM) from err

    def _train_without_validation(self, model: L.LightningModule) -> None:
        hparams = getattr(model, "hparams", {})
        if hparams.get("lr_schedule") == "performance":
            raise ValueError(
                "lr_schedule 'performance' lowers the LR when val_loss stops improving, but data.val_fraction=0 "
                "holds out no validation split. Use a schedule that needs no validation (cosine, exponential, "
                "piecewise, onecycle), or keep a validation split."
            )
        self.limit_val_batches = 0
        self.callbacks = [c for c in self.callbacks if not isinstance(c, EarlyStopping)]
        for callback in self.checkpoint_callbacks:
            if callback.monitor is not None:
                callback.monitor = None
                callback.filename = "{epoch:02d}"
        print(
            "no validation split (data.val_fraction=0): every non-test image trains; validation and early "
            "stopping are off, and the last epoch's checkpoint is the one tested.",
            file=sys.stderr,
        )

    def finetune(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, Any]:
        """Fit, then test the best checkpoint, then print the results and write ``metrics.json`` and the run
        report (``report.md`` with learning curves, test confusion matrix and augmentation preview, see
        :func:`transferkit.report.write_run_report`) in the run dir.

        Args:
            model: the module to train.
            datamodule: the data; it must provide a test split.
            ckpt_path: resume the fit from this checkpoint.

        Returns:
            The figures written to ``metrics.json``.
        """
        start = time.perf_counter()
        self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_seconds = time.perf_counter() - start
        if self.interrupted:
            raise KeyboardInterrupt("training was interrupted; the last checkpoint is kept for resuming.")

        callback = self.checkpoint_callback
        best = getattr(callback, "best_model_path", "") or None
        start = time.perf_counter()
        tested = self.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        test_seconds = time.perf_counter() - start

        best_score = getattr(callback, "best_model_score", None)
        results: dict[str, Any] = {
            "test": {k: float(v) for k, v in (tested[0] if tested else {}).items()},
            "best_checkpoint": best,
            "monitor": getattr(callback, "monitor", None),
            "best_score": float(best_score) if best_score is not None else None,
            "epochs": int(self.current_epoch),
            "global_steps": int(self.global_step),
            "fit_seconds": round(fit_seconds, 2),
            "test_seconds": round(test_seconds, 2),
        }
        skipped = getattr(datamodule, "skipped_images", None)
        if skipped is not None:
            results["skipped_images"] = [f"{e.path}: {e.reason}" for e in skipped]
        if datamodule is not None and hasattr(datamodule, "summary"):
            results["class_names"] = list(getattr(datamodule, "class_names", []))
            results["split_sizes"] = {s: sum(c.values()) for s, c in datamodule.summary().items()}
        if self.is_global_zero:
            run_dir = Path(self.log_dir or self.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            results["run_dir"] = str(run_dir)
            results["report"] = _write_report(self, model, datamodule, results)
            _print_results(results)
        return results


def pickled_code_error(path: Any, err: Exception) -> Exception:
    """The :class:`~transferkit.serving.CheckpointError` for a checkpoint to resume from that holds pickled
    code (``torch.load(weights_only=True)`` refused it)."""
    from transferkit.serving import CheckpointError

    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"refused to resume from '{path}': it holds pickled code or objects, not only tensors and plain "
        f"containers ({first_line}). transferkit loads checkpoints with weights_only=True and never runs "
        "code from a file; resume from a checkpoint a transferkit run wrote."
    )


def _strategy_has_io(strategy: Any) -> bool:
    return getattr(strategy, "_checkpoint_io", None) is not None


def _write_report(
    trainer: Trainer, model: L.LightningModule, datamodule: Any, results: dict[str, Any]
) -> str | None:
    """report.md and its pictures; a failure is a warning, never a failed run (the model is trained)."""
    from transferkit.report import write_run_report

    try:
        return str(write_run_report(trainer, model, datamodule, results))
    except Exception as err:
        warnings.warn(f"the run report could not be written: {type(err).__name__}: {err}", stacklevel=3)
        return None


def _print_results(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    chosen = "best" if results.get("monitor") is not None else "last epoch's"
    table = Table(title=f"transferkit finetune: test results ({chosen} checkpoint)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(results["test"].items()):
        table.add_row(key, f"{value:.4f}")
    if results.get("best_score") is not None:
        table.add_row(f"best {results['monitor']}", f"{results['best_score']:.4f}")
    table.add_row("epochs", str(results["epochs"]))
    table.add_row("fit time", f"{results['fit_seconds']:.0f} s")
    console = Console()
    console.print(table)
    if results.get("skipped_images"):
        console.print(f"skipped {len(results['skipped_images'])} unreadable images (listed in metrics.json)")
    console.print(f"{chosen} checkpoint: {results['best_checkpoint']}")
    console.print(f"metrics written to {Path(results['run_dir']) / 'metrics.json'}")
    if results.get("report"):
        console.print(f"report: {results['report']}")
