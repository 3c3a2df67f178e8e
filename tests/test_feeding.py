"""One owner for what the model is fed: the FreezeAndCache callback, the seams it uses, and what it refuses."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import NORM, TINY_BACKBONE, merged, quiet_trainer, run_cli
from torch.utils.data import DataLoader, TensorDataset

import transferkit as tk
from transferkit.models.checkpoint import read_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "transferkit"


def _attributes(folder: str) -> set[str]:
    return {
        node.attr
        for path in (PACKAGE / folder).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
    }


def test_the_model_and_the_data_module_never_read_each_other_through_the_trainer():
    assert "datamodule" not in _attributes("models")  # no trainer.datamodule in the model's code
    assert "lightning_module" not in _attributes("data")  # no trainer.lightning_module in the data's
    # and forward follows what it was told it is fed, not the shape of what it gets
    source = (PACKAGE / "models" / "classifier.py").read_text()
    methods = {
        node.name: node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name in ("forward", "features")
    }
    for name, method in methods.items():
        used = {n.attr for n in ast.walk(method) if isinstance(n, ast.Attribute)}
        assert not used & {"shape", "ndim"}, name


class _Plain(L.LightningDataModule):
    """A user's own data module: two loaders of images and labels, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(48, 3, 32, 32, generator=generator)
        self.labels = (self.images[:, 0].mean(dim=(1, 2)) > 0).long()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=16)


def test_the_model_trains_with_a_plain_data_module_and_still_describes_itself(tmp_path):
    L.seed_everything(0)
    model = tk.TransferClassifier(
        num_classes=2,
        backbone=TINY_BACKBONE,
        pretrained=False,
        freeze_schedule=tk.FreezeSchedule(milestones={0: 0, 1: 2}),
    )
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=_Plain())
    assert model.trainable_groups == 2  # the schedule was applied, epoch by epoch
    section = read_checkpoint(trainer.checkpoint_callback.best_model_path)["transferkit"]
    # no data module of ours to say how inputs were prepared: the backbone's own, and it says so
    assert section["preprocessing"]["source"] == "backbone" and section["preprocessing"]["input_size"]


def test_with_our_data_module_the_checkpoint_holds_its_preprocessing(stripes_folder, tmp_path):
    data = tk.ImageDataModule(
        source="folder", root=str(stripes_folder), pipeline={"image_size": 40}, loader={"num_workers": 0}
    )
    model = tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    stored = read_checkpoint(trainer.checkpoint_callback.best_model_path)["transferkit"]["preprocessing"]
    assert stored["source"] == "datamodule" and stored["input_size"] == [3, 40, 40]
    assert stored["mean"] == list(model.data_config["mean"])  # filled in from the backbone, once
    loaded, transform = tk.load_for_inference(trainer.checkpoint_callback.best_model_path)
    assert loaded.preprocessing["image_size"] == 40


def test_a_freeze_schedule_without_the_callback_is_refused_not_ignored(stripes_folder, tmp_path):
    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, freeze_schedule={"frozen_epochs": 1}
    )
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(tk.ConfigError, match="add transferkit.FreezeAndCache"):
        trainer.fit(model, datamodule=_Plain())


def test_the_callback_says_what_each_epoch_is_fed_and_which_see_augmentation():
    model = tk.TransferClassifier(
        num_classes=2,
        backbone=TINY_BACKBONE,
        pretrained=False,
        freeze_schedule={"milestones": {0: 0, 2: 2, 4: -1}},
    )
    both = tk.FreezeAndCache(feature_cache="clean", trunk_cache="clean")
    assert [both.fed_at(model, e) for e in range(5)] == ["features"] * 2 + ["trunk"] * 2 + ["images"]
    assert both.augmented_epochs(model, 5) == [4] and both.augmented_epochs(model, 4) == []
    views = tk.FreezeAndCache(feature_cache="clean", trunk_cache="augmented")
    assert views.augmented_epochs(model, 4) == [2, 3]
    assert tk.FreezeAndCache().augmented_epochs(model, 4) is None  # images every epoch
    with pytest.raises(tk.ConfigError, match=r"caches.trunk_cache must be 'off', 'clean' or 'augmented'"):
        tk.FreezeAndCache(trunk_cache="yes")
    with pytest.raises(tk.ConfigError, match=r"caches.cache_views must be a whole number >= 1, got 0"):
        tk.FreezeAndCache(cache_views=0)


