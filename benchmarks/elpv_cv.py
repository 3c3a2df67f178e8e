"""Cross-validation on ELPV: how far the k-fold estimate is from held-out test accuracy, what the ensemble of the
fold models gains on the test split, and how calibrated the fold models are before and after temperature scaling.

    python benchmarks/elpv_cv.py --config recipes/elpv-4class.yaml --folds 5 --out runs/elpv-cv \\
        --single benchmarks/results/elpv-4class-5seeds-2core-cpu.json --save benchmarks/results/X.json

It runs ``python -m transferkit cv --config X --folds K --ensemble --out DIR``, which resumes: a finished
cross-validation in DIR is read back, not trained again. Then it reads each fold's stored probabilities
(``fold_<i>/cv_predictions.npz``) and reports:

- **the estimate**: the folds' validation accuracies, mean +- std (ddof=1), and the pooled out-of-fold accuracy;
- **the test split** (the recipe's, never seen by a fold's training or choices): each fold model's accuracy,
  their mean +- std, the ensemble's (the folds' class probabilities averaged), and the ensemble's gain over
  each fold model (paired: same images);
- **calibration**: each fold's temperature, fitted on its own validation part, and the expected calibration
  error (15 bins) and NLL on the test split before and after it; the ensemble's, with each fold's
  probabilities calibrated before they are averaged. A reliability diagram of the pooled fold predictions on
  the test split, before and after, is written as a PNG beside the results file;
- for a 4-class ELPV recipe, the binary figures too (defective = P(2/3) + P(1) >= 0.5, as benchmarks/elpv.py);
- with ``--single``, the same recipe's held-out figures on this seed from a results file of
  benchmarks/elpv.py (one split: trained on 85 % of the non-test images, validated on 15 %).

The test split is scored once, by the cross-validation's ``--ensemble``; that look is recorded in
``benchmarks/results/elpv-test-ledger.jsonl`` (one line, the recipe's fingerprint with ``cv --folds K
--ensemble``), and a second cross-validation of the same recipe into a fresh folder is refused without
``--rerun``. Re-reading a finished folder scores nothing and adds no line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elpv import already_tested, check_test_allowed, recipe_fingerprint, record_test_look  # noqa: E402
from provenance import provenance, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def accuracies(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Class accuracy, and for four ELPV classes the binary accuracy (classes 2/3 and 1 are defective)."""
    out = {"acc": float((probs.argmax(1) == labels).mean())}
    if probs.shape[1] == 4:
        out["acc_binary"] = float(((probs[:, 2:].sum(1) >= 0.5) == (labels >= 2)).mean())
    return out


def temperature_scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: the model's probabilities at temperature ``T`` (log p is the logits up to a
    per-image constant, which the softmax ignores)."""
    logits = np.log(np.clip(probs, 1e-12, None)) / temperature
    logits -= logits.max(1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def analyse(folds: list[dict[str, np.ndarray]]) -> dict:
    """The estimate, the test figures and the calibration of stored fold predictions (see the module text)."""
    import torch

    from transferkit.models.calibration import expected_calibration_error, fit_temperature

    per_fold, calibrated = [], []
    test_labels = folds[0]["test_label"]
    for fold, arrays in enumerate(folds):
        if not np.array_equal(arrays["test_index"], folds[0]["test_index"]):
            raise SystemExit(f"fold {fold} scored other test images than fold 0: not one cross-validation")
        val_probs, val_labels = arrays["val_probs"], arrays["val_label"]
        temperature = fit_temperature(torch.from_numpy(np.log(np.clip(val_probs, 1e-12, None))), val_labels)
        test_probs = arrays["test_probs"]
        after = temperature_scaled(test_probs, temperature)
        calibrated.append(after)
        per_fold.append(
            {
                "fold": fold,
                "val_images": len(val_labels),
                "val": accuracies(val_probs, val_labels),
                "test": accuracies(test_probs, test_labels),
                "temperature": temperature,
                "test_ece_before": expected_calibration_error(test_probs, test_labels),
                "test_ece_after": expected_calibration_error(after, test_labels),
                "test_nll_before": nll(test_probs, test_labels),
                "test_nll_after": nll(after, test_labels),
            }
        )
    oof_probs = np.concatenate([f["val_probs"] for f in folds])
    oof_labels = np.concatenate([f["val_label"] for f in folds])
    ensemble = np.mean([f["test_probs"] for f in folds], axis=0)
    ensemble_calibrated = np.mean(calibrated, axis=0)
    ensemble_acc = accuracies(ensemble, test_labels)
    keys = list(per_fold[0]["test"])

    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values)}

    return {
        "folds": per_fold,
        "estimate": {
            **{f"val_{k}": spread([f["val"][k] for f in per_fold]) for k in keys},
            "out_of_fold": accuracies(oof_probs, oof_labels),
            "non_test_images": len(oof_labels),
        },
        "test": {
            "images": len(test_labels),
            **{f"fold_models_{k}": spread([f["test"][k] for f in per_fold]) for k in keys},
            "ensemble": ensemble_acc,
            # paired: the ensemble and each fold model on the same test images
            **{
                f"ensemble_gain_{k}": spread([ensemble_acc[k] - f["test"][k] for f in per_fold]) for k in keys
            },
            "estimate_minus_test": {
                k: statistics.mean([f["val"][k] for f in per_fold])
                - statistics.mean([f["test"][k] for f in per_fold])
                for k in keys
            },
        },
        "calibration": {
            "temperature": spread([f["temperature"] for f in per_fold]),
            "fold_models_test_ece_before": spread([f["test_ece_before"] for f in per_fold]),
            "fold_models_test_ece_after": spread([f["test_ece_after"] for f in per_fold]),
            "fold_models_test_nll_before": spread([f["test_nll_before"] for f in per_fold]),
            "fold_models_test_nll_after": spread([f["test_nll_after"] for f in per_fold]),
            # every fold model's test predictions pooled (5 x the test split): what the PNG draws
            "pooled_test_ece_before": expected_calibration_error(
                np.concatenate([f["test_probs"] for f in folds]), np.tile(test_labels, len(folds))
            ),
            "pooled_test_ece_after": expected_calibration_error(
                np.concatenate(calibrated), np.tile(test_labels, len(folds))
            ),
            "ensemble_test_ece_before": expected_calibration_error(ensemble, test_labels),
            "ensemble_test_ece_after": expected_calibration_error(ensemble_calibrated, test_labels),
            "ensemble_test_nll_before": nll(ensemble, test_labels),
            "ensemble_test_nll_after": nll(ensemble_calibrated, test_labels),
            "ece_bins": 15,
        },
    }


def draw(folds: list[dict[str, np.ndarray]], report: dict, path: Path) -> Path:
    """Reliability diagram of the fold models' test predictions, pooled, before and after their temperatures."""
    from transferkit.models.calibration import expected_calibration_error, reliability_bins
    from transferkit.reporting.interpretation_plots import reliability_diagram

    labels = np.concatenate([f["test_label"] for f in folds])
    before = np.concatenate([f["test_probs"] for f in folds])
    temperatures = [f["temperature"] for f in report["folds"]]
    after = np.concatenate(
        [temperature_scaled(f["test_probs"], t) for f, t in zip(folds, temperatures, strict=True)]
    )
    curves = {"before": reliability_bins(before, labels), "after": reliability_bins(after, labels)}
    eces = {
        "before": expected_calibration_error(before, labels),
        "after": expected_calibration_error(after, labels),
    }
    title = f"{len(folds)} fold models on the test split ({len(folds[0]['test_label'])} images each)"
    return reliability_diagram(curves, eces, path, title=title)


