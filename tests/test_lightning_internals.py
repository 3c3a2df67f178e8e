"""Every private Lightning attribute transferkit reads, read on a real run: a Lightning release that renames
or drops one fails here with its name (and the supported versions), not somewhere deep in a resume."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import lightning
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, quiet_trainer
from lightning.pytorch.callbacks import Callback
from packaging.specifiers import SpecifierSet

import transferkit.lightning_internals as internals
from transferkit import EMA, ImageDataModule, TransferClassifier
from transferkit.data.samplers import TrainLoader, epoch_sampler
from transferkit.errors import LightningInternalsError
from transferkit.training.checkpointing import RunCheckpoint

ROOT = Path(__file__).resolve().parents[1]


class _ReadEverything(Callback):
    """Calls each accessor where transferkit calls it, and keeps what it read."""

    def __init__(self, checkpoint: RunCheckpoint, ema: EMA) -> None:
        self.checkpoint, self.ema = checkpoint, ema
        self.read: dict[str, list] = {}

    def _keep(self, name: str, value) -> None:
        self.read.setdefault(name, []).append(value)

    def on_train_start(self, trainer, pl_module):
        self._keep("attached_trainer", internals.attached_trainer(pl_module) is trainer)
        self._keep("restarting", internals.restarting(trainer))
        self._keep("restarted_mid_epoch", internals.restarted_mid_epoch(trainer))
        loaders = internals.train_loaders(trainer)
        self._keep("train_loaders", [type(loader).__name__ for loader in loaders])
        self._keep("epoch_sampler", epoch_sampler(loaders[0].sampler) is not None)
        self._keep("wrapped_sampler", internals.wrapped_sampler(loaders[0].sampler))
        self._keep("restart_train_iteration", internals.restart_train_iteration(trainer))
        self._keep(
            "strategy_checkpoint_io", type(internals.strategy_checkpoint_io(trainer.strategy)).__name__
        )

    def on_train_epoch_start(self, trainer, pl_module):
        self._keep("epoch_about_to_run", (internals.epoch_about_to_run(trainer), trainer.current_epoch))
        self._keep("epoch_not_started", internals.epoch_not_started(trainer))  # inside the start hooks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._keep("batches_done_in_epoch", internals.batches_done_in_epoch(trainer))
        self._keep("epoch_not_started", internals.epoch_not_started(trainer))
        self._keep("latest_update_step", (internals.latest_update_step(self.ema), trainer.global_step))
        self._keep("averaged_model", internals.averaged_model(self.ema) is not None)

    def on_train_epoch_end(self, trainer, pl_module):
        self._keep("epoch_batches_all_ran", internals.epoch_batches_all_ran(trainer))
        self._keep("saves_on_train_epoch_end", internals.saves_on_train_epoch_end(self.checkpoint, trainer))

    def on_fit_end(self, trainer, pl_module):
        self._keep("last_saved_step", (internals.last_saved_step(self.checkpoint), trainer.global_step))
        self._keep("callback_state_key", internals.callback_state_key(self, answer=42))


def test_every_accessor_reads_what_transferkit_expects_on_a_real_run(stripes_folder, tmp_path):
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"num_workers": 0, "batch_size": 16},
    )
    model = TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, head={"hidden_dims": []}
    )
    # only epoch 0 is ever a new best, so epoch 1's last.ckpt is transferkit's own write
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", monitor="epoch", mode="min", save_last=True)
    ema = EMA(decay=0.9)
    reader = _ReadEverything(checkpoint, ema)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, callbacks=[checkpoint, ema, reader], num_sanity_val_steps=0
    )
    trainer.fit(model, datamodule=dm)
    read = reader.read
    assert read["attached_trainer"] == [True]
    assert read["restarting"] == [False] and read["restarted_mid_epoch"] == [False]
    assert read["train_loaders"] == [[TrainLoader.__name__]] and read["epoch_sampler"] == [True]
    assert read["wrapped_sampler"] == [None]  # no DDP here: the sampler is transferkit's own
    assert read["restart_train_iteration"] == [True]
    assert read["strategy_checkpoint_io"] == ["AtomicCheckpointIO"]
    assert read["epoch_about_to_run"] == [(0, 0), (1, 1)]
    assert read["epoch_not_started"] == ([True] + [False] * 3) * 2  # True in the start hooks only
    # 3 batches an epoch (54 images by 16, the last dropped); a batch counts as done after on_train_batch_end
    assert read["batches_done_in_epoch"] == [0, 1, 2] * 2
    assert [step for step, now in read["latest_update_step"]] == [
        now for _, now in read["latest_update_step"]
    ]
    assert all(read["averaged_model"]) and read["epoch_batches_all_ran"] == [True, True]
    assert read["saves_on_train_epoch_end"] == [True, True]
    assert read["last_saved_step"] == [(trainer.global_step, trainer.global_step)]
    assert "answer" in read["callback_state_key"][0]
    # CheckpointHyperparameters is a LightningCLI mixin: the test below and tests/test_checkpoint_compat.py
    readers = {
        name for name in internals.__all__ if name not in ("SUPPORTED", "USED", "CheckpointHyperparameters")
    }
    readers |= {"epoch_sampler"}
    writers = {"save_last_checkpoint", "set_ddp_find_unused_parameters", "set_latest_update_step"}
    writers |= {"rewind_epoch_not_started"}  # run by tests/test_faults.py's Ctrl+C as an epoch starts
    assert set(read) == readers - writers
    # the writers ran too: last.ckpt rewritten after the epoch that was no new best, the average updated
    # every step (DDP's runs in tests/test_finetuning.py's DDP tests)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert ema._updates == trainer.global_step


def test_a_missing_private_attribute_is_named_with_the_supported_versions():
    class NotAFitLoop:
        pass

    class NotATrainer:
        fit_loop = NotAFitLoop()

    with pytest.raises(LightningInternalsError) as info:
        internals.restarting(NotATrainer())
    message = str(info.value)
    assert "NotAFitLoop.restarting" in message and lightning.__version__ in message
    assert f"lightning{internals.SUPPORTED}" in message


def test_pyproject_allows_exactly_the_lightning_versions_the_suite_passed_on():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [d for d in project["dependencies"] if re.match(r"lightning\b", d)]
    assert requirement.replace(" ", "") == f"lightning{internals.SUPPORTED}"
    assert lightning.__version__ in SpecifierSet(internals.SUPPORTED)  # the one installed is one of them


def test_the_command_line_reads_a_checkpoints_settings_back_through_transferkits_conversion():
    from lightning.pytorch.cli import LightningCLI

    from transferkit.cli.lightning_cli import TransferKitCLI

    # the Lightning method the mixin replaces still exists, and the CLI uses the mixin's
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    assert TransferKitCLI._parse_ckpt_path is internals.CheckpointHyperparameters._parse_ckpt_path
    converted = TransferKitCLI.checkpoint_hparams(
        None, {"num_classes": 2, "lr": 0.1, "lr_found": [], "tta": "d4"}
    )
    assert converted == {"num_classes": 2, "optimizer": {"lr": 0.1}, "prediction": {"tta": "d4"}}
