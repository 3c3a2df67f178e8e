"""The evidence ``auto``'s ladder is chosen by: every rung trained on several datasets, scored on validation only,
and a ladder per dataset chosen without it (leave one dataset out).

    python benchmarks/auto_rules.py --datasets digits photo-digits elpv --seed 0 --runs runs/auto-rules \\
        --out benchmarks/results/auto-rules-seed0-<cpu>.json

For each dataset and rung of ``transferkit.tuning.auto.LADDER`` it writes the rung's recipe
(``recipe_for``, the same one ``auto`` writes) and runs ``python -m transferkit fit`` on it in a fresh folder,
timed start to finish: no test split is read. Its score is the validation accuracy of the epoch with the
lowest validation loss (the checkpoint ``finetune`` would test). A run already in ``--runs`` is read back.

The rule, per held-out dataset: walk the ladder from the cheapest rung; keep a rung only if its mean validation
accuracy over the *other* datasets is higher than that of every rung kept before it (a costlier rung that was
not better elsewhere is dropped). The ladder kept is written as a rules file for ``auto --rules``. Datasets
are those of ``benchmarks/auto_budget.py`` (built once under ``--data-dir``) and ELPV (binary task, its
protocol split of seed ``--seed``, 296 validation cells: a gain under about 0.02 is not resolved there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT))  # this checkout's transferkit, the one its `python -m transferkit fit` runs
from auto_budget import DATASETS, best_validation  # noqa: E402
from provenance import provenance, save, write  # noqa: E402

from transferkit.tuning.auto import LADDER, Rung, load_ladder, recipe_for  # noqa: E402


def data_section(name: str, data_dir: Path, seed: int) -> dict:
    if name == "elpv":
        return {"source": "elpv", "task": "binary", "seed": seed, "loader": {"num_workers": 1}}
    folder = DATASETS[name](data_dir)
    return {"source": "folder", "root": str(folder), "seed": seed, "loader": {"num_workers": 1}}


def run_rung(dataset: str, rung: Rung, data: dict, seed: int, runs: Path) -> dict:
    folder = runs / f"{dataset}-{rung.name}-s{seed}"
    record_path = folder / "record.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record["rung"] != asdict(rung):
            raise SystemExit(
                f"{folder} holds a run of another rung named {rung.name!r} ({record['rung']}): give the new rung "
                "another name, or move that folder away to run it again."
            )
        return record
    folder.mkdir(parents=True, exist_ok=True)
    recipe = recipe_for(rung, data, root_dir=str(folder))
    recipe["seed_everything"] = seed
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "transferkit", "fit", "--config", str(recipe_path)]
    command += ["--trainer.enable_progress_bar", "false"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"{dataset} {rung.name} failed: {' '.join(command)}")
    record = {
        "dataset": dataset,
        "rung": asdict(rung),
        "seed": seed,
        "command": " ".join(["python", *command[1:]]),
        "wall_s": round(wall, 1),
        **best_validation(folder),
        "provenance": provenance(),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def leave_one_out(records: list[dict], datasets: list[str], ladder: Sequence[Rung] = LADDER) -> dict:
    """Per held-out dataset, the ladder kept by the other datasets' mean validation accuracy, and why."""
    by = {(r["dataset"], r["rung"]["name"]): r["val_acc"] for r in records}
    out = {}
    for held in datasets:
        others = [d for d in datasets if d != held]
        kept, rows, best = [], [], -1.0
        for rung in ladder:
            scores = [by[(d, rung.name)] for d in others if (d, rung.name) in by]
            if len(scores) < len(others):
                rows.append({"rung": rung.name, "kept": False, "why": "not run on every other dataset"})
                continue
            mean = statistics.fmean(scores)
            keep = mean > best
            rows.append({"rung": rung.name, "mean_val_acc_elsewhere": round(mean, 4), "kept": keep})
            if keep:
                kept.append(rung.name)
                best = mean
        out[held] = {"chosen_without": held, "on": others, "ladder": kept, "rows": rows}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["digits", "photo-digits"], choices=[*DATASETS, "elpv"]
    )
    parser.add_argument(
        "--ladder",
        default=None,
        help="the candidate rungs, cheapest first, as a YAML file of auto --rules (default: auto's built-in ladder)",
    )
    parser.add_argument("--rungs", nargs="+", default=None, help="only these rungs of the ladder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/auto-rules")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "transferkit-auto-data"))
    parser.add_argument("--rules-dir", default=None, help="write each held-out dataset's ladder here as YAML")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs, data_dir = Path(args.runs), Path(args.data_dir)
    ladder = load_ladder(args.ladder) if args.ladder else LADDER
    wanted = args.rungs or [r.name for r in ladder]
    unknown = set(wanted) - {r.name for r in ladder}
    if unknown:
        raise SystemExit(f"unknown rungs {sorted(unknown)}; the ladder has {[r.name for r in ladder]}")
    records: list[dict] = []
    report = {"records": records, "provenance": provenance()}
    for dataset in args.datasets:
        data = data_section(dataset, data_dir, args.seed)
        for rung in (r for r in ladder if r.name in wanted):
            record = run_rung(dataset, rung, data, args.seed, runs)
            records.append(
                {k: v for k, v in record.items() if k != "provenance"}
                | {"commit": record["provenance"]["commit"]}
            )
            print(
                json.dumps({k: record[k] for k in ("dataset", "wall_s", "val_acc")} | {"rung": rung.name}),
                file=sys.stderr,
            )
            if args.out:
                write(report, args.out)
    report["leave_one_dataset_out"] = leave_one_out(records, args.datasets, ladder)
    if args.rules_dir:
        for held, chosen in report["leave_one_dataset_out"].items():
            rungs = [asdict(r) for r in ladder if r.name in chosen["ladder"]]
            path = Path(args.rules_dir) / f"auto-rules-without-{held}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(rungs, sort_keys=False))
    save(report, args.out)


if __name__ == "__main__":
    main()
