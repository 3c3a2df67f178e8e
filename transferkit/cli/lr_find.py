"""``python -m transferkit lr-find --config X``: learning rates found by a range test, phase by phase."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from transferkit.cli.recipes import config_paths, load_recipe
from transferkit.training.feeding import FreezeAndCache
from transferkit.training.lr_finder import lr_find


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit lr-find",
        description=(
            "Range-test the learning rates of a recipe: the head's in the frozen phase (on the feature cache "
            "when it is on) and, for a recipe that unfreezes, the top backbone group's at the first unfreeze "
            "(layer decay kept). Prints each suggestion and why, and writes the curves to a PNG. Give the "
            "recipe with --config (overrides such as --model.optimizer.layer_decay 0.5 work as for fit)."
        ),
    )
    parser.add_argument(
        "--out", default=None, help="the PNG to write (default: <trainer.default_root_dir>/lr_find.png)"
    )
    parser.add_argument("--steps", type=int, default=100, help="steps per sweep (default: %(default)s)")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="lowest rate tried (default: %(default)s)")
    parser.add_argument("--max-lr", type=float, default=1.0, help="highest rate tried (default: %(default)s)")
    args, recipe_args = parser.parse_known_args(list(argv))
    if not config_paths(recipe_args):
        parser.error("give the recipe with --config recipes/X.yaml.")
    recipe = load_recipe(recipe_args, logger=False)
    report = lr_find(
        recipe.model,
        recipe.datamodule,
        steps=args.steps,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        # beside the recipe's runs, as every other picture, not in whatever folder the command ran in
        out=Path(args.out or Path(recipe.trainer.default_root_dir) / "lr_find.png"),
        root_dir=recipe.trainer.default_root_dir,
        caches=next((c for c in recipe.trainer.callbacks if isinstance(c, FreezeAndCache)), None),
    )
    print(report)
    fields = ", ".join(f"model.optimizer.{name}: {value:.3g}" for name, value in report.values.items())
    print(
        f"wrote {report.png}. In the recipe: {fields or 'nothing found (see above)'} (or model.optimizer.lr: auto)."
    )
    return 0 if report.values else 1
