"""Checkpoints written by earlier transferkit versions still load, and their models predict as they did."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

import transferkit as tk

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _probe_images() -> torch.Tensor:
    spec = importlib.util.spec_from_file_location("maker", FIXTURES / "make_flat_settings_checkpoint.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    return maker.probe_images()


@pytest.fixture(scope="module")
def flat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compat") / "flat_settings.ckpt"
    path.write_bytes(gzip.decompress((FIXTURES / "flat_settings.ckpt.gz").read_bytes()))
    return path


def test_a_checkpoint_of_flat_settings_loads_and_predicts_as_it_did(flat_checkpoint):
    expected = json.loads((FIXTURES / "flat_settings.json").read_text())
    model = tk.TransferClassifier.from_checkpoint(str(flat_checkpoint))
    with torch.no_grad():
        probs = model.predict_proba(_probe_images())  # test-time flips and the stored temperature included
    torch.testing.assert_close(probs, torch.tensor(expected["probabilities"]), atol=1e-5, rtol=1e-4)
    assert model.calibration.temperature == pytest.approx(expected["temperature"])
    assert model.class_names == [str(i) for i in range(10)]
    assert model.class_groups == {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9]}

    loaded, transform = tk.load_for_inference(str(flat_checkpoint))
    image = (torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()
    assert tuple(transform(image=image)["image"].shape) == (3, 32, 32)  # the stored eval pipeline
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(_probe_images()), probs)


def test_a_flat_checkpoint_rebuilds_its_settings_in_groups_and_takes_grouped_overrides(flat_checkpoint):
    saved = torch.load(flat_checkpoint, weights_only=True)["hyper_parameters"]
    assert (
        "lr" in saved and "optimizer" not in saved or isinstance(saved["optimizer"], str)
    )  # flat as written
    model = tk.TransferClassifier.from_checkpoint(str(flat_checkpoint))
    s = model.settings
    assert s.optimizer.lr == saved["lr"] and s.head.hidden_dims == tuple(saved["hidden_dims"])
    assert s.prediction.tta == saved["tta"] and s.head.dropout == saved["dropout"]
    # a group given as a dict changes the fields it names; the rest stay as the checkpoint has them
    changed = tk.TransferClassifier.from_checkpoint(str(flat_checkpoint), prediction={"tta": "none"})
    assert changed.settings.prediction.tta == "none"
    assert changed.settings.prediction.replace(tta=s.prediction.tta) == s.prediction
    assert changed.settings.head == s.head


def test_a_flat_checkpoint_loads_through_lightning_and_the_command_line_too(flat_checkpoint, tmp_path):
    expected = json.loads((FIXTURES / "flat_settings.json").read_text())
    # Lightning's own loader: the flat optimizer: adam and lr_schedule: cosine do not stand for the groups
    model = tk.TransferClassifier.load_from_checkpoint(str(flat_checkpoint), weights_only=True).eval()
    assert model.settings.optimizer.name == "adam" and model.settings.lr_schedule.name == "cosine"
    assert model.settings.head.hidden_dims == (16,) and model.settings.regularisation.label_smoothing == 0.1
    with torch.no_grad():  # the stored temperature comes with it, as from_checkpoint's
        torch.testing.assert_close(
            model.predict_proba(_probe_images()),
            torch.tensor(expected["probabilities"]),
            atol=1e-5,
            rtol=1e-4,
        )
    # the command line rebuilds the model from the checkpoint's settings (LightningCLI reads them back)
    data = {
        "source": "digits",
        "split": {"max_samples": 300},
        "loader": {"num_workers": 0},
        "pipeline": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "augment": "none"},
        "class_groups": {"low": ["0", "1", "2", "3", "4"], "high": ["5", "6", "7", "8", "9"]},
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": {"backbone": "test_efficientnet", "pretrained": False}, "data": data})
    )
    result = run_cli(
        "validate", "--config", str(recipe), "--ckpt_path", str(flat_checkpoint), "--trainer.logger", "false"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_group_acc" in result.stdout
    # an override in the flat form says where it goes now
    with pytest.raises(
        TypeError, match=r"tta is a field of the prediction group now: give prediction=\{'tta': \.\.\.\}"
    ):
        tk.TransferClassifier.from_checkpoint(str(flat_checkpoint), tta="none")
