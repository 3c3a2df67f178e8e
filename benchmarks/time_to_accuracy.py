"""Time to accuracy on ELPV: each recipe's binary test accuracy against the wall time of the command a user runs.

    python benchmarks/time_to_accuracy.py --recipes recipes/quickstart.yaml recipes/elpv.yaml --seeds 0 1 2 3 4 \\
        --rerun --out benchmarks/results/time-to-accuracy-elpv-2core-cpu.json

For every recipe and seed it runs ``python -m transferkit finetune --config R --seed_everything S --data.seed S``
in a fresh run folder (so every cache is built from nothing, as on a user's first run) and times the whole
command, start to printed results: interpreter start, imports, loading the data and the weights, the caches,
training, the test split, the run report. The seed's split is the benchmark's (``data.seed``, see
benchmarks/elpv.py). The test split is scored by the command itself; afterwards, untimed, the best checkpoint's
test probabilities are read again to give the binary accuracy of a 4-class recipe (defective = P(2/3) + P(1) >=
0.5, as benchmarks/elpv.py), and for a binary recipe that figure must equal the accuracy the command printed
(checked: a mismatch stops the benchmark).

Every run scores a test split, so each goes into ``benchmarks/results/elpv-test-ledger.jsonl`` and a recipe
whose test split was scored before needs ``--rerun`` (the protocol in docs/elpv.md). ``--resume FILE`` keeps the
runs an earlier results file of this script holds (same recipe, overrides and seed) instead of running them again.

``--auto 3m 5m`` also times ``python -m transferkit auto --config <--auto-config> --budget B --out <run folder>``
on the same seeds (``--auto-rules``: its ladder; for ELPV's figures, one chosen without ELPV), each budget an
entry of its own (``auto --budget B``) whose test split is scored once per seed like a recipe's; its written
``auto-recipe.yaml`` is what the checkpoint is scored through, and each run records the rung auto chose, its
predicted seconds and the wall time against the budget.

The JSON reports each run (wall seconds, fit seconds, test accuracy) and per recipe the mean +- std accuracy and
the mean and largest wall time; the frontier is the recipes no other recipe beats on both mean accuracy and mean
wall time. An ``auto`` entry is also paired with the most accurate recipe whose slowest seed fits its budget
(``against_best_fitting``). Each recipe after the first is paired with the first on the same seeds (``against_first``): the
per-seed differences in test accuracy, their mean +- std, and whether the mean lies beyond the std. A PNG
beside the results file draws accuracy against wall time, each seed faint and each recipe's mean with its
spread, the frontier joined, and the published fine-tuned VGG-19 (0.8842, on a GPU) as a line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elpv import LEDGER, _scores, check_test_allowed, recipe_fingerprint, record_test_look  # noqa: E402
from paired import paired_difference  # noqa: E402
from provenance import provenance, save, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {"VGG-19 fine-tuned, GPU (Deitsch et al. 2019)": 0.8842}


def run_command(recipe: str, seed: int, root: Path, extra: list[str], command: str = "finetune") -> list[str]:
    """``python -m transferkit <command> --config <recipe>`` on seed ``seed`` in the run folder ``root``."""
    return [
        sys.executable,
        "-m",
        "transferkit",
        command,
        "--config",
        recipe,
        "--seed_everything",
        str(seed),
        "--data.seed",
        str(seed),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def auto_command(
    config: str, budget: str, rules: str | None, seed: int, root: Path, extra: list[str]
) -> list[str]:
    """``python -m transferkit auto`` on ``config``'s data at ``budget``, seed ``seed``, run folder ``root``."""
    command = [sys.executable, "-m", "transferkit", "auto", "--config", config, "--budget", budget]
    command += ["--out", str(root), "--seed_everything", str(seed), "--data.seed", str(seed)]
    return command + (["--rules", rules] if rules else []) + list(extra)


def timed_run(
    recipe: str, seed: int, root: Path, extra: list[str], command: list[str] | None = None
) -> dict[str, Any]:
    """One fresh run (``finetune`` on ``recipe``, or ``command``), timed start to finish; its ``metrics.json``."""
    shutil.rmtree(root, ignore_errors=True)  # a fresh run folder: no cache survives from an earlier run
    command = command or run_command(recipe, seed, root, extra)
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-5000:])
        raise SystemExit(f"{recipe} seed {seed} failed (exit {completed.returncode}): {' '.join(command)}")
    found = sorted(root.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"{recipe} seed {seed}: the run wrote no metrics.json under {root}")
    metrics = json.loads(found[-1].read_text())
    return {"wall_seconds": round(wall, 1), "metrics": metrics}


