"""The checkpoint format, in one place: what a transferkit checkpoint holds, how it is read and checked,
and how the model in it is rebuilt.

A checkpoint written while training carries, besides Lightning's ``state_dict`` and
``hyper_parameters``, a ``transferkit`` section (:func:`checkpoint_section`): the backbone's name and
where its weights first came from, the class names, the eval Albumentations pipeline (``A.to_dict``),
mean, std and input size, the freeze schedule with its state, and the calibration (temperature and
decision threshold, identity until fitted). That is everything needed to use the model on new images
without the recipe.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.
"""

from __future__ import annotations

import inspect
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import albumentations as A
import torch

from transferkit.containers import plain
from transferkit.data.augment import build_eval_transform
from transferkit.errors import CheckpointError, CheckpointMismatchError, warn
from transferkit.files import atomic_write
from transferkit.models.calibration import Calibration
from transferkit.models.settings import FLAT_KEYS, GROUPS, from_flat, is_flat

__all__ = [
    "SECTION",
    "SelfDescribing",
    "SECTION_FORMAT",
    "build_model",
    "calibration_of",
    "check_compatible",
    "checkpoint_preprocessing",
    "checkpoint_section",
    "eval_transform_of",
    "grouped_settings",
    "learning_rates",
    "model_preprocessing",
    "preprocessing_of",
    "read_checkpoint",
    "refused_pickle",
    "save_checkpoint",
    "store_calibration",
]

SECTION = "transferkit"
# the section's format; 1 = before it held the eval pipeline, 2 = before it held the calibration (read
# as uncalibrated)
SECTION_FORMAT = 3


# --- writing ---------------------------------------------------------------------------------------


def checkpoint_section(model: Any) -> dict[str, Any]:
    """The ``transferkit`` section of a checkpoint of ``model`` (a :class:`~transferkit.TransferClassifier`).
    Plain types only, so the checkpoint loads with ``weights_only=True``."""
    return {
        "format": SECTION_FORMAT,
        "backbone": model.backbone.name,
        "weights": model.backbone.weights,
        "class_names": list(model.class_names),
        "data_config": plain(model.data_config),
        "preprocessing": checkpoint_preprocessing(model),
        "freeze_schedule": model.freeze_schedule.to_dict(),
        "trainable_groups": model.freezing.trainable_groups,
        "num_groups": len(model.groups),
        "calibration": model.calibration.to_dict(),
        # the kind of target, its names and (regression) the training split's scaling; the weights hold it too
        "target": model.task.describe(),
    }


