"""Combine ELPV ``--test`` results files of one recipe, run on different seeds, into one results file.

A five-seed run takes hours on a laptop CPU, and one stopped part-way keeps the seeds it finished; the
missing seeds can be run later and the files combined. Each seed's test score is checked against the
test ledger (``benchmarks/results/elpv-test-ledger.jsonl``): the ledger line with the file's commit, the
seed and the same score must exist, and every seed must name the same recipe there. A seed may appear in
one file only. The changes to ``transferkit/`` between the runs' commits are listed in the output, so a
reader sees what (if anything) differed in the code the seeds ran on.

    python benchmarks/combine_elpv.py partial.json seed4.json --out benchmarks/results/combined.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("elpv_benchmark", Path(__file__).with_name("elpv.py"))
elpv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(elpv)


def _ledger_recipe(entries: list[dict], commit: str, run: dict, path: str) -> str:
    score = run["test"]["acc_binary"]
    for entry in entries:
        if (
            entry.get("commit") == commit
            and entry.get("seed") == run["seed"]
            and abs(entry["test_acc_binary"] - score) < 1e-9
        ):
            return entry["recipe"]
    raise SystemExit(
        f"{path}: seed {run['seed']}'s test accuracy {score} is not in the test ledger for commit {commit}; "
        "only seeds scored by `benchmarks/elpv.py --test` (which writes the ledger) can be combined."
    )


def combine(paths: list[str], ledger: Path = elpv.LEDGER) -> dict:
    """The seeds of ``paths`` as one report, each seed checked against ``ledger``."""
    entries = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    seeds: dict[int, dict] = {}
    sources, recipes, configs = [], set(), set()
    for path in paths:
        report = json.loads(Path(path).read_text())
        commit = report["provenance"]["commit"]
        configs.add((report["config"], tuple(report["overrides"])))
        for run in report["seeds"]:
            if run["seed"] in seeds:
                raise SystemExit(f"seed {run['seed']} is in more than one file; give each seed once.")
            recipes.add(_ledger_recipe(entries, commit, run, path))
            seeds[run["seed"]] = run
        sources.append({"file": str(path), "commit": commit, "seeds": [r["seed"] for r in report["seeds"]]})
    if len(recipes) != 1 or len(configs) != 1:
        raise SystemExit(
            f"the files are of different recipes ({sorted(recipes)}); combine one recipe's runs."
        )
    commits = list(dict.fromkeys(s["commit"] for s in sources))
    changes = {}
    for older, newer in zip(commits, commits[1:], strict=False):  # consecutive pairs
        listed = subprocess.run(
            ["git", "diff", "--stat", older, newer, "--", "transferkit/"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes[f"{older[:7]}..{newer[:7]}"] = listed.splitlines()
    runs = [seeds[s] for s in sorted(seeds)]
    ((config, overrides),) = configs
    return {
        "benchmark": "elpv",
        "config": config,
        "overrides": list(overrides),
        "recipe": recipes.pop(),
        "splits_scored": ["val", "test"],
        "complete": True,
        "combined_from": sources,
        "library_changes_between_runs": changes,
        "seeds": runs,
        "summary": elpv._summary(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="elpv.py --test results files of one recipe")
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
    args = parser.parse_args()
    report = combine(args.files)
    report["provenance"] = provenance()
    save(report, args.out)


if __name__ == "__main__":
    main()
