"""What a run leaves to look at: ``report.md`` with learning curves, the test split's figures (a confusion
matrix, a per-label table, or predicted against true) and an augmentation preview.

:meth:`transferkit.Trainer.finetune` calls :func:`write_run_report` after testing the best checkpoint; the
run directory (``trainer.log_dir``, or ``default_root_dir`` when logging is off) then holds::

    config.yaml               the resolved recipe (runs started from the command line)
    metrics.csv               every logged metric, per step and epoch (CSVLogger)
    metrics.json              the final figures
    learning_curves.png       loss and accuracy per epoch, train vs validation, unfreeze points dashed (the
                              other kinds of target: their validation scores, e.g. val_map, val_mae)
    confusion_matrix.png      one class per image: the best checkpoint on the test split
    label_confusion.png       several labels per image: each label's 2 x 2 confusion at its threshold, beside
                              the per-label table (AP, AUROC, F1, precision, recall, the thresholds)
    predicted_vs_true_<target>.png  numbers: predicted against true per target, beside the table of MAE,
                              RMSE and R^2 in the targets' own units
    augmentation_preview.png  a few training images through the real train pipeline
    top_losses.png, most_confident.png, confusion_normalised.png, reliability.png, roc_pr.png (two
                              classes), interpretation.json/.md: the test split interpreted
                              (:func:`transferkit.reporting.interpretation.interpret`; the other kinds:
                              top losses or largest errors with Grad-CAM)
    report.md                 all of the above, linked, with every test figure the terminal prints (the
                              class groups' too, with their table and confusion_groups.png), best epoch
                              and train time

A picture that cannot be drawn is reported as a warning in ``report.md``; it never fails the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import transferkit.reporting.plots as plots
from transferkit.files import atomic_write
from transferkit.models.calibration import Calibration
from transferkit.reporting.interpretation import (
    draw_label_confusion,
    draw_predicted_vs_true,
    interpret,
    interpretation_markdown,
    label_summary,
    label_thresholds,
    per_label_markdown,
    per_label_table,
    per_target_markdown,
    per_target_table,
    scatter_name,
)
from transferkit.reporting.previews import target_text

__all__ = ["PREVIEW_IMAGES", "PREVIEW_VIEWS", "test_predictions", "write_run_report"]

PREVIEW_IMAGES = 4  # training images in the report's augmentation preview
PREVIEW_VIEWS = 4  # augmented views of each

# the test figures the report names in words; any other one is shown under its logged name
TEST_FIGURES = {
    "test_acc": "test accuracy",
    "test_f1": "test macro-F1",
    "test_loss": "test loss",
    "test_group_acc": "test accuracy of the class groups",
    "test_group_f1": "test macro-F1 of the class groups",
    "test_map": "test mAP (mean average precision over labels)",
    "test_f1_macro": "test macro-F1 over labels",
    "test_f1_micro": "test micro-F1 over labels",
    "test_auroc": "test AUROC (mean over labels)",
    "test_mae": "test MAE",
    "test_rmse": "test RMSE",
    "test_r2": "test R^2",
}


# --- run report ------------------------------------------------------------------------------------


def write_run_report(trainer: Any, model: Any, datamodule: Any, results: dict[str, Any]) -> Path:
    """Draw the run's pictures and write ``report.md`` into the run directory; returns its path.

    Args:
        trainer: the Trainer that ran ``fit`` and ``test`` (its ``log_dir``, loggers, checkpoint callback).
        model: the module, holding the best checkpoint's weights (``test`` loaded them).
        datamodule: the data module (test split for the confusion matrix, train pipeline for the preview);
            ``None`` leaves those pictures out with a warning.
        results: what :meth:`~transferkit.Trainer.finetune` returns (test metrics, best checkpoint, times).

    A picture that fails is listed under "Warnings" in the report instead of raising.
    """
    run_dir = Path(results.get("run_dir") or trainer.log_dir or trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    drawn: dict[str, Path] = {}

    def attempt(name: str, draw: Any) -> bool:
        try:
            drawn[name] = draw(run_dir / name)
            return True
        except Exception as err:
            problems.append(f"`{name}` was not drawn: {type(err).__name__}: {err}")
            return False

    kind = _kind(model, datamodule, results)
    metrics_csv = _metrics_csv(trainer)
    attempt("learning_curves.png", lambda path: _draw_learning_curves(metrics_csv, path, model))
    # the checkpoint callback's best; without a monitored metric (no validation split), the last epoch's
    checkpoint = "best" if results.get("monitor") is not None else "tested"
    section = _KINDS[kind].test_section(
        _TestSplit(trainer, model, datamodule, results, checkpoint, attempt, problems)
    )
    attempt("augmentation_preview.png", lambda path: _draw_augmentation(datamodule, path, kind))
    interpretation = _interpret_test_split(model, datamodule, run_dir, problems)

    best_epoch = _best_epoch(results.get("best_checkpoint"))
    text = _markdown(
        run_dir, model, datamodule, results, metrics_csv, drawn, section, best_epoch, problems, kind
    )
    if interpretation is not None:
        # the kinds' tables are in the test section already (from the test loop); shown here if it failed
        text += "\n" + interpretation_markdown(interpretation, run_dir, level=2, tables=not section.shown)
    return atomic_write(run_dir / "report.md", text, what="run report")


class _TestSplit(NamedTuple):
    """What a kind's test section reads: the run, ``attempt`` (draw a picture, or list why not: whether it
    drew) and the report's ``problems``."""

    trainer: Any
    model: Any
    datamodule: Any
    results: dict[str, Any]
    checkpoint: str  # "best", or "tested" (the last epoch's, without a monitored metric)
    attempt: Callable[[str, Callable[[Path], Path]], bool]
    problems: list[str]


