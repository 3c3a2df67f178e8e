"""Predicting image files with a trained model: one row per file, unreadable ones listed, to CSV.

What a row holds follows the model's kind of target (:mod:`transferkit.models.tasks`):

==================  ==========================================  ==========================================
kind                row                                         CSV columns
==================  ==========================================  ==========================================
``single_label``    ``predicted`` (class name), ``probs``       ``predicted``, ``prob_<class>``
``multi_label``     ``predicted`` (label names over their       ``predicted_labels`` (names joined with
                    thresholds), ``probs`` (each label's)       ``;``, empty for none), ``prob_<label>``
``regression``      ``values`` (each target, in its units)      ``predicted_<target>``
==================  ==========================================  ==========================================

Every kind takes test-time augmentation (the scores are averaged over the views) and Monte Carlo dropout
(``uncertainty``: the task's one number per image, :meth:`~transferkit.models.tasks.Task.uncertainty`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import torch

from transferkit.data.augment import decode_side
from transferkit.data.class_groups import group_probabilities
from transferkit.data.images import IMAGE_SUFFIXES, load_image
from transferkit.errors import ConfigError, ImageReadError

__all__ = ["describe_columns", "list_images", "predict_images", "predict_tensors", "write_predictions_csv"]

LABEL_SEPARATOR = ";"  # between the predicted labels of a multi-label row, as in a multi-label CSV's labels


def _explain_classes(model: Any) -> list[str]:
    threshold = getattr(getattr(model, "calibration", None), "threshold", None)
    names = list(model.class_names)
    decision = (
        f"{names[1]} when prob_{names[1]} >= {threshold:.3g} (fitted on validation), else {names[0]}"
        if threshold is not None and len(names) == 2
        else "the most probable class"
    )
    return [f"predicted: {decision}", "prob_<class>: each class's probability (they sum to 1)"]


def _explain_labels(model: Any) -> list[str]:
    calibration = getattr(model, "calibration", None)
    fitted = getattr(calibration, "label_thresholds", None) is not None
    thresholds = ", ".join(
        f"{name} >= {t:.3g}" + ("" if fitted and calibration.label_kept(i) else " (not fitted)")
        for i, (name, t) in enumerate(zip(model.class_names, model.task.thresholds(calibration), strict=True))
    )
    where = f" fitted on {calibration.fitted_on}" if fitted else ""
    return [
        f"predicted_labels: the labels whose probability reaches their threshold, joined with "
        f"'{LABEL_SEPARATOR}' (empty: none); thresholds{where}: {thresholds}",
        "prob_<label>: each label's own probability (independent sigmoids: they need not sum to 1)",
    ]


def _explain_values(model: Any) -> list[str]:
    return ["predicted_<target>: each target's predicted value, in the target's own units"]


@dataclass(frozen=True)
class _Layout:
    """How one kind of target reads in a row of :func:`predict_images` and in its CSV."""

    scores: str  # the row's key for the task's scores (one per name)
    score_column: str  # the CSV column of each name's score; "{}" is the name
    score_format: str
    predicted_column: str | None  # the CSV column of the decision; None where the scores are the prediction
    decision: Callable[[list[str], Any], Any] | None  # one image's task.decide -> the row's ``predicted``
    written: Callable[[Any], str] | None  # the row's ``predicted`` -> the CSV cell
    explain: Callable[[Any], list[str]]  # the model -> what the columns mean, one line per column group
    uncertainty: str  # what the uncertainty column measures
    uncertainty_format: str


_LAYOUTS: dict[str, _Layout] = {
    "single_label": _Layout(
        scores="probs",
        score_column="prob_{}",
        score_format=".6f",
        predicted_column="predicted",
        decision=lambda names, decided: names[int(decided)],
        written=str,
        explain=_explain_classes,
        uncertainty="the entropy of the mean class probabilities over the dropout passes (0 = certain)",
        uncertainty_format=".6f",
    ),
    "multi_label": _Layout(
        scores="probs",
        score_column="prob_{}",
        score_format=".6f",
        predicted_column="predicted_labels",
        decision=lambda names, decided: [n for n, on in zip(names, decided, strict=True) if on],
        written=LABEL_SEPARATOR.join,
        explain=_explain_labels,
        uncertainty="the spread (std) of each label's probability over the dropout passes, averaged over "
        "labels",
        uncertainty_format=".6f",
    ),
    "regression": _Layout(
        scores="values",
        score_column="predicted_{}",
        score_format=".8g",
        predicted_column=None,
        decision=None,
        written=None,
        explain=_explain_values,
        uncertainty="the spread (std) of each value over the dropout passes, in the targets' own units, "
        "averaged over targets",
        uncertainty_format=".8g",
    ),
}


def _layout(kind: str) -> _Layout:
    if kind not in _LAYOUTS:
        raise ConfigError(
            f"predict-images does not know how to write predictions of a {kind!r} model; it writes "
            f"{', '.join(_LAYOUTS)} models. Predict with model.predict_proba in Python instead."
        )
    return _LAYOUTS[kind]


def _kind(model: Any) -> str:
    task = getattr(model, "task", None)
    return task.kind if task is not None else "single_label"


def list_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image files named by ``inputs``: files as given, folders searched recursively for image suffixes."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            files += [str(p) for p in found]
        else:
            files.append(str(path))  # a missing file becomes an error row, not a crash
    return files


def predict_images(
    model: Any,
    eval_transform: A.Compose,
    files: Sequence[str | os.PathLike],
    tta: str | None = None,
    mc_dropout: int = 0,
    batch_size: int = 32,
    jpeg_draft: bool = True,
) -> list[dict[str, Any]]:
    """Predict each image file; one row per file, in order.

    A row holds ``file`` and ``error`` (why the image could not be read or prepared, else ``""``), and for
    a readable image what the model's kind of target predicts (see the module's table):

    - single label: ``predicted`` (the class name, by the stored decision threshold when there is one) and
      ``probs`` (``num_classes`` floats); for a model with class groups also ``predicted_group`` and
      ``group_probs`` (see :mod:`transferkit.data.class_groups`);
    - multi-label: ``predicted`` (the names of the labels whose probability reaches their stored threshold,
      in the model's label order; ``[]`` for none) and ``probs`` (each label's probability);
    - regression: ``values`` (one float per target, in the targets' own units).

    With ``mc_dropout`` also ``uncertainty``: one number per image, as the task measures it
    (:func:`describe_columns`). Unreadable images do not stop the others.

    Args:
        model: a :class:`~transferkit.TransferClassifier` (e.g. from :func:`transferkit.load_for_inference`).
        eval_transform: its eval pipeline, ``(H, W, 3) uint8`` -> ``(3, S, S)`` float.
        files: image paths.
        tta: test-time augmentation (``none``, ``hflip``, ``flips``, ``d4``; ``None`` = the model's own).
        mc_dropout: ``0``, or the number of Monte Carlo dropout passes (>= 2).
        batch_size: images per forward pass.
        jpeg_draft: decode JPEGs at the smallest DCT scale that still gives the pipeline every pixel it
            uses (see :func:`transferkit.data.augment.decode_side`), as the data module does in training;
            ``False`` decodes in full.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    layout = _layout(_kind(model))
    if mc_dropout:
        _check_mc_dropout(model, mc_dropout)
    rows: list[dict[str, Any]] = [{"file": str(f), "error": ""} for f in files]
    readable: list[tuple[int, torch.Tensor]] = []
    side = decode_side(eval_transform) if jpeg_draft else None
    for index, file in enumerate(files):
        try:
            if not Path(file).is_file():
                raise ImageReadError(file, "no such file")
            readable.append((index, eval_transform(image=load_image(file, min_side=side))["image"].float()))
        except ImageReadError as err:
            rows[index]["error"] = err.reason
        except Exception as err:  # the pipeline rejected a readable image
            rows[index]["error"] = f"the eval pipeline failed on it ({type(err).__name__}: {err})"
        if len(readable) >= batch_size:
            _predict_batch(model, layout, readable, rows, tta, mc_dropout)
            readable = []
    if readable:
        _predict_batch(model, layout, readable, rows, tta, mc_dropout)
    return rows


def predict_tensors(
    model: Any, tensors: Sequence[torch.Tensor], tta: str | None = None, mc_dropout: int = 0
) -> list[dict[str, Any]]:
    """:func:`predict_images`' rows (without ``file`` and ``error``) for images already through the eval
    pipeline, ``(3, S, S)`` each, predicted as one batch: what ``serve`` answers, so that its answers and
    ``predict-images``' rows are the same numbers."""
    layout = _layout(_kind(model))
    if mc_dropout:
        _check_mc_dropout(model, mc_dropout)
    rows: list[dict[str, Any]] = [{} for _ in tensors]
    if tensors:
        _predict_batch(model, layout, list(enumerate(tensors)), rows, tta, mc_dropout)
    return rows


def _check_mc_dropout(model: Any, samples: int) -> None:
    """Refuse MC dropout that cannot measure a spread before any image is read."""
    if samples < 2:
        raise ConfigError(
            "MC dropout is the number of stochastic passes (0 = off, >= 2 to measure a spread), "
            f"got {samples}."
        )
    head = getattr(model, "head", None)
    if head is not None and not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in head.modules()):
        raise ConfigError(
            "MC dropout needs dropout in the model's head, and this model was trained with "
            "model.head.dropout=0: predict without MC dropout, or train with model.head.dropout > 0 "
            "(e.g. 0.2)."
        )


@torch.no_grad()
def _predict_batch(
    model: Any,
    layout: _Layout,
    items: list[tuple[int, torch.Tensor]],
    rows: list[dict[str, Any]],
    tta: str | None,
    samples: int,
) -> None:
    model.eval()
    batch = torch.stack([tensor for _, tensor in items]).to(model.device)
    uncertainty = None
    if samples:
        out = model.predict_mc_dropout(batch, samples, tta=tta)
        scores, uncertainty = out["probs"], out["entropy"].tolist()
    else:
        scores = model.predict_proba(batch, tta=tta)
    decided = model.predict_labels(scores).tolist() if layout.decision is not None else None
    names = list(model.class_names)
    for j, (index, _) in enumerate(items):
        row = rows[index]
        row[layout.scores] = scores[j].tolist()
        if decided is not None:
            row["predicted"] = layout.decision(names, decided[j])  # the stored threshold(s), if any
        if uncertainty is not None:
            row["uncertainty"] = uncertainty[j]
    groups = getattr(model, "class_groups", None)
    if groups:
        grouped = group_probabilities(scores, groups)
        group_names = list(groups)
        for j, (index, _) in enumerate(items):
            rows[index]["group_probs"] = grouped[j].tolist()
            rows[index]["predicted_group"] = group_names[int(grouped[j].argmax())]


def write_predictions_csv(
    rows: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    uncertainty: bool,
    groups: Sequence[str] | None = None,
    kind: str = "single_label",
) -> Path:
    """The rows of :func:`predict_images` as a CSV; unreadable images have only file and error.

    Columns by ``kind`` (``class_names``: the model's classes, labels or targets):

    - ``single_label``: ``file, predicted, prob_<class>..., [predicted_group, prob_group_<group>...,]
      [uncertainty,] error`` (the group columns for a model with class groups, named by ``groups``);
    - ``multi_label``: ``file, predicted_labels, prob_<label>..., [uncertainty,] error``, the predicted
      labels joined with ``;`` (empty when no label reaches its threshold);
    - ``regression``: ``file, predicted_<target>..., [uncertainty,] error``, in the targets' own units.
    """
    layout = _layout(kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    score_columns = [layout.score_column.format(name) for name in class_names]
    columns = ["file", *([layout.predicted_column] if layout.predicted_column else []), *score_columns]
    columns += ["predicted_group", *(f"prob_group_{g}" for g in groups)] if groups else []
    columns += ["uncertainty"] if uncertainty else []
    columns += ["error"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            out = {"file": row["file"], "error": row["error"]}
            if layout.predicted_column:
                predicted = row.get("predicted")
                out[layout.predicted_column] = layout.written(predicted) if predicted is not None else ""
            scores = row.get(layout.scores) or [""] * len(class_names)
            for column, score in zip(score_columns, scores, strict=True):
                out[column] = format(score, layout.score_format) if score != "" else ""
            if groups:
                out["predicted_group"] = row.get("predicted_group", "")
                for name, p in zip(groups, row.get("group_probs") or [""] * len(groups), strict=True):
                    out[f"prob_group_{name}"] = f"{p:.6f}" if p != "" else ""
            if uncertainty:
                value = row.get("uncertainty")
                out["uncertainty"] = format(value, layout.uncertainty_format) if value is not None else ""
            writer.writerow(out)
    return path


def describe_columns(model: Any, uncertainty: bool = False) -> list[str]:
    """What the columns of ``model``'s predictions CSV mean, one line per column group, for a person reading
    it (``predict-images`` prints them); ``uncertainty``: with the MC-dropout column."""
    layout = _layout(_kind(model))
    return layout.explain(model) + ([f"uncertainty: {layout.uncertainty}"] if uncertainty else [])
