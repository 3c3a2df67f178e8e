"""The LightningCLI behind the training commands (``fit``, ``validate``, ``test``, ``predict``, ``finetune``)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from transferkit.data.datamodule import ImageDataModule
from transferkit.lightning_internals import CheckpointHyperparameters
from transferkit.models.classifier import TransferClassifier
from transferkit.models.settings import from_flat
from transferkit.training.checkpointing import DEFAULT_CHECKPOINT, RunCheckpoint
from transferkit.training.early_stopping import DEFAULT_EARLY_STOPPING, PhaseEarlyStopping
from transferkit.training.feeding import FreezeAndCache
from transferkit.training.trainer import Trainer

__all__ = ["TransferKitCLI", "cli_kwargs"]


class TransferKitCLI(CheckpointHyperparameters, LightningCLI):
    """LightningCLI for :class:`TransferClassifier` on an :class:`ImageDataModule`, with ``finetune``.

    The checkpoint, early-stopping and feeding callbacks every run gets are configured under their own
    keys, ``checkpoint.*``, ``early_stopping.*`` and ``caches.*``, starting from the Trainer's defaults;
    ``trainer.logger: true`` (the default) means CSV plus TensorBoard when installed. A ``--ckpt_path``
    rebuilds the model its checkpoint holds, from settings in groups or flat (an earlier version's).
    """

    def checkpoint_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        accepted = inspect.signature(TransferClassifier.__init__).parameters
        return {k: v for k, v in from_flat(hparams).items() if k in accepted and k != "self"}

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["finetune"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.class_groups", "model.class_groups", apply_on="instantiate")
        parser.link_arguments("data.target_kind", "model.target", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in DEFAULT_CHECKPOINT.items()})
        parser.add_lightning_class_args(PhaseEarlyStopping, "early_stopping")
        parser.set_defaults({f"early_stopping.{k}": v for k, v in DEFAULT_EARLY_STOPPING.items()})
        # what the model is fed while its backbone is frozen: stored features instead of images
        parser.add_lightning_class_args(FreezeAndCache, "caches")


def cli_kwargs(args: Sequence[str] | None) -> dict[str, Any]:
    """The arguments every transferkit command builds its :class:`TransferKitCLI` with."""
    return {
        "model_class": TransferClassifier,
        "datamodule_class": ImageDataModule,
        "trainer_class": Trainer,
        "args": None if args is None else list(args),
        "seed_everything_default": 0,
        "save_config_kwargs": {"overwrite": True},
        # true: CSV (+ TensorBoard) under default_root_dir; a recipe may set false or its own loggers
        "trainer_defaults": {"logger": True},
        "parser_kwargs": {"default_env": False},
    }
