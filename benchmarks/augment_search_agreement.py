"""Does augment-search rank augmentations as full fine-tuning runs do? Its ranking against 5-seed benchmark runs.

    python benchmarks/augment_search_agreement.py --config recipes/quickstart.yaml \\
        --candidates benchmarks/configs/augment-search-candidates.yaml --budget 40m --search-out runs/search \\
        --full baseline=benchmarks/results/elpv-quickstart-val-5seeds-2core-cpu.json \\
        --full none=benchmarks/results/elpv-quickstart-no-augment-val-5seeds-2core-cpu.json \\
        --full RandAugment=... --full Affine=... --full CoarseDropout=... --out benchmarks/results/X.json

It runs ``python -m transferkit augment-search --config X --candidates C --budget B --out DIR``, unless DIR already
holds a finished search (``augment_search.json``), which is read back instead. Each ``--full NAME=FILE`` is a
results file of ``benchmarks/elpv.py`` (validation only, the same seeds) for the recipe with that candidate; NAME
is ``baseline`` (the recipe's own pipeline), ``none``, or the candidate's transform name. It reports, per
pipeline, the search's mean validation loss and accuracy and the full runs' mean validation accuracy, with each
full run's per-seed difference to the baseline (paired, mean +- std); then Spearman's and Kendall's rank
correlations between the search's order (by validation loss, as it ranks, and by validation accuracy) and the
full runs' order by mean validation accuracy. With at most a handful of pipelines a correlation is coarse: the
report also says which full-run differences lie beyond their own spread, since only those are an order the
search could get right. The search's plot is copied beside the results file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402

METRIC = "acc_binary"


def pipeline_key(candidate: Any) -> str:
    """``baseline``, ``none`` or the transform name of a search trial's candidate."""
    if isinstance(candidate, str):
        return candidate
    if isinstance(candidate, dict) and "__class_fullname__" in candidate:
        return str(candidate["__class_fullname__"]).rsplit(".", 1)[-1]
    if isinstance(candidate, dict) and len(candidate) == 1:
        return str(next(iter(candidate)))
    raise ValueError(f"cannot name the candidate {candidate!r}")


def _per_seed(report: dict[str, Any], metric: str = METRIC) -> dict[int, float]:
    return {int(run["seed"]): float(run["val"][metric]) for run in report["seeds"]}


