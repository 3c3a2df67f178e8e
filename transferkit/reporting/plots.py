"""Pictures of a fine-tuning run: augmentation previews, learning curves, confusion matrices, comparisons.

Every plotting function draws on its own matplotlib ``Figure`` with the Agg canvas (no pyplot state, no
display needed, safe in scripts, tests and notebooks alike), writes a PNG and returns its path. Each one
has a data function next to it that computes what is drawn, so the numbers can be checked or reused:
:func:`augmentation_grid` shows :func:`augmentation_views`, :func:`learning_curves` draws
:func:`epoch_metrics`, :func:`confusion_matrix_plot` draws :func:`confusion_counts`.

Example:
    >>> import numpy as np, tempfile, os
    >>> from transferkit.reporting import plots
    >>> out = tempfile.mkdtemp()
    >>> path = plots.compare_curves({"adam": [0.5, 0.8, 0.9], "sgd": [0.3, 0.5, 0.6]}, os.path.join(out, "c.png"))
    >>> path.name
    'c.png'
"""

from __future__ import annotations

import copy
import csv
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from transferkit.data.augment import Augment, build_train_transform
from transferkit.data.images import load_image, to_rgb

__all__ = [
    "save_png",
    "augmentation_grid",
    "augmentation_views",
    "compare_curves",
    "confusion_counts",
    "confusion_matrix_plot",
    "epoch_metrics",
    "learning_curves",
    "unfreeze_epochs_from",
]

NormalizeMode = Literal["true", "pred", "all"] | None

# what learning_curves draws, in order of preference: a train column, then its validation partner
_LOSS_COLUMNS = (("train_loss_epoch", "train_loss"), ("val_loss",))
_ACC_COLUMNS = (("train_acc_epoch", "train_acc"), ("val_acc",))


# --- augmentation ----------------------------------------------------------------------------------


