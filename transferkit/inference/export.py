"""Export a checkpoint for serving: ONNX or TorchScript, BatchNorm folded, with its preprocessing beside it.

The exported graph maps images ``(B, 3, S, S)`` float32 (already through the eval pipeline) to two outputs:
the head's raw outputs, and what ``predict-images`` gives for one view (the task's scores, so a user needs
nothing but the JSON's thresholds besides the graph); the batch size is free.

==================  =======================================  ==============================================
kind                outputs                                  the prediction from them
==================  =======================================  ==============================================
``single_label``    ``logits`` (B, C), ``probabilities``     the most probable class (or class 1 when
                    (B, C): ``softmax(logits / T)``          ``probabilities[:, 1] >= calibration.threshold``)
``multi_label``     ``logits`` (B, L), ``probabilities``     label ``i`` when ``probabilities[:, i] >=
                    (B, L): ``sigmoid(logits)``              target.thresholds[i]``
``regression``      ``standardised`` (B, T), ``values``      the values, in the targets' own units
                    (B, T): ``standardised * std + mean``
==================  =======================================  ==============================================

Next to ``model.onnx`` (or ``model.torchscript.pt``) sits ``model.preprocessing.json``: the eval pipeline
(``A.to_dict``, replay it with ``A.from_dict``), input size, mean, std, class names, the ``target`` (its kind,
names, a multi-label model's thresholds and which were fitted, a regression model's target mean and std),
``output_names``, ``outputs`` (what each means) and ``decision``; a model with class groups also
``class_groups`` (``{group: [class names]}``) and ``group_decision``, so that an exported 4-class ELPV model
still gives the binary verdict (:class:`~transferkit.inference.exported.ExportedModel` applies both). ONNX files also carry it in their
``metadata_props`` (key ``transferkit.preprocessing``), TorchScript files as the extra file
``preprocessing.json``. The graph computes one view: a model whose ``test_time_augmentation`` is not
``none`` averages the second output over those views in ``predict-images``.

>>> import os, tempfile
>>> from transferkit import TransferClassifier
>>> from transferkit.models.checkpoint import save_checkpoint
>>> model = TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False)
>>> path = save_checkpoint(model, os.path.join(tempfile.mkdtemp(), "best.ckpt"))
>>> result = export_checkpoint(path, "torchscript")
>>> result.path.name, result.preprocessing.name, result.max_abs_diff < 1e-4
('best.torchscript.pt', 'best.preprocessing.json', True)
"""

from __future__ import annotations

import copy
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
    max_abs_diff: float | None  # exported vs unfolded checkpoint model, raw outputs, on the check batch
    size_bytes: int
    # exported vs the checkpoint model's predict_proba (one view): probabilities or values
    scores_max_abs_diff: float | None = None
    output_names: tuple[str, str] = ("logits", "probabilities")


