"""Multi-label on images holding several objects: digit composites (2-4 different digits per image), under
the selection protocol's cross-validation.

    python benchmarks/kinds_digits.py --images 2000 --side 128 --seeds 0 \\
        --out benchmarks/results/kinds-digit-composites-5folds-seed0-<cpu>.json

It writes the composites (:func:`transferkit.data.composites.write_digit_composites`: the test images' digits
come from scikit-learn images no training image uses), then runs ``transferkit cv --config
benchmarks/configs/digit-composites-multilabel.yaml --folds 5 --checkpoint last`` per seed through
``selection.run`` (provenance: commit, command, CPU model, wall and CPU seconds), and reports the pooled
out-of-fold figures per label (average precision, ROC AUC, F1 at 0.5) and the folds' mAP, macro and micro F1
as ``cv`` logged them. No test split is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402
from selection import cv_command, run  # noqa: E402

CONFIG = "benchmarks/configs/digit-composites-multilabel.yaml"
PREDICTIONS_FILE = "cv_predictions.npz"


def per_label(folder: Path) -> dict:
    """Pooled out-of-fold figures per label of one cross-validation."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    probs, truth = [], []
    for path in sorted(folder.glob(f"fold_*/{PREDICTIONS_FILE}")):
        arrays = np.load(path)
        probs.append(arrays["val_probs"])
        truth.append(arrays["val_label"])
    p, y = np.concatenate(probs), (np.concatenate(truth) >= 0.5).astype(int)
    labels = {
        str(j): {
            "positives": int(y[:, j].sum()),
            "average_precision": round(float(average_precision_score(y[:, j], p[:, j])), 4),
            "roc_auc": round(float(roc_auc_score(y[:, j], p[:, j])), 4),
            "f1_at_0.5": round(float(f1_score(y[:, j], p[:, j] >= 0.5)), 4),
        }
        for j in range(y.shape[1])
    }
    decided = p >= 0.5
    return {
        "images": len(y),
        "labels": labels,
        "map": round(float(np.mean([v["average_precision"] for v in labels.values()])), 4),
        "f1_macro_at_0.5": round(float(np.mean([v["f1_at_0.5"] for v in labels.values()])), 4),
        "f1_micro_at_0.5": round(float(f1_score(y.ravel(), decided.ravel())), 4),
        "exact_match_at_0.5": round(float((decided == y).all(axis=1).mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--runs", default="runs/cv/digit-composites")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from transferkit.data.composites import write_digit_composites

    data = Path("runs/digit-composites/data")
    csv = data / "composites.csv"
    if not csv.exists():  # the config reads it from here; written once, seed 0
        write_digit_composites(data, count=args.images, seed=0, side=args.side)
    report = {"benchmark": "multi-label on digit composites, cross-validated", "config": CONFIG, "seeds": {}}
    for seed in args.seeds:
        out = Path(args.runs) / f"s{seed}"
        record = run(cv_command(CONFIG, args.folds, out, seed, seed, []), out)
        logged = json.loads((out / "cv.json").read_text())
        report["seeds"][str(seed)] = {
            "folds_logged": {k: v for k, v in logged.items() if k in ("mean", "std")},
            "pooled_out_of_fold": per_label(out),
            "run": record,
        }
    report["data"] = {"images": args.images, "side": args.side, "csv": str(csv), "digits_per_image": [2, 4]}
    report["provenance"] = provenance()
    save(report, args.out)


if __name__ == "__main__":
    main()
