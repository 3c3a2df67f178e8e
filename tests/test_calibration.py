"""Calibrated probabilities: temperature scaling and a decision threshold, fitted on validation, stored in
the checkpoint and used by test, predict, predict-images and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, quiet_trainer

import transferkit as tk
from transferkit.errors import ConfigError
from transferkit.models.calibration import (
    Calibration,
    choose_threshold,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    negative_log_likelihood,
)


def _overconfident(n: int = 2000, classes: int = 4, scale: float = 5.0, seed: int = 0):
    """Logits whose argmax is right about 70 % of the time but whose softmax says ~99 %."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    noisy = torch.nn.functional.one_hot(labels, classes).float() + 0.8 * torch.randn(n, classes, generator=g)
    return scale * noisy, labels


def test_temperature_lowers_nll_and_ece_and_keeps_every_prediction():
    logits, labels = _overconfident()
    fit_logits, fit_labels, held_logits, held_labels = (
        logits[:1000],
        labels[:1000],
        logits[1000:],
        labels[1000:],
    )
    temperature = fit_temperature(fit_logits, fit_labels)
    assert temperature > 2.0  # over-confident logits are softened
    before = held_logits.softmax(-1).numpy()
    after = (held_logits / temperature).softmax(-1).numpy()
    # on images it was not fitted on: lower NLL, ECE at least halved, the same predicted class everywhere
    assert negative_log_likelihood(held_logits, held_labels, temperature) < negative_log_likelihood(
        held_logits, held_labels
    )
    assert expected_calibration_error(after, held_labels.numpy()) < 0.5 * expected_calibration_error(
        before, held_labels.numpy()
    )
    assert (after.argmax(1) == before.argmax(1)).all()
    # under-confident logits are sharpened
    assert fit_temperature(fit_logits / 20, fit_labels) < 1.0


def test_temperature_is_fitted_on_the_average_of_test_time_views():
    logits, labels = _overconfident(n=600, classes=3)
    views = torch.stack([logits, logits + 0.3 * torch.randn_like(logits)])  # (V, N, C)
    calibration = fit_calibration(views, labels)
    assert calibration.nll_after < calibration.nll_before
    assert calibration.fitted_on == "val (600 images)" and calibration.threshold is None


def test_decision_threshold_maximises_the_chosen_metric():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.2).astype(int)  # a rare positive class
    p = np.clip(0.35 * labels + rng.normal(0.3, 0.12, 400), 0.01, 0.99)
    t_acc, acc = choose_threshold(p, labels, "accuracy")
    t_f1, f1 = choose_threshold(p, labels, "f1")
    grid = np.linspace(0.01, 0.99, 197)
    best_acc = max(((p >= t) == labels).mean() for t in grid)
    assert acc >= best_acc - 1e-9 and acc > ((p >= 0.5) == labels).mean()
    assert t_f1 <= t_acc  # F1 of the rare class pays for recall with a lower threshold
    assert 0.0 < f1 <= 1.0
    with pytest.raises(ConfigError, match="both classes"):
        choose_threshold(p[labels == 0], labels[labels == 0])
    with pytest.raises(ConfigError, match="two classes"):
        fit_calibration(*_overconfident(n=50, classes=3), threshold="f1")
    # a stored threshold decides class 1 from its probability
    calibration = Calibration(temperature=2.0, threshold=0.3, threshold_metric="f1", fitted_on="val")
    assert calibration.predict(torch.tensor([[0.75, 0.25], [0.69, 0.31]])).tolist() == [0, 1]
    with pytest.raises(ConfigError, match="threshold"):
        Calibration(threshold=1.5)


@pytest.mark.slow
def test_finetune_calibrates_stores_and_every_path_uses_it(stripes_folder, tmp_path, monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")
    data = tk.ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0, "batch_size": 16},
    )
    model = tk.TransferClassifier(
        num_classes=2,
        class_names=data.class_names,
        backbone=TINY_BACKBONE,
        pretrained=False,
        prediction={"calibrate": True, "decision_threshold": "accuracy"},
    )
    trainer = quiet_trainer(tmp_path, max_epochs=3)
    results = trainer.finetune(model, datamodule=data)
    stored = results["calibration"]
    assert stored["fitted_on"].startswith("val (") and stored["nll_after"] <= stored["nll_before"]
    assert 0.0 < stored["threshold"] < 1.0 and stored["threshold_metric"] == "accuracy"

    # the best checkpoint carries it; a model rebuilt from it applies it
    best = results["best_checkpoint"]
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    assert checkpoint["transferkit"]["calibration"] == stored
    loaded, transform = tk.load_for_inference(best)
    assert loaded.calibration.to_dict() == stored
    images = torch.stack([data.datasets["test"][i][0] for i in range(len(data.datasets["test"]))])
    with torch.no_grad():
        logits = loaded(images)
        probs = loaded.predict_proba(images)
    np.testing.assert_allclose(probs, (logits / stored["temperature"]).softmax(-1), atol=1e-6)
    # the test split was scored with the threshold, as predict decides
    labels = torch.tensor([data.datasets["test"][i][1] for i in range(len(images))])
    decided = (probs[:, 1] >= stored["threshold"]).long()
    assert results["test"]["test_acc"] == pytest.approx(float((decided == labels).float().mean()), abs=1e-6)
    assert loaded.predict_labels(probs).tolist() == decided.tolist()

    # the exported ONNX model's probabilities are the calibrated ones, and its sidecar says so
    export = tk.export_checkpoint(best, format="onnx", out=tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_probs = session.run(None, {"images": images.numpy()})
    np.testing.assert_allclose(onnx_probs, probs.numpy(), atol=1e-5)
    np.testing.assert_allclose(onnx_logits, logits.numpy(), atol=1e-4)
    sidecar = json.loads(export.preprocessing.read_text())
    assert sidecar["calibration"] == stored and str(stored["threshold"]) in sidecar["decision"]


def test_calibration_without_a_validation_split_is_refused_before_training(stripes_folder, tmp_path):
    data = tk.ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        split={"val_fraction": 0.0},
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0},
    )
    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, prediction={"calibrate": True}
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    with pytest.raises(ConfigError, match="validation split"):
        trainer.finetune(model, datamodule=data)
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before any training
    with pytest.raises(ConfigError, match="two classes"):
        tk.TransferClassifier(
            num_classes=3, backbone=TINY_BACKBONE, pretrained=False, prediction={"decision_threshold": "f1"}
        )
