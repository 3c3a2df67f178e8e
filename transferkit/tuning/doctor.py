"""What is wrong with the data: likely label issues, near-duplicates and outliers. ``tk.doctor`` and
``python -m transferkit doctor --config X``.

Label issues and outliers are read from the pretrained backbone's pooled features of every image (the
recipe's backbone and eval pipeline, stored like the frozen-feature cache, so a second run costs seconds),
near-duplicates from a perceptual hash of each image:

- **Label issues** (training and validation images; the test split's labels are never read): each image's
  *out-of-fold* probability of the label it was given, from a model that did not train on it. Those of a
  stored cross-validation (``cv``'s ``oof_predictions.csv``, fine-tuned fold models) when one is given, else
  ``folds``-fold logistic regression on the features (seconds). An image's score is ``1 - P(its label)``;
  one whose out-of-fold prediction is another class is listed, ranked by score, with that class as the
  suggestion. A single model's own losses on its training images (``interpret``'s top losses) rank lower
  the images it memorised, mislabelled ones among them: out-of-fold is the remedy.
- **Near-duplicates** (every split): pairs of images whose perceptual hashes (the lowest DCT coefficients of
  a 32x32 grey thumbnail, :func:`~transferkit.data.checks.image_hashes`, the one ``finetune``'s check uses), centred
  on the data's mean, have a cosine similarity of at least ``similarity``, joined into groups. A hash, not
  the backbone's features: measured on planted copies (``benchmarks/doctor.py``, docs/benchmarks.md), the hash
  found every re-encoded and resized copy at 0.99 on three datasets, the features a fraction of them at any
  threshold without many false groups; neither finds a copy cropped by 6 % a side. A group that crosses
  the train/test boundary makes the test score optimistic; one whose labels differ holds at least one wrong
  label.
- **Outliers** (every split): an image's cosine distance to the nearest class centre (centres of the training
  images), in units of that class's own spread (the 95th percentile of its training images' distances). Over
  ``1``: farther from every class than almost all of that class's own images; listed, ranked.

Written into ``out``: ``label_issues.csv``, ``near_duplicates.csv``, ``outliers.csv`` (ranked, each row with
its reason), a PNG grid beside each, and ``doctor.json`` (the counts, thresholds and timings). Acting on the
label issues is one setting: ``data.split.exclude: <out>/label_issues.csv`` drops the listed training
images in the next run (``action: relabel`` in a row gives it the suggested label instead).

Kinds of target: single label as above. Multi-label data: a logistic regression per label, out-of-fold; an
image's score is its largest ``|truth - P(label)|``, and it is listed when the labels over 0.5 differ from its
own (the suggestion). Regression: ridge regression, out-of-fold; the score is the error in units of the
errors' robust spread (1.4826 x their median absolute deviation), listed from 3. For both, outliers are
measured from one centre of all training images, ``--cv`` is not read, and ``data.split.exclude`` drops (it
does not relabel).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from transferkit.data.checks import NEAR_DUPLICATE_HASH_SIMILARITY, image_hashes, unit_rows
from transferkit.data.features import FeatureCache, extract_features
from transferkit.errors import ConfigError
from transferkit.files import atomic_write

__all__ = [
    "DUPLICATE_SIMILARITY",
    "OUTLIER_RATIO",
    "DoctorReport",
    "doctor",
    "duplicate_groups",
    "label_issue_scores",
    "oof_label_probabilities",
    "oof_probabilities",
    "oof_values",
    "outlier_scores",
]

#: cosine similarity of two images' centred perceptual hashes from which they are near-duplicates (measured:
#: benchmarks/doctor.py; the threshold of finetune's check)
DUPLICATE_SIMILARITY = NEAR_DUPLICATE_HASH_SIMILARITY
#: an image this many times its nearest class's 95th-percentile distance from that class's centre is listed
OUTLIER_RATIO = 1.0
SPLITS = ("train", "val", "test")
LABEL_ISSUES, DUPLICATES, OUTLIERS = "label_issues.csv", "near_duplicates.csv", "outliers.csv"


@dataclass
class DoctorReport:
    """What :func:`doctor` found. ``images`` holds one row per image (``index`` in the data module, ``file``,
    ``split``, ``label``); ``label_scores`` and ``outlier`` are per image (``nan`` where not scored); the
    three lists are the rows of the CSVs, ranked."""

    out: Path
    images: list[dict[str, Any]]
    label_scores: np.ndarray
    outlier: np.ndarray
    label_issues: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]
    outliers: list[dict[str, Any]]
    probabilities_from: str
    similarity: float
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[tuple[str, str, str]]:
        """(finding, count, where) rows for the table the command prints."""
        groups = {r["group"] for r in self.duplicates}
        crossing = {r["group"] for r in self.duplicates if r["crosses_test"]}
        return [
            (
                "likely label issues",
                str(len(self.label_issues)),
                f"{self.out / LABEL_ISSUES} (probabilities: {self.probabilities_from})",
            ),
            (
                "near-duplicate groups",
                f"{len(groups)} ({len(crossing)} across train/test)",
                f"{self.out / DUPLICATES} (hash similarity >= {self.similarity})",
            ),
            ("outliers", str(len(self.outliers)), str(self.out / OUTLIERS)),
        ]


# --- features ---------------------------------------------------------------------------------------


def split_features(
    model: Any, datamodule: Any, cache_dir: str | os.PathLike | None
) -> dict[str, torch.Tensor]:
    """Pooled backbone features ``(N, F)`` of every image of each split, through the eval pipeline, stored in
    ``cache_dir`` (keyed by weights, pipeline and images) when one is given."""
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    backbone = model.backbone
    features = {}
    for split in SPLITS:
        dataset = datamodule.datasets.get(split)
        if dataset is None or len(dataset) == 0:
            continue
        decoding = datamodule.decoding_for(datamodule.eval_transform)
        key = FeatureCache.key(
            backbone,
            datamodule.eval_transform,
            dataset.items,
            f"doctor-{split}",
            1,
            datamodule.seed,
            decoding,
        )
        stored = cache.load(f"doctor-{split}", key) if cache is not None else None
        if stored is None:
            loader = DataLoader(
                datamodule.image_dataset(dataset.items, dataset.labels, datamodule.eval_transform),
                batch_size=64,
                num_workers=datamodule.settings.loader.num_workers,
            )
            stored = extract_features(backbone, loader)
            if cache is not None:
                cache.save(f"doctor-{split}", key, stored)
        features[split] = stored.float().flatten(1)
    return features


# --- label issues ----------------------------------------------------------------------------------


def oof_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities ``(N, C)``: stratified ``folds``-fold logistic regression on the
    standardised ``features``; each image's row comes from the model that did not see it. A class with fewer
    images than ``folds`` lowers the folds (to 2 at least)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2:
        raise ConfigError(
            "label issues need at least two images of every class present (out-of-fold predictions), got "
            f"counts {counts.tolist()}; add images of the rarest class."
        )
    probs = np.zeros((len(labels), classes))
    for seen, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(features, labels):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on small feature sets
            probe.fit(features[seen], labels[seen])
        probs[np.ix_(held, probe[-1].classes_)] = probe.predict_proba(features[held])
    return probs


def label_issue_scores(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: ``1 - P(given label)`` (higher: more likely wrong) and the out-of-fold predicted class."""
    given = probs[np.arange(len(labels)), labels]
    return 1.0 - given, probs.argmax(axis=1)


