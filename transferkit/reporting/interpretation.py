"""What a trained model learned and how far to trust it: top losses with Grad-CAM, a per-class table, the
row-normalised confusion matrix, and calibration before and after temperature scaling.

:func:`interpret` computes it all for one split of a data module and writes, into ``out``::

    top_losses.png          the images the model is most wrong about (true, predicted, probability),
                            each also with its Grad-CAM overlay for the predicted class
    most_confident.png      the most confident correct predictions, the same way
    confusion_normalised.png  rows sum to 1: recall on the diagonal
    reliability.png         accuracy vs confidence, before and after temperature scaling, with the ECE
    roc_pr.png              two classes: ROC and precision-recall, the decision threshold marked
    confusion_groups.png    with class groups: the groups' confusion matrix (counts)
    interpretation.json     every figure above as numbers, the per-class table (and the per-group one)
    interpretation.md       all of it, linked

``python -m transferkit interpret`` runs it on a checkpoint; :meth:`transferkit.Trainer.finetune` adds the
same sections to the run report, on the test split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import transferkit.reporting.interpretation_plots as figures
import transferkit.reporting.plots as plots
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

__all__ = [
    "InterpretationReport",
    "LabelledImages",
    "interpret",
    "labelled_images",
    "per_class_table",
    "rank_predictions",
]


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
) -> LabelledImages:
    """The images a CSV (``path``, ``label`` columns; paths relative to ``root``) lists, through a model's
    eval ``transform``, as a split to interpret. Every label must be one of the model's ``class_names``."""
    from transferkit.data.datasets import ImageDataset
    from transferkit.data.sources import load_source
    from transferkit.errors import DatasetError

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


@dataclass
class InterpretationReport:
    """What :func:`interpret` found; ``pngs`` maps each picture's name to its file."""

    split: str
    images: int
    accuracy: float
    class_names: list[str]
    per_class: list[dict[str, Any]]
    top_losses: list[dict[str, Any]]
    most_confident: list[dict[str, Any]]
    calibration: dict[str, Any]
    binary: dict[str, Any] | None
    gradcam_layer: str | None
    # with class groups: {"accuracy", "members": {group: [class names]}, "per_group": rows like per_class}
    groups: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    pngs: dict[str, Path] = field(default_factory=dict)
    markdown: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("pngs", "markdown")}
        out["pngs"] = {name: str(path) for name, path in self.pngs.items()}
        if self.groups is not None:  # the per-image group labels serve the picture; the figures are kept
            out["groups"] = {k: v for k, v in self.groups.items() if k not in ("labels", "predicted")}
        return out

    def table(self) -> str:
        """The per-class table and the calibration figures as text."""
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


def _display_image(tensor: torch.Tensor, mean: Any, std: Any) -> np.ndarray:
    """An eval-pipeline tensor ``(3, S, S)`` back to an image ``(S, S, 3)`` in [0, 1], as the model saw it."""
    image = tensor.float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(image * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32), 0.0, 1.0)


