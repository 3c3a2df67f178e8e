"""What a server needs of a model: decode an upload, prepare it, predict a batch, and say what it is.

:class:`Predictor` wraps a checkpoint (:func:`~transferkit.load_for_inference`) or an exported ONNX model
(:class:`~transferkit.inference.exported.ExportedModel`, fp32 or int8) behind one interface. Its answers are
:func:`~transferkit.inference.predict.predict_tensors`' rows, the numbers ``predict-images`` writes, with
the names attached (``probs`` as ``{class: probability}``, ``top`` sorted). A checkpoint also gives Grad-CAM
overlays; an exported graph cannot (it has no gradients), and :attr:`Predictor.gradcam_note` says so.

>>> import os, tempfile, io
>>> from PIL import Image
>>> from transferkit import TransferClassifier
>>> from transferkit.models.checkpoint import save_checkpoint
>>> trained = TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False,
...                              class_names=["ok", "defect"])
>>> path = save_checkpoint(trained, os.path.join(tempfile.mkdtemp(), "best.ckpt"))
>>> predictor = Predictor.load(path)
>>> buffer = io.BytesIO(); Image.new("RGB", (40, 30), "gray").save(buffer, format="PNG")
>>> row = predictor.predict([predictor.prepare(predictor.decode(buffer.getvalue(), "gray.png"))])[0]
>>> sorted(row["probs"]), row["predicted"] in ("ok", "defect")
(['defect', 'ok'], True)
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.data.augment import decode_side, normalization, unnormalize
from transferkit.data.images import decode_image
from transferkit.inference.loading import load_model_file
from transferkit.inference.predict import predict_tensors

__all__ = ["Predictor", "model_version"]


def model_version(path: str | os.PathLike) -> str:
    """``<file name>@<first 12 hex digits of its SHA-256>``: which weights answer, for ``/info`` and logs."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{Path(path).name}@{digest.hexdigest()[:12]}"


class Predictor:
    """A model and its eval pipeline, as a server uses them (see the module)."""

    def __init__(self, model: Any, transform: Any, path: str | os.PathLike) -> None:
        self.model = model
        self.transform = transform
        self.path = Path(path)
        self.version = model_version(path)
        self.exported = self.path.suffix.lower() == ".onnx"
        self.kind = model.task.kind
        self.names = list(model.class_names)
        self.groups = list(model.class_groups) if getattr(model, "class_groups", None) else None
        self._side = decode_side(transform)
        self._gradcam_layer: Any = None
        self.gradcam_note = (
            "an exported ONNX model has no gradients: serve the checkpoint (.ckpt) for Grad-CAM"
            if self.exported
            else (
                None if self.kind != "regression" else "Grad-CAM shows classes; a regression model has none"
            )
        )

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> Predictor:
        """A checkpoint (``.ckpt``) or an exported ``.onnx`` model (``threads``: ONNX Runtime's)."""
        model, transform = load_model_file(path, threads=threads)
        return cls(model.eval(), transform, path)

    def decode(self, data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
        """An upload's bytes as ``(H, W, 3) uint8`` (raises :class:`~transferkit.errors.ImageReadError`)."""
        return decode_image(data, name, min_side=self._side, max_pixels=max_pixels)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """An image through the eval pipeline: ``(3, S, S)`` float."""
        return self.transform(image=image)["image"].float()

    def predict(self, tensors: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        """One answer per prepared image, predicted as one batch."""
        rows = predict_tensors(self.model, list(tensors))
        return [self._named(row) for row in rows]

    def _named(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "regression":
            return {"values": dict(zip(self.names, row["values"], strict=True))}
        probs = dict(zip(self.names, row["probs"], strict=True))
        out: dict[str, Any] = {
            "predicted": row["predicted"],
            "probs": probs,
            "top": [{"name": n, "prob": p} for n, p in sorted(probs.items(), key=lambda kv: -kv[1])],
        }
        if self.groups:
            out["predicted_group"] = row["predicted_group"]
            out["group_probs"] = dict(zip(self.groups, row["group_probs"], strict=True))
        return out

    def gradcam_png(self, tensor: torch.Tensor, class_index: int) -> bytes | None:
        """The Grad-CAM overlay of ``class_index`` on the prepared image, as PNG bytes (``None`` where the
        model cannot give one: :attr:`gradcam_note`)."""
        if self.gradcam_note is not None:
            return None
        from PIL import Image

        from transferkit.inference.gradcam import gradcam_layer, gradcam_maps

        side = int(tensor.shape[-1])
        if self._gradcam_layer is None:
            self._gradcam_layer = gradcam_layer(self.model, side)
        cam = gradcam_maps(self.model, tensor[None], classes=[class_index], layer=self._gradcam_layer)[0]
        shown = unnormalize(tensor, *normalization(self.transform))
        heat = np.stack([np.clip(3 * cam, 0, 1), np.clip(3 * cam - 1, 0, 1), np.clip(3 * cam - 2, 0, 1)], -1)
        alpha = 0.55 * cam[..., None]
        blended = ((1 - alpha) * shown + alpha * heat) * 255
        buffer = io.BytesIO()
        Image.fromarray(blended.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    def gradcam_data_url(self, tensor: torch.Tensor, class_index: int) -> str | None:
        png = self.gradcam_png(tensor, class_index)
        return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()

    def describe(self) -> dict[str, Any]:
        """What ``GET /info`` shows."""
        size = list(self.prepare(np.zeros((8, 8, 3), np.uint8)).shape)
        quantized = self.exported and bool(self.model.quantization)
        info: dict[str, Any] = {
            "model": self.path.name,
            "model_version": self.version,
            "format": ("onnx int8" if quantized else "onnx fp32") if self.exported else "checkpoint",
            "kind": self.kind,
            "classes": self.names,
            "class_groups": (
                {g: [self.names[i] for i in idx] for g, idx in self.model.class_groups.items()}
                if self.groups
                else None
            ),
            "input_size": size,
            "gradcam": self.gradcam_note is None,
        }
        if self.gradcam_note:
            info["gradcam_note"] = self.gradcam_note
        return info
