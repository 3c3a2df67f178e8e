"""What an ensemble of ELPV runs would score on validation, from the probabilities the runs stored.

Each member is a ``benchmarks/elpv.py`` results file. Every run in it wrote the validation probabilities it
scored to its ``probabilities_file``; for each seed common to all members this script averages the members'
probabilities (as ``predict_proba`` averages test-time views), scores the average as ``benchmarks/elpv.py``
scores a model, and pairs it seed by seed with ``--base`` (by default the first member alone), as
``benchmarks/compare_elpv.py`` does. No model runs and no test split is read: it says whether training
several members would be worth their time before anyone builds them.

    python benchmarks/ensemble_elpv.py \\
        --members benchmarks/results/elpv-quickstart-7ep-val-2core-cpu.json \\
                  benchmarks/results/elpv-quickstart-7ep-member2-val-2core-cpu.json \\
        --base benchmarks/results/elpv-quickstart-precise-bn-val-2core-cpu.json \\
        --out benchmarks/results/ensemble-....json

The runs' folders must still hold their ``probabilities.npz`` (they are not committed); the output records
each member's and the ensemble's per-seed scores, so it stands on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_elpv import compare, seeds_of  # noqa: E402
from elpv import _scores  # noqa: E402
from provenance import provenance, save  # noqa: E402


def member_probabilities(files: list[str]) -> list[dict[int, dict]]:
    """Per member: ``{seed: {"probs", "labels", "cell_type", "defect_probability"}}`` read from its runs'
    ``probabilities.npz``; a missing file fails with what to do."""
    members = []
    for path in files:
        runs = {}
        for run in json.loads(Path(path).read_text())["seeds"]:
            npz = Path(run.get("probabilities_file", ""))
            if not npz.is_file():
                raise SystemExit(
                    f"{path}, seed {run['seed']}: its probabilities file '{npz}' is gone; the run folder "
                    "must still hold it (re-run benchmarks/elpv.py for that member)."
                )
            with np.load(npz) as stored:
                runs[run["seed"]] = {
                    "probs": stored["val_probs_none"],
                    "labels": stored["val_labels"],
                    "cell_type": stored["val_cell_type"],
                    "defect_probability": stored["val_defect_probability"],
                }
        members.append(runs)
    return members


def ensemble(members: list[dict[int, dict]]) -> list[dict]:
    """Per common seed: each member's binary accuracy and the scores of their averaged probabilities."""
    seeds = sorted(set.intersection(*(set(m) for m in members)))
    if not seeds:
        raise SystemExit("the members have no seed in common.")
    out = []
    for seed in seeds:
        runs = [m[seed] for m in members]
        first = runs[0]
        for run in runs[1:]:
            if not np.array_equal(run["labels"], first["labels"]) or not np.array_equal(
                run["defect_probability"], first["defect_probability"]
            ):
                raise SystemExit(
                    f"seed {seed}: the members scored different validation cells; an ensemble needs members "
                    "trained on the same split (the same data settings and seed)."
                )
        task = "4class" if first["probs"].shape[1] == 4 else "binary"
        given = (first["labels"], task, first["cell_type"], first["defect_probability"])
        alone = [_scores(run["probs"], *given)["acc_binary"] for run in runs]
        out.append(
            {
                "seed": seed,
                "members_acc_binary": [round(a, 4) for a in alone],
                "val": _scores(np.mean([run["probs"] for run in runs], axis=0), *given),
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", nargs="+", required=True, help="one elpv.py results file per member")
    parser.add_argument("--base", nargs="+", help="results files to pair with (default: the first member)")
    parser.add_argument("--out", help="results file to write")
    args = parser.parse_args(argv)
    if len(args.members) < 2:
        raise SystemExit("an ensemble needs 2 members or more.")
    seeds = ensemble(member_probabilities(args.members))
    base_files = args.base or args.members[:1]
    report = {
        "benchmark": "elpv ensemble of stored validation probabilities",
        "members": [Path(f).name for f in args.members],
        "base_files": [Path(f).name for f in base_files],
        "seeds": seeds,
        "against_base": compare(seeds_of(base_files, "val"), {s["seed"]: s["val"] for s in seeds}),
        "provenance": provenance(sys.argv if argv is None else ["benchmarks/ensemble_elpv.py", *argv]),
    }
    save(report, args.out)


if __name__ == "__main__":
    main()
