"""A trained model and its eval pipeline from a checkpoint alone: no recipe, no network."""

from __future__ import annotations

import os
from typing import Any

import albumentations as A

from transferkit.models.checkpoint import build_model, eval_transform_of, read_checkpoint
from transferkit.models.classifier import TransferClassifier

__all__ = ["load_checkpoint_model", "load_for_inference", "load_model_file"]


def load_checkpoint_model(path: str | os.PathLike, **overrides: Any) -> TransferClassifier:
    """The :class:`~transferkit.TransferClassifier` saved in ``path``, in eval mode on the CPU.

    The model is rebuilt from the checkpoint's own hyperparameters with ``pretrained=False`` (every
    weight comes from the checkpoint: no bundle, file or network is touched). ``overrides`` change
    arguments that do not alter the weights' shapes (``tta``, ``mc_dropout``, ``dropout``); changing
    ``backbone``, ``num_classes`` or ``hidden_dims`` raises :class:`~transferkit.errors.CheckpointMismatchError`.
    """
    return build_model(TransferClassifier, read_checkpoint(path), path, **overrides)


def load_for_inference(path: str | os.PathLike, **overrides: Any) -> tuple[TransferClassifier, A.Compose]:
    """The model in ``path`` and its eval pipeline: ``(TransferClassifier in eval mode, A.Compose)``.

    Needs no recipe and no network; the checkpoint is read once, with ``weights_only=True``. The
    pipeline maps an ``(H, W, 3) uint8`` RGB image (:func:`transferkit.data.images.load_image`) to the
    ``(3, S, S)`` float tensor the model expects. ``overrides`` as in :func:`load_checkpoint_model`.
    Every kind of target loads the same way: the model's task (``model.task.kind``), its calibration (a
    multi-label model's per-label thresholds) and a regression model's target scaling come from the
    checkpoint, so ``predict_proba`` gives probabilities or values in the targets' units at once.

    Example (a checkpoint written by hand here; a training run writes them in its ``checkpoints/``):
        >>> import os, tempfile, numpy as np
        >>> from transferkit.models.checkpoint import save_checkpoint
        >>> trained = TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False,
        ...                              class_names=["ok", "defect"])
        >>> path = save_checkpoint(trained, os.path.join(tempfile.mkdtemp(), "best.ckpt"))
        >>> model, transform = load_for_inference(path)
        >>> x = transform(image=np.zeros((300, 200, 3), np.uint8))["image"][None]  # (1, 3, S, S)
        >>> model.class_names[int(model.predict_proba(x).argmax())] in ("ok", "defect")
        True
    """
    checkpoint = read_checkpoint(path)
    return build_model(TransferClassifier, checkpoint, path, **overrides), eval_transform_of(checkpoint)


def load_model_file(
    path: str | os.PathLike, threads: int | None = None, **overrides: Any
) -> tuple[Any, A.Compose]:
    """A checkpoint (``.ckpt``) or an exported ONNX model (``.onnx``, fp32 or int8) and its eval pipeline:
    what ``predict-images`` and ``serve`` accept. Both answer ``predict_proba`` / ``predict_labels`` and carry
    ``class_names``, ``class_groups`` and ``task`` (:class:`~transferkit.inference.exported.ExportedModel`).
    ``threads``: ONNX Runtime's threads for an exported model; ``overrides`` apply to a checkpoint only."""
    if str(path).lower().endswith(".onnx"):
        from transferkit.inference.exported import load_exported

        return load_exported(path, threads=threads)
    return load_for_inference(path, **overrides)
