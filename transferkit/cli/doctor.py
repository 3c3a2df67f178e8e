"""``python -m transferkit doctor --config X``: likely label issues, near-duplicates and outliers of a recipe's
data, each as a ranked CSV with a PNG grid, and a summary table (:func:`transferkit.tuning.doctor.doctor`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from transferkit.cli.recipes import load_recipe
from transferkit.tuning.doctor import DUPLICATE_SIMILARITY, OUTLIER_RATIO, doctor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit doctor",
        description="Find likely label issues (out-of-fold), near-duplicates (within and across splits) and "
        "outliers in a recipe's data. The recipe's other settings (--config, --data.*) as for finetune.",
    )
    parser.add_argument(
        "--out", default=None, help="folder for the CSVs and grids (default: <run dir>/doctor)"
    )
    parser.add_argument(
        "--cv", default=None, help="output folder of `cv` on this recipe: its out-of-fold probabilities"
    )
    parser.add_argument("--folds", type=int, default=5, help="folds of the features' logistic regression")
    parser.add_argument(
        "--similarity",
        type=float,
        default=DUPLICATE_SIMILARITY,
        help="cosine similarity of near-duplicates' centred hashes",
    )
    parser.add_argument(
        "--outlier-ratio", type=float, default=OUTLIER_RATIO, help="distance, in class spreads, of an outlier"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args, rest = _parser().parse_known_args(list(argv))
    if not 0 < args.similarity <= 1:
        raise SystemExit(f"--similarity is a cosine similarity in (0, 1], got {args.similarity}.")
    if args.folds < 2:
        raise SystemExit(f"--folds must be at least 2 (out-of-fold predictions), got {args.folds}.")
    recipe = load_recipe(rest, logger=False)
    dm = recipe.datamodule
    root = recipe.trainer.default_root_dir
    out = args.out or os.path.join(root, "doctor")
    cache_dir = dm.settings.cache.dir or os.path.join(root, "feature_cache")
    report = doctor(
        recipe.model,
        dm,
        out,
        cv_dir=args.cv,
        folds=args.folds,
        similarity=args.similarity,
        outlier_ratio=args.outlier_ratio,
        cache_dir=cache_dir,
    )
    console = Console(width=max(Console().width, 120))
    table = Table(
        title=f"doctor: {len(report.images)} images of '{dm.data.name}' in {report.seconds['total']:.0f} s"
    )
    for column in ("finding", "count", "written to"):
        table.add_column(column)
    for row in report.summary():
        table.add_row(*row)
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    if report.label_issues:
        console.print(
            f"to train without the listed images: --data.split.exclude {report.out / 'label_issues.csv'} "
            "(action: relabel in a row gives it the suggested label instead; the test split is never changed)"
        )
    return 0
