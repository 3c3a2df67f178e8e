"""predict-images, export and loading for multi-label and regression models: the CSV says what each column
means, the numbers are the model's (labels over their stored thresholds, values in the targets' units), and an
exported model reproduces predict-images with nothing but its preprocessing.json."""

from __future__ import annotations

import csv
import json
import types
import warnings
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, quiet_trainer, run_cli

import transferkit as tk
from transferkit.data.images import load_image
from transferkit.inference.export import preprocessing_path
from transferkit.models.checkpoint import save_checkpoint


def _train(root: Path, csv_path: Path, target: dict) -> types.SimpleNamespace:
    """A tiny model finetuned on the squares (8 epochs): its best checkpoint and the images it can predict."""
    L.seed_everything(0)
    data = tk.ImageDataModule(
        source="csv",
        csv_path=str(csv_path),
        target=target,
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0, "batch_size": 16},
    )
    model = tk.TransferClassifier(
        num_classes=data.num_classes,
        class_names=data.class_names,
        target=data.target_kind,
        backbone=TINY_BACKBONE,
        pretrained=False,
        head={"hidden_dims": (64,), "dropout": 0.2},
        optimizer={"lr": 3e-3, "layer_decay": 1.0},
    )
    results = quiet_trainer(root, max_epochs=8).finetune(model, datamodule=data)
    with csv_path.open(newline="") as handle:
        truth = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    return types.SimpleNamespace(
        best=Path(results["best_checkpoint"]), images=csv_path.parent / "images", truth=truth, root=root
    )