def oof_label_probabilities(
    features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-fold probabilities ``(N, L)`` of each label of multi-label data: a logistic regression per label
    on the standardised ``features``, ``folds`` folds (unstratified); a label that a fold's training part
    never (or always) has gets that part's rate."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=bool)
    probs = np.zeros(labels.shape)
    for seen, held in KFold(min(folds, len(labels)), shuffle=True, random_state=seed).split(features):
        scaler = StandardScaler().fit(features[seen])
        a, b = scaler.transform(features[seen]), scaler.transform(features[held])
        for j in range(labels.shape[1]):
            y = labels[seen, j]
            if y.all() or not y.any():
                probs[held, j] = float(y.mean())
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                probe = LogisticRegression(max_iter=2000, C=0.1).fit(a, y)
            probs[held, j] = probe.predict_proba(b)[:, 1]
    return probs


def oof_values(features: np.ndarray, targets: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions ``(N, T)`` of numeric targets: ridge regression on the standardised
    ``features`` (its penalty chosen inside each fold), ``folds`` folds, each prediction kept within the
    range of the targets its fold trained on."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    predicted = np.zeros(targets.shape)
    for seen, held in KFold(min(folds, len(targets)), shuffle=True, random_state=seed).split(features):
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 6, 8)))
        model.fit(features[seen], targets[seen])
        # within the range the fold trained on: a linear model extrapolates far off it on an unusual image
        low, high = targets[seen].min(axis=0), targets[seen].max(axis=0)
        predicted[held] = np.clip(model.predict(features[held]).reshape(len(held), -1), low, high)
    return predicted