class _Logits(nn.Module):
    """Images ``(B, 3, S, S)`` -> logits ``(B, C)``: the backbone and head without the Lightning wrapper."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class _OutputsAndScores(nn.Module):
    """Images -> (raw outputs, scores): the scores are the task's for one view (``softmax(logits /
    temperature)`` with the checkpoint's temperature, 1 when never calibrated; each label's sigmoid; the
    values un-standardised), what ``predict_proba`` gives."""

    def __init__(self, logits: nn.Module, task: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.logits = logits
        self.task = task
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.logits(images)
        return outputs, self.task.scores(outputs[None], self.temperature)


def _single_label(model: TransferClassifier) -> dict[str, Any]:
    calibration = model.calibration
    return {
        "outputs": {
            "logits": "(B, C) float32, as trained",
            "probabilities": f"(B, C) float32, softmax(logits / {calibration.temperature:.6g})",
        },
        "calibration": calibration.to_dict(),
        "decision": (
            f"class 1 when probabilities[:, 1] >= {calibration.threshold}"
            if calibration.threshold is not None
            else "the most probable class"
        ),
    }


def _multi_label(model: TransferClassifier) -> dict[str, Any]:
    calibration = model.calibration
    fitted = calibration.label_thresholds is not None
    labels = range(model.task.outputs)
    return {
        "target": {
            "thresholds": model.task.thresholds(calibration),
            "thresholds_fitted": [fitted and calibration.label_kept(i) for i in labels],
            "thresholds_fitted_on": calibration.fitted_on if fitted else None,
            "validation_positives": calibration.label_positives if fitted else None,
            "thresholds_note": (
                "each label's threshold maximised its F1 on the validation split; a label with too few "
                "validation positives or negatives (thresholds_fitted false) keeps 0.5"
            ),
        },
        "outputs": {
            "logits": "(B, L) float32, one per label, as trained",
            "probabilities": (
                "(B, L) float32, sigmoid(logits): each label's probability, independent of the others"
            ),
        },
        "calibration": calibration.to_dict(),
        "decision": "label i is present when probabilities[:, i] >= target.thresholds[i] (none may be)",
    }


def _regression(model: TransferClassifier) -> dict[str, Any]:
    return {
        "target": {
            "scaling_note": (
                "the head predicts (value - mean) / std with the training split's mean and std; the graph's "
                "'values' output has it undone already"
            ),
        },
        "outputs": {
            "standardised": "(B, T) float32, as trained: (value - target.mean) / target.std",
            "values": "(B, T) float32, standardised * target.std + target.mean: each target in its own units",
        },
        "decision": "the values themselves",
    }


# what the exported graph's two outputs are called, and what preprocessing.json says about them, per kind
_EXPORTS: dict[str, tuple[tuple[str, str], Any]] = {
    "single_label": (("logits", "probabilities"), _single_label),
    "multi_label": (("logits", "probabilities"), _multi_label),
    "regression": (("standardised", "values"), _regression),
}


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
            (ONNX: needs ``onnxruntime``): the largest difference of the raw outputs is ``max_abs_diff``, of
            the scores (probabilities or values) against its ``predict_proba`` ``scores_max_abs_diff``.

    Returns:
        An :class:`ExportResult`.
    """
    if format not in _SUFFIXES:
        raise ConfigError(f"unknown export format '{format}'; choose 'onnx' or 'torchscript'.")
    checkpoint = read_checkpoint(ckpt_path)
    model = build_model(TransferClassifier, checkpoint, ckpt_path)
    kind = model.task.kind
    if kind not in _EXPORTS:
        raise ConfigError(
            f"export does not know the outputs of a {kind!r} model; it exports {', '.join(_EXPORTS)} models."
        )
    output_names, describe = _EXPORTS[kind]
    described = describe(model)
    preprocessing = preprocessing_of(checkpoint)
    preprocessing["source_checkpoint"] = Path(ckpt_path).name
    # the model's own task: a regression model's scaling is read from the weights it un-standardises with
    preprocessing["target"] = {**model.task.describe(), **described.pop("target", {})}
    preprocessing["output_names"] = list(output_names)
    preprocessing.update(described)
    preprocessing["test_time_augmentation"] = model.settings.prediction.tta
    if model.class_groups:
        names = list(model.class_names)
        preprocessing["class_groups"] = {g: [names[i] for i in idx] for g, idx in model.class_groups.items()}
        preprocessing["group_decision"] = (
            "a group's probability is the sum of its classes' probabilities; the predicted group is the "
            "most probable one"
        )
    size = int(preprocessing["input_size"][-1])
    if example is None:
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out_path = Path(out) if out is not None else _default_out(Path(ckpt_path), format)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    unfolded = _Logits(model.backbone, model.head).eval()
    with torch.no_grad():
        expected = unfolded(example)
        expected_scores = model.predict_proba(example, tta="none")
    folded = fold_batchnorm(unfolded, example)
    exported = _OutputsAndScores(folded, copy.deepcopy(model.task), model.calibration.temperature).eval()
    folded_count = count_batchnorm(unfolded) - count_batchnorm(folded)
    text = json.dumps(preprocessing, indent=2)

    if format == "onnx":
        _export_onnx(exported, example, out_path, text, output_names)
    else:
        _export_torchscript(exported, example, out_path, text)
    json_path = preprocessing_path(out_path)
    json_path.write_text(text + "\n")

    difference = scores_difference = None
    if check:
        results = _run_exported(out_path, format, example)
        if results is not None:
            outputs, scores = (torch.as_tensor(r) for r in results)
            difference = float((outputs - expected).abs().max())
            scores_difference = float((scores - expected_scores).abs().max())
    return ExportResult(
        path=out_path,
        preprocessing=json_path,
        format=format,
        folded_batchnorms=folded_count,
        max_abs_diff=difference,
        size_bytes=out_path.stat().st_size,
        scores_max_abs_diff=scores_difference,
        output_names=output_names,
    )


def _default_out(ckpt_path: Path, format: str) -> Path:
    stem = ckpt_path.name.removesuffix(ckpt_path.suffix)
    return ckpt_path.with_name(stem + _SUFFIXES[format])


def _export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, preprocessing: str, output_names: tuple[str, str]
) -> None:
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
            output_names=list(output_names),
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
    """Both outputs of the exported file on ``example`` (``None`` for ONNX without onnxruntime)."""
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return loaded(example)
    if not _importable("onnxruntime"):
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": example.numpy()})