def _digits(**kwargs) -> tk.ImageDataModule:
    return tk.ImageDataModule(
        source="digits",
        **merged({"split": {"max_samples": 200}, "loader": {"num_workers": 0}, "pipeline": NORM}, kwargs),
    )


@pytest.mark.slow
def test_augmentation_that_no_epoch_sees_is_refused_and_one_some_epochs_see_is_said(tmp_path, capsys):
    def fit(data: tk.ImageDataModule, caches: tk.FreezeAndCache) -> None:
        model = tk.TransferClassifier(
            num_classes=10,
            backbone=TINY_BACKBONE,
            pretrained=False,
            freeze_schedule={"milestones": {0: 0, 1: 2}},
        )
        quiet_trainer(tmp_path, max_epochs=2, callbacks=[caches]).fit(model, datamodule=data)

    clean = dict(feature_cache="clean", trunk_cache="clean")
    with pytest.raises(
        tk.ConfigError, match=r"data\.pipeline\.augment is set, but no training epoch sees augmented"
    ):
        fit(_digits(pipeline={"augment": "light"}), tk.FreezeAndCache(**clean))
    fit(_digits(pipeline={"augment": "none"}), tk.FreezeAndCache(**clean))  # said: no augmentation
    fit(_digits(), tk.FreezeAndCache(**clean))  # the default preset, not chosen: no refusal
    capsys.readouterr()
    fit(_digits(pipeline={"augment": "light"}), tk.FreezeAndCache(feature_cache="clean"))
    err = capsys.readouterr().err
    assert (
        "data.pipeline.augment reaches epochs 1 only: epochs 0 train on outputs stored from the eval pipeline"
        in err
    )


def test_an_old_recipe_key_names_its_new_place(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"source": "digits", "feature_cache": "clean"}}))
    result = run_cli("fit", "--config", str(recipe))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: data.feature_cache (in '{recipe}') is now caches.feature_cache: the FreezeAndCache callback "
        "owns what the model is fed while the backbone is frozen. Write caches: {feature_cache: ...} in the "
        "recipe, or --caches.feature_cache on the command line."
    ]
    flag = run_cli("fit", "--data.source", "digits", "--data.trunk_cache", "clean")
    assert (
        flag.returncode == 2
        and "data.trunk_cache (in the command line) is now caches.trunk_cache" in flag.stderr
    )
    # the new keys are there, overridable and shown by --print_config
    shown = run_cli("fit", "--data.source", "digits", "--caches.trunk_cache", "clean", "--print_config")
    assert shown.returncode == 0 and "caches:" in shown.stdout and "trunk_cache: clean" in shown.stdout


def test_the_trainer_fills_the_data_modules_sizes_from_the_model_however_the_data_module_is_passed(tmp_path):
    model = tk.TransferClassifier(num_classes=10, backbone=TINY_BACKBONE, pretrained=False)
    size = model.data_config["input_size"][-1]
    data = tk.ImageDataModule(
        source="digits", split={"max_samples": 100}, loader={"num_workers": 0, "batch_size": 50}
    )
    with pytest.raises(tk.ConfigError, match="image_size, mean and std are the backbone's"):
        data.setup("fit")  # on its own it cannot know them
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(model, data)  # passed where the loaders go, as Lightning allows
    assert (data.image_size, data.mean) == (size, tuple(model.data_config["mean"]))
    assert model.preprocessing["image_size"] == size
    fresh = tk.ImageDataModule(
        source="digits", split={"max_samples": 100}, loader={"num_workers": 0, "batch_size": 50}
    )
    trainer.test(model, fresh, verbose=False)
    assert fresh.image_size == size
