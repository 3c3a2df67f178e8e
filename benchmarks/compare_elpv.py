"""A paired comparison of two ELPV recipes on the same seeds, from their ``benchmarks/elpv.py`` results files.

Each recipe may be spread over several files (seeds run at different times); a seed may appear once per
recipe. For each metric, the JSON holds both recipes' per-seed scores, the per-seed differences (variant
minus base) and their mean +- std: a difference inside the spread is no difference. Validation by default;
``--split test`` compares the test scores of adopted recipes.

Choices are no longer made with it: one validation split of 296 cells per seed cannot tell the gains that
matter here from noise. The selection protocol (``benchmarks/selection.py`` and ``benchmarks/compare_cv.py``:
every non-test cell validates once, paired by fold and seed, Nadeau and Bengio's corrected t, Holm's
adjustment across knobs) decides; this script re-reads the earlier comparisons and compares adopted recipes
on test.

    python benchmarks/compare_elpv.py \\
        --base benchmarks/results/elpv-quickstart-long-head-val-5seeds-2core-cpu.json \\
        --variant benchmarks/results/elpv-quickstart-trunk-4class-val-*.json \\
        --out benchmarks/results/compare-....json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_difference  # noqa: E402
from provenance import provenance, save  # noqa: E402

METRICS = ("acc_binary", "macro_f1_binary")


def seeds_of(files: list[str], split: str) -> dict[int, dict]:
    """``{seed: scores on split}`` over ``files``; a seed found twice, or a file without the split, fails."""
    out: dict[int, dict] = {}
    for path in files:
        for run in json.loads(Path(path).read_text())["seeds"]:
            if run["seed"] in out:
                raise SystemExit(f"seed {run['seed']} is in two files of one recipe (again in {path}).")
            if split not in run:
                raise SystemExit(
                    f"{path}, seed {run['seed']}: no '{split}' scores (try --split val or test)."
                )
            out[run["seed"]] = run[split]
    return out


def compare(base: dict[int, dict], variant: dict[int, dict], metrics=METRICS) -> dict:
    """Per metric: the scores of both on the seeds both have, the per-seed differences and their mean +- std."""
    seeds = sorted(set(base) & set(variant))
    if len(seeds) < 2:
        raise SystemExit(f"a paired comparison needs 2 common seeds or more; common: {seeds}.")
    out = {"seeds": seeds}
    for key in metrics:
        paired = paired_difference([base[s][key] for s in seeds], [variant[s][key] for s in seeds])
        out[key] = {
            "base": [round(base[s][key], 4) for s in seeds],
            "variant": [round(variant[s][key], 4) for s in seeds],
            "base_mean": round(statistics.mean(base[s][key] for s in seeds), 4),
            "variant_mean": round(statistics.mean(variant[s][key] for s in seeds), 4),
            "difference_per_seed": paired["per_seed"],
            "difference_mean": paired["mean"],
            "difference_std": paired["std"],
            "beyond_the_spread": paired["beyond_the_spread"],
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", nargs="+", required=True, help="the base recipe's results files")
    parser.add_argument("--variant", nargs="+", required=True, help="the variant's results files")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--out", help="results file to write")
    args = parser.parse_args(argv)
    report = {
        "benchmark": "elpv paired comparison",
        "split": args.split,
        "base_files": [Path(f).name for f in args.base],
        "variant_files": [Path(f).name for f in args.variant],
        **compare(seeds_of(args.base, args.split), seeds_of(args.variant, args.split)),
        "provenance": provenance(sys.argv if argv is None else ["benchmarks/compare_elpv.py", *argv]),
    }
    save(report, args.out)


if __name__ == "__main__":
    main()
