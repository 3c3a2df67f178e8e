"""The command line: help, recipes, overrides, and an end-to-end finetune."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import TINY_BACKBONE, quiet_trainer, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "transferkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=600,
    )


@pytest.mark.slow
def test_help_lists_every_command():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("fit", "validate", "test", "predict", "finetune"):
        assert f"  {command}" in result.stdout


def test_python_m_transferkit_runs_the_entry_point_and_exits_with_its_status(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["transferkit", "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("transferkit", run_name="__main__")  # what `python -m transferkit --help` runs
    assert stop.value.code == 0 and "  finetune" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["transferkit", "no-such-command"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("transferkit", run_name="__main__")
    assert stop.value.code == 2 and "unknown command 'no-such-command'" in capsys.readouterr().err


def test_print_config_resolves_the_quickstart_recipe_with_overrides():
    result = run_cli(
        "fit",
        "--config",
        str(ROOT / "recipes" / "quickstart.yaml"),
        "--lr",  # the short flag of --model.optimizer.lr
        "0.0003",
        "--data.loader.batch_size",
        "7",
        "--print_config",
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["optimizer"]["lr"] == 0.0003 and config["data"]["loader"]["batch_size"] == 7
    # every group shows its fields, the recipe's and the defaults
    assert (
        config["model"]["optimizer"]["layer_decay"] == 0.75 and config["model"]["optimizer"]["name"] == "adam"
    )
    assert config["model"]["mixing"] == {
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
        "prob": 1.0,
        "switch_prob": 0.5,
    }
    assert (
        config["model"]["backbone"] == "tf_efficientnet_lite0" and config["model"]["pretrained"] == "bundled"
    )
    milestones = config["model"]["freeze_schedule"]["milestones"]
    assert {int(k): v for k, v in milestones.items()} == {0: 0, 3: 3}


def _stripes_recipe(stripes_folder: Path, tmp_path: Path, model: dict, data: dict, **more) -> str:
    """A recipe for the tiny backbone on the stripes folder, 4 epochs into ``tmp_path/run``; its path."""
    recipe = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 4, "accelerator": "cpu", "default_root_dir": str(tmp_path / "run")},
        "model": {"backbone": TINY_BACKBONE, "pretrained": False, "optimizer": {"lr": 0.003}, **model},
        "data": {
            "source": "folder",
            "root": str(stripes_folder),
            "pipeline": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "loader": {"num_workers": 0, "batch_size": 16},
            **data,
        },
        **more,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "recipe.yaml")


@pytest.mark.slow
def test_finetune_end_to_end_writes_metrics(stripes_folder_large, tmp_path):
    recipe = _stripes_recipe(
        stripes_folder_large,
        tmp_path,
        model={
            "freeze_schedule": {"frozen_epochs": 1},
            "head": {"hidden_dims": [64]},
            "optimizer": {"lr": 0.003, "layer_decay": 1.0},
        },
        data={"pipeline": {"augment": "light"}, "loader": {"batch_size": 32}},
    )
    result = _run("finetune", "--config", recipe, "--trainer.max_epochs", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = (tmp_path / "run").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["epochs"] == 10
    assert metrics["split_sizes"] == {"train": 204, "val": 36, "test": 60}
    assert metrics["test"]["test_acc"] >= 0.8  # learned: chance is 0.5
    assert "test_acc" in result.stdout
    # the reported test accuracy is the best checkpoint's own score on the recipe's test split
    from transferkit.cli.recipes import load_recipe

    best = Path(metrics["best_checkpoint"])
    assert best.is_file() and best.parent.parent == metrics_file.parent
    recipe_objects = load_recipe(["--config", recipe], logger=False)
    (rescored,) = quiet_trainer(tmp_path / "rescore").test(
        recipe_objects.model,
        datamodule=recipe_objects.datamodule,
        ckpt_path=str(best),
        verbose=False,
        weights_only=True,
    )
    assert metrics["test"]["test_acc"] == pytest.approx(rescored["test_acc"])


def test_bad_recipe_values_fail_before_training(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        str(ROOT / "recipes" / "quickstart.yaml"),
        "--model.head.activation",
        "gelu",
        "--trainer.max_epochs",
        "1",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unknown activation 'gelu'; choose one of elu,"), result.stderr


@pytest.mark.slow
def test_finetune_without_validation_trains_on_every_non_test_image_and_tests_the_last_epoch(
    stripes_folder, tmp_path
):
    recipe = _stripes_recipe(
        stripes_folder,
        tmp_path,
        model={"lr_schedule": {"name": "cosine"}},
        data={"split": {"val_fraction": 0}},
        # would stop the run after one epoch if it watched a validation loss
        early_stopping={"patience": 0, "min_delta": 100.0},
    )
    result = run_cli("finetune", "--config", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no validation split (data.split.val_fraction=0)" in result.stderr
    (metrics_file,) = (tmp_path / "run").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["split_sizes"] == {"train": 64, "val": 0, "test": 16}
    assert metrics["epochs"] == 4 and metrics["monitor"] is None
    assert Path(metrics["best_checkpoint"]).name == "epoch=03.ckpt"
    (curves,) = (tmp_path / "run").rglob("metrics.csv")
    rows = list(csv.DictReader(curves.read_text().splitlines()))
    assert not [column for column in rows[0] if column.startswith("val_")]
    losses = [float(r["train_loss_epoch"]) for r in rows if r.get("train_loss_epoch")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "last epoch's checkpoint: " in " ".join(result.stdout.split())  # Rich wraps narrow consoles
    report = metrics_file.with_name("report.md").read_text()
    assert "## Confusion matrix (test split, tested checkpoint)" in report
    assert (
        "| tested epoch (0-based) | 3, the last |" in report
        and "| images (train/val/test) | 64 / 0 / 16 |" in report
    )


def test_a_plateau_schedule_without_validation_is_refused_before_training(stripes_folder, tmp_path):
    from conftest import NORM, quiet_trainer

    import transferkit as tk

    data = tk.ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        split={"val_fraction": 0},
        pipeline={**NORM},
        loader={"num_workers": 0},
    )
    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, lr_schedule={"name": "performance"}
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    with pytest.raises(ValueError, match="lr_schedule 'performance'.*val_fraction=0"):
        trainer.fit(model, datamodule=data)


# what Lightning prints to stderr on every run that a user may act on (the hardware it found, the seed)
EXPECTED_STDERR = (r"Seed set to \d+", r"GPU available: ", r"TPU available: ", r"`Trainer\.fit` stopped: ")


@pytest.mark.slow
def test_the_quickstart_console_holds_only_what_a_user_can_act_on(tmp_path):
    # the quick start's own recipe, on a few of its images for one short epoch: the same set-up path (ELPV,
    # the bundled weights, the feature and trunk caches, the class groups) that a user's first run takes
    result = _run(
        "fit",
        "--config",
        str(ROOT / "recipes" / "quickstart.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--data.split.max_samples",
        "400",
        "--data.pipeline.image_size",
        "64",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 0" in result.stdout  # it got as far as the first progress bar
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    unexpected = [line for line in lines if not any(re.match(p, line) for p in EXPECTED_STDERR)]
    assert unexpected == []  # no third-party noise, no warning that does not fit the recipe


def test_our_warnings_name_our_code_and_others_keep_their_format():
    from transferkit.errors import TransferKitWarning

    shown = warnings.formatwarning(
        "the split is small", TransferKitWarning, "/x/transferkit/data/checks.py", 86
    )
    assert shown == "transferkit warning (data/checks.py:86): the split is small\n"
    other = warnings.formatwarning("deprecated", DeprecationWarning, "/x/somelib/mod.py", 3, line="")
    assert other.startswith("/x/somelib/mod.py:3: DeprecationWarning: deprecated")
