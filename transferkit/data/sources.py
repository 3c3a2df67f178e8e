"""Where labelled images come from: a class-per-folder tree, a CSV, a packed (streaming) dataset, ELPV,
or scikit-learn's digits.

Each source gives a :class:`DataSource`: one item per sample (a file path, or an in-memory array),
integer labels, class names, a stratification key, per-sample metadata and, where the source defines
them, its own train/val/test splits.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from sklearn.model_selection import train_test_split

from transferkit.data.images import IMAGE_SUFFIXES
from transferkit.data.targets import TargetSettings
from transferkit.errors import DatasetError

__all__ = [
    "ELPV_TASKS",
    "DataSource",
    "DatasetError",
    "SOURCES",
    "load_source",
    "multilabel_split",
    "regression_strata",
    "split_indices",
]

SourceName = Literal["folder", "csv", "stream", "elpv", "digits"]
SOURCES = ("folder", "csv", "stream", "elpv", "digits")
SPLITS = ("train", "val", "test")


@dataclass
class DataSource:
    """Samples of one dataset, before splitting and augmentation.

    Attributes:
        name: the source (``folder``, ``csv``, ``stream``, ``elpv``, ``digits``).
        items: one per sample: a file path, an in-memory ``(H, W[, C])`` uint8 array, or (``stream``) the
            sample's position in its split of the pack.
        labels: the targets, as ``kind`` says: ``(N,)`` int64 class indices into ``class_names``
            (``single_label``), ``(N, L)`` float32 0/1 per label (``multi_label``) or ``(N, T)`` float32 numbers
            (``regression``).
        class_names: the classes, labels or targets, in output order.
        stratify: ``(N,)`` the key splits are stratified on (the label, finer strata such as ELPV's defect
            probability x cell type, or a numeric target's bins); ``None`` for multi-label data without strata
            of its own: splits are then drawn by iterative stratification on the label matrix
            (:func:`multilabel_split`).
        meta: per-sample extras (``(N,)`` arrays), e.g. ELPV's defect probability.
        splits: the source's own train/val/test indices, where it defines them.
        verified: the files are known to read (a packaged dataset): set-up skips scanning them.
        test_fraction: the share held out for the test when the user sets none (a benchmark's protocol).
        soft: ``(N, C)`` float32 class distributions, where the source gives them (a CSV's ``p_<class>``
            columns, ELPV's defect probability); ``labels`` are then the classes scored.
        groups: coarser classes the labels refine, ``{group: [class names]}``, where the source knows them
            (ELPV's 4-class task: its binary classes); see :mod:`transferkit.data.class_groups`.
        kind: the kind of target (``single_label``, ``multi_label``, ``regression``), as set, never read from
            the labels' shape.
    """

    name: str
    items: list[str | np.ndarray]
    labels: np.ndarray
    class_names: list[str]
    stratify: np.ndarray | None
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    splits: dict[str, np.ndarray] | None = None
    verified: bool = False
    test_fraction: float = 0.2
    soft: np.ndarray | None = None
    groups: dict[str, list[str]] | None = None
    kind: str = "single_label"

    def __len__(self) -> int:
        return len(self.items)

    def stratum_name(self, key: str) -> str:
        """A stratification key as a person knows it: the class name where strata are the labels."""
        if (
            key.lstrip("-").isdigit()
            and self.stratify is not None
            and self.labels.ndim == 1
            and np.array_equal(self.stratify, self.labels.astype(str))
        ):
            index = int(key)
            if 0 <= index < len(self.class_names):
                return self.class_names[index]
        return key


ELPV_TASKS = {
    "binary": "single_label",
    "4class": "single_label",
    "cell_type": "single_label",
    "defective_polycrystalline": "multi_label",
    "defect_probability": "regression",
}


def load_source(
    source: SourceName,
    root: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    task: str = "binary",
    target: TargetSettings | None = None,
) -> DataSource:
    """List the samples of ``source`` (images are read later, when the dataset is indexed), with targets of
    the kind ``target`` says (:class:`~transferkit.data.settings.TargetSettings`; default: single label)."""
    target = target or TargetSettings()
    if target.kind != "single_label" and source in ("folder", "stream", "digits"):
        why = {
            "folder": "a folder's sub-folders give one class per image",
            "stream": "a pack stores one class per image",
            "digits": "scikit-learn's digits have one class per image",
        }[source]
        raise DatasetError(
            f"data.target.kind: {target.kind} needs a CSV (or ELPV's {_elpv_task_for(target.kind)} task): "
            f"source '{source}' cannot give it ({why}). List the images and their targets in a CSV "
            "(source: csv)."
        )
    if source == "csv" and target.kind != "single_label":
        if csv_path is None:
            raise DatasetError("source 'csv' needs csv_path=<file with a 'path' column and the targets>.")
        return _csv_targets_source(
            Path(csv_path).expanduser(), Path(root).expanduser() if root else None, target
        )
    if source == "elpv":
        own = {"columns": target.columns is not None, "names": target.names is not None}
        own["allow_empty"] = not target.allow_empty
        given = [name for name, on in own.items() if on]
        if given:
            raise DatasetError(
                f"data.target.{given[0]} says how a CSV holds its targets; ELPV's label sets are fixed "
                f"(data.task): leave data.target.{given[0]} unset."
            )
        kind = ELPV_TASKS.get(task)
        if kind is not None and kind != target.kind:
            raise DatasetError(
                f"ELPV's '{task}' task is {kind}, but data.target.kind is {target.kind}: set "
                f"data.target.kind: {kind}, or data.task: {_elpv_task_for(target.kind)}."
            )
    if source == "folder":
        if root is None:
            raise DatasetError("source 'folder' needs root=<folder holding one sub-folder per class>.")
        return _folder_source(Path(root).expanduser())
    if source == "csv":
        if csv_path is None:
            raise DatasetError("source 'csv' needs csv_path=<file with 'path' and 'label' columns>.")
        return _csv_source(Path(csv_path).expanduser(), Path(root).expanduser() if root else None)
    if source == "stream":
        if root is None:
            raise DatasetError(
                "source 'stream' needs root=<folder or URL of a pack written by python -m transferkit pack-data>."
            )
        return _stream_source(str(root))
    if source == "elpv":
        return _elpv_source(task)
    if source == "digits":
        return _digits_source()
    raise DatasetError(f"unknown data source '{source}'; choose one of {', '.join(SOURCES)}.")


# --- folder ----------------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_class_folder(folder: Path) -> list[str]:
    files = sorted(str(p) for p in folder.rglob("*") if _is_image(p))
    if not files:
        others = [p.name for p in folder.rglob("*") if p.is_file()][:3]
        seen = f" (it holds {others} ...)" if others else " (it is empty)"
        raise DatasetError(
            f"class folder '{folder}' holds no images{seen}; image files end in {', '.join(IMAGE_SUFFIXES)}. "
            "Add images or remove the folder."
        )
    return files


def _folder_source(root: Path) -> DataSource:
    if not root.exists():
        raise DatasetError(
            f"data root '{root}' does not exist; pass data.root=<folder with one sub-folder per class>."
        )
    if not root.is_dir():
        raise DatasetError(f"data root '{root}' is not a folder.")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    predefined = "train" in split_dirs and len(split_dirs) >= 2
    tops = list(split_dirs.values()) if predefined else [root]

    class_names = sorted({d.name for top in tops for d in _class_dirs(top)})
    if not class_names:
        raise DatasetError(
            f"data root '{root}' has no class folders; expected '{root}/<class name>/<images>' "
            "(or train/, val/, test/ folders laid out that way)."
        )
    if len(class_names) < 2:
        raise DatasetError(
            f"data root '{root}' has a single class ({class_names[0]}); a classifier needs at least 2."
        )
    index = {name: i for i, name in enumerate(class_names)}
    items: list[str | np.ndarray] = []
    labels: list[int] = []
    split_of: list[str] = []
    for split, top in split_dirs.items() if predefined else [("all", root)]:
        for class_dir in _class_dirs(top):
            files = _list_class_folder(class_dir)
            items += files
            labels += [index[class_dir.name]] * len(files)
            split_of += [split] * len(files)
    label_array = np.asarray(labels, dtype=np.int64)
    splits = None
    if predefined:
        where = np.asarray(split_of)
        splits = {s: np.flatnonzero(where == s) for s in split_dirs}
    return DataSource("folder", items, label_array, class_names, label_array.astype(str), splits=splits)


# --- csv -------------------------------------------------------------------------------------------


def _csv_source(csv_path: Path, root: Path | None) -> DataSource:
    if not csv_path.is_file():
        raise DatasetError(f"CSV file '{csv_path}' does not exist.")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        soft_columns = [c for c in columns if c.startswith("p_")]
        if "path" not in columns or ("label" not in columns and len(soft_columns) < 2):
            raise DatasetError(
                f"CSV '{csv_path}' must have a 'path' column and a 'label' column (or a 'p_<class>' "
                f"probability column per class), optionally 'split'; it has {columns}."
            )
        rows = list(reader)
    if not rows:
        raise DatasetError(f"CSV '{csv_path}' has no rows.")
    base = root or csv_path.parent
    paths = [str(p if (p := Path(r["path"])).is_absolute() else base / p) for r in rows]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(paths)} files listed in '{csv_path}' do not exist, e.g. {missing[:3]}; "
            f"relative paths are read from '{base}' (set data.root to change that)."
        )
    if "label" in columns:
        raw = [r["label"].strip() for r in rows]
    else:  # soft labels only: each image's class is its most probable one
        raw = [max(soft_columns, key=lambda c, r=r: float(r[c] or 0))[2:] for r in rows]
    unique = set(raw) | {c[2:] for c in soft_columns}
    numeric = all(s.lstrip("-").isdigit() for s in unique)
    class_names = sorted(unique, key=int) if numeric else sorted(unique)
    if len(class_names) < 2:
        raise DatasetError(
            f"CSV '{csv_path}' has a single label ({class_names[0]}); a classifier needs at least 2."
        )
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.asarray([index[s] for s in raw], dtype=np.int64)
    splits = None
    if "split" in columns:
        where = np.asarray([r["split"].strip().lower() for r in rows])
        unknown = sorted(set(where) - set(SPLITS))
        if unknown:
            raise DatasetError(f"CSV '{csv_path}' has split values {unknown}; use train, val or test.")
        splits = {s: np.flatnonzero(where == s) for s in SPLITS if (where == s).any()}
    soft = _csv_soft_labels(csv_path, rows, soft_columns, class_names, labels) if soft_columns else None
    return DataSource("csv", list(paths), labels, class_names, labels.astype(str), splits=splits, soft=soft)


def _csv_soft_labels(
    csv_path: Path, rows: list[dict], columns: list[str], class_names: list[str], labels: np.ndarray
) -> np.ndarray:
    """``(N, C)`` class distributions from ``p_<class>`` columns: one per class, or for two classes one."""
    named = {c[2:] for c in columns}
    unknown = sorted(named - set(class_names))
    if unknown:
        raise DatasetError(f"CSV '{csv_path}' has probability columns for classes {unknown} no label names.")
    if len(named) < len(class_names) and not (len(class_names) == 2 and len(named) == 1):
        missing = sorted(set(class_names) - named)
        raise DatasetError(
            f"CSV '{csv_path}' gives probabilities for some classes but not {missing}: give a 'p_<class>' "
            "column for every class (with two classes, one column is enough)."
        )
    soft = np.zeros((len(rows), len(class_names)), dtype=np.float32)
    for row_number, row in enumerate(rows):
        try:
            values = {name: float(row[f"p_{name}"]) for name in named}
        except ValueError as err:
            raise DatasetError(
                f"CSV '{csv_path}' row {row_number + 2}: a probability is not a number ({err})."
            ) from err
        for name, value in values.items():
            soft[row_number, class_names.index(name)] = value
        if len(named) == 1:
            (name,) = named
            soft[row_number, 1 - class_names.index(name)] = 1.0 - values[name]
    bad = np.flatnonzero((soft < 0).any(1) | (soft > 1).any(1) | (np.abs(soft.sum(1) - 1) > 1e-3))
    if len(bad):
        row_number = int(bad[0])
        raise DatasetError(
            f"CSV '{csv_path}': the class probabilities of {len(bad)} rows are not a distribution (each in "
            f"[0, 1], summing to 1), e.g. row {row_number + 2}: {[round(float(v), 3) for v in soft[row_number]]}."
        )
    return soft


def _elpv_task_for(kind: str) -> str:
    return next(task for task, k in ELPV_TASKS.items() if k == kind)


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not csv_path.is_file():
        raise DatasetError(f"CSV file '{csv_path}' does not exist.")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    if not rows:
        raise DatasetError(f"CSV '{csv_path}' has no rows.")
    return columns, rows


def _csv_paths(csv_path: Path, root: Path | None, rows: list[dict[str, str]]) -> list[str]:
    base = root or csv_path.parent
    paths = [str(p if (p := Path(r["path"].strip())).is_absolute() else base / p) for r in rows]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(paths)} files listed in '{csv_path}' do not exist, e.g. {missing[:3]}; "
            f"relative paths are read from '{base}' (set data.root to change that)."
        )
    return paths


def _csv_splits(
    csv_path: Path, columns: list[str], rows: list[dict[str, str]]
) -> dict[str, np.ndarray] | None:
    if "split" not in columns:
        return None
    where = np.asarray([r["split"].strip().lower() for r in rows])
    unknown = sorted(set(where) - set(SPLITS))
    if unknown:
        raise DatasetError(f"CSV '{csv_path}' has split values {unknown}; use train, val or test.")
    return {s: np.flatnonzero(where == s) for s in SPLITS if (where == s).any()}


def _refuse_rows(csv_path: Path, bad: list[tuple[int, str]], what: str, fix: str) -> None:
    """One error naming the file, the first bad rows (as numbered in the file, the header being row 1) and why."""
    if not bad:
        return
    listing = "; ".join(f"row {row + 2}: {why}" for row, why in bad[:5])
    more = f" (and {len(bad) - 5} more rows)" if len(bad) > 5 else ""
    raise DatasetError(f"CSV '{csv_path}': {len(bad)} rows have {what}: {listing}{more}. {fix}")


def _csv_targets_source(csv_path: Path, root: Path | None, target: TargetSettings) -> DataSource:
    """A CSV of multi-label or regression targets (see :class:`~transferkit.data.targets.TargetSettings`)."""
    columns, rows = _read_csv(csv_path)
    if "path" not in columns:
        raise DatasetError(f"CSV '{csv_path}' must have a 'path' column; it has {columns}.")
    default = {"multi_label": ("labels",), "regression": ("target",)}[target.kind]
    wanted = target.columns or default
    absent = [c for c in wanted if c not in columns]
    if absent:
        how = (
            "name its 0/1 label columns in data.target.columns, or give a 'labels' column of names separated by "
            f"'{target.separator}'"
            if target.kind == "multi_label"
            else "name its numeric target columns in data.target.columns, or give a 'target' column"
        )
        raise DatasetError(f"CSV '{csv_path}' has no column {absent}; it has {columns}: {how}.")
    paths = _csv_paths(csv_path, root, rows)
    if target.kind == "multi_label" and target.columns is None:
        labels, names = _label_lists(csv_path, rows, target)
    elif target.kind == "multi_label":
        labels, names = _label_columns(csv_path, rows, target.columns), list(target.columns)
    else:
        labels, names = _numeric_columns(csv_path, rows, wanted), list(wanted)
    joined = [n for n in names if ";" in n] if target.kind == "multi_label" else []
    if joined:  # predictions list an image's labels joined by ';'
        raise DatasetError(
            f"CSV '{csv_path}': the labels {joined} have ';' in their names, which separates the labels of a "
            "prediction; rename them."
        )
    if target.kind == "multi_label" and not target.allow_empty:
        empty = [(i, "no label") for i in np.flatnonzero(labels.sum(axis=1) == 0)]
        _refuse_rows(
            csv_path, empty, "an empty list of labels",
            "Give each image at least one label, or set data.target.allow_empty: true (images without labels "
            "are then negatives of every label).",
        )  # fmt: skip
    stratify = None if target.kind == "multi_label" else regression_strata(labels[:, 0])
    return DataSource(
        "csv",
        list(paths),
        labels,
        names,
        stratify,
        splits=_csv_splits(csv_path, columns, rows),
        kind=target.kind,
    )


def _label_lists(
    csv_path: Path, rows: list[dict[str, str]], target: TargetSettings
) -> tuple[np.ndarray, list[str]]:
    lists = [[n.strip() for n in r["labels"].split(target.separator) if n.strip()] for r in rows]
    found = sorted({n for names in lists for n in names})
    if target.names is not None:
        known = set(target.names)
        bad = [(i, f"{sorted(set(names) - known)}") for i, names in enumerate(lists) if set(names) - known]
        _refuse_rows(
            csv_path, bad, f"labels not among data.target.names {list(target.names)}",
            "Correct the labels, or add them to data.target.names.",
        )  # fmt: skip
        names = list(target.names)
    else:
        names = sorted(found, key=int) if found and all(n.lstrip("-").isdigit() for n in found) else found
    if not names:
        raise DatasetError(
            f"CSV '{csv_path}': no row names a label in its 'labels' column (names separated by "
            f"'{target.separator}'); a multi-label model needs at least one label."
        )
    index = {n: i for i, n in enumerate(names)}
    labels = np.zeros((len(rows), len(names)), dtype=np.float32)
    for i, names_of_row in enumerate(lists):
        labels[i, [index[n] for n in names_of_row]] = 1.0
    return labels, names


def _label_columns(csv_path: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> np.ndarray:
    labels = np.zeros((len(rows), len(columns)), dtype=np.float32)
    bad: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            value = row[column].strip().lower()
            if value in ("1", "1.0", "true", "yes"):
                labels[i, j] = 1.0
            elif value not in ("0", "0.0", "false", "no"):
                bad.append((i, f"{column}={row[column]!r}"))
    _refuse_rows(csv_path, bad, "label values that are not 0 or 1", "Give every label column 0 or 1.")
    return labels


def _numeric_columns(csv_path: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> np.ndarray:
    values = np.zeros((len(rows), len(columns)), dtype=np.float32)
    bad: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            text = row[column].strip()
            try:
                value = float(text)
            except ValueError:
                bad.append((i, f"{column}={text!r} is " + ("missing" if not text else "not a number")))
                continue
            if not np.isfinite(value):
                bad.append((i, f"{column}={text!r} is not a finite number"))
            values[i, j] = value
    _refuse_rows(
        csv_path, bad, "targets that are missing, not numbers, NaN or infinite",
        "Give every target column a number in every row, or leave those images out of the CSV.",
    )  # fmt: skip
    return values


def regression_strata(values: np.ndarray, bins: int = 5) -> np.ndarray:
    """Stratification keys for a numeric target: its values where it takes at most ``2 * bins`` distinct
    ones (ELPV's 0, 1/3, 2/3, 1), else ``bins`` quantile bins, so that every split spans the range.

    Example:
        >>> regression_strata(np.arange(10.0), bins=2).tolist()
        ['0', '0', '0', '0', '0', '1', '1', '1', '1', '1']
    """
    values = np.asarray(values, dtype=np.float64)
    levels = np.unique(values)
    if len(levels) <= 2 * bins:
        return np.asarray([f"{v:.6g}" for v in values])
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.digitize(values, edges, right=True).astype(str)


# --- stream ----------------------------------------------------------------------------------------


def _stream_source(root: str) -> DataSource:
    from transferkit.data.stream import read_meta

    meta = read_meta(root if "://" in root else os.path.expanduser(root))
    labels_of = {s: np.asarray(v, dtype=np.int64) for s, v in meta["splits"].items() if len(v)}
    if "train" not in labels_of:
        raise DatasetError(
            f"the pack at '{root}' has no training samples; pack a dataset with a train split."
        )
    items: list = []
    splits = {}
    for split, labels in labels_of.items():
        splits[split] = np.arange(len(items), len(items) + len(labels))
        items += range(len(labels))  # the position in the split: what the pack is read by
    labels = np.concatenate(list(labels_of.values()))
    # the pack's own splits are kept (those of the data it was written from, with its seed and fractions)
    return DataSource(
        "stream", items, labels, list(meta["class_names"]), labels.astype(str), splits=splits, verified=True
    )


# --- ELPV ------------------------------------------------------------------------------------------


def _elpv_source(task: str) -> DataSource:
    try:
        import elpv_dataset
    except ImportError as err:
        raise DatasetError(
            "source 'elpv' needs the package 'elpv-dataset' (CC BY-NC-SA 4.0): pip install 'transferkit[elpv]'."
        ) from err
    labels_csv = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    data = np.genfromtxt(labels_csv, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    paths = [str(labels_csv.parent / p) for p in np.char.decode(data["path"])]
    probs = data["probability"].astype(np.float64)
    types = np.char.decode(data["type"])
    groups = None
    kind = ELPV_TASKS.get(task, "single_label")
    if task == "defective_polycrystalline":  # two labels per cell, each present or not
        labels = np.stack([probs >= 0.5, types == "poly"], axis=1).astype(np.float32)
        class_names = ["defective", "polycrystalline"]
    elif task == "defect_probability":  # the annotated probability as a number
        labels = probs.astype(np.float32)[:, None]
        class_names = ["defect_probability"]
    elif task == "cell_type":  # the other real label: which kind of cell
        labels = (types == "poly").astype(np.int64)
        class_names = ["monocrystalline", "polycrystalline"]
    elif task == "binary":
        labels = (probs >= 0.5).astype(np.int64)
        class_names = ["functional", "defective"]
    elif task == "4class":
        labels = np.rint(probs * 3).astype(np.int64)
        class_names = ["0", "1/3", "2/3", "1"]
        groups = {"functional": ["0", "1/3"], "defective": ["2/3", "1"]}  # the binary task's rule, >= 0.5
    else:
        raise DatasetError(f"unknown ELPV task '{task}'; choose one of {', '.join(ELPV_TASKS)}.")
    stratify = np.asarray([f"{p:.2f}_{t}" for p, t in zip(probs, types, strict=True)])
    meta = {"defect_probability": probs, "cell_type": types}
    # binary: the annotated defect probability as a distribution over (functional, defective)
    soft = np.stack([1 - probs, probs], axis=1).astype(np.float32) if task == "binary" else None
    # the files ship inside the package; its protocol holds a quarter of the cells out for the test
    return DataSource(
        "elpv",
        list(paths),
        labels,
        class_names,
        stratify,
        meta=meta,
        verified=True,
        test_fraction=0.25,
        soft=soft,
        groups=groups,
        kind=kind,
    )


# --- digits ----------------------------------------------------------------------------------------


def _digits_source() -> DataSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    return DataSource("digits", list(images), labels, [str(i) for i in range(10)], labels.astype(str))


# --- splits ----------------------------------------------------------------------------------------


def split_indices(
    data: DataSource, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test indices.

    The test split is ``train_test_split(indices, test_size=test_fraction, stratify=data.stratify,
    random_state=seed)`` (the ELPV protocol); validation comes out of the rest the same way. Splits the
    source defines itself are kept; a missing validation split is carved out of train.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DatasetError(f"{name} must be in [0, 1), got {value}.")
    indices = np.arange(len(data))
    if data.splits is not None:
        splits = {k: np.asarray(v) for k, v in data.splits.items()}
        if "val" not in splits and data.name == "stream" and val_fraction > 0:
            raise DatasetError(
                "the pack has no validation split (it was packed with val_fraction 0), and a pack's splits "
                "are fixed: set data.split.val_fraction: 0, or pack the data again with a validation split."
            )
        if "val" not in splits:
            splits["train"], splits["val"] = _split(splits["train"], data, val_fraction, seed, "val")
        splits.setdefault("test", np.asarray([], dtype=np.int64))
        _check_classes_are_trained(data, splits)
        return splits
    train, test = _split(indices, data, test_fraction, seed, "test")
    train, val = _split(train, data, val_fraction, seed, "val")
    return {"train": train, "val": val, "test": test}


def _check_classes_are_trained(data: DataSource, splits: dict[str, np.ndarray]) -> None:
    """A class (or label) with images in val/test but none in train can never be predicted: refuse it."""
    if data.kind == "regression":
        return
    if data.kind == "multi_label":
        trained = data.labels[splits["train"]].sum(axis=0) > 0
        for split in ("val", "test"):
            held = data.labels[splits.get(split, np.asarray([], dtype=np.int64))].sum(axis=0)
            missing = [i for i in np.flatnonzero((held > 0) & ~trained)]
            if missing:
                found = ", ".join(f"'{data.class_names[i]}' ({int(held[i])} images)" for i in missing)
                raise DatasetError(
                    f"labels appear in the {split} split but on no training image: {found}. The model cannot "
                    f"learn a label it never sees; add training images of them, or remove them from the {split} split."
                )
        return
    trained = set(data.labels[splits["train"]].tolist())
    for split in ("val", "test"):
        labels = data.labels[splits.get(split, np.asarray([], dtype=np.int64))]
        missing = sorted(set(labels.tolist()) - trained)
        if missing:
            found = ", ".join(f"'{data.class_names[c]}' ({int((labels == c).sum())} images)" for c in missing)
            raise DatasetError(
                f"classes appear in the {split} split but not in train: {found}. The model cannot learn "
                "a class it never sees; add training images of them, or remove them from "
                f"the {split} split."
            )


def _split(
    indices: np.ndarray, data: DataSource, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    if fraction == 0:
        return indices, np.asarray([], dtype=np.int64)
    if data.stratify is None:
        return multilabel_split(indices, data.labels, fraction, seed, what)
    keys = data.stratify[indices]
    try:
        kept, held = train_test_split(indices, test_size=fraction, stratify=keys, random_state=seed)
    except ValueError as err:
        values, counts = np.unique(keys, return_counts=True)
        rare = {data.stratum_name(str(v)): int(c) for v, c in zip(values, counts, strict=True) if c < 2}
        raise DatasetError(
            f"cannot carve a stratified {what} split of {fraction:.0%} from {len(indices)} images: {err}. "
            f"Classes with fewer than 2 images: {rare or 'none'}. Add images, merge rare classes, "
            f"or lower data.{what}_fraction."
        ) from err
    return np.sort(kept), np.sort(held)


def multilabel_split(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int, what: str = "val"
) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` split into kept and held-out (``fraction`` of them) by iterative stratification on the
    0/1 label matrix ``labels`` (Sechidis et al., 2011, as the ``iterative-stratification`` package draws
    it), so that every label's positives are shared out in proportion, rare labels first.

    Example:
        >>> labels = np.eye(4, dtype=np.float32)[np.arange(40) % 4]
        >>> kept, held = multilabel_split(np.arange(40), labels, 0.25, seed=0)
        >>> len(held), labels[held].sum(axis=0).tolist()
        (9, [2.0, 2.0, 3.0, 2.0])
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    if len(indices) < 2:
        raise DatasetError(
            f"cannot carve a {what} split of {fraction:.0%} from {len(indices)} images; add images."
        )
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    kept, held = next(splitter.split(indices, labels[indices] >= 0.5))
    return np.sort(indices[kept]), np.sort(indices[held])
