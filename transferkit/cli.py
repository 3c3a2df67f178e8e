"""``python -m transferkit``: LightningCLI training commands plus transferkit's own tools.

Training commands (``fit``, ``validate``, ``test``, ``predict``, ``finetune``) take YAML recipes with
``--config recipes/X.yaml``; every field can be overridden on the command line (``--model.lr 3e-4``) and
``--print_config`` shows the resolved recipe.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from transferkit.data import ImageDataModule
from transferkit.module import TransferClassifier
from transferkit.trainer import PhaseEarlyStopping, RunCheckpoint, Trainer, pickled_code_error

__all__ = ["TransferKitCLI", "main", "run_loggers"]

TRAINING_COMMANDS = {
    "fit": "train a model (LightningCLI fit)",
    "validate": "evaluate on the validation split",
    "test": "evaluate on the test split",
    "predict": "predict class probabilities",
    "finetune": "fit, test the best checkpoint, write metrics.json and report.md (curves, confusion, augmentation)",
}

# tool commands register here: name -> (one-line help, main(argv) -> exit code)
TOOL_COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {}


def run_loggers(save_dir: str | os.PathLike, tensorboard: bool | None = None) -> list[Logger]:
    """The loggers a run gets by default (``trainer.logger: true``): a :class:`CSVLogger` first, so
    ``metrics.csv``, checkpoints, ``config.yaml`` and the run report share its
    ``<save_dir>/lightning_logs/version_N``; then, when TensorBoard is installed (``tensorboard=None``),
    a :class:`TensorBoardLogger` writing into that directory's ``tensorboard/``."""
    csv_logger = CSVLogger(save_dir)
    loggers: list[Logger] = [csv_logger]
    if tensorboard is None:
        tensorboard = _tensorboard_available()
    if tensorboard:
        loggers.append(
            TensorBoardLogger(
                save_dir,
                name=csv_logger.name,
                version=csv_logger.version,
                sub_dir="tensorboard",
                default_hp_metric=False,
            )
        )
    return loggers


def _tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


class TransferKitCLI(LightningCLI):
    """LightningCLI for :class:`TransferClassifier` on an :class:`ImageDataModule`, with ``finetune``.

    ``trainer.logger: true`` (the default) means :func:`run_loggers`: CSV, plus TensorBoard when installed;
    ``false`` turns logging off, and any logger (or list) given in a recipe is used as it is.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["finetune"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        # always-on callbacks, configured under their own keys in a recipe; last.ckpt every epoch
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:02d}-{val_loss:.4f}",
            }
        )
        parser.add_lightning_class_args(PhaseEarlyStopping, "early_stopping")
        parser.set_defaults(
            {"early_stopping.monitor": "val_loss", "early_stopping.mode": "min", "early_stopping.patience": 5}
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of --ckpt_path (weights_only=True) before anything else
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as err:
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            raise pickled_code_error(ckpt_path, err) from err

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self._get(self.config_init, "trainer", default={})
        logger = kwargs.get("logger", config.get("logger"))
        if logger is True:
            kwargs["logger"] = run_loggers(config.get("default_root_dir") or os.getcwd())
        elif not logger:
            # logging off: the LR monitor, which needs a logger, is left out instead of failing the run
            callbacks = self.trainer_defaults.get("callbacks", [])
            self.trainer_defaults = {
                **self.trainer_defaults,
                "callbacks": [c for c in callbacks if not isinstance(c, LearningRateMonitor)],
            }
        return super().instantiate_trainer(**kwargs)


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
            # true: run_loggers(default_root_dir), CSV (+ TensorBoard); a recipe may set false or its own
            "logger": True,
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


def _augment_preview(argv: Sequence[str]) -> int:
    from transferkit.report import augment_preview_main

    return augment_preview_main(argv)


def _predict_images(argv: Sequence[str]) -> int:
    from transferkit.serving import main as predict_main

    return predict_main(argv)


def _export(argv: Sequence[str]) -> int:
    from transferkit.export import main as export_main

    return export_main(argv)


TOOL_COMMANDS["probe"] = (
    "linear probe of the frozen features at every backbone depth, and how deep to unfreeze",
    _probe,
)
TOOL_COMMANDS["plan"] = (
    "print the freeze schedule phase by phase (groups, params, LRs, BN) without training",
    _plan,
)
TOOL_COMMANDS["diagnose"] = (
    "gradient health per layer (vanishing / exploding / dying; saturated units) over a few training batches",
    _diagnose,
)
TOOL_COMMANDS["augment-preview"] = (
    "one training image through the recipe's train pipeline N times, in a grid with the pipeline's text",
    _augment_preview,
)
TOOL_COMMANDS["predict-images"] = (
    "class probabilities of image files/folders from a checkpoint alone, to CSV (unreadable ones listed)",
    _predict_images,
)
TOOL_COMMANDS["export"] = (
    "a checkpoint to ONNX or TorchScript, BatchNorm folded, with <name>.preprocessing.json beside it",
    _export,
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


# YAML tags that construct Python objects (and so can run code); recipes are read with safe loaders,
# which refuse them, and this names the file and the tag before any parsing
_CODE_TAG = re.compile(r"!!python/[\w/.:-]*|!<?tag:yaml\.org,2002:python/[\w/.:-]*>?")


def _refuse_code_in_recipes(args: Sequence[str]) -> str | None:
    """A message if a ``--config`` file uses a YAML tag that builds Python objects, else ``None``."""
    paths = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue  # the parser reports a missing file in its own words
        match = _CODE_TAG.search(text)
        if match:
            line = text.count("\n", 0, match.start()) + 1
            return (
                f"refused recipe '{path}': line {line} uses the YAML tag '{match.group(0)}', which would build "
                "Python objects (and can run code). Recipes are read with a safe YAML loader; write plain "
                "values (strings, numbers, lists, mappings) or class_path/init_args."
            )
    return None


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
    refused = _refuse_code_in_recipes(args)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    TransferKitCLI(**cli_kwargs(None if argv is None else args))
    return 0
