"""``python -m transferkit interpret --ckpt_path M.ckpt [--config X | --images DIR --labels CSV]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from transferkit.cli.recipes import config_paths, load_recipe
from transferkit.models.checkpoint import preprocessing_of, read_checkpoint
from transferkit.reporting.interpretation import interpret, labelled_images


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit interpret",
        description=(
            "What a trained model gets wrong and how far to trust its probabilities: the top losses and the "
            "most confident correct images with Grad-CAM overlays, a per-class table (precision, recall, F1, "
            "support), the row-normalised confusion matrix, a reliability diagram with the expected calibration "
            "error before and after temperature scaling, and for two classes the ROC and precision-recall "
            "curves. A multi-label model: the per-label table (AP, AUROC, F1 at its threshold), each label's "
            "confusion, and the top losses with Grad-CAM per predicted label. A regression model: MAE, RMSE and "
            "R^2 per target, predicted against true, and the largest errors with Grad-CAM. Data: the recipe's "
            "split (--config X, test by default) or labelled files (--images DIR --labels CSV: a 'path' column, "
            "and a 'label' column; multi-label, a 'labels' column of names separated by ';' or a 0/1 column per "
            "label; regression, a column per target, named as the model names them). Writes PNGs, "
            "interpretation.json and interpretation.md into --out."
        ),
    )
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a transferkit .ckpt file")
    parser.add_argument("--images", default=None, help="folder of labelled images (with --labels)")
    parser.add_argument(
        "--labels",
        default=None,
        help="CSV with 'path' (relative to --images) and the targets: 'label'; 'labels' (multi-label); a "
        "column per target (regression)",
    )
    parser.add_argument(
        "--split", choices=["test", "val"], default="test", help="with --config (default: test)"
    )
    parser.add_argument(
        "--out", default=None, help="folder for the results (default: <checkpoint>_interpretation)"
    )
    parser.add_argument("--count", type=int, default=8, help="images per grid (default: %(default)s)")
    parser.add_argument("--no-gradcam", "--no_gradcam", action="store_true", help="leave Grad-CAM out")
    args, recipe_args = parser.parse_known_args(list(argv))
    has_recipe = bool(config_paths(recipe_args))
    if has_recipe == (args.images is not None):
        parser.error("give either --config recipes/X.yaml or --images DIR --labels CSV.")
    if (args.images is None) != (args.labels is None):
        parser.error("--images and --labels go together: the folder and the CSV that labels its files.")
    if args.images is not None and args.split != "test":
        parser.error("--split is for --config; labelled files are interpreted as one split.")
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}.")

    from transferkit.inference.loading import load_for_inference

    model, transform = load_for_inference(args.ckpt_path)
    if has_recipe:
        data = load_recipe(recipe_args, logger=False).datamodule
        data.setup("fit" if args.split == "val" else "test")
    else:
        preprocessing = preprocessing_of(read_checkpoint(args.ckpt_path))
        data = labelled_images(
            args.images,
            args.labels,
            model.class_names,
            transform,
            preprocessing["mean"],
            preprocessing["std"],
            kind=model.task.kind,
        )
    out = (
        Path(args.out)
        if args.out
        else Path(args.ckpt_path).with_name(f"{Path(args.ckpt_path).stem}_interpretation")
    )
    report = interpret(model, data, args.split, out=out, count=args.count, gradcam=not args.no_gradcam)
    print(report.table())
    for problem in report.problems:
        print(f"note: {problem}")
    print(f"\nwrote {report.markdown} and its pictures in {out}")
    return 0
