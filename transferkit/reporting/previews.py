"""The train pipeline shown: one image through it N times in a grid, with the pipeline listed under it; and
a training image's target in words, for each kind of target (:func:`target_text`)."""

from __future__ import annotations

import inspect
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np

import transferkit.reporting.plots as plots
from transferkit.containers import plain

__all__ = ["augment_preview", "pipeline_text", "target_text"]


def target_text(kind: str, names: Sequence[str], target: Any) -> str:
    """An image's target as a caption: its class (``single_label``, a class index), its labels
    (``multi_label``, 0/1 per label; ``no label`` when none is present), or its numbers (``regression``).

    Example:
        >>> target_text("single_label", ["cat", "dog"], 1), target_text("multi_label", ["red", "blue"], [1.0, 1.0])
        ('dog', 'red, blue')
        >>> target_text("regression", ["level"], [0.53125])
        'level 0.531'
    """
    if kind not in _TARGET_TEXT:
        raise ValueError(f"unknown target kind {kind!r}; choose one of {', '.join(_TARGET_TEXT)}.")
    return _TARGET_TEXT[kind]([str(n) for n in names], np.asarray(target))


# how each kind of target reads in a caption
_TARGET_TEXT = {
    "single_label": lambda names, target: names[int(target)] if names else str(int(target)),
    "multi_label": lambda names, target: (
        ", ".join(n for n, on in zip(names, target >= 0.5, strict=True) if on) or "no label"
    ),
    "regression": lambda names, target: ", ".join(
        f"{n} {float(v):.3g}" for n, v in zip(names, target.reshape(-1), strict=True)
    ),
}


def _non_default_params(transform: A.BasicTransform) -> dict[str, Any]:
    params = transform.to_dict()["transform"]
    params = {k: v for k, v in params.items() if k not in ("__class_fullname__", "transforms")}
    try:
        signature = inspect.signature(type(transform).__init__).parameters
    except (TypeError, ValueError):
        return params
    shown = {}
    for key, value in params.items():
        default = signature[key].default if key in signature else inspect.Parameter.empty
        if key == "p" or default is inspect.Parameter.empty or plain(default) != plain(value):
            shown[key] = value
    return shown


def pipeline_text(pipeline: A.BaseCompose | A.BasicTransform, indent: int = 0) -> str:
    """A compact listing of a pipeline: one transform per line with the parameters that differ from
    its defaults (and always ``p``), nested composes indented.

    Example:
        >>> print(pipeline_text(A.Compose([A.HorizontalFlip(p=0.5), A.Blur(blur_limit=(3, 5), p=0.2)])))
        1. HorizontalFlip(p=0.5)
        2. Blur(p=0.2, blur_limit=(3, 5))
    """
    pad = "   " * indent
    transforms = list(pipeline.transforms) if isinstance(pipeline, A.BaseCompose) else [pipeline]
    lines = []
    for number, transform in enumerate(transforms, start=1):
        params = ", ".join(f"{k}={v!r}" for k, v in _non_default_params(transform).items())
        lines.append(f"{pad}{number}. {type(transform).__name__}({params})")
        if isinstance(transform, A.BaseCompose):
            lines.append(pipeline_text(transform, indent + 1))
    return "\n".join(lines)


def augment_preview(
    pipeline: A.BaseCompose,
    image: np.ndarray,
    path: str | os.PathLike,
    n: int = 8,
    image_size: int | None = None,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """One image through ``pipeline`` ``n`` times, in a grid (the original first), with the pipeline's
    listing (:func:`pipeline_text`) under it; writes the PNG ``path`` and returns it.

    Args:
        pipeline: a train pipeline (e.g. ``ImageDataModule.train_transform``); Normalize and ToTensorV2
            are left out of the pictures, so they show pixels.
        image: ``(H, W, 3)`` uint8.
        n: augmented draws.
        image_size: side of the views (default: the image's larger side).
        seed: seed of the draws.
        title: the figure's title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if n < 1:
        raise ValueError(f"n must be >= 1 augmented views, got {n}.")
    views = plots.augmentation_views(pipeline, [image], n_views=n, image_size=image_size, seed=seed)[0]
    panels = len(views)
    cols = min(panels, max(3, math.ceil(math.sqrt(panels))))
    rows = math.ceil(panels / cols)
    width = max(1.8 * cols, 6.0)
    wrap = int(width * 15)  # characters per line at 7-point monospace
    text = "\n".join(
        textwrap.fill(line, wrap, subsequent_indent="      ") for line in pipeline_text(pipeline).splitlines()
    )
    text_height = 0.14 * (text.count("\n") + 2)

    fig = Figure(figsize=(width, 1.8 * rows + text_height + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.8 * rows + 0.3, text_height])
    axes = np.atleast_1d(top.subplots(rows, cols, squeeze=False)).ravel()
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= panels:
            ax.axis("off")
            continue
        ax.imshow(views[k], interpolation="nearest")
        ax.set_title("original" if k == 0 else f"draw {k}", fontsize=8)
    top.suptitle(title or f"{n} draws of the train pipeline", fontsize=10)
    bottom.text(0.01, 0.98, text, family="monospace", fontsize=7, va="top", ha="left")
    return plots.save_png(fig, path)