def _item_name(dataset: Any, index: int) -> str:
    items = getattr(dataset, "items", None)
    if items is not None and isinstance(items[index], str | os.PathLike):
        return Path(items[index]).name
    return f"#{index}"


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
    and ``interpretation.md`` into ``out``.

    Args:
        model: a :class:`~transferkit.TransferClassifier`; its stored calibration (temperature, decision
            threshold) decides its probabilities and predictions, as ``predict`` would.
        datamodule: an :class:`~transferkit.ImageDataModule` after ``setup``.
        split: ``test`` or ``val``.
        out: the folder to write into.
        count: images in each grid (top losses, most confident).
        gradcam: overlay Grad-CAM maps (:func:`~transferkit.inference.gradcam.gradcam_maps`); an
            architecture it does not support is noted in ``problems``, the rest is still written.
        outputs: the split's raw logits ``(V, N, C)`` and labels ``(N,)`` when already computed (the test
            loop keeps them), else the split is predicted here.

    Calibration: "before" is the model's plain softmax; "after" uses the stored temperature when the model
    was calibrated, otherwise one fitted here on the validation split (shown, not stored). Without a
    validation split only "before" is shown.

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
    if split not in ("test", "val"):
        raise ConfigError(f"interpret looks at the 'test' or 'val' split, got '{split}'.")
    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logits, labels_t = outputs if outputs is not None else split_outputs(model, datamodule, split)
    logits = torch.as_tensor(logits).float()
    logits = logits[None] if logits.ndim == 2 else logits
    labels = torch.as_tensor(labels_t).long().numpy()
    names = [str(n) for n in getattr(model, "class_names", range(logits.shape[-1]))]
    stored: Calibration = model.calibration
    probs = stored.probabilities(logits).mean(dim=0)
    predicted = stored.predict(probs).numpy()
    probs = probs.numpy()
    raw = logits.softmax(dim=-1).mean(dim=0).numpy()
    accuracy = float((predicted == labels).mean())
    problems: list[str] = []

    # calibration: stored, or fitted on validation here for the picture only
    after: Calibration | None = stored if stored.fitted else None
    source = f"stored, fitted on {stored.fitted_on}" if stored.fitted else None
    if after is None and getattr(datamodule, "has_validation", False) and split != "val":
        val_logits, val_labels = split_outputs(model, datamodule, "val")
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
        top_losses=[],
        most_confident=[],
        calibration=calibration,
        binary=None,
        gradcam_layer=None,
        groups=_group_figures(getattr(model, "class_groups", None), probs, labels, names),
        problems=problems,
    )

    def attempt(name: str, draw: Any) -> None:
        try:
            report.pngs[name] = draw(out / name)
        except Exception as err:  # a picture that fails is reported, the others are still drawn
            problems.append(f"`{name}` was not drawn: {type(err).__name__}: {err}")

    # top losses and most confident correct, as the model saw them, with Grad-CAM for the predicted class
    ranked = rank_predictions(probs, labels, predicted, count)
    dataset = datamodule.datasets[split]
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        config = model.data_config
        mean, std = config["mean"], config["std"]
    target = None  # Grad-CAM's layer, looked up with the first grid
    for key, heading in (("top_losses", "top losses"), ("most_confident", "most confident, correct")):
        chosen = ranked[key].tolist()
        rows = [
            {
                "index": int(i),
                "image": _item_name(dataset, i),
                "true": names[labels[i]],
                "predicted": names[predicted[i]],
                "probability": float(probs[i, predicted[i]]),
                "loss": float(ranked["losses"][i]),
            }
            for i in chosen
        ]
        setattr(report, key, rows)
        tensors = [dataset[i][0] for i in chosen]
        shown = [_display_image(t, mean, std) for t in tensors]
        titles = [
            f"{r['image']}\ntrue {r['true']}, pred {r['predicted']} ({r['probability']:.2f})" for r in rows
        ]
        maps = None
        if gradcam and tensors:
            try:
                from transferkit.inference.gradcam import gradcam_layer, gradcam_maps

                target = target or gradcam_layer(model, int(tensors[0].shape[-1]))  # found once, used twice
                report.gradcam_layer = target[2]
                chosen_classes = [int(predicted[i]) for i in chosen]
                maps = gradcam_maps(model, torch.stack(tensors), classes=chosen_classes, layer=target)
            except (ConfigError, ImportError) as err:  # an architecture it cannot read; grad-cam missing
                if str(err) not in problems:
                    problems.append(str(err))
        attempt(
            f"{key}.png",
            lambda path, shown=shown, titles=titles, maps=maps, heading=heading: figures.prediction_grid(
                shown, titles, path, maps=maps, title=f"{split} split: {heading}"
            ),
        )

    attempt(
        "confusion_normalised.png",
        lambda path: plots.confusion_matrix_plot(
            labels, predicted, names, path, normalize="true", title=f"{split} split, rows sum to 1 (recall)"
        ),
    )
    attempt(
        "reliability.png",
        lambda path: figures.reliability_diagram(
            bins, eces, path, title=f"{split} split: {len(labels)} images"
        ),
    )
    if report.groups is not None:
        groups = report.groups
        attempt(
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
        attempt("roc_pr.png", lambda path: figures.roc_pr_plot(curves, path, operating_point=point))

    atomic_write(
        out / "interpretation.json", json.dumps(report.to_dict(), indent=2) + "\n", what="interpretation"
    )
    report.markdown = atomic_write(
        out / "interpretation.md", interpretation_markdown(report, out), what="report"
    )
    return report


def interpretation_markdown(report: InterpretationReport, folder: Path, level: int = 1) -> str:
    """The report's sections as markdown, the pictures linked relative to ``folder``; ``level`` is the
    heading level of the title (2 inside the run report)."""
    h = "#" * level

    def link(name: str) -> str:
        return os.path.relpath(report.pngs[name], folder)

    lines = [f"{h} Interpretation ({report.split} split, {report.images} images)", ""]
    lines += [f"Accuracy {report.accuracy:.4f}.", ""]
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
    if report.problems:
        lines += ["", f"{h}# Problems", ""] + [f"- {p}" for p in report.problems]
    return "\n".join(lines) + "\n"
