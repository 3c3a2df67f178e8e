"""Two recipes compared by cross-validation, paired by fold and seed: the selection protocol's comparison.

    python -m transferkit cv --config BASE.yaml --folds 5 --checkpoint last --out runs/cv/base-s0 \
        --seed_everything 0 --data.seed 0
    python -m transferkit cv --config VARIANT.yaml --folds 5 --checkpoint last --out runs/cv/variant-s0 \
        --seed_everything 0 --data.seed 0
    ... (the same for seed 1, ...)
    python benchmarks/compare_cv.py --base runs/cv/base-s0 runs/cv/base-s1 \\
        --variant runs/cv/variant-s0 runs/cv/variant-s1 --positive 2 3 --out benchmarks/results/X.json

Every non-test image validates once per seed, so the comparison rests on all of them, not on one validation
split. Each fold of a seed is paired with the same fold of the other recipe (the same validation cells,
checked), and the per-(fold, seed) accuracy differences are judged with Nadeau and Bengio's corrected
resampled t-test (:func:`paired.corrected_t`), which allows for folds sharing most of their training images.
Per seed, McNemar's exact test over the pooled out-of-fold cells is reported beside it. Give the base twice
(two runs of the same recipe with other training seeds) for an A/A comparison: its spread says the smallest
gain the design resolves (:func:`paired.smallest_resolved_gain`).

Runs of multi-label models compare images with every label right (decisions at 0.5: folds fit no
thresholds; the image is the unit, its labels' decisions not being independent), and regression runs compare
as decisions on either side of ``--threshold``: McNemar's test needs right-or-wrong cells.
``--positive`` scores a grouping of the classes as well: the classes whose summed probability reaches 0.5
predict the positive group (ELPV's 4 defect levels: ``--positive 2 3``, defective = 2/3 and 1). No test
split is read: the cross-validations are run without ``--ensemble``. ``--checkpoint last`` (fixed epochs, no
early stopping) keeps the epoch from being chosen on the cells that judge the recipes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import corrected_t, mcnemar, resolved_gain_floor, smallest_resolved_gain  # noqa: E402
from provenance import provenance, save  # noqa: E402

PREDICTIONS_FILE = "cv_predictions.npz"  # transferkit.tuning.cross_validation's, in each fold's folder


def fold_outcomes(
    folder: str | Path, positive: list[int] | None = None, threshold: float | None = None
) -> list[dict[str, np.ndarray]]:
    """Per fold of the cross-validation in ``folder``: its validation cells' indices and whether each was
    predicted right (the class, or with ``positive`` the group; every label of a multi-label run, at 0.5; a
    regression's value on the same side of ``threshold`` as the truth)."""
    folds = sorted(Path(folder).glob(f"fold_*/{PREDICTIONS_FILE}"), key=lambda p: int(p.parent.name[5:]))
    if not folds:
        raise SystemExit(
            f"no fold predictions (fold_*/{PREDICTIONS_FILE}) in '{folder}': run `transferkit cv` first"
        )
    out = []
    for path in folds:
        arrays = np.load(path)
        kind = str(arrays["kind"]) if "kind" in arrays else "single_label"
        if kind != "single_label":  # multi-label: each label decision; regression: the side of a threshold
            from transferkit.tuning.cross_validation import cell_outcomes

            found = cell_outcomes(dict(arrays), positive=positive, threshold=threshold)
            if not found["binary"]:
                raise SystemExit(
                    f"'{folder}' holds a regression's predictions, whose errors are not right or wrong: give "
                    "--threshold T to compare them as decisions (value and truth on the same side of T)"
                )
            correct = np.asarray(found["outcome"], dtype=bool).reshape(len(arrays["val_index"]), -1)
            # the image is the unit McNemar pairs: its label decisions are not independent of each other
            out.append({"index": arrays["val_index"], "correct": correct.all(axis=1)})
            continue
        labels, probs = arrays["val_label"], arrays["val_probs"]
        if positive:
            truth = np.isin(labels, positive)
            correct = (probs[:, positive].sum(axis=1) >= 0.5) == truth
        else:
            correct = arrays["val_pred"] == labels
        out.append({"index": arrays["val_index"], "correct": correct})
    return out


def compare(
    base: list[str], variant: list[str], positive: list[int] | None = None, threshold: float | None = None
) -> dict:
    """The protocol's figures for runs ``base[i]`` and ``variant[i]`` (seed ``i`` each)."""
    if len(base) != len(variant):
        raise SystemExit(f"give one base and one variant run per seed, got {len(base)} and {len(variant)}")
    runs = [
        (b_dir, v_dir, fold_outcomes(b_dir, positive, threshold), fold_outcomes(v_dir, positive, threshold))
        for b_dir, v_dir in zip(base, variant, strict=True)
    ]
    scored = "group of classes " + str(positive) if positive else "class"
    if threshold is not None:
        scored = f"a regression's value on the truth's side of {threshold}"
    return {**compare_outcomes(runs), "scored": scored}


def compare_outcomes(runs: list[tuple[str, str, list[dict], list[dict]]]) -> dict:
    """The protocol's figures from per-fold outcomes: ``runs`` holds, per seed, the base's and the variant's
    folder and their :func:`fold_outcomes` (``index`` and ``correct`` per fold), however each run's cells
    were judged right (a class, a group of classes, one label of a multi-label model, a rounded number)."""
    differences, seeds = [], []
    sizes = []
    for b_dir, v_dir, b_folds, v_folds in runs:
        if len(b_folds) != len(v_folds):
            raise SystemExit(
                f"'{b_dir}' has {len(b_folds)} folds, '{v_dir}' {len(v_folds)}: compare equal designs"
            )
        per_fold = []
        for k, (b, v) in enumerate(zip(b_folds, v_folds, strict=True)):
            if not np.array_equal(b["index"], v["index"]):
                raise SystemExit(
                    f"fold {k} of '{b_dir}' and '{v_dir}' validate on other cells: give both the same data, "
                    "folds and data.seed"
                )
            per_fold.append(float(v["correct"].mean() - b["correct"].mean()))
            sizes.append(len(b["index"]))
        differences += per_fold
        pooled_b = np.concatenate([f["correct"] for f in b_folds])
        pooled_v = np.concatenate([f["correct"] for f in v_folds])
        seeds.append(
            {
                "base": b_dir,
                "variant": v_dir,
                "per_fold_difference": [round(d, 4) for d in per_fold],
                "base_accuracy": round(float(pooled_b.mean()), 4),
                "variant_accuracy": round(float(pooled_v.mean()), 4),
                "mcnemar": mcnemar(pooled_b.tolist(), pooled_v.tolist()),
            }
        )
    count = len(runs)
    cells = sum(sizes) // count  # every non-test cell validates once per seed
    n_test = round(cells / (len(sizes) // count))
    result = corrected_t(differences, n_train=cells - n_test, n_test=n_test)
    return {
        "design": {"folds": len(sizes) // count, "seeds": count, "cells_per_seed": cells},
        "seeds": seeds,
        "corrected_t": result,
        "smallest_resolved_gain_if_a_a": round(
            smallest_resolved_gain(differences, cells - n_test, n_test), 4
        ),
        "resolved_gain_floor_if_a_a": round(resolved_gain_floor(differences, cells - n_test, n_test), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", nargs="+", required=True, help="cv output folders of the base, one per seed"
    )
    parser.add_argument(
        "--variant", nargs="+", required=True, help="cv output folders of the variant, same seeds"
    )
    parser.add_argument("--positive", nargs="+", type=int, default=None, help="classes of the positive group")
    parser.add_argument(
        "--threshold", type=float, default=None, help="regression runs: score value >= T against truth >= T"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = {
        "benchmark": "cv paired comparison",
        **compare(args.base, args.variant, args.positive, args.threshold),
    }
    report["provenance"] = provenance()
    save(report, args.out)


if __name__ == "__main__":
    main()