def single_split(path: str, seed: int) -> dict:
    """The recipe's one-split figures on ``seed`` from a benchmarks/elpv.py results file."""
    report = json.loads(Path(path).read_text())
    for run in report["seeds"]:
        if run["seed"] == seed:
            return {"file": path, "seed": seed, "val": run["val"], "test": run.get("test")}
    raise SystemExit(f"{path} holds no seed {seed}")


def data_seed(config: str, overrides: list[str]) -> int:
    """The recipe's ``data.seed`` (which picks the test split), as overridden on the command line."""
    import yaml

    seed = (yaml.safe_load(Path(config).read_text()).get("data") or {}).get("seed", 0)
    for i, arg in enumerate(overrides):
        if arg.startswith("--data.seed="):
            seed = arg.split("=", 1)[1]
        elif arg == "--data.seed" and i + 1 < len(overrides):
            seed = overrides[i + 1]
    return int(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "recipes" / "elpv-4class.yaml"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", required=True, help="the cross-validation's folder (resumed if it exists)")
    parser.add_argument("--single", default=None, help="a benchmarks/elpv.py results file of the same recipe")
    parser.add_argument(
        "--rerun", action="store_true", help="a fresh cross-validation of a recipe already tested"
    )
    parser.add_argument("--save", default=None, help="also write the JSON to this results file")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]

    out = Path(args.out)
    fingerprint = recipe_fingerprint(args.config, [*extra, "cv", f"--folds={args.folds}", "--ensemble"])
    state = out / "cv_state.json"
    finished = json.loads(state.read_text()).get("finished", {}) if state.is_file() else {}
    seed = data_seed(args.config, extra)
    # the test split is scored unless every fold already was; a look made before (by this script or by
    # the cv command itself) that the ledger lacks is recorded too
    scores_test = len([f for f in finished.values() if f.get("test")]) < args.folds
    seen_before = check_test_allowed(fingerprint, [seed], args.rerun) if scores_test else []
    on_ledger = bool(already_tested(fingerprint, [seed]))
    record = provenance()
    command = [sys.executable, "-m", "transferkit", "cv", "--config", args.config, "--folds", str(args.folds)]
    command += ["--ensemble", "--out", str(out), *extra]
    subprocess.run(command, check=True, cwd=ROOT)

    cv = json.loads((out / "cv.json").read_text())
    folds = []
    for i in range(args.folds):
        with np.load(out / f"fold_{i}" / "cv_predictions.npz", allow_pickle=False) as stored:
            folds.append(dict(stored))
    report = analyse(folds)
    fit_seconds = []
    for i, fold in enumerate(cv["folds"]):
        metrics = json.loads((Path(fold["run_dir"]) / "metrics.json").read_text())
        report["folds"][i] |= {"epochs": fold["epochs"], "fit_seconds": metrics.get("fit_seconds")}
        fit_seconds.append(metrics.get("fit_seconds"))
    result = {
        "benchmark": "elpv_cv",
        "config": args.config,
        "overrides": extra,
        "recipe": fingerprint,
        "folds": args.folds,
        "data_seed": seed,
        **report,
        "fit_seconds_total": round(sum(s for s in fit_seconds if s), 1),
        "single_split": single_split(args.single, seed) if args.single else None,
        "provenance": record,
    }
    picture = Path(args.save).with_suffix(".png") if args.save else out / "reliability_test.png"
    result["reliability_png"] = str(draw(folds, report, picture))
    if scores_test or not on_ledger:
        ensemble = report["test"]["ensemble"]
        overrides = [*extra, "cv", f"--folds={args.folds}", "--ensemble"]
        accuracy = ensemble.get("acc_binary", ensemble["acc"])
        record_test_look(record, args.config, overrides, fingerprint, seed, bool(seen_before), accuracy)
    save(result, args.save)


if __name__ == "__main__":
    main()
