"""Sources and splits: which images train, validate and test, seeded and stratified."""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import numpy as np

from transferkit.data.checks import stratified_sample
from transferkit.data.settings import SplitSettings, check_folds
from transferkit.data.sources import DataSource, split_indices
from transferkit.errors import ConfigError, DatasetError, warn

__all__ = ["apply_exclusions", "cv_split_indices", "make_splits"]


def make_splits(data: DataSource, split: SplitSettings, seed: int) -> dict[str, np.ndarray]:
    """Indices of ``data``'s images in each split (``train``, ``test``, and ``val`` when held out) as
    ``split`` says: a stratified ``val_fraction``/``test_fraction`` split, or fold ``cv_fold`` of a
    ``cv_folds``-fold cross-validation; then the ``train_fraction`` subset of the training split. An empty
    training (or, when held out, validation) split is refused with what to change.

    Example:
        >>> from transferkit.data.sources import load_source
        >>> splits = make_splits(load_source("digits"), SplitSettings(val_fraction=0.1, test_fraction=0.2), 0)
        >>> {name: len(indices) for name, indices in splits.items()}
        {'train': 1293, 'val': 144, 'test': 360}
    """
    if split.cv_folds is None:
        splits = split_indices(data, split.val_fraction, _test_fraction(data, split), seed)
    else:
        splits = cv_split_indices(data, split.cv_folds, split.cv_fold, _test_fraction(data, split), seed)
    if split.train_fraction < 1:
        train = splits["train"]
        size = max(1, round(len(train) * split.train_fraction))
        splits["train"] = stratified_sample(train, size, data.stratify, seed, labels=data.labels)
    held_out = (
        split.cv_folds is not None
        or split.val_fraction > 0
        or (data.splits is not None and "val" in data.splits)
    )
    for name in ("train", "val") if held_out else ("train",):
        if len(splits.get(name, [])) == 0:
            raise DatasetError(
                f"the {name} split is empty ({len(data)} images, val_fraction={split.val_fraction}, "
                f"test_fraction={_test_fraction(data, split)}); add images or change the fractions "
                "(data.split)."
            )
    return splits


def _test_fraction(data: DataSource, split: SplitSettings) -> float:
    return data.test_fraction if split.test_fraction is None else split.test_fraction


def cv_split_indices(
    data: DataSource, folds: int, fold: int, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Train/val/test indices of fold ``fold`` (0-based) of a stratified ``folds``-fold cross-validation.

    The test split is exactly the one :func:`~transferkit.data.sources.split_indices` holds out (the same
    ``test_fraction`` and ``seed``, or the source's own test split); the other images (train and any
    validation split the source defines) are split by scikit-learn's ``StratifiedKFold(folds, shuffle=True,
    random_state=seed)`` on ``data.stratify`` (the hard labels, or the finer strata the data is split on),
    and part ``fold`` validates while the rest train. Across the folds every non-test image validates
    exactly once.

    Raises:
        ConfigError: ``folds < 2``, or ``fold`` outside ``0 .. folds - 1``.
        DatasetError: a class has fewer non-test images than ``folds``.

    Example:
        >>> from transferkit.data.sources import load_source
        >>> data = load_source("digits")
        >>> splits = [cv_split_indices(data, 5, fold, 0.2, seed=0) for fold in range(5)]
        >>> sum(len(s["val"]) for s in splits) == len(splits[0]["train"]) + len(splits[0]["val"])
        True
    """
    check_folds(folds, fold)
    if data.name == "stream":
        raise ConfigError(
            "source 'stream' cannot be cross-validated: a pack's splits are fixed when it is packed. "
            "Cross-validate the folder or CSV it was packed from."
        )
    held = split_indices(data, 0.0, test_fraction, seed)  # validation 0: the test split alone is carved
    empty = np.asarray([], dtype=np.int64)
    rest = np.sort(np.concatenate([held["train"], held.get("val", empty)]))
    if data.stratify is None:  # multi-label without strata of its own: iterative stratification
        return {**_multilabel_fold(data, rest, folds, fold, seed), "test": held["test"]}
    if data.kind != "single_label":  # strata of a regression's bins or ELPV's cells: every fold spans them
        return {**_stratified_fold(data, rest, folds, fold, seed), "test": held["test"]}
    present = np.unique(data.labels)
    counts = np.bincount(data.labels[rest], minlength=len(data.class_names))
    rare = {data.class_names[c]: int(counts[c]) for c in present if counts[c] < folds}
    if rare:
        found = ", ".join(f"'{name}' ({n})" for name, n in rare.items())
        smallest = min(rare.values())
        fix = (
            f"use at most cv_folds={smallest}"
            if smallest >= 2
            else "a class needs 2 non-test images at least"
        )
        raise DatasetError(
            f"cv_folds={folds} needs at least {folds} non-test images of every class, so that each part "
            f"holds some of it and every fold trains on it; too few: {found}. Add images or merge rare "
            f"classes ({fix})."
        )
    return {**_stratified_fold(data, rest, folds, fold, seed), "test": held["test"]}


def _stratified_fold(
    data: DataSource, rest: np.ndarray, folds: int, fold: int, seed: int
) -> dict[str, np.ndarray]:
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        train, val = list(splitter.split(rest, data.stratify[rest]))[fold]
    except ValueError as err:
        raise DatasetError(
            f"cannot split {len(rest)} non-test images into {folds} stratified folds: {err}. "
            "Use fewer folds or add images."
        ) from err
    return {"train": np.sort(rest[train]), "val": np.sort(rest[val])}


def _multilabel_fold(
    data: DataSource, rest: np.ndarray, folds: int, fold: int, seed: int
) -> dict[str, np.ndarray]:
    """Fold ``fold`` of ``MultilabelStratifiedKFold`` (iterative stratification) over the non-test images."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    positives = (data.labels[rest] >= 0.5).sum(axis=0)
    rare = {data.class_names[i]: int(positives[i]) for i in np.flatnonzero(positives < folds)}
    if rare:
        found = ", ".join(f"'{name}' ({n})" for name, n in rare.items())
        raise DatasetError(
            f"cv_folds={folds} needs at least {folds} non-test images of every label, so that each part holds "
            f"some of it and every fold trains on it; too few: {found}. Add images, or use fewer folds."
        )
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, val = list(splitter.split(rest, data.labels[rest] >= 0.5))[fold]
    return {"train": np.sort(rest[train]), "val": np.sort(rest[val])}