def _as_rgb(image: np.ndarray | str | os.PathLike) -> np.ndarray:
    if isinstance(image, str | os.PathLike):
        return load_image(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(
            f"images must be uint8 arrays (H, W[, C]) or file paths, got an array of dtype {array.dtype}."
        )
    return to_rgb(array)


def _display_pipeline(
    augment: Augment | A.BasicTransform | A.BaseCompose, image_size: int, seed: int
) -> tuple[A.Compose, bool]:
    """The train pipeline without Normalize/ToTensor, and whether it resizes by itself."""
    if isinstance(augment, A.BaseCompose | A.BasicTransform):
        # a Compose's own transforms (OneOf/SomeOf inside it stay whole), or the one transform given
        transforms = list(augment.transforms) if isinstance(augment, A.BaseCompose) else [augment]
        resizes = False
    else:
        # the exact pipeline the data module trains with (mean 0, std 1: Normalize is dropped below)
        transforms = list(build_train_transform(augment, image_size, (0.0,) * 3, (1.0,) * 3).transforms)
        resizes = True
    # copies: composing seeds the transforms' random generators, which must not touch the caller's
    kept = [copy.deepcopy(t) for t in transforms if not isinstance(t, A.Normalize | ToTensorV2)]
    return A.Compose(kept, seed=seed), resizes


def augmentation_views(
    augment: Augment | A.BasicTransform | A.BaseCompose,
    images: Sequence[np.ndarray | str | os.PathLike],
    n_views: int = 4,
    image_size: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Each image resized, then ``n_views`` draws of the train-time augmentation, as one array.

    Args:
        augment: what :class:`~transferkit.ImageDataModule` accepts as ``augment`` (a preset name
            ``none``/``light``/``medium``/``heavy``, a list of ``{Name: {params}}`` transforms, an
            ``A.to_dict`` dict), or an Albumentations transform or ``A.Compose`` (such as a data
            module's ``train_transform``). Normalize and ToTensorV2 are left out, so views stay pixels.
        images: ``(H, W)``, ``(H, W, 1|3|4)`` uint8 arrays or image file paths.
        n_views: augmented views per image.
        image_size: side of the square views; ``None`` = the larger side of the first image.
        seed: seed of the pipeline's random draws (the same seed gives the same views).

    Returns:
        ``(len(images), 1 + n_views, image_size, image_size, 3)`` uint8: column 0 is the image resized
        as the eval pipeline does, columns 1.. are augmented views.

    Example:
        >>> import numpy as np
        >>> image = np.zeros((16, 16, 3), np.uint8); image[:, :4] = 255  # bright left edge
        >>> views = augmentation_views([{"HorizontalFlip": {"p": 1.0}}], [image], n_views=2)
        >>> views.shape
        (1, 3, 16, 16, 3)
        >>> bool(views[0, 1, :, -1].all()), bool(views[0, 0, :, -1].any())  # the edge moved right
        (True, False)
    """
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}.")
    sources = [_as_rgb(image) for image in images]
    if not sources:
        raise ValueError("augmentation_views needs at least one image.")
    size = int(image_size or max(sources[0].shape[:2]))
    pipeline, resizes = _display_pipeline(augment, size, seed)
    resize = A.Resize(size, size, interpolation=cv2.INTER_AREA)

    rows = []
    for source in sources:
        original = resize(image=source)["image"]
        row = [original]
        for _ in range(n_views):
            view = pipeline(image=source if resizes else original)["image"]
            if view.shape[:2] != (size, size):
                view = resize(image=view)["image"]
            if view.dtype != np.uint8:  # a float transform (ToFloat): values in [0, 1]
                view = np.clip(np.rint(view * 255), 0, 255).astype(np.uint8)
            row.append(view)
        rows.append(np.stack(row))
    return np.stack(rows)


def _describe(augment: Any) -> str:
    if isinstance(augment, str):
        return f"augmentation preset '{augment}'"
    if isinstance(augment, A.BaseCompose | A.BasicTransform):
        return "augmentation pipeline"
    return "inline augmentation pipeline"


def augmentation_grid(
    augment: Augment | A.BasicTransform | A.BaseCompose,
    images: Sequence[np.ndarray | str | os.PathLike],
    path: str | os.PathLike,
    n_views: int = 4,
    image_size: int | None = None,
    seed: int = 0,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """A grid PNG: one row per image, the original then ``n_views`` augmented views.

    Arguments as in :func:`augmentation_views` (which computes the pixels), plus ``path`` (the PNG to
    write), ``title`` (default: the preset's name, or "inline augmentation pipeline") and ``row_labels``
    (one per image, e.g. its class, written left of the row).

    Example:
        >>> import numpy as np, tempfile, os
        >>> rng = np.random.default_rng(0)
        >>> images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
        >>> png = augmentation_grid("medium", images, os.path.join(tempfile.mkdtemp(), "grid.png"), n_views=3)
        >>> png.suffix
        '.png'
    """
    views = augmentation_views(augment, images, n_views=n_views, image_size=image_size, seed=seed)
    rows, cols = views.shape[:2]
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels needs one label per image: {len(row_labels)} labels for {rows} images.")
    fig = Figure(figsize=(1.7 * cols, 1.7 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(views[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"view {c}", fontsize=9)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[r]), fontsize=9)
    fig.suptitle(title or _describe(augment), fontsize=11)
    return save_png(fig, path)


def mixed_batch_views(
    images: Sequence[np.ndarray | str | os.PathLike],
    labels: Sequence[int],
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
    image_size: int = 224,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``images`` as one training batch mixed by :class:`~transferkit.models.mixing.BatchMixing`:
    ``(B, S, S, 3)`` uint8 views and their ``(B, num_classes)`` targets (the share of each class)."""
    import torch

    from transferkit.models.mixing import BatchMixing

    batch = np.stack(
        [
            cv2.resize(_as_rgb(image), (image_size, image_size), interpolation=cv2.INTER_AREA)
            for image in images
        ]
    )
    tensors = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    mixing = BatchMixing(mixup_alpha, cutmix_alpha, 1.0, switch_prob, num_classes)
    state = np.random.get_state()  # timm draws from NumPy's global generator: leave it as it was
    np.random.seed(seed)
    try:
        mixed, targets = mixing.mix(tensors, torch.as_tensor(list(labels)))
    finally:
        np.random.set_state(state)
    views = mixed.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()
    return views, targets.numpy()


def mixed_batch(
    images: Sequence[np.ndarray | str | os.PathLike],
    labels: Sequence[int],
    class_names: Sequence[str],
    path: str | os.PathLike,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
    image_size: int = 224,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """One mixed training batch (:func:`mixed_batch_views`), each image titled with its target.

    Example:
        >>> import tempfile, os
        >>> rng = np.random.default_rng(0)
        >>> images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
        >>> mixed_batch(images, [0, 1, 0, 1], ["a", "b"], os.path.join(tempfile.mkdtemp(), "m.png"),
        ...             cutmix_alpha=1.0, image_size=32).name
        'm.png'
    """
    views, targets = mixed_batch_views(
        images, labels, len(class_names), mixup_alpha, cutmix_alpha, switch_prob, image_size, seed
    )
    fig = Figure(figsize=(2.0 * len(views), 2.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(views), squeeze=False)[0]
    for ax, view, target in zip(axes, views, targets, strict=True):
        ax.imshow(view, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        shares = [
            f"{share:.2f} {name}"
            for share, name in sorted(zip(target, class_names, strict=True), reverse=True)
            if share > 0.005
        ]
        ax.set_title("\n".join(shares), fontsize=8)
    fig.suptitle(
        title or f"one batch, mixup alpha {mixup_alpha:g}, CutMix alpha {cutmix_alpha:g}", fontsize=11
    )
    return save_png(fig, path)


# --- learning curves -------------------------------------------------------------------------------


def _to_float(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _rows_from(metrics: Any) -> tuple[list[dict[str, Any]] | None, dict[str, Sequence[Any]] | None]:
    """Either rows (each with an ``epoch``) or per-epoch columns (index = epoch)."""
    if isinstance(metrics, str | os.PathLike):
        path = Path(metrics)
        if path.is_dir():
            path = path / "metrics.csv"
        if not path.is_file():
            raise FileNotFoundError(
                f"no metrics file at '{path}'; give the metrics.csv a CSVLogger wrote "
                "(<trainer.log_dir>/metrics.csv) or the run directory holding it."
            )
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle)), None
    if hasattr(metrics, "to_dict") and not isinstance(metrics, Mapping):  # a pandas DataFrame
        metrics = metrics.to_dict(orient="list")
    if isinstance(metrics, Mapping):
        columns = {str(k): list(v) for k, v in metrics.items()}
        if "epoch" not in columns:
            return None, columns
        length = len(columns["epoch"])
        bad = {k: len(v) for k, v in columns.items() if len(v) != length}
        if bad:
            raise ValueError(f"columns must be as long as 'epoch' ({length} rows); got lengths {bad}.")
        return [{k: v[i] for k, v in columns.items()} for i in range(length)], None
    if isinstance(metrics, Sequence) and all(isinstance(row, Mapping) for row in metrics):
        return [dict(row) for row in metrics], None
    raise TypeError(
        "metrics must be a metrics.csv path (or its run directory), a DataFrame, a dict of columns "
        f"or a list of row dicts; got {type(metrics).__name__}."
    )


def epoch_metrics(metrics: Any) -> dict[str, list[float]]:
    """One value per epoch for every logged column, from what a CSVLogger writes.

    Lightning's ``CSVLogger`` writes one row per logging call, so an epoch spreads over many rows, each
    with most columns empty (NaN): step rows with ``train_loss_step``, a validation row with ``val_*``,
    an end-of-epoch row with ``train_*_epoch``. For each column and epoch this keeps the last finite
    value.

    Args:
        metrics: a ``metrics.csv`` path or the run directory holding it (``trainer.log_dir``); a pandas
            DataFrame of it; a dict of equal-length columns including ``epoch``; a list of row dicts; or
            a dict of per-epoch lists without ``epoch`` (index = epoch), taken as it is.

    Returns:
        ``{"epoch": [0, 1, ...], column: [value per epoch, NaN where the epoch logged none], ...}``.

    Example:
        >>> rows = [
        ...     {"epoch": 0, "train_loss_step": 2.3, "val_loss": None},
        ...     {"epoch": 0, "train_loss_step": None, "val_loss": 1.9},
        ...     {"epoch": 1, "train_loss_step": 1.2, "val_loss": None},
        ...     {"epoch": 1, "train_loss_step": None, "val_loss": 1.1},
        ... ]
        >>> epoch_metrics(rows)
        {'epoch': [0, 1], 'train_loss_step': [2.3, 1.2], 'val_loss': [1.9, 1.1]}
    """
    rows, columns = _rows_from(metrics)
    if columns is not None:
        length = max((len(v) for v in columns.values()), default=0)
        out: dict[str, list[float]] = {"epoch": list(range(length))}
        for name, values in columns.items():
            out[name] = [_to_float(v) for v in values] + [math.nan] * (length - len(values))
        return out

    by_epoch: dict[int, dict[str, float]] = {}
    names: list[str] = []
    for row in rows or []:
        epoch = _to_float(row.get("epoch"))
        if not math.isfinite(epoch):
            continue
        slot = by_epoch.setdefault(int(epoch), {})
        for name, value in row.items():
            if name == "epoch":
                continue
            if name not in names:
                names.append(name)
            number = _to_float(value)
            if math.isfinite(number):
                slot[name] = number  # rows are in logging order: the last one wins
    epochs = sorted(by_epoch)
    result: dict[str, list[float]] = {"epoch": epochs}
    for name in names:
        result[name] = [by_epoch[e].get(name, math.nan) for e in epochs]
    return result


def unfreeze_epochs_from(metrics: Any) -> list[int]:
    """Epochs at which more backbone groups became trainable, from the logged ``trainable_groups``."""
    table = epoch_metrics(metrics)
    groups = table.get("trainable_groups")
    if groups is None:
        return []
    out, previous = [], math.nan
    for epoch, value in zip(table["epoch"], groups, strict=True):
        if math.isfinite(value) and math.isfinite(previous) and value > previous:
            out.append(int(epoch))
        if math.isfinite(value):
            previous = value
    return out


def _series(table: dict[str, list[float]], candidates: Sequence[str]) -> tuple[str, list, list] | None:
    for name in candidates:
        if name in table:
            points = [(e, v) for e, v in zip(table["epoch"], table[name], strict=True) if math.isfinite(v)]
            if points:
                xs, ys = zip(*points, strict=True)
                return name, list(xs), list(ys)
    return None


def learning_curves(
    metrics: Any,
    path: str | os.PathLike,
    unfreeze_epochs: Sequence[int] | None = None,
    title: str | None = None,
    scores: Sequence[str] | None = None,
    score_label: str = "score",
) -> Path:
    """Loss and accuracy (or the scores named) per epoch, train vs validation, from a run's logged metrics.

    Args:
        metrics: anything :func:`epoch_metrics` reads: usually ``Path(trainer.log_dir) / "metrics.csv"``.
            Drawn: ``train_loss_epoch`` (or ``train_loss``) and ``val_loss``; ``train_acc`` and ``val_acc``
            when logged.
        path: the PNG to write.
        unfreeze_epochs: epochs at which backbone groups were unfrozen, drawn as dashed lines just before
            the epoch; ``None`` = read from the logged ``trainable_groups`` (``[]`` draws none).
        title: the figure's title.
        scores: the logged columns of the second panel in place of accuracy, each under its own name (e.g. a
            multi-label model's ``val_map`` and ``val_f1_macro``, a regression's ``train_mae`` and ``val_mae``);
            those not logged are left out. ``score_label`` names the panel's axis.

    Example:
        >>> import tempfile, os
        >>> curves = {"train_loss_epoch": [1.0, 0.6, 0.4], "val_loss": [0.9, 0.7, 0.6],
        ...           "train_acc": [0.6, 0.8, 0.9], "val_acc": [0.6, 0.75, 0.8]}
        >>> learning_curves(curves, os.path.join(tempfile.mkdtemp(), "lc.png"), unfreeze_epochs=[1]).name
        'lc.png'
    """
    table = epoch_metrics(metrics)
    second = (
        ("accuracy", _ACC_COLUMNS) if scores is None else (score_label, tuple((name,) for name in scores))
    )
    panels = []
    for label, columns in (("loss", _LOSS_COLUMNS), second):
        series = [s for s in (_series(table, names) for names in columns) if s is not None]
        if series:
            panels.append((label, series))
    if not panels:
        logged = ", ".join(k for k in table if k != "epoch") or "nothing"
        wanted = "train_acc / val_acc" if scores is None else " / ".join(scores)
        raise ValueError(
            f"no per-epoch loss or score to draw: the metrics hold {logged}. Expected train_loss_epoch / "
            f"val_loss / {wanted}, as TransferClassifier logs them."
        )
    marks = unfreeze_epochs_from(metrics) if unfreeze_epochs is None else list(unfreeze_epochs)

    fig = Figure(figsize=(5.2 * len(panels), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, series) in zip(axes, panels, strict=True):
        for name, xs, ys in series:
            style = "-o" if name.startswith("train") else "-s"
            shown = "train" if name.startswith("train") else "validation"
            named = scores is not None and label != "loss"  # several scores: each under its own name
            ax.plot(xs, ys, style, markersize=4, label=name if named else shown)
        for i, epoch in enumerate(marks):
            # the value at x = e is the end of epoch e, so unfreezing at epoch e sits between e-1 and e
            ax.axvline(
                epoch - 0.5, color="0.4", linestyle="--", linewidth=1, label="unfreeze" if i == 0 else None
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


# --- confusion matrix ------------------------------------------------------------------------------


def confusion_counts(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    num_classes: int | None = None,
    normalize: NormalizeMode = None,
) -> np.ndarray:
    """The confusion matrix ``(num_classes, num_classes)``: rows are true classes, columns predictions.

    Same convention as ``sklearn.metrics.confusion_matrix(y_true, y_pred, labels=range(num_classes),
    normalize=...)``: ``normalize="true"`` divides each row by its count, ``"pred"`` each column, ``"all"``
    everything by the total; an empty row or column stays 0.

    Example:
        >>> confusion_counts([0, 0, 1, 1, 1], [0, 1, 1, 1, 0])
        array([[1, 1],
               [1, 2]])
    """
    true = np.asarray(y_true, dtype=np.int64).ravel()
    pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.size} vs {pred.size}.")
    if true.size and min(true.min(), pred.min()) < 0:
        raise ValueError("class labels must be integers >= 0.")
    n = int(num_classes if num_classes is not None else max(true.max(initial=-1), pred.max(initial=-1)) + 1)
    if true.size and max(true.max(), pred.max()) >= n:
        raise ValueError(f"a label is >= num_classes={n}; labels must be in 0..{n - 1}.")
    counts = np.bincount(true * n + pred, minlength=n * n).reshape(n, n)
    if normalize is None:
        return counts
    if normalize not in ("true", "pred", "all"):
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}.")
    totals = {
        "true": counts.sum(axis=1, keepdims=True),
        "pred": counts.sum(axis=0, keepdims=True),
        "all": np.asarray(counts.sum()),
    }[normalize]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(counts / totals)


def confusion_matrix_plot(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    normalize: NormalizeMode = None,
    title: str | None = None,
) -> Path:
    """The confusion matrix as a heat map with the value in each cell (see :func:`confusion_counts`).

    Args:
        y_true, y_pred: integer labels ``(N,)``, in ``0..len(class_names)-1``.
        class_names: names of the classes, in label order.
        path: the PNG to write.
        normalize: ``None`` (counts), ``"true"`` (each row sums to 1: recall on the diagonal), ``"pred"``
            (each column sums to 1: precision on the diagonal) or ``"all"``.
        title: the figure's title (default: the accuracy).

    Example:
        >>> import tempfile, os
        >>> png = confusion_matrix_plot([0, 1, 1], [0, 1, 0], ["cat", "dog"],
        ...                             os.path.join(tempfile.mkdtemp(), "cm.png"), normalize="true")
        >>> png.exists()
        True
    """
    names = [str(n) for n in class_names]
    matrix = confusion_counts(y_true, y_pred, num_classes=len(names), normalize=normalize)
    raw = confusion_counts(y_true, y_pred, num_classes=len(names))
    accuracy = np.trace(raw) / max(raw.sum(), 1)
    side = max(3.5, 0.55 * len(names) + 2.0)
    fig = Figure(figsize=(side + 0.8, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max() if matrix.size else 0
    if len(names) <= 20:
        for (r, c), value in np.ndenumerate(matrix):
            text = f"{value:.2f}" if normalize else str(int(value))
            ax.text(
                c,
                r,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > top / 2 else "black",
            )
    ax.set_title(title or f"accuracy {accuracy:.3f} ({int(raw.sum())} samples)")
    return save_png(fig, path)


# --- comparisons -----------------------------------------------------------------------------------


def compare_curves(
    curves: Mapping[str, Sequence[float] | Mapping[int, float]],
    path: str | os.PathLike,
    ylabel: str = "validation accuracy",
    xlabel: str = "epoch",
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Several runs' curves on one plot, e.g. validation accuracy per epoch for each optimizer.

    Args:
        curves: ``{run name: values}``; values are a list (x = 0, 1, ...) or a ``{x: value}`` dict.
            Non-finite values are left out.
        path: the PNG to write.
        ylabel, xlabel, title: axis labels and title.
        log_y: logarithmic y axis (for losses that span decades).

    Example:
        >>> import tempfile, os
        >>> png = compare_curves({"adam": [1.2, 0.5, 0.3], "sgd": {0: 2.0, 2: 0.9}},
        ...                      os.path.join(tempfile.mkdtemp(), "loss.png"), ylabel="val loss", log_y=True)
        >>> png.name
        'loss.png'
    """
    if not curves:
        raise ValueError("compare_curves needs at least one curve.")
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    markers = "osD^v<>phx*+"
    for i, (name, values) in enumerate(curves.items()):
        pairs = sorted(values.items()) if isinstance(values, Mapping) else list(enumerate(values))
        pairs = [(x, float(y)) for x, y in pairs if y is not None and math.isfinite(float(y))]
        if not pairs:
            continue
        xs, ys = zip(*pairs, strict=True)
        linestyle = "-" if i < 10 else "--"  # the default color cycle repeats after 10
        ax.plot(
            xs, ys, linestyle=linestyle, marker=markers[i % len(markers)], markersize=3.5, label=str(name)
        )
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.5, not 5x10^-1
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2 if len(curves) > 5 else 1)
    if title:
        ax.set_title(title)
    return save_png(fig, path)


def lr_find_plot(report: Any, path: str | os.PathLike) -> Path:
    """The range tests of :func:`transferkit.training.lr_finder.lr_find`: the smoothed training loss
    against the learning rate (log axis), one panel per phase, the suggested rate marked.

    Example:
        >>> import tempfile, os, numpy as np
        >>> from transferkit.training.lr_finder import LRFindReport, LRSweep
        >>> lrs = list(np.logspace(-5, 0, 30)); losses = [1 / (1 + 100 * lr) + lr**2 for lr in lrs]
        >>> report = LRFindReport([LRSweep("head", 0, "lr", lrs, losses, 1e-2, "steepest")])
        >>> lr_find_plot(report, os.path.join(tempfile.mkdtemp(), "lr_find.png")).name
        'lr_find.png'
    """
    sweeps = list(report.sweeps)
    if not sweeps:
        raise ValueError("lr_find_plot needs at least one sweep.")
    fig = Figure(figsize=(5.2 * len(sweeps), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, sweep in zip(axes, sweeps, strict=True):
        finite = [(lr, loss) for lr, loss in zip(sweep.lrs, sweep.losses, strict=True) if math.isfinite(loss)]
        if finite:
            xs, ys = zip(*finite, strict=True)
            ax.plot(xs, ys, color="tab:blue")
            low, high = min(ys), sorted(ys)[int(0.9 * (len(ys) - 1))]
            ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.25 * (high - low + 1e-9))
        if sweep.suggestion is not None:
            ax.axvline(sweep.suggestion, color="tab:red", linestyle="--")
            ax.annotate(
                f"{sweep.parameter} = {sweep.suggestion:.2g}",
                (sweep.suggestion, 0.95),
                xycoords=("data", "axes fraction"),
                color="tab:red",
                ha="left",
                va="top",
                fontsize=9,
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"{sweep.parameter} (learning rate)")
        ax.set_ylabel("training loss (smoothed)")
        ax.set_title(f"{sweep.phase} phase, epoch {sweep.epoch}", fontsize=10)
        ax.grid(alpha=0.3)
    return save_png(fig, path)


def augment_search_plot(report: Any, path: str | os.PathLike) -> Path:
    """The trials of :func:`transferkit.tuning.augment_search.augment_search`: each candidate's mean
    validation loss minus the baseline's (lower is better), the range over its seeds as a bar, and the
    baseline's own spread over the seeds shaded (a difference inside it is no difference).

    Example:
        >>> import tempfile, os
        >>> from transferkit.tuning.augment_search import AugmentSearchReport, Trial
        >>> base = Trial("baseline", "baseline", [0.50, 0.52], [0.8, 0.8])
        >>> flip = Trial("+ HorizontalFlip(p=0.5)", {}, [0.45, 0.47], [0.82, 0.83])
        >>> report = AugmentSearchReport([flip, base], base, [], "", 0.02)
        >>> augment_search_plot(report, os.path.join(tempfile.mkdtemp(), "a.png")).name
        'a.png'
    """
    trials = list(report.trials)
    base = report.baseline.mean("val_loss")
    # a candidate's name holds its parameters: wrapped, so a long one does not squeeze the bars away
    labels = [textwrap.fill(t.name, width=42, subsequent_indent="  ") for t in trials]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(9.0, 0.3 * lines + 0.25 * len(trials) + 1.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = np.arange(len(trials))[::-1]
    for y, trial in zip(ys, trials, strict=True):
        losses = np.asarray(trial.val_loss, dtype=float) - base
        color = "tab:gray" if trial is report.baseline else ("tab:green" if losses.mean() < 0 else "tab:red")
        ax.barh(y, losses.mean(), color=color, alpha=0.8)
        if len(losses) > 1:
            ax.plot([losses.min(), losses.max()], [y, y], color="black", linewidth=1.5)
    noise = report.noise
    if noise == noise and noise > 0:  # not NaN
        ax.axvspan(-noise / 2, noise / 2, color="tab:gray", alpha=0.15, label="baseline's seed spread")
        ax.legend(fontsize=8, loc="best")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("validation loss minus the baseline's (lower is better)")
    ax.set_title("augment-search: each candidate against the recipe's pipeline", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def _minor_log_label(value: float, _position: int) -> str:
    """Label the 2s, 3s and 5s between the decades of a log axis, so a short range still reads."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if leading in (2, 3, 5) else ""


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (which must end in ``.png``), creating its folder; returns the path."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; give a path ending in .png, got '{out}'.")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
