"""Every recipe in recipes/ trains through the real command line, and its header says what it is for.

The tests are parametrized over the files found in recipes/, so a new recipe is covered as soon as it is
added. Each one runs ``fit`` with tiny limits (a stratified subset of the data, small images, two batches
per epoch) for as many epochs as it takes to reach the first epoch in which its freeze schedule trains
the backbone, so both the head-only phase (on cached features, where the recipe asks for them) and the
fine-tuning phase run.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from transferkit import FreezeAndCache, FreezeSchedule
from transferkit.cli.lightning_cli import TransferKitCLI, cli_kwargs
from transferkit.containers import plain
from transferkit.models.settings import ClassifierSettings
from transferkit.reporting.plots import epoch_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

# what a recipe's header must hold: "# Name: what it is for", and what it reaches once measured
PURPOSE = re.compile(r"^(?P<name>[^:]+):\s+(?P<purpose>\S.{20,})$")
MEASURED = re.compile(r"\breaches:?\s+(?:about\s+)?\d*\.?\d+", re.IGNORECASE)

# the data settings the runs below override to stay small
# data fields the test sets small (160 images: every ELPV stratum in every split), as group.field
SMALL = {"split.max_samples": 160, "pipeline.image_size": 64, "loader.batch_size": 8}
OVERRIDDEN_DATA = {*SMALL, "loader.num_workers", "cache.dir"}

HEAD_ACTIVATIONS = {
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def header(path: Path) -> list[str]:
    """The comment lines at the top of a recipe, without their ``#``."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def recipe_ids(path: Path) -> str:
    return path.stem


def test_recipes_are_found():
    assert {"quickstart", "elpv", "elpv-4class", "fast"} <= {p.stem for p in RECIPES}


# --- the header ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=recipe_ids)
def test_recipe_header_says_what_it_is_for_how_to_run_it_and_what_it_reaches(path: Path):
    lines = header(path)
    assert lines, f"{path.name} needs a header comment: what it is for, how to run it, what it reaches"
    assert PURPOSE.match(lines[0]), (
        f"the first line of {path.name}'s header should name the recipe and say what it is for, "
        f"'# Name: what it is for'; it is '# {lines[0]}'"
    )
    assert any(f"--config recipes/{path.name}" in line for line in lines), (
        f"{path.name}'s header should show the command that runs it "
        f"(python -m transferkit finetune --config recipes/{path.name})"
    )
    assert any(MEASURED.search(line) for line in lines), (
        f"{path.name}'s header should say what the recipe reaches here, measured (e.g. '# Reaches: 0.88 "
        f"binary test accuracy, mean of 3 seeds')"
    )


# --- a tiny run through the command line -----------------------------------------------------------


