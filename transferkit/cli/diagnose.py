"""``python -m transferkit diagnose --config X``: gradient health per layer over a few training batches."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from transferkit.cli.recipes import load_recipe
from transferkit.diagnostics.diagnosis import diagnose

# the trainer settings of the recipe that change what a training step does
_CARRIED = (
    "accelerator",
    "precision",
    "max_epochs",
    "max_steps",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "deterministic",
    "default_root_dir",
)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit diagnose",
        description=(
            "Gradient health per layer (vanishing, incl. saturated units / exploding / dying) over a few training "
            "batches of a recipe. Other options are the recipe's, as for fit (--config X, --lr ...)."
        ),
    )
    parser.add_argument("--batches", type=int, default=5, help="training batches to record (default 5)")
    parser.add_argument(
        "--out", default=None, help="where to write the PNG and JSON (default: trainer.default_root_dir)"
    )
    options, rest = parser.parse_known_args(list(argv))
    if options.batches < 1:
        parser.error(f"--batches must be at least 1, got {options.batches}")

    recipe = load_recipe(rest)
    config = recipe.trainer_config
    settings = {k: config[k] for k in _CARRIED if k in config and config[k] is not None}
    settings["devices"] = 1
    out = Path(options.out or recipe.trainer.default_root_dir)
    report = diagnose(recipe.model, datamodule=recipe.datamodule, batches=options.batches, **settings)
    print(report.table())
    if any(r.verdict == "frozen" for r in report.layers):
        print(
            "frozen layers follow the recipe's freeze_schedule at the start of training; to diagnose the "
            "whole network training, add --model.freeze_schedule null."
        )
    png = report.plot(out / "gradient_health.png")
    js = out / "gradient_health.json"
    report.to_json(js)
    print(f"\nwrote {png} and {js}")
    return 0
