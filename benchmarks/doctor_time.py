"""How long ``doctor`` takes, start to printed summary, and what finetune's near-duplicate check costs.

    python benchmarks/doctor_time.py --cv runs/cv/protocol/base-s0 --out benchmarks/results/doctor-time-<cpu>.json

Each run is ``python -m transferkit doctor`` in a new process with a fresh feature cache (nothing stored from
an earlier run), timed from outside: ELPV through ``recipes/quickstart.yaml`` (seed 0) without and with a
stored cross-validation (``--cv``, whose out-of-fold probabilities replace the features' logistic
regression; the features are still computed for the outliers), and 10,000 images of the noisy ten-fold
digits folder of ``benchmarks/auto_budget.py`` at the backbone's own input size. ``finetune``'s check
(:func:`~transferkit.data.checks.warn_near_duplicates_across_splits`: a reduced-scale decode and a hash of
every image) is timed in this process on the photo digits (1,000 JPEGs of 480x360) and the 10,000 digits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT))
from auto_budget import DATASETS  # noqa: E402
from provenance import provenance, save, write  # noqa: E402


def timed_doctor(args: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="doctor-time-"))
    command = [sys.executable, "-m", "transferkit", "doctor", *args, "--out", str(out / "doctor")]
    command += ["--trainer.default_root_dir", str(out / "run")]
    try:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"doctor failed: {done.stderr[-3000:]}")
        record = json.loads((out / "doctor" / "doctor.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "command": " ".join(["python", *command[1:]]).replace(str(out), "<fresh folder>"),
        "wall_s": round(wall, 1),
        "doctor_json": record,
    }


def timed_check(folder: Path, max_samples: int | None) -> dict:
    from transferkit.data.checks import subset as take
    from transferkit.data.checks import warn_near_duplicates_across_splits
    from transferkit.data.settings import SplitSettings
    from transferkit.data.sources import load_source
    from transferkit.data.splits import make_splits

    data = load_source("folder", root=str(folder))
    if max_samples is not None:
        data = take(data, max_samples, 0)
    splits = make_splits(data, SplitSettings(), 0)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        concerned = warn_near_duplicates_across_splits(data, splits)
    return {
        "images": len(data),
        "seconds": round(time.perf_counter() - start, 2),
        "test_images_flagged": concerned,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", required=True, help="a stored cross-validation of the quick start, seed 0")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "transferkit-auto-data"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    quick = ["--config", "recipes/quickstart.yaml", "--seed_everything", "0", "--data.seed", "0"]
    x10 = DATASETS["digits-x10"](data_dir)
    report: dict = {"benchmark": "doctor-time", "runs": {}, "checks": {}, "provenance": provenance()}
    plan = {
        "elpv": quick,
        "elpv_with_stored_cv": [*quick, "--cv", str(Path(args.cv).resolve())],
        "digits_10000": [
            "--data.source",
            "folder",
            "--data.root",
            str(x10),
            "--data.split.max_samples",
            "10000",
        ],
    }
    for name, doctor_args in plan.items():
        report["runs"][name] = timed_doctor(doctor_args)
        print(name, report["runs"][name]["wall_s"], file=sys.stderr, flush=True)
        if args.out:
            write(report, args.out)
    report["checks"]["photo_digits"] = timed_check(DATASETS["photo-digits"](data_dir), None)
    report["checks"]["digits_10000"] = timed_check(x10, 10000)
    save(report, args.out)


if __name__ == "__main__":
    main()
