"""Reading a recipe for a tool command: the model, data and trainer it describes, built like ``fit`` does."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.errors import ConfigError

__all__ = ["Recipe", "config_paths", "load_recipe", "refuse_code_in_recipes"]

# YAML tags that construct Python objects (and so can run code); recipes are read with safe loaders,
# which refuse them, and this names the file and the tag before any parsing
_CODE_TAG = re.compile(r"!!python/[\w/.:-]*|!<?tag:yaml\.org,2002:python/[\w/.:-]*>?")


def config_paths(args: Sequence[str]) -> list[str]:
    """The files given with ``--config`` (as ``--config X`` or ``--config=X``)."""
    args = list(args)
    paths = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    return paths + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]


def refuse_code_in_recipes(args: Sequence[str]) -> None:
    """Raise :class:`~transferkit.errors.ConfigError` if a ``--config`` file uses a YAML tag that builds
    Python objects, naming the file, the line and the tag."""
    for path in config_paths(args):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue  # the parser reports a missing file in its own words
        match = _CODE_TAG.search(text)
        if match:
            line = text.count("\n", 0, match.start()) + 1
            raise ConfigError(
                f"refused recipe '{path}': line {line} uses the YAML tag '{match.group(0)}', which would build "
                "Python objects (and can run code). Recipes are read with a safe YAML loader; write plain "
                "values (strings, numbers, lists, mappings) or class_path/init_args."
            )


@dataclass
class Recipe:
    """What a recipe describes, built: the model, the data module (its image size, mean and std filled
    in from the model's backbone), the Trainer, and the trainer section of the parsed config."""

    model: Any
    datamodule: Any
    trainer: Any
    trainer_config: dict[str, Any]


def load_recipe(args: Sequence[str], logger: bool = True) -> Recipe:
    """Parse ``--config X`` and any overrides as ``fit`` does, and build what they describe, without
    running anything. ``logger=False`` builds the Trainer without loggers (a tool that writes no run)."""
    from transferkit.cli.lightning_cli import TransferKitCLI, cli_kwargs

    refuse_code_in_recipes(args)
    args = list(args) if logger else ["--trainer.logger", "false", *args]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = TransferKitCLI(**cli_kwargs(args), run=False)
    cli.datamodule.use_data_config(cli.model.data_config)
    return Recipe(cli.model, cli.datamodule, cli.trainer, dict(cli.config.get("trainer") or {}))
