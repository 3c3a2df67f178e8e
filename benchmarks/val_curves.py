"""Validation curves of runs side by side: one metric per epoch, read from each run's ``metrics.csv``.

Each ``--runs LABEL=DIR [DIR ...]`` names a set of run directories (one per seed, each holding a
``metrics.csv`` written by the CSV logger; the first found under DIR is read). The JSON holds every run's
per-epoch values and, per label and epoch, their mean; the PNG beside it draws each run faint and each
label's mean bold. Used to show what precise BatchNorm statistics change in a run's validation curve:

    python benchmarks/val_curves.py \\
        --runs "running statistics=runs/time-to-accuracy/quickstart/seed*" \\
        --runs "PreciseBN=runs/elpv-benchmark/seed*" \\
        --metric val_group_acc --out benchmarks/results/val-curves-quickstart-precise-bn-2core-cpu.json
"""

from __future__ import annotations

import argparse
import csv
import glob
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402


def read_curve(run_dir: str, metric: str) -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` in the first ``metrics.csv`` under ``run_dir`` (the last value an
    epoch logged, as the end-of-epoch one)."""
    files = sorted(Path(run_dir).rglob("metrics.csv"))
    if not files:
        raise SystemExit(f"{run_dir}: no metrics.csv under it (was the CSV logger on?).")
    curve: dict[int, float] = {}
    with files[0].open() as handle:
        for row in csv.DictReader(handle):
            if row.get(metric):
                curve[int(row["epoch"])] = float(row[metric])
    if not curve:
        raise SystemExit(f"{files[0]}: no '{metric}' column with values; pick one it logged.")
    return curve


def curves(runs: dict[str, list[str]], metric: str) -> dict[str, Any]:
    """Per label: each run's curve and the mean over runs at each epoch all of them reached."""
    out: dict[str, Any] = {}
    for label, dirs in runs.items():
        per_run = {d: read_curve(d, metric) for d in dirs}
        epochs = sorted(set.intersection(*(set(c) for c in per_run.values())))
        out[label] = {
            "runs": {d: {str(e): round(v, 4) for e, v in c.items()} for d, c in per_run.items()},
            "mean": {str(e): round(statistics.mean(c[e] for c in per_run.values()), 4) for e in epochs},
            "min": {str(e): round(min(c[e] for c in per_run.values()), 4) for e in epochs},
        }
    return out


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for index, (label, data) in enumerate(report["curves"].items()):
        color = f"C{index}"
        for curve in data["runs"].values():
            ax.plot([int(e) for e in curve], list(curve.values()), color=color, alpha=0.25, lw=1)
        mean = data["mean"]
        ax.plot([int(e) for e in mean], list(mean.values()), color=color, lw=2.5, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(report["metric"])
    ax.set_title(f"{report['metric']} per epoch (each run faint, the mean bold)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", action="append", required=True, help="LABEL=DIR [DIR ...] (globs allowed)")
    parser.add_argument("--metric", default="val_acc")
    parser.add_argument("--out", help="results JSON; the PNG is written beside it")
    args = parser.parse_args()

    runs: dict[str, list[str]] = {}
    for spec in args.runs:
        label, sep, dirs = spec.partition("=")
        found = sorted(d for pattern in dirs.split() for d in glob.glob(pattern))
        if not sep or not found:
            raise SystemExit(f"--runs '{spec}': give LABEL=DIR [DIR ...], with at least one existing DIR.")
        runs[label] = found
    report = {"metric": args.metric, "curves": curves(runs, args.metric), "provenance": provenance()}
    save(report, args.out)
    if args.out:
        draw(report, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
