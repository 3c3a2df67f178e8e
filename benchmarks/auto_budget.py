"""``auto`` against its budget: the wall time a user waits, measured from outside, against the budget and the plan's
prediction, on folders of different sizes and kinds.

    python benchmarks/auto_budget.py --datasets digits digits-x10 photo-digits --budgets 3m \\
        --out benchmarks/results/auto-budget-<cpu>.json

Each run is ``python -m transferkit auto --data.source folder --data.root <folder> --budget B --out <fresh folder>``
in a new process, timed start to exit. Datasets (built under ``--data-dir`` once, from what this machine has):

- ``digits``: scikit-learn's 1,797 8x8 digits as 32x32 PNGs, one folder per class;
- ``digits-x10``: the same ten times over (17,970 files), each copy with its own faint noise so no two files are
  byte copies: a folder ten times larger;
- ``photo-digits``: 1,000 larger camera-like images (480x360 JPEGs, quality 85): one digit of scikit-learn's set,
  upscaled 6-14x, on a random crop of scikit-learn's two sample photographs, at a random place; the class is
  the digit. Its limits: two background photographs, synthetic placement, a single object per image.

For each run the JSON holds the rung ``auto`` chose, its predicted and measured seconds (``auto``'s own clock,
from the process's start to the printed results, and the wall time seen from outside), whether training was
stopped early to keep to the budget, and the validation and test figures the run printed. No ELPV test split is
read: ELPV's runs under the selection protocol are the issue's own measurement (docs/elpv.md).

``--against-quickstart 0 1 2`` asks instead whether ``auto`` spends the quick start's own time better: on each
seed it times ``finetune --config recipes/quickstart.yaml`` pointed at the folder, then ``auto --config
recipes/quickstart.yaml`` (the same data settings, so the same split) with that wall time as its budget, and
reports both runs' validation accuracy (the epoch of lowest validation loss, the checkpoint tested) and test
accuracy, and per dataset auto minus the quick start on the same seeds. ``--rules-dir D`` gives auto, for each
dataset, the ladder ``D/auto-rules-without-<dataset>.yaml`` chosen without it (benchmarks/auto_rules.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_difference  # noqa: E402
from provenance import provenance, save, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_digits(root: Path, copies: int = 1) -> Path:
    """scikit-learn's digits as 32x32 PNGs in ``root/<digit>/``, ``copies`` times (each copy faintly noised)."""
    from sklearn.datasets import load_digits

    if (root / "done").exists():
        return root
    digits = load_digits()
    rng = np.random.default_rng(0)
    for copy in range(copies):
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            pixels = np.kron(image * 15.9, np.ones((4, 4)))
            if copy:
                pixels = pixels + rng.normal(0, 2.0, pixels.shape)
            folder = root / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}_{copy:02d}.png")
    (root / "done").write_text("")
    return root


def make_photo_digits(root: Path, count: int = 1000, size: tuple[int, int] = (480, 360)) -> Path:
    """``count`` JPEGs of one scaled digit on a crop of scikit-learn's sample photographs, in ``root/<digit>/``."""
    from sklearn.datasets import load_digits, load_sample_images

    if (root / "done").exists():
        return root
    digits = load_digits()
    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        y0 = rng.integers(0, photo.shape[0] - height + 1)
        x0 = rng.integers(0, photo.shape[1] - width + 1)
        canvas = photo[y0 : y0 + height, x0 : x0 + width].astype(np.float32).copy()
        k = rng.integers(len(digits.images))
        scale = int(rng.integers(6, 15))
        glyph = np.kron(digits.images[k] / 16.0, np.ones((scale, scale)))
        gy = rng.integers(0, height - glyph.shape[0])
        gx = rng.integers(0, width - glyph.shape[1])
        ink = np.array(rng.choice([[250, 250, 250], [10, 10, 10], [230, 40, 40]]), dtype=np.float32)
        region = canvas[gy : gy + glyph.shape[0], gx : gx + glyph.shape[1]]
        region[:] = region * (1 - glyph[..., None]) + ink * glyph[..., None]
        folder = root / str(digits.target[k])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=85)
    (root / "done").write_text("")
    return root


