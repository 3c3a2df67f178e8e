"""The LightningCLI behind the training commands (``fit``, ``validate``, ``test``, ``predict``, ``finetune``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from transferkit.data.datamodule import ImageDataModule
from transferkit.models.classifier import TransferClassifier
from transferkit.training.checkpointing import DEFAULT_CHECKPOINT, RunCheckpoint
from transferkit.training.early_stopping import DEFAULT_EARLY_STOPPING, PhaseEarlyStopping
from transferkit.training.feeding import FreezeAndCache
from transferkit.training.trainer import Trainer

__all__ = ["TransferKitCLI", "cli_kwargs"]


class TransferKitCLI(LightningCLI):
    """LightningCLI for :class:`TransferClassifier` on an :class:`ImageDataModule`, with ``finetune``.

    The checkpoint, early-stopping and feeding callbacks every run gets are configured under their own
    keys, ``checkpoint.*``, ``early_stopping.*`` and ``caches.*``, starting from the Trainer's defaults;
    ``trainer.logger: true`` (the default) means CSV plus TensorBoard when installed.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["finetune"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.class_groups", "model.class_groups", apply_on="instantiate")
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
