"""The target kinds on ELPV, under the selection protocol: one multi-label model against two single-label
models, and the defect probability as a number against the 4-class recipe and soft labels.

    python benchmarks/kinds_elpv.py --seeds 0 --runs runs/cv/protocol \\
        --out benchmarks/results/kinds-elpv-5folds-seed0-<cpu>.json

Every arm is ``transferkit cv --config recipes/quickstart.yaml --folds 5 --checkpoint last`` with the
overrides below, on seed ``s`` (``seed_everything s``, ``data.seed s``): the same recipe and budget, the same
folds (ELPV's label sets share their strata, so every arm validates the same cells in each fold), and no test
split is read. Runs are made (or taken back, or resumed) by ``selection.run``, which keeps each run's
provenance (commit, command, CPU model, wall and CPU seconds). ``base`` is the quick start itself (4 defect
levels, scored as functional/defective through its class groups): the protocol's existing base run.

The arms that differ from the quick start only in the kind of target cannot use its label smoothing (a
multi-label or regression model refuses it): they train without, which is part of what is compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_cv import compare_outcomes  # noqa: E402
from provenance import provenance, save  # noqa: E402
from selection import cv_command, run  # noqa: E402

RECIPE = "recipes/quickstart.yaml"

# arm -> overrides of the quick start (key=value, recipe keys with dots)
ARMS: dict[str, list[str]] = {
    "base": [],
    "cell-type": ["data.task=cell_type"],
    "soft-binary": ["data.task=binary", "data.soft_labels=true"],
    "multi-label": [
        "data.task=defective_polycrystalline",
        "data.target.kind=multi_label",
        "model.regularisation.label_smoothing=0",
    ],
    "regression": [
        "data.task=defect_probability",
        "data.target.kind=regression",
        "model.regularisation.label_smoothing=0",
    ],
}


def run_arms(arms: list[str], seeds: list[int], folds: int, runs: Path) -> dict[str, dict[int, dict]]:
    """Run (or take back) each arm's cross-validation per seed; their provenance records."""
    records: dict[str, dict[int, dict]] = {}
    for arm in arms:
        for seed in seeds:
            out = runs / f"{arm}-s{seed}"
            command = cv_command(RECIPE, folds, out, seed, seed, ARMS[arm])
            records.setdefault(arm, {})[seed] = run(command, out)
    return records


PREDICTIONS_FILE = "cv_predictions.npz"  # each fold's, written by transferkit cv

# how a run's validation cells are judged right, per question: arm -> (fold arrays -> bool per cell)
DEFECTIVE_LEVELS = [2, 3]  # the quick start's 4 defect levels: 2/3 and 1 are defective


def _levels_of(probability: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(probability, dtype=np.float64) * 3), 0, 3).astype(int)


def judged(arm: str, question: str, arrays: dict) -> np.ndarray:
    """Whether each validation cell of one fold of ``arm`` is right on ``question`` (``defective``,
    ``polycrystalline`` or ``level``, the 4 annotated levels)."""
    label, probs = np.asarray(arrays["val_label"]), np.asarray(arrays["val_probs"])
    if arm == "base":  # 4 levels, defective = the summed probability of 2/3 and 1 (its class groups)
        if question == "defective":
            return (probs[:, DEFECTIVE_LEVELS].sum(axis=1) >= 0.5) == np.isin(label, DEFECTIVE_LEVELS)
        if question == "level":
            return probs.argmax(axis=1) == label
    if arm == "cell-type" and question == "polycrystalline":
        return probs.argmax(axis=1) == label
    if arm == "soft-binary" and question == "defective":
        return probs.argmax(axis=1) == label
    if arm == "multi-label" and question in ("defective", "polycrystalline"):
        j = 0 if question == "defective" else 1
        return (probs[:, j] >= 0.5) == (label[:, j] >= 0.5)  # 0.5: no threshold is fitted on judging cells
    if arm == "regression":
        value, truth = probs.reshape(len(probs), -1)[:, 0], label.reshape(len(label), -1)[:, 0]
        if question == "defective":
            return (value >= 0.5) == (truth >= 0.5)
        if question == "level":
            return _levels_of(value) == _levels_of(truth)
    raise ValueError(f"arm {arm!r} does not answer {question!r}")


def outcomes(folder: Path, arm: str, question: str) -> list[dict[str, np.ndarray]]:
    """Per fold: the validation cells' indices and whether ``arm`` got each right on ``question``."""
    folds = sorted(folder.glob(f"fold_*/{PREDICTIONS_FILE}"), key=lambda p: int(p.parent.name[5:]))
    if not folds:
        raise SystemExit(f"no fold predictions in '{folder}': run the arm first")
    out = []
    for path in folds:
        arrays = dict(np.load(path))
        out.append({"index": arrays["val_index"], "correct": judged(arm, question, arrays)})
    return out


# (question, base arm, variant arm): each compared by the protocol, paired by fold and seed
COMPARISONS = [
    ("defective", "base", "multi-label"),
    ("polycrystalline", "cell-type", "multi-label"),
    ("defective", "base", "regression"),
    ("defective", "soft-binary", "regression"),
    ("level", "base", "regression"),
]


