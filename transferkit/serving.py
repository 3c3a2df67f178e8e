"""Checkpoints that describe themselves, loaded for inference without the recipe, and ``predict-images``.

A checkpoint written while training (``on_save_checkpoint``) carries a ``transferkit`` section: the
backbone's name and where its weights first came from, the class names, the eval Albumentations pipeline
(``A.to_dict``), mean, std and input size, and the freeze schedule with its state. That is everything
needed to use the model on new images:

>>> model, eval_transform = load_for_inference("runs/x/checkpoints/best.ckpt")  # doctest: +SKIP
>>> batch = torch.stack([eval_transform(image=load_image(p))["image"] for p in paths])  # doctest: +SKIP
>>> model.predict_proba(batch)  # (B, num_classes)  # doctest: +SKIP

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import torch

from transferkit.data.augment import build_eval_transform
from transferkit.data.images import IMAGE_SUFFIXES, ImageReadError, load_image

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "build_model",
    "check_compatible",
    "checkpoint_preprocessing",
    "eval_transform_of",
    "list_images",
    "load_checkpoint_model",
    "load_for_inference",
    "predict_images",
    "preprocessing_of",
    "read_checkpoint",
    "write_predictions_csv",
]

# the checkpoint's transferkit section; 1 = before it held the eval pipeline
SECTION_FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint could not be read, or is not a transferkit checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's model does not fit the model it is being loaded into."""


# --- writing ---------------------------------------------------------------------------------------


def checkpoint_preprocessing(model: Any, datamodule: Any | None = None) -> dict[str, Any]:
    """How images must be prepared for ``model``: the eval pipeline (``A.to_dict``), input size, mean, std.

    Taken from ``datamodule`` (its ``eval_transform``, ``image_size``, ``mean``, ``std``) when it has
    them, which is what the model was trained and tested with; otherwise from the backbone's own
    data config.
    """
    transform = None
    if datamodule is not None:
        try:
            transform = datamodule.eval_transform
        except Exception:  # a data module that cannot resolve its pipeline: fall back to the backbone's
            transform = None
    if transform is not None and getattr(datamodule, "image_size", None) is not None:
        size = int(datamodule.image_size)
        mean, std = list(datamodule.mean), list(datamodule.std)
        source = "datamodule"
    else:
        config = model.data_config
        size = int(config["input_size"][-1])
        mean, std = list(config["mean"]), list(config["std"])
        transform = build_eval_transform(size, mean, std)
        source = "backbone"
    return {
        "eval_transform": A.to_dict(transform),
        "input_size": [3, size, size],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "source": source,
    }


# --- reading ---------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A transferkit checkpoint as a dict, read with ``torch.load(weights_only=True)`` on the CPU.

    Raises :class:`CheckpointError` if the file is missing, is not a PyTorch checkpoint, holds pickled
    code or objects (which are never executed), or has no ``transferkit`` section.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'; pass the .ckpt file a training run wrote.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refused to load '{path}': it holds pickled code or objects, not only tensors and plain "
            f"containers ({first_line}). transferkit loads checkpoints with weights_only=True and never "
            "runs code from a file. If you trust its origin, load it yourself and save its state_dict "
            "as tensors, or re-create it with a transferkit training run."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {err})."
        ) from err
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"'{path}' holds no model state_dict; pass a checkpoint written by a transferkit training run "
            "(runs/<name>/lightning_logs/version_N/checkpoints/*.ckpt)."
        )
    if "transferkit" not in checkpoint:
        raise CheckpointError(
            f"'{path}' is a Lightning checkpoint without a 'transferkit' section, so it does not say which "
            "backbone, classes and preprocessing it was trained with; pass a checkpoint written by a "
            "transferkit training run."
        )
    return dict(checkpoint)


def _describe(backbone: str, num_classes: int, hidden_dims: Any) -> str:
    head = f", head {list(hidden_dims)}" if hidden_dims is not None else ""
    return f"{backbone} with {num_classes} classes{head}"