def _epochs_to_run(recipe: dict[str, Any]) -> int:
    """Up to and including the first epoch that trains the backbone (1 if it trains from the start)."""
    max_epochs = recipe.get("trainer", {}).get("max_epochs") or 1
    schedule = FreezeSchedule.coerce(recipe.get("model", {}).get("freeze_schedule"))
    first = schedule.unfreeze_epoch(depth=1, num_groups=1, max_epochs=max_epochs)
    return max_epochs if first is None else first + 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*args parameter is intended to run from within Python.*")
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
@pytest.mark.parametrize("path", RECIPES, ids=recipe_ids)
def test_recipe_trains_its_model_through_the_cli(path: Path, tmp_path: Path):
    recipe = yaml.safe_load(path.read_text())
    epochs = _epochs_to_run(recipe)
    args = ["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path / "run")]
    args += ["--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches", "2"]
    args += ["--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    for key, value in SMALL.items():
        args += [f"--data.{key}", str(value)]
    args += ["--data.loader.num_workers", "0", "--data.cache.dir", str(tmp_path / "feature_cache")]
    # two batches an epoch give a noisy validation loss, and a recipe whose early stopping may end the
    # head phase (the quick start's) would then stop before the unfreeze this test is here to reach
    args += ["--early_stopping.patience", str(epochs)]

    cli = TransferKitCLI(**cli_kwargs(args))
    model, data, trainer = cli.model, cli.datamodule, cli.trainer

    # the model is the recipe's: every model field it sets, the head built from them, its classes
    settings = model.settings
    for key, value in recipe.get("model", {}).items():
        if key == "freeze_schedule":
            assert settings.freeze_schedule == FreezeSchedule.coerce(value)
        elif isinstance(value, dict):  # a group: each field the recipe sets
            for field, given in value.items():
                assert plain(getattr(getattr(settings, key), field)) == plain(given), f"model.{key}.{field}"
        else:
            assert plain(getattr(settings, key)) == plain(value), f"model.{key}"
    head = settings.head
    head_layers = [type(m) for m in model.head.hidden]
    if head.hidden_dims:
        assert HEAD_ACTIVATIONS[head.activation] in head_layers, (head.activation, head_layers)
    assert (nn.BatchNorm1d in head_layers) == bool(head.batch_norm and head.hidden_dims), head_layers
    for key, value in recipe.get("data", {}).items():  # every data field the recipe sets
        fields = value.items() if isinstance(value, dict) and key != "class_groups" else [(None, value)]
        for field, given in fields:
            name = key if field is None else f"{key}.{field}"
            held = (
                getattr(data.settings, key) if field is None else getattr(getattr(data.settings, key), field)
            )
            if name not in OVERRIDDEN_DATA:
                assert plain(held) == plain(given), f"data.{name}"
    # the caches are the recipe's, on the callback that feeds the model
    (feeding,) = [c for c in trainer.callbacks if isinstance(c, FreezeAndCache)]
    for key, value in recipe.get("caches", {}).items():
        assert getattr(feeding, key) == value, f"caches.{key}"
    assert settings.num_classes == data.num_classes == model.head.fc.out_features
    if data.hparams.source == "elpv":
        outputs = {
            "binary": 2,
            "4class": 4,
            "cell_type": 2,
            "defective_polycrystalline": 2,
            "defect_probability": 1,
        }
        assert settings.num_classes == outputs[data.hparams.task]
        assert settings.target == data.target_kind  # the kind the data gives, handed to the model

    # it trained, epoch after epoch, on the recipe's freeze schedule, with finite losses
    assert trainer.state.finished and trainer.current_epoch == epochs
    metrics = epoch_metrics(Path(trainer.log_dir) / "metrics.csv")
    assert metrics["epoch"] == list(range(epochs))
    schedule = settings.freeze_schedule
    if schedule.active:
        expected = [float(schedule.trainable_groups(e, len(model.groups))) for e in range(epochs)]
        assert metrics["trainable_groups"] == expected
        assert metrics["trainable_groups"][-1] > 0  # the last epoch fine-tuned the backbone
    for column in ("train_loss_step", "val_loss"):
        assert all(math.isfinite(v) for v in metrics[column]), (column, metrics[column])
    caches = recipe.get("caches", {})
    if caches.get("feature_cache", "off") != "off" and schedule.trainable_groups(0, len(model.groups)) == 0:
        assert list((tmp_path / "feature_cache").glob("*.pt")), "head-only epochs should use the cache"

    # and left checkpoints of it (Lightning rewrites last.ckpt only in epochs that save a best one)
    assert (Path(trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()
    best = Path(trainer.checkpoint_callback.best_model_path)
    checkpoint = torch.load(best, weights_only=True, map_location="cpu")
    assert 0 <= checkpoint["epoch"] < epochs
    saved = checkpoint["hyper_parameters"]
    assert saved["num_classes"] == settings.num_classes and saved["head"] == settings.head.to_dict()
    assert ClassifierSettings.build(**saved) == settings  # the checkpoint holds the whole recipe
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_the_quick_start_pointed_at_a_users_folder_trains_with_no_other_change(tmp_path: Path):
    from conftest import make_stripes_folder, run_cli

    root = make_stripes_folder(tmp_path / "photos", per_class=30)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    schedule = FreezeSchedule.coerce(yaml.safe_load(recipe.read_text())["model"]["freeze_schedule"])
    first_unfreeze = next(e for e in range(100) if schedule.trainable_groups(e, 10) > 0)
    result = run_cli(
        "finetune",
        "--config",
        str(recipe),
        "--data.source",
        "folder",
        "--data.root",
        str(root),
        # tiny limits: small images, and only as many epochs as reach the recipe's first unfreeze
        "--data.pipeline.image_size",
        "64",
        "--trainer.max_epochs",
        str(first_unfreeze + 1),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.enable_progress_bar",
        "false",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (metrics_file,) = (tmp_path / "run").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["class_names"] == ["horizontal", "vertical"]  # the folder's classes, not ELPV's
    assert metrics["epochs"] == first_unfreeze + 1
    assert metrics["test"]["test_acc"] > 0.8  # stripes' orientation: far above the 0.5 of guessing
