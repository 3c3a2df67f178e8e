"""Stratified k-fold cross-validation: every non-test image validates once, and the spread of the folds
says how far a validation score moves with the choice of validation images.

:func:`cross_validate` trains one run per fold, each a normal run in its own folder ``<out>/fold_<i>/``
(fit, the best checkpoint's validation figures, ``metrics.json``, the run report, checkpoints under
``checkpoints/``), and writes the summary into ``out``::

    cv.json                        per-fold figures, their mean and standard deviation, ensemble figures
    cv.csv                         the per-fold table: one row per fold, then the mean and the std
    oof_predictions.csv            one row per non-test image: its fold, truth, prediction and scores
    ensemble_test_predictions.csv  (ensemble=True) the fold models' averaged scores on the test split
    cv_state.json                  the recipe and the finished folds, rewritten after each fold

Every kind of target (:mod:`~transferkit.models.tasks`) is cross-validated; the figures are the kind's
validation metrics (``val_<metric>`` of ``task.metric_names``, and ``val_loss``), and the folds are drawn
as the data module draws them (stratified classes, iterative stratification of label sets, binned
numbers). What differs is what one image's row holds:

================  =================================  ==============================================
kind              figures per fold                   a prediction row (``oof_predictions.csv``)
================  =================================  ==============================================
``single_label``  ``val_acc``, ``val_f1``            ``label``, ``predicted`` class, ``p_<class>``
``multi_label``   ``val_map``, ``val_f1_macro``,     ``labels`` and ``predicted`` (names joined by
                  ``val_f1_micro``, ``val_auroc``    ``;``), ``true_<label>`` 0/1, ``p_<label>``
``regression``    ``val_mae``, ``val_rmse``,         ``true_<target>``, ``predicted_<target>``
                  ``val_r2``
================  =================================  ==============================================

The fold models are not calibrated (the validation parts are what cross-validation scores): a multi-label
fold decides at 0.5 per label (the thresholds ``finetune`` fits on its validation split are left out, and
``cv.json`` lists the ones used). An ensemble averages the fold models' class or label probabilities, or
their values. Each fold's ``cv_predictions.npz`` holds its rows as arrays (``val_index``, ``val_label``,
``val_probs``, ``val_pred``; ``kind`` and, for labels, ``thresholds`` beside them for the two new kinds);
:func:`cell_outcomes` turns one into what a paired comparison of two recipes pairs, cell by cell.

The folds come from the data module's ``cv_folds`` / ``cv_fold``
(:func:`~transferkit.data.datamodule.cv_split_indices`): the test split is the one the recipe holds out
without cross-validation. No fold's training or report looks at it; with ``ensemble=True``, once every
fold is trained, each fold's best checkpoint is scored on it, and so is the average of their scores.

A stopped cross-validation resumes where it was: run it again with the same ``out`` and finished folds
are read back, not retrained, and the unfinished fold continues from its latest checkpoint; a different
recipe in the same ``out`` is refused.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_only

from transferkit.data.datamodule import ImageDataModule, cv_split_indices
from transferkit.data.settings import FLAT_DATA_KEYS
from transferkit.errors import ConfigError, warn
from transferkit.files import atomic_write
from transferkit.models.calibration import Calibration
from transferkit.models.tasks import SingleLabel, Task
from transferkit.training.trainer import Trainer

__all__ = ["CrossValidationReport", "FoldResult", "cell_outcomes", "cross_validate"]

DEFAULT_FOLDS = 5
STATE_FILE = "cv_state.json"
PREDICTIONS_FILE = "cv_predictions.npz"  # in each fold's folder: its validation (and test) probabilities
FIGURES = ("val_acc", "val_f1", "val_loss")  # a single-label fold's; another kind's: figure_names(task)
TEST_FIGURES = ("test_acc", "test_f1", "test_loss")
# how tables and the fold's report head each figure
_LABELS = {
    "acc": ("acc", "accuracy"),
    "f1": ("F1", "macro-F1"),
    "loss": ("loss", "loss"),
    "map": ("mAP", "mAP"),
    "f1_macro": ("F1 macro", "macro-F1"),
    "f1_micro": ("F1 micro", "micro-F1"),
    "auroc": ("AUROC", "AUROC"),
    "mae": ("MAE", "MAE"),
    "rmse": ("RMSE", "RMSE"),
    "r2": ("R^2", "R^2"),
}
# settings that change how images are read or where files go, not what a fold learns: a resumed
# cross-validation may change them
_TRAINER_HOW = ("default_root_dir", "enable_progress_bar", "enable_model_summary", "logger")


def figure_names(task: Task, split: str = "val") -> tuple[str, ...]:
    """The figures a fold reports for ``task``'s kind: ``<split>_<metric>`` of its metric names, then the
    loss (``val_acc, val_f1, val_loss`` for single label)."""
    return (*(f"{split}_{name}" for name in task.metric_names), f"{split}_loss")


def _label(name: str) -> str:
    """A table's column for a figure: ``val acc`` for ``val_acc``."""
    split, _, metric = name.partition("_")
    return f"{split} {_short(metric)}"


def _short(metric: str) -> str:
    return _LABELS.get(metric, (metric, metric))[0]


def _spelled(metric: str) -> str:
    return _LABELS.get(metric, (metric, metric))[1]


