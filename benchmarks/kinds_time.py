"""The time of one multi-label model against two single-label models of the same recipe, on ELPV.

    python benchmarks/kinds_time.py --rounds 2 --out benchmarks/results/kinds-time-elpv-<cpu>.json

Each round trains, from a fresh run folder (every cache built from nothing), one after another:

- ``two single-label models``: the quick start (4 defect levels, scored as defective through its class groups)
  and the quick start on ELPV's cell type (mono/polycrystalline, ``data.task=cell_type``);
- ``one multi-label model``: the quick start on both labels at once (``data.task=defective_polycrystalline``,
  ``data.target.kind=multi_label``, no label smoothing, which a multi-label model refuses).

Each is ``python -m transferkit fit --config recipes/quickstart.yaml ...`` with the overrides of
``benchmarks/kinds_elpv.py``, timed start to finish (interpreter start, data, weights, caches, training,
validation; no test split is read). The order alternates between rounds, so a slow spell of the machine hits
both sides. The JSON reports each command's wall seconds and, per round, the ratio of the multi-label model's
time to the two single-label models' summed time (``rounds.per_round_ratio``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kinds_elpv import ARMS, RECIPE  # noqa: E402
from provenance import provenance, save  # noqa: E402
from rounds import per_round_ratio  # noqa: E402
from time_to_accuracy import run_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ("base", "cell-type")
MULTI = "multi-label"


def fit_command(arm: str, root: Path, seed: int) -> list[str]:
    overrides = [f"--{key}={value}" for key, value in (o.split("=", 1) for o in ARMS[arm])]
    return run_command(RECIPE, seed, root, overrides, command="fit")


def timed_fit(arm: str, seed: int) -> float:
    """Wall seconds of one fresh ``fit`` of ``arm``."""
    root = Path(tempfile.mkdtemp(prefix=f"kinds-time-{arm}-"))
    command = fit_command(arm, root, seed)
    try:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{arm} failed (exit {done.returncode}): {' '.join(command)}")
    return round(wall, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rounds = []
    for r in range(args.rounds):
        order = [*SINGLE, MULTI] if r % 2 == 0 else [MULTI, *reversed(SINGLE)]
        seconds = {arm: timed_fit(arm, args.seed) for arm in order}
        rounds.append({"order": order, "wall_seconds": seconds})
        print(f"round {r}: {seconds}", file=sys.stderr)
    multi = [r["wall_seconds"][MULTI] for r in rounds]
    two = [sum(r["wall_seconds"][a] for a in SINGLE) for r in rounds]
    report = {
        "what": "wall seconds of one fresh fit: one multi-label model against two single-label models",
        "commands": {
            arm: " ".join(fit_command(arm, Path("<fresh folder>"), args.seed)[1:]) for arm in (*SINGLE, MULTI)
        },
        "rounds": rounds,
        "multi_label_over_two_single_label": per_round_ratio(multi, two),
        "provenance": provenance(),
    }
    save(report, args.out)


if __name__ == "__main__":
    main()