DATASETS = {
    "digits": lambda d: make_digits(d / "digits"),
    "digits-x10": lambda d: make_digits(d / "digits-x10", copies=10),
    "photo-digits": lambda d: make_photo_digits(d / "photo-digits"),
}


def best_validation(run_dir: Path) -> dict:
    """The validation accuracy and loss of the epoch with the lowest validation loss (the checkpoint
    ``finetune`` tests), from Lightning's CSV log."""
    rows = []
    for path in run_dir.rglob("metrics.csv"):
        with path.open() as handle:
            rows += [r for r in csv.DictReader(handle) if r.get("val_loss") not in (None, "")]
    if not rows:
        raise SystemExit(f"no validation rows under {run_dir}")
    best = min(rows, key=lambda r: float(r["val_loss"]))
    return {
        "val_acc": float(best["val_acc"]),
        "val_loss": float(best["val_loss"]),
        "epoch": int(best["epoch"]),
    }


def _timed(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` from the repository root; it and its wall seconds, start to exit."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    return done, time.perf_counter() - start


def _figures(run_dir: Path) -> tuple[dict, dict]:
    """A run's ``metrics.json`` and its best epoch's validation figures."""
    return json.loads(next(run_dir.rglob("metrics.json")).read_text()), best_validation(run_dir)


def run_quickstart(folder: Path, seed: int) -> dict:
    """``finetune --config recipes/quickstart.yaml`` pointed at ``folder`` (seed ``seed``), timed start to exit."""
    out = Path(tempfile.mkdtemp(prefix="auto-budget-quickstart-"))
    command = [sys.executable, "-m", "transferkit", "finetune", "--config", "recipes/quickstart.yaml"]
    command += ["--data.source", "folder", "--data.root", str(folder), "--seed_everything", str(seed)]
    command += ["--data.seed", str(seed), "--trainer.default_root_dir", str(out)]
    command += ["--trainer.enable_progress_bar", "false"]
    try:
        done, wall = _timed(command)
        if done.returncode != 0:
            raise SystemExit(f"quick start on {folder} failed: {done.stderr[-2000:]}")
        metrics, validation = _figures(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "command": " ".join(["python", *command[1:]]).replace(str(out), "<fresh folder>"),
        "wall_s_outside": round(wall, 1),
        "fit_seconds": metrics.get("fit_seconds"),
        "epochs": metrics.get("epochs"),
        "sizes": metrics.get("split_sizes"),
        "validation": validation,
        "test": metrics["test"],
    }


def run_auto(
    folder: Path, budget: str, extra: list[str], seed: int | None = None, config: str | None = None
) -> dict:
    out = Path(tempfile.mkdtemp(prefix="auto-budget-"))
    command = [sys.executable, "-m", "transferkit", "auto"]
    command += ["--config", config] if config else []
    command += ["--data.source", "folder", "--data.root", str(folder)]
    if seed is not None:
        command += ["--seed_everything", str(seed), "--data.seed", str(seed)]
    command += ["--budget", budget, "--out", str(out), *extra]
    try:
        done, wall = _timed(command)
        if done.returncode != 0:
            return {"command": " ".join(command[1:]), "exit": done.returncode, "stderr": done.stderr[-2000:]}
        record = json.loads((out / "auto-plan.json").read_text())
        metrics, validation = _figures(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "command": " ".join(["python", *command[1:]]).replace(str(out), "<fresh folder>"),
        "budget_s": record["budget_s"],
        "wall_s_outside": round(wall, 1),
        "measured_s": record["measured_s"],
        "predicted_s": record["predicted_s"],
        "predicted_phases": record["predicted_phases"],
        "spent_before_training_s": record["spent_before_training_s"],
        "rung": record["rung"],
        "considered": record["considered"],
        "sizes": record["sizes"],
        "stopped_early_at_epoch": record["stopped_early_at_epoch"],
        "fit_seconds": metrics.get("fit_seconds"),
        "best_val": {metrics.get("monitor"): metrics.get("best_score")},
        "validation": validation,
        "test": record["test"],
        "within_budget_plus_10_percent": wall <= 1.1 * record["budget_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["digits"])
    parser.add_argument("--budgets", nargs="+", default=["3m"])
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "transferkit-auto-data"))
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--against-quickstart",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="instead of --budgets: on these seeds, time the quick-start recipe on each folder, then auto with "
        "that wall time as its budget, on the same split (auto --config recipes/quickstart.yaml)",
    )
    parser.add_argument(
        "--rules-dir",
        default=None,
        help="give auto, for dataset D, the ladder <rules-dir>/auto-rules-without-D.yaml (chosen without D)",
    )
    parser.add_argument("extra", nargs="*", help="more auto arguments, after --")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    runs = []
    report = {"runs": runs, "provenance": provenance()}
    if args.against_quickstart is not None:
        report["pairs"] = against_quickstart(args, data_dir, runs, report)
        save(report, args.out)
        return
    for name in args.datasets:
        folder = DATASETS[name](data_dir)
        for budget in args.budgets:
            run = {"dataset": name, **run_auto(folder, budget, args.extra)}
            runs.append(run)
            print(json.dumps({k: run.get(k) for k in ("dataset", "budget_s", "wall_s_outside", "predicted_s")}),
                  file=sys.stderr)  # fmt: skip
            if args.out:
                write(report, args.out)  # partial results survive an interrupted benchmark
    save(report, args.out)


def _rules(args: argparse.Namespace, dataset: str) -> list[str]:
    if not args.rules_dir:
        return []
    # digits-x10 is digits again: its ladder is the one chosen without digits
    held_out = "digits" if dataset == "digits-x10" else dataset
    return ["--rules", str(Path(args.rules_dir) / f"auto-rules-without-{held_out}.yaml")]


def against_quickstart(args: argparse.Namespace, data_dir: Path, runs: list, report: dict) -> list[dict]:
    """Per dataset and seed: the quick start's wall time, validation and test figures, and auto's at that budget
    on the same split; per dataset, auto minus the quick start (validation and test accuracy) per seed."""
    pairs = []
    for name in args.datasets:
        folder = DATASETS[name](data_dir)
        for seed in args.against_quickstart:
            quick = {"dataset": name, "seed": seed, "arm": "quickstart", **run_quickstart(folder, seed)}
            runs.append(quick)
            budget = f"{math.ceil(quick['wall_s_outside'])}s"
            extra = [*_rules(args, name), *args.extra]
            auto = {
                "dataset": name,
                "seed": seed,
                "arm": "auto",
                **run_auto(folder, budget, extra, seed, QUICK),
            }
            runs.append(auto)
            print(json.dumps({"dataset": name, "seed": seed, "quick": quick["wall_s_outside"],
                              "auto": auto.get("wall_s_outside")}), file=sys.stderr)  # fmt: skip
            if args.out:
                write(report, args.out)
        mine = [r for r in runs if r["dataset"] == name]
        both = {"quickstart": {"val_acc": [], "test_acc": []}, "auto": {"val_acc": [], "test_acc": []}}
        for seed in args.against_quickstart:
            arms = {r["arm"]: r for r in mine if r["seed"] == seed}
            if "validation" not in arms["auto"]:
                continue  # the auto run failed; its stderr is in the run
            for arm, run in arms.items():
                both[arm]["val_acc"].append(run["validation"]["val_acc"])
                both[arm]["test_acc"].append(run["test"]["test_acc"])
        pairs.append(
            {
                "dataset": name,
                "auto_minus_quickstart": {
                    key: paired_difference(both["quickstart"][key], both["auto"][key])
                    for key in ("val_acc", "test_acc")
                },
            }
        )
    return pairs


QUICK = "recipes/quickstart.yaml"

if __name__ == "__main__":
    main()
