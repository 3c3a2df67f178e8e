"""What a run leaves to look at: ``report.md`` with learning curves, test confusion matrix and an
augmentation preview.

:meth:`transferkit.Trainer.finetune` calls :func:`write_run_report` after testing the best checkpoint; the
run directory (``trainer.log_dir``, or ``default_root_dir`` when logging is off) then holds::

    config.yaml               the resolved recipe (runs started from the command line)
    metrics.csv               every logged metric, per step and epoch (CSVLogger)
    metrics.json              the final figures
    learning_curves.png       loss and accuracy per epoch, train vs validation, unfreeze points dashed
    confusion_matrix.png      the best checkpoint on the test split
    augmentation_preview.png  a few training images through the real train pipeline
    top_losses.png, most_confident.png, confusion_normalised.png, reliability.png, roc_pr.png (two
                              classes), interpretation.json/.md: the test split interpreted
                              (:func:`transferkit.reporting.interpretation.interpret`)
    report.md                 all of the above, linked, with every test figure the terminal prints (the
                              class groups' too, with their table and confusion_groups.png), best epoch
                              and train time

A picture that cannot be drawn is reported as a warning in ``report.md``; it never fails the run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

import transferkit.reporting.plots as plots
from transferkit.files import atomic_write
from transferkit.reporting.interpretation import interpret, interpretation_markdown

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

    def attempt(name: str, draw: Any) -> None:
        try:
            drawn[name] = draw(run_dir / name)
        except Exception as err:
            problems.append(f"`{name}` was not drawn: {type(err).__name__}: {err}")

    metrics_csv = _metrics_csv(trainer)
    attempt("learning_curves.png", lambda path: _draw_learning_curves(metrics_csv, path, model))
    # the checkpoint callback's best; without a monitored metric (no validation split), the last epoch's
    confusion: dict[str, Any] = {"checkpoint": "best" if results.get("monitor") is not None else "tested"}
    attempt("confusion_matrix.png", lambda path: _draw_confusion(trainer, model, datamodule, path, confusion))
    attempt("augmentation_preview.png", lambda path: _draw_augmentation(datamodule, path))
    interpretation = _interpret_test_split(model, datamodule, run_dir, problems)

    best_epoch = _best_epoch(results.get("best_checkpoint"))
    text = _markdown(run_dir, model, datamodule, results, metrics_csv, drawn, confusion, best_epoch, problems)
    if interpretation is not None:
        text += "\n" + interpretation_markdown(interpretation, run_dir, level=2)
    return atomic_write(run_dir / "report.md", text, what="run report")


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
    # unfreeze points come from the logged trainable_groups (unfreeze_epochs=None)
    return plots.learning_curves(metrics_csv, path, title=f"{name}: learning curves")


@torch.no_grad()
def test_predictions(model: Any, datamodule: Any, device: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted labels ``(N,)`` on the data module's test split, as the test loop predicts them
    (eval mode, the model's own test-time augmentation)."""
    was_training = model.training
    original = next(model.parameters()).device
    device = torch.device(device) if device is not None else original
    model.to(device).eval()
    truth, predicted = [], []
    try:
        for images, labels in datamodule.test_dataloader():
            probs = model.predict_proba(images.to(device))
            predicted.append(model.predict_labels(probs).cpu())
            truth.append(labels.cpu())
    finally:
        model.to(original).train(was_training)
    return torch.cat(truth).numpy(), torch.cat(predicted).numpy()


def _test_size(datamodule: Any) -> int | None:
    try:
        return len(datamodule.test_dataloader().dataset)
    except (TypeError, AttributeError):
        return None


def _draw_confusion(trainer: Any, model: Any, datamodule: Any, path: Path, out: dict[str, Any]) -> Path:
    if datamodule is None or not hasattr(datamodule, "test_dataloader"):
        raise RuntimeError("no data module with a test split was given to finetune.")
    recorded = getattr(getattr(model, "scoring", None), "test_predictions", None)
    if recorded is not None and len(recorded[0]) == _test_size(datamodule):
        truth, predicted = recorded  # what the test loop just predicted, all of the split
    else:  # e.g. each DDP process tested a share of the split: predict it here
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        truth, predicted = test_predictions(model, datamodule, device)
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


def _preview_indices(labels: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` sample indices, taking the classes in turn so each one shows."""
    by_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < count and any(depth < len(ix) for ix in by_class):
        picked += [ix[depth] for ix in by_class if depth < len(ix)]
        depth += 1
    return picked[:count]


def _draw_augmentation(datamodule: Any, path: Path) -> Path:
    datasets = getattr(datamodule, "datasets", None) or {}
    if "train" not in datasets:
        raise RuntimeError("no training split to preview (the data module was not set up).")
    train = datasets["train"]
    indices = _preview_indices(np.asarray(train.labels), PREVIEW_IMAGES)
    names = list(getattr(datamodule, "class_names", []))
    labels = [names[int(train.labels[i])] if names else str(int(train.labels[i])) for i in indices]
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
    confusion: dict[str, Any],
    best_epoch: int | None,
    problems: list[str],
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
        rows.append(("classes", ", ".join(map(str, results["class_names"]))))

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

    sections = [
        ("learning_curves.png", "Learning curves", "Dashed lines: more backbone groups unfrozen."),
        (
            "confusion_matrix.png",
            f"Confusion matrix (test split, {confusion['checkpoint']} checkpoint)",
            "Rows: true class; columns: predicted.",
        ),
        ("augmentation_preview.png", "Augmentation preview", "Training images through the train pipeline."),
    ]
    for name, heading, caption in sections:
        lines += ["", f"## {heading}", ""]
        if name in drawn:
            lines += [f"![{heading}]({name})", "", caption]
        else:
            lines.append("Not drawn; see Warnings.")
    accuracy, test_acc = confusion.get("accuracy"), test.get("test_acc")
    if accuracy is not None and test_acc is not None and abs(accuracy - test_acc) > 1e-4:
        problems.append(
            f"the confusion matrix's accuracy ({accuracy:.4f}) differs from test_acc ({test_acc:.4f}): "
            "the model in memory may not hold the best checkpoint's weights."
        )
    if problems:
        lines += ["", "## Warnings", ""]
        lines += [f"- {problem}" for problem in problems]
    return "\n".join(lines) + "\n"
