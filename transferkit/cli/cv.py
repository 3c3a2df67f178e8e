"""``python -m transferkit cv --config X --folds 5 [--ensemble] [--out DIR]``: stratified k-fold
cross-validation of a recipe, of any kind of target (single label, multi-label, regression)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transferkit.cli.recipes import config_paths, load_recipe
from transferkit.tuning.cross_validation import DEFAULT_FOLDS, cross_validate

# trainer settings that change what is shown or where files go, not what a fold learns
_DISPLAY = ("default_root_dir", "enable_progress_bar", "enable_model_summary", "logger")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit cv",
        description=(
            "Stratified k-fold cross-validation of the recipe over its non-test images: fold i validates on "
            "the i-th part and trains on the rest, each a full run in DIR/fold_i/. Prints and writes the "
            "per-fold figures of the recipe's kind of target (accuracy and F1; mAP, F1 and AUROC of labels; "
            "MAE, RMSE and R^2 of numbers) with their mean and std (cv.json, cv.csv) and the out-of-fold "
            "predictions (oof_predictions.csv). The test split stays the recipe's and is not scored without "
            "--ensemble. Run the same command again to resume a stopped cross-validation."
        ),
        epilog="The recipe: --config recipes/X.yaml, and any field overridden as for fit (--model.optimizer.lr 3e-4, or --lr 3e-4).",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help="number of folds (default: the recipe's data.split.cv_folds, else 5)",
    )
    parser.add_argument(
        "--ensemble",
        action="store_true",
        help="also score the fold models on the test split, alone and as an ensemble (their class or label "
        "probabilities, or values, averaged)",
    )
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="the fold model scored on its validation part: the best by the recipe's monitor (default), or "
        "the last epoch's, every fold training all its epochs (no early stopping), to compare recipes",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder of the cross-validation; the same DIR resumes it (default: <trainer.default_root_dir>/cv)",
    )
    args, recipe_args = parser.parse_known_args(list(argv))
    if not config_paths(recipe_args):
        parser.error("give the recipe with --config recipes/X.yaml.")
    recipe = load_recipe(recipe_args, logger=False)
    out = Path(args.out) if args.out else Path(recipe.trainer.default_root_dir) / "cv"
    folds = (
        args.folds if args.folds is not None else recipe.datamodule.settings.split.cv_folds or DEFAULT_FOLDS
    )

    def fold_trainer(fold: int, folder: Path) -> Any:
        # the recipe's own trainer (loggers, checkpoint and early-stopping sections) writing into the fold's
        # folder; the fold's data settings are given too, so the config.yaml it saves is the fold's recipe
        fold_args = ["--trainer.default_root_dir", str(folder), "--data.split.cv_folds", str(folds)]
        return load_recipe([*recipe_args, *fold_args, "--data.split.cv_fold", str(fold)]).trainer

    report = cross_validate(
        recipe.model,
        recipe.datamodule,
        folds=folds,
        out=out,
        ensemble=args.ensemble,
        trainer=fold_trainer,
        checkpoint=args.checkpoint,
        # the recipe's seed_everything, which Lightning keeps in PL_GLOBAL_SEED; the data's seed without one
        seed=int(os.environ.get("PL_GLOBAL_SEED", recipe.datamodule.seed)),
        recipe={
            "trainer": {k: v for k, v in recipe.trainer_config.items() if k not in _DISPLAY},
            "callbacks": _callback_settings(recipe.trainer),
        },
    )
    print(report.table())
    print(f"\nwrote {out / 'cv.json'}, {out / 'cv.csv'} and {report.oof_csv}")
    return 0


def _callback_settings(trainer: Any) -> list[dict[str, Any]]:
    """The settings of the recipe's early stopping and checkpoint callbacks that decide what a fold learns
    (they are not in the trainer section: the recipe's ``early_stopping`` and ``checkpoint`` keys)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    names = ("monitor", "mode", "patience", "min_delta", "save_top_k")
    return [
        {"type": type(c).__name__, **{n: getattr(c, n) for n in names if hasattr(c, n)}}
        for c in trainer.callbacks
        if isinstance(c, EarlyStopping | ModelCheckpoint)
    ]
