"""Reading a recipe for a tool command: the model, data and trainer it describes, built like ``fit`` does."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.errors import ConfigError

__all__ = [
    "MOVED_KEYS",
    "SHORT_FLAGS",
    "expand_short_flags",
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


# the settings changed most, one short flag away on every training command and recipe tool
SHORT_FLAGS = {
    "--lr": "--model.optimizer.lr",
    "--backbone": "--model.backbone",
    "--dropout": "--model.head.dropout",
    "--epochs": "--trainer.max_epochs",
    "--batch_size": "--data.loader.batch_size",
    "--image_size": "--data.pipeline.image_size",
    "--augment": "--data.pipeline.augment",
    "--root": "--data.root",
    "--seed": "--seed_everything",
}


def expand_short_flags(args: Sequence[str]) -> list[str]:
    """``args`` with each short flag (:data:`SHORT_FLAGS`, as ``--lr 3e-4`` or ``--lr=3e-4``) written as the
    recipe key it stands for (``--model.optimizer.lr 3e-4``).

    Example:
        >>> expand_short_flags(["fit", "--config", "r.yaml", "--lr=3e-4", "--epochs", "5"])
        ['fit', '--config', 'r.yaml', '--model.optimizer.lr=3e-4', '--trainer.max_epochs', '5']
    """
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        out.append(SHORT_FLAGS[flag] + eq + value if flag in SHORT_FLAGS else arg)
    return out


# recipe keys that moved, old -> new: a recipe (or command line) with an old one gets one line naming the new
MOVED_KEYS = {
    "data.feature_cache": "caches.feature_cache",
    "data.trunk_cache": "caches.trunk_cache",
    "data.cache_views": "caches.cache_views",
}
_WHY_MOVED = {
    "caches": "the FreezeAndCache callback owns what the model is fed while the backbone is frozen",
    "model": "the model's settings come in typed groups (head, optimizer, lr_schedule, regularisation, "
    "mixing, prediction, runtime; see transferkit.models.settings)",
    "data": "the data module's settings come in typed groups (split, pipeline, loader, cache; see "
    "transferkit.data.settings)",
}


def _moved_keys() -> dict[str, str]:
    from transferkit.data.settings import FLAT_DATA_KEYS
    from transferkit.models.settings import FLAT_KEYS

    return {
        **MOVED_KEYS,
        **{f"model.{old}": f"model.{group}.{name}" for old, (group, name) in FLAT_KEYS.items()},
        **{f"data.{old}": f"data.{group}.{name}" for old, (group, name) in FLAT_DATA_KEYS.items()},
    }


def _is_group(value: Any) -> bool:
    """Whether a recipe value can be a group: a mapping (or, on the command line, one written inline or a
    file holding one)."""
    if isinstance(value, dict):
        return True
    return isinstance(value, str) and (value.lstrip().startswith("{") or Path(value).is_file())


def refuse_moved_keys(args: Sequence[str]) -> None:
    """Raise :class:`~transferkit.errors.ConfigError` naming the new place of each recipe key that moved
    (:data:`MOVED_KEYS`, and the model's flat settings, now in groups: ``model.lr`` is
    ``model.optimizer.lr``, ``data.batch_size`` is ``data.loader.batch_size``), whether a ``--config`` file or the command line uses it."""
    import yaml

    moved = _moved_keys()
    used: dict[str, str] = {}  # old key -> where
    for path in config_paths(args):
        try:
            recipe = yaml.safe_load(Path(path).read_text(errors="replace"))
        except (OSError, yaml.YAMLError):
            continue  # the parser reports a missing or broken file in its own words
        for old in moved:
            section, key = old.split(".")
            values = recipe.get(section) if isinstance(recipe, dict) else None
            # model.optimizer and model.lr_schedule are groups now; only a name where one goes has moved
            if (
                isinstance(values, dict)
                and key in values
                and not (key in ("optimizer", "lr_schedule") and _is_group(values[key]))
            ):
                used.setdefault(old, f"'{path}'")
    args = list(args)
    for arg, following in zip(args, [*args[1:], None], strict=True):
        name, _, inline = arg.removeprefix("--").partition("=")
        value = inline if "=" in arg else following
        if name in moved and not (name in ("model.optimizer", "model.lr_schedule") and _is_group(value)):
            used.setdefault(name, "the command line")
    if used:
        sections = sorted({moved[old].split(".")[0] for old in used})
        places = "; ".join(f"{old} (in {where}) is now {moved[old]}" for old, where in used.items())
        why = "; ".join(_WHY_MOVED[s] for s in sections)
        new = moved[next(iter(used))]
        first, *rest = new.split(".")  # model.optimizer.lr -> model: {optimizer: {lr: ...}}
        nested = f"{first}: " + "".join(f"{{{part}: " for part in rest) + "..." + "}" * len(rest)
        raise ConfigError(f"{places}: {why}. Write {nested} in the recipe, or --{new} on the command line.")


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
    in from the model's backbone), the Trainer, the trainer section of the parsed config, and the whole
    parsed config as plain values."""

    model: Any
    datamodule: Any
    trainer: Any
    trainer_config: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)


def load_recipe(args: Sequence[str], logger: bool = True) -> Recipe:
    """Parse ``--config X`` and any overrides as ``fit`` does, and build what they describe, without
    running anything. ``logger=False`` builds the Trainer without loggers (a tool that writes no run)."""
    from transferkit.cli.lightning_cli import TransferKitCLI, cli_kwargs

    args = expand_short_flags(args)
    refuse_code_in_recipes(args)
    refuse_moved_keys(args)
    args = list(args) if logger else ["--trainer.logger", "false", *args]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = TransferKitCLI(**cli_kwargs(args), run=False)
    cli.datamodule.use_data_config(cli.model.data_config)  # the backbone's size, mean and std where unset
    config = cli.config.as_dict() if hasattr(cli.config, "as_dict") else dict(cli.config)
    return Recipe(cli.model, cli.datamodule, cli.trainer, dict(cli.config.get("trainer") or {}), config)
