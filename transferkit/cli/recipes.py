"""Reading a recipe for a tool command: the model, data and trainer it describes, built like ``fit`` does."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.errors import ConfigError

__all__ = [
    "MOVED_KEYS",
    "Recipe",
    "config_paths",
    "load_recipe",
    "refuse_code_in_recipes",
    "refuse_moved_keys",
]

# YAML tags that construct Python objects (and so can run code); recipes are read with safe loaders,
# which refuse them, and this names the file and the tag before any parsing
_CODE_TAG = re.compile(r"!!python/[\w/.:-]*|!<?tag:yaml\.org,2002:python/[\w/.:-]*>?")


def config_paths(args: Sequence[str]) -> list[str]:
    """The files given with ``--config`` (as ``--config X`` or ``--config=X``)."""
    args = list(args)
    paths = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    return paths + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]


# recipe keys that moved, old -> new: a recipe (or command line) with an old one gets one line naming the new
MOVED_KEYS = {
    "data.feature_cache": "caches.feature_cache",
    "data.trunk_cache": "caches.trunk_cache",
    "data.cache_views": "caches.cache_views",
}
_WHY_MOVED = {
    "caches": "the FreezeAndCache callback owns what the model is fed while the backbone is frozen",
}


def refuse_moved_keys(args: Sequence[str]) -> None:
    """Raise :class:`~transferkit.errors.ConfigError` naming the new place of a recipe key that moved
    (:data:`MOVED_KEYS`), whether a ``--config`` file or the command line uses it."""
    import yaml

    used: list[tuple[str, str]] = []  # (old key, where)
    for path in config_paths(args):
        try:
            recipe = yaml.safe_load(Path(path).read_text(errors="replace"))
        except (OSError, yaml.YAMLError):
            continue  # the parser reports a missing or broken file in its own words
        for old in MOVED_KEYS:
            section, key = old.split(".")
            if isinstance(recipe, dict) and isinstance(recipe.get(section), dict) and key in recipe[section]:
                used.append((old, f"'{path}'"))
    for arg in args:
        name = arg.split("=", 1)[0].removeprefix("--")
        if name in MOVED_KEYS:
            used.append((name, "the command line"))
    if used:
        old, where = used[0]
        new = MOVED_KEYS[old]
        raise ConfigError(
            f"{old} (in {where}) is now {new}: {_WHY_MOVED[new.split('.')[0]]}. Write {new.split('.')[0]}: "
            f"{{{new.split('.')[1]}: ...}} in the recipe, or --{new} on the command line."
        )


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
    refuse_moved_keys(args)
    args = list(args) if logger else ["--trainer.logger", "false", *args]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = TransferKitCLI(**cli_kwargs(args), run=False)
    cli.datamodule.use_data_config(cli.model.data_config)  # the backbone's size, mean and std where unset
    return Recipe(cli.model, cli.datamodule, cli.trainer, dict(cli.config.get("trainer") or {}))
