"""Pictures of what a trained model gets wrong and how sure it is: prediction grids with Grad-CAM overlays,
reliability diagrams, ROC and precision-recall curves, each label's confusion, predicted against true.

As in :mod:`transferkit.reporting.plots`, each function draws on its own Agg ``Figure``, writes a PNG and
returns its path, and what it draws is computed elsewhere: :func:`reliability_diagram` draws
:func:`~transferkit.models.calibration.reliability_bins`, :func:`roc_pr_plot` draws
:func:`~transferkit.models.calibration.roc_pr_curves`, :func:`prediction_grid` and :func:`overlay_grid`
overlay :func:`~transferkit.inference.gradcam.gradcam_maps`, :func:`label_confusion_plot` draws
:func:`~transferkit.reporting.interpretation.label_confusion_counts`, :func:`predicted_vs_true_plot` titles
itself with a row of :func:`~transferkit.reporting.interpretation.per_target_table`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from transferkit.reporting.plots import save_png

__all__ = [
    "label_confusion_plot",
    "overlay_grid",
    "predicted_vs_true_plot",
    "prediction_grid",
    "reliability_diagram",
    "roc_pr_plot",
]


def prediction_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    path: str | os.PathLike,
    maps: np.ndarray | None = None,
    title: str | None = None,
    columns: int = 4,
) -> Path:
    """Images ``(H, W, 3)`` (uint8 or floats in [0, 1]) with a caption each; with ``maps`` ``(N, H, W)`` in
    [0, 1] (Grad-CAM), each image is shown a second time with its map overlaid (``jet``, half opaque).

    Example:
        >>> import tempfile
        >>> images = [np.zeros((8, 8, 3), np.uint8)] * 3
        >>> prediction_grid(images, ["a", "b", "c"], os.path.join(tempfile.mkdtemp(), "g.png"),
        ...                 maps=np.random.rand(3, 8, 8)).name
        'g.png'
    """
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles.")
    if maps is not None and len(maps) != len(images):
        raise ValueError(f"{len(maps)} Grad-CAM maps for {len(images)} images.")
    count = max(len(images), 1)
    columns = min(columns, count)
    per_image = 2 if maps is not None else 1
    rows = math.ceil(count / columns) * per_image
    fig = Figure(figsize=(2.4 * columns, 2.5 * rows + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, columns, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, caption) in enumerate(zip(images, titles, strict=True)):
        row, column = (i // columns) * per_image, i % columns
        shown = np.asarray(image)
        shown = shown.astype(np.float32) / 255.0 if shown.dtype == np.uint8 else np.clip(shown, 0.0, 1.0)
        axes[row, column].imshow(shown)
        axes[row, column].set_title(caption, fontsize=8)
        if maps is not None:
            axes[row + 1, column].imshow(shown)
            axes[row + 1, column].imshow(maps[i], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            axes[row + 1, column].set_title("Grad-CAM (predicted class)", fontsize=7)
    if not len(images):
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def reliability_diagram(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    eces: Mapping[str, float],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Accuracy against confidence per bin, one panel per entry of ``curves`` (e.g. ``before`` and ``after``
    temperature scaling), each a :func:`~transferkit.models.calibration.reliability_bins` result, with the
    diagonal of perfect calibration, the bins' image counts, and the ECE in the panel's title."""
    fig = Figure(figsize=(4.0 * len(curves), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, table) in zip(axes, curves.items(), strict=True):
        edges = np.asarray(table["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        filled = np.asarray(table["count"]) > 0
        accuracy = np.nan_to_num(np.asarray(table["accuracy"], dtype=float))
        ax.bar(
            centres[filled],
            accuracy[filled],
            width=width * 0.95,
            color="tab:blue",
            alpha=0.8,
            label="accuracy",
        )
        gap = np.nan_to_num(np.asarray(table["confidence"], dtype=float)) - accuracy
        ax.bar(
            centres[filled],
            gap[filled],
            bottom=accuracy[filled],
            width=width * 0.95,
            color="tab:red",
            alpha=0.35,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
        for x, n in zip(centres[filled], np.asarray(table["count"])[filled], strict=True):
            ax.text(x, 0.02, str(int(n)), ha="center", fontsize=6, rotation=90, color="white")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {eces[name]:.3f}", fontsize=10)
        ax.legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def roc_pr_plot(
    curves: Mapping[str, Any],
    path: str | os.PathLike,
    operating_point: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """The ROC and precision-recall curves of a two-class model
    (:func:`~transferkit.models.calibration.roc_pr_curves`), with ``operating_point`` (``fpr``, ``tpr``,
    ``precision``, ``recall`` and ``threshold`` of the decision rule in use) marked on both."""
    fig = Figure(figsize=(8.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    roc, pr = fig.subplots(1, 2)
    roc.plot(curves["fpr"], curves["tpr"], color="tab:blue")
    roc.plot([0, 1], [0, 1], "k--", linewidth=1)
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate (recall)")
    roc.set_title(f"ROC, AUC {curves['roc_auc']:.3f}", fontsize=10)
    pr.plot(curves["recall"], curves["precision"], color="tab:green")
    pr.set_xlabel("recall")
    pr.set_ylabel("precision")
    pr.set_title(f"precision-recall, AP {curves['average_precision']:.3f}", fontsize=10)
    if operating_point is not None:
        label = f"threshold {operating_point['threshold']:.3f}"
        roc.plot(operating_point["fpr"], operating_point["tpr"], "o", color="tab:red", label=label)
        pr.plot(operating_point["recall"], operating_point["precision"], "o", color="tab:red", label=label)
        roc.legend(loc="lower right", fontsize=8)
        pr.legend(loc="lower left", fontsize=8)
    for ax in (roc, pr):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def overlay_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    overlays: Sequence[Sequence[tuple[str, np.ndarray]]],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """One row per image ``(H, W, 3)`` (uint8 or floats in [0, 1]): the image with its caption, then each of
    its ``overlays`` (a name and a map ``(H, W)`` in [0, 1], e.g. Grad-CAM of one predicted label) over it
    (``jet``, half opaque). Images may have different numbers of overlays, none included.

    Example:
        >>> import tempfile
        >>> images = [np.zeros((8, 8, 3), np.uint8)] * 2
        >>> maps = [[("red", np.random.rand(8, 8)), ("blue", np.random.rand(8, 8))], []]
        >>> overlay_grid(images, ["a", "b"], maps, os.path.join(tempfile.mkdtemp(), "o.png")).name
        'o.png'
    """
    if not len(images) == len(captions) == len(overlays):
        raise ValueError(f"{len(images)} images, {len(captions)} captions and {len(overlays)} overlay lists.")
    rows = max(len(images), 1)
    columns = 1 + max((len(o) for o in overlays), default=0)
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    fig = Figure(
        figsize=(2.3 * columns + 0.4, (2.1 + 0.13 * lines) * rows + (0.4 if title else 0)),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (image, caption, maps) in enumerate(zip(images, captions, overlays, strict=True)):
        shown = _shown(image)
        axes[r, 0].imshow(shown)
        axes[r, 0].set_title(caption, fontsize=7, loc="left")
        for c, (name, cam) in enumerate(maps, start=1):
            axes[r, c].imshow(shown)
            axes[r, c].imshow(cam, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            axes[r, c].set_title(name, fontsize=7)
        if not maps and columns > 1:
            axes[r, 1].text(0.5, 0.5, "nothing predicted", ha="center", va="center", fontsize=7, color="0.4")
    if not len(images):
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def label_confusion_plot(
    counts: np.ndarray,
    names: Sequence[str],
    path: str | os.PathLike,
    subtitles: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Each label's 2 x 2 confusion matrix ``counts`` ``(L, 2, 2)`` (rows true absent / present, columns
    predicted absent / present, :func:`~transferkit.reporting.interpretation.label_confusion_counts`) as a
    heat map with the counts in its cells, one panel per label, each titled with its name and subtitle.

    Example:
        >>> import tempfile
        >>> counts = np.array([[[30, 2], [3, 15]], [[40, 0], [5, 5]]])
        >>> label_confusion_plot(counts, ["crack", "finger"], os.path.join(tempfile.mkdtemp(), "l.png")).name
        'l.png'
    """
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[1:] != (2, 2) or len(counts) != len(names):
        raise ValueError(
            f"counts must be ({len(names)}, 2, 2), one 2 x 2 matrix per label; got {counts.shape}."
        )
    if subtitles is not None and len(subtitles) != len(names):
        raise ValueError(f"{len(subtitles)} subtitles for {len(names)} labels.")
    columns = min(len(names), 4)
    rows = max(math.ceil(len(names) / max(columns, 1)), 1)
    fig = Figure(figsize=(2.9 * max(columns, 1), 2.8 * rows + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, max(columns, 1), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for k, (ax, name) in enumerate(zip(axes.flat, names, strict=False)):
        matrix = counts[k]
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
        for (r, c), value in np.ndenumerate(matrix):
            dark = value > matrix.max() / 2
            ax.text(
                c,
                r,
                str(int(value)),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if dark else "black",
            )
        ax.set_xticks([0, 1], ["absent", "present"], fontsize=8)
        ax.set_yticks([0, 1], ["absent", "present"], fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(str(name) + (f"\n{subtitles[k]}" if subtitles else ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def predicted_vs_true_plot(
    truth: np.ndarray,
    predicted: np.ndarray,
    path: str | os.PathLike,
    name: str = "target",
    figures: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """One target's predicted values against the true ones ``(N,)``, a point per image, with the line
    y = x (a perfect prediction) and ``figures`` (``mae``, ``rmse``, ``r2``: a row of
    :func:`~transferkit.reporting.interpretation.per_target_table`) in the title, both axes in the target's
    own units and on the same scale.

    Example:
        >>> import tempfile
        >>> truth = np.linspace(0, 1, 20)
        >>> predicted_vs_true_plot(truth, truth + 0.1, os.path.join(tempfile.mkdtemp(), "s.png"), "level",
        ...                        {"mae": 0.1, "rmse": 0.1, "r2": 0.88}).name
        's.png'
    """
    truth = np.asarray(truth, dtype=np.float64).ravel()
    predicted = np.asarray(predicted, dtype=np.float64).ravel()
    if truth.shape != predicted.shape:
        raise ValueError(f"{truth.size} true values but {predicted.size} predicted ones.")
    fig = Figure(figsize=(4.6, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    both = np.concatenate([truth, predicted])
    low, high = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    pad = 0.05 * (high - low) if high > low else 0.5
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "k--", linewidth=1, label="y = x")
    ax.scatter(
        truth, predicted, s=14, alpha=0.7, color="tab:blue", edgecolors="none", label=f"{truth.size} images"
    )
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"true {name}")
    ax.set_ylabel(f"predicted {name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    text = str(name)
    if figures:

        def show(value: Any, digits: str) -> str:
            return "n/a" if value is None else format(value, digits)

        text += (
            f": MAE {show(figures.get('mae'), '.4g')}, RMSE {show(figures.get('rmse'), '.4g')}, "
            f"$R^2$ {show(figures.get('r2'), '.3f')}"
        )
    ax.set_title(f"{title}\n{text}" if title else text, fontsize=9)
    return save_png(fig, path)


def _shown(image: np.ndarray) -> np.ndarray:
    shown = np.asarray(image)
    return shown.astype(np.float32) / 255.0 if shown.dtype == np.uint8 else np.clip(shown, 0.0, 1.0)
