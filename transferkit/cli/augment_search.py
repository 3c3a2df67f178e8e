"""``python -m transferkit augment-search --config X --budget 20m``: which augmentations help on this data."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import yaml

from transferkit.cli.recipes import config_paths, load_recipe
from transferkit.errors import ConfigError
from transferkit.tuning.augment_search import augment_search


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit augment-search",
        description=(
            "Rank candidate augmentations and policies against the recipe's own pipeline by validation loss, "
            "each trial training the recipe's head on augmented cached backbone features (cheap: no "
            "fine-tuning run per candidate), every candidate on the same seeds. Prints the table, writes "
            "augment_search.png/.json and the winning pipeline as augment_search.yaml."
        ),
    )
    parser.add_argument("--budget", default="20m", help="time for the whole search: 20m, 90s, 1h")
    parser.add_argument("--candidates", default=None, help="a YAML file with a list of augment items to try")
    parser.add_argument("--epochs", type=int, default=3, help="head epochs per trial (default: %(default)s)")
    parser.add_argument(
        "--views", type=int, default=2, help="augmented views per image (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="seeds per candidate (default: %(default)s)")
    parser.add_argument(
        "--out", default="augment_search", help="folder for the results (default: %(default)s)"
    )
    args, recipe_args = parser.parse_known_args(list(argv))
    if not config_paths(recipe_args):
        parser.error("give the recipe with --config recipes/X.yaml.")
    candidates = None
    if args.candidates is not None:
        candidates = yaml.safe_load(Path(args.candidates).read_text())
        if not isinstance(candidates, list):
            raise ConfigError(
                f"{args.candidates} must hold a YAML list of augment items, got {type(candidates).__name__}."
            )
    recipe = load_recipe(recipe_args, logger=False)
    report = augment_search(
        recipe.model,
        recipe.datamodule,
        budget=args.budget,
        candidates=candidates,
        epochs=args.epochs,
        views=args.views,
        repeats=args.repeats,
        out=args.out,
        cache_dir=Path(recipe.trainer.default_root_dir) / "feature_cache",
    )
    print(report.table())
    print(
        f"\nwrote {report.png} and {Path(args.out) / 'augment_search.yaml'}; the winner as a recipe snippet:"
    )
    print(report.snippet)
    return 0