def save_checkpoint(model: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` (a :class:`~transferkit.TransferClassifier`) to ``path`` as a training run's checkpoint
    holds it: weights, settings and the self-describing section, so it loads for inference, export and serving
    with ``weights_only=True``. For a model trained outside :class:`transferkit.Trainer`, and for examples.
    Written atomically: a failure leaves no half-written file.

    Example:
        >>> import os, tempfile
        >>> from transferkit import TransferClassifier
        >>> from transferkit.inference.loading import load_for_inference
        >>> model = TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False,
        ...                            class_names=["ok", "defect"])
        >>> path = save_checkpoint(model, os.path.join(tempfile.mkdtemp(), "model.ckpt"))
        >>> load_for_inference(path)[0].class_names
        ['ok', 'defect']
    """
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        SECTION: checkpoint_section(model),
    }
    return atomic_write(path, lambda handle: torch.save(checkpoint, handle), what="checkpoint")


def checkpoint_preprocessing(model: Any) -> dict[str, Any]:
    """How images must be prepared for ``model``: the eval pipeline (``A.to_dict``), input size, mean, std.

    The model's ``preprocessing`` (what :class:`transferkit.Trainer` handed it from the data module it was
    trained and tested with) when it has one; otherwise the backbone's own data config.
    """
    given = getattr(model, "preprocessing", None)
    if given is not None:
        size, mean, std = int(given["image_size"]), list(given["mean"]), list(given["std"])
        transform, source = given["eval_transform"], "datamodule"
    else:
        config = model.data_config
        size = int(config["input_size"][-1])
        mean, std = list(config["mean"]), list(config["std"])
        transform, source = build_eval_transform(size, mean, std), "backbone"
    return {
        "eval_transform": A.to_dict(transform),
        "input_size": [3, size, size],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "source": source,
    }


def model_preprocessing(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The preprocessing a checkpoint's model was handed (``image_size``, ``mean``, ``std``,
    ``eval_transform``), as :meth:`~transferkit.TransferClassifier.set_preprocessing` takes it; ``None``
    where the checkpoint describes only the backbone's own."""
    stored = (checkpoint.get(SECTION) or {}).get("preprocessing")
    if not stored or stored.get("source") != "datamodule":
        return None
    return {
        "image_size": int(stored["input_size"][-1]),
        "mean": tuple(stored["mean"]),
        "std": tuple(stored["std"]),
        "eval_transform": A.from_dict(stored["eval_transform"]),
    }


# --- reading ---------------------------------------------------------------------------------------


def refused_pickle(path: Any, err: Exception, action: str = "load") -> CheckpointError:
    """The :class:`~transferkit.errors.CheckpointError` for a checkpoint that holds pickled code or
    objects (``torch.load(weights_only=True)`` refused it); ``action`` is ``load`` or ``resume from``."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    advice = (
        "If you trust its origin, load it yourself and save its state_dict as tensors, or re-create it "
        "with a transferkit training run."
        if action == "load"
        else "Resume from a checkpoint a transferkit run wrote."
    )
    return CheckpointError(
        f"refused to {action} '{path}': it holds pickled code or objects, not only tensors and plain "
        f"containers ({first_line}). transferkit loads checkpoints with weights_only=True and never "
        f"runs code from a file. {advice}"
    )


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
        raise refused_pickle(path, err) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {err})."
        ) from err
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"'{path}' holds no model state_dict; pass a checkpoint written by a transferkit training run "
            "(runs/<name>/lightning_logs/version_N/checkpoints/*.ckpt)."
        )
    if SECTION not in checkpoint:
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
    section = checkpoint.get(SECTION) or {}
    hparams = from_flat(checkpoint.get("hyper_parameters") or {})
    saved_backbone = section.get("backbone", hparams.get("backbone"))
    saved_classes = len(section["class_names"]) if "class_names" in section else hparams.get("num_classes")
    saved_hidden = (hparams.get("head") or {}).get("hidden_dims")
    saved_kind = (section.get("target") or {}).get("kind", hparams.get("target", "single_label"))
    own_kind = model.settings.target
    own_backbone = model.backbone.name
    own_classes = int(model.settings.num_classes)
    own_hidden = list(model.settings.head.hidden_dims)
    differences = []
    if saved_backbone is not None and saved_backbone != own_backbone:
        differences.append(f"backbone: checkpoint '{saved_backbone}', model '{own_backbone}'")
    if saved_classes is not None and int(saved_classes) != own_classes:
        names = section.get("class_names")
        listed = f" ({', '.join(map(str, names))})" if names else ""
        differences.append(f"num_classes: checkpoint {saved_classes}{listed}, model {own_classes}")
    if saved_hidden is not None and list(saved_hidden) != own_hidden:
        differences.append(f"hidden_dims: checkpoint {list(saved_hidden)}, model {own_hidden}")
    if saved_kind != own_kind:
        differences.append(f"target: checkpoint {saved_kind}, model {own_kind}")
    if differences:
        raise CheckpointMismatchError(
            f"{source} does not fit this model: "
            + "; ".join(differences)
            + f". It holds a {_describe(saved_backbone, saved_classes, saved_hidden)}: build the model "
            f"with backbone={saved_backbone!r}, num_classes={saved_classes}"
            + (f", target={saved_kind!r}" if saved_kind != "single_label" else "")
            + (f", head={{'hidden_dims': {list(saved_hidden)}}}" if saved_hidden is not None else "")
            + " (in a recipe: the model section), or load it with TransferClassifier.from_checkpoint(path), "
            "which rebuilds it as it was saved."
        )


def _model_kwargs(
    model_class: type, checkpoint: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    accepted = inspect.signature(model_class.__init__).parameters
    hparams = from_flat(checkpoint.get("hyper_parameters") or {})  # flat: written before the groups
    section = checkpoint[SECTION]
    kwargs = {k: v for k, v in hparams.items() if k in accepted and k != "self"}
    kwargs.setdefault("backbone", section["backbone"])
    kwargs.setdefault("class_names", list(section["class_names"]))
    kwargs.setdefault("num_classes", len(section["class_names"]))
    if section.get("freeze_schedule") is not None:
        kwargs.setdefault("freeze_schedule", section["freeze_schedule"])
    # the checkpoint holds every weight: nothing to fetch from a bundle, a file or the hub
    kwargs["pretrained"] = False
    unknown = set(overrides) - set(accepted)
    moved = sorted(k for k in unknown if k in FLAT_KEYS)
    if moved:
        group, name = FLAT_KEYS[moved[0]]
        raise TypeError(
            f"{moved[0]} is a field of the {group} group now: give {group}={{{name!r}: ...}} "
            f"(e.g. TransferClassifier.from_checkpoint(path, {group}={{{name!r}: ...}}))."
        )
    if unknown:
        raise TypeError(
            f"unknown {model_class.__name__} arguments {sorted(unknown)}; choose from {sorted(set(accepted) - {'self'})}."
        )
    if "num_classes" in overrides and "class_names" not in overrides:
        kwargs.pop("class_names", None)  # the saved names would contradict the new count
    for name, value in overrides.items():
        saved = kwargs.get(name)
        # a group given as a dict changes the fields it names (prediction={"tta": "hflip"}), keeps the rest
        if isinstance(value, Mapping) and isinstance(saved, Mapping) and name in GROUPS:
            value = {**saved, **value}
        kwargs[name] = value
    return kwargs


def _stored_preprocessing(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    section = checkpoint[SECTION]
    if section.get("preprocessing") is not None:
        return dict(section["preprocessing"])
    # an older checkpoint: the data module's settings if it saved them, else the backbone's
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    data = data.get("pipeline") or data  # the data module's settings in groups, or flat (before them)
    config = section["data_config"]
    size = int(data.get("image_size") or config["input_size"][-1])
    mean = list(data.get("mean") or config["mean"])
    std = list(data.get("std") or config["std"])
    if not all(data.get(k) for k in ("image_size", "mean", "std")):
        warn(
            "this checkpoint does not store its preprocessing; using the backbone's own input size, mean "
            f"and std where the data module's are unknown ({size} px, mean {mean}, std {std})."
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
    section = checkpoint[SECTION]
    preprocessing = _stored_preprocessing(checkpoint)
    return {
        "class_names": list(section["class_names"]),
        "target": dict(
            section.get("target") or {"kind": "single_label", "names": list(section["class_names"])}
        ),
        "input_size": list(preprocessing["input_size"]),
        "mean": list(preprocessing["mean"]),
        "std": list(preprocessing["std"]),
        "eval_transform": preprocessing["eval_transform"],
        "backbone": section["backbone"],
        "input": "RGB uint8 (H, W, 3) through eval_transform -> float32 (3, H, W); a batch is (B, 3, H, W)",
    }


def build_model(
    model_class: type, checkpoint: Mapping[str, Any], path: str | os.PathLike, **overrides: Any
) -> Any:
    """The model in an already read checkpoint (:func:`read_checkpoint`), in eval mode on the CPU.

    Rebuilt as ``model_class(**the checkpoint's hyperparameters)`` (settings in groups, or flat as
    checkpoints stored them before the groups: :func:`~transferkit.models.settings.from_flat`) with
    ``pretrained=False`` (every weight comes from the checkpoint: no bundle, file or network is touched).
    ``overrides`` change arguments that do not alter the weights' shapes; a group given as a dict changes
    the fields it names (``prediction={"tta": "hflip"}``). Changing ``backbone``, ``num_classes`` or the
    head's ``hidden_dims`` raises :class:`~transferkit.errors.CheckpointMismatchError`.
    ``path`` names the checkpoint in messages and in ``backbone.weights``.
    """
    model = model_class(**_model_kwargs(model_class, checkpoint, overrides))
    check_compatible(model, checkpoint, source=f"checkpoint '{path}'")
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointMismatchError(
            f"the weights in '{path}' do not fit the model rebuilt from its own settings: {err}"
        ) from err
    section = checkpoint[SECTION]
    model.backbone.weights = f"checkpoint:{Path(path).name} (fine-tuned from {section.get('weights')})"
    model.freezing.trainable_groups = section.get("trainable_groups")
    model.calibration = calibration_of(checkpoint)
    model.set_preprocessing(model_preprocessing(checkpoint))
    return model.eval()


def calibration_of(checkpoint: Mapping[str, Any]) -> Calibration:
    """The temperature and decision threshold stored in a checkpoint (identity for one written before
    calibration existed, or never calibrated)."""
    return Calibration.from_dict(checkpoint.get(SECTION, {}).get("calibration"))


def grouped_settings(path: Any) -> dict[str, Any]:
    """The settings groups of a checkpoint file whose settings an earlier version stored flat (``{}`` for
    one in groups, or for what is not a local file): what ``load_from_checkpoint`` passes so that the flat
    ``optimizer: adam`` and ``lr_schedule: cosine`` do not stand for the groups of the same names."""
    if not isinstance(path, str | os.PathLike) or not Path(path).is_file():
        return {}
    hparams = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
    return {k: v for k, v in from_flat(hparams).items() if k in GROUPS} if is_flat(hparams) else {}


def learning_rates(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The learning rates a checkpoint's model was trained with: ``lr``, ``backbone_lr`` and, when a range
    test chose them, ``found`` (its sweeps), from settings in groups or flat (written before the groups).

    Example:
        >>> learning_rates({"hyper_parameters": {"optimizer": {"lr": 0.01, "backbone_lr": None}}})
        {'lr': 0.01, 'backbone_lr': None}
    """
    hparams = from_flat(checkpoint.get("hyper_parameters") or {})
    optimizer = hparams.get("optimizer") or {}
    rates = {k: optimizer[k] for k in ("lr", "backbone_lr") if k in optimizer}
    if hparams.get("lr_found") is not None:
        rates["found"] = hparams["lr_found"]
    return rates


def store_calibration(path: str | os.PathLike, calibration: Calibration) -> Path:
    """Write ``calibration`` into the checkpoint at ``path`` (its ``transferkit`` section), atomically:
    a failure leaves the file as it was."""
    checkpoint = read_checkpoint(path)
    checkpoint[SECTION] = {**checkpoint[SECTION], "calibration": calibration.to_dict()}
    return atomic_write(path, lambda handle: torch.save(checkpoint, handle), what="checkpoint")


class SelfDescribing:
    """The checkpoint hooks and loaders of a classifier module: its checkpoints describe themselves
    (:func:`checkpoint_section`), refuse a model of another shape (:func:`check_compatible`), bring back the
    calibration and the preprocessing, and load whether their settings are in groups or flat."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint self-describing (:func:`checkpoint_section`)."""
        checkpoint[SECTION] = checkpoint_section(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with what differs and what to do, a checkpoint of another backbone, class count or head;
        take its calibration (temperature, decision threshold)."""
        if SECTION in checkpoint:
            check_compatible(self, checkpoint)
            self.calibration = calibration_of(checkpoint)
            if self.preprocessing is None:  # a model rebuilt from its checkpoint describes itself as before
                self.preprocessing = model_preprocessing(checkpoint)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, also of a checkpoint whose settings an earlier version
        stored flat (:func:`~transferkit.models.settings.from_flat`); ``kwargs`` override as in Lightning."""
        kwargs = {**grouped_settings(checkpoint_path), **kwargs}
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]

    @classmethod
    def from_checkpoint(cls, path: str, **overrides: Any) -> Any:
        """The model saved in the checkpoint ``path``, in eval mode on the CPU, without its recipe: every
        weight comes from the checkpoint (read with ``weights_only=True``), none from a bundle, a file or
        the hub. ``overrides`` change what does not alter the weights' shapes; a group given as a dict
        changes the fields it names (``prediction={"tta": "hflip"}``). :func:`transferkit.load_for_inference`
        also returns the eval pipeline it was tested with."""
        return build_model(cls, read_checkpoint(path), path, **overrides)
