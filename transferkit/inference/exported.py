"""An exported ONNX model (fp32 or int8) as a model that predicts: what ``predict-images`` and ``serve`` use.

:func:`~transferkit.inference.export.export_checkpoint` writes a graph and, beside it and in its metadata, the
preprocessing: the eval pipeline, the class names, the target, the calibration (temperature, a binary
decision threshold, a multi-label model's thresholds) and the class groups. :class:`ExportedModel` reads
both and answers as :class:`~transferkit.TransferClassifier` does for prediction: ``predict_proba`` (the
task's scores, averaged over test-time views), ``predict_labels`` (the stored decision), ``class_names``,
``class_groups`` and ``task`` -- so :func:`~transferkit.inference.predict.predict_images` predicts with either,
and an exported 4-class ELPV model gives the binary verdict through its groups. Only ONNX Runtime and the
pipeline run: no checkpoint, no timm model.

>>> import os, tempfile, numpy as np, torch
>>> from transferkit import TransferClassifier
>>> from transferkit.models.checkpoint import save_checkpoint
>>> from transferkit.inference.export import export_checkpoint
>>> trained = TransferClassifier(num_classes=4, backbone="test_efficientnet", pretrained=False,
...                              class_names=["0", "1/3", "2/3", "1"],
...                              class_groups={"functional": ["0", "1/3"], "defective": ["2/3", "1"]})
>>> path = save_checkpoint(trained, os.path.join(tempfile.mkdtemp(), "best.ckpt"))
>>> onnx_path = export_checkpoint(path, "onnx").path
>>> model, transform = load_exported(onnx_path)
>>> model.class_groups, model.task.kind
({'functional': [0, 1], 'defective': [2, 3]}, 'single_label')
>>> x = transform(image=np.zeros((300, 200, 3), np.uint8))["image"][None]
>>> scores = model.predict_proba(x)
>>> bool(torch.allclose(scores, trained.eval().predict_proba(x, tta="none"), atol=1e-4))
True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch

from transferkit.errors import ConfigError, MissingDependencyError
from transferkit.inference.export import METADATA_KEY, preprocessing_path
from transferkit.models.calibration import Calibration
from transferkit.models.prediction import TTA_VIEWS
from transferkit.models.tasks import create_task

__all__ = ["ExportedModel", "load_exported", "read_preprocessing"]


def read_preprocessing(path: str | os.PathLike) -> dict[str, Any]:
    """The preprocessing an exported ONNX file carries in its metadata (``transferkit.preprocessing``), else
    the ``<name>.preprocessing.json`` beside it."""
    path = Path(path)
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        stored = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
        if stored:
            return json.loads(stored)
    except ImportError:
        pass
    except Exception as err:
        raise ConfigError(
            f"'{path}' is not an ONNX model that can be read ({type(err).__name__}: {err})."
        ) from err
    sidecar = preprocessing_path(path)
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    raise ConfigError(
        f"'{path}' carries no transferkit preprocessing (no '{METADATA_KEY}' metadata and no {sidecar.name} "
        "beside it): export it with `python -m transferkit export --ckpt_path <checkpoint>`."
    )


class ExportedModel:
    """An exported ONNX model with its preprocessing, answering as a model does for prediction.

    Args:
        path: the ``.onnx`` file (``model.onnx`` or a quantised ``model.int8.onnx``).
        threads: ONNX Runtime's intra-op threads (``None``: its default, one per core).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as err:
            raise MissingDependencyError(
                "running an exported ONNX model needs onnxruntime: pip install 'transferkit[export]'."
            ) from err
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"no exported model at '{self.path}'.")
        self.preprocessing = read_preprocessing(self.path)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.session = onnxruntime.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        p = self.preprocessing
        self.class_names = [str(n) for n in p["class_names"]]
        target = p.get("target") or {"kind": "single_label", "names": self.class_names}
        self.task = create_task(target.get("kind", "single_label"), self.class_names)
        self.calibration = Calibration.from_dict(p.get("calibration"))
        if self.task.kind == "multi_label" and target.get("thresholds") is not None:
            self.calibration.label_thresholds = list(target["thresholds"])
        groups = p.get("class_groups")
        self.class_groups = (
            {g: [self.class_names.index(str(n)) for n in names] for g, names in groups.items()}
            if groups
            else None
        )
        self.output_names = list(p.get("output_names") or [o.name for o in self.session.get_outputs()])
        self.tta = p.get("test_time_augmentation") or "none"
        self.input_size = [int(v) for v in p["input_size"]]
        self.device = torch.device("cpu")
        self.quantization = p.get("quantization")

    @property
    def eval_transform(self) -> A.Compose:
        """The eval pipeline the model was exported with (``A.from_dict``)."""
        return A.from_dict(self.preprocessing["eval_transform"])

    def eval(self) -> ExportedModel:  # the models' interface: an exported graph is always in eval mode
        return self

    def run(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """The graph's second output (probabilities or values) for a batch ``(B, 3, S, S)``, one view."""
        batch = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        return self.session.run([self.output_names[1]], {"images": np.ascontiguousarray(batch, np.float32)})[
            0
        ]

    def predict_proba(self, images: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """The task's scores ``(B, K)``, averaged over the test-time views (``None``: the exported model's own)."""
        tta = self.tta if tta is None else tta
        if tta not in TTA_VIEWS:
            raise ConfigError(f"unknown tta '{tta}'; choose one of {', '.join(TTA_VIEWS)}.")
        views = [torch.from_numpy(self.run(view(images))) for view in TTA_VIEWS[tta]]
        return torch.stack(views).mean(dim=0)

    def predict_labels(self, scores: torch.Tensor) -> torch.Tensor:
        """The stored decision on :meth:`predict_proba`'s scores, as the checkpoint model makes it."""
        return self.task.decide(scores, self.calibration)

    def predict_mc_dropout(self, *_: Any, **__: Any) -> Any:
        raise ConfigError(
            "an exported model has no dropout to sample (the graph is in eval mode): MC dropout needs the "
            "checkpoint; predict from the .ckpt file instead."
        )


def load_exported(path: str | os.PathLike, threads: int | None = None) -> tuple[ExportedModel, A.Compose]:
    """The exported model in ``path`` and its eval pipeline, as :func:`~transferkit.load_for_inference` gives
    a checkpoint's."""
    model = ExportedModel(path, threads=threads)
    return model, model.eval_transform
