"""``python -m transferkit check-data --config X``: decode every image of a recipe's data and list the bad ones."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from transferkit.cli.recipes import load_recipe
from transferkit.data.checks import check_images


def main(argv: Sequence[str]) -> int:
    recipe = load_recipe(argv, logger=False)
    data = recipe.datamodule.data
    files = sum(isinstance(item, str) for item in data.items)
    console = Console(width=max(Console().width, 120))
    columns = (TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("decoding", total=files)
        bad = check_images(data, progress=lambda n: progress.advance(task, n))
    if not bad:
        console.print(f"all {files} image files of '{data.name}' decode.")
        return 0
    # one plain line per file (no wrapping, no markup): a listing to read, grep or feed to a script
    print(f"{len(bad)} of {files} image files cannot be decoded:")
    for err in bad:
        print(f"{err.path}: {err.reason}")
    print(
        "Fix or remove them, or set data.skip_bad_images=true to leave them out "
        "(a loader then skips each with a warning)."
    )
    return 1
