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
search could get right. The search's plot is drawn beside the results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_difference  # noqa: E402
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
    from scipy.stats import kendalltau, rankdata, spearmanr

    if "baseline" not in full:
        raise SystemExit(
            "give the recipe's own full runs as --full baseline=FILE: the differences are paired to it"
        )
    trials: dict[str, dict[str, Any]] = {}
    for trial in search["trials"]:
        key = pipeline_key(trial["candidate"])
        if key in trials:
            raise SystemExit(
                f"the search tried two candidates of {key} ({trials[key]['candidate']} and {trial['candidate']}): a full "
                "run cannot be matched to one of them by name; search with one candidate per transform"
            )
        trials[key] = trial
    missing = sorted(set(trials) - set(full))
    if missing:
        raise SystemExit(f"the search tried {missing} but no --full results were given for them")
    unused = sorted(set(full) - set(trials))
    if unused:
        raise SystemExit(f"--full {unused} match no trial of the search (it tried {sorted(trials)})")
    base = _per_seed(full["baseline"], metric)
    rows = []
    for name, trial in trials.items():
        scores = _per_seed(full[name], metric)
        if set(scores) != set(base):
            raise SystemExit(
                f"{name}'s full runs are of seeds {sorted(scores)}, the baseline's {sorted(base)}"
            )
        paired = paired_difference([base[s] for s in sorted(base)], [scores[s] for s in sorted(base)])
        rows.append(
            {
                "pipeline": name,
                "search_val_loss": statistics.fmean(trial["val_loss"]),
                "search_val_acc": statistics.fmean(trial["val_acc"]),
                "full_val": statistics.fmean(scores.values()),
                "full_diff_per_seed": paired["per_seed"],
                "full_diff_mean": paired["mean"],
                "full_diff_std": paired["std"],
                "full_beyond_spread": name != "baseline" and paired["beyond_the_spread"],
            }
        )
    loss_order = [-r["search_val_loss"] for r in rows]  # lower loss ranks higher, as the search ranks
    search_acc = [r["search_val_acc"] for r in rows]
    full_acc = [r["full_val"] for r in rows]

    def correlations(search_scores: list[float]) -> dict[str, float]:
        # average ranks for ties (Spearman) and tau-b (Kendall): a tie in the full runs is no order
        return {
            "spearman": float(spearmanr(search_scores, full_acc)[0]),
            "kendall": float(kendalltau(search_scores, full_acc)[0]),
        }

    # full runs with the same mean share a rank (the best of the tied places), so a tie shows as one
    full_ranks = rankdata([-a for a in full_acc], method="min")
    for row, rank in zip(rows, full_ranks, strict=True):
        row["full_rank"] = int(rank)
    rows.sort(key=lambda r: r["search_val_loss"])
    for rank, row in enumerate(rows, 1):
        row["search_rank"] = rank
    best_full = max(full_acc)
    return {
        "metric": f"val.{metric}",
        "pipelines": rows,
        "search_by_val_loss_vs_full": correlations(loss_order),
        "search_by_val_acc_vs_full": correlations(search_acc),
        "search_winner": rows[0]["pipeline"],
        "full_winners": [r["pipeline"] for r in rows if r["full_val"] == best_full],  # several on a tie
        "full_differences_beyond_spread": [r["pipeline"] for r in rows if r["full_beyond_spread"]],
        "search_noise_val_loss": search.get("noise_val_loss"),
        "search_skipped": search.get("skipped", []),  # candidates the budget left untried
        "search_in_recipe": search.get("in_recipe", []),  # candidates the recipe's pipeline already has
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
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--full takes NAME=FILE (e.g. --full baseline=results.json), got '{item}'")
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
    if args.out is not None:
        report["plot"] = str(draw(search, Path(args.out).with_suffix(".png")))
    save(report, args.out)


def draw(search: dict[str, Any], path: Path) -> Path:
    """The search's own plot (transferkit's ``augment_search_plot``), drawn from its JSON beside the results."""
    from transferkit.reporting.plots import augment_search_plot
    from transferkit.tuning.augment_search import AugmentSearchReport, Trial

    trials = [
        Trial(t["name"], t["candidate"], t["val_loss"], t["val_acc"], t["seconds"]) for t in search["trials"]
    ]
    (baseline,) = [t for t in trials if t.name == search["baseline"]]
    report = AugmentSearchReport(
        trials, baseline, search.get("skipped", []), search.get("snippet", ""), search["noise_val_loss"]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return augment_search_plot(report, path)


if __name__ == "__main__":
    main()