def label_figures(folders: list[Path]) -> dict:
    """The multi-label arm's pooled out-of-fold figures per label (AP, ROC AUC, F1 and accuracy at 0.5)."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    probs, truth = [], []
    for folder in folders:
        for path in sorted(folder.glob(f"fold_*/{PREDICTIONS_FILE}")):
            arrays = np.load(path)
            probs.append(arrays["val_probs"])
            truth.append(arrays["val_label"])
    p, y = np.concatenate(probs), (np.concatenate(truth) >= 0.5).astype(int)
    names = ["defective", "polycrystalline"]
    return {
        name: {
            "average_precision": round(float(average_precision_score(y[:, j], p[:, j])), 4),
            "roc_auc": round(float(roc_auc_score(y[:, j], p[:, j])), 4),
            "f1_at_0.5": round(float(f1_score(y[:, j], p[:, j] >= 0.5)), 4),
            "accuracy_at_0.5": round(float(((p[:, j] >= 0.5) == y[:, j]).mean()), 4),
            "positives": int(y[:, j].sum()),
        }
        for j, name in enumerate(names)
    }


def regression_figures(folders: list[Path]) -> dict:
    """The regression arm's pooled out-of-fold figures: MAE, RMSE, R^2 of the probability."""
    values, truth = [], []
    for folder in folders:
        for path in sorted(folder.glob(f"fold_*/{PREDICTIONS_FILE}")):
            arrays = np.load(path)
            values.append(np.asarray(arrays["val_probs"]).reshape(-1))
            truth.append(np.asarray(arrays["val_label"]).reshape(-1))
    v, t = np.concatenate(values), np.concatenate(truth)
    residual = v - t
    return {
        "mae": round(float(np.abs(residual).mean()), 4),
        "rmse": round(float(np.sqrt((residual**2).mean())), 4),
        "r2": round(float(1 - (residual**2).sum() / ((t - t.mean()) ** 2).sum()), 4),
        "predicted_range": [round(float(v.min()), 4), round(float(v.max()), 4)],
    }


def _record(folder: Path) -> dict:
    """A run's provenance record, or what is known of a run without one (still going, or stopped)."""
    path = folder / "provenance.json"
    if path.exists():
        return json.loads(path.read_text())
    done = len(list(folder.glob(f"fold_*/{PREDICTIONS_FILE}")))
    return {"unfinished": True, "folds_finished": done, "folder": str(folder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--runs", default="runs/cv/protocol")
    parser.add_argument("--run-only", action="store_true", help="run the cross-validations, compare nothing")
    parser.add_argument(
        "--analyse-only", action="store_true", help="compare the folds the runs have finished, run nothing"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.analyse_only:  # runs made (or still running) elsewhere: their finished folds, and records if any
        records = {
            arm: {s: _record(Path(args.runs) / f"{arm}-s{s}") for s in args.seeds} for arm in args.arms
        }
    else:
        records = run_arms(args.arms, args.seeds, args.folds, Path(args.runs))
    if args.run_only:
        print(
            json.dumps(
                {arm: {str(s): r for s, r in by_seed.items()} for arm, by_seed in records.items()}, indent=2
            )
        )
        return
    runs = Path(args.runs)
    folder = {arm: [runs / f"{arm}-s{seed}" for seed in args.seeds] for arm in args.arms}
    comparisons = {}
    for question, base, variant in COMPARISONS:
        if base not in folder or variant not in folder:
            continue
        paired = []
        for b, v in zip(folder[base], folder[variant], strict=True):
            b_folds, v_folds = outcomes(b, base, question), outcomes(v, variant, question)
            k = min(len(b_folds), len(v_folds))  # a run still going: the folds both have finished
            paired.append((str(b), str(v), b_folds[:k], v_folds[:k]))
        if min(len(b_folds) for _, _, b_folds, _ in paired) < 2:  # too few folds for the corrected t
            from paired import mcnemar

            (b_dir, v_dir, b_folds, v_folds), *_ = paired
            b_cells, v_cells = b_folds[0]["correct"], v_folds[0]["correct"]
            comparisons[f"{question}: {variant} against {base}"] = {
                "partial": f"1 of {args.folds} folds finished when compared: McNemar over its cells only",
                "base_accuracy": round(float(b_cells.mean()), 4),
                "variant_accuracy": round(float(v_cells.mean()), 4),
                "difference": round(float(v_cells.mean() - b_cells.mean()), 4),
                "mcnemar": mcnemar(b_cells.tolist(), v_cells.tolist()),
                "base": b_dir,
                "variant": v_dir,
            }
            continue
        found = compare_outcomes(paired)
        if found["design"]["folds"] < args.folds:
            found["partial"] = f"{found['design']['folds']} of {args.folds} folds finished when compared"
        comparisons[f"{question}: {variant} against {base}"] = found
    report = {
        "benchmark": "target kinds on ELPV under the selection protocol",
        "recipe": RECIPE,
        "arms": {arm: ARMS[arm] for arm in args.arms},
        "comparisons": comparisons,
        "runs": {arm: {str(s): r for s, r in by_seed.items()} for arm, by_seed in records.items()},
    }
    if "multi-label" in folder:
        report["multi_label_per_label"] = label_figures(folder["multi-label"])
    if "regression" in folder:
        report["regression"] = regression_figures(folder["regression"])
    report["provenance"] = provenance()
    save(report, args.out)


if __name__ == "__main__":
    main()