@pytest.fixture(scope="module")
def multi_label(squares_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    return _train(tmp_path_factory.mktemp("multi_label"), squares_csv, {"kind": "multi_label"})


@pytest.fixture(scope="module")
def regression(squares_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    return _train(
        tmp_path_factory.mktemp("regression"), squares_csv, {"kind": "regression", "columns": ["level"]}
    )


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _predict(
    run: types.SimpleNamespace, out: Path, *flags: str
) -> tuple[list[str], list[dict[str, str]], str]:
    done = run_cli(
        "predict-images", "--ckpt_path", str(run.best), "--images", str(run.images), "--out", str(out), *flags
    )
    assert done.returncode == 0, done.stderr
    return (*_read_csv(out), done.stderr)


def _predicted_once(run: types.SimpleNamespace) -> list[dict[str, str]]:
    """The rows of predict-images on every image of ``run``, with the checkpoint's own settings (once per run)."""
    if not hasattr(run, "rows"):
        _, run.rows, _ = _predict(run, run.root / "predictions.csv")
    return run.rows


def _batch(transform: A.Compose, files: list[str]) -> torch.Tensor:
    return torch.stack([transform(image=load_image(f))["image"] for f in files])


# --- predict-images -------------------------------------------------------------------------------


@pytest.mark.slow
def test_multi_label_csv_names_the_labels_over_their_thresholds_and_finds_the_red_squares(
    multi_label, tmp_path
):
    header, rows, stderr = _predict(multi_label, tmp_path / "labels.csv")
    assert header == ["file", "predicted_labels", "prob_blue", "prob_red", "error"]
    assert len(rows) == 200 and not any(r["error"] for r in rows)
    assert "predicted_labels: the labels whose probability reaches their threshold" in stderr

    # the planted signal: an image with a red square is predicted 'red', one without is not
    has_red = [multi_label.truth[Path(r["file"]).name]["red"] == "1" for r in rows]
    says_red = ["red" in r["predicted_labels"].split(";") for r in rows]
    with_red = [s for s, h in zip(says_red, has_red, strict=True) if h]
    without_red = [s for s, h in zip(says_red, has_red, strict=True) if not h]
    assert np.mean(with_red) > 0.8 and np.mean(without_red) < 0.2
    assert any(r["predicted_labels"] == "" for r in rows)  # no square: no label, an empty cell

    # each row's labels are exactly those whose probability reaches the checkpoint's own threshold
    model, _ = tk.load_for_inference(multi_label.best)
    thresholds = dict(zip(model.class_names, model.calibration.label_thresholds, strict=True))
    assert model.calibration.label_fitted == [True, True]  # 24 validation images, 12 of each label
    for row in rows:
        probs = {name: float(row[f"prob_{name}"]) for name in thresholds}
        if any(abs(p - thresholds[n]) < 1e-5 for n, p in probs.items()):
            continue  # the CSV's six decimals cannot say which side of the threshold it fell
        expected = [n for n in model.class_names if probs[n] >= thresholds[n]]
        assert row["predicted_labels"] == ";".join(expected)

    # TTA and MC dropout: an uncertainty per image, the spread of label probabilities (a std, <= 0.5)
    header, rows, stderr = _predict(multi_label, tmp_path / "mc.csv", "--tta", "hflip", "--mc-dropout", "4")
    assert header == ["file", "predicted_labels", "prob_blue", "prob_red", "uncertainty", "error"]
    spreads = [float(r["uncertainty"]) for r in rows]
    assert all(0.0 <= s <= 0.5 for s in spreads) and max(spreads) > 0
    assert "uncertainty: the spread (std) of each label's probability" in stderr


@pytest.mark.slow
def test_regression_csv_gives_values_in_the_targets_units_that_track_the_level(regression, tmp_path):
    header, rows, stderr = _predict(regression, tmp_path / "values.csv")
    assert header == ["file", "predicted_level", "error"]  # no predicted class, no probabilities
    assert "predicted_<target>: each target's predicted value, in the target's own units" in stderr
    predicted = np.array([float(r["predicted_level"]) for r in rows])
    level = np.array([float(regression.truth[Path(r["file"]).name]["level"]) for r in rows])
    assert np.corrcoef(predicted, level)[0, 1] > 0.8
    # un-standardised: the predictions sit where the levels do (standardised ones would centre on 0)
    assert abs(predicted.mean() - level.mean()) < 0.1 and np.abs(predicted - level).mean() < 0.2

    # TTA: the values averaged over the views; MC dropout: their spread, in the level's units
    model, transform = tk.load_for_inference(regression.best)
    header, rows, stderr = _predict(regression, tmp_path / "mc.csv", "--tta", "hflip", "--mc-dropout", "4")
    assert header == ["file", "predicted_level", "uncertainty", "error"]
    spreads = np.array([float(r["uncertainty"]) for r in rows])
    assert (spreads >= 0).all() and 0 < spreads.mean() < 0.2
    header, rows, _ = _predict(regression, tmp_path / "tta.csv", "--tta", "hflip")
    files = [r["file"] for r in rows[:8]]
    with torch.no_grad():
        expected = model.predict_proba(_batch(transform, files), tta="hflip")[:, 0].numpy()
    np.testing.assert_allclose([float(r["predicted_level"]) for r in rows[:8]], expected, atol=1e-5)


# --- export ---------------------------------------------------------------------------------------


def _run_exported(path: Path, format: str, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if format == "onnx":
        onnxruntime = pytest.importorskip("onnxruntime")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        first, second = session.run(None, {"images": batch.numpy()})
        return first, second
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        scripted = torch.jit.load(str(path))
    with torch.no_grad():
        first, second = scripted(batch)
    return first.numpy(), second.numpy()


def _export(run: types.SimpleNamespace, format: str, out: Path) -> dict:
    if format == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    done = run_cli("export", "--ckpt_path", str(run.best), "--format", format, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "BatchNorm layers folded" in done.stdout and "decision:" in done.stdout
    return json.loads(preprocessing_path(out).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_exported_multi_label_model_reproduces_predict_images_with_the_json_thresholds(
    multi_label, tmp_path, format
):
    rows = _predicted_once(multi_label)
    suffix = ".onnx" if format == "onnx" else ".torchscript.pt"
    preprocessing = _export(multi_label, format, tmp_path / f"model{suffix}")
    target = preprocessing["target"]
    assert target["kind"] == "multi_label" and target["names"] == ["blue", "red"]
    assert target["thresholds_fitted"] == [True, True] and preprocessing["output_names"] == [
        "logits",
        "probabilities",
    ]
    assert target["thresholds"] == tk.load_for_inference(multi_label.best)[0].calibration.label_thresholds

    # the same files, prepared by the json's own pipeline, through the exported graph alone
    files = [r["file"] for r in rows]
    logits, probabilities = _run_exported(
        tmp_path / f"model{suffix}", format, _batch(A.from_dict(preprocessing["eval_transform"]), files)
    )
    from_csv = np.array([[float(r[f"prob_{n}"]) for n in target["names"]] for r in rows])
    np.testing.assert_allclose(probabilities, from_csv, atol=1e-4)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), atol=1e-6)  # sigmoid per label
    thresholds = np.array(target["thresholds"])
    clear = (np.abs(probabilities - thresholds) > 1e-4).all(axis=1)  # off the thresholds by more than atol
    assert clear.mean() > 0.9
    labels = [
        ";".join(n for n, on in zip(target["names"], row, strict=True) if on)
        for row in probabilities >= thresholds
    ]
    assert [la for la, c in zip(labels, clear, strict=True) if c] == [
        r["predicted_labels"] for r, c in zip(rows, clear, strict=True) if c
    ]


@pytest.mark.slow
@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_exported_regression_model_gives_predict_images_values_in_the_targets_units(
    regression, tmp_path, format
):
    rows = _predicted_once(regression)
    suffix = ".onnx" if format == "onnx" else ".torchscript.pt"
    preprocessing = _export(regression, format, tmp_path / f"model{suffix}")
    target = preprocessing["target"]
    assert target["kind"] == "regression" and target["names"] == ["level"]
    assert target["standardised_on"] == "train" and preprocessing["output_names"] == [
        "standardised",
        "values",
    ]
    files = [r["file"] for r in rows]
    standardised, values = _run_exported(
        tmp_path / f"model{suffix}", format, _batch(A.from_dict(preprocessing["eval_transform"]), files)
    )
    np.testing.assert_allclose(values[:, 0], [float(r["predicted_level"]) for r in rows], atol=1e-4)
    # the json's scaling is the one the graph undid
    np.testing.assert_allclose(
        values, standardised * np.array(target["std"]) + np.array(target["mean"]), atol=1e-5
    )
    levels = np.array([float(regression.truth[Path(f).name]["level"]) for f in files])
    assert abs(float(np.mean(levels)) - target["mean"][0]) < 0.1  # the training split's own mean


# --- quick checks on models built by hand ---------------------------------------------------------


def _checkpoint(tmp_path: Path, target: str, names: list[str], dropout: float = 0.2) -> tuple[Path, object]:
    """A checkpoint of an untrained model of kind ``target``, its BatchNorm statistics made non-trivial (as
    training would leave them) and, for regression, targets of mean 50 and spread 10 per name."""
    torch.manual_seed(0)
    model = tk.TransferClassifier(
        num_classes=len(names),
        class_names=names,
        target=target,
        backbone=TINY_BACKBONE,
        pretrained=False,
        head={"hidden_dims": (16,), "dropout": dropout},
    )
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    if target == "regression":
        model.task.prepare(np.random.default_rng(0).normal(50.0, 10.0, (400, len(names))))
    path = tmp_path / f"{target}.ckpt"
    save_checkpoint(model, path)
    return path, model.eval()


@pytest.mark.parametrize("target", ["multi_label", "regression"])
def test_export_folds_batchnorm_and_the_graph_gives_what_the_model_predicts(tmp_path, target):
    path, model = _checkpoint(tmp_path, target, ["a", "b"])
    loaded, transform = tk.load_for_inference(path)
    assert loaded.task.kind == target and loaded.class_names == ["a", "b"]
    result = tk.export_checkpoint(path, "torchscript")
    assert result.folded_batchnorms > 0 and result.max_abs_diff < 1e-4 and result.scores_max_abs_diff < 1e-3
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, scores = _run_exported(result.path, "torchscript", x)
    with torch.no_grad():
        expected = loaded.predict_proba(x, tta="none").numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-3, rtol=1e-5)
    preprocessing = json.loads(result.preprocessing.read_text())
    if target == "regression":  # values around 50, not the standardised outputs around 0
        assert 20 < scores.mean() < 80 and preprocessing["target"]["mean"] == pytest.approx([50, 50], abs=2)
    else:
        assert preprocessing["target"]["thresholds"] == [0.5, 0.5]  # never fitted: 0.5, and it says so
        assert preprocessing["target"]["thresholds_fitted"] == [False, False]


def test_mc_dropout_on_a_model_without_dropout_is_one_error_line(tmp_path):
    path, _ = _checkpoint(tmp_path, "regression", ["level"], dropout=0.0)
    image = tmp_path / "images" / "one.png"
    image.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    args = ["predict-images", "--ckpt_path", str(path), "--images", str(image.parent)]
    done = run_cli(*args, "--mc-dropout", "4", "--out", str(tmp_path / "p.csv"))
    assert done.returncode == 2 and done.stderr.startswith("error:") and "model.head.dropout" in done.stderr
    assert not (tmp_path / "p.csv").exists()
    done = run_cli(*args, "--out", str(tmp_path / "p.csv"))
    assert done.returncode == 0
    header, rows = _read_csv(tmp_path / "p.csv")
    assert header == ["file", "predicted_level", "error"] and 0 < float(rows[0]["predicted_level"]) < 100


# --- serve ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_answers_multi_label_and_regression_models_as_predict_images_writes(multi_label, regression):
    import httpx
    from conftest import Server

    from transferkit.serving import Predictor

    for run in (multi_label, regression):
        rows = {Path(r["file"]).name: r for r in _predicted_once(run)}
        files = sorted(run.images.iterdir())[:5]
        predictor = Predictor.load(run.best)
        with Server(predictor) as server:
            upload = [("files", (f.name, f.read_bytes(), "image/png")) for f in files]
            body = httpx.post(f"{server.url}/predict", files=upload, timeout=60).json()
            info = httpx.get(f"{server.url}/info").json()
        assert [a["file"] for a in body["predictions"]] == [f.name for f in files]
        for answer in body["predictions"]:
            row = rows[answer["file"]]
            if predictor.kind == "multi_label":
                assert ";".join(answer["predicted"]) == row["predicted_labels"]
                for name, p in answer["probs"].items():
                    assert p == pytest.approx(float(row[f"prob_{name}"]), abs=1e-5)
            else:
                assert "predicted" not in answer
                for name, value in answer["values"].items():
                    assert value == pytest.approx(float(row[f"predicted_{name}"]), rel=1e-5, abs=1e-6)
        assert info["kind"] == predictor.kind
        assert info["gradcam"] is (predictor.kind != "regression")