def _robust_spread(errors: np.ndarray) -> np.ndarray:
    """Per column, the standard deviation a normal distribution with these errors' median absolute
    deviation would have (a few wrong targets do not inflate it)."""
    return 1.4826 * np.median(np.abs(errors - np.median(errors, axis=0)), axis=0)


def read_cv_probabilities(
    cv_dir: str | os.PathLike, images: list[dict[str, Any]], class_names: Sequence[str]
) -> np.ndarray:
    """The out-of-fold probabilities ``cv`` stored in ``cv_dir/oof_predictions.csv``, in the order of
    ``images`` (the non-test images); refused, saying what differs, when they are of other data."""
    path = Path(cv_dir) / "oof_predictions.csv"
    if not path.is_file():
        raise ConfigError(
            f"no {path}: give --cv the output folder of python -m transferkit cv on this recipe (it holds "
            "oof_predictions.csv), or leave --cv out for out-of-fold probabilities from the features."
        )
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [f"p_{name}" for name in class_names]
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows or missing:
        raise ConfigError(
            f"{path} holds no probabilities of this data's classes {list(class_names)} (missing {missing}): it is "
            "a cross-validation of other classes. Run cv on this recipe, or leave --cv out."
        )
    by_index = {int(r["index"]): r for r in rows}
    probs = np.zeros((len(images), len(class_names)))
    for k, image in enumerate(images):
        row = by_index.get(image["index"])
        if row is None or ("file" in row and row["file"] != image["file"]) or row["label"] != image["label"]:
            raise ConfigError(
                f"{path} does not match this recipe's data (image {image['index']}, {image['file']}, is "
                f"{'absent' if row is None else 'another image or label'} there): the cross-validation was "
                "run on other data or splits. Run cv on this recipe, or leave --cv out."
            )
        probs[k] = [float(row[c]) for c in columns]
    return probs


# --- near-duplicates ---------------------------------------------------------------------------------