class _Section(NamedTuple):
    """A kind's section of the test split: its markdown, whether its figures were computed, and figures to
    compare with the test loop's (what, value, test metric) -- a difference means the model in memory is
    not the tested one."""

    lines: list[str]
    shown: bool
    checks: list[tuple[str, float, str]]


def _interpret_test_split(model: Any, datamodule: Any, run_dir: Path, problems: list[str]) -> Any:
    """Top losses with Grad-CAM, per-class table, normalised confusion and calibration of the test split
    (:func:`~transferkit.reporting.interpretation.interpret`), from the logits the test loop kept."""
    if datamodule is None or "test" not in (getattr(datamodule, "datasets", None) or {}):
        problems.append("the interpretation sections were not written: no data module with a test split.")
        return None
    scoring = getattr(model, "scoring", None)  # a TransferClassifier's: what its test loop kept
    recorded = getattr(scoring, "test_predictions", None)
    logits = getattr(scoring, "test_view_logits", None)
    outputs = None
    if recorded is not None and logits is not None and len(recorded[0]) == _test_size(datamodule):
        outputs = (logits, torch.as_tensor(recorded[0]))  # all of the split (not one DDP share of it)
    try:
        return interpret(model, datamodule, "test", out=run_dir, outputs=outputs)
    except Exception as err:
        problems.append(f"the interpretation sections were not written: {type(err).__name__}: {err}")
        return None


def _metrics_csv(trainer: Any) -> Path | None:
    from lightning.pytorch.loggers import CSVLogger

    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, CSVLogger):
            return Path(logger.log_dir) / "metrics.csv"
    return None


def _draw_learning_curves(metrics_csv: Path | None, path: Path, model: Any) -> Path:
    if metrics_csv is None:
        raise RuntimeError(
            "no per-epoch metrics: the run had no CSVLogger (trainer.logger is off or set to other loggers); "
            "leave trainer.logger at its default (true) or add a CSVLogger to draw them."
        )
    name = getattr(getattr(model, "backbone", None), "name", type(model).__name__)
    scores, label = _score_curves(getattr(model, "task", None))
    # unfreeze points come from the logged trainable_groups (unfreeze_epochs=None)
    return plots.learning_curves(
        metrics_csv, path, title=f"{name}: learning curves", scores=scores, score_label=label
    )