def agreement(
    search: dict[str, Any], full: dict[str, dict[str, Any]], metric: str = METRIC
) -> dict[str, Any]:
    """Compare a search (``augment_search.json``'s content) with full runs (``{name: elpv.py report}``).

    Every full run must share the baseline's seeds; every trial of the search must have a full run.
    """
    from scipy.stats import kendalltau, spearmanr

    if "baseline" not in full:
        raise SystemExit(
            "give the recipe's own full runs as --full baseline=FILE: the differences are paired to it"
        )
    trials = {pipeline_key(t["candidate"]): t for t in search["trials"]}
    missing = sorted(set(trials) - set(full))
    if missing:
        raise SystemExit(f"the search tried {missing} but no --full results were given for them")
    base = _per_seed(full["baseline"], metric)
    rows = []
    for name, trial in trials.items():
        scores = _per_seed(full[name], metric)
        if set(scores) != set(base):
            raise SystemExit(
                f"{name}'s full runs are of seeds {sorted(scores)}, the baseline's {sorted(base)}"
            )
        diffs = [scores[s] - base[s] for s in sorted(base)]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        mean_diff = statistics.fmean(diffs)
        rows.append(
            {
                "pipeline": name,
                "search_val_loss": statistics.fmean(trial["val_loss"]),
                "search_val_acc": statistics.fmean(trial["val_acc"]),
                "full_val": statistics.fmean(scores.values()),
                "full_diff_per_seed": diffs,
                "full_diff_mean": mean_diff,
                "full_diff_std": spread,
                "full_beyond_spread": name != "baseline" and abs(mean_diff) > spread,
            }
        )
    loss_order = [-r["search_val_loss"] for r in rows]  # lower loss ranks higher, as the search ranks
    search_acc = [r["search_val_acc"] for r in rows]
    full_acc = [r["full_val"] for r in rows]

    def correlations(search_scores: list[float]) -> dict[str, float]:
        return {
            "spearman": float(spearmanr(search_scores, full_acc).statistic),
            "kendall": float(kendalltau(search_scores, full_acc).statistic),
        }

    rows.sort(key=lambda r: r["search_val_loss"])
    for rank, row in enumerate(rows, 1):
        row["search_rank"] = rank
    for rank, row in enumerate(sorted(rows, key=lambda r: -r["full_val"]), 1):
        row["full_rank"] = rank
    return {
        "metric": f"val.{metric}",
        "pipelines": rows,
        "search_by_val_loss_vs_full": correlations(loss_order),
        "search_by_val_acc_vs_full": correlations(search_acc),
        "search_winner": rows[0]["pipeline"],
        "full_winner": max(rows, key=lambda r: r["full_val"])["pipeline"],
        "full_differences_beyond_spread": [r["pipeline"] for r in rows if r["full_beyond_spread"]],
        "search_noise_val_loss": search.get("noise_val_loss"),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'pipeline':<14}{'search rank':>12}{'val loss':>10}{'val acc':>9}{'full rank':>10}{'full val':>10}"
        f"{'full - baseline':>22}"
    ]
    for r in result["pipelines"]:
        diff = (
            "" if r["pipeline"] == "baseline" else f"{r['full_diff_mean']:+.3f} +- {r['full_diff_std']:.3f}"
        )
        lines.append(
            f"{r['pipeline']:<14}{r['search_rank']:>12}{r['search_val_loss']:>10.4f}{r['search_val_acc']:>9.3f}"
            f"{r['full_rank']:>10}{r['full_val']:>10.3f}{diff:>22}"
        )
    by_loss, by_acc = result["search_by_val_loss_vs_full"], result["search_by_val_acc_vs_full"]
    lines.append(
        f"rank correlation with the full runs: by val loss Spearman {by_loss['spearman']:+.2f}, Kendall "
        f"{by_loss['kendall']:+.2f}; by val acc Spearman {by_acc['spearman']:+.2f}, Kendall {by_acc['kendall']:+.2f}"
    )
    beyond = result["full_differences_beyond_spread"]
    lines.append(f"full-run differences beyond their spread: {', '.join(beyond) if beyond else 'none'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--candidates", required=True)
    parser.add_argument("--budget", default="40m")
    parser.add_argument("--search-out", required=True, help="the search's folder (resumed if finished)")
    parser.add_argument(
        "--full", action="append", required=True, help="NAME=results file of benchmarks/elpv.py"
    )
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
    args = parser.parse_args()

    record = provenance()
    folder = Path(args.search_out)
    found = folder / "augment_search.json"
    command = [sys.executable, "-m", "transferkit", "augment-search", "--config", args.config]
    command += ["--candidates", args.candidates, "--budget", args.budget, "--out", str(folder)]
    ran_here, seconds = False, None
    if not found.is_file():
        began = time.perf_counter()
        subprocess.run(command, check=True)
        seconds, ran_here = time.perf_counter() - began, True
    search = json.loads(found.read_text())
    full = {}
    for item in args.full:
        name, _, path = item.partition("=")
        full[name] = json.loads(Path(path).read_text()) | {"file": path}
    result = agreement(search, full)
    print(table(result), file=sys.stderr)
    report = {
        "benchmark": "augment-search-agreement",
        "search": {
            "command": " ".join(["python", *command[1:]]),
            "ran_by_this_command": ran_here,  # False: read back from a folder an earlier run of it wrote
            "wall_seconds": seconds,
            "result": search,
        },
        "full_runs": {name: report["file"] for name, report in full.items()},
        **result,
        "provenance": record,
    }
    if args.out is not None and (folder / "augment_search.png").is_file():
        picture = Path(args.out).with_suffix(".png")
        shutil.copyfile(folder / "augment_search.png", picture)
        report["plot"] = str(picture)
    save(report, args.out)


if __name__ == "__main__":
    main()
