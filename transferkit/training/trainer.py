"""Lightning's Trainer with transferkit's defaults, plus ``finetune``: fit, test the best checkpoint, report."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from transferkit.data.datamodule import ImageDataModule
from transferkit.errors import CheckpointError, ConfigError, warn
from transferkit.lightning_internals import strategy_checkpoint_io
from transferkit.models.checkpoint import learning_rates, refused_pickle
from transferkit.models.classifier import TransferClassifier
from transferkit.models.tasks import check_same_kind
from transferkit.runtime import quiet_third_party, tune_allocator
from transferkit.training.checkpointing import DEFAULT_CHECKPOINT, AtomicCheckpointIO, RunCheckpoint
from transferkit.training.early_stopping import DEFAULT_EARLY_STOPPING, PhaseEarlyStopping
from transferkit.training.feeding import FreezeAndCache
from transferkit.training.interrupts import InterruptCheckpoint
from transferkit.training.loggers import run_loggers
from transferkit.training.nonfinite import NonFiniteLossGuard
from transferkit.training.resume import ExactResume

__all__ = ["Trainer"]


class Trainer(L.Trainer):
    """Lightning's :class:`~lightning.pytorch.Trainer` with the defaults a fine-tuning run needs, and one
    more entry point, :meth:`finetune`. Each default is added only where the caller gave nothing of its
    kind, so anything passed in is used as it is:

    - a :class:`~transferkit.training.checkpointing.RunCheckpoint` keeping the best epoch by ``val_loss``
      and rewriting ``last.ckpt`` every epoch (unless ``enable_checkpointing=False``);
    - a :class:`~transferkit.training.early_stopping.PhaseEarlyStopping` on ``val_loss`` with patience 5
      (``enable_early_stopping=False`` turns early stopping off, also one given in ``callbacks`` or by a
      recipe's ``early_stopping`` section);
    - loggers: CSV, plus TensorBoard when installed (:func:`~transferkit.training.loggers.run_loggers`;
      ``logger=False`` turns logging off), and a learning-rate monitor when there is a logger;
    - a :class:`~transferkit.training.feeding.FreezeAndCache` with its caches off, which applies the model's
      freeze schedule epoch by epoch (give one with ``feature_cache``/``trunk_cache`` to feed the model
      stored features while part of its backbone is frozen);
    - a :class:`~transferkit.training.nonfinite.NonFiniteLossGuard`, an
      :class:`~transferkit.training.interrupts.InterruptCheckpoint` and an
      :class:`~transferkit.training.resume.ExactResume`; a Rich progress bar unless
      ``enable_progress_bar=False``; checkpoints written atomically.

    A fit without validation (no validation loader, ``limit_val_batches=0``, or a data module with
    ``val_fraction=0``) keeps the latest epoch's checkpoint as its best and stops no run early. These are
    the defaults of ``python -m transferkit`` recipes too, so a run from Python and the same run from a
    recipe train alike. Before ``fit``, ``validate``, ``test`` and ``predict`` it hands a
    :class:`~transferkit.TransferClassifier` and an :class:`~transferkit.ImageDataModule` what each needs
    of the other (:func:`connect`). Creating a Trainer also tunes the memory allocator for CPU training
    (:func:`transferkit.runtime.tune_allocator`) and silences third-party console noise
    (:func:`transferkit.runtime.quiet_third_party`).

    Example:
        >>> trainer = Trainer(max_epochs=1, logger=False)
        >>> trainer.checkpoint_callback.monitor, [c.patience for c in trainer.early_stopping_callbacks]
        ('val_loss', [5])
    """

    def __init__(self, *args: Any, enable_early_stopping: bool = True, **kwargs: Any) -> None:
        tune_allocator()
        quiet_third_party()
        callbacks = kwargs.get("callbacks") or []
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        if not enable_early_stopping:
            callbacks = [c for c in callbacks if not isinstance(c, EarlyStopping)]
        logger = kwargs.get("logger", True)
        if logger is None or logger is True:
            kwargs["logger"] = logger = run_loggers(kwargs.get("default_root_dir") or os.getcwd())
        defaults: list[tuple[type, Any]] = [
            (FreezeAndCache, FreezeAndCache),  # the freeze schedule, epoch by epoch (caches off)
            (NonFiniteLossGuard, NonFiniteLossGuard),
            (InterruptCheckpoint, InterruptCheckpoint),
            (ExactResume, ExactResume),
        ]
        if enable_early_stopping:
            # strict=False: a model that logs no val_loss is not stopped early, rather than failed
            defaults.append(
                (EarlyStopping, lambda: PhaseEarlyStopping(**DEFAULT_EARLY_STOPPING, strict=False))
            )
        if kwargs.get("enable_checkpointing", True) is not False:
            defaults.append((ModelCheckpoint, lambda: RunCheckpoint(**DEFAULT_CHECKPOINT)))
        if kwargs.get("enable_progress_bar", True) is not False:
            defaults.insert(0, (ProgressBar, RichProgressBar))
        if logger:
            defaults.append((LearningRateMonitor, lambda: LearningRateMonitor(logging_interval="epoch")))
        self._added_defaults: list[Callback] = []
        for kind, make in defaults:
            if not any(isinstance(c, kind) for c in callbacks):
                callbacks.append(make())
                self._added_defaults.append(callbacks[-1])
        kwargs["callbacks"] = callbacks
        plugins = kwargs.get("plugins")
        plugins = [] if plugins is None else plugins if isinstance(plugins, list) else [plugins]
        no_io = not any(isinstance(p, CheckpointIO) for p in plugins)
        if no_io and strategy_checkpoint_io(kwargs.get("strategy")) is None:
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
        code is refused with a :class:`~transferkit.errors.CheckpointError`.

        A datamodule without a validation split (``val_fraction=0``) trains on every non-test image:
        validation and early stopping are off, and the checkpoint callbacks keep the latest epoch's
        checkpoint as their best, so :meth:`finetune` tests the model the last epoch ends with.
        """
        # a data module may come as the loaders' argument too (Lightning takes it there)
        connect(
            model, train_dataloaders if isinstance(train_dataloaders, L.LightningDataModule) else datamodule
        )
        no_split = (
            datamodule is not None
            and val_dataloaders is None
            and not getattr(datamodule, "has_validation", True)
        )
        if no_split:
            self._train_without_validation(model, self.callbacks, announce=True)
        elif not self._validates(model, val_dataloaders, datamodule):
            self._train_without_validation(model, self._added_defaults, announce=False)
        if isinstance(model, TransferClassifier) and model.settings.optimizer.lr == "auto":
            given = train_dataloaders if isinstance(train_dataloaders, L.LightningDataModule) else datamodule
            self._find_learning_rates(model, given, ckpt_path)
        named = str(ckpt_path) in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")
        if (
            ckpt_path is not None
            and not named
            and "://" not in str(ckpt_path)
            and not Path(ckpt_path).is_file()
        ):
            raise CheckpointError(
                f"no checkpoint to resume from at '{ckpt_path}'; pass the .ckpt file a run wrote "
                "(its checkpoints/ folder), or ckpt_path=last for the latest one of this run."
            )
        main_thread = threading.current_thread() is threading.main_thread()
        sigint = signal.getsignal(signal.SIGINT) if main_thread else None
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
            raise refused_pickle(ckpt_path, err, action="resume from") from err
        except SIGTERMException as err:
            # Lightning stops with exit status 0; a scheduler should see the run was terminated
            raise SystemExit(128 + signal.SIGTERM) from err
        finally:
            # after a Ctrl+C Lightning ignores SIGINT for good; a notebook's next interrupt must still work
            if sigint is not None and signal.getsignal(signal.SIGINT) is not sigint:
                signal.signal(signal.SIGINT, sigint)

    def validate(
        self, model: L.LightningModule | None = None, dataloaders: Any = None, *args: Any, **kwargs: Any
    ):
        """Lightning's ``validate``, the data module first told the model's input size, mean and std."""
        connect(model, _datamodule_of(dataloaders, kwargs))
        return super().validate(model, dataloaders, *args, **kwargs)

    def test(
        self, model: L.LightningModule | None = None, dataloaders: Any = None, *args: Any, **kwargs: Any
    ):
        """Lightning's ``test``, the data module first told the model's input size, mean and std."""
        connect(model, _datamodule_of(dataloaders, kwargs))
        return super().test(model, dataloaders, *args, **kwargs)

    def predict(
        self, model: L.LightningModule | None = None, dataloaders: Any = None, *args: Any, **kwargs: Any
    ):
        """Lightning's ``predict``, the data module first told the model's input size, mean and std."""
        connect(model, _datamodule_of(dataloaders, kwargs))
        return super().predict(model, dataloaders, *args, **kwargs)

    def _find_learning_rates(self, model: L.LightningModule, datamodule: Any, ckpt_path: Any) -> None:
        """``model.optimizer.lr: auto``: a resumed run takes the rates its checkpoint was trained with; a new one runs
        :func:`~transferkit.training.lr_finder.lr_find` (``lr_find.png`` in the run's folder), prints what
        it chose and why, and keeps it in the hyperparameters, which the loggers and checkpoints record."""
        if ckpt_path is not None and Path(str(ckpt_path)).is_file():
            saved = learning_rates(torch.load(ckpt_path, map_location="cpu", weights_only=True))
            if saved.get("lr") not in (None, "auto"):
                model.set_learning_rates(**saved)
                return
        if datamodule is None:
            raise ConfigError(
                "model.optimizer.lr: auto needs the data module (trainer.fit(model, datamodule=...))."
            )
        from transferkit.training.lr_finder import lr_find

        folder = Path(self.log_dir or self.default_root_dir)
        caches = next((c for c in self.callbacks if isinstance(c, FreezeAndCache)), None)
        report = lr_find(
            model, datamodule, out=folder / "lr_find.png", root_dir=self.default_root_dir, caches=caches
        )
        if self.is_global_zero:
            print(f"model.optimizer.lr: auto: learning rates found by a range test ({report.png}):\n{report}")

    def _calibrate(self, model: L.LightningModule, datamodule: Any, best: str | None) -> Any:
        """Fit the temperature (and decision threshold) of the best checkpoint's weights on the validation
        split and store it in that checkpoint, which ``test`` then loads; every process fits the same one,
        the first writes it."""
        from transferkit.inference.calibrate import calibrate
        from transferkit.models.checkpoint import store_calibration

        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            model.load_state_dict(state)
        calibration = calibrate(model, datamodule)
        if best and self.is_global_zero:
            store_calibration(best, calibration)
        self.strategy.barrier("transferkit-calibration")
        if self.is_global_zero:
            print(f"calibration: {calibration.describe()}")
        return calibration

    def _validates(self, model: L.LightningModule, val_dataloaders: Any, datamodule: Any) -> bool:
        """Whether this fit runs a validation loop (so that ``val_loss`` will exist to be watched)."""
        if self.limit_val_batches == 0 or not is_overridden("validation_step", model):
            return False
        if val_dataloaders is not None:
            return True
        source = datamodule if datamodule is not None else model
        return is_overridden("val_dataloader", source)

    def _train_without_validation(
        self, model: L.LightningModule, callbacks: list[Callback], announce: bool
    ) -> None:
        """Turn off what watches a validation metric among ``callbacks``: early stopping is removed, and
        checkpoint callbacks keep the latest epoch as their best."""
        performance = (
            isinstance(model, TransferClassifier) and model.settings.lr_schedule.name == "performance"
        )
        if announce and performance:
            raise ConfigError(
                "lr_schedule 'performance' lowers the LR when val_loss stops improving, but data.split.val_fraction=0 "
                "holds out no validation split. Use a schedule that needs no validation (cosine, exponential, "
                "piecewise, onecycle), or keep a validation split."
            )
        if announce:
            self.limit_val_batches = 0
        chosen = {id(c) for c in callbacks}
        self.callbacks = [c for c in self.callbacks if not (id(c) in chosen and isinstance(c, EarlyStopping))]
        for callback in self.checkpoint_callbacks:
            if id(callback) in chosen and callback.monitor is not None:
                callback.monitor = None
                callback.filename = "{epoch:02d}"
        if announce:
            print(
                "no validation split (data.split.val_fraction=0): every non-test image trains; validation and early "
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
        :func:`transferkit.reporting.run_report.write_run_report`) in the run dir.

        Args:
            model: the module to train.
            datamodule: the data; it must provide a test split.
            ckpt_path: resume the fit from this checkpoint.

        Returns:
            The figures written to ``metrics.json``.
        """
        calibrating = _calibration_asked(model, datamodule)
        start = time.perf_counter()
        self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_seconds = time.perf_counter() - start
        if self.interrupted:
            raise KeyboardInterrupt("training was interrupted; the last checkpoint is kept for resuming.")

        callback = self.checkpoint_callback
        best = getattr(callback, "best_model_path", "") or None
        calibration = self._calibrate(model, datamodule, best) if calibrating else None
        start = time.perf_counter()
        if hasattr(datamodule, "check_near_duplicates"):  # a test image seen in training overstates its score
            datamodule.check_near_duplicates()
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
        if calibration is not None:
            results["calibration"] = calibration.to_dict()
        results["target"] = model.task.describe() if isinstance(model, TransferClassifier) else None
        skipped = getattr(datamodule, "skipped_images", None)
        if skipped is not None:
            results["skipped_images"] = [f"{e.path}: {e.reason}" for e in skipped]
        if datamodule is not None and hasattr(datamodule, "summary"):
            results["class_names"] = list(getattr(datamodule, "class_names", []))
            if getattr(datamodule, "class_groups", None):
                results["class_groups"] = datamodule.class_groups
            results["split_sizes"] = datamodule.split_sizes()
        if self.is_global_zero:
            run_dir = Path(self.log_dir or self.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            results["run_dir"] = str(run_dir)
            results["report"] = _write_report(self, model, datamodule, results)
            _print_results(results)
        return results


def _datamodule_of(dataloaders: Any, kwargs: dict[str, Any]) -> Any:
    """The data module of a ``validate``/``test``/``predict`` call: ``datamodule=``, or one passed where the
    loaders go (Lightning takes it there too)."""
    return dataloaders if isinstance(dataloaders, L.LightningDataModule) else kwargs.get("datamodule")


def connect(model: Any, datamodule: Any) -> None:
    """Hand a :class:`~transferkit.TransferClassifier` and an :class:`~transferkit.ImageDataModule` what each
    needs of the other, once, before a run: the data module fills the image size, mean and std it was left
    without from the backbone, the backbone refuses a size it cannot take, and the model keeps the eval
    preprocessing its checkpoints describe. Any other model or data module is left as it is."""
    if not isinstance(model, TransferClassifier) or not isinstance(datamodule, ImageDataModule):
        return
    check_same_kind(model, datamodule)
    datamodule.use_data_config(model.data_config)
    model.check_input_size(int(datamodule.image_size))  # before training, not at the first batch
    model.set_preprocessing(datamodule.preprocessing())


def _calibration_asked(model: L.LightningModule, datamodule: Any) -> bool:
    """Whether ``finetune`` fits a calibration after training; refused up front (not after a whole run)
    when there is no validation split to fit it on."""
    asked = isinstance(model, TransferClassifier) and model.task.fits_after_training(
        model.settings.prediction
    )
    if not asked or datamodule is None or getattr(datamodule, "has_validation", True):
        return asked
    if not model.settings.prediction.fitted_after_training:  # asked by the task itself (per-label thresholds)
        warn(
            "data.split.val_fraction=0 holds out no validation split, so the multi-label model's per-label "
            "thresholds are not fitted: every label is predicted at probability >= 0.5."
        )
        return False
    if asked:
        raise ConfigError(
            "model.prediction.calibrate / model.prediction.decision_threshold are fitted on the validation split, but "
            "data.split.val_fraction=0 holds none out. Keep a validation split (e.g. data.split.val_fraction: 0.15), "
            "or turn calibration off."
        )
    return asked


def _write_report(
    trainer: Trainer, model: L.LightningModule, datamodule: Any, results: dict[str, Any]
) -> str | None:
    """report.md and its pictures; a failure is a warning, never a failed run (the model is trained)."""
    from transferkit.reporting.run_report import write_run_report

    try:
        return str(write_run_report(trainer, model, datamodule, results))
    except Exception as err:
        warn(f"the run report could not be written: {type(err).__name__}: {err}")
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
    if results.get("class_groups"):  # what test_group_* scored
        groups = "; ".join(f"{g} = {', '.join(m)}" for g, m in results["class_groups"].items())
        console.print(f"test_group_*: the classes scored in groups: {groups}")
    if results.get("skipped_images"):
        console.print(f"skipped {len(results['skipped_images'])} unreadable images (listed in metrics.json)")
    console.print(f"{chosen} checkpoint: {results['best_checkpoint']}")
    console.print(f"metrics written to {Path(results['run_dir']) / 'metrics.json'}")
    if results.get("report"):
        console.print(f"report: {results['report']}")