def _score_curves(task: Any) -> tuple[list[str] | None, str]:
    """The second panel of the learning curves: accuracy (``None``: the plot's own) for a task that scores
    it; else the task's training score and its validation metrics that improve the same way as its first
    (a multi-label model's mAP, F1 and AUROC; a regression's MAE and RMSE, in the targets' units)."""
    names = getattr(task, "metric_names", ("acc",))
    if "acc" in names:
        return None, "accuracy"
    better = task.higher_is_better[names[0]]
    validation = [f"val_{m}" for m in names if task.higher_is_better[m] == better]
    return [task.train_metric, *validation], "higher is better" if better else "lower is better"


def test_predictions(model: Any, datamodule: Any, device: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted targets on the data module's test split, as the test loop predicts them (eval mode,
    the model's own test-time augmentation and thresholds): class indices ``(N,)``, 0/1 labels ``(N, L)`` or
    numbers ``(N, T)``, as the model's kind of target gives them."""
    truth, predicted, _ = _predict_test(model, datamodule, device)
    return truth, predicted


@torch.no_grad()
def _predict_test(model: Any, datamodule: Any, device: Any = None) -> tuple[np.ndarray, ...]:
    """Truth, prediction and scores (probabilities or values) of the test split, predicted here."""
    was_training = model.training
    original = next(model.parameters()).device
    device = torch.device(device) if device is not None else original
    model.to(device).eval()
    truth, predicted, scores = [], [], []
    try:
        for images, labels in datamodule.test_dataloader():
            probs = model.predict_proba(images.to(device))
            predicted.append(model.predict_labels(probs).cpu())
            scores.append(probs.float().cpu())
            truth.append(labels.cpu())
    finally:
        model.to(original).train(was_training)
    return torch.cat(truth).numpy(), torch.cat(predicted).numpy(), torch.cat(scores).numpy()


def _test_outputs(
    trainer: Any, model: Any, datamodule: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Truth, prediction and scores of the test split: what the test loop kept when it saw all of it, else
    (e.g. each DDP process tested a share of the split) predicted here."""
    if datamodule is None or not hasattr(datamodule, "test_dataloader"):
        raise RuntimeError("no data module with a test split was given to finetune.")
    scoring = getattr(model, "scoring", None)
    recorded = getattr(scoring, "test_predictions", None)
    if recorded is not None and len(recorded[0]) == _test_size(datamodule):
        return recorded[0], recorded[1], getattr(scoring, "test_scores", None)
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return _predict_test(model, datamodule, device)


def _test_size(datamodule: Any) -> int | None:
    try:
        return len(datamodule.test_dataloader().dataset)
    except (TypeError, AttributeError):
        return None


def _draw_confusion(trainer: Any, model: Any, datamodule: Any, path: Path, out: dict[str, Any]) -> Path:
    truth, predicted, _ = _test_outputs(trainer, model, datamodule)
    names = list(getattr(model, "class_names", None) or range(int(max(truth.max(), predicted.max()) + 1)))
    out["accuracy"] = float((truth == predicted).mean()) if truth.size else math.nan
    out["samples"] = int(truth.size)
    return plots.confusion_matrix_plot(
        truth,
        predicted,
        names,
        path,
        title=f"test split, {out['checkpoint']} checkpoint\naccuracy {out['accuracy']:.3f} ({truth.size} images)",
    )


def _confusion_section(split: _TestSplit) -> _Section:
    """One class per image: the test split's confusion matrix (counts)."""
    confusion: dict[str, Any] = {"checkpoint": split.checkpoint}
    drawn = split.attempt(
        "confusion_matrix.png",
        lambda path: _draw_confusion(split.trainer, split.model, split.datamodule, path, confusion),
    )
    heading = f"Confusion matrix (test split, {split.checkpoint} checkpoint)"
    lines = ["", f"## {heading}", ""]
    if drawn:
        lines += [f"![{heading}](confusion_matrix.png)", "", "Rows: true class; columns: predicted."]
    else:
        lines.append("Not drawn; see Warnings.")
    accuracy = confusion.get("accuracy")
    checks = [("the confusion matrix's accuracy", accuracy, "test_acc")] if accuracy is not None else []
    return _Section(lines, drawn, checks)


def _labels_section(split: _TestSplit) -> _Section:
    """Several labels per image: the per-label table at the stored thresholds, and each label's 2 x 2."""
    lines = ["", f"## Per label (test split, {split.checkpoint} checkpoint)", ""]
    try:
        truth, predicted, scores = _test_outputs(split.trainer, split.model, split.datamodule)
        if scores is None:
            raise RuntimeError("the test loop kept no label probabilities.")
        names = [str(n) for n in split.model.class_names]
        thresholds = label_thresholds(_label_calibration(split.model, split.results), len(names))
        rows = per_label_table(truth, scores, predicted, names, thresholds)
    except Exception as err:
        split.problems.append(f"the per-label table was not written: {type(err).__name__}: {err}")
        return _Section(lines + ["Not written; see Warnings."], False, [])
    summary = label_summary(rows, truth, predicted)
    drawn = split.attempt(
        "label_confusion.png", lambda path: draw_label_confusion(truth, predicted, rows, names, path)
    )
    headline = f"mAP {summary['map']:.4f}" if summary["map"] is not None else "mAP n/a"
    headline += f", macro-F1 {summary['f1_macro']:.4f}, micro-F1 {summary['f1_micro']:.4f}"
    if summary["auroc"] is not None:
        headline += f", mean AUROC {summary['auroc']:.4f}"
    headline += f" ({len(truth)} images; every label right on {100 * summary['exact_match']:.1f} % of them)."
    lines += [headline, ""] + per_label_markdown(rows) + [""]
    if drawn:
        lines += [
            "![Each label's confusion matrix](label_confusion.png)",
            "",
            "Each label at its threshold: rows true absent / present, columns predicted absent / present.",
        ]
    else:
        lines.append("Each label's confusion matrix was not drawn; see Warnings.")
    checks = [("the per-label table's macro-F1", summary["f1_macro"], "test_f1_macro")]
    checks.append(("its micro-F1", summary["f1_micro"], "test_f1_micro"))
    if all(r["ap"] is not None for r in rows[: len(names)]):  # a label without test positives has no AP
        checks.append(("its mAP", summary["map"], "test_map"))
    return _Section(lines, True, checks)


def _values_section(split: _TestSplit) -> _Section:
    """Numbers: MAE, RMSE and R^2 per target, and predicted against true per target."""
    lines = ["", f"## Predicted against true (test split, {split.checkpoint} checkpoint)", ""]
    try:
        truth, predicted, _ = _test_outputs(split.trainer, split.model, split.datamodule)
        names = [str(n) for n in split.model.class_names]
        truth = np.asarray(truth, dtype=np.float64).reshape(len(truth), -1)
        predicted = np.asarray(predicted, dtype=np.float64).reshape(len(predicted), -1)
        rows = per_target_table(truth, predicted, names)
    except Exception as err:
        split.problems.append(f"the per-target table was not written: {type(err).__name__}: {err}")
        return _Section(lines + ["Not written; see Warnings."], False, [])
    overall = rows[-1]
    headline = f"MAE {overall['mae']:.4f}, RMSE {overall['rmse']:.4f}"
    if overall["r2"] is not None:
        headline += f", R^2 {overall['r2']:.4f}"
    lines += [headline + f" ({len(truth)} images), in the targets' own units.", ""]
    lines += per_target_markdown(rows)
    for i, name in enumerate(names):
        file = scatter_name(names, i)
        drawn = split.attempt(
            file,
            lambda path, i=i: draw_predicted_vs_true(truth, predicted, rows, names, i, path),
        )
        lines += [
            "",
            f"![Predicted against true: {name}]({file})" if drawn else f"{file}: not drawn; see Warnings.",
        ]
    lines += ["", "Each point an image; the dashed line is y = x (a perfect prediction)."]
    checks = [("the table's MAE", overall["mae"], "test_mae"), ("its RMSE", overall["rmse"], "test_rmse")]
    if overall["r2"] is not None:
        checks.append(("its R^2", overall["r2"], "test_r2"))
    return _Section(lines, True, checks)


def _label_calibration(model: Any, results: dict[str, Any]) -> Calibration | None:
    """The per-label thresholds the test used: the model's calibration, else the one metrics.json records."""
    calibration = getattr(model, "calibration", None)
    if getattr(calibration, "label_thresholds", None) is not None:
        return calibration
    recorded = results.get("calibration")
    return Calibration.from_dict(recorded) if recorded else None


def _preview_indices(labels: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` sample indices, taking the groups (classes) in turn so each one shows."""
    by_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < count and any(depth < len(ix) for ix in by_class):
        picked += [ix[depth] for ix in by_class if depth < len(ix)]
        depth += 1
    return picked[:count]


def _label_sets(labels: np.ndarray) -> np.ndarray:
    """Multi-label: which of the distinct label sets each image holds."""
    return np.unique(np.asarray(labels) >= 0.5, axis=0, return_inverse=True)[1].reshape(-1)


def _value_bins(labels: np.ndarray) -> np.ndarray:
    """Regression: the first target's quantile bin (as many bins as preview images), so the range shows."""
    first = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)[:, 0]
    return np.argsort(np.argsort(first, kind="stable"), kind="stable") * PREVIEW_IMAGES // max(len(first), 1)


def _draw_augmentation(datamodule: Any, path: Path, kind: str = "single_label") -> Path:
    datasets = getattr(datamodule, "datasets", None) or {}
    if "train" not in datasets:
        raise RuntimeError("no training split to preview (the data module was not set up).")
    train = datasets["train"]
    indices = _preview_indices(_KINDS[kind].preview_groups(np.asarray(train.labels)), PREVIEW_IMAGES)
    names = list(getattr(datamodule, "class_names", []))
    labels = [target_text(kind, names, train.labels[i]) for i in indices]
    settings = getattr(datamodule, "settings", None)  # an ImageDataModule's: the pipeline it trains with
    augment = settings.pipeline.preset if hasattr(settings, "pipeline") else None
    setting = f"augment: {augment}" if isinstance(augment, str) else "inline augmentation"
    return plots.augmentation_grid(
        datamodule.train_transform,
        [train.read(i) for i in indices],
        path,
        n_views=PREVIEW_VIEWS,
        image_size=getattr(datamodule, "image_size", None),
        title=f"train pipeline ({setting}): original, then {PREVIEW_VIEWS} draws",
        row_labels=labels,
    )


def _best_epoch(best_checkpoint: str | None) -> int | None:
    if not best_checkpoint or not Path(best_checkpoint).is_file():
        return None
    try:
        checkpoint = torch.load(best_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    return int(epoch) if epoch is not None else None


def _link(target: Path | str, run_dir: Path) -> str:
    try:
        return os.path.relpath(target, run_dir)
    except ValueError:  # another drive (Windows)
        return str(target)


def _markdown(
    run_dir: Path,
    model: Any,
    datamodule: Any,
    results: dict[str, Any],
    metrics_csv: Path | None,
    drawn: dict[str, Path],
    section: _Section,
    best_epoch: int | None,
    problems: list[str],
    kind: str = "single_label",
) -> str:
    test = results.get("test", {})
    backbone = getattr(getattr(model, "backbone", None), "name", type(model).__name__)
    weights = getattr(getattr(model, "backbone", None), "weights", None)
    source = getattr(getattr(datamodule, "data", None), "name", None)
    title = f"# Run report: {backbone}" + (f" on {source}" if source else "")

    def figure(key: str, fmt: str = "{:.4f}") -> str:
        value = test.get(key)
        return fmt.format(value) if value is not None else "n/a"

    # every test figure the terminal prints, the known ones named in words, in the terminal's order
    rows = [(TEST_FIGURES.get(key, key), figure(key)) for key in sorted(test)]
    if not test:
        rows = [(TEST_FIGURES[key], "n/a") for key in ("test_acc", "test_f1", "test_loss")]
    if results.get("class_groups"):
        members = "; ".join(f"{g} = {', '.join(map(str, m))}" for g, m in results["class_groups"].items())
        rows.append(("class groups", members))
    monitor, score = results.get("monitor"), results.get("best_score")
    best = f"{best_epoch}" if best_epoch is not None else "n/a"
    if score is not None:
        best += f" ({monitor} {score:.4f})"
    # no monitored metric (e.g. no validation split): the checkpoint callback keeps the latest epoch
    chosen = "best" if monitor is not None else "tested"
    rows.append((f"{chosen} epoch (0-based)", best if monitor is not None else f"{best}, the last"))
    rows.append(("epochs run", str(results.get("epochs", "n/a"))))
    fit_seconds, test_seconds = results.get("fit_seconds"), results.get("test_seconds")
    if fit_seconds is not None:
        rows.append(
            ("train time", f"{fit_seconds:.1f} s" + (f" (test {test_seconds:.1f} s)" if test_seconds else ""))
        )
    checkpoint = results.get("best_checkpoint")
    rows.append((f"{chosen} checkpoint", f"`{_link(checkpoint, run_dir)}`" if checkpoint else "n/a"))
    if weights:
        rows.append(("backbone weights", f"`{weights}`"))
    if results.get("split_sizes"):
        rows.append(("images (train/val/test)", " / ".join(str(v) for v in results["split_sizes"].values())))
    if results.get("class_names"):
        rows.append((_KINDS[kind].noun, ", ".join(map(str, results["class_names"]))))

    lines = [title, "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "## Files", ""]
    config = run_dir / "config.yaml"
    if config.is_file():
        lines.append("- [config.yaml](config.yaml): the resolved recipe")
    else:
        lines.append("- config.yaml: not written (the run was not started from a recipe on the command line)")
    if metrics_csv is not None:
        lines.append(
            f"- [metrics.csv]({_link(metrics_csv, run_dir)}): every logged metric, per step and epoch"
        )
    else:
        lines.append("- metrics.csv: not written (no CSVLogger)")
    if (run_dir / "metrics.json").is_file():
        lines.append("- [metrics.json](metrics.json): the final figures")

    pictures = {
        "learning_curves.png": ("Learning curves", "Dashed lines: more backbone groups unfrozen."),
        "augmentation_preview.png": ("Augmentation preview", "Training images through the train pipeline."),
    }

    def picture(name: str) -> list[str]:
        heading, caption = pictures[name]
        lines = ["", f"## {heading}", ""]
        return lines + (
            [f"![{heading}]({name})", "", caption] if name in drawn else ["Not drawn; see Warnings."]
        )

    lines += picture("learning_curves.png") + section.lines + picture("augmentation_preview.png")
    for what, value, key in section.checks:
        tested = test.get(key)
        if tested is not None and abs(value - tested) > 1e-4:
            problems.append(
                f"{what} ({value:.4f}) differs from {key} ({tested:.4f}): "
                "the model in memory may not hold the best checkpoint's weights."
            )
    if problems:
        lines += ["", "## Warnings", ""]
        lines += [f"- {problem}" for problem in problems]
    return "\n".join(lines) + "\n"


class _KindReport(NamedTuple):
    noun: str  # what the report's row of names calls them
    test_section: Callable[[_TestSplit], _Section]
    preview_groups: Callable[[np.ndarray], np.ndarray]  # groups taken in turn by the augmentation preview


def _kind(model: Any, datamodule: Any, results: dict[str, Any]) -> str:
    """The run's kind of target: as the results record it, else the model's task, else the data's."""
    recorded = (results.get("target") or {}).get("kind")
    kind = (
        recorded
        or getattr(getattr(model, "task", None), "kind", None)
        or getattr(datamodule, "target_kind", None)
        or "single_label"
    )
    if kind not in _KINDS:
        raise ValueError(f"the run report knows the target kinds {', '.join(_KINDS)}, not {kind!r}.")
    return kind


# what the report shows for each kind of target (the one place it tells them apart)
_KINDS: dict[str, _KindReport] = {
    "single_label": _KindReport("classes", _confusion_section, lambda labels: labels),
    "multi_label": _KindReport("labels", _labels_section, _label_sets),
    "regression": _KindReport("targets", _values_section, _value_bins),
}
