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
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


def run_auto(folder: Path, budget: str, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="auto-budget-"))
    command = [
        sys.executable,
        "-m",
        "transferkit",
        "auto",
        "--data.source",
        "folder",
        "--data.root",
        str(folder),
    ]
    command += ["--budget", budget, "--out", str(out), *extra]
    try:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return {"command": " ".join(command[1:]), "exit": done.returncode, "stderr": done.stderr[-2000:]}
        record = json.loads((out / "auto-plan.json").read_text())
        metrics = json.loads(next(out.rglob("metrics.json")).read_text())
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
        "test": record["test"],
        "within_budget_plus_10_percent": wall <= 1.1 * record["budget_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["digits"])
    parser.add_argument("--budgets", nargs="+", default=["3m"])
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "transferkit-auto-data"))
    parser.add_argument("--out", default=None)
    parser.add_argument("extra", nargs="*", help="more auto arguments, after --")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    runs = []
    report = {"runs": runs, "provenance": provenance()}
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


if __name__ == "__main__":
    main()