def check_compatible(model: Any, checkpoint: Mapping[str, Any], source: str = "the checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` unless ``checkpoint`` holds weights for ``model``'s shape:
    the same backbone architecture, number of classes and head widths."""
    section = checkpoint.get("transferkit") or {}
    hparams = checkpoint.get("hyper_parameters") or {}
    saved_backbone = section.get("backbone", hparams.get("backbone"))
    saved_classes = len(section["class_names"]) if "class_names" in section else hparams.get("num_classes")
    saved_hidden = hparams.get("hidden_dims")
    own_backbone = model.backbone.name
    own_classes = int(model.hparams.num_classes)
    own_hidden = list(model.hparams.hidden_dims)
    differences = []
    if saved_backbone is not None and saved_backbone != own_backbone:
        differences.append(f"backbone: checkpoint '{saved_backbone}', model '{own_backbone}'")
    if saved_classes is not None and int(saved_classes) != own_classes:
        names = section.get("class_names")
        listed = f" ({', '.join(map(str, names))})" if names else ""
        differences.append(f"num_classes: checkpoint {saved_classes}{listed}, model {own_classes}")
    if saved_hidden is not None and list(saved_hidden) != own_hidden:
        differences.append(f"hidden_dims: checkpoint {list(saved_hidden)}, model {own_hidden}")
    if differences:
        raise CheckpointMismatchError(
            f"{source} does not fit this model: "
            + "; ".join(differences)
            + f". It holds a {_describe(saved_backbone, saved_classes, saved_hidden)}: build the model "
            f"with backbone={saved_backbone!r}, num_classes={saved_classes}"
            + (f", hidden_dims={list(saved_hidden)}" if saved_hidden is not None else "")
            + " (in a recipe: the model section), or load it with TransferClassifier.from_checkpoint(path), "
            "which rebuilds it as it was saved."
        )


def _model_kwargs(checkpoint: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    from transferkit.module import TransferClassifier

    accepted = inspect.signature(TransferClassifier.__init__).parameters
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    section = checkpoint["transferkit"]
    kwargs = {k: v for k, v in hparams.items() if k in accepted and k != "self"}
    kwargs.setdefault("backbone", section["backbone"])
    kwargs.setdefault("class_names", list(section["class_names"]))
    kwargs.setdefault("num_classes", len(section["class_names"]))
    if section.get("freeze_schedule") is not None:
        kwargs.setdefault("freeze_schedule", section["freeze_schedule"])
    # the checkpoint holds every weight: nothing to fetch from a bundle, a file or the hub
    kwargs["pretrained"] = False
    unknown = set(overrides) - set(accepted)
    if unknown:
        raise TypeError(
            f"unknown TransferClassifier arguments {sorted(unknown)}; choose from {sorted(set(accepted) - {'self'})}."
        )
    if "num_classes" in overrides and "class_names" not in overrides:
        kwargs.pop("class_names", None)  # the saved names would contradict the new count
    kwargs.update(overrides)
    return kwargs


def _stored_preprocessing(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    section = checkpoint["transferkit"]
    if section.get("preprocessing") is not None:
        return dict(section["preprocessing"])
    # an older checkpoint: the data module's settings if it saved them, else the backbone's
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    config = section["data_config"]
    size = int(data.get("image_size") or config["input_size"][-1])
    mean = list(data.get("mean") or config["mean"])
    std = list(data.get("std") or config["std"])
    if not all(data.get(k) for k in ("image_size", "mean", "std")):
        warnings.warn(
            "this checkpoint does not store its preprocessing; using the backbone's own input size, mean "
            f"and std where the data module's are unknown ({size} px, mean {mean}, std {std}).",
            stacklevel=3,
        )
    return {
        "eval_transform": A.to_dict(build_eval_transform(size, mean, std)),
        "input_size": [3, size, size],
        "mean": mean,
        "std": std,
        "source": "datamodule" if data.get("image_size") else "backbone",
    }


def eval_transform_of(checkpoint: Mapping[str, Any]) -> A.Compose:
    """The eval pipeline a checkpoint was tested with, rebuilt with ``A.from_dict``."""
    return A.from_dict(_stored_preprocessing(checkpoint)["eval_transform"])


def preprocessing_of(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a deployed model needs besides its weights: class names, eval pipeline, input size, mean, std."""
    section = checkpoint["transferkit"]
    preprocessing = _stored_preprocessing(checkpoint)
    return {
        "class_names": list(section["class_names"]),
        "input_size": list(preprocessing["input_size"]),
        "mean": list(preprocessing["mean"]),
        "std": list(preprocessing["std"]),
        "eval_transform": preprocessing["eval_transform"],
        "backbone": section["backbone"],
        "input": "RGB uint8 (H, W, 3) through eval_transform -> float32 (3, H, W); a batch is (B, 3, H, W)",
    }


def load_checkpoint_model(path: str | os.PathLike, **overrides: Any) -> Any:
    """The :class:`~transferkit.TransferClassifier` saved in ``path``, in eval mode on the CPU.

    The model is rebuilt from the checkpoint's own hyperparameters with ``pretrained=False`` (every
    weight comes from the checkpoint: no bundle, file or network is touched). ``overrides`` change
    arguments that do not alter the weights' shapes (``tta``, ``mc_dropout``, ``dropout``); changing
    ``backbone``, ``num_classes`` or ``hidden_dims`` raises :class:`CheckpointMismatchError`.
    """
    return build_model(read_checkpoint(path), path, **overrides)


def build_model(checkpoint: Mapping[str, Any], path: str | os.PathLike, **overrides: Any) -> Any:
    """The model in an already read checkpoint (:func:`read_checkpoint`), as :func:`load_checkpoint_model`
    builds it; ``path`` names it in messages and in ``backbone.weights``."""
    from transferkit.module import TransferClassifier

    model = TransferClassifier(**_model_kwargs(checkpoint, overrides))
    check_compatible(model, checkpoint, source=f"checkpoint '{path}'")
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointMismatchError(
            f"the weights in '{path}' do not fit the model rebuilt from its own settings: {err}"
        ) from err
    section = checkpoint["transferkit"]
    model.backbone.weights = f"checkpoint:{Path(path).name} (fine-tuned from {section.get('weights')})"
    model.trainable_groups = section.get("trainable_groups")
    return model.eval()


def load_for_inference(path: str | os.PathLike, **overrides: Any) -> tuple[Any, A.Compose]:
    """The model in ``path`` and its eval pipeline: ``(TransferClassifier in eval mode, A.Compose)``.

    Needs no recipe and no network; the checkpoint is read once, with ``weights_only=True``. The
    pipeline maps an ``(H, W, 3) uint8`` RGB image (:func:`transferkit.data.images.load_image`) to the
    ``(3, S, S)`` float tensor the model expects. ``overrides`` as in :func:`load_checkpoint_model`.

    Example:
        >>> model, transform = load_for_inference("best.ckpt")  # doctest: +SKIP
        >>> x = transform(image=load_image("cell.png"))["image"][None]  # (1, 3, S, S)  # doctest: +SKIP
        >>> model.class_names[int(model.predict_proba(x).argmax())]  # doctest: +SKIP
    """
    checkpoint = read_checkpoint(path)
    return build_model(checkpoint, path, **overrides), eval_transform_of(checkpoint)


# --- predict-images --------------------------------------------------------------------------------


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
) -> list[dict[str, Any]]:
    """Predict each image file; one row per file, in order.

    A row holds ``file``, ``predicted`` (the class name), ``probs`` (``num_classes`` floats), with
    ``mc_dropout`` also ``uncertainty`` (the predictive entropy), and ``error`` (why the image could not
    be read or prepared, else ``""``). Unreadable images do not stop the others.

    Args:
        model: a :class:`~transferkit.TransferClassifier` (e.g. from :func:`load_for_inference`).
        eval_transform: its eval pipeline, ``(H, W, 3) uint8`` -> ``(3, S, S)`` float.
        files: image paths.
        tta: test-time augmentation (``none``, ``hflip``, ``flips``, ``d4``; ``None`` = the model's own).
        mc_dropout: ``0``, or the number of Monte Carlo dropout passes (>= 2).
        batch_size: images per forward pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    rows: list[dict[str, Any]] = [{"file": str(f), "error": ""} for f in files]
    readable: list[tuple[int, torch.Tensor]] = []
    for index, file in enumerate(files):
        try:
            if not Path(file).is_file():
                raise ImageReadError(file, "no such file")
            readable.append((index, eval_transform(image=load_image(file))["image"].float()))
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
        own_tta = model.hparams.tta
        model.hparams.tta = tta or own_tta  # predict_mc_dropout takes its views from there
        try:
            out = model.predict_mc_dropout(batch, samples)
        finally:
            model.hparams.tta = own_tta
        probs, uncertainty = out["probs"], out["entropy"].tolist()
    else:
        probs = model.predict_proba(batch, tta=tta)
    for j, (index, _) in enumerate(items):
        row = rows[index]
        row["probs"] = probs[j].tolist()
        row["predicted"] = model.class_names[int(probs[j].argmax())]
        if uncertainty is not None:
            row["uncertainty"] = uncertainty[j]


def write_predictions_csv(
    rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], path: str | os.PathLike, uncertainty: bool
) -> Path:
    """``file, predicted, prob_<class>..., [uncertainty,] error``; unreadable images have only file and error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["file", "predicted", *(f"prob_{name}" for name in class_names)]
    columns += ["uncertainty"] if uncertainty else []
    columns += ["error"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            out = {"file": row["file"], "error": row["error"], "predicted": row.get("predicted", "")}
            for name, p in zip(class_names, row.get("probs") or [""] * len(class_names), strict=True):
                out[f"prob_{name}"] = f"{p:.6f}" if p != "" else ""
            if uncertainty:
                out["uncertainty"] = f"{row['uncertainty']:.6f}" if "uncertainty" in row else ""
            writer.writerow(out)
    return path


def main(argv: Sequence[str]) -> int:
    """``predict-images``: class probabilities of image files or folders, written to a CSV."""
    parser = argparse.ArgumentParser(
        prog="python -m transferkit predict-images",
        description=(
            "Predict image files with a transferkit checkpoint (its own eval pipeline, no recipe) and write "
            "a CSV: file, predicted, prob_<class> per class, [uncertainty], error. Unreadable images get a "
            "row with the reason and are listed on stderr; the others are still predicted. Exit status 0 "
            "when at least one image was predicted, 1 when none could be."
        ),
    )
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a transferkit .ckpt file")
    parser.add_argument(
        "--images", nargs="+", required=True, help="image files and/or folders (searched recursively)"
    )
    parser.add_argument("--out", default="predictions.csv", help="the CSV to write (default: %(default)s)")
    parser.add_argument(
        "--tta",
        choices=["none", "hflip", "flips", "d4"],
        default=None,
        help="test-time augmentation (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--mc-dropout",
        "--mc_dropout",
        type=int,
        default=0,
        metavar="N",
        help="N >= 2 Monte Carlo dropout passes; adds an 'uncertainty' (entropy) column",
    )
    parser.add_argument("--batch-size", "--batch_size", type=int, default=32, help="images per batch")
    args = parser.parse_args(list(argv))
    if args.mc_dropout == 1 or args.mc_dropout < 0:
        parser.error(f"--mc-dropout needs N >= 2 passes (or 0 for off), got {args.mc_dropout}.")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}.")

    try:
        model, transform = load_for_inference(args.ckpt_path)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = list_images(args.images)
    if not files:
        print(f"error: no image files found in {', '.join(args.images)}.", file=sys.stderr)
        return 1
    try:
        rows = predict_images(
            model, transform, files, tta=args.tta, mc_dropout=args.mc_dropout, batch_size=args.batch_size
        )
    except ValueError as err:  # e.g. MC dropout on a model built without dropout
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = write_predictions_csv(rows, model.class_names, args.out, uncertainty=bool(args.mc_dropout))
    failed = [row for row in rows if row["error"]]
    predicted = len(rows) - len(failed)
    print(f"predicted {predicted} of {len(rows)} images -> {out}", file=sys.stderr)
    if failed:
        print(
            f"{len(failed)} images could not be predicted (rows with an 'error' in the CSV):", file=sys.stderr
        )
        for row in failed[:20]:
            print(f"  {row['file']}: {row['error']}", file=sys.stderr)
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more", file=sys.stderr)
    return 0 if predicted else 1
