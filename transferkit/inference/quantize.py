"""INT8 for the CPU: static quantisation of an exported ONNX model with ONNX Runtime's tools.

:func:`quantize_onnx` takes the fp32 graph :func:`~transferkit.inference.export.export_checkpoint` wrote
(BatchNorm already folded into the convolutions), runs ONNX Runtime's pre-processing (shape inference, graph
optimisation) and ``quantize_static`` in the QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs
around each quantised op, which ONNX Runtime fuses into integer kernels): weights int8 per output channel,
activations int8 with ranges calibrated on images the caller gives (training or validation images through
the eval pipeline, never the test split). It copies the preprocessing (pipeline, classes, groups, decision)
into the new file with a ``quantization`` block saying how it was made, and lists which ops run in int8.

Settings (:class:`QuantizeSettings`, validated at construction):

- ``reduce_range``: 7-bit weights, for x86 CPUs without VNNI (AVX2 only, most before 2019): they multiply
  u8 x s8 with ``vpmaddubsw``, which can saturate on 8-bit weights; 7 bits cannot. ONNX Runtime documents it
  as the remedy; on a CPU with VNNI (AVX512-VNNI, AVX-VNNI, AMX) it only costs accuracy (docs/benchmarks.md).
  :func:`vnni` tells whether this machine has it.
- ``activations``: ``uint8`` (U8S8 with int8 weights) or ``int8`` (S8S8, ONNX Runtime's default for QDQ).
- ``weights``: ``int8``, or ``uint8`` (U8U8: never saturates, but ONNX Runtime runs it on slow kernels).
- ``calibration``: ``minmax`` (the observed range), ``percentile`` (99.999th, clipping rare outliers) or
  ``entropy``.
- ``keep_fp32``: modules kept in float: ``stem`` (the first convolution, which sees raw pixels), ``head``
  (the new classifier head, small and trained last), or a module path prefix such as
  ``backbone.model.blocks.6``. What follows the head (the softmax or sigmoid, the temperature, a regression
  model's un-standardising) always stays in float, so the probabilities sum to one and a fitted threshold
  decides as in fp32.

>>> QuantizeSettings(calibration="median")
Traceback (most recent call last):
...
transferkit.errors.ConfigError: unknown calibration 'median'; choose minmax, percentile or entropy.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import ConfigError, MissingDependencyError
from transferkit.inference.export import METADATA_KEY, preprocessing_path

__all__ = ["QuantizeResult", "QuantizeSettings", "int8_path", "quantize_onnx", "quantized_ops", "vnni"]

_CALIBRATIONS = ("minmax", "percentile", "entropy")
_ACTIVATIONS = ("int8", "uint8")
# what keep_fp32's short names mean: module path prefixes inside the exported graph
_NAMED_MODULES = {"stem": "backbone.model.conv_stem", "head": "head"}
# ops that carry no arithmetic of their own: a Q/DQ pair around them is not "running in int8"
_MOVERS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Identity", "Gather", "Slice"}


@dataclass(frozen=True)
class QuantizeSettings:
    """How :func:`quantize_onnx` quantises (see the module's list)."""

    reduce_range: bool = False
    activations: str = "uint8"
    weights: str = "int8"
    calibration: str = "percentile"
    per_channel: bool = True
    keep_fp32: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.calibration not in _CALIBRATIONS:
            raise ConfigError(
                f"unknown calibration '{self.calibration}'; choose {', '.join(_CALIBRATIONS[:-1])} or "
                f"{_CALIBRATIONS[-1]}."
            )
        if self.activations not in _ACTIVATIONS:
            raise ConfigError(f"activations are 'int8' or 'uint8', got '{self.activations}'.")
        if self.weights not in _ACTIVATIONS:
            raise ConfigError(f"weights are 'int8' or 'uint8', got '{self.weights}'.")
        object.__setattr__(self, "keep_fp32", tuple(str(k) for k in self.keep_fp32))
        if any(not k.strip() for k in self.keep_fp32):
            raise ConfigError(
                "keep_fp32 names modules (stem, head or a module path); an empty name is not one."
            )

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "keep_fp32": list(self.keep_fp32), "format": "QDQ"}


@dataclass
class QuantizeResult:
    """What :func:`quantize_onnx` wrote."""

    path: Path
    preprocessing: Path
    settings: QuantizeSettings
    calibration_images: int
    quantized_ops: dict[str, int]  # op type -> how many run between Q/DQ pairs (in int8)
    float_ops: dict[str, int]  # op type -> how many stay in float (arithmetic ops only)
    size_bytes: int
    fp32_size_bytes: int
    kept_fp32_nodes: list[str]


def vnni() -> bool | None:
    """Whether this CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX), where 8-bit weights cannot saturate; ``None``
    where ``/proc/cpuinfo`` cannot tell (not Linux, not x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None
    )
    if flags is None:
        return None
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def int8_path(fp32_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    path = Path(fp32_path)
    return path.with_name(path.name.removesuffix(".onnx") + ".int8.onnx")


def _module_of(node: Any) -> str:
    """The module path a node of the exported graph came from (``head.fc``, ``backbone.model.conv_stem``),
    read from the exporter's ``namespace`` metadata; ``""`` when it has none."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    paths = [part.split(":")[0].strip() for part in namespace.split("/")]
    dotted = [p for p in paths if p.startswith("logits.")]
    return dotted[-1].removeprefix("logits.") if dotted else ""


