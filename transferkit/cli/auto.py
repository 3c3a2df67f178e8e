"""``python -m transferkit auto --data.source folder --data.root DIR --budget 10m``: plan a fine-tuning run that fits
a wall-clock budget on this machine, write it as a recipe, then train, test and report like ``finetune``.

The budget counts from the command's start to the printed results. ``--plan-only`` prints the plan and writes
the recipe without training. A run stopped by Ctrl+C restarts from the beginning when run again (the caches it
stored in ``--out`` are reused); ``finetune --config <out>/auto-recipe.yaml --ckpt_path <interrupted.ckpt>``
finishes the plan without a budget instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from transferkit.cli.recipes import load_recipe
from transferkit.errors import ConfigError
from transferkit.tuning.auto import LADDER, AutoPlan, auto_plan, load_ladder, parse_budget, recipe_for

RECIPE_NAME = "auto-recipe.yaml"
PLAN_NAME = "auto-plan.json"
# what auto decides itself; the written recipe is where to change it (then run finetune on it)
_CHOSEN = ("--model.", "--trainer.", "--caches.", "--early_stopping.", "--checkpoint.")


def command_start() -> float:
    """``time.time()`` when this command started: the process's start (Linux's /proc), so that interpreter
    start-up counts against the budget, when the process was started to run it; else when
    :func:`transferkit.cli.main` was called (a command run from Python, inside a longer-lived process)."""
    import transferkit.cli

    called = transferkit.cli.STARTED_AT or time.time()
    process = _process_start()
    return process if process is not None and 0 <= called - process < 10 else called


def _process_start() -> float | None:
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit auto",
        description="Plan a fine-tuning run that fits a wall-clock budget on this machine, write it as a recipe, "
        "then train, test and report like finetune. Data settings are a recipe's (--data.source, --data.root, "
        "--data.csv_path, --data.target.kind ...); a --config contributes its data section and seed only.",
    )
    parser.add_argument("--budget", required=True, help="start to printed results: 600, 600s, 10m or 1.5h")
    parser.add_argument(
        "--plan-only", action="store_true", help="print the plan and write the recipe; no training"
    )
    parser.add_argument(
        "--out", default="runs/auto", help="run folder: the recipe, the plan, caches, checkpoints"
    )
    parser.add_argument(
        "--rules", default=None, help="a YAML ladder of rungs, cheapest first (default: the built-in)"
    )
    return parser


def _say_what_a_config_gives(args: Sequence[str]) -> None:
    """A ``--config`` recipe gives auto its data section and seed; say which of its other sections the plan
    replaces, so that none is dropped unsaid."""
    import yaml

    from transferkit.cli.recipes import config_paths

    for path in config_paths(args):
        try:
            recipe = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue  # the recipe parser reports it in its own words
        replaced = sorted(k for k in (recipe or {}) if k not in ("data", "seed_everything"))
        if replaced:
            print(
                f"auto: from '{path}' it takes the data section and the seed; the plan replaces its "
                f"{', '.join(replaced)} (edit <out>/{RECIPE_NAME} to change what auto chose)",
                file=sys.stderr,
            )


def _template(out: Path) -> Path:
    """A recipe holding auto's model and trainer, from which the user's data settings are parsed."""
    import yaml

    recipe = recipe_for(LADDER[0], {}, root_dir=str(out))
    del recipe["data"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, prefix="auto-template-") as handle:
        yaml.safe_dump(recipe, handle, sort_keys=False)
    return Path(handle.name)


def _print_plan(plan: AutoPlan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    sizes = plan.sizes
    rungs = Table(title=f"auto: rungs weighed for a {plan.budget_s:.0f} s budget (cheapest first)")
    for column in ("rung", "predicted s", "fits"):
        rungs.add_column(column)
    for row in plan.considered:
        predicted = "-" if row["predicted_s"] is None else f"{row['predicted_s']:.0f}"
        rungs.add_row(row["rung"], predicted, "yes" if row.get("fits") else row.get("why not", ""))
    console.print(rungs)
    r = plan.rung
    phases = Table(title=f"auto plan: {r.name}")
    phases.add_column("phase")
    phases.add_column("predicted s", justify="right")
    phases.add_row("start-up, data set-up, measuring (spent)", f"{plan.spent_s:.0f}")
    for name, seconds in plan.predicted.items():
        phases.add_row(name, f"{seconds:.0f}")
    phases.add_row("total", f"{plan.predicted_s:.0f}")
    console.print(phases)
    schedule = f"{r.head_epochs} head-only epoch{'s' * (r.head_epochs != 1)} on stored features"
    if r.unfrozen_groups:
        fed = "the stored trunk" if r.feeds_trunk else f"{r.augment}-augmented images"
        schedule += f", then the top {r.unfrozen_groups} groups for {r.unfrozen_epochs} epochs on {fed}"
    console.print(
        f"{r.backbone} (bundled weights) at {r.image_size} px: {schedule}. Images: train {sizes.get('train', 0)}, "
        f"validation {sizes.get('val', 0)}, test {sizes.get('test', 0)}. Predicted {plan.predicted_s:.0f} s of "
        f"{plan.budget_s:.0f} s."
    )
    cap = plan.caps.get("trunk_cache_bytes")
    if cap:
        console.print(f"caches: a trunk cache may take up to {cap / 2**30:.1f} GiB ({plan.caps['why']}).")


def main(argv: Sequence[str]) -> int:
    started = command_start()
    args, rest = _parser().parse_known_args(list(argv))
    budget = parse_budget(args.budget)
    chosen = [a for a in rest if a.startswith(_CHOSEN)]
    if chosen:
        raise ConfigError(
            f"auto chooses the model and training settings itself, so {chosen[0]} cannot take effect. Give auto "
            "the data settings only; to change what it chose, edit the recipe it writes "
            f"(<out>/{RECIPE_NAME}) and run python -m transferkit finetune --config on it."
        )
    out = Path(args.out)
    ladder = load_ladder(args.rules) if args.rules else LADDER
    _say_what_a_config_gives(rest)

    template = _template(out)
    try:
        base = load_recipe(["--config", str(template), *rest], logger=False)
    finally:
        template.unlink(missing_ok=True)
    datamodule = base.datamodule
    plan = auto_plan(datamodule, budget, spent_s=time.time() - started, ladder=ladder, cache_dir=out)
    _print_plan(plan)

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    recipe = plan.recipe(base.config.get("data") or {}, kind=datamodule.target_kind, root_dir=str(out))
    recipe["seed_everything"] = base.config.get("seed_everything", 0)
    recipe_path = out / RECIPE_NAME
    header = (
        f"# written by python -m transferkit auto --budget {args.budget}: rung '{plan.rung.name}', predicted "
        f"{plan.predicted_s:.0f} s on this machine.\n# Rerun the same training: python -m transferkit finetune "
        f"--config {recipe_path}\n"
    )
    recipe_path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    record = {
        "budget_s": budget,
        "rung": plan.rung.__dict__,
        "predicted_s": plan.predicted_s,
        "predicted_phases": plan.predicted,
        "spent_before_training_s": plan.spent_s,
        "sizes": plan.sizes,
        "considered": plan.considered,
        "costs": json.loads(json.dumps(plan.costs, default=lambda o: o.__dict__)),
        "caps": plan.caps,
        "recipe": str(recipe_path),
    }
    (out / PLAN_NAME).write_text(json.dumps(record, indent=2) + "\n")
    print(f"recipe written to {recipe_path}", file=sys.stderr)
    if args.plan_only:
        return 0

    from transferkit.training.budget import TimeBudget

    run = load_recipe(["--config", str(recipe_path)])
    reserve = plan.predicted.get("test", 0.0) + plan.predicted.get("report", 0.0)
    budget_callback = TimeBudget(deadline=started + budget, reserve_s=reserve)
    run.trainer.callbacks.append(budget_callback)
    results = run.trainer.finetune(run.model, run.datamodule)
    wall = time.time() - started
    record.update(
        {
            "measured_s": round(wall, 1),
            "stopped_early_at_epoch": budget_callback.stopped_at_epoch,
            "test": results.get("test"),
            "run_dir": results.get("run_dir"),
        }
    )
    (out / PLAN_NAME).write_text(json.dumps(record, indent=2) + "\n")
    stopped = (
        ""
        if budget_callback.stopped_at_epoch is None
        else f"; training stopped early in epoch {budget_callback.stopped_at_epoch + 1} to keep to the budget "
        "(finetune on the recipe would train longer)"
    )
    print(
        f"auto: results in {wall:.0f} s of a {budget:.0f} s budget (predicted {plan.predicted_s:.0f} s){stopped}.",
        file=sys.stderr,
    )
    return 0
