"""The selection protocol, run end to end: several knobs of one recipe judged at once by cross-validation.

    python benchmarks/selection.py --config recipes/quickstart.yaml --folds 5 --seeds 0 1 --positive 2 3 \\
        --variant exponential model.lr_schedule.name=exponential \\
        --variant no-label-smoothing model.regularisation.label_smoothing=0 \\
        --variant bn-frozen model.freeze_schedule.bn_policy=frozen \\
        --runs runs/cv/protocol --out benchmarks/results/selection-quickstart.json

For every seed ``s`` it runs ``transferkit cv --checkpoint last`` (fixed epochs: no epoch is chosen on the
cells that judge) of the base recipe (``seed_everything s``, ``data.seed s``), of an A/A arm (the base again
with ``seed_everything s + 1``, the same folds) and of each variant (the base with the variant's settings,
``seed_everything s``, ``data.seed s``). Each run's folder keeps its command: a finished run of the same
command is taken as it is, a folder of another command is refused, and an unfinished one resumes
(``transferkit cv`` reads finished folds back), so a stopped protocol resumes where it stopped.

Each variant is compared with the base by :func:`compare_cv.compare` (paired by fold and seed, Nadeau and
Bengio's corrected t), and the variants' p-values are adjusted together by Holm's method
(:func:`paired.holm`): a knob is judged a difference only when its adjusted p-value is below 0.05. The A/A
arm against the base gives the smallest gain the design resolves. Its arms differ in the training seed,
while a variant shares the base's: the A/A spread holds the seed-to-seed noise in full, so the gain it
resolves is, if anything, larger than a variant comparison needs. Each run's folder keeps a
``provenance.json`` (commit, clean tree, command, machine, wall and CPU seconds of that run); the report
carries every run's record, so runs made at different commits say so. A run with no record (made before
this script) is listed as ``reconstructed``. No test split is read.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_cv import compare  # noqa: E402
from paired import holm  # noqa: E402
from provenance import provenance, save  # noqa: E402

RECORD = "provenance.json"  # per run, in its folder


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cv_command(
    config: str, folds: int, out: Path, train_seed: int, data_seed: int, settings: list[str]
) -> list[str]:
    """The ``transferkit cv`` command line of one run; ``settings`` are ``key=value`` overrides."""
    command = [
        sys.executable,
        "-m",
        "transferkit",
        "cv",
        "--config",
        config,
        "--folds",
        str(folds),
        "--checkpoint",
        "last",
        "--out",
        str(out),
        "--seed_everything",
        str(train_seed),
        "--data.seed",
        str(data_seed),
    ]
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"a variant's setting must read key=value, got {setting!r}")
        command += [
            f"--{key}",
            value.replace("{seed}", str(data_seed)),
        ]  # a per-seed file, e.g. doctor's list
    return command


def _typed(command: list[str]) -> str:
    """A cv command as the record keeps it: ``python -m transferkit cv ...``."""
    return " ".join(["python", *command[1:]])


def _same(recorded: str, command: list[str]) -> bool:
    # the first records of this script wrote "python python -m ...": the same command
    return recorded.replace("python python -m ", "python -m ", 1) == _typed(command)


def run(command: list[str], out: Path) -> dict:
    """Run one cross-validation in ``out``, or take the finished one there if it is of this command; its
    provenance record either way. A folder of another command is refused, not reused."""
    record_path = out / RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if not _same(record["command"], command):
            raise SystemExit(
                f"'{out}' holds a cross-validation of another command ({record['command']}), not of "
                f"{_typed(command)}: give another --runs folder, or delete '{out}' to run it again"
            )
        return record
    finished = (out / "cv.json").exists()
    record = provenance(command[1:])  # recorded as "python -m transferkit cv ..."
    start, cpu0 = time.perf_counter(), _children_cpu_s()
    print(f"[selection] {_typed(command)}", file=sys.stderr, flush=True)
    # transferkit cv resumes: finished folds are read back, not trained again, and a folder of another
    # recipe is refused, so a run made before its record was kept is checked here as well
    subprocess.run(command, check=True)
    if finished:
        record = {
            "reconstructed": True,
            "how": "run before its record was kept; transferkit cv then checked that its folds are of this "
            "command's recipe and read them back",
            "command": _typed(command),
            "checked_at_commit": record["commit"],
        }
    else:
        record["wall_s"] = round(time.perf_counter() - start, 1)
        record["cpu_s"] = round(_children_cpu_s() - cpu0, 1)
    out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "KEY=VALUE"),
        help="a variant's name and its settings (key=value, recipe keys with dots; {seed} in a value is the "
        "run's data seed, for a file made per seed such as doctor's list)",
    )
    parser.add_argument("--positive", nargs="+", type=int, default=None, help="classes of the positive group")
    parser.add_argument("--runs", default="runs/cv/protocol", help="folder of the runs' cross-validations")
    parser.add_argument("--run-only", action="store_true", help="run the cross-validations, compare nothing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs = Path(args.runs)
    names = [v[0] for v in args.variant]
    clash = sorted({n for n in names if names.count(n) > 1 or n in ("base", "a-a")})
    if clash:
        raise SystemExit(
            f"variant names must differ from each other and from base and a-a: {', '.join(clash)}"
        )
    variants = {v[0]: v[1:] for v in args.variant}
    arms = {"base": [], "a-a": [], **{name: [] for name in variants}}
    records = {}
    for seed in args.seeds:
        plan = [("base", seed, []), ("a-a", seed + 1, [])] + [(n, seed, s) for n, s in variants.items()]
        for name, train_seed, settings in plan:
            out = runs / f"{name}-s{seed}"
            records[out.name] = run(cv_command(args.config, args.folds, out, train_seed, seed, settings), out)
            arms[name].append(str(out))
    if args.run_only:
        return
    aa = compare(arms["base"], arms["a-a"], args.positive)
    comparisons = {name: compare(arms["base"], arms[name], args.positive) for name in variants}
    adjusted = holm({name: c["corrected_t"]["p"] for name, c in comparisons.items()})
    timed = [r for r in records.values() if "wall_s" in r]
    report = {
        "benchmark": "selection protocol",
        "config": args.config,
        "design": aa["design"],
        "scored": aa["scored"],
        "a_a": {
            "corrected_t": aa["corrected_t"],
            "per_seed": aa["seeds"],
            "smallest_resolved_gain": aa["smallest_resolved_gain_if_a_a"],
            "resolved_gain_floor_any_seeds": aa["resolved_gain_floor_if_a_a"],
        },
        "variants": {
            name: {
                "settings": variants[name],
                "mean_difference": c["corrected_t"]["mean"],
                "corrected_t": c["corrected_t"],
                "holm_p": adjusted[name],
                "judged": (
                    ("gain" if c["corrected_t"]["mean"] > 0 else "loss")
                    if adjusted[name] < 0.05
                    else "no difference"
                ),
                "per_seed": c["seeds"],
            }
            for name, c in comparisons.items()
        },
        "cost": {
            "cv_runs_timed": len(timed),
            "cv_run_wall_s": sorted(r["wall_s"] for r in timed),
            "cv_run_cpu_s": sorted(r["cpu_s"] for r in timed),
            "note": "one variant judged against an existing base costs one cv run per seed",
        },
        "runs": records,
    }
    report["provenance"] = provenance()
    save(report, args.out)


if __name__ == "__main__":
    main()
