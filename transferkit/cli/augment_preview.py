"""``python -m transferkit augment-preview --config X``: one training image through the train pipeline N times."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from transferkit.cli.recipes import config_paths, load_recipe
from transferkit.errors import ConfigError
from transferkit.reporting.previews import augment_preview, target_text


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit augment-preview",
        description=(
            "Show one training image of a recipe through its train pipeline N times, in a grid with the "
            "pipeline listed under it. Give the recipe with --config (overrides such as --data.pipeline.augment "
            "heavy work as for fit)."
        ),
    )
    parser.add_argument(
        "--out",
        default=None,
        help="the PNG to write (default: <trainer.default_root_dir>/augmentation_preview.png)",
    )
    parser.add_argument("--n", type=int, default=8, help="augmented draws (default: %(default)s)")
    parser.add_argument("--index", type=int, default=0, help="which training image (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    args, recipe_args = parser.parse_known_args(list(argv))
    if not config_paths(recipe_args):
        parser.error("give the recipe with --config recipes/X.yaml.")
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}.")

    recipe = load_recipe(recipe_args, logger=False)
    datamodule = recipe.datamodule
    datamodule.setup("fit")
    train = datamodule.datasets["train"]
    if not 0 <= args.index < len(train):
        raise ConfigError(f"--index {args.index} is outside the training split (0..{len(train) - 1}).")
    label = target_text(datamodule.target_kind, datamodule.class_names, train.labels[args.index])
    item = train.items[args.index]
    where = f" {Path(item).name}," if isinstance(item, str) else ""
    augment = datamodule.settings.pipeline.preset
    setting = f"augment: {augment}" if isinstance(augment, str) else "inline augmentation"
    out = augment_preview(
        datamodule.train_transform,
        train.read(args.index),
        args.out or Path(recipe.trainer.default_root_dir) / "augmentation_preview.png",
        n=args.n,
        image_size=datamodule.image_size,
        seed=args.seed,
        title=f"training image {args.index} ({label},{where} {datamodule.image_size} px): {args.n} draws, {setting}",
    )
    print(f"wrote {out}: training image {args.index} ({label}) through the train pipeline {args.n} times")
    return 0
