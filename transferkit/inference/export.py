"""Export a checkpoint for serving: ONNX or TorchScript, BatchNorm folded, with its preprocessing beside it.

The exported graph maps images ``(B, 3, S, S)`` float32 (already through the eval pipeline) to
``(logits (B, C), probabilities (B, C))``; the batch size is free. Next to ``model.onnx`` (or
``model.torchscript.pt``) sits ``model.preprocessing.json``: the eval pipeline (``A.to_dict``, replay it
with ``A.from_dict``), input size, mean, std and class names. ONNX files also carry it in their
``metadata_props`` (key ``transferkit.preprocessing``), TorchScript files as the extra file
``preprocessing.json``.

>>> import os, tempfile, torch
>>> from transferkit import TransferClassifier
>>> from transferkit.models.checkpoint import checkpoint_section
>>> model = TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False)
>>> path = os.path.join(tempfile.mkdtemp(), "best.ckpt")
>>> torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
...             "transferkit": checkpoint_section(model)}, path)
>>> result = export_checkpoint(path, "torchscript")
>>> result.path.name, result.preprocessing.name, result.max_abs_diff < 1e-4
('best.torchscript.pt', 'best.preprocessing.json', True)
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from transferkit.errors import ConfigError, MissingDependencyError
from transferkit.inference.folding import count_batchnorm, fold_batchnorm
from transferkit.models.checkpoint import build_model, preprocessing_of, read_checkpoint
from transferkit.models.classifier import TransferClassifier

__all__ = ["EXPORT_FORMATS", "ExportResult", "export_checkpoint", "preprocessing_path"]

ExportFormat = Literal["onnx", "torchscript"]
_SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
EXPORT_FORMATS = tuple(sorted(_SUFFIXES))
METADATA_KEY = "transferkit.preprocessing"


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and how closely it reproduces the checkpoint."""

    path: Path
    preprocessing: Path
    format: str
    folded_batchnorms: int
    max_abs_diff: float | None  # exported vs unfolded checkpoint model, logits, on the check batch
    size_bytes: int


class _Logits(nn.Module):
    """Images ``(B, 3, S, S)`` -> logits ``(B, C)``: the backbone and head without the Lightning wrapper."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class _LogitsAndProbabilities(nn.Module):
    """Images -> (logits, probabilities): the probabilities are ``softmax(logits / temperature)``, the
    checkpoint's calibration (1 when it was never calibrated)."""

    def __init__(self, logits: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.logits = logits
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(images)
        return logits, (logits / self.temperature).softmax(dim=-1)


def preprocessing_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.preprocessing.json`` (``x.torchscript.pt`` -> ``x.preprocessing.json``)."""
    path = Path(model_path)
    stem = path.name.removesuffix(".torchscript.pt").removesuffix(path.suffix)
    return path.with_name(f"{stem}.preprocessing.json")


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    format: ExportFormat = "onnx",
    out: str | os.PathLike | None = None,
    example: torch.Tensor | None = None,
    check: bool = True,
) -> ExportResult:
    """Export the model in ``ckpt_path`` with its BatchNorm folded, in eval mode.

    Args:
        ckpt_path: a transferkit checkpoint (read with ``weights_only=True``; no recipe needed).
        format: ``onnx`` (``torch.onnx.export``, dynamic batch) or ``torchscript`` (``torch.jit.trace``).
        out: the file to write; default: next to the checkpoint, ``<name>.onnx`` / ``<name>.torchscript.pt``.
        example: a batch ``(B, 3, S, S)`` through the eval pipeline, used to trace and to check the fold;
            default: 2 random normalised images.
        check: run the exported file on ``example`` and compare with the unfolded checkpoint model
            (ONNX: needs ``onnxruntime``); the largest logit difference is ``max_abs_diff``.

    Returns:
        An :class:`ExportResult`.
    """
    if format not in _SUFFIXES:
        raise ConfigError(f"unknown export format '{format}'; choose 'onnx' or 'torchscript'.")
    checkpoint = read_checkpoint(ckpt_path)
    model = build_model(TransferClassifier, checkpoint, ckpt_path)
    preprocessing = preprocessing_of(checkpoint)
    preprocessing["source_checkpoint"] = Path(ckpt_path).name
    calibration = model.calibration
    preprocessing["outputs"] = {
        "logits": "(B, C) float32, as trained",
        "probabilities": f"(B, C) float32, softmax(logits / {calibration.temperature:.6g})",
    }
    preprocessing["calibration"] = calibration.to_dict()
    preprocessing["decision"] = (
        f"class 1 when probabilities[:, 1] >= {calibration.threshold}"
        if calibration.threshold is not None
        else "the most probable class"
    )
    size = int(preprocessing["input_size"][-1])
    if example is None:
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out_path = Path(out) if out is not None else _default_out(Path(ckpt_path), format)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    unfolded = _Logits(model.backbone, model.head).eval()
    with torch.no_grad():
        expected = unfolded(example)
    folded = fold_batchnorm(unfolded, example)
    exported = _LogitsAndProbabilities(folded, calibration.temperature).eval()
    folded_count = count_batchnorm(unfolded) - count_batchnorm(folded)
    text = json.dumps(preprocessing, indent=2)

    if format == "onnx":
        _export_onnx(exported, example, out_path, text)
    else:
        _export_torchscript(exported, example, out_path, text)
    json_path = preprocessing_path(out_path)
    json_path.write_text(text + "\n")

    difference = None
    if check:
        logits = _run_exported(out_path, format, example)
        if logits is not None:
            difference = float((torch.as_tensor(logits) - expected).abs().max())
    return ExportResult(
        path=out_path,
        preprocessing=json_path,
        format=format,
        folded_batchnorms=folded_count,
        max_abs_diff=difference,
        size_bytes=out_path.stat().st_size,
    )


def _default_out(ckpt_path: Path, format: str) -> Path:
    stem = ckpt_path.name.removesuffix(ckpt_path.suffix)
    return ckpt_path.with_name(stem + _SUFFIXES[format])


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, preprocessing: str) -> None:
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise MissingDependencyError(
            f"ONNX export needs {' and '.join(missing)}, which are not installed; "
            "pip install 'transferkit[export]' (onnx, onnxscript, onnxruntime), or export with --format torchscript."
        )
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on decompositions are not for users
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits", "probabilities"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(
        proto,
        {METADATA_KEY: preprocessing, "class_names": json.dumps(json.loads(preprocessing)["class_names"])},
    )
    onnx.save(proto, str(path))


def _export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, preprocessing: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes and torch.jit's deprecation notice
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"preprocessing.json": preprocessing})


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _run_exported(path: Path, format: str, example: torch.Tensor) -> Any:
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return loaded(example)[0]
    if not _importable("onnxruntime"):
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": example.numpy()})[0]
