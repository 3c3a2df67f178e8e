"""What the run report and ``interpret`` show for the other kinds of target: a table per label (multi-label:
positives, average precision, ROC AUC, F1 at the stored threshold) and per target (regression: MAE, RMSE,
R^2 in the targets' own units), computed here and drawn by :mod:`~transferkit.reporting.interpretation_plots`
and :mod:`~transferkit.reporting.plots`."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import transferkit.reporting.interpretation_plots as figures
from transferkit.errors import ConfigError
from transferkit.models.calibration import MIN_THRESHOLD_POSITIVES, Calibration

__all__ = [
    "label_thresholds",
    "per_label_table",
    "label_summary",
    "label_confusion_counts",
    "label_losses",
    "per_label_markdown",
    "draw_label_confusion",
    "per_target_table",
    "largest_errors",
    "scatter_name",
    "draw_predicted_vs_true",
    "per_target_markdown",
]


# --- several labels per image ----------------------------------------------------------------------


def label_thresholds(calibration: Calibration | None, count: int) -> list[dict[str, Any]]:
    """Each of ``count`` labels' decision threshold and how it was set: ``fitted`` on validation (the
    threshold that maximises the label's F1 there), ``kept`` at 0.5 (fewer than
    :data:`~transferkit.models.calibration.MIN_THRESHOLD_POSITIVES` validation positives or negatives), or
    ``default`` 0.5 (the model holds no per-label thresholds); with the label's validation positives and
    where the thresholds were fitted, where known.

    Example:
        >>> fitted = Calibration(fitted_on="val (40 images)", label_thresholds=[0.3, 0.5],
        ...                      label_positives=[12, 2], label_fitted=[True, False])
        >>> [(row["threshold"], row["set"]) for row in label_thresholds(fitted, 2)]
        [(0.3, 'fitted'), (0.5, 'kept')]
    """
    thresholds = getattr(calibration, "label_thresholds", None)
    if thresholds is None or calibration is None:
        return [{"threshold": 0.5, "set": "default", "val_positives": None, "fitted_on": None}] * count
    if len(thresholds) != count:
        raise ConfigError(
            f"the model's calibration holds {len(thresholds)} label thresholds for {count} labels; refit them "
            "(transferkit.inference.calibrate.calibrate) or leave the calibration out of the checkpoint."
        )
    positives = calibration.label_positives or [None] * count
    return [
        {
            "threshold": float(threshold),
            "set": "fitted" if calibration.label_kept(i) else "kept",
            "val_positives": None if positives[i] is None else int(positives[i]),
            "fitted_on": calibration.fitted_on,
        }
        for i, threshold in enumerate(thresholds)
    ]


def per_label_table(
    truth: np.ndarray,
    probs: np.ndarray,
    predicted: np.ndarray,
    names: Sequence[str],
    thresholds: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per label, then the macro and the micro average, from 0/1 ``truth`` ``(N, L)``, the labels'
    probabilities ``probs`` ``(N, L)`` and the 0/1 decisions ``predicted`` ``(N, L)`` (at ``thresholds``, rows
    of :func:`label_thresholds`, whose fields each row repeats).

    Each row: ``label``, ``positives`` (in ``truth``), ``predicted_positives``, ``ap`` (average precision, the
    area under the label's precision-recall curve; ``None`` without a positive), ``auroc`` (``None`` without
    both positives and negatives), and ``f1``, ``precision``, ``recall`` of the decisions. The macro row's
    ``ap`` is the mAP and its ``f1`` the macro-F1 (the means over labels, as ``test_map`` and
    ``test_f1_macro``); the micro row counts every decision together (``test_f1_micro``).

    Example:
        >>> truth = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
        >>> probs = np.array([[0.9, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.1]])
        >>> rows = per_label_table(truth, probs, (probs >= 0.5).astype(int), ["red", "blue"])
        >>> [(r["label"], r["ap"], r["f1"]) for r in rows]
        [('red', 1.0, 1.0), ('blue', 1.0, 0.6666666666666666), ('macro average', 1.0, 0.8333333333333333), ('micro average', None, 0.8571428571428571)]
    """
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    y = (np.asarray(truth) >= 0.5).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    decided = (np.asarray(predicted) >= 0.5).astype(int)
    if not y.shape == p.shape == decided.shape or y.ndim != 2 or y.shape[1] != len(names):
        raise ValueError(
            f"truth, probs and predicted must all be (images, {len(names)} labels); got {y.shape}, {p.shape} and "
            f"{decided.shape}."
        )
    thresholds = list(thresholds) if thresholds is not None else label_thresholds(None, len(names))
    precision, recall, f1, _ = precision_recall_fscore_support(y, decided, average=None, zero_division=0)
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        positives = int(y[:, i].sum())
        rows.append(
            {
                "label": str(name),
                "positives": positives,
                "predicted_positives": int(decided[:, i].sum()),
                "ap": float(average_precision_score(y[:, i], p[:, i])) if positives else None,
                "auroc": float(roc_auc_score(y[:, i], p[:, i])) if 0 < positives < len(y) else None,
                "f1": float(f1[i]),
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                **thresholds[i],
            }
        )

    def mean(key: str) -> float | None:
        values = [row[key] for row in rows if row[key] is not None]
        return float(np.mean(values)) if values else None

    micro = precision_recall_fscore_support(y, decided, average="micro", zero_division=0)
    empty = {"threshold": None, "set": None, "val_positives": None, "fitted_on": None}
    rows += [
        {
            "label": "macro average",
            "positives": int(y.sum()),
            "predicted_positives": int(decided.sum()),
            "ap": mean("ap"),
            "auroc": mean("auroc"),
            "f1": mean("f1"),
            "precision": mean("precision"),
            "recall": mean("recall"),
            **empty,
        },
        {
            "label": "micro average",
            "positives": int(y.sum()),
            "predicted_positives": int(decided.sum()),
            "ap": None,
            "auroc": None,
            "f1": float(micro[2]),
            "precision": float(micro[0]),
            "recall": float(micro[1]),
            **empty,
        },
    ]
    return rows


