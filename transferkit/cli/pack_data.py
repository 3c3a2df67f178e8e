"""``python -m transferkit pack-data --config X --out DIR``: a recipe's data, split, as a streaming pack."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from transferkit.cli.recipes import config_paths, load_recipe


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit pack-data",
        description=(
            "Write a recipe's data (its train/val/test splits, with the recipe's seed and fractions) to a "
            "local folder in LitData's streaming format, every file decoded once on the way. Train from it "
            "with data.source=stream and data.root=DIR, or upload DIR to an object store and set data.root "
            "to its URL (s3://...)."
        ),
    )
    parser.add_argument("--out", required=True, help="a new or empty folder to write the pack to")
    parser.add_argument("--chunk-bytes", default="64MB", help="size of each chunk (default: %(default)s)")
    args, recipe_args = parser.parse_known_args(list(argv))
    if not config_paths(recipe_args):
        parser.error("give the recipe with --config recipes/X.yaml.")

    from transferkit.data.stream import pack_stream

    recipe = load_recipe(recipe_args, logger=False)
    datamodule = recipe.datamodule
    datamodule.setup("fit")
    total = sum(len(v) for v in datamodule.split_indices.values())
    console = Console(width=max(Console().width, 120))
    columns = (TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("packing", total=total)
        result = pack_stream(
            datamodule, args.out, chunk_bytes=args.chunk_bytes, progress=lambda n: progress.advance(task, n)
        )
    counts = ", ".join(f"{split} {len(labels)}" for split, labels in result["meta"]["splits"].items())
    print(
        f"packed {counts} images of {len(result['meta']['class_names'])} classes into {args.out} "
        f"({result['bytes'] / 1e6:.1f} MB)."
    )
    if result["skipped"]:
        print(f"left out {len(result['skipped'])} files that cannot be decoded (skip_bad_images=true):")
        for err in result["skipped"]:
            print(f"{err.path}: {err.reason}")
    print(f"train from it with: --data.source stream --data.root {args.out}")
    return 0
