"""``python -m transferkit predict-images``: a checkpoint alone on image files or folders, to CSV."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transferkit.inference.loading import load_for_inference
from transferkit.inference.predict import list_images, predict_images, write_predictions_csv
from transferkit.models.prediction import TTA_VIEWS


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit predict-images",
        description=(
            "Predict image files with a transferkit checkpoint (its own eval pipeline, no recipe) and write "
            "a CSV: file, predicted, prob_<class> per class, [uncertainty], error. Unreadable images get a "
            "row with the reason and are listed on stderr; the others are still predicted. Exit status 0 "
            "when at least one image was predicted, 1 when none could be."
        ),
    )
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a transferkit .ckpt file")
    parser.add_argument(
        "--images", nargs="+", required=True, help="image files and/or folders (searched recursively)"
    )
    parser.add_argument("--out", default="predictions.csv", help="the CSV to write (default: %(default)s)")
    parser.add_argument(
        "--tta",
        choices=list(TTA_VIEWS),
        default=None,
        help="test-time augmentation (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--mc-dropout",
        "--mc_dropout",
        type=int,
        default=0,
        metavar="N",
        help="N >= 2 Monte Carlo dropout passes; adds an 'uncertainty' (entropy) column",
    )
    parser.add_argument("--batch-size", "--batch_size", type=int, default=32, help="images per batch")
    args = parser.parse_args(list(argv))
    if args.mc_dropout == 1 or args.mc_dropout < 0:
        parser.error(f"--mc-dropout needs N >= 2 passes (or 0 for off), got {args.mc_dropout}.")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}.")

    model, transform = load_for_inference(args.ckpt_path)
    files = list_images(args.images)
    if not files:
        print(f"error: no image files found in {', '.join(args.images)}.", file=sys.stderr)
        return 1
    rows = predict_images(
        model, transform, files, tta=args.tta, mc_dropout=args.mc_dropout, batch_size=args.batch_size
    )
    groups = list(model.class_groups) if getattr(model, "class_groups", None) else None
    out = write_predictions_csv(
        rows, model.class_names, args.out, uncertainty=bool(args.mc_dropout), groups=groups
    )
    failed = [row for row in rows if row["error"]]
    predicted = len(rows) - len(failed)
    print(f"predicted {predicted} of {len(rows)} images -> {out}", file=sys.stderr)
    if failed:
        print(
            f"{len(failed)} images could not be predicted (rows with an 'error' in the CSV):", file=sys.stderr
        )
        for row in failed[:20]:
            print(f"  {row['file']}: {row['error']}", file=sys.stderr)
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more", file=sys.stderr)
    return 0 if predicted else 1