def label_summary(rows: Sequence[dict[str, Any]], truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """The headline figures of a :func:`per_label_table`: ``map``, ``auroc``, ``f1_macro``, ``f1_micro``, and
    ``exact_match`` (the share of images with every label right)."""
    macro, micro = rows[-2], rows[-1]
    right = (np.asarray(truth) >= 0.5) == (np.asarray(predicted) >= 0.5)
    return {
        "map": macro["ap"],
        "auroc": macro["auroc"],
        "f1_macro": macro["f1"],
        "f1_micro": micro["f1"],
        "exact_match": float(right.all(axis=1).mean()) if len(right) else None,
    }


def label_confusion_counts(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Each label's 2 x 2 confusion matrix ``(L, 2, 2)`` from 0/1 ``truth`` and ``predicted`` ``(N, L)``: rows
    are true absent / present, columns predicted absent / present (``[[TN, FP], [FN, TP]]``).

    Example:
        >>> label_confusion_counts(np.array([[1, 0], [1, 1], [0, 0]]), np.array([[1, 1], [0, 1], [0, 0]]))[0]
        array([[1, 0],
               [1, 1]])
    """
    y = (np.asarray(truth) >= 0.5).astype(int)
    d = (np.asarray(predicted) >= 0.5).astype(int)
    counts = np.zeros((y.shape[1], 2, 2), dtype=np.int64)
    for label in range(y.shape[1]):
        np.add.at(counts[label], (y[:, label], d[:, label]), 1)
    return counts


def label_losses(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each image's loss ``(N,)``: the binary cross-entropy of its labels' probabilities ``(N, L)`` against
    0/1 ``truth``, the mean over labels (as the multi-label loss, without positive weights).

    Example:
        >>> label_losses(np.array([[0.9, 0.1], [0.5, 0.5]]), np.array([[1, 0], [1, 1]])).round(3)
        array([0.105, 0.693])
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    present = np.asarray(truth) >= 0.5
    return -np.where(present, np.log(p), np.log1p(-p)).mean(axis=1)


def per_label_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A :func:`per_label_table` as a markdown table, then what its thresholds are and where they came from."""
    lines = [
        "| label | test positives | AP | AUROC | F1 | precision | recall | threshold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = r["label"] if r["threshold"] is not None else f"*{r['label']}*"
        lines.append(
            f"| {name} | {r['positives']} | {_score(r['ap'])} | {_score(r['auroc'])} | {r['f1']:.3f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {_threshold_text(r)} |"
        )
    labels = [r for r in rows if r["threshold"] is not None]
    lines.append("")
    if all(r["set"] == "default" for r in labels):
        lines.append(
            "No per-label thresholds were fitted (the run kept no validation split): every label is predicted "
            "at probability >= 0.5."
        )
        return lines
    fitted_on = next((r["fitted_on"] for r in labels if r["fitted_on"]), "the validation split")
    text = (
        f"Thresholds fitted on {fitted_on}, each the one that maximises its label's F1 there; a label with fewer "
        f"than {MIN_THRESHOLD_POSITIVES} validation positives (or negatives) keeps 0.5."
    )
    kept = [r for r in labels if r["set"] == "kept"]
    if kept:
        text += " Kept at 0.5 here: " + ", ".join(
            f"{r['label']} ({r['val_positives']} validation positives)" if r["val_positives"] is not None
            else r["label"]
            for r in kept
        ) + "."  # fmt: skip
    else:
        text += " Every label's threshold was fitted."
    lines.append(text + " AP and AUROC do not depend on the thresholds; F1, precision and recall do.")
    return lines


def _threshold_text(row: dict[str, Any]) -> str:
    if row["threshold"] is None:
        return ""
    if row["set"] == "fitted":
        return f"{row['threshold']:.3f} (fitted)"
    if row["set"] == "kept":
        return "0.5 (kept: too few validation positives or negatives)"
    return "0.5 (not fitted)"


def _label_headline(summary: dict[str, Any]) -> str:
    text = (
        f"mAP {_score(summary.get('map'), 4)}, macro-F1 {_score(summary.get('f1_macro'), 4)}, micro-F1 "
        f"{_score(summary.get('f1_micro'), 4)}, mean AUROC {_score(summary.get('auroc'), 4)}"
    )
    if summary.get("exact_match") is not None:
        text += f"; every label right on {100 * summary['exact_match']:.1f} % of the images"
    return text


def draw_label_confusion(
    truth: np.ndarray,
    predicted: np.ndarray,
    rows: Sequence[dict[str, Any]],
    names: Sequence[str],
    path: str | os.PathLike,
    split: str = "test",
) -> Path:
    """``label_confusion.png`` as :func:`interpret` and the run report draw it: each label's 2 x 2 confusion
    (:func:`label_confusion_counts` of 0/1 ``truth`` and ``predicted`` ``(N, L)``), titled with its F1 and
    threshold from the :func:`per_label_table` ``rows``."""
    subtitles = [f"F1 {r['f1']:.3f} at {_threshold_text(r)}" for r in rows[: len(names)]]
    return figures.label_confusion_plot(
        label_confusion_counts(truth, predicted),
        names,
        path,
        subtitles=subtitles,
        title=f"{split} split: each label at its threshold",
    )


# --- numbers ---------------------------------------------------------------------------------------


def per_target_table(truth: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per target of ``truth`` and ``predicted`` ``(N, T)`` (in the targets' own units): ``target``,
    ``images``, ``mae``, ``rmse``, ``r2`` (``None`` for a target that does not vary) and ``bias`` (the mean of
    predicted - true). With several targets, an ``all targets`` row as ``test_mae`` and ``test_rmse`` count
    (every error together) and ``test_r2`` (the mean of the targets' R^2).

    Example:
        >>> rows = per_target_table(np.array([[1.0], [2.0], [3.0]]), np.array([[1.5], [2.0], [2.5]]), ["level"])
        >>> {k: round(v, 4) for k, v in rows[0].items() if k in ("mae", "rmse", "r2", "bias")}
        {'mae': 0.3333, 'rmse': 0.4082, 'r2': 0.75, 'bias': 0.0}
    """
    t = np.asarray(truth, dtype=np.float64).reshape(len(truth), -1)
    v = np.asarray(predicted, dtype=np.float64).reshape(len(predicted), -1)
    if t.shape != v.shape or t.shape[1] != len(names):
        raise ValueError(
            f"truth and predicted must both be (images, {len(names)} targets); got {t.shape} and {v.shape}."
        )
    errors = v - t
    rows = []
    for i, name in enumerate(names):
        spread = float(((t[:, i] - t[:, i].mean()) ** 2).sum()) if len(t) else 0.0
        rows.append(
            {
                "target": str(name),
                "images": len(t),
                "mae": float(np.abs(errors[:, i]).mean()) if len(t) else None,
                "rmse": float(np.sqrt((errors[:, i] ** 2).mean())) if len(t) else None,
                "r2": 1.0 - float((errors[:, i] ** 2).sum()) / spread if spread > 0 else None,
                "bias": float(errors[:, i].mean()) if len(t) else None,
            }
        )
    if len(names) > 1:
        r2 = [row["r2"] for row in rows if row["r2"] is not None]
        rows.append(
            {
                "target": "all targets",
                "images": len(t),
                "mae": float(np.abs(errors).mean()) if len(t) else None,
                "rmse": float(np.sqrt((errors**2).mean())) if len(t) else None,
                "r2": float(np.mean(r2)) if r2 else None,
                "bias": float(errors.mean()) if len(t) else None,
            }
        )
    return rows


def largest_errors(
    truth: np.ndarray, predicted: np.ndarray, scale: Sequence[float] | None, count: int
) -> dict[str, np.ndarray]:
    """The ``count`` images with the largest errors, largest first (``indices``), and every image's error in
    units of ``scale`` (the training split's standard deviation per target, so that targets of different units
    weigh alike), the mean over targets (``scaled``); one target ranks exactly by its absolute error.

    Example:
        >>> largest_errors(np.array([[1.0], [2.0], [3.0]]), np.array([[1.5], [2.0], [1.0]]), [2.0], 2)["indices"]
        array([2, 0])
    """
    t = np.asarray(truth, dtype=np.float64).reshape(len(truth), -1)
    v = np.asarray(predicted, dtype=np.float64).reshape(len(predicted), -1)
    spread = np.asarray(scale if scale is not None else [1.0] * t.shape[1], dtype=np.float64)
    scaled = (np.abs(v - t) / np.where(spread > 0, spread, 1.0)).mean(axis=1)
    return {"indices": np.argsort(-scaled, kind="stable")[:count], "scaled": scaled}


def scatter_name(names: Sequence[str], index: int) -> str:
    """The file of target ``index``'s predicted-against-true scatter, named after the target.

    Example:
        >>> scatter_name(["defect probability", "age"], 0)
        'predicted_vs_true_defect_probability.png'
    """
    safe = [re.sub(r"[^A-Za-z0-9_.-]+", "_", str(n)).strip("._") or f"target{i}" for i, n in enumerate(names)]
    name = safe[index] if safe.count(safe[index]) == 1 else f"{safe[index]}_{index}"
    return f"predicted_vs_true_{name}.png"


def draw_predicted_vs_true(
    truth: np.ndarray,
    predicted: np.ndarray,
    rows: Sequence[dict[str, Any]],
    names: Sequence[str],
    index: int,
    path: str | os.PathLike,
    split: str = "test",
) -> Path:
    """Target ``index``'s scatter (:func:`scatter_name`) as :func:`interpret` and the run report draw it, from
    ``truth`` and ``predicted`` ``(N, T)`` and its row of the :func:`per_target_table` ``rows``."""
    return figures.predicted_vs_true_plot(
        truth[:, index],
        predicted[:, index],
        path,
        name=names[index],
        figures=rows[index],
        title=f"{split} split",
    )


def per_target_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A :func:`per_target_table` as a markdown table (errors in the targets' own units)."""
    lines = [
        "| target | images | MAE | RMSE | R^2 | mean error (bias) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['target']} | {r['images']} | {_units(r['mae'])} | {_units(r['rmse'])} | {_score(r['r2'], 4)} | "
        f"{_units(r['bias'])} |"
        for r in rows
    ]
    return lines


def _target_headline(summary: dict[str, Any]) -> str:
    return (
        f"MAE {_units(summary.get('mae'))}, RMSE {_units(summary.get('rmse'))}, R^2 "
        f"{_score(summary.get('r2'), 4)} (in the targets' own units)"
    )


def _score(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _units(value: float | None) -> str:
    """A number in a target's own units: four decimals, or four significant digits when far from 1."""
    if value is None:
        return "n/a"
    size = abs(value)
    return f"{value:.4f}" if size == 0 or 0.01 <= size < 1000 else f"{value:.4g}"