def score_test(recipe: str, seed: int, root: Path, extra: list[str], checkpoint: str) -> dict[str, float]:
    """The best checkpoint's test figures as benchmarks/elpv.py computes them (untimed; the same test split),
    and ``acc``, its accuracy by the model's own rule (a stored decision threshold included), which is what
    the command printed."""
    import torch

    from transferkit.cli.lightning_cli import TransferKitCLI, cli_kwargs
    from transferkit.models.classifier import TransferClassifier

    args = run_command(recipe, seed, root, extra)[4:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = TransferKitCLI(**cli_kwargs(args), run=False)
    data = cli.datamodule
    best = TransferClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    data.use_data_config(best.data_config)
    data.setup("test")
    dataset = data.datasets["test"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=data.settings.loader.num_workers)
    with torch.no_grad():
        probs = torch.cat([best.predict_proba(images) for images, _ in loader])
    labels = torch.as_tensor(dataset.labels)
    indices = data.split_indices["test"]
    meta = {key: data.data.meta[key][indices] for key in ("cell_type", "defect_probability")}
    task = "4class" if data.num_classes == 4 else "binary"
    scores = _scores(probs.numpy(), dataset.labels, task, **meta)
    scores["acc"] = float((best.predict_labels(probs) == labels).float().mean())
    if task == "binary":
        scores["acc_binary"] = scores["acc"]  # the model's own rule, as the command scored it
    return scores


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per recipe (in the order first run): mean +- std test accuracy, mean and largest wall time; whether it
    is on the frontier (no other recipe at least as accurate and at least as fast, and better in one); and,
    for every recipe after the first, its test accuracy minus the first recipe's on the seeds both ran
    (``against_first``: per seed, mean +- std, and whether the mean lies beyond the std), so a slower recipe's
    gain can be told from seed noise."""
    names = list(dict.fromkeys(r["recipe"] for r in runs))
    by_seed = {name: {r["seed"]: r["test_acc_binary"] for r in runs if r["recipe"] == name} for name in names}
    rows = []
    for name in names:
        mine = [r for r in runs if r["recipe"] == name]
        acc = [r["test_acc_binary"] for r in mine]
        wall = [r["wall_seconds"] for r in mine]
        row = {
            "recipe": name,
            "seeds": [r["seed"] for r in mine],
            "test_acc_binary_mean": statistics.fmean(acc),
            "test_acc_binary_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "wall_seconds_mean": statistics.fmean(wall),
            "wall_seconds_max": max(wall),
        }
        if mine[0].get("budget_s"):  # an auto entry: its slowest seed against the budget, the rungs it chose
            row["budget_s"] = mine[0]["budget_s"]
            row["wall_over_budget_max"] = max(wall) / mine[0]["budget_s"]
            row["rungs"] = sorted({r["auto"]["rung"] for r in mine})
        rows.append(row)
    first = by_seed[names[0]]
    for row in rows[1:]:
        mine = by_seed[row["recipe"]]
        common = sorted(set(first) & set(mine))
        if len(common) > 1:
            paired = paired_difference([first[s] for s in common], [mine[s] for s in common])
            row["against_first"] = {"recipe": names[0], "seeds": common, **paired}
    for row in rows:  # an auto budget against the most accurate recipe whose slowest seed fits that budget
        if "budget_s" not in row:
            continue
        fitting = [r for r in rows if "budget_s" not in r and r["wall_seconds_max"] <= row["budget_s"]]
        if fitting:
            best = max(fitting, key=lambda r: r["test_acc_binary_mean"])
            mine, theirs = by_seed[row["recipe"]], by_seed[best["recipe"]]
            common = sorted(set(mine) & set(theirs))
            if len(common) > 1:
                paired = paired_difference([theirs[s] for s in common], [mine[s] for s in common])
                row["against_best_fitting"] = {"recipe": best["recipe"], "seeds": common, **paired}
    for row in rows:
        row["on_frontier"] = not any(
            other["test_acc_binary_mean"] >= row["test_acc_binary_mean"]
            and other["wall_seconds_mean"] <= row["wall_seconds_mean"]
            and (
                other["test_acc_binary_mean"] > row["test_acc_binary_mean"]
                or other["wall_seconds_mean"] < row["wall_seconds_mean"]
            )
            for other in rows
            if other is not row
        )
    return rows


def draw(runs: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(rows):
        colour = colours[i % len(colours)]
        mine = [r for r in runs if r["recipe"] == row["recipe"]]
        ax.scatter(
            [r["wall_seconds"] for r in mine],
            [r["test_acc_binary"] for r in mine],
            s=14,
            alpha=0.35,
            color=colour,
        )
        ax.errorbar(
            row["wall_seconds_mean"],
            row["test_acc_binary_mean"],
            yerr=row["test_acc_binary_std"],
            fmt="o",
            ms=7,
            capsize=3,
            color=colour,
            label=f"{Path(row['recipe']).stem}: {row['test_acc_binary_mean']:.3f} +- {row['test_acc_binary_std']:.3f}, "
            f"{row['wall_seconds_mean']:.0f} s",
        )
    front = sorted((r for r in rows if r["on_frontier"]), key=lambda r: r["wall_seconds_mean"])
    if len(front) > 1:
        ax.plot(
            [r["wall_seconds_mean"] for r in front], [r["test_acc_binary_mean"] for r in front], "k--", lw=1
        )
    for label, accuracy in PUBLISHED.items():
        ax.axhline(accuracy, color="grey", lw=1, ls=":")
        ax.text(  # x in axes fractions: the line's label stays at the left edge on the log axis
            0.005,
            accuracy,
            f" {label}: {accuracy:.4f}",
            va="bottom",
            fontsize=8,
            color="dimgrey",
            transform=ax.get_yaxis_transform(),
        )
    ax.axvline(300, color="grey", lw=1, ls="--")
    ax.text(300, 0.9, " 5 min", va="bottom", fontsize=8, color="dimgrey", transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 50, 100, 200, 500 s
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("wall time of the command (`finetune` or `auto`), fresh run folder (s, log scale)")
    ax.set_ylabel("binary test accuracy")
    ax.set_title("ELPV: accuracy against time to train (each seed faint; mean +- std)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipes",
        nargs="*",
        default=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*.yaml")),
    )
    parser.add_argument(
        "--auto", nargs="+", default=[], metavar="BUDGET", help="also time auto at these budgets (3m 5m ...)"
    )
    parser.add_argument(
        "--auto-config", default="recipes/quickstart.yaml", help="the recipe auto takes its data from"
    )
    parser.add_argument("--auto-rules", default=None, help="auto's ladder (--rules), a YAML file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rerun", action="store_true", help="score test splits the ledger says were scored")
    parser.add_argument("--resume", default=None, help="keep the runs of this earlier results file")
    parser.add_argument("--ledger", default=str(LEDGER), help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "time-to-accuracy"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="also write the JSON (and a PNG beside it) here")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    ledger = Path(args.ledger)

    kept: list[dict[str, Any]] = []
    if args.resume and Path(args.resume).is_file():
        earlier = json.loads(Path(args.resume).read_text())
        kept = [r for r in earlier["runs"] if r["overrides"] == extra]
    record = provenance()
    recipes = {recipe: _recipe_path(recipe) for recipe in args.recipes}
    fingerprints = {recipe: recipe_fingerprint(str(path), extra) for recipe, path in recipes.items()}
    autos: dict[str, str] = {}  # entry name -> budget
    rules: str | None = None
    if args.auto:
        from transferkit.tuning.auto import LADDER, parse_budget

        auto_config = str(_recipe_path(args.auto_config))
        rules = str(_recipe_path(args.auto_rules)) if args.auto_rules else None
        # the ladder is part of what is run: another ladder is another recipe on the ledger
        ladder = Path(rules).read_text() if rules else repr(LADDER)
        for budget in args.auto:
            name = f"auto --budget {budget}"
            autos[name] = budget
            recipes[name] = Path(auto_config)
            fingerprints[name] = recipe_fingerprint(auto_config, ["auto", "--budget", budget, ladder, *extra])

    def earlier_run(recipe: str, seed: int) -> dict[str, Any] | None:
        same = [r for r in kept if r["seed"] == seed and r["fingerprint"] == fingerprints[recipe]]
        return same[0] if same else None

    # every test split this call will score is checked against the ledger before the first run
    seen_before = {
        recipe: check_test_allowed(
            fingerprints[recipe],
            [s for s in args.seeds if earlier_run(recipe, s) is None],
            args.rerun,
            ledger,
        )
        for recipe in recipes
    }
    runs: list[dict[str, Any]] = []
    for recipe, path in recipes.items():
        fingerprint = fingerprints[recipe]
        for seed in args.seeds:
            done = earlier_run(recipe, seed)
            if done is not None:
                runs.append(done)
                continue
            budget = autos.get(recipe)
            if budget is None:
                root = Path(args.runs_dir).resolve() / path.stem / f"seed{seed}"
                timed = timed_run(str(path), seed, root, extra)
                scored_through, scored_extra = str(path), extra
            else:
                root = Path(args.runs_dir).resolve() / f"auto-{budget}" / f"seed{seed}"
                command = auto_command(str(path), budget, rules, seed, root, extra)
                timed = timed_run(recipe, seed, root, extra, command=command)
                # the recipe auto wrote holds the whole plan and this seed's data settings
                scored_through, scored_extra = str(root / "auto-recipe.yaml"), []
            metrics = timed["metrics"]
            printed = metrics["test"].get("test_acc")
            scores: dict[str, float] = {}
            try:
                scores = score_test(scored_through, seed, root, scored_extra, metrics["best_checkpoint"])
            finally:
                # the command scored the test split: the look goes on the ledger whatever happens next
                binary = len(metrics.get("class_names", [])) == 2
                accuracy = scores.get("acc_binary", printed if binary else None)
                look = (
                    (str(path.relative_to(ROOT)), ["auto", "--budget", budget, *extra])
                    if budget
                    else (recipe, extra)
                )
                record_test_look(
                    record, *look, fingerprint, seed, seed in seen_before[recipe], accuracy, ledger
                )
            if printed is not None and abs(printed - scores["acc"]) > 1e-6:
                raise SystemExit(
                    f"{recipe} seed {seed}: the command printed test accuracy {printed:.6f}, the checkpoint scores "
                    f"{scores['acc']:.6f} on the same split: the benchmark is not measuring what ran."
                )
            # a model trained on finer classes prints its grouped accuracy too (ELPV 4-class: the binary one)
            grouped = metrics.get("test", {}).get("test_group_acc")
            if grouped is not None and abs(grouped - scores["acc_binary"]) > 1e-6:
                raise SystemExit(
                    f"{recipe} seed {seed}: the command printed test_group_acc {grouped:.6f}, the checkpoint's "
                    f"binary accuracy on the same split is {scores['acc_binary']:.6f}: they should be one figure."
                )
            entry: dict[str, Any] = {}
            if budget is not None:
                plan = json.loads((root / "auto-plan.json").read_text())
                entry["budget_s"] = parse_budget(budget)
                entry["auto"] = {
                    "rung": plan["rung"]["name"],
                    "predicted_s": plan["predicted_s"],
                    "measured_s": plan.get("measured_s"),
                    "stopped_early_at_epoch": plan.get("stopped_early_at_epoch"),
                    "rules": rules or "built-in",
                }
            runs.append(
                {
                    **entry,
                    "recipe": recipe,
                    "overrides": extra,
                    "fingerprint": fingerprint,
                    "seed": seed,
                    "wall_seconds": timed["wall_seconds"],
                    "fit_seconds": metrics.get("fit_seconds"),
                    "epochs": metrics.get("epochs"),
                    "test_acc_binary": scores["acc_binary"],
                    "test_acc_4class": scores.get("acc_4class"),
                    "test_acc_printed": printed,
                    "test_group_acc_printed": grouped,
                    "commit": record["commit"],
                    "date_utc": record["date_utc"],
                }
            )
            print(
                f"{recipe} seed {seed}: {timed['wall_seconds']:.0f} s wall, binary test acc {scores['acc_binary']:.4f}",
                file=sys.stderr,
                flush=True,
            )
            if args.out is not None:  # the runs so far, marked incomplete: a stopped benchmark keeps them
                write(_report(args, extra, runs, record, complete=False), args.out)
    report = _report(args, extra, runs, record, complete=True)
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report["plot"] = str(draw(runs, report["recipes"], Path(args.out).with_suffix(".png")))
    save(report, args.out)


def _recipe_path(recipe: str) -> Path:
    """A recipe given relative to the working directory or to the repository root, as an absolute path."""
    for candidate in (Path(recipe), ROOT / recipe):
        if candidate.is_file():
            return candidate.resolve()
    raise SystemExit(f"no recipe file '{recipe}' (looked in {Path.cwd()} and {ROOT})")


def _report(
    args: argparse.Namespace, extra: list[str], runs: list[dict], record: dict, complete: bool
) -> dict:
    return {
        "benchmark": "time-to-accuracy-elpv",
        "complete": complete,
        "seeds": args.seeds,
        "overrides": extra,
        "published": PUBLISHED,
        "recipes": summarise(runs) if runs else [],
        "runs": runs,
        "provenance": record,
    }


if __name__ == "__main__":
    main()
