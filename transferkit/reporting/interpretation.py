"""What a trained model learned and how far to trust it, for each kind of target.

:func:`interpret` computes it for one split of a data module and writes, into ``out``:

One class per image (``single_label``)::

    top_losses.png          the images the model is most wrong about (true, predicted, probability),
                            each also with its Grad-CAM overlay for the predicted class
    most_confident.png      the most confident correct predictions, the same way
    confusion_normalised.png  rows sum to 1: recall on the diagonal
    reliability.png         accuracy vs confidence, before and after temperature scaling, with the ECE
    roc_pr.png              two classes: ROC and precision-recall, the decision threshold marked
    confusion_groups.png    with class groups: the groups' confusion matrix (counts)

Several labels per image (``multi_label``)::

    top_losses.png          the images with the largest loss (binary cross-entropy, mean over labels), each
                            with one Grad-CAM overlay per predicted label (a label over its threshold)
    label_confusion.png     a 2 x 2 confusion matrix per label, at the label's threshold

Numbers (``regression``)::

    largest_errors.png      the images with the largest errors, with Grad-CAM of each target's output
    predicted_vs_true_<target>.png  predicted against true, one per target, with y = x

and, for every kind, ``interpretation.json`` (every figure as numbers: the per-class, per-label or per-target
table, the ranked images) and ``interpretation.md`` (all of it, linked). Calibration (ECE, reliability) is
a single-label section: the other kinds say why it is left out.

``python -m transferkit interpret`` runs it on a checkpoint; :meth:`transferkit.Trainer.finetune` adds the
same sections to the run report, on the test split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import transferkit.reporting.interpretation_plots as figures
import transferkit.reporting.plots as plots
from transferkit.data.augment import unnormalize
from transferkit.errors import ConfigError
from transferkit.files import atomic_write
from transferkit.inference.calibrate import split_outputs
from transferkit.models.calibration import (
    Calibration,
    expected_calibration_error,
    fit_calibration,
    reliability_bins,
    roc_pr_curves,
)
from transferkit.models.tasks import check_same_kind
from transferkit.reporting.label_tables import (
    _label_headline,
    _score,
    _target_headline,
    _units,
    draw_label_confusion,
    draw_predicted_vs_true,
    label_confusion_counts,
    label_losses,
    label_summary,
    label_thresholds,
    largest_errors,
    per_label_markdown,
    per_label_table,
    per_target_markdown,
    per_target_table,
    scatter_name,
)

__all__ = [
    "InterpretationReport",
    "LabelledImages",
    "interpret",
    "label_confusion_counts",
    "label_losses",
    "label_thresholds",
    "draw_label_confusion",
    "draw_predicted_vs_true",
    "labelled_images",
    "largest_errors",
    "per_class_table",
    "per_label_markdown",
    "per_label_table",
    "per_target_markdown",
    "per_target_table",
    "rank_predictions",
    "scatter_name",
]

# what interpret writes instead of the calibration sections, for the kinds that have none
CALIBRATION_LEFT_OUT = {
    "multi_label": (
        "Calibration (ECE, reliability diagram) is left out: it compares the most probable class's probability "
        "with how often that class is right, and a multi-label model decides each label on its own. What was "
        "fitted on validation is each label's threshold (the per-label table)."
    ),
    "regression": (
        "Calibration (ECE, reliability diagram) is left out: a regression model predicts numbers, not "
        "probabilities. The predicted-against-true scatter and the largest errors show how far to trust them."
    ),
}


@dataclass
class LabelledImages:
    """Labelled image files as :func:`interpret` reads a data module: one ``test`` split, no validation."""

    datasets: dict[str, Any]
    mean: Any
    std: Any
    num_workers: int = 0
    has_validation: bool = False


def labelled_images(
    root: str | os.PathLike,
    labels_csv: str | os.PathLike,
    class_names: list[str],
    transform: Any,
    mean: Any,
    std: Any,
    kind: str = "single_label",
) -> LabelledImages:
    """The images a CSV (a ``path`` column, paths relative to ``root``) lists, through a model's eval
    ``transform``, as a split to interpret. ``class_names``: the model's classes, labels or targets; ``kind``:
    its kind of target, which says where the CSV holds them:

    - ``single_label``: a ``label`` column; every label must be one of the model's classes;
    - ``multi_label``: a ``labels`` column of names separated by ``;`` (each one of the model's labels), or
      one 0/1 column per label, named as the model's labels;
    - ``regression``: one numeric column per target, named as the model's targets (or a ``target`` column for
      a model of one target).
    """
    from transferkit.data.datasets import ImageDataset
    from transferkit.data.sources import load_source
    from transferkit.errors import DatasetError

    if kind != "single_label":
        source = load_source(
            "csv",
            root=str(root),
            csv_path=str(labels_csv),
            target=_csv_target(Path(labels_csv), kind, [str(n) for n in class_names]),
        )
        return LabelledImages({"test": ImageDataset(list(source.items), source.labels, transform)}, mean, std)
    source = load_source("csv", root=str(root), csv_path=str(labels_csv))
    names = [str(source.class_names[int(i)]) for i in source.labels]
    unknown = sorted(set(names) - set(map(str, class_names)))
    if unknown:
        raise DatasetError(
            f"'{labels_csv}' has labels {unknown} that the model does not know; its classes are "
            f"{list(class_names)}. Use those names in the 'label' column."
        )
    index = {str(name): i for i, name in enumerate(class_names)}
    labels = np.array([index[name] for name in names], dtype=np.int64)
    return LabelledImages({"test": ImageDataset(list(source.items), labels, transform)}, mean, std)


def _csv_target(path: Path, kind: str, names: list[str]) -> Any:
    """Where a CSV of labelled files holds a multi-label or regression model's targets, named as the model
    names them (so the outputs and the CSV's columns line up)."""
    import csv

    from transferkit.data.targets import TargetSettings
    from transferkit.errors import DatasetError

    if not path.is_file():
        raise DatasetError(f"CSV file '{path}' does not exist.")
    with path.open(newline="") as handle:
        columns = next(csv.reader(handle), [])
    missing = [name for name in names if name not in columns]
    if kind == "multi_label" and "labels" in columns:  # names separated by ';', each one of the model's
        return TargetSettings(kind=kind, names=tuple(names))
    if not missing:  # a 0/1 column per label, or a numeric column per target
        return TargetSettings(kind=kind, columns=tuple(names))
    if kind == "regression" and len(names) == 1 and "target" in columns:
        return TargetSettings(kind=kind)  # one target, in the CSV's 'target' column
    want = (
        f"a 'labels' column of the model's label names separated by ';', or a 0/1 column per label named as "
        f"them ({names})"
        if kind == "multi_label"
        else f"a numeric column per target, named as the model's targets ({names})"
    )
    raise DatasetError(
        f"'{path}' has no column {missing} of the model's {kind} targets; it has {columns}. Give {want}."
    )


@dataclass
class InterpretationReport:
    """What :func:`interpret` found; ``pngs`` maps each picture's name to its file.

    ``kind`` is the model's kind of target. One class per image fills ``accuracy``, ``per_class``,
    ``top_losses``, ``most_confident``, ``calibration``, ``binary`` and ``groups``. Several labels per image
    fill ``summary`` (``map``, ``f1_macro``, ``f1_micro``, ``auroc``, ``exact_match``), ``per_label`` (see
    :func:`per_label_table`) and ``top_losses`` (each row's ``gradcam``: the labels overlaid). Numbers fill
    ``summary`` (``mae``, ``rmse``, ``r2``), ``per_target`` (:func:`per_target_table`) and ``largest_errors``.
    ``notes`` say which sections were left out for the kind, and why.
    """

    split: str
    images: int
    class_names: list[str]
    accuracy: float | None = None
    per_class: list[dict[str, Any]] = field(default_factory=list)
    top_losses: list[dict[str, Any]] = field(default_factory=list)
    most_confident: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    binary: dict[str, Any] | None = None
    gradcam_layer: str | None = None
    # with class groups: {"accuracy", "members": {group: [class names]}, "per_group": rows like per_class}
    groups: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    pngs: dict[str, Path] = field(default_factory=dict)
    markdown: Path | None = None
    kind: str = "single_label"
    summary: dict[str, float | None] = field(default_factory=dict)
    per_label: list[dict[str, Any]] | None = None
    per_target: list[dict[str, Any]] | None = None
    largest_errors: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for JSON: the fields of the report's kind of target, and those every kind has."""
        elsewhere = {name for fields in _KIND_FIELDS.values() for name in fields} - _KIND_FIELDS[self.kind]
        out = {k: v for k, v in self.__dict__.items() if k not in ("pngs", "markdown", *elsewhere)}
        out["pngs"] = {name: str(path) for name, path in self.pngs.items()}
        if self.groups is not None:  # the per-image group labels serve the picture; the figures are kept
            out["groups"] = {k: v for k, v in self.groups.items() if k not in ("labels", "predicted")}
        return out

    def table(self) -> str:
        """The per-class (per-label, per-target) table and the headline figures as text."""
        if self.per_label is not None:
            return self._label_table()
        if self.per_target is not None:
            return self._target_table()
        lines = [f"{self.split} split: {self.images} images, accuracy {self.accuracy:.4f}", ""]
        lines.append(f"{'class':<16} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}")
        for row in self.per_class:
            lines.append(
                f"{row['class'][:16]:<16} {row['precision']:>9.3f} {row['recall']:>7.3f} "
                f"{row['f1']:>6.3f} {row['support']:>8d}"
            )
        if self.groups is not None:
            lines += ["", f"class groups: accuracy {self.groups['accuracy']:.4f}"]
            lines.append(f"{'group':<16} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}")
            for row in self.groups["per_group"]:
                lines.append(
                    f"{row['class'][:16]:<16} {row['precision']:>9.3f} {row['recall']:>7.3f} "
                    f"{row['f1']:>6.3f} {row['support']:>8d}"
                )
        cal = self.calibration
        lines.append("")
        lines.append(f"ECE (15 bins) before temperature scaling: {cal['ece_before']:.4f}")
        if cal.get("ece_after") is not None:
            lines.append(
                f"ECE after (temperature {cal['temperature']:.3f}, {cal['source']}): {cal['ece_after']:.4f}"
            )
        return "\n".join(lines)

    def _label_table(self) -> str:
        lines = [f"{self.split} split: {self.images} images, {_label_headline(self.summary)}", ""]
        lines.append(
            f"{'label':<16} {'positives':>9} {'AP':>6} {'AUROC':>6} {'F1':>6} {'precision':>9} {'recall':>7} "
            f"{'threshold':>9}"
        )
        for row in self.per_label or []:
            threshold = "" if row["threshold"] is None else f"{row['threshold']:.3f}"
            threshold += {"kept": " kept", "default": " default"}.get(row["set"] or "", "")
            lines.append(
                f"{row['label'][:16]:<16} {row['positives']:>9d} {_score(row['ap']):>6} {_score(row['auroc']):>6} "
                f"{row['f1']:>6.3f} {row['precision']:>9.3f} {row['recall']:>7.3f} {threshold:>9}"
            )
        return "\n".join(lines + [""] + self.notes)

    def _target_table(self) -> str:
        lines = [f"{self.split} split: {self.images} images, {_target_headline(self.summary)}", ""]
        lines.append(f"{'target':<16} {'MAE':>10} {'RMSE':>10} {'R^2':>7} {'bias':>10}")
        for row in self.per_target or []:
            lines.append(
                f"{row['target'][:16]:<16} {_units(row['mae']):>10} {_units(row['rmse']):>10} "
                f"{_score(row['r2']):>7} {_units(row['bias']):>10}"
            )
        return "\n".join(lines + [""] + self.notes)


# the fields of an InterpretationReport that only some kinds of target fill
_KIND_FIELDS: dict[str, set[str]] = {
    "single_label": {
        "accuracy",
        "per_class",
        "top_losses",
        "most_confident",
        "calibration",
        "binary",
        "groups",
    },
    "multi_label": {"summary", "per_label", "top_losses", "notes"},
    "regression": {"summary", "per_target", "largest_errors", "notes"},
}


def rank_predictions(
    probs: np.ndarray, labels: np.ndarray, predicted: np.ndarray, count: int
) -> dict[str, np.ndarray]:
    """Indices of the ``count`` largest losses (``-log p(true class)``, largest first) and of the ``count``
    most confident correct predictions (highest predicted probability first).

    Example:
        >>> probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01]])
        >>> ranked = rank_predictions(probs, np.array([0, 0, 1, 0]), probs.argmax(1), 2)
        >>> ranked["top_losses"].tolist(), ranked["most_confident"].tolist()
        ([1, 2], [3, 0])
    """
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    top = np.argsort(-losses, kind="stable")[:count]
    correct = np.flatnonzero(predicted == labels)
    confidence = probs[correct, predicted[correct]]
    confident = correct[np.argsort(-confidence, kind="stable")[:count]]
    return {"top_losses": top, "most_confident": confident, "losses": losses}


def per_class_table(
    labels: np.ndarray, predicted: np.ndarray, class_names: list[str]
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class (scikit-learn's), then the macro average."""
    from sklearn.metrics import precision_recall_fscore_support

    classes = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    rows = [
        {
            "class": str(name),
            "precision": float(p),
            "recall": float(r),
            "f1": float(f),
            "support": int(s),
        }
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    ]
    rows.append(
        {
            "class": "macro average",
            "precision": float(np.mean(precision)),
            "recall": float(np.mean(recall)),
            "f1": float(np.mean(f1)),
            "support": int(np.sum(support)),
        }
    )
    return rows


def _group_figures(
    groups: dict[str, list[int]] | None, probs: np.ndarray, labels: np.ndarray, names: list[str]
) -> dict[str, Any] | None:
    """With class groups (``{group: [class index]}``): the groups' accuracy and per-group table, scored as
    the test loop scores ``test_group_acc`` (a group's probability is the sum of its classes', the most
    probable group is predicted). ``labels``/``predicted`` are kept for the confusion matrix, not saved."""
    if not groups:
        return None
    from transferkit.data.class_groups import group_labels, group_probabilities

    grouped = group_probabilities(torch.as_tensor(probs), groups).argmax(dim=-1).numpy()
    truth = group_labels(torch.as_tensor(labels), groups).numpy()
    return {
        "accuracy": float((grouped == truth).mean()) if len(truth) else float("nan"),
        "members": {g: [names[c] for c in members] for g, members in groups.items()},
        "per_group": per_class_table(truth, grouped, list(groups)),
        "labels": truth,
        "predicted": grouped,
    }


def _item_name(dataset: Any, index: int) -> str:
    items = getattr(dataset, "items", None)
    if items is not None and isinstance(items[index], str | os.PathLike):
        return Path(items[index]).name
    return f"#{index}"


class _Looking:
    """What each kind's interpretation shares: the split's images as the model saw them, Grad-CAM (its layer
    found once), and pictures drawn or reported as problems."""

    def __init__(
        self, model: Any, datamodule: Any, split: str, out: Path, count: int, gradcam: bool, names: list[str]
    ) -> None:
        self.model, self.split, self.out, self.count, self.gradcam = model, split, out, count, gradcam
        self.names = names
        self.datamodule = datamodule
        self.has_validation = bool(getattr(datamodule, "has_validation", False))
        self.dataset = datamodule.datasets[split]
        self.mean, self.std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if self.mean is None or self.std is None:
            config = model.data_config
            self.mean, self.std = config["mean"], config["std"]
        self.problems: list[str] = []
        self.layer: Any = None  # Grad-CAM's layer, looked up with the first maps
        self.layer_name: str | None = None

    def attempt(self, report: InterpretationReport, name: str, draw: Callable[[Path], Path]) -> None:
        try:
            report.pngs[name] = draw(self.out / name)
        except Exception as err:  # a picture that fails is reported, the others are still drawn
            self.problems.append(f"`{name}` was not drawn: {type(err).__name__}: {err}")

    def images(self, chosen: Sequence[int]) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        """The eval-pipeline tensors of samples ``chosen`` and the images they show."""
        tensors = [self.dataset[int(i)][0] for i in chosen]
        return tensors, [unnormalize(t, self.mean, self.std) for t in tensors]

    def maps(self, tensors: Sequence[torch.Tensor], outputs: Sequence[int]) -> np.ndarray | None:
        """Grad-CAM maps of each tensor for the output (class, label or target) beside it; ``None`` when
        Grad-CAM is off or cannot read the architecture (said in ``problems``)."""
        if not self.gradcam or not len(tensors):
            return None
        try:
            from transferkit.inference.gradcam import gradcam_layer, gradcam_maps

            self.layer = self.layer or gradcam_layer(self.model, int(tensors[0].shape[-1]))
            self.layer_name = self.layer[2]
            return gradcam_maps(
                self.model, torch.stack(list(tensors)), classes=list(outputs), layer=self.layer
            )
        except (ConfigError, ImportError) as err:  # an architecture it cannot read; grad-cam missing
            if str(err) not in self.problems:
                self.problems.append(str(err))
            return None

    def overlays(
        self, tensors: Sequence[torch.Tensor], outputs: Sequence[Sequence[int]]
    ) -> list[list[tuple[str, np.ndarray]]]:
        """Per image, a Grad-CAM map for each of its ``outputs`` (one call for them all), named by the output."""
        pairs = [(i, o) for i, chosen in enumerate(outputs) for o in chosen]
        maps = self.maps([tensors[i] for i, _ in pairs], [o for _, o in pairs]) if pairs else None
        found: list[list[tuple[str, np.ndarray]]] = [[] for _ in tensors]
        if maps is not None:
            for (i, o), cam in zip(pairs, maps, strict=True):
                found[i].append((self.names[o], cam))
        return found


def interpret(
    model: Any,
    datamodule: Any,
    split: str = "test",
    out: str | os.PathLike = "interpretation",
    count: int = 8,
    gradcam: bool = True,
    outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> InterpretationReport:
    """Interpret ``model`` on ``split`` of a set-up ``datamodule``; write the pictures, ``interpretation.json``
    and ``interpretation.md`` into ``out`` (what each kind of target gets: see the module's docstring).

    Args:
        model: a :class:`~transferkit.TransferClassifier`; its stored calibration (temperature, decision
            threshold, per-label thresholds) decides its probabilities and predictions, as ``predict`` would.
        datamodule: an :class:`~transferkit.ImageDataModule` after ``setup``.
        split: ``test`` or ``val``.
        out: the folder to write into.
        count: images in each grid (top losses, most confident, largest errors).
        gradcam: overlay Grad-CAM maps (:func:`~transferkit.inference.gradcam.gradcam_maps`): of the predicted
            class, of each predicted label, of each target's output; an architecture it does not support is
            noted in ``problems``, the rest is still written.
        outputs: the split's raw outputs ``(V, N, K)`` and truth (labels ``(N,)``, 0/1 labels or numbers
            ``(N, K)``) when already computed (the test loop keeps them), else the split is predicted here.

    Single-label calibration: "before" is the model's plain softmax; "after" uses the stored temperature when
    the model was calibrated, otherwise one fitted here on the validation split (shown, not stored). Without a
    validation split only "before" is shown. The other kinds have no such section (``notes`` say why).

    Example:
        >>> import tempfile, transferkit as tk
        >>> dm = tk.ImageDataModule(source="digits", pipeline={"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3},
        ...                         loader={"num_workers": 0}, split={"max_samples": 200}, cache={"dir": tempfile.mkdtemp()})
        >>> dm.setup("fit")
        >>> model = tk.TransferClassifier(num_classes=10, backbone="test_efficientnet", pretrained=False)
        >>> report = interpret(model, dm, out=tempfile.mkdtemp(), count=4)
        >>> sorted(report.pngs), len(report.top_losses)
        (['confusion_normalised.png', 'most_confident.png', 'reliability.png', 'top_losses.png'], 4)
    """
    check_same_kind(model, datamodule)
    if split not in ("test", "val"):
        raise ConfigError(f"interpret looks at the 'test' or 'val' split, got '{split}'.")
    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count}.")
    kind = getattr(getattr(model, "task", None), "kind", "single_label")
    if kind not in _INTERPRETERS:
        raise ConfigError(
            f"interpret knows the target kinds {', '.join(_INTERPRETERS)}; this model's is {kind!r}. Interpret "
            "a model of one of those kinds."
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logits, truth = outputs if outputs is not None else split_outputs(model, datamodule, split)
    logits = torch.as_tensor(logits).float()
    logits = logits[None] if logits.ndim == 2 else logits
    names = [str(n) for n in getattr(model, "class_names", None) or range(logits.shape[-1])]
    looking = _Looking(model, datamodule, split, out, count, gradcam, names)
    report = _INTERPRETERS[kind](looking, logits, torch.as_tensor(truth))
    report.gradcam_layer = looking.layer_name
    atomic_write(
        out / "interpretation.json", json.dumps(report.to_dict(), indent=2) + "\n", what="interpretation"
    )
    report.markdown = atomic_write(
        out / "interpretation.md", interpretation_markdown(report, out), what="report"
    )
    return report


def _interpret_classes(looking: _Looking, logits: torch.Tensor, truth: torch.Tensor) -> InterpretationReport:
    """One class per image: top losses and most confident with Grad-CAM, per-class table, normalised confusion,
    calibration (and ROC/PR for two classes, the groups' confusion with class groups)."""
    model, split, names, problems = looking.model, looking.split, looking.names, looking.problems
    labels = truth.long().numpy()
    stored: Calibration = model.calibration
    probs = stored.probabilities(logits).mean(dim=0)
    predicted = stored.predict(probs).numpy()
    probs = probs.numpy()
    raw = logits.softmax(dim=-1).mean(dim=0).numpy()
    accuracy = float((predicted == labels).mean())

    # calibration: stored, or fitted on validation here for the picture only
    after: Calibration | None = stored if stored.fitted else None
    source = f"stored, fitted on {stored.fitted_on}" if stored.fitted else None
    if after is None and looking.has_validation and split != "val":
        val_logits, val_labels = split_outputs(model, looking.datamodule, "val")
        after = fit_calibration(val_logits, val_labels)
        source = f"fitted here on {after.fitted_on}, not stored"
    elif after is None and split == "val":
        after = fit_calibration(logits, torch.as_tensor(labels))
        source = f"fitted here on this split ({after.fitted_on}, optimistic), not stored"
    bins = {"before (softmax)": reliability_bins(raw, labels, 15)}
    eces = {"before (softmax)": expected_calibration_error(raw, labels)}
    calibration: dict[str, Any] = {"ece_before": eces["before (softmax)"], "ece_after": None}
    if after is not None:
        calibrated = after.probabilities(logits).mean(dim=0).numpy()
        key = f"after (T = {after.temperature:.2f})"
        bins[key] = reliability_bins(calibrated, labels, 15)
        eces[key] = expected_calibration_error(calibrated, labels)
        nll = lambda p: float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())  # noqa: E731
        calibration.update(
            ece_after=eces[key],
            temperature=after.temperature,
            source=source,
            nll_before=nll(raw),
            nll_after=nll(calibrated),
        )
    report = InterpretationReport(
        split=split,
        images=len(labels),
        accuracy=accuracy,
        class_names=names,
        per_class=per_class_table(labels, predicted, names),
        calibration=calibration,
        groups=_group_figures(getattr(model, "class_groups", None), probs, labels, names),
        problems=problems,
    )

    # top losses and most confident correct, as the model saw them, with Grad-CAM for the predicted class
    ranked = rank_predictions(probs, labels, predicted, looking.count)
    for key, heading in (("top_losses", "top losses"), ("most_confident", "most confident, correct")):
        chosen = ranked[key].tolist()
        rows = [
            {
                "index": int(i),
                "image": _item_name(looking.dataset, i),
                "true": names[labels[i]],
                "predicted": names[predicted[i]],
                "probability": float(probs[i, predicted[i]]),
                "loss": float(ranked["losses"][i]),
            }
            for i in chosen
        ]
        setattr(report, key, rows)
        tensors, shown = looking.images(chosen)
        titles = [
            f"{r['image']}\ntrue {r['true']}, pred {r['predicted']} ({r['probability']:.2f})" for r in rows
        ]
        maps = looking.maps(tensors, [int(predicted[i]) for i in chosen])
        looking.attempt(
            report,
            f"{key}.png",
            lambda path, shown=shown, titles=titles, maps=maps, heading=heading: figures.prediction_grid(
                shown, titles, path, maps=maps, title=f"{split} split: {heading}"
            ),
        )

    looking.attempt(
        report,
        "confusion_normalised.png",
        lambda path: plots.confusion_matrix_plot(
            labels, predicted, names, path, normalize="true", title=f"{split} split, rows sum to 1 (recall)"
        ),
    )
    looking.attempt(
        report,
        "reliability.png",
        lambda path: figures.reliability_diagram(
            bins, eces, path, title=f"{split} split: {len(labels)} images"
        ),
    )
    if report.groups is not None:
        groups = report.groups
        looking.attempt(
            report,
            "confusion_groups.png",
            lambda path: plots.confusion_matrix_plot(
                groups["labels"],
                groups["predicted"],
                list(groups["members"]),
                path,
                title=f"{split} split, class groups: accuracy {groups['accuracy']:.3f}",
            ),
        )
    if len(names) == 2 and len(np.unique(labels)) == 2:
        curves = roc_pr_curves(probs[:, 1], labels)
        threshold = stored.threshold if stored.threshold is not None else 0.5
        decided = probs[:, 1] >= threshold
        positives, negatives = labels == 1, labels == 0
        point = {
            "threshold": threshold,
            "tpr": float(decided[positives].mean()),
            "fpr": float(decided[negatives].mean()),
            "recall": float(decided[positives].mean()),
            "precision": float(positives[decided].mean()) if decided.any() else 1.0,
        }
        report.binary = {
            "roc_auc": curves["roc_auc"],
            "average_precision": curves["average_precision"],
            **point,
        }
        looking.attempt(
            report, "roc_pr.png", lambda path: figures.roc_pr_plot(curves, path, operating_point=point)
        )
    return report


def _interpret_labels(looking: _Looking, logits: torch.Tensor, truth: torch.Tensor) -> InterpretationReport:
    """Several labels per image: the per-label table at the stored thresholds, each label's 2 x 2 confusion,
    and the images with the largest loss, with Grad-CAM of each predicted label."""
    model, split, names = looking.model, looking.split, looking.names
    task = model.task
    scores = task.scores(logits)
    decided = task.decide(scores, model.calibration).numpy()
    probs = scores.numpy()
    present = (truth.float().numpy() >= 0.5).astype(int)
    thresholds = label_thresholds(model.calibration, len(names))
    rows = per_label_table(present, probs, decided, names, thresholds)
    notes = [CALIBRATION_LEFT_OUT["multi_label"]]
    if split == "val" and any(r["set"] == "fitted" for r in thresholds):
        notes.append(
            "The thresholds were fitted on this split, so its F1, precision and recall are optimistic; AP and "
            "AUROC are not affected."
        )
    report = InterpretationReport(
        split=split,
        images=len(present),
        class_names=names,
        problems=looking.problems,
        kind="multi_label",
        summary=label_summary(rows, present, decided),
        per_label=rows,
        notes=notes,
    )
    losses = label_losses(probs, present)
    chosen = np.argsort(-losses, kind="stable")[: looking.count].tolist()
    wanted = [np.flatnonzero(decided[i]).tolist() for i in chosen]
    tensors, shown = looking.images(chosen)
    overlays = looking.overlays(tensors, wanted)
    for i, maps in zip(chosen, overlays, strict=True):
        report.top_losses.append(
            {
                "index": int(i),
                "image": _item_name(looking.dataset, i),
                "true": [names[j] for j in np.flatnonzero(present[i])],
                "predicted": [names[j] for j in np.flatnonzero(decided[i])],
                "probabilities": {name: float(p) for name, p in zip(names, probs[i], strict=True)},
                "loss": float(losses[i]),
                "gradcam": [name for name, _ in maps],
            }
        )
    captions = [
        f"{r['image']}, loss {r['loss']:.3f}\ntrue: {_with_probabilities(r, 'true')}\n"
        f"predicted: {_with_probabilities(r, 'predicted')}"
        for r in report.top_losses
    ]
    overlays = [[(f"Grad-CAM: {name}", cam) for name, cam in maps] for maps in overlays]
    looking.attempt(
        report,
        "top_losses.png",
        lambda path: figures.overlay_grid(
            shown, captions, overlays, path, title=f"{split} split: top losses (BCE, mean over labels)"
        ),
    )
    looking.attempt(
        report,
        "label_confusion.png",
        lambda path: draw_label_confusion(present, decided, rows, names, path, split),
    )
    return report


def _interpret_values(looking: _Looking, logits: torch.Tensor, truth: torch.Tensor) -> InterpretationReport:
    """Numbers: the per-target table, a predicted-against-true scatter per target, and the images with the
    largest errors, with Grad-CAM of each target's output."""
    model, split, names = looking.model, looking.split, looking.names
    values = model.task.scores(logits).numpy().astype(np.float64)
    true = truth.double().numpy().reshape(len(values), -1)
    rows = per_target_table(true, values, names)
    overall = rows[-1]
    report = InterpretationReport(
        split=split,
        images=len(true),
        class_names=names,
        problems=looking.problems,
        kind="regression",
        summary={"mae": overall["mae"], "rmse": overall["rmse"], "r2": overall["r2"]},
        per_target=rows,
        largest_errors=[],
        notes=[CALIBRATION_LEFT_OUT["regression"]],
    )
    ranked = largest_errors(true, values, model.task.describe().get("std"), looking.count)
    chosen = ranked["indices"].tolist()
    tensors, shown = looking.images(chosen)
    overlays = looking.overlays(tensors, [list(range(len(names)))] * len(chosen))
    for i in chosen:
        report.largest_errors.append(
            {
                "index": int(i),
                "image": _item_name(looking.dataset, i),
                "true": {n: float(v) for n, v in zip(names, true[i], strict=True)},
                "predicted": {n: float(v) for n, v in zip(names, values[i], strict=True)},
                "error": {n: float(v) for n, v in zip(names, values[i] - true[i], strict=True)},
                "scaled_error": float(ranked["scaled"][i]),
            }
        )
    captions = [
        r["image"]
        + "".join(
            f"\n{n}: true {_units(r['true'][n])}, pred {_units(r['predicted'][n])} "
            f"(error {'+' if r['error'][n] >= 0 else ''}{_units(r['error'][n])})"
            for n in names[:3]
        )
        for r in report.largest_errors
    ]
    overlays = [[(f"Grad-CAM: {name}", cam) for name, cam in maps] for maps in overlays]
    looking.attempt(
        report,
        "largest_errors.png",
        lambda path: figures.overlay_grid(
            shown, captions, overlays, path, title=f"{split} split: largest errors"
        ),
    )
    for i in range(len(names)):
        looking.attempt(
            report,
            scatter_name(names, i),
            lambda path, i=i: draw_predicted_vs_true(true, values, rows, names, i, path, split),
        )
    return report


# how each kind of target is interpreted (the one place interpret tells the kinds apart)
_INTERPRETERS: dict[str, Callable[[_Looking, torch.Tensor, torch.Tensor], InterpretationReport]] = {
    "single_label": _interpret_classes,
    "multi_label": _interpret_labels,
    "regression": _interpret_values,
}


def interpretation_markdown(
    report: InterpretationReport, folder: Path, level: int = 1, tables: bool = True
) -> str:
    """The report's sections as markdown, the pictures linked relative to ``folder``; ``level`` is the
    heading level of the title (2 inside the run report). ``tables=False`` leaves out the per-label or
    per-target table and its pictures (the run report shows them already, from the test loop); a single-label
    report is written whole."""
    h = "#" * level
    lines = [f"{h} Interpretation ({report.split} split, {report.images} images)", ""]
    lines += _MARKDOWN.get(report.kind, _classes_markdown)(report, folder, h, tables)
    if report.problems:
        lines += ["", f"{h}# Problems", ""] + [f"- {p}" for p in report.problems]
    return "\n".join(lines) + "\n"


def _figure(
    report: InterpretationReport, folder: Path, name: str, heading: str, caption: str = ""
) -> list[str]:
    """A picture and its caption, or the line saying it was not drawn."""
    if name in report.pngs:
        lines = [f"![{heading}]({os.path.relpath(report.pngs[name], folder)})", ""]
    else:
        lines = ["Not drawn; see Problems.", ""]
    return lines + ([caption] if caption else [])


def _classes_markdown(report: InterpretationReport, folder: Path, h: str, tables: bool) -> list[str]:
    def link(name: str) -> str:
        return os.path.relpath(report.pngs[name], folder)

    lines = [f"Accuracy {report.accuracy:.4f}.", ""]
    lines += [
        f"{h}# Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
        for r in report.per_class
    ]
    if report.groups is not None:
        members = "; ".join(f"{g} = {', '.join(m)}" for g, m in report.groups["members"].items())
        lines += [
            "",
            f"{h}# Per class group",
            "",
            f"The classes scored in groups ({members}): accuracy {report.groups['accuracy']:.4f}.",
            "",
            "| group | precision | recall | F1 | support |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
            for r in report.groups["per_group"]
        ]
        lines += [""]
        if "confusion_groups.png" in report.pngs:
            lines += [f"![Confusion matrix of the class groups]({link('confusion_groups.png')})", ""]
            lines.append("Rows: true group; columns: predicted group (counts).")
        else:
            lines.append("The groups' confusion matrix was not drawn; see Problems.")
    sections = [
        (
            "confusion_normalised.png",
            "Confusion matrix, row-normalised",
            "Rows: true class, each summing to 1.",
        ),
        (
            "top_losses.png",
            "Top losses",
            "The images with the largest loss: caption = true class, predicted class (its probability). "
            + (f"Grad-CAM from `{report.gradcam_layer}`." if report.gradcam_layer else ""),
        ),
        ("most_confident.png", "Most confident correct predictions", ""),
    ]
    cal = report.calibration
    text = f"ECE {cal['ece_before']:.4f} before temperature scaling"
    if cal.get("ece_after") is not None:
        text += (
            f", {cal['ece_after']:.4f} after (temperature {cal['temperature']:.3f}, {cal['source']}); "
            f"NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}."
        )
    sections.append(("reliability.png", "Calibration", text))
    if report.binary is not None:
        b = report.binary
        sections.append(
            (
                "roc_pr.png",
                "ROC and precision-recall",
                f"ROC AUC {b['roc_auc']:.3f}, average precision {b['average_precision']:.3f}; decision threshold "
                f"{b['threshold']:.3f}: recall {b['recall']:.3f}, precision {b['precision']:.3f}.",
            )
        )
    for name, heading, caption in sections:
        lines += ["", f"{h}# {heading}", ""]
        if name in report.pngs:
            lines += [f"![{heading}]({link(name)})", ""]
        else:
            lines += ["Not drawn; see Problems.", ""]
        if caption:
            lines.append(caption)
    return lines


def _labels_markdown(report: InterpretationReport, folder: Path, h: str, tables: bool) -> list[str]:
    lines = [_label_headline(report.summary) + ".", ""]
    if tables:
        lines += [f"{h}# Per label", ""] + per_label_markdown(report.per_label or []) + [""]
        lines += _figure(
            report,
            folder,
            "label_confusion.png",
            "Each label's confusion matrix",
            "Each label at its threshold: rows true absent / present, columns predicted absent / present.",
        )
        lines.append("")
    gradcam = (
        f" Beside each image, Grad-CAM from `{report.gradcam_layer}` of each predicted label (a label over its "
        "threshold): the regions that raise that label's probability."
        if report.gradcam_layer
        else ""
    )
    lines += [f"{h}# Top losses", ""]
    lines += _figure(
        report,
        folder,
        "top_losses.png",
        "Top losses",
        "The images with the largest loss (binary cross-entropy of the labels' probabilities, the mean over "
        f"labels): caption = true labels, predicted labels, each with its probability.{gradcam}",
    )
    lines += ["", "| image | true | predicted | loss |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {r['image']} | {_with_probabilities(r, 'true')} | {_with_probabilities(r, 'predicted')} | "
        f"{r['loss']:.4f} |"
        for r in report.top_losses
    ]
    return lines + ["", f"{h}# Calibration", ""] + _notes(report)


def _values_markdown(report: InterpretationReport, folder: Path, h: str, tables: bool) -> list[str]:
    names = report.class_names
    lines = [_target_headline(report.summary) + ".", ""]
    if tables:
        lines += [f"{h}# Per target", ""] + per_target_markdown(report.per_target or []) + [""]
        for i, name in enumerate(names):
            lines += _figure(report, folder, scatter_name(names, i), f"Predicted against true: {name}")
            lines.append("")
        lines.append("Each point an image; the line is y = x (a perfect prediction).")
        lines.append("")
    lines += [f"{h}# Largest errors", ""]
    lines += ["| image | " + " | ".join(f"true {n} | predicted {n} | error {n}" for n in names) + " |"]
    lines += ["| --- | " + " | ".join(["--- | --- | ---"] * len(names)) + " |"]
    lines += [
        f"| {r['image']} | "
        + " | ".join(
            f"{_units(r['true'][n])} | {_units(r['predicted'][n])} | {_units(r['error'][n])}" for n in names
        )
        + " |"
        for r in report.largest_errors or []
    ]
    lines.append("")
    gradcam = (
        f" Beside each image, Grad-CAM from `{report.gradcam_layer}` of each target's output: the regions that "
        "raise the predicted value."
        if report.gradcam_layer
        else ""
    )
    lines += _figure(
        report,
        folder,
        "largest_errors.png",
        "Largest errors",
        "Error = predicted - true, in the target's own units"
        + (
            " (ranked by the mean over targets of |error| / the training split's spread)"
            if len(names) > 1
            else ""
        )
        + f".{gradcam}",
    )
    return lines + ["", f"{h}# Calibration", ""] + _notes(report)


def _with_probabilities(row: dict[str, Any], which: str) -> str:
    """A top-loss row's true or predicted labels, each with its probability (``none`` for no label)."""
    return ", ".join(f"{n} ({row['probabilities'][n]:.2f})" for n in row[which]) or "none"


def _notes(report: InterpretationReport) -> list[str]:
    return [line for note in report.notes for line in (note, "")][:-1]


# how each kind's interpretation reads
_MARKDOWN: dict[str, Callable[[InterpretationReport, Path, str, bool], list[str]]] = {
    "single_label": _classes_markdown,
    "multi_label": _labels_markdown,
    "regression": _values_markdown,
}
