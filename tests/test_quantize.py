"""INT8 export: a QDQ graph with per-channel int8 weights, the quantised ops listed, the preprocessing (class
groups and decision included) carried over, and predictions from the exported files as from the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import SERVE_CLASSES, SERVE_GROUPS, run_cli

from transferkit.errors import ConfigError
from transferkit.inference import load_for_inference, predict_images
from transferkit.inference.exported import load_exported, read_preprocessing
from transferkit.inference.quantize import QuantizeSettings, quantize_onnx, quantized_ops


def _calibration(transform, count: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [
        transform(image=rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))["image"].numpy()
        for _ in range(count)
    ]
    return [np.stack(images[i : i + 8]) for i in range(0, count, 8)]


def test_an_exported_model_with_class_groups_gives_the_checkpoints_verdict(serve_models):
    files = [str(p) for p in sorted(serve_models["images"].iterdir())]
    model, transform = load_for_inference(serve_models["ckpt"])
    exported, exported_transform = load_exported(serve_models["onnx"])
    expected = predict_images(model, transform, files)
    got = predict_images(exported, exported_transform, files)
    assert exported.class_groups == {"functional": [0, 1], "defective": [2, 3]}
    for a, b in zip(got, expected, strict=True):
        assert a["predicted"] == b["predicted"] and a["predicted_group"] == b["predicted_group"]
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
        np.testing.assert_allclose(a["group_probs"], b["group_probs"], atol=1e-5)
    stored = json.loads(serve_models["onnx"].with_name("model.preprocessing.json").read_text())
    assert stored["class_groups"] == SERVE_GROUPS and "most probable" in stored["group_decision"]
    assert read_preprocessing(serve_models["onnx"]) == stored  # the ONNX metadata says the same


def test_int8_is_a_qdq_graph_with_per_channel_weights_and_the_same_preprocessing(serve_models):
    path = serve_models["int8"]
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    conv_weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0]]
    assert conv_weights and all(scales[n.input[1]].size > 1 for n in conv_weights)  # one scale per channel
    int8, floats = quantized_ops(onnx.load(str(path)))
    assert int8["Conv"] > 0 and int8.get("Gemm", 0) == 2
    fp32 = read_preprocessing(serve_models["onnx"])
    quantised = read_preprocessing(path)
    block = quantised.pop("quantization")
    assert quantised == fp32  # the pipeline, classes, groups and decision, unchanged
    assert block["format"] == "QDQ" and block["per_channel"] and block["calibration_images"] == 16
    assert block["int8_ops"] == int8
    assert path.stat().st_size < serve_models["onnx"].stat().st_size


def test_layers_kept_in_fp32_stay_float_and_a_wrong_name_is_refused_with_the_modules(serve_models, tmp_path):
    _, transform = load_exported(serve_models["onnx"])
    result = quantize_onnx(
        serve_models["onnx"],
        _calibration(transform),
        tmp_path / "m.int8.onnx",
        QuantizeSettings(keep_fp32=("head",)),
    )
    assert result.float_ops.get("Gemm") == 2 and "Gemm" not in result.quantized_ops
    assert result.quantized_ops["Conv"] > 0
    model, _ = load_exported(result.path)
    assert model.quantization["keep_fp32"] == ["head"]
    with pytest.raises(ConfigError, match="'neck'.*backbone.model"):
        quantize_onnx(
            serve_models["onnx"],
            _calibration(transform),
            tmp_path / "x.onnx",
            QuantizeSettings(keep_fp32=("neck",)),
        )
    with pytest.raises(ConfigError, match="needs calibration images"):
        quantize_onnx(serve_models["onnx"], [], tmp_path / "y.onnx")
    with pytest.raises(ConfigError, match="unknown calibration 'median'"):
        QuantizeSettings(calibration="median")


def test_int8_predictions_stay_close_to_fp32(serve_models):
    fp32, transform = load_exported(serve_models["onnx"])
    int8, _ = load_exported(serve_models["int8"])
    x = torch.from_numpy(
        np.concatenate(_calibration(transform, 16, seed=1))
    )  # images it was not calibrated on
    a, b = fp32.predict_proba(x), int8.predict_proba(x)
    assert a.shape == b.shape == (16, len(SERVE_CLASSES))
    assert float((a - b).abs().max()) < 0.15  # a quantised copy, not another model
    torch.testing.assert_close(b.sum(dim=1), torch.ones(16), atol=1e-3, rtol=0)


def test_the_export_command_quantises_on_calibration_images_and_checks_against_fp32(serve_models, tmp_path):
    out = tmp_path / "cells.onnx"
    result = run_cli(
        "export",
        "--ckpt_path",
        str(serve_models["ckpt"]),
        "--out",
        str(out),
        "--quantize",
        "int8",
        "--calibration-images",
        str(serve_models["images"]),
        "--calibration-count",
        "8",
        "--keep-fp32",
        "head",
    )
    assert result.returncode == 0, result.stderr
    assert "class groups: functional = 0, 1/3; defective = 2/3, 1" in result.stdout
    assert f"quantised {tmp_path / 'cells.int8.onnx'}" in result.stdout
    assert "calibrated on 6 images of 6 files given with --calibration-images" in result.stdout
    assert "int8 ops:" in result.stdout and "kept in float: head" in result.stdout
    assert (tmp_path / "cells.int8.preprocessing.json").is_file()

    refused = run_cli(
        "export", "--ckpt_path", str(serve_models["ckpt"]), "--format", "torchscript", "--quantize", "int8"
    )
    assert refused.returncode != 0 and "--quantize int8 applies to ONNX" in refused.stderr
    nothing = run_cli(
        "export",
        "--ckpt_path",
        str(serve_models["ckpt"]),
        "--out",
        str(tmp_path / "n.onnx"),
        "--quantize",
        "int8",
    )
    assert nothing.returncode != 0 and "needs calibration images" in nothing.stderr


def test_predict_images_takes_an_exported_model(serve_models, tmp_path):
    out = tmp_path / "p.csv"
    result = run_cli(
        "predict-images",
        "--model",
        str(serve_models["int8"]),
        "--images",
        str(serve_models["images"]),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    header = out.read_text().splitlines()[0].split(",")
    assert (
        header[:2] == ["file", "predicted"]
        and "predicted_group" in header
        and "prob_group_defective" in header
    )
    assert len(out.read_text().splitlines()) == 7