@dataclass
class FoldResult:
    """One fold's run: its best checkpoint's figures on its validation part (``figures``: the kind's
    ``val_<metric>`` and ``val_loss``; also readable as attributes, ``result.val_acc``), with an ensemble its
    test figures, and where the run is."""

    fold: int
    figures: dict[str, float]
    train_images: int
    val_images: int
    epochs: int
    best_checkpoint: str | None
    run_dir: str
    test: dict[str, float] | None = None  # test_<metric>, test_loss; only with ensemble=True

    def __getattr__(self, name: str) -> float:
        figures = self.__dict__.get("figures") or {}
        if name in figures:
            return figures[name]
        raise AttributeError(f"{type(self).__name__} has no {name!r} (its figures: {', '.join(figures)})")

    def to_dict(self) -> dict[str, Any]:
        """As ``cv.json`` and ``cv_state.json`` hold it: the figures beside ``fold`` (``val_acc`` ...)."""
        return {
            "fold": self.fold,
            **self.figures,
            "train_images": self.train_images,
            "val_images": self.val_images,
            "epochs": self.epochs,
            "best_checkpoint": self.best_checkpoint,
            "run_dir": self.run_dir,
            "test": self.test,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FoldResult:
        figures = {k: v for k, v in values.items() if k.startswith("val_") and k != "val_images"}
        others = {k: v for k, v in values.items() if k not in figures}
        return cls(figures=figures, **others)


@dataclass
class CrossValidationReport:
    """What :func:`cross_validate` found: the folds, the mean and standard deviation (``ddof=1``) of their
    figures, the out-of-fold predictions, and the test ensemble's figures when one was asked for.

    For single label the pooled out-of-fold figure is ``oof_accuracy`` and the ensemble's ``ensemble_test_acc``
    (as ``cv.json`` has always held them); for every kind, ``oof`` and ``ensemble_test`` hold the kind's
    metrics (``acc`` / ``map``, ``f1_macro`` ... / ``mae``, ``rmse``, ``r2``) over the pooled predictions."""

    folds: list[FoldResult]
    mean: dict[str, float]
    std: dict[str, float]
    out: Path
    oof_csv: Path
    oof_accuracy: float | None  # single label: all out-of-fold predictions pooled
    ensemble_test_acc: float | None = None  # single label: the fold models' averaged probabilities, on test
    mean_fold_test_acc: float | None = None  # single label: the single fold models' test accuracies, averaged
    ensemble_csv: Path | None = None
    test_images: int | None = None
    kind: str = "single_label"
    figures: tuple[str, ...] = FIGURES  # the per-fold validation figures, in table order
    oof: dict[str, float] = field(default_factory=dict)  # the kind's metrics over the pooled predictions
    ensemble_test: dict[str, float] | None = None  # the kind's metrics of the ensemble on the test split
    thresholds: list[float] | None = None  # multi-label: the per-label thresholds the decisions used

    @property
    def headline(self) -> str:
        """The kind's first metric (``acc``, ``map``, ``mae``): the test column and the ensemble's figure."""
        return self.figures[0].removeprefix("val_")

    def table(self) -> str:
        """The per-fold table with the mean and std, the pooled out-of-fold figures and the ensemble."""
        tested = all(f.test for f in self.folds)
        columns = [*self.figures, *([f"test_{self.headline}"] if tested else [])]
        widths = {name: max(len(_label(name)), 6) for name in columns}
        header = f"{'fold':>4}  {'train':>6}  {'val':>5}"
        header += "".join(f"  {_label(name):>{widths[name]}}" for name in columns)
        lines = [header + f"  {'epochs':>6}"]
        for f in self.folds:
            values = {**f.figures, **(f.test or {})}
            line = f"{f.fold:>4}  {f.train_images:>6}  {f.val_images:>5}"
            line += "".join(f"  {values[name]:>{widths[name]}.4f}" for name in columns)
            lines.append(line + f"  {f.epochs:>6}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            line = f"{name:>4}  {'':>6}  {'':>5}"
            lines.append(line + "".join(f"  {values[c]:>{widths[c]}.4f}" for c in columns))
        images = sum(f.val_images for f in self.folds)
        if self.kind == "single_label":
            pooled = f"accuracy {self.oof_accuracy:.4f}"
        else:
            pooled = ", ".join(f"{_short(metric)} {value:.4f}" for metric, value in self.oof.items())
            pooled += " (labels decided at 0.5)" if self.kind == "multi_label" else ""
        lines.append(f"out-of-fold {pooled} over {images} non-test images ({self.oof_csv})")
        if self.ensemble_test is not None:
            test = f"test_{self.headline}"
            named = "" if self.kind == "single_label" else f"{_short(self.headline)} "
            lines.append(
                f"test split ({self.test_images} images): ensemble of {len(self.folds)} fold models "
                f"{named}{self.ensemble_test[self.headline]:.4f}; single fold models {self.mean[test]:.4f} "
                f"+- {self.std[test]:.4f}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as written to ``cv.json``."""
        folds = [f.to_dict() for f in self.folds]
        common = {
            "folds": folds,
            "mean": self.mean,
            "std": self.std,
            "std_ddof": 1,
            "oof_csv": str(self.oof_csv),
        }
        ensemble = {
            "ensemble_csv": str(self.ensemble_csv) if self.ensemble_csv else None,
            "test_images": self.test_images,
        }
        if self.kind == "single_label":  # the layout single-label cross-validations have always written
            pooled = {
                "oof_accuracy": self.oof_accuracy,
                "ensemble_test_acc": self.ensemble_test_acc,
                "mean_fold_test_acc": self.mean_fold_test_acc,
            }
            return common | pooled | ensemble
        labels = {"thresholds": self.thresholds} if self.thresholds is not None else {}
        return {
            "kind": self.kind,
            **common,
            "oof": self.oof,
            **labels,
            "ensemble_test": self.ensemble_test,
        } | ensemble


def cross_validate(
    model: L.LightningModule,
    datamodule: ImageDataModule,
    folds: int | None = None,
    out: str | os.PathLike = "cv",
    ensemble: bool = False,
    trainer: Mapping[str, Any] | Callable[[int, Path], L.Trainer] | None = None,
    seed: int | None = None,
    recipe: Mapping[str, Any] | None = None,
    checkpoint: Literal["best", "last"] = "best",
) -> CrossValidationReport:
    """Stratified k-fold cross-validation of ``model`` on the non-test images of ``datamodule``.

    Fold ``i`` validates on the ``i``-th stratified part of the non-test images and trains on the others
    (the data module rebuilt with ``cv_folds=folds, cv_fold=i``); it is a full fit in ``<out>/fold_<i>/``
    whose best checkpoint (by the checkpoint callback's monitor, ``val_loss`` by default) is scored on its
    validation part. The test split stays the recipe's and is only scored with ``ensemble=True``. What is
    written, and how a stopped run resumes, is in the module's text.

    Args:
        model: the untrained module; every fold trains a copy of it, so all start from the same weights.
            Calibration (``calibrate``, ``decision_threshold``, a multi-label model's per-label thresholds)
            is not fitted: the validation parts are what cross-validation scores.
        datamodule: the recipe's data; its own ``val_fraction`` is replaced by the folds. Its
            ``data.target.kind`` must be the model's.
        folds: number of folds; ``None``: the data module's ``cv_folds``, else 5.
        out: the folder of the cross-validation; the same folder resumes it.
        ensemble: also score each fold's best checkpoint on the test split, and the average of the fold
            models' scores on it (class probabilities then argmax; label probabilities then 0.5; values).
        trainer: keyword arguments of :class:`transferkit.Trainer` for every fold (``default_root_dir`` is
            the fold's folder; ``callbacks`` are copied for each fold), or a function of the fold's number
            and folder that returns a new Trainer (the command line builds the recipe's trainer this way).
        seed: every fold's training starts from ``seed_everything(seed)``, so a fold trains alike whether
            or not the run was resumed before it; ``None``: the data module's seed.
        recipe: more settings that identify the run for resuming (the command line passes the recipe's
            trainer section); the model's and data module's hyperparameters, the images, ``folds`` and
            ``seed`` always count. A different one in ``out`` is refused.
        checkpoint: which of a fold's models is scored on its validation part: ``best``, the checkpoint
            callback's best (chosen on those very cells, so its score is biased upwards), or ``last``: every
            fold trains all its epochs (early stopping is taken out) and the last epoch's model is scored,
            which a comparison of recipes on the folds needs (nothing is chosen on the cells that judge).

    Returns:
        The :class:`CrossValidationReport` (also written as ``cv.json``).

    Raises:
        ConfigError: bad ``folds``, ``ensemble`` without a test split, a model and data of different kinds
            of target, or ``out`` holding another recipe's cross-validation.
        DatasetError: a class with fewer non-test images than ``folds``.

    Example:
        >>> import tempfile, transferkit as tk
        >>> dm = tk.ImageDataModule(source="digits", loader={"num_workers": 0}, split={"max_samples": 120},
        ...                         pipeline={"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "augment": "none"})
        >>> model = tk.TransferClassifier(num_classes=10, backbone="test_efficientnet", pretrained=False)
        >>> quiet = dict(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
        ...              enable_model_summary=False)
        >>> report = cross_validate(model, dm, folds=2, out=tempfile.mkdtemp(), trainer=quiet)
        >>> [f.fold for f in report.folds], sum(f.val_images for f in report.folds)
        ([0, 1], 96)
        >>> sorted(report.mean), report.oof_csv.name
        (['val_acc', 'val_f1', 'val_loss'], 'oof_predictions.csv')
    """
    folds = folds if folds is not None else datamodule.settings.split.cv_folds or DEFAULT_FOLDS
    seed = datamodule.seed if seed is None else int(seed)
    out = Path(out)
    task = _task_of(model, datamodule)
    # bad folds, and classes too small for them, are refused before anything is written or trained
    first = cv_split_indices(datamodule.data, folds, 0, datamodule.test_fraction, datamodule.seed)
    if ensemble and len(first["test"]) == 0:
        raise ConfigError(
            "ensemble=True scores the fold models on the test split, but the data holds none out "
            f"(test_fraction={datamodule.test_fraction}); set data.split.test_fraction > 0, or leave the ensemble out."
        )
    settings = getattr(model, "settings", None)  # a TransferClassifier's; another module has none
    if settings is not None and settings.prediction.fitted_after_training:
        warn(
            "model.prediction.calibrate / model.prediction.decision_threshold are fitted on the validation split, which "
            "cross-validation scores: the folds are left uncalibrated."
        )
    if checkpoint not in ("best", "last"):
        raise ConfigError(
            f"checkpoint is 'best' or 'last' (the last epoch's model, fixed epochs), got {checkpoint!r}."
        )
    runs = _FoldRuns(model, datamodule, folds, out, trainer, seed, checkpoint, task)
    fingerprint = _fingerprint(model, datamodule, trainer, folds, seed, recipe)
    if checkpoint != "best":
        fingerprint["checkpoint"] = checkpoint
    state = _load_or_start(out, fingerprint, _default_settings(model, datamodule))
    results: list[FoldResult] = []
    for fold in range(folds):
        done = state["finished"].get(str(fold))
        results.append(FoldResult.from_dict(done) if done is not None else runs.train(fold))
        if done is None:
            _save_state(out, state, results[-1])
    # the test split is touched only here, after training: each fold's best checkpoint, once
    for result in results if ensemble else []:
        if result.test is None:
            result.test = runs.score_test(result)
            _save_state(out, state, result)
    stored = [_load_arrays(runs.folder(fold) / PREDICTIONS_FILE) for fold in range(folds)]
    report = _summarise(results, stored, out, ensemble, task)
    if _is_global_zero():
        _write_summary(report, stored, datamodule.class_names, task)
    return report


def _task_of(model: Any, datamodule: ImageDataModule) -> Task:
    """The model's task (a single-label one over the data's classes for a module without one), refused
    when the data holds another kind of target."""
    task = getattr(model, "task", None)
    if not isinstance(task, Task):
        task = SingleLabel(datamodule.class_names)
    kind = getattr(datamodule, "target_kind", "single_label")
    if task.kind != kind:
        raise ConfigError(
            f"the model predicts {task.kind} targets but the data's data.target.kind is {kind}: give both the "
            "same kind (the model's target, the data's data.target.kind) before cross-validating."
        )
    return task


def cell_outcomes(
    arrays: Mapping[str, np.ndarray],
    split: str = "val",
    positive: Sequence[int] | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """What a paired comparison of two cross-validations pairs, from one fold's ``cv_predictions.npz`` (as
    ``np.load`` gives it): ``index``, the images ``(N,)`` (two runs pair a fold only when they hold the same
    images in the same order), and ``outcome``, one value per decision, higher is better, whose mean is the
    fold's ``figure``:

    ================  ===============================================  =====================  ==========
    kind              ``outcome``                                      ``figure``             ``binary``
    ================  ===============================================  =====================  ==========
    ``single_label``  the class right, per image ``(N,)``; with        accuracy               yes
                      ``positive`` (class indices), the group right:
                      the classes' summed probability >= 0.5 against
                      the truth's membership
    ``multi_label``   each label's decision right, per image and       label accuracy         yes
                      label ``(N * L,)``, image by image
    ``regression``    minus the absolute error, per image and target   minus the MAE          no
                      ``(N * T,)``; with ``threshold``, whether value
                      and truth fall on the same side of it
                      (``>= threshold``)                               (accuracy)             (yes)
    ================  ===============================================  =====================  ==========

    Binary outcomes of two runs pair cell by cell in McNemar's test; a regression's errors in a signed-rank
    test (Wilcoxon) of the paired differences. ``scored`` says in words what was scored.

    Example:
        >>> fold = {"val_index": np.array([4, 7]), "val_label": np.array([[0.2], [0.9]], dtype=np.float32),
        ...         "val_pred": np.array([[0.3], [0.45]], dtype=np.float32), "kind": np.asarray("regression")}
        >>> found = cell_outcomes(fold)
        >>> found["outcome"].round(2).tolist(), round(found["figure"], 3), found["binary"]
        ([-0.1, -0.45], -0.275, False)
        >>> cell_outcomes(fold, threshold=0.5)["outcome"].tolist()
        [True, False]
    """
    kind = str(arrays["kind"]) if "kind" in arrays else "single_label"
    labels, predicted = np.asarray(arrays[f"{split}_label"]), np.asarray(arrays[f"{split}_pred"])
    if positive and kind != "single_label" or threshold is not None and kind != "regression":
        raise ConfigError(
            f"positive (classes of a group) scores single-label runs and threshold scores regression runs; "
            f"these are {kind} predictions: leave {'positive' if positive else 'threshold'} out."
        )
    if kind == "single_label" and positive:
        truth = np.isin(labels, positive)
        outcome = (np.asarray(arrays[f"{split}_probs"])[:, list(positive)].sum(axis=1) >= 0.5) == truth
        scored = f"group of classes {list(positive)}"
    elif kind == "single_label":
        outcome, scored = predicted == labels, "class"
    elif kind == "multi_label":
        outcome, scored = ((predicted >= 1) == (labels >= 0.5)).reshape(-1), "label decision"
    elif threshold is not None:
        outcome = ((predicted >= threshold) == (labels >= threshold)).reshape(-1)
        scored = f"target on the same side of {threshold}"
    else:
        outcome, scored = (
            -np.abs(predicted.astype(np.float64) - labels).reshape(-1),
            "absolute error (negated)",
        )
    return {
        "index": np.asarray(arrays[f"{split}_index"]),
        "outcome": outcome,
        "figure": float(outcome.mean()),
        "binary": outcome.dtype == np.bool_,
        "scored": scored,
    }


class _FoldRuns:
    """Builds and runs one fold at a time: its data module, its copy of the model, its Trainer."""

    def __init__(
        self,
        model: L.LightningModule,
        datamodule: ImageDataModule,
        folds: int,
        out: Path,
        trainer: Mapping[str, Any] | Callable[[int, Path], L.Trainer] | None,
        seed: int,
        checkpoint: str = "best",
        task: Task | None = None,
    ) -> None:
        self.model, self.datamodule, self.folds, self.out = model, datamodule, folds, out
        self.trainer, self.seed, self.checkpoint = trainer, seed, checkpoint
        self.task = task if task is not None else _task_of(model, datamodule)
        self.figures = figure_names(self.task)

    def folder(self, fold: int) -> Path:
        return self.out / f"fold_{fold}"

    def data(self, fold: int) -> ImageDataModule:
        settings = self.datamodule.settings
        # the folds share one cache folder: decoded images are the same files in every fold
        settings = settings.replace(
            split={"cv_folds": self.folds, "cv_fold": fold},
            cache={"dir": settings.cache.dir or str(self.out / "cache")},
        )
        return type(self.datamodule)(**settings.init_args())

    def build_trainer(self, fold: int) -> L.Trainer:
        folder = self.folder(fold)
        if callable(self.trainer):
            made = self.trainer(fold, folder)
        else:
            kwargs = dict(self.trainer or {})
            # callbacks hold state (a checkpoint's best, early stopping's patience): one set per fold
            kwargs["callbacks"] = copy.deepcopy(kwargs.get("callbacks"))
            made = Trainer(**{**kwargs, "default_root_dir": str(folder)})
        if self.checkpoint == "last":  # fixed epochs: nothing stops a fold on the cells that score it
            made.callbacks = [c for c in made.callbacks if not isinstance(c, EarlyStopping)]
        if made.checkpoint_callback is not None:
            # one folder per fold that every attempt writes to: a resumed fit finds its checkpoints there
            # and the callback restores its best (Lightning drops the best when the folder changes)
            made.checkpoint_callback.dirpath = str(folder / "checkpoints")
        return made

    def train(self, fold: int) -> FoldResult:
        """Fit fold ``fold`` (resuming from its latest checkpoint if there is one), score its best checkpoint
        on its validation part, and write its run's files."""
        folder = self.folder(fold)
        data, model, trainer = self.data(fold), copy.deepcopy(self.model), self.build_trainer(fold)
        resume = _latest_checkpoint(folder / "checkpoints")
        L.seed_everything(self.seed, workers=True, verbose=False)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data, ckpt_path=resume)
        fit_seconds = time.perf_counter() - start
        if trainer.interrupted:
            raise KeyboardInterrupt(
                f"cross-validation stopped in fold {fold}; run it again with the same out ('{self.out}') "
                "to resume from this fold's last checkpoint."
            )
        callback = trainer.checkpoint_callback
        if self.checkpoint == "last":
            best = getattr(callback, "last_model_path", "") or _latest_checkpoint(folder / "checkpoints")
        else:
            best = getattr(callback, "best_model_path", "") or _latest_checkpoint(folder / "checkpoints")
        validated = trainer.validate(model, datamodule=data, ckpt_path=best, verbose=False)
        figures = {k: float(v) for k, v in (validated[0] if validated else {}).items()}
        missing = [name for name in self.figures if name not in figures]
        if missing:
            raise ConfigError(
                f"fold {fold}'s validation logged no {', '.join(missing)}; cross_validate needs a module that "
                f"logs {', '.join(self.figures)} (as a {self.task.kind} TransferClassifier does)."
            )
        # validate loaded the best weights
        arrays = _predictions(model, data, "val", trainer.strategy.root_device, self.task)
        sizes = {split: len(indices) for split, indices in data.split_indices.items()}
        result = FoldResult(
            fold=fold,
            figures={name: figures[name] for name in self.figures},
            train_images=sizes["train"],
            val_images=sizes["val"],
            epochs=int(trainer.current_epoch),
            best_checkpoint=best,
            run_dir=str(Path(trainer.log_dir or trainer.default_root_dir)),
        )
        # every process writes the same file (atomically): each then reads back what it wrote
        _save_arrays(folder / PREDICTIONS_FILE, arrays)
        if trainer.is_global_zero:
            score = getattr(callback, "best_model_score", None)
            metrics = {
                "val": {name: figures[name] for name in self.figures},
                "test": {},
                "best_checkpoint": best,
                "monitor": getattr(callback, "monitor", None),
                "best_score": float(score) if score is not None else None,
                "epochs": result.epochs,
                "global_steps": int(trainer.global_step),
                "fit_seconds": round(fit_seconds, 2),
                "class_names": data.class_names,
                "split_sizes": sizes,
                "cross_validation": {"fold": fold, "folds": self.folds, "summary": str(self.out / "cv.json")},
            }
            if hasattr(model, "task"):  # as finetune's metrics.json says it
                metrics["target"] = model.task.describe()
            _write_fold_run(trainer, model, data, metrics, result)
        return result

    def score_test(self, result: FoldResult) -> dict[str, float]:
        """Score a trained fold's best checkpoint on the test split: its test figures (also added to the
        fold's ``metrics.json``) and its class probabilities, stored beside its validation ones."""
        checkpoint = result.best_checkpoint
        if not checkpoint or not Path(checkpoint).is_file():
            raise ConfigError(
                f"fold {result.fold}'s checkpoint '{checkpoint}' is gone, so it cannot join the test ensemble; "
                f"restore it, or delete '{self.folder(result.fold)}' and the fold's entry in "
                f"'{self.out / STATE_FILE}' to train the fold again."
            )
        data, model, trainer = (
            self.data(result.fold),
            copy.deepcopy(self.model),
            self.build_trainer(result.fold),
        )
        tested = trainer.test(model, datamodule=data, ckpt_path=checkpoint, verbose=False)
        names = figure_names(self.task, "test")
        test = {k: float(v) for k, v in (tested[0] if tested else {}).items() if k in names}
        path = self.folder(result.fold) / PREDICTIONS_FILE
        probabilities = _predictions(model, data, "test", trainer.strategy.root_device, self.task)
        _save_arrays(path, _load_arrays(path) | probabilities)
        metrics_path = Path(result.run_dir) / "metrics.json"
        if trainer.is_global_zero and metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text()) | {"test": test}
            atomic_write(metrics_path, json.dumps(metrics, indent=2) + "\n", what="fold metrics")
        return test


def _save_state(out: Path, state: dict[str, Any], result: FoldResult) -> None:
    state["finished"][str(result.fold)] = result.to_dict()
    if _is_global_zero():
        atomic_write(out / STATE_FILE, json.dumps(state, indent=2) + "\n", what="cross-validation state")


def _latest_checkpoint(folder: Path) -> str | None:
    """The newest of the fold's ``last.ckpt`` and ``interrupted.ckpt`` (what a resumed fit continues from)."""
    found = [p for p in (folder / "last.ckpt", folder / "interrupted.ckpt") if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


@torch.no_grad()
def _predictions(
    model: Any, data: ImageDataModule, split: str, device: Any, task: Task | None = None
) -> dict[str, np.ndarray]:
    """``<split>_index``, ``_label`` (the truth), ``_probs`` ``(N, K)`` (the scores: class or label
    probabilities, values), ``_pred`` (classes ``(N,)``, 0/1 labels or values ``(N, K)``), and ``_file`` for
    image files, of a split, predicted as the model predicts (eval mode, its own test-time augmentation);
    for the kinds other than single label, ``kind`` and (labels) the ``thresholds`` the decisions used."""
    index = np.asarray(data.split_indices[split], dtype=np.int64)
    loader = data.val_dataloader() if split == "val" else data.test_dataloader()
    was_training, original = model.training, next(model.parameters()).device
    model.to(device).eval()
    probs, predicted = [], []
    try:
        for images, _ in loader:
            images = images.to(device)
            batch = (
                model.predict_proba(images) if hasattr(model, "predict_proba") else model(images).softmax(-1)
            )
            probs.append(batch.float().cpu())
            labels = model.predict_labels(batch) if hasattr(model, "predict_labels") else batch.argmax(-1)
            predicted.append(labels.cpu())
    finally:
        model.to(original).train(was_training)
    kind = task.kind if task is not None else "single_label"
    truth_type, decision_type = _ARRAY_TYPES[kind]
    arrays = {
        f"{split}_index": index,
        f"{split}_label": np.asarray(data.data.labels[index], dtype=truth_type),
        f"{split}_probs": torch.cat(probs).numpy(),
        f"{split}_pred": torch.cat(predicted).numpy().astype(decision_type),
    }
    if kind != "single_label":  # single-label files stay as they have always been written
        arrays["kind"] = np.asarray(kind)
        thresholds = getattr(task, "thresholds", None)
        if thresholds is not None:
            arrays["thresholds"] = np.asarray(
                thresholds(getattr(model, "calibration", None)), dtype=np.float32
            )
    items = [data.data.items[i] for i in index]
    if items and isinstance(items[0], str):
        arrays[f"{split}_file"] = np.asarray(items, dtype=str)
    return arrays


# a fold's stored arrays per kind: the truth's type and the decision's (class indices, 0/1 labels, values)
_ARRAY_TYPES: dict[str, tuple[type, type]] = {
    "single_label": (np.int64, np.int64),
    "multi_label": (np.float32, np.int64),
    "regression": (np.float32, np.float32),
}


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # in memory first: a failure never leaves a half-written file
    atomic_write(path, buffer.getvalue(), what="fold predictions")


def _write_fold_run(
    trainer: L.Trainer,
    model: L.LightningModule,
    data: ImageDataModule,
    metrics: dict[str, Any],
    result: FoldResult,
) -> None:
    """The fold's ``metrics.json`` and run report, with a section on its place in the cross-validation."""
    from transferkit.reporting.run_report import write_run_report

    run_dir = Path(result.run_dir)
    atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n", what="fold metrics")
    try:
        # a fold's report must not score the test split: it sees a data module without one
        report = write_run_report(
            trainer, model, _TestSplitWithheld(data), {**metrics, "run_dir": str(run_dir)}
        )
    except Exception as err:  # the fold is trained and scored; a missing picture must not stop the run
        warn(f"fold {result.fold}'s run report could not be written: {err}")
        return
    summary = os.path.relpath(metrics["cross_validation"]["summary"], run_dir)
    figures = ", ".join(
        f"{_spelled(name.removeprefix('val_'))} {v:.4f}" for name, v in result.figures.items()
    )
    section = (
        f"\n## Cross-validation\n\nFold {result.fold} of {metrics['cross_validation']['folds']}: trained on "
        f"{result.train_images} images, validated on the {result.val_images} of part {result.fold}. Best "
        f"checkpoint on them: {figures}. All folds: [{Path(summary).name}]({summary}).\n"
    )
    atomic_write(report, report.read_text() + section, what="run report")


class _TestSplitWithheld:
    """A fold's data module as its run report sees it: no test split (no dataset, no indices, no loader),
    so the report leaves its test sections out, saying why, instead of scoring it."""

    def __init__(self, datamodule: ImageDataModule) -> None:
        self._datamodule = datamodule
        self.datasets = {k: v for k, v in datamodule.datasets.items() if k != "test"}
        self.split_indices = {k: v for k, v in (datamodule.split_indices or {}).items() if k != "test"}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._datamodule, name)

    def test_dataloader(self) -> Any:
        raise RuntimeError(
            "a cross-validation fold's report leaves the test split out; the fold's figures on its validation "
            "part are in metrics.json (and its test figures, with ensemble=True / --ensemble)"
        )

    predict_dataloader = test_dataloader


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConfigError(
            f"'{path}' is missing: its fold is recorded as finished but its predictions are gone. Delete the "
            f"fold's folder and its entry in '{path.parent.parent / STATE_FILE}' to train it again."
        )
    with np.load(path, allow_pickle=False) as stored:
        return dict(stored)


def _summarise(
    results: list[FoldResult],
    stored: list[dict[str, np.ndarray]],
    out: Path,
    ensemble: bool,
    task: Task | None = None,
) -> CrossValidationReport:
    """Mean and std of the folds' figures, the pooled out-of-fold figures, the test ensemble's."""
    task = task if task is not None else SingleLabel([])
    figures = figure_names(task)
    values = {name: [r.figures[name] for r in results] for name in figures}
    if ensemble:
        tested = figure_names(task, "test")
        values |= {name: [r.test[name] for r in results] for name in tested if name in results[0].test}
    mean = {name: float(np.mean(v)) for name, v in values.items()}
    std = {name: float(np.std(v, ddof=1)) for name, v in values.items()}  # folds >= 2
    pooled = {key: np.concatenate([s[f"val_{key}"] for s in stored]) for key in ("label", "probs", "pred")}
    single = task.kind == "single_label"
    report = CrossValidationReport(
        folds=results,
        mean=mean,
        std=std,
        out=out,
        oof_csv=out / "oof_predictions.csv",
        # single label: the share of classes right, as it has always been computed
        oof_accuracy=float((pooled["label"] == pooled["pred"]).mean()) if single else None,
        kind=task.kind,
        figures=figures,
    )
    report.oof = (
        {"acc": report.oof_accuracy}
        if single
        else _pooled_figures(task, pooled["label"], pooled["probs"], pooled["pred"])
    )
    if "thresholds" in stored[0]:
        report.thresholds = [round(float(t), 6) for t in stored[0]["thresholds"]]
    if ensemble:
        truth = stored[0]["test_label"]  # every fold holds out the same test split
        averaged, decided = _ensemble(task, stored)
        if single:
            report.ensemble_test_acc = float((decided == truth).mean())
            report.mean_fold_test_acc = mean.get("test_acc")
            report.ensemble_test = {"acc": report.ensemble_test_acc}
        else:
            report.ensemble_test = _pooled_figures(task, truth, averaged, decided)
        report.ensemble_csv = out / "ensemble_test_predictions.csv"
        report.test_images = len(truth)
    return report


def _ensemble(task: Task, stored: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The fold models' scores on the test split averaged (class or label probabilities, values), and what
    the task decides from them (the most probable class; each label at the thresholds the folds used)."""
    averaged = np.mean([s["test_probs"] for s in stored], axis=0)
    if task.kind == "single_label":
        return averaged, averaged.argmax(axis=1)
    calibration = None
    if "thresholds" in stored[0]:
        calibration = Calibration(label_thresholds=[float(t) for t in stored[0]["thresholds"]])
    decided = task.decide(torch.as_tensor(averaged), calibration).numpy()
    return averaged, decided.astype(stored[0]["test_pred"].dtype)


def _pooled_figures(
    task: Task, truth: np.ndarray, scores: np.ndarray, decided: np.ndarray
) -> dict[str, float]:
    """The task's metrics (without a prefix: ``map``, ``f1_macro`` ... / ``mae``, ``rmse``, ``r2``) of pooled
    predictions: the ``scores`` a user reads and the ``decided`` predictions, against ``truth``."""
    metrics = task.metrics("")
    task.update(metrics, torch.as_tensor(scores), torch.as_tensor(truth), torch.as_tensor(decided))
    computed = {name: float(value) for name, value in metrics.compute().items()}
    return {name: computed[name] for name in task.metric_names}


def _write_summary(
    report: CrossValidationReport,
    stored: list[dict[str, np.ndarray]],
    names: list[str],
    task: Task | None = None,
) -> None:
    """``cv.json``, ``cv.csv``, the out-of-fold predictions and (with an ensemble) its test predictions."""
    out = report.out
    atomic_write(
        out / "cv.json", json.dumps(report.to_dict(), indent=2) + "\n", what="cross-validation summary"
    )
    tested = [f"test_{name.removeprefix('val_')}" for name in report.figures]
    columns = [
        "fold",
        "train_images",
        "val_images",
        *report.figures,
        *(f for f in tested if f in report.mean),
    ]
    table = [columns]
    for f in report.folds:
        table.append([f.fold, f.train_images, f.val_images, *(_figure(f, name) for name in columns[3:])])
    for name, values in (("mean", report.mean), ("std", report.std)):
        table.append([name, "", "", *(values[c] for c in columns[3:])])
    atomic_write(out / "cv.csv", _csv_text(table), what="cross-validation table")
    rows_of = _ROWS[report.kind].rows
    oof = [rows_of(s, "val", names, r.fold) for s, r in zip(stored, report.folds, strict=True)]
    rows = sorted((row for rows in oof for row in rows), key=lambda row: row[0])
    atomic_write(
        report.oof_csv,
        _csv_text([_prediction_header(stored[0], "val", names, report.kind), *rows]),
        what="out-of-fold predictions",
    )
    if report.ensemble_csv is not None:
        averaged, decided = _ensemble(task if task is not None else SingleLabel(names), stored)
        first = stored[0] | {"test_probs": averaged, "test_pred": decided}
        header = _prediction_header(first, "test", names, report.kind)
        text = _csv_text([header, *rows_of(first, "test", names, None)])
        atomic_write(report.ensemble_csv, text, what="ensemble test predictions")


def _figure(result: FoldResult, name: str) -> float:
    return result.figures[name] if name in result.figures else (result.test or {}).get(name, math.nan)


def _prediction_header(
    stored: dict[str, np.ndarray], split: str, names: list[str], kind: str = "single_label"
) -> list[str]:
    file = ["file"] if f"{split}_file" in stored else []
    fold = ["fold"] if split == "val" else []
    truth, predicted = _ROWS[kind].columns(names)
    return ["index", *file, *truth, *fold, *predicted]


def _prediction_rows(
    stored: dict[str, np.ndarray], split: str, names: list[str], fold: int | None = None
) -> list[list[Any]]:
    """One row per image: its index in the data module, file (if any), true label, fold (out-of-fold
    rows), predicted class and the probability of each class."""
    files = stored.get(f"{split}_file")
    rows = []
    for k, index in enumerate(stored[f"{split}_index"]):
        row: list[Any] = [int(index), *([str(files[k])] if files is not None else [])]
        row += [names[int(stored[f"{split}_label"][k])], *([fold] if fold is not None else [])]
        row += [names[int(stored[f"{split}_pred"][k])], *(f"{p:.6f}" for p in stored[f"{split}_probs"][k])]
        rows.append(row)
    return rows


def _label_rows(
    stored: dict[str, np.ndarray], split: str, names: list[str], fold: int | None = None
) -> list[list[Any]]:
    """One row per image of a multi-label run: index, file (if any), its labels and the predicted ones
    (names joined by ``;``, as a CSV of labels gives them), fold, each label's truth (0/1) and probability."""
    files = stored.get(f"{split}_file")
    rows = []
    for k, index in enumerate(stored[f"{split}_index"]):
        truth, predicted = stored[f"{split}_label"][k] >= 0.5, stored[f"{split}_pred"][k] >= 1
        row: list[Any] = [int(index), *([str(files[k])] if files is not None else [])]
        row += [
            ";".join(n for n, on in zip(names, truth, strict=True) if on),
            *([fold] if fold is not None else []),
        ]
        row += [";".join(n for n, on in zip(names, predicted, strict=True) if on), *(int(t) for t in truth)]
        rows.append(row + [f"{p:.6f}" for p in stored[f"{split}_probs"][k]])
    return rows


def _value_rows(
    stored: dict[str, np.ndarray], split: str, names: list[str], fold: int | None = None
) -> list[list[Any]]:
    """One row per image of a regression run: index, file (if any), each target's true value, fold, and
    each target's predicted value, in the targets' units."""
    files = stored.get(f"{split}_file")
    rows = []
    for k, index in enumerate(stored[f"{split}_index"]):
        row: list[Any] = [int(index), *([str(files[k])] if files is not None else [])]
        row += [f"{v:.7g}" for v in stored[f"{split}_label"][k]] + ([fold] if fold is not None else [])
        rows.append(row + [f"{v:.7g}" for v in stored[f"{split}_pred"][k]])
    return rows


class _Rows(NamedTuple):
    """A prediction file's columns for one kind: those before the fold (the truth) and after it (the
    prediction and scores), given the output names; and the rows."""

    columns: Callable[[list[str]], tuple[list[str], list[str]]]
    rows: Callable[..., list[list[Any]]]


# what one image's prediction row holds, per kind of target (the module's table)
_ROWS = {
    "single_label": _Rows(
        lambda names: (["label"], ["predicted", *(f"p_{n}" for n in names)]), _prediction_rows
    ),
    "multi_label": _Rows(
        lambda names: (["labels"], ["predicted", *(f"true_{n}" for n in names), *(f"p_{n}" for n in names)]),
        _label_rows,
    ),
    "regression": _Rows(
        lambda names: ([f"true_{n}" for n in names], [f"predicted_{n}" for n in names]), _value_rows
    ),
}


def _csv_text(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


# --- resuming --------------------------------------------------------------------------------------


def _fingerprint(
    model: Any, datamodule: ImageDataModule, trainer: Any, folds: int, seed: int, recipe: Mapping | None
) -> dict[str, Any]:
    """What makes two cross-validations the same run, as plain JSON values."""
    # '_instantiator' and the like: how an object was built (from Python or a recipe), not what it is
    data = datamodule.given_settings.to_dict()
    data["cache"].pop("dir")  # where it is stored and how many workers load it: not what the data is
    data["loader"].pop("num_workers")
    data["split"] = {k: v for k, v in data["split"].items() if k not in ("cv_folds", "cv_fold")}
    found: dict[str, Any] = {
        "folds": folds,
        "seed": seed,
        "model": model.settings.to_dict()
        if hasattr(model, "settings")
        else dict(getattr(model, "hparams", {})),
        "data": data,
        "images": _images_digest(datamodule.data),
    }
    if isinstance(trainer, Mapping):
        found["trainer"] = {k: v for k, v in trainer.items() if k not in _TRAINER_HOW}
    if recipe:
        found["recipe"] = dict(recipe)
    return json.loads(json.dumps(found, default=_plain, sort_keys=True))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    # an object's repr without its memory address, which differs from run to run
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _images_digest(data: Any) -> str:
    """The images listed and their labels, hashed: a folder that gained or lost images is another run."""
    kind = getattr(data, "kind", "single_label")
    if kind == "single_label":  # class indices, hashed as every single-label run's digest always was
        digest = hashlib.sha256(np.asarray(data.labels, dtype=np.int64).tobytes())
    else:  # 0/1 labels or numbers: every value counts, and so does the kind
        digest = hashlib.sha256(kind.encode() + np.asarray(data.labels, dtype=np.float64).tobytes())
    digest.update(str(len(data.items)).encode())
    for item in data.items:
        if isinstance(item, str):
            digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:16]


def _default_settings(model: Any, datamodule: Any = None) -> dict[str, Any]:
    """The model's and the data's settings at their defaults, flat as in a fingerprint
    (``model.loss.class_weights``, ``data.target.kind`` ...)."""
    defaults: dict[str, Any] = {}
    settings = getattr(model, "settings", None)
    if settings is not None:
        kind = {"target": settings.target} if hasattr(settings, "target") else {}
        defaults["model"] = type(settings).build(num_classes=settings.num_classes, **kind).to_dict()
    given = getattr(datamodule, "given_settings", None)
    if given is not None:
        defaults["data"] = type(given).build().to_dict()
    return _flatten(json.loads(json.dumps(defaults, default=_plain, sort_keys=True))) if defaults else {}


def _load_or_start(
    out: Path, fingerprint: dict[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The stored state of the cross-validation in ``out``, or a new one (written at once, so that an
    unfinished first fold is protected too); refuses a state written for another recipe. A setting the
    stored recipe lacks (added to transferkit since) matches when it is at its default (``defaults``)."""
    path = out / STATE_FILE
    if path.is_file():
        state = json.loads(path.read_text())
        # nothing finished and no checkpoint to resume from (e.g. the first fold failed at set-up): a
        # changed recipe has nothing to conflict with, and starts over
        untouched = not state.get("finished") and not any(out.glob("fold_*/checkpoints/*.ckpt"))
        stored_data = (state.get("recipe") or {}).get("data") or {}
        if not untouched and any(key in stored_data for key in FLAT_DATA_KEYS):
            raise ConfigError(
                f"'{out}' holds a cross-validation started by an earlier transferkit, which recorded its recipe "
                "with flat settings; this version cannot tell whether the recipe is the same, so it does not "
                f"resume it. Give another out folder (--out), or delete '{out}' to start over."
            )
        same = not _differences(state.get("recipe") or {}, fingerprint, defaults=defaults)
        if not same and not untouched:
            changes = _differences(state.get("recipe") or {}, fingerprint, defaults=defaults)
            raise ConfigError(
                f"'{out}' holds a cross-validation of another recipe ({'; '.join(changes)}), so its folds cannot "
                "be resumed with this one. Run with the recipe it was started with to resume it, give another "
                f"out folder (--out), or delete '{out}' to start over."
            )
        if same:
            return state
    state = {"recipe": fingerprint, "finished": {}}
    if _is_global_zero():
        atomic_write(path, json.dumps(state, indent=2) + "\n", what="cross-validation state")
    return state


def _differences(
    stored: dict[str, Any], now: dict[str, Any], shown: int = 4, defaults: Mapping[str, Any] | None = None
) -> list[str]:
    flat_stored, flat_now = _flatten(stored), _flatten(now)
    for key, value in (defaults or {}).items():  # a setting added since, at its default, is no change
        if key not in flat_stored and flat_now.get(key, "<unset>") == value:
            flat_stored[key] = value
    keys = sorted(set(flat_stored) | set(flat_now))
    changed = [
        f"{key}: {flat_stored.get(key, '<unset>')!r} then, {flat_now.get(key, '<unset>')!r} now"
        for key in keys
        if flat_stored.get(key, "<unset>") != flat_now.get(key, "<unset>")
    ]
    more = [f"and {len(changed) - shown} more"] if len(changed) > shown else []
    return changed[:shown] + more


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat |= _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return flat
    return {prefix: value}


def _is_global_zero() -> bool:
    # under DDP every process runs cross_validate; only the first writes the shared files
    return getattr(rank_zero_only, "rank", 0) == 0
