"""Pictures of what a trained model gets wrong and how sure it is: prediction grids with Grad-CAM overlays,
reliability diagrams, ROC and precision-recall curves.

As in :mod:`transferkit.reporting.plots`, each function draws on its own Agg ``Figure``, writes a PNG and
returns its path, and what it draws is computed elsewhere: :func:`reliability_diagram` draws
:func:`~transferkit.models.calibration.reliability_bins`, :func:`roc_pr_plot` draws
:func:`~transferkit.models.calibration.roc_pr_curves`, :func:`prediction_grid` overlays
:func:`~transferkit.inference.gradcam.gradcam_maps`.
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

__all__ = ["prediction_grid", "reliability_diagram", "roc_pr_plot"]


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
