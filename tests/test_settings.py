"""Settings in typed groups: validated when built, one place per setting, old flat keys pointed to it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import NORM, TINY_BACKBONE, run_cli

import transferkit as tk
from transferkit.cli.recipes import SHORT_FLAGS, expand_short_flags, refuse_moved_keys
from transferkit.data.settings import FLAT_DATA_KEYS, DataSettings
from transferkit.models.settings import FLAT_KEYS, GROUPS, ClassifierSettings, from_flat


def _model(**settings) -> tk.TransferClassifier:
    return tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False, **settings)


def test_a_group_given_as_a_dict_changes_the_fields_it_names_and_keeps_the_others():
    model = _model(optimizer={"lr": 3e-4}, head={"dropout": 0.5, "hidden_dims": [32]})
    s = model.settings
    assert s.optimizer == tk.OptimizerSettings(lr=3e-4)  # name adam, layer_decay 0.8 ... as by default
    assert s.head.dropout == 0.5 and s.head.hidden_dims == (32,) and s.head.activation == "elu"
    assert [type(m).__name__ for m in model.head.hidden] == ["Linear", "BatchNorm1d", "ELU", "Dropout"]
    # the same model from the group classes, and from nothing but defaults
    same = _model(
        optimizer=tk.OptimizerSettings(lr=3e-4), head=tk.HeadSettings(dropout=0.5, hidden_dims=(32,))
    )
    assert same.settings == s
    assert _model().settings == ClassifierSettings.build(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False
    )


def test_groups_are_frozen_and_replace_validates_again():
    opt = tk.OptimizerSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.lr = 1.0  # type: ignore[misc]
    assert opt.replace(lr=0.1).lr == 0.1 and opt.lr == 1e-3
    with pytest.raises(tk.ConfigError, match=r"model\.optimizer\.lr must be a number > 0"):
        opt.replace(lr=-1)
    with pytest.raises(tk.ConfigError, match=r"model\.lr_schedule\.milestones must be the epochs"):
        tk.LRScheduleSettings(name="piecewise")
    with pytest.raises(tk.ConfigError, match=r"model\.prediction\.mc_dropout needs dropout in the head"):
        _model(head={"dropout": 0.0}, prediction={"mc_dropout": 8})
    with pytest.raises(
        tk.ConfigError, match="decision_threshold chooses class 1's threshold for two classes"
    ):
        tk.TransferClassifier(
            num_classes=3, backbone=TINY_BACKBONE, pretrained=False, prediction={"decision_threshold": "f1"}
        )


def test_the_hyperparameters_hold_every_group_as_plain_data_that_rebuilds_the_settings(tmp_path):
    model = _model(
        optimizer={"name": "adamw", "betas": (0.8, 0.99)},
        runtime={"progressive_resizing": {"3": 24}},
        freeze_schedule={"milestones": {0: 0, 2: 1}},
    )
    saved = tmp_path / "hparams.pt"
    torch.save(dict(model.hparams), saved)
    loaded = torch.load(saved, weights_only=True)  # plain types only
    assert loaded["optimizer"]["betas"] == [0.8, 0.99] and set(GROUPS) <= set(loaded)
    assert ClassifierSettings.build(**loaded) == model.settings
    assert model.settings.runtime.progressive_resizing == {3: 24}  # the key a YAML file gives as a string


def test_the_learning_rates_a_range_test_finds_reach_the_settings_and_the_logged_hyperparameters():
    model = _model(optimizer={"lr": "auto"})
    with pytest.raises(tk.ConfigError, match="model.optimizer.lr is 'auto' and no range test has set it"):
        model.configure_optimizers()
    model.set_learning_rates(lr=0.02, backbone_lr=0.001, found=[{"phase": "head"}])
    assert model.settings.optimizer.lr == 0.02 and model.settings.optimizer.backbone_lr == 0.001
    assert model.hparams["optimizer"]["lr"] == 0.02 and model.hparams["lr_found"] == [{"phase": "head"}]
    assert model.hparams_initial["optimizer"]["lr"] == 0.02  # what the loggers record at the fit's start
    groups = model.configure_optimizers()["optimizer"].param_groups
    assert groups[0]["name"] == "head" and groups[0]["initial_lr"] == 0.02


def test_flat_settings_of_an_old_checkpoint_map_to_every_group():
    flat = {"num_classes": 2, "backbone": TINY_BACKBONE, **{key: None for key in FLAT_KEYS}}
    grouped = from_flat(flat)
    newer = {"loss"}  # groups that came after the flat form: an old checkpoint has none of their keys
    assert set(grouped) == {"num_classes", "backbone", *(set(GROUPS) - newer)}
    assert sum(len(fields) for fields in grouped.values() if isinstance(fields, dict)) == len(FLAT_KEYS)
    assert from_flat({"optimizer": {"lr": 0.1}}) == {"optimizer": {"lr": 0.1}}  # grouped: as it is


def test_old_flat_keys_in_a_recipe_or_on_the_command_line_name_their_new_place(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(
        yaml.safe_dump(
            {
                "model": {"backbone": TINY_BACKBONE, "lr": 0.01, "optimizer": "sgd", "tta": "hflip"},
                "data": {"source": "digits", "batch_size": 16, "augment": "none"},
            }
        )
    )
    result = run_cli("fit", "--config", str(old))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # one line
    for moved in (
        "model.lr (in '{}') is now model.optimizer.lr",
        "model.optimizer (in '{}') is now model.optimizer.name",
        "model.tta (in '{}') is now model.prediction.tta",
        "data.batch_size (in '{}') is now data.loader.batch_size",
        "data.augment (in '{}') is now data.pipeline.augment",
    ):
        assert moved.format(old) in line, line
    assert (
        "Write model: {optimizer: {name: ...}} in the recipe, or --model.optimizer.name on the command line."
        in line
    )
    with pytest.raises(
        tk.ConfigError, match=r"^model\.dropout \(in the command line\) is now model\.head\.dropout"
    ):
        refuse_moved_keys(["--model.dropout", "0.2"])
    with pytest.raises(
        tk.ConfigError, match=r"data\.cache_dir \(in the command line\) is now data\.cache\.dir"
    ):
        refuse_moved_keys(["--data.cache_dir=/tmp/x"])
    # a whole group given inline is the new form, not an old key
    refuse_moved_keys(["--model.optimizer", "{name: sgd, lr: 0.1}", "--data.loader", "{batch_size: 8}"])
    # every flat key has a new place that exists
    for old_key, (group, name) in FLAT_KEYS.items():
        assert name in {f.name for f in dataclasses.fields(GROUPS[group])}, old_key
    data_fields = {f.name: f.type for f in dataclasses.fields(DataSettings)}
    for old_key, (group, _) in FLAT_DATA_KEYS.items():
        assert group in data_fields, old_key


def test_the_most_used_settings_are_one_short_flag_away_and_print_config_shows_every_group(tmp_path):
    assert expand_short_flags(["--lr", "0.01", "--batch_size=8", "--augment", "heavy"]) == [
        "--model.optimizer.lr", "0.01", "--data.loader.batch_size=8", "--data.pipeline.augment", "heavy",
    ]  # fmt: skip
    recipe = tmp_path / "r.yaml"
    data = {"source": "digits", "pipeline": {**NORM, "mean": [0.5] * 3, "std": [0.5] * 3}}
    recipe.write_text(
        yaml.safe_dump({"model": {"backbone": TINY_BACKBONE, "pretrained": False}, "data": data})
    )
    flags = ["--lr", "0.02", "--dropout", "0.4", "--epochs", "3", "--batch_size", "8", "--image_size", "48"]
    flags += ["--augment", "heavy", "--seed", "7", "--backbone", "test_vit"]
    result = run_cli("fit", "--config", str(recipe), *flags, "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load(result.stdout)
    model, data = config["model"], config["data"]
    assert (
        model["optimizer"]["lr"] == 0.02
        and model["head"]["dropout"] == 0.4
        and model["backbone"] == "test_vit"
    )
    assert config["trainer"]["max_epochs"] == 3 and config["seed_everything"] == 7
    assert data["loader"]["batch_size"] == 8 and data["pipeline"]["image_size"] == 48
    assert data["pipeline"]["augment"] == "heavy"
    # every group is shown with all its fields, the defaults included
    assert set(GROUPS) | {"freeze_schedule"} <= set(model)
    assert model["regularisation"] == tk.RegularisationSettings().to_dict()
    assert {"split", "pipeline", "loader", "cache"} <= set(data) and data["cache"] == {
        "dir": None,
        "decoded_images": False,
    }
    assert set(SHORT_FLAGS) == {
        "--lr",
        "--backbone",
        "--dropout",
        "--epochs",
        "--batch_size",
        "--image_size",
        "--augment",
        "--root",
        "--seed",
    }


def test_values_the_flat_settings_took_are_still_taken():
    import numpy as np

    model = _model()
    top = f"backbone.{len(model.groups) - 1}"  # one optimizer group's name, not in a list
    named = _model(regularisation={"l2": 1e-4, "penalty_groups": top})
    assert named.regularisers.weights and all(w.ndim >= 2 for w in named.regularisers.weights)
    assert tk.OptimizerSettings(lr=np.float32(1e-3), momentum=0.0, eps=0.0).lr == pytest.approx(1e-3)
    assert tk.RegularisationSettings(label_smoothing=1.0).label_smoothing == 1.0
    data = tk.ImageDataModule(source="digits", pipeline={"image_size": 32.0})  # as a YAML float gives it
    assert data.settings.pipeline.image_size == 32 and isinstance(data.image_size, int)
    # what the data module was given stays as given when the backbone's mean and std fill the unset ones
    data.use_data_config(model.data_config)
    assert data.settings.pipeline.mean is not None and data.given_settings.pipeline.mean is None
