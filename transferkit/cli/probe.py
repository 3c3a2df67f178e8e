"""``python -m transferkit probe --config X``: a linear probe of the frozen features after every group
(scored by accuracy, mAP or R^2, by the data's kind of target)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from transferkit.cli.recipes import load_recipe
from transferkit.tuning.probing import METRIC_LABELS, probe


def main(argv: Sequence[str]) -> int:
    recipe = load_recipe(argv, logger=False)
    dm = recipe.datamodule
    # the recipe's cache folder, under its run directory: a second probe of the same data reads it
    cache_dir = dm.settings.cache.dir or os.path.join(recipe.trainer.default_root_dir, "feature_cache")
    report = probe(recipe.model, dm, cache_dir)

    title = (
        f"linear probe per depth: {report.backbone} on {dm.data.name} "
        f"({report.train_images} train / {report.val_images} val images)"
    )
    table = Table(title=title)
    label = METRIC_LABELS.get(report.results[0].metric, report.results[0].metric)
    scores = (f"train {label}", f"val {label}")  # accuracy, mAP or R^2, by the kind of target
    for column in ("group", "output of", "width", *scores):
        table.add_column(column, justify="right" if column in ("width", *scores) else "left")
    best = max(r.val_score for r in report.results)
    for r in report.results:
        mark = " *" if r.val_score == best else ""
        table.add_row(
            f"g{r.group}", r.module, str(r.width), f"{r.train_score:.3f}", f"{r.val_score:.3f}{mark}"
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(f"suggestion: {report.suggestion}")
    return 0
