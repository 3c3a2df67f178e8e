"""``python -m transferkit``: LightningCLI training commands plus transferkit's own tools.

Training commands (``fit``, ``validate``, ``test``, ``predict``, ``finetune``) take YAML recipes with
``--config recipes/X.yaml``; every field can be overridden on the command line (``--model.lr 3e-4``) and
``--print_config`` shows the resolved recipe.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from transferkit.data import ImageDataModule
from transferkit.module import TransferClassifier
from transferkit.trainer import Trainer

__all__ = ["TransferKitCLI", "main"]

TRAINING_COMMANDS = {
    "fit": "train a model (LightningCLI fit)",
    "validate": "evaluate on the validation split",
    "test": "evaluate on the test split",
    "predict": "predict class probabilities",
    "finetune": "fit, then test the best checkpoint, then write metrics.json in the run dir",
}

# tool commands register here: name -> (one-line help, main(argv) -> exit code)
TOOL_COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {}


class TransferKitCLI(LightningCLI):
    """LightningCLI for :class:`TransferClassifier` on an :class:`ImageDataModule`, with ``finetune``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["finetune"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        # always-on callbacks, configured under their own keys in a recipe
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:02d}-{val_loss:.4f}",
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {"early_stopping.monitor": "val_loss", "early_stopping.mode": "min", "early_stopping.patience": 5}
        )


def cli_kwargs(args: Sequence[str] | None) -> dict[str, Any]:
    """The arguments every transferkit command builds its :class:`TransferKitCLI` with."""
    return {
        "model_class": TransferClassifier,
        "datamodule_class": ImageDataModule,
        "trainer_class": Trainer,
        "args": None if args is None else list(args),
        "seed_everything_default": 0,
        "save_config_kwargs": {"overwrite": True},
        "trainer_defaults": {
            "callbacks": [LearningRateMonitor(logging_interval="epoch")],
        },
        "parser_kwargs": {"default_env": False},
    }


def _plan(argv: Sequence[str]) -> int:
    from transferkit.plan import main as plan_main

    return plan_main(argv)


def _probe(argv: Sequence[str]) -> int:
    from transferkit.probe import main as probe_main

    return probe_main(argv)


def _diagnose(argv: Sequence[str]) -> int:
    from transferkit.diagnostics import main as diagnose_main

    return diagnose_main(argv)


TOOL_COMMANDS["probe"] = (
    "linear probe of the frozen features at every backbone depth, and how deep to unfreeze",
    _probe,
)
TOOL_COMMANDS["plan"] = (
    "print the freeze schedule phase by phase (groups, params, LRs, BN) without training",
    _plan,
)
TOOL_COMMANDS["diagnose"] = (
    "gradient health per layer (vanishing / exploding / dying / saturated) over a few training batches",
    _diagnose,
)


def _overview() -> str:
    lines = [
        "usage: python -m transferkit COMMAND [options]",
        "",
        "Fine-tune pretrained image models on small datasets, offline.",
        "",
        "training commands (LightningCLI; --config recipes/X.yaml, any field overridable, --print_config):",
    ]
    lines += [f"  {name:<16}{text}" for name, text in TRAINING_COMMANDS.items()]
    if TOOL_COMMANDS:
        lines += ["", "tools:"]
        lines += [f"  {name:<16}{text}" for name, (text, _) in TOOL_COMMANDS.items()]
    lines += ["", "python -m transferkit COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m transferkit`` and the ``transferkit`` script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    command = args[0]
    if command in TOOL_COMMANDS:
        return TOOL_COMMANDS[command][1](args[1:])
    if command not in TRAINING_COMMANDS and not command.startswith("-"):
        print(f"unknown command '{command}'.\n\n{_overview()}", file=sys.stderr)
        return 2
    TransferKitCLI(**cli_kwargs(None if argv is None else args))
    return 0