def apply_exclusions(
    data: DataSource, splits: dict[str, np.ndarray], path: str | os.PathLike
) -> tuple[DataSource, dict[str, np.ndarray], dict[str, int]]:
    """``data`` and ``splits`` with the training images listed in the CSV ``path`` dropped (or relabelled to
    the row's ``suggested`` class where its ``action`` is ``relabel``; ``keep`` leaves one as it is), and the
    counts of what was done. Listed images of the validation and test splits are left as they are (a
    warning says how many); a CSV none of whose files is in the data is refused, naming one of each.

    Example:
        >>> import tempfile
        >>> from transferkit.data.sources import DataSource
        >>> data = DataSource("folder", ["a.png", "b.png", "c.png"], np.array([0, 1, 0]), ["cat", "dog"], None)
        >>> listing = os.path.join(tempfile.mkdtemp(), "issues.csv")
        >>> _ = open(listing, "w").write("file,action,suggested\\na.png,relabel,dog\\nc.png,drop,\\n")
        >>> data, splits, done = apply_exclusions(data, {"train": np.array([0, 2]), "test": np.array([1])}, listing)
        >>> splits["train"].tolist(), data.labels.tolist(), done
        ([0], [1, 1, 0], {'dropped': 1, 'relabelled': 1, 'kept': 0, 'not_training': 0, 'not_found': 0})
    """
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise ConfigError(
            f"data.split.exclude: cannot read {path} ({err}); give the CSV doctor wrote."
        ) from err
    if rows and "file" not in rows[0]:
        raise ConfigError(
            f"data.split.exclude: {path} has no 'file' column (its columns: {', '.join(rows[0])}); it needs one "
            "row per image with its file, as doctor's label_issues.csv has."
        )

    def key(item: object) -> str:
        return os.path.normcase(os.path.abspath(str(item)))

    where = {key(item): i for i, item in enumerate(data.items) if isinstance(item, str | os.PathLike)}
    training = {int(i) for i in splits["train"]}
    labels = np.array(data.labels, copy=True)
    done = {"dropped": 0, "relabelled": 0, "kept": 0, "not_training": 0, "not_found": 0}
    drop: set[int] = set()
    missing: list[str] = []
    for number, row in enumerate(rows, 2):
        index = where.get(key(row["file"]))
        if index is None:
            done["not_found"] += 1
            missing.append(row["file"])
            continue
        if index not in training:
            done["not_training"] += 1
            continue
        action = (row.get("action") or "drop").strip().lower()
        if action == "drop":
            drop.add(index)
            done["dropped"] += 1
        elif action == "keep":
            done["kept"] += 1
        elif action == "relabel":
            suggested = (row.get("suggested") or "").strip()
            if data.kind != "single_label" or suggested not in data.class_names:
                raise ConfigError(
                    f"data.split.exclude: {path} line {number} relabels {row['file']} to {suggested!r}, which is "
                    f"not one of the classes {data.class_names}"
                    + (
                        ""
                        if data.kind == "single_label"
                        else f" (relabelling is for single-label data, this is {data.kind})"
                    )
                    + "; fix the 'suggested' column or make the action drop."
                )
            labels[index] = data.class_names.index(suggested)
            done["relabelled"] += 1
        else:
            raise ConfigError(
                f"data.split.exclude: {path} line {number}: action {action!r} is not one of drop, relabel, keep."
            )
    if rows and done["not_found"] == len(rows):
        example = next(iter(where), "(no files: the data is in memory)")
        raise ConfigError(
            f"data.split.exclude: none of the {len(rows)} files listed in {path} is in this data (e.g. "
            f"{missing[0]}; the data has e.g. {example}): it was written for other data. Give the CSV doctor "
            "wrote for this recipe."
        )
    if done["not_found"] or done["not_training"]:
        warn(
            f"data.split.exclude: of the {len(rows)} images listed in {path}, {done['not_training']} are in the "
            f"validation or test split and were left as they are, and {done['not_found']} are not in this data "
            f"(e.g. {missing[0] if missing else '-'})."
        )
    splits = {
        **splits,
        "train": np.asarray([i for i in splits["train"] if int(i) not in drop], dtype=np.int64),
    }
    if len(splits["train"]) == 0:
        raise DatasetError(f"data.split.exclude: {path} drops every training image; list fewer.")
    return dataclasses.replace(data, labels=labels), splits, done
