"""``python -m transferkit``: LightningCLI training commands plus transferkit's own tools.

Training commands (``fit``, ``validate``, ``test``, ``predict``, ``finetune``) take YAML recipes with
``--config recipes/X.yaml``; every field can be overridden on the command line
(``--model.optimizer.lr 3e-4``), the most used ones by a short flag (``--lr 3e-4``, see
:data:`transferkit.cli.recipes.SHORT_FLAGS`), and ``--print_config`` shows the resolved recipe. Each tool is a module of this package whose
``main(argv) -> exit status`` is a thin layer around a plain function of the library (``tk.plan``, ``tk.probe``, ``tk.diagnose`` ...).

An error transferkit raises for a person (bad data, a refused recipe value, an unusable checkpoint) ends
any command with one ``error: <message>`` block and exit status 2, without a traceback;
``TRANSFERKIT_TRACEBACK=1`` (or ``--traceback`` anywhere on the command line) shows it.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import time
import traceback
import warnings
from collections.abc import Sequence

__all__ = ["TOOL_COMMANDS", "TRAINING_COMMANDS", "main"]

TRAINING_COMMANDS = {
    "fit": "train a model (LightningCLI fit)",
    "validate": "evaluate on the validation split",
    "test": "evaluate on the test split",
    "predict": "predict class probabilities",
    "finetune": "fit, test the best checkpoint, write metrics.json and report.md (curves, confusion, augmentation)",
}

# tool command -> the module of this package whose main(argv) runs it, in --help order
TOOL_COMMANDS = {
    "auto": "auto",
    "probe": "probe",
    "plan": "plan",
    "lr-find": "lr_find",
    "cv": "cv",
    "diagnose": "diagnose",
    "augment-preview": "augment_preview",
    "augment-search": "augment_search",
    "predict-images": "predict_images",
    "interpret": "interpret",
    "export": "export",
    "serve": "serve",
    "check-data": "check_data",
    "doctor": "doctor",
    "pack-data": "pack_data",
}

# the one-line help of each tool, here so that --help imports no tool (and so neither torch nor Lightning)
_TOOL_HELP = {
    "auto": "plan a run that fits a time budget on this machine (--budget 10m), write it as a recipe, train, test, report",
    "probe": "linear probe of the frozen features at every backbone depth, and how deep to unfreeze",
    "plan": "print the freeze schedule phase by phase (groups, params, LRs, BN) without training",
    "lr-find": "learning-rate range test per phase of the freeze schedule: suggestions, why, and lr_find.png",
    "cv": "stratified k-fold cross-validation: per-fold and mean +- std figures, out-of-fold predictions, --ensemble",
    "diagnose": "gradient health per layer (vanishing / exploding / dying; saturated units) over a few training batches",
    "augment-search": "rank candidate augmentations and policies against the recipe's by validation loss, in a time budget",
    "augment-preview": "one training image through the recipe's train pipeline N times, in a grid with the pipeline's text",
    "predict-images": "predictions of image files/folders (classes, labels over their thresholds, or values) from a checkpoint alone, to CSV",
    "interpret": "top losses with Grad-CAM, per-class table, normalised confusion, calibration (ECE, reliability) of a checkpoint",
    "export": "a checkpoint to ONNX or TorchScript, BatchNorm folded, with <name>.preprocessing.json; --quantize int8",
    "serve": "an HTTP server for a checkpoint or exported model: POST /predict, /health, /info, a page to try it",
    "check-data": "decode every image of the recipe's data (threads, progress bar) and list each bad file with its reason",
    "doctor": "likely label issues (out-of-fold), near-duplicates across splits and outliers: ranked CSVs, PNG grids",
    "pack-data": "the recipe's data, split, as a LitData streaming pack (a folder to train from, or to upload to S3/GCS)",
}


def _overview() -> str:
    from transferkit.cli.recipes import SHORT_FLAGS  # light: no torch, no Lightning

    lines = [
        "usage: python -m transferkit COMMAND [options]",
        "",
        "Fine-tune pretrained image models on small datasets, offline.",
        "",
        "training commands (LightningCLI; --config recipes/X.yaml, any field overridable, --print_config):",
    ]
    lines += [f"  {name:<16}{text}" for name, text in TRAINING_COMMANDS.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<16}{_TOOL_HELP[name]}" for name in TOOL_COMMANDS]
    lines += [
        "",
        "short flags (training commands and the recipe tools): "
        + ", ".join(f"{short} = {full}" for short, full in SHORT_FLAGS.items()),
        "python -m transferkit COMMAND --help shows a command's options.",
        "TRANSFERKIT_TRACEBACK=1 (or --traceback) shows the traceback of an error.",
    ]
    return "\n".join(lines)


def _run(args: list[str]) -> int:
    command = args[0]
    if command in TOOL_COMMANDS:
        tool = importlib.import_module(f"transferkit.cli.{TOOL_COMMANDS[command]}")
        return tool.main(args[1:])
    if command not in TRAINING_COMMANDS and not command.startswith("-"):
        print(f"unknown command '{command}'.\n\n{_overview()}", file=sys.stderr)
        return 2
    from transferkit.cli.lightning_cli import TransferKitCLI, cli_kwargs
    from transferkit.cli.recipes import expand_short_flags, refuse_code_in_recipes, refuse_moved_keys

    args = expand_short_flags(args)
    refuse_code_in_recipes(args)
    refuse_moved_keys(args)
    with warnings.catch_warnings():
        # LightningCLI warns when it gets args while sys.argv holds arguments too: main passes it the
        # arguments it read from sys.argv (less --traceback), so the two are the same command line
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        TransferKitCLI(**cli_kwargs(args))
    return 0


def _ckpt_path(args: Sequence[str]) -> str | None:
    args = list(args)
    for a, b in zip(args, [*args[1:], None], strict=True):
        if a in ("--ckpt_path", "--ckpt-path"):
            return b
        if a.startswith(("--ckpt_path=", "--ckpt-path=")):
            return a.split("=", 1)[1]
    return None


#: ``time.time()`` when :func:`main` last started a command (``auto`` counts its budget from there)
STARTED_AT: float | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m transferkit`` and the ``transferkit`` script; returns the exit status."""
    global STARTED_AT
    STARTED_AT = time.time()
    args = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in args or os.environ.get("TRANSFERKIT_TRACEBACK", "0") not in ("", "0")
    args = [a for a in args if a != "--traceback"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    from transferkit.errors import TransferKitError

    try:
        return _run(args)
    except (TransferKitError, pickle.UnpicklingError) as err:
        if isinstance(err, pickle.UnpicklingError):  # LightningCLI read a --ckpt_path holding pickled code
            from transferkit.models.checkpoint import refused_pickle

            err = refused_pickle(_ckpt_path(args), err, action="resume from" if args[0] == "fit" else "load")
        if show_traceback:
            traceback.print_exc()
        message = str(err).rstrip()
        print(f"error: {message}", file=sys.stderr)
        if not show_traceback:
            print("(TRANSFERKIT_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2
