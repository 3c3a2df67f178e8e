"""``python -m transferkit predict-images``: a checkpoint alone on image files or folders, to CSV."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transferkit.inference.loading import load_model_file
from transferkit.inference.predict import (
    describe_columns,
    list_images,
    predict_images,
    write_predictions_csv,
)
from transferkit.models.prediction import TTA_VIEWS


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit predict-images",
        description=(
            "Predict image files with a transferkit checkpoint (its own eval pipeline, no recipe) and write "
            "a CSV, its columns by the model's kind of target: single label: file, predicted, prob_<class> "
            "per class; multi-label: file, predicted_labels (the labels over their stored thresholds, joined "
            "with ';'), prob_<label> per label; regression: file, predicted_<target> per target (in the "
            "target's units); then [uncertainty], error. What each column means is printed on stderr. "
            "Unreadable images get a row with the reason and are listed on stderr; the others are still "
            "predicted. Exit status 0 when at least one image was predicted, 1 when none could be."
        ),
    )
    parser.add_argument(
        "--ckpt_path",
        "--ckpt-path",
        "--model",
        required=True,
        help="a transferkit .ckpt file, or a model exported with `export` (.onnx, fp32 or int8)",
    )
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
        help="N >= 2 Monte Carlo dropout passes (the head needs dropout); adds an 'uncertainty' column: the "
        "entropy of the class probabilities, or the spread of the label probabilities or values",
    )
    parser.add_argument("--batch-size", "--batch_size", type=int, default=32, help="images per batch")
    args = parser.parse_args(list(argv))
    if args.mc_dropout == 1 or args.mc_dropout < 0:
        parser.error(f"--mc-dropout needs N >= 2 passes (or 0 for off), got {args.mc_dropout}.")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}.")

    model, transform = load_model_file(args.ckpt_path)
    files = list_images(args.images)
    if not files:
        print(f"error: no image files found in {', '.join(args.images)}.", file=sys.stderr)
        return 1
    rows = predict_images(
        model, transform, files, tta=args.tta, mc_dropout=args.mc_dropout, batch_size=args.batch_size
    )
    groups = list(model.class_groups) if getattr(model, "class_groups", None) else None
    out = write_predictions_csv(
        rows,
        model.class_names,
        args.out,
        uncertainty=bool(args.mc_dropout),
        groups=groups,
        kind=model.task.kind,
    )
    failed = [row for row in rows if row["error"]]
    predicted = len(rows) - len(failed)
    print(f"predicted {predicted} of {len(rows)} images -> {out}", file=sys.stderr)
    for line in describe_columns(model, uncertainty=bool(args.mc_dropout)):
        print(f"  {line}", file=sys.stderr)
    if failed:
        print(
            f"{len(failed)} images could not be predicted (rows with an 'error' in the CSV):", file=sys.stderr
        )
        for row in failed[:20]:
            print(f"  {row['file']}: {row['error']}", file=sys.stderr)
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more", file=sys.stderr)
    return 0 if predicted else 1
