"""Checks a dataset gets before training: unreadable files, class imbalance, copies across splits."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from transferkit.data.images import find_unreadable
from transferkit.data.sources import DataSource
from transferkit.errors import DatasetError, ImageReadError, warn

__all__ = [
    "IMBALANCE_WARNING_RATIO",
    "NEAR_DUPLICATE_HASH_SIMILARITY",
    "check_images",
    "drop_unreadable",
    "image_hashes",
    "near_duplicates_across",
    "unit_rows",
    "warn_duplicates_across_splits",
    "warn_imbalance",
    "warn_near_duplicates_across_splits",
]

# the largest / smallest class count in train above which setup warns and suggests sampler: balanced
IMBALANCE_WARNING_RATIO = 10.0
#: cosine similarity of two images' centred DCT hashes from which set-up calls them near-duplicates
#: (measured: benchmarks/doctor.py, docs/benchmarks.md)
NEAR_DUPLICATE_HASH_SIMILARITY = 0.99


def drop_unreadable(
    data: DataSource, skip: bool, decode: bool = False
) -> tuple[DataSource, list[ImageReadError]]:
    """``data`` without the files that cannot be read, and the errors for them.

    ``decode=False`` (set-up's check) reads each file's header only, so it costs a file open per image,
    not a decode; a file whose pixel data is broken is found when a loader decodes it (and handled as
    ``skip_bad_images`` says), or up front by ``python -m transferkit check-data``, which decodes all.
    Raises :class:`~transferkit.errors.DatasetError` listing them unless ``skip`` (then they are left
    out with a warning).
    """
    bad = find_unreadable([str(p) for p in data.items], decode=decode)
    if not bad:
        return data, []
    if not skip:
        listing = "\n".join(f"  {err.path}: {err.reason}" for err in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DatasetError(
            f"{len(bad)} of {len(data)} images cannot be read:\n{listing}{more}\n"
            "Fix or remove them, or set data.skip_bad_images=true to leave them out "
            "(python -m transferkit check-data --config X lists every bad file)."
        )
    bad_paths = {err.path for err in bad}
    keep = np.asarray([str(p) not in bad_paths for p in data.items])
    warn(
        f"skipped {len(bad)} unreadable images (skip_bad_images=true), e.g. "
        + "; ".join(f"{e.path}: {e.reason}" for e in bad[:3])
    )
    return select(data, np.flatnonzero(keep)), bad


def check_images(
    data: DataSource, workers: int | None = None, progress: Callable[[int], None] | None = None
) -> list[ImageReadError]:
    """Decode every image file of ``data`` in full, in threads, and return every failure in listing order,
    each naming the file and why (in-memory arrays are skipped: there is nothing to decode).

    Set-up reads headers only; this finds what only decoding finds (truncated or corrupt pixel data)
    before a long run meets it. ``progress(n)`` is called as files are done (e.g. a progress bar).
    ``python -m transferkit check-data --config X`` runs it on a recipe's data.

    Example:
        >>> import transferkit as tk
        >>> check_images(tk.ImageDataModule(source="digits").data)  # arrays only: nothing to decode
        []
    """
    files = [str(item) for item in data.items if isinstance(item, str | os.PathLike)]
    return find_unreadable(files, workers=workers, decode=True, progress=progress)


def warn_imbalance(labels: np.ndarray, class_names: Sequence[str]) -> None:
    """Warn, with the counts per class, when the largest class of ``labels`` (the training split) has
    more than :data:`IMBALANCE_WARNING_RATIO` times the images of the smallest, and say what each choice of
    ``data.loader.sampler`` does about it."""
    counts = np.bincount(labels, minlength=len(class_names))
    if counts.min() * IMBALANCE_WARNING_RATIO > counts.max():
        return
    listing = ", ".join(f"{name}: {int(c)}" for name, c in zip(class_names, counts, strict=True))
    warn(
        f"the training split is severely imbalanced ({listing}; largest/smallest = "
        f"{counts.max() / max(counts.min(), 1):.0f}x). In this order the loss favours the large classes, "
        "which suits accuracy on images in these proportions; if the small classes matter as much (macro-F1, "
        "recall of a rare defect), set data.loader.sampler: balanced (the small classes shown more often) or "
        "model.loss.class_weights: auto (each image of a small class counting more in the loss) and watch "
        "val_f1. Setting data.loader.sampler: shuffle keeps this order and this warning away."
    )


def warn_duplicates_across_splits(data: DataSource, splits: Mapping[str, np.ndarray]) -> None:
    """Files with the same bytes in two splits make the test (or validation) score optimistic: warn.

    Identical files have identical sizes, so only files whose size also occurs in another split are
    hashed: a folder of camera photos (sizes all different) costs one ``stat`` per file, not a read.
    """
    where: list[tuple[str, str, int]] = []  # (split, path, size)
    for split in ("train", "val", "test"):
        for i in splits.get(split, []):
            path = str(data.items[i])
            where.append((split, path, os.stat(path).st_size))
    splits_of_size: dict[int, set[str]] = {}
    for split, _, size in where:
        splits_of_size.setdefault(size, set()).add(split)
    digests: dict[tuple[int, str], tuple[str, str]] = {}
    found: list[str] = []
    count = 0
    for split, path, size in where:
        if len(splits_of_size[size]) < 2:
            continue  # no file of this size elsewhere: no copy across splits
        first = digests.setdefault((size, _file_digest(path)), (split, path))
        if first[0] != split:
            count += 1
            if len(found) < 3:
                found.append(f"{first[1]} ({first[0]}) = {path} ({split})")
    if count:
        warn(
            f"{count} images appear in more than one split with identical bytes, e.g. "
            + "; ".join(found)
            + ". Scores on val/test overstate accuracy on new images; remove the copies."
        )


def image_hashes(items: Sequence[object], workers: int = 2) -> np.ndarray:
    """Per image, the 63 lowest DCT coefficients (the mean left out) of its 32x32 grey thumbnail: a continuous
    perceptual hash, which re-encoding and resizing move little. Files are decoded at a reduced scale where
    they are JPEGs (``load_image(min_side=32)``), in ``workers`` threads; arrays are used as they are. An
    unreadable file gets a row of zeros (it is found, and reported, by the checks that read images)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from scipy.fft import dctn

    from transferkit.data.images import load_image

    def one(item: object) -> np.ndarray:
        try:
            pixels = (
                load_image(item, min_side=32) if isinstance(item, str | os.PathLike) else np.asarray(item)
            )
        except ImageReadError:
            return np.zeros(63)
        grey = (
            Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("L").resize((32, 32), Image.BILINEAR)
        )
        return dctn(np.asarray(grey, dtype=np.float64), norm="ortho")[:8, :8].ravel()[1:]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(one, items))
    return np.stack(rows) if rows else np.zeros((0, 63))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row of ``x`` scaled to length 1 (a zero row stays zero): cosine similarity is then a dot product."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def near_duplicates_across(
    hashes: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    similarity: float = NEAR_DUPLICATE_HASH_SIMILARITY,
) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, similarity)`` of an image of ``first`` and one of ``second`` (row indices of ``hashes``)
    whose hashes, centred on the mean of all rows, have a cosine similarity of at least ``similarity``,
    most similar first."""
    if len(first) == 0 or len(second) == 0:
        return []
    unit = unit_rows(hashes - hashes.mean(axis=0))
    pairs = []
    for start in range(0, len(first), 1024):
        block = first[start : start + 1024]
        sims = unit[block] @ unit[second].T
        for r, c in zip(*np.nonzero(sims >= similarity), strict=True):
            pairs.append((int(block[r]), int(second[c]), float(sims[r, c])))
    return sorted(pairs, key=lambda p: -p[2])


def warn_near_duplicates_across_splits(data: DataSource, splits: Mapping[str, np.ndarray]) -> int:
    """Warn when a test image looks like a training or validation one (re-encoded, resized: the same picture
    in other bytes), which makes the test score optimistic; return the number of test images concerned.
    Costs a reduced-scale decode of every image; ``finetune`` runs it before scoring the test split
    (``data.split.near_duplicates: off`` skips it)."""
    test = np.asarray(splits.get("test", []), dtype=np.int64)
    rest = np.concatenate([np.asarray(splits.get(s, []), dtype=np.int64) for s in ("train", "val")])
    if len(test) == 0 or len(rest) == 0:
        return 0
    order = np.concatenate([rest, test])
    hashes = image_hashes([data.items[i] for i in order])
    position = np.arange(len(order))
    pairs = near_duplicates_across(hashes, position[len(rest) :], position[: len(rest)])
    concerned = len({i for i, _, _ in pairs})
    if concerned:
        shown = "; ".join(f"{data.items[order[i]]} (test) ~ {data.items[order[j]]}" for i, j, _ in pairs[:3])
        warn(
            f"{concerned} test images look like training or validation images (the same picture re-encoded or "
            f"resized), e.g. {shown}. The test score overstates accuracy on new images: run python -m "
            "transferkit doctor --config <recipe> to list every group, and remove the copies "
            "(data.split.near_duplicates: off skips this check)."
        )
    return concerned


def _file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()


def select(data: DataSource, keep: np.ndarray) -> DataSource:
    """The samples of ``data`` at the indices ``keep``, its own splits renumbered."""
    remap = None
    if data.splits is not None:
        position = {int(old): new for new, old in enumerate(keep)}
        remap = {
            s: np.asarray([position[i] for i in idx if int(i) in position]) for s, idx in data.splits.items()
        }
    return DataSource(
        data.name,
        [data.items[i] for i in keep],
        data.labels[keep],
        data.class_names,
        data.stratify[keep] if data.stratify is not None else None,
        {k: v[keep] for k, v in data.meta.items()},
        remap,
        data.verified,
        data.test_fraction,
        data.soft[keep] if data.soft is not None else None,
        data.groups,
        data.kind,
    )


def stratified_sample(
    indices: np.ndarray, size: int, stratify: np.ndarray | None, seed: int, labels: np.ndarray | None = None
) -> np.ndarray:
    """``size`` of ``indices``, sorted: stratified on ``stratify[indices]`` where every stratum is large
    enough, else drawn at random; by iterative stratification on the 0/1 ``labels`` where ``stratify`` is
    ``None`` (multi-label data); seeded. All of them when ``size`` is not smaller."""
    from sklearn.model_selection import train_test_split

    if size >= len(indices):
        return np.sort(indices)
    if stratify is None:
        from transferkit.data.sources import multilabel_split

        _, keep = multilabel_split(indices, labels, size / len(indices), seed, "subset")
        return np.sort(keep)
    try:
        keep, _ = train_test_split(indices, train_size=size, stratify=stratify[indices], random_state=seed)
    except ValueError:  # strata too small for a stratified sample of this size
        keep = np.random.default_rng(seed).choice(indices, size=size, replace=False)
    return np.sort(keep)


def subset(data: DataSource, max_samples: int, seed: int) -> DataSource:
    """A stratified subset of at most ``max_samples`` samples (random where strata are too small)."""
    return select(
        data, stratified_sample(np.arange(len(data)), max_samples, data.stratify, seed, data.labels)
    )