def duplicate_groups(
    features: np.ndarray, similarity: float = DUPLICATE_SIMILARITY, block: int = 1024
) -> list[tuple[list[int], float]]:
    """Groups of rows of ``features`` joined by pairs of cosine similarity ``>= similarity`` (blockwise, so
    memory grows with ``block * N``): each group's members (sorted) and its highest pair similarity,
    groups sorted by it, highest first.

    Example:
        >>> x = np.array([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0]])
        >>> [(members, round(s, 3)) for members, s in duplicate_groups(x, 0.95)]
        [([0, 1], 0.999)]
    """
    unit = unit_rows(np.asarray(features, dtype=np.float32))
    parent = list(range(len(unit)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best: dict[int, float] = {}
    for start in range(0, len(unit), block):
        sims = unit[start : start + block] @ unit.T
        rows, cols = np.nonzero(sims >= similarity)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if c <= i:
                continue
            a, b = root(i), root(c)
            if a != b:
                parent[b] = a
            s = float(sims[r, c])
            best[i] = max(best.get(i, -1.0), s)
            best[c] = max(best.get(c, -1.0), s)
    members: dict[int, list[int]] = {}
    for i in best:
        members.setdefault(root(i), []).append(i)
    groups = [(sorted(m), max(best[i] for i in m)) for m in members.values()]
    return sorted(groups, key=lambda g: (-g[1], g[0][0]))


# --- outliers ----------------------------------------------------------------------------------------


def outlier_scores(
    features: np.ndarray, train: np.ndarray, train_labels: np.ndarray | None, quantile: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``features``: its cosine distance to the nearest class centre (centres of the ``train``
    rows by ``train_labels``; one centre for all when ``None``), divided by that class's ``quantile`` of its
    own training rows' distances; and the index of that class."""
    unit = unit_rows(np.asarray(features, dtype=np.float32))
    groups = np.zeros(len(train), dtype=np.int64) if train_labels is None else np.asarray(train_labels)
    present = np.unique(groups)
    centres = unit_rows(np.stack([unit[train[groups == g]].mean(axis=0) for g in present]))
    distance = 1.0 - unit @ centres.T  # (N, classes)
    spread = np.array(
        [
            max(float(np.quantile(distance[train[groups == g], j], quantile)), 1e-6)
            for j, g in enumerate(present)
        ]
    )
    ratio = distance / spread
    nearest = ratio.argmin(axis=1)
    return ratio[np.arange(len(unit)), nearest], present[nearest]


# --- the whole check -----------------------------------------------------------------------------------


def doctor(
    model: Any,
    datamodule: Any,
    out: str | os.PathLike,
    cv_dir: str | os.PathLike | None = None,
    folds: int = 5,
    similarity: float = DUPLICATE_SIMILARITY,
    outlier_ratio: float = OUTLIER_RATIO,
    cache_dir: str | os.PathLike | None = None,
    grid: int = 24,
) -> DoctorReport:
    """Find likely label issues, near-duplicates and outliers in ``datamodule``'s images with ``model``'s
    pretrained backbone, and write them into ``out`` (see the module's docstring).

    Args:
        model: a :class:`~transferkit.TransferClassifier` (its backbone and data config are used, its head not).
        datamodule: an :class:`~transferkit.ImageDataModule`; it is set up here.
        out: the folder the CSVs, grids and ``doctor.json`` are written to.
        cv_dir: the output folder of ``cv`` on the same recipe: its out-of-fold probabilities score the
            label issues (else ``folds``-fold logistic regression on the features).
        similarity: cosine similarity of centred perceptual hashes from which two images are near-duplicates.
        outlier_ratio: an image is listed as an outlier above this ratio (see :func:`outlier_scores`).
        cache_dir: where the features are stored (``None``: ``out/cache``).
        grid: images per PNG grid (the top of each list).

    Example:
        >>> import transferkit as tk  # doctest: +SKIP
        >>> dm = tk.ImageDataModule(source="folder", root="photos/")  # doctest: +SKIP
        >>> model = tk.TransferClassifier(num_classes=dm.num_classes, class_names=dm.class_names)  # doctest: +SKIP
        >>> report = tk.doctor(model, dm, "runs/doctor")  # doctest: +SKIP
        >>> report.label_issues[0]["file"], report.label_issues[0]["suggested"]  # doctest: +SKIP
    """
    if getattr(getattr(datamodule, "data", None), "name", None) == "stream":
        raise ConfigError(
            "doctor reads every image by index, which a pack (source: stream) does not offer; run it on the "
            "folder or CSV the pack was made from (the splits are the same)."
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    datamodule.use_data_config(model.data_config)
    datamodule.setup("fit")
    data = datamodule.data
    kind = datamodule.target_kind
    single = kind == "single_label"
    names = list(datamodule.class_names) if single else []
    features = split_features(model, datamodule, cache_dir if cache_dir is not None else out / "cache")
    seconds["features"] = round(time.perf_counter() - start, 1)

    images: list[dict[str, Any]] = []
    for split in SPLITS:
        for i in datamodule.split_indices.get(split, []):
            item = data.items[int(i)]
            label = names[int(data.labels[int(i)])] if single else _label_text(data, int(i), kind)
            images.append(
                {
                    "index": int(i),
                    "file": str(item) if isinstance(item, str | os.PathLike) else f"<array {int(i)}>",
                    "split": split,
                    "label": label,
                }
            )
    x = torch.cat([features[s] for s in SPLITS if s in features]).numpy()
    split_of = np.array([r["split"] for r in images])
    train = np.flatnonzero(split_of == "train")
    notes: list[str] = []

    # label issues: out-of-fold probabilities of the non-test images
    t = time.perf_counter()
    scores = np.full(len(images), np.nan)
    issues: list[dict[str, Any]] = []
    scored = np.flatnonzero(split_of != "test")
    if single:
        labels = np.array([int(data.labels[images[k]["index"]]) for k in scored])
        if cv_dir is not None:
            probs = read_cv_probabilities(cv_dir, [images[k] for k in scored], names)
            source = f"cross-validation in {cv_dir}"
        else:
            probs = oof_probabilities(x[scored], labels, folds, datamodule.seed)
            source = f"{folds}-fold logistic regression on the backbone's features"
        score, predicted = label_issue_scores(probs, labels)
        scores[scored] = score
        for k in np.argsort(-score, kind="stable"):
            if predicted[k] == labels[k]:
                continue
            row = images[scored[k]]
            p_given, p_suggested = probs[k, labels[k]], probs[k, predicted[k]]
            issues.append(
                {
                    **row,
                    "suggested": names[int(predicted[k])],
                    "score": round(float(score[k]), 4),
                    "reason": f"out-of-fold P({row['label']}) = {p_given:.2f}, P({names[int(predicted[k])]}) = "
                    f"{p_suggested:.2f}",
                    "action": "drop",
                }
            )
    else:
        if cv_dir is not None:
            notes.append(
                "--cv is read for single-label data only; this data's out-of-fold estimates come from the features."
            )
        targets = np.asarray(data.labels)[[images[k]["index"] for k in scored]].astype(np.float64)
        targets = targets.reshape(len(scored), -1)
        label_names = list(data.class_names)
        if kind == "multi_label":
            probs = oof_label_probabilities(x[scored], targets >= 0.5, folds, datamodule.seed)
            source = f"{folds}-fold logistic regression per label on the backbone's features"
            score = np.abs((targets >= 0.5) - probs).max(axis=1)
            suggestion = [
                ";".join(n for n, on in zip(label_names, row >= 0.5, strict=True) if on) for row in probs
            ]
            disagree = [s != images[scored[k]]["label"] for k, s in enumerate(suggestion)]
            why = [
                ", ".join(
                    f"P({n}) = {p:.2f}"
                    for n, p, y in zip(label_names, row, t, strict=True)
                    if (p >= 0.5) != (y >= 0.5)
                )
                for row, t in zip(probs, targets, strict=True)
            ]
        else:
            predicted = oof_values(x[scored], targets, folds, datamodule.seed)
            source = f"{folds}-fold ridge regression on the backbone's features"
            residual = (targets - predicted) / np.maximum(_robust_spread(targets - predicted), 1e-12)
            score = np.abs(residual).max(axis=1)
            suggestion = [";".join(f"{v:.4g}" for v in row) for row in predicted]
            disagree = list(score >= 3.0)  # three robust standard deviations from the out-of-fold value
            why = [
                f"{score[k]:.1f} spreads of the out-of-fold errors from the predicted {suggestion[k]}"
                for k in range(len(scored))
            ]
        scores[scored] = score
        for k in np.argsort(-score, kind="stable"):
            if disagree[k]:
                row = images[scored[k]]
                issues.append(
                    {**row, "suggested": suggestion[k], "score": round(float(score[k]), 4),
                     "reason": f"out-of-fold {why[k]}", "action": "drop"}
                )  # fmt: skip
    seconds["label_issues"] = round(time.perf_counter() - t, 2)

    # near-duplicates over every split
    t = time.perf_counter()
    duplicates: list[dict[str, Any]] = []
    hashes = image_hashes([data.items[row["index"]] for row in images])
    # centred on the data's mean: what all its images share (cells, a background) does not make two alike
    for number, (members, top) in enumerate(duplicate_groups(hashes - hashes.mean(axis=0), similarity)):
        splits = {images[m]["split"] for m in members}
        crosses = "test" in splits and len(splits) > 1
        differ = len({images[m]["label"] for m in members}) > 1
        reason = f"hash similarity up to {top:.4f}" + (", across train/test" if crosses else "")
        reason += ", labels differ" if differ else ""
        for m in members:
            duplicates.append(
                {**images[m], "group": number, "similarity": round(top, 4), "crosses_test": crosses,
                 "labels_differ": differ, "reason": reason}
            )  # fmt: skip
    seconds["near_duplicates"] = round(time.perf_counter() - t, 2)

    # outliers over every split, against the training images' class centres
    t = time.perf_counter()
    train_labels = np.asarray(data.labels)[[images[k]["index"] for k in train]] if single else None
    ratio, nearest = outlier_scores(x, train, train_labels)
    outliers = []
    for k in np.argsort(-ratio, kind="stable"):
        if ratio[k] < outlier_ratio:
            break
        near = names[int(nearest[k])] if single else "all training images"
        outliers.append(
            {**images[k], "score": round(float(ratio[k]), 4), "nearest": near,
             "reason": f"{ratio[k]:.2f}x the spread of the nearest class ({near}) from its centre"}
        )  # fmt: skip
    seconds["outliers"] = round(time.perf_counter() - t, 2)

    report = DoctorReport(
        out, images, scores, ratio, issues, duplicates, outliers, source, similarity, seconds, notes
    )
    _write(report, datamodule, grid)
    seconds["total"] = round(time.perf_counter() - start, 1)
    _write_json(report)
    return report


def _label_text(data: Any, index: int, kind: str) -> str:
    value = np.asarray(data.labels[index])
    if kind == "multi_label":
        return ";".join(n for n, on in zip(data.class_names, value >= 0.5, strict=False) if on)
    return ";".join(f"{v:.4g}" for v in np.atleast_1d(value))


_COLUMNS = {
    LABEL_ISSUES: ["rank", "file", "split", "label", "suggested", "score", "reason", "action", "index"],
    DUPLICATES: [
        "group",
        "file",
        "split",
        "label",
        "similarity",
        "crosses_test",
        "labels_differ",
        "reason",
        "index",
    ],
    OUTLIERS: ["rank", "file", "split", "label", "nearest", "score", "reason", "index"],
}


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(rows, 1):
        writer.writerow({"rank": rank, **row})
    return buffer.getvalue()


def _write(report: DoctorReport, datamodule: Any, grid: int) -> None:
    lists = {LABEL_ISSUES: report.label_issues, DUPLICATES: report.duplicates, OUTLIERS: report.outliers}
    for name, rows in lists.items():
        atomic_write(report.out / name, _csv(rows, _COLUMNS[name]), what=f"doctor's {name}")
    items = datamodule.data.items
    _draw(
        report.label_issues[:grid], items, report.out / "label_issues.png",
        "likely label issues: given -> suggested, out-of-fold score",
        lambda r: f"{r['label']} -> {r['suggested']}  {r['score']:.2f}\n{_short(r['file'])}",
    )  # fmt: skip
    shown = sorted({r["group"] for r in report.duplicates})[: max(grid // 4, 1)]
    rows: list[dict[str, Any] | None] = []
    for group in shown:  # a row of the grid per group (at most 4 of its members)
        members = [r for r in report.duplicates if r["group"] == group][:4]
        rows += members + [None] * (4 - len(members))
    _draw(
        rows, items, report.out / "near_duplicates.png", "near-duplicate groups: one per row",
        lambda r: f"group {r['group']}: {r['split']}, {r['label']}\n{_short(r['file'])}",
    )  # fmt: skip
    _draw(
        report.outliers[:grid], items, report.out / "outliers.png",
        "outliers: label (nearest class), distance in units of its spread",
        lambda r: f"{r['label']} ({r['nearest']})  {r['score']:.2f}\n{_short(r['file'])}",
    )  # fmt: skip


def _short(file: str, width: int = 28) -> str:
    name = Path(file).name if not file.startswith("<") else file
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def _draw(
    rows: Sequence[dict[str, Any] | None], items: Sequence[Any], path: Path, title: str, caption: Any
) -> None:
    """A grid of the images of ``rows`` (``None``: an empty cell), each captioned; none when ``rows`` is empty
    (an old grid of another run is removed)."""
    from transferkit.data.images import load_image
    from transferkit.reporting.interpretation_plots import prediction_grid

    if not any(rows):
        path.unlink(missing_ok=True)
        return
    images, titles = [], []
    for row in rows:
        if row is None:
            images.append(np.full((8, 8, 3), 255, np.uint8))
            titles.append("")
            continue
        item = items[row["index"]]
        image = load_image(item, min_side=160) if isinstance(item, str | os.PathLike) else np.asarray(item)
        images.append(image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2))
        titles.append(caption(row))
    prediction_grid(images, titles, path, title=title, columns=4)


def _write_json(report: DoctorReport) -> None:
    groups = {r["group"] for r in report.duplicates}
    record = {
        "images": len(report.images),
        "label_issues": len(report.label_issues),
        "probabilities_from": report.probabilities_from,
        "near_duplicate_groups": len(groups),
        "near_duplicate_groups_across_train_test": len(
            {r["group"] for r in report.duplicates if r["crosses_test"]}
        ),
        "similarity": report.similarity,
        "outliers": len(report.outliers),
        "seconds": report.seconds,
        "notes": report.notes,
    }
    atomic_write(report.out / "doctor.json", json.dumps(record, indent=2) + "\n", what="doctor.json")
