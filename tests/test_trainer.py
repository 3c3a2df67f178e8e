"""The Trainer's defaults: a run from Python trains, checkpoints and stops like the same run from a recipe."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import NORM, TINY_BACKBONE, quiet_trainer
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import transferkit as tk
from transferkit.cli.recipes import load_recipe
from transferkit.training.early_stopping import PhaseEarlyStopping


def _recipe(stripes_folder: Path, tmp_path: Path) -> list[str]:
    recipe = {
        "trainer": {"max_epochs": 3, "accelerator": "cpu", "default_root_dir": str(tmp_path / "cli")},
        "model": {"backbone": TINY_BACKBONE, "pretrained": False},
        "data": {
            "source": "folder",
            "root": str(stripes_folder),
            "loader": {"num_workers": 0},
            "pipeline": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return ["--config", str(path)]


def _describe(trainer: L.Trainer) -> dict:
    checkpoint = trainer.checkpoint_callback
    (stopping,) = trainer.early_stopping_callbacks
    return {
        "checkpoint": (type(checkpoint).__name__, checkpoint.monitor, checkpoint.mode, checkpoint.save_last),
        "filename": checkpoint.filename,
        "early_stopping": (type(stopping).__name__, stopping.monitor, stopping.mode, stopping.patience),
        "loggers": [type(logger).__name__ for logger in trainer.loggers],
        "lr_monitor": any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks),
    }


def test_the_python_trainer_has_the_defaults_of_a_recipe(stripes_folder, tmp_path):
    from_recipe = load_recipe(_recipe(stripes_folder, tmp_path)).trainer
    from_python = tk.Trainer(max_epochs=3, accelerator="cpu", default_root_dir=tmp_path / "python")
    assert _describe(from_python) == _describe(from_recipe)
    assert _describe(from_python)["early_stopping"] == ("PhaseEarlyStopping", "val_loss", "min", 5)
    assert _describe(from_python)["checkpoint"] == ("RunCheckpoint", "val_loss", "min", True)


@pytest.mark.slow
def test_finetune_from_python_tests_the_best_checkpoint_by_validation_loss(stripes_folder, tmp_path):
    L.seed_everything(0)
    data = tk.ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"num_workers": 0, "batch_size": 16},
    )
    model = tk.TransferClassifier(
        num_classes=data.num_classes, class_names=data.class_names, backbone=TINY_BACKBONE, pretrained=False
    )
    trainer = tk.Trainer(
        max_epochs=3, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False
    )
    results = trainer.finetune(model, datamodule=data)
    assert results["monitor"] == "val_loss" and Path(results["best_checkpoint"]).name.startswith(
        "best-epoch="
    )
    best_epoch = torch.load(results["best_checkpoint"], weights_only=True)["epoch"]
    # val_loss by epoch, from the CSV log the default loggers wrote
    rows = csv.DictReader((Path(results["run_dir"]) / "metrics.csv").read_text().splitlines())
    losses = {int(row["epoch"]): float(row["val_loss"]) for row in rows if row.get("val_loss")}
    assert best_epoch == min(losses, key=losses.get)  # the tested checkpoint is the best epoch's
    assert results["best_score"] == min(losses.values())
    assert json.loads((Path(results["run_dir"]) / "metrics.json").read_text())["monitor"] == "val_loss"


def test_early_stopping_can_be_turned_off_from_python_and_from_a_recipe(stripes_folder, tmp_path):
    given = PhaseEarlyStopping(monitor="val_loss", patience=0)
    trainer = tk.Trainer(enable_early_stopping=False, callbacks=[given], logger=False)
    assert not [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    recipe = load_recipe([*_recipe(stripes_folder, tmp_path), "--trainer.enable_early_stopping", "false"])
    assert not recipe.trainer.early_stopping_callbacks
    assert isinstance(recipe.trainer.checkpoint_callback, ModelCheckpoint)


def test_without_validation_the_defaults_keep_the_last_epoch_and_stop_nothing(tmp_path):
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 2, (64,))
    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, head={"hidden_dims": []}
    )
    trainer = quiet_trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path))
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))  # no validation loader at all
    assert trainer.current_epoch == 2 and not trainer.early_stopping_callbacks
    assert trainer.checkpoint_callback.monitor is None
    assert Path(trainer.checkpoint_callback.best_model_path).name == "epoch=01.ckpt"
