"""Predicting image files with a trained model: one row per file, unreadable ones listed, to CSV."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import torch

from transferkit.data.augment import decode_side
from transferkit.data.class_groups import group_probabilities
from transferkit.data.images import IMAGE_SUFFIXES, load_image
from transferkit.errors import ConfigError, ImageReadError

__all__ = ["list_images", "predict_images", "write_predictions_csv"]


def list_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image files named by ``inputs``: files as given, folders searched recursively for image suffixes."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            files += [str(p) for p in found]
        else:
            files.append(str(path))  # a missing file becomes an error row, not a crash
    return files


def predict_images(
    model: Any,
    eval_transform: A.Compose,
    files: Sequence[str | os.PathLike],
    tta: str | None = None,
    mc_dropout: int = 0,
    batch_size: int = 32,
    jpeg_draft: bool = True,
) -> list[dict[str, Any]]:
    """Predict each image file; one row per file, in order.

    A row holds ``file``, ``predicted`` (the class name), ``probs`` (``num_classes`` floats), with
    ``mc_dropout`` also ``uncertainty`` (the predictive entropy), for a model with class groups also
    ``predicted_group`` and ``group_probs`` (see :mod:`transferkit.data.class_groups`), and ``error`` (why
    the image could not be read or prepared, else ``""``). Unreadable images do not stop the others.

    Args:
        model: a :class:`~transferkit.TransferClassifier` (e.g. from :func:`transferkit.load_for_inference`).
        eval_transform: its eval pipeline, ``(H, W, 3) uint8`` -> ``(3, S, S)`` float.
        files: image paths.
        tta: test-time augmentation (``none``, ``hflip``, ``flips``, ``d4``; ``None`` = the model's own).
        mc_dropout: ``0``, or the number of Monte Carlo dropout passes (>= 2).
        batch_size: images per forward pass.
        jpeg_draft: decode JPEGs at the smallest DCT scale that still gives the pipeline every pixel it
            uses (see :func:`transferkit.data.augment.decode_side`), as the data module does in training;
            ``False`` decodes in full.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    rows: list[dict[str, Any]] = [{"file": str(f), "error": ""} for f in files]
    readable: list[tuple[int, torch.Tensor]] = []
    side = decode_side(eval_transform) if jpeg_draft else None
    for index, file in enumerate(files):
        try:
            if not Path(file).is_file():
                raise ImageReadError(file, "no such file")
            readable.append((index, eval_transform(image=load_image(file, min_side=side))["image"].float()))
        except ImageReadError as err:
            rows[index]["error"] = err.reason
        except Exception as err:  # the pipeline rejected a readable image
            rows[index]["error"] = f"the eval pipeline failed on it ({type(err).__name__}: {err})"
        if len(readable) >= batch_size:
            _predict_batch(model, readable, rows, tta, mc_dropout)
            readable = []
    if readable:
        _predict_batch(model, readable, rows, tta, mc_dropout)
    return rows


@torch.no_grad()
def _predict_batch(
    model: Any,
    items: list[tuple[int, torch.Tensor]],
    rows: list[dict[str, Any]],
    tta: str | None,
    samples: int,
) -> None:
    model.eval()
    batch = torch.stack([tensor for _, tensor in items]).to(model.device)
    uncertainty = None
    if samples:
        out = model.predict_mc_dropout(batch, samples, tta=tta)
        probs, uncertainty = out["probs"], out["entropy"].tolist()
    else:
        probs = model.predict_proba(batch, tta=tta)
    decided = model.predict_labels(probs).tolist()  # the stored decision threshold, if any
    for j, (index, _) in enumerate(items):
        row = rows[index]
        row["probs"] = probs[j].tolist()
        row["predicted"] = model.class_names[int(decided[j])]
        if uncertainty is not None:
            row["uncertainty"] = uncertainty[j]
    groups = getattr(model, "class_groups", None)
    if groups:
        grouped = group_probabilities(probs, groups)
        names = list(groups)
        for j, (index, _) in enumerate(items):
            rows[index]["group_probs"] = grouped[j].tolist()
            rows[index]["predicted_group"] = names[int(grouped[j].argmax())]


def write_predictions_csv(
    rows: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    uncertainty: bool,
    groups: Sequence[str] | None = None,
) -> Path:
    """``file, predicted, prob_<class>..., [predicted_group, prob_group_<group>...,] [uncertainty,] error``
    (the group columns for a model with class groups, named by ``groups``); unreadable images have only file
    and error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["file", "predicted", *(f"prob_{name}" for name in class_names)]
    columns += ["predicted_group", *(f"prob_group_{g}" for g in groups)] if groups else []
    columns += ["uncertainty"] if uncertainty else []
    columns += ["error"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            out = {"file": row["file"], "error": row["error"], "predicted": row.get("predicted", "")}
            for name, p in zip(class_names, row.get("probs") or [""] * len(class_names), strict=True):
                out[f"prob_{name}"] = f"{p:.6f}" if p != "" else ""
            if groups:
                out["predicted_group"] = row.get("predicted_group", "")
                for name, p in zip(groups, row.get("group_probs") or [""] * len(groups), strict=True):
                    out[f"prob_group_{name}"] = f"{p:.6f}" if p != "" else ""
            if uncertainty:
                out["uncertainty"] = f"{row['uncertainty']:.6f}" if "uncertainty" in row else ""
            writer.writerow(out)
    return path