def _nodes_to_keep(model: Any, keep: Iterable[str]) -> list[str]:
    prefixes = [_NAMED_MODULES.get(k, k) for k in keep]
    if not prefixes:
        return []
    kept = [
        n.name
        for n in model.graph.node
        if any(_module_of(n) == p or _module_of(n).startswith(p + ".") for p in prefixes)
        and n.op_type not in ("QuantizeLinear", "DequantizeLinear")
    ]
    found = {p for p in prefixes if any(_module_of(n).startswith(p) for n in model.graph.node)}
    missing = [k for k, p in zip(keep, prefixes, strict=True) if p not in found]
    if missing:
        modules = sorted({_module_of(n).rsplit(".", 1)[0] for n in model.graph.node if _module_of(n)})[:12]
        raise ConfigError(
            f"keep_fp32 names {', '.join(repr(m) for m in missing)}, which no node of the graph comes from; "
            f"use stem, head or a module path such as {', '.join(modules)}."
        )
    return kept


def quantized_ops(model: Any) -> tuple[dict[str, int], dict[str, int]]:
    """``(int8 ops, float ops)`` of a QDQ graph, counted by op type: an op runs in int8 when every input
    that carries data (not a constant) comes out of a ``DequantizeLinear`` and it feeds a ``QuantizeLinear``
    or is a quantised ``Gemm``/``Conv`` (whose output ONNX Runtime may keep in int32 then float)."""
    produced_by = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    initializers = {i.name for i in model.graph.initializer}
    int8: collections.Counter[str] = collections.Counter()
    fp32: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") or node.op_type in _MOVERS:
            continue
        data = [i for i in node.input if i and i not in initializers and produced_by.get(i) is not None]
        data = [i for i in data if produced_by[i].op_type != "Constant"]
        from_dq = bool(data) and all(produced_by[i].op_type == "DequantizeLinear" for i in data)
        (int8 if from_dq else fp32)[node.op_type] += 1
    return dict(int8), dict(fp32)


class _Reader:
    """ONNX Runtime's CalibrationDataReader over batches of images ``(B, 3, S, S)`` float32."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches: Iterator[np.ndarray] = iter(batches)
        self.images = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        batch = np.ascontiguousarray(batch, np.float32)
        self.images += len(batch)
        return {"images": batch}


def quantize_onnx(
    fp32_path: str | os.PathLike,
    calibration_batches: Iterable[np.ndarray],
    out: str | os.PathLike | None = None,
    settings: QuantizeSettings = QuantizeSettings(),
) -> QuantizeResult:
    """Quantise the exported ``fp32_path`` to int8 (QDQ, per-channel weights), calibrated on
    ``calibration_batches`` (float32 ``(B, 3, S, S)`` through the eval pipeline: training or validation
    images, never test). Writes ``out`` (default ``<name>.int8.onnx``) and its ``.preprocessing.json``:
    the fp32 model's, plus ``quantization``.

    Raises:
        MissingDependencyError: without ``onnx`` and ``onnxruntime``.
        ConfigError: no calibration image, a ``keep_fp32`` that names no module of the graph.
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise MissingDependencyError(
            "INT8 quantisation needs onnx and onnxruntime: pip install 'transferkit[export]'."
        ) from err
    fp32_path = Path(fp32_path)
    out_path = Path(out) if out is not None else int8_path(fp32_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    source = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in source.metadata_props}
    if METADATA_KEY not in props:
        raise ConfigError(
            f"'{fp32_path}' was not exported by transferkit (no preprocessing in its metadata)."
        )
    keep = _nodes_to_keep(source, settings.keep_fp32)
    # what follows the head (softmax or sigmoid, the temperature, a regression's un-standardising) stays in
    # float: 8-bit probabilities would move a calibrated threshold's decisions and no longer sum to one
    keep += [n.name for n in source.graph.node if not _module_of(n) and n.name not in keep]
    batches = iter(calibration_batches)
    first = next(batches, None)
    if first is None or len(first) == 0:
        raise ConfigError("quantisation needs calibration images (training or validation images); none came.")
    reader = _Reader(itertools.chain([first], batches))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # pre-processing may rename nodes it merged: keep the ones still there
        names = {n.name for n in onnx.load(str(prepared)).graph.node}
        with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints its progress
            quantize_static(
                str(prepared),
                str(out_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                activation_type=QuantType.QInt8 if settings.activations == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8 if settings.weights == "int8" else QuantType.QUInt8,
                nodes_to_exclude=[n for n in keep if n in names],
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy,
                }[settings.calibration],
                extra_options={"CalibMovingAverage": False},
            )
    preprocessing = json.loads(props[METADATA_KEY])
    preprocessing["quantization"] = {
        **settings.describe(),
        "calibration_images": reader.images,
        "fp32_model": fp32_path.name,
        "tool": "onnxruntime.quantization.quantize_static",
    }
    quantized = onnx.load(str(out_path))
    int8, floats = quantized_ops(quantized)
    preprocessing["quantization"]["int8_ops"] = int8
    text = json.dumps(preprocessing, indent=2)
    onnx.helper.set_model_props(quantized, {**props, METADATA_KEY: text})
    onnx.save(quantized, str(out_path))
    json_path = preprocessing_path(out_path)
    json_path.write_text(text + "\n")
    return QuantizeResult(
        path=out_path,
        preprocessing=json_path,
        settings=settings,
        calibration_images=reader.images,
        quantized_ops=int8,
        float_ops=floats,
        size_bytes=out_path.stat().st_size,
        fp32_size_bytes=fp32_path.stat().st_size,
        kept_fp32_nodes=keep,
    )
