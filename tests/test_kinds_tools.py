"""The tools that drive a model, data and a Trainer, for multi-label and regression targets: ``cv`` (the kind's
figures per fold, out-of-fold predictions, what a paired comparison pairs), ``lr-find``, ``augment-search``,
the monitor of early stopping and checkpoints, and ``probe``, ``diagnose`` and ``plan``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import NORM, TINY_BACKBONE, quiet_trainer, run_cli

import transferkit as tk
from transferkit.data.datamodule import cv_split_indices
from transferkit.training.checkpointing import RunCheckpoint
from transferkit.training.early_stopping import PhaseEarlyStopping
from transferkit.tuning.cross_validation import cell_outcomes, cross_validate

TARGETS = {
    "multi_label": {"kind": "multi_label"},  # the labels column: "red;blue", "red", ...
    "regression": {"kind": "regression", "columns": ["level"]},  # the background's brightness, 0..1
}
FIGURES = {
    "multi_label": ("val_map", "val_f1_macro", "val_f1_micro", "val_auroc", "val_loss"),
    "regression": ("val_mae", "val_rmse", "val_r2", "val_loss"),
}
QUIET = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


def _data(squares_csv: Path, kind: str, **settings) -> tk.ImageDataModule:
    return tk.ImageDataModule(
        source="csv",
        csv_path=str(squares_csv),
        target=TARGETS[kind],
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0, "batch_size": 16},
        **settings,
    )


def _model(dm: tk.ImageDataModule, **settings) -> tk.TransferClassifier:
    return tk.TransferClassifier(
        num_classes=dm.num_classes,
        class_names=dm.class_names,
        target=dm.target_kind,
        backbone=TINY_BACKBONE,
        pretrained=False,
        optimizer={"lr": 3e-3, "layer_decay": 1.0},
        **settings,
    )


def _recipe(tmp_path: Path, squares_csv: Path, kind: str) -> Path:
    target = TARGETS[kind]
    recipe = {
        "model": {
            "backbone": TINY_BACKBONE,
            "pretrained": False,
            "optimizer": {"lr": 3e-3, "layer_decay": 1.0},
        },
        "data": {
            "source": "csv",
            "csv_path": str(squares_csv),
            "target": {k: list(v) if isinstance(v, list) else v for k, v in target.items()},
            "pipeline": {"augment": "none", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
            "loader": {"num_workers": 0, "batch_size": 16},
        },
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": False,
        },
    }
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --- cv ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["multi_label", "regression"])
def test_cv_gives_the_kinds_figures_per_fold_and_one_out_of_fold_prediction_per_non_test_image(
    squares_csv, tmp_path, kind
):
    dm = _data(squares_csv, kind, split={"max_samples": 120})
    out = tmp_path / "cv"
    L.seed_everything(0)  # the model's first weights: the same whatever ran before
    report = cross_validate(
        _model(dm), dm, folds=2, out=out, trainer={**QUIET, "max_epochs": 1}, ensemble=True
    )
    names = dm.class_names

    # the per-fold figures are the kind's metrics; mean and std are theirs
    summary = json.loads((out / "cv.json").read_text())
    assert summary["kind"] == kind and report.figures == FIGURES[kind]
    for name in FIGURES[kind]:
        per_fold = [fold[name] for fold in summary["folds"]]
        assert all(math.isfinite(v) for v in per_fold)
        assert summary["mean"][name] == pytest.approx(np.mean(per_fold))
        assert summary["std"][name] == pytest.approx(np.std(per_fold, ddof=1))
    table = _rows(out / "cv.csv")
    assert [row["fold"] for row in table] == ["0", "1", "mean", "std"]
    assert set(FIGURES[kind]) <= set(table[0])
    assert (
        "val acc" not in report.table()
        and ("val mAP" if kind == "multi_label" else "val MAE") in report.table()
    )

    # every non-test image once, from the fold that validated it, with its truth as the data holds it
    rows = _rows(out / "oof_predictions.csv")
    test = set(cv_split_indices(dm.data, 2, 0, dm.test_fraction, dm.seed)["test"].tolist())
    assert sorted(int(r["index"]) for r in rows) == sorted(set(range(len(dm.data))) - test)
    for fold in range(2):
        val = cv_split_indices(dm.data, 2, fold, dm.test_fraction, dm.seed)["val"].tolist()
        assert sorted(int(r["index"]) for r in rows if r["fold"] == str(fold)) == val
    truth = np.asarray([[float(r[f"true_{n}"]) for n in names] for r in rows])
    assert np.allclose(truth, dm.data.labels[[int(r["index"]) for r in rows]], atol=1e-4)

    if kind == "multi_label":
        from sklearn.metrics import average_precision_score

        probs = np.asarray([[float(r[f"p_{n}"]) for n in names] for r in rows])
        assert ((probs >= 0) & (probs <= 1)).all()
        # the labels columns read like the CSV's: names joined by ';'
        assert [set(filter(None, r["labels"].split(";"))) for r in rows] == [
            {n for n, t in zip(names, row, strict=True) if t} for row in truth
        ]
        # a label is predicted where its probability reaches the fold's threshold (0.5)
        assert [set(filter(None, r["predicted"].split(";"))) for r in rows] == [
            {n for n, p in zip(names, row, strict=True) if p >= 0.5} for row in probs
        ]
        # the pooled mAP is the mAP of the stored probabilities the rows show (rounded to 6 decimals there)
        stored = [np.load(out / f"fold_{k}" / "cv_predictions.npz") for k in range(2)]
        every = {
            key: np.concatenate([f[key] for f in stored]) for key in ("val_index", "val_label", "val_probs")
        }
        order = np.argsort(every["val_index"])
        assert np.allclose(every["val_probs"][order], probs, atol=1e-6)
        pooled = np.mean(
            [
                average_precision_score(every["val_label"][:, k], every["val_probs"][:, k])
                for k in range(len(names))
            ]
        )
        assert summary["oof"]["map"] == pytest.approx(pooled, abs=1e-4)
        assert summary["thresholds"] == [0.5] * len(names)  # folds are not calibrated on the cells they score
    else:
        predicted = np.asarray([[float(r[f"predicted_{n}"]) for n in names] for r in rows])
        assert summary["oof"]["mae"] == pytest.approx(np.abs(predicted - truth).mean(), abs=1e-4)

    # what a paired comparison pairs: the fold's images, one outcome per decision, whose mean is its figure
    for fold in range(2):
        with np.load(out / f"fold_{fold}" / "cv_predictions.npz", allow_pickle=False) as stored:
            arrays = dict(stored)
        found = cell_outcomes(arrays)
        val = cv_split_indices(dm.data, 2, fold, dm.test_fraction, dm.seed)["val"]
        assert sorted(found["index"].tolist()) == sorted(val.tolist())
        assert len(found["outcome"]) == len(val) * len(names)
        if kind == "multi_label":
            assert found["binary"] and found["scored"] == "label decision"
        else:  # minus the MAE the fold's validation logged, from the same checkpoint
            assert not found["binary"] and -found["figure"] == pytest.approx(
                report.folds[fold].val_mae, abs=1e-4
            )
            assert cell_outcomes(arrays, threshold=0.5)["binary"]
        with pytest.raises(tk.ConfigError, match="positive .* scores single-label runs"):
            cell_outcomes(arrays, positive=[1])

    # the ensemble averages the fold models' label probabilities or values on the test split
    ensemble = _rows(out / "ensemble_test_predictions.csv")
    assert sorted(int(r["index"]) for r in ensemble) == sorted(test) and report.test_images == len(test)
    column = "p" if kind == "multi_label" else "predicted"
    averaged = np.mean(
        [np.load(out / f"fold_{k}" / "cv_predictions.npz")["test_probs"] for k in range(2)], axis=0
    )
    written = np.asarray([[float(r[f"{column}_{n}"]) for n in names] for r in ensemble])
    assert np.allclose(written, averaged, atol=1e-5)
    if kind == "regression":
        truth = np.asarray([[float(r[f"true_{n}"]) for n in names] for r in ensemble])
        assert summary["ensemble_test"]["mae"] == pytest.approx(np.abs(written - truth).mean(), abs=1e-4)

    # run again in the same folder: the finished folds are read back, not trained again
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("fold_*/checkpoints/*.ckpt")}
    again = cross_validate(
        _model(dm), dm, folds=2, out=out, trainer={**QUIET, "max_epochs": 1}, ensemble=True
    )
    assert again.to_dict() == report.to_dict()
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold_*/checkpoints/*.ckpt")} == checkpoints


def test_cv_refuses_a_model_of_another_kind_than_its_data(squares_csv, tmp_path):
    dm = _data(squares_csv, "regression")
    labels = _data(squares_csv, "multi_label")
    with pytest.raises(
        tk.ConfigError, match="predicts multi_label targets but the data's data.target.kind is regression"
    ):
        cross_validate(_model(labels), dm, folds=2, out=tmp_path / "cv")
    assert not (tmp_path / "cv").exists()


# --- lr-find and augment-search ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["multi_label", "regression"])
def test_lr_find_suggests_a_finite_rate_for_labels_and_numbers_and_leaves_the_model_as_it_was(
    squares_csv, tmp_path, kind
):
    if kind == "regression":  # the brightness in percent: a loss on raw targets would be in the thousands
        rows = _rows(squares_csv)
        lines = ["path,level"] + [f"{squares_csv.parent / r['path']},{100 * float(r['level'])}" for r in rows]
        squares_csv = tmp_path / "percent.csv"
        squares_csv.write_text("\n".join(lines) + "\n")
    dm = _data(squares_csv, kind)
    model = _model(dm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tk.lr_find(model, dm, steps=30)
    assert [s.phase for s in report.sweeps] == ["all"]
    lr = report.values["lr"]
    assert math.isfinite(lr) and 1e-6 < lr < 1.0, str(report)
    # the sweep's loss is the training loss: for numbers, on targets standardised on the training split
    # (a spread of 1, not of ~29 percent points)
    first = report.sweeps[0].losses[10]  # lr_finder.SKIP_BEGIN: the first points stand for a few batches
    assert first < 5.0
    # the model's weights, and a regression's target scaling (counted for the sweep), are as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "metric", "column"),
    [("multi_label", "val_map", "val mAP"), ("regression", "val_mae", "val MAE")],
)
def test_augment_search_ranks_by_the_kinds_validation_loss_and_reports_its_metric(
    squares_csv, tmp_path, kind, metric, column
):
    dm = _data(squares_csv, kind, cache={"dir": str(tmp_path / "cache")})
    report = tk.augment_search(
        _model(dm), dm, budget="5m", candidates=[{"HorizontalFlip": {"p": 0.5}}], epochs=1, repeats=1,
        out=tmp_path / "search",
    )  # fmt: skip
    assert sorted(t.name for t in report.trials) == ["+ HorizontalFlip(p=0.5)", "baseline (the recipe: none)"]
    for trial in report.trials:
        assert trial.metric == metric and len(trial.val_score) == 1 and math.isfinite(trial.val_score[0])
        assert math.isfinite(trial.val_loss[0])
    losses = [t.mean("val_loss") for t in report.trials]
    assert losses == sorted(losses)  # ranked by validation loss, lowest first
    assert column in report.table().splitlines()[0]
    found = json.loads((tmp_path / "search" / "augment_search.json").read_text())
    assert all(t["metric"] == metric and metric in t and "val_acc" not in t for t in found["trials"])
    again = type(report).from_dict(found)
    assert again.to_dict() == found and again.trials[0].metric == metric


# --- early stopping's and the checkpoint's monitor ---------------------------------------------------


def test_a_monitor_the_models_kind_does_not_log_is_refused_when_the_fit_starts(squares_csv, tmp_path):
    dm = _data(squares_csv, "regression")
    with pytest.raises(tk.ConfigError) as refused:
        quiet_trainer(tmp_path / "a", max_epochs=1, callbacks=[PhaseEarlyStopping(monitor="val_acc")]).fit(
            _model(dm), datamodule=dm
        )
    message = str(refused.value)
    assert (
        "early_stopping.monitor: val_acc is a single_label figure, but this is a regression model" in message
    )
    assert "val_loss (min), val_mae (min), val_rmse (min), val_r2 (max)" in message
    # a mode that contradicts the figure would keep the worst checkpoint
    with pytest.raises(
        tk.ConfigError,
        match=r"checkpoint.mode: max contradicts checkpoint.monitor: val_mae.*set checkpoint.mode: min",
    ):
        quiet_trainer(
            tmp_path / "b", max_epochs=1, callbacks=[RunCheckpoint(monitor="val_mae", mode="max")]
        ).fit(_model(dm), datamodule=dm)
    labels = _data(squares_csv, "multi_label")
    with pytest.raises(
        tk.ConfigError,
        match="val_r2 is a regression figure, but this is a multi_label model.*val_map \\(max\\)",
    ):
        quiet_trainer(
            tmp_path / "c", max_epochs=1, callbacks=[RunCheckpoint(monitor="val_r2", mode="max")]
        ).fit(_model(labels), datamodule=labels)
    # the kind's own figure, with its mode, trains and stops on it
    stop = PhaseEarlyStopping(monitor="val_map", mode="max", patience=5)
    trainer = quiet_trainer(
        tmp_path / "d",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=[stop],
    )
    trainer.fit(_model(labels), datamodule=labels)
    assert trainer.current_epoch == 1 and math.isfinite(float(stop.best_score))


def test_the_fit_command_refuses_a_monitor_of_another_kind_with_one_error_line(squares_csv, tmp_path):
    recipe = _recipe(tmp_path, squares_csv, "regression")
    result = run_cli("fit", "--config", str(recipe), "--early_stopping.monitor", "val_acc")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and "val_acc is a single_label figure" in errors[0] and "val_mae (min)" in errors[0]
    )
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # refused before anything trained


# --- probe, diagnose, plan ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "column", "planted"), [("multi_label", "val mAP", 0.9), ("regression", "val R^2", 0.8)]
)
def test_probe_scores_labels_by_map_and_numbers_by_r2_and_finds_the_planted_signal(
    squares_csv, tmp_path, kind, column, planted
):
    result = run_cli("probe", "--config", str(_recipe(tmp_path, squares_csv, kind)), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-3000:]
    header = next(line for line in result.stdout.splitlines() if "output of" in line)
    assert column in header and "acc" not in header
    rows = [line for line in result.stdout.splitlines() if line.startswith("│ g")]
    scores = [float(r.split("│")[5].strip(" *")) for r in rows]
    # red and blue squares (labels), the background's brightness (a number): early features hold both, where
    # chance is a mAP of the labels' prevalence (~0.5) and an R^2 of 0
    assert len(scores) == 6 and max(scores) > planted
    assert "suggestion: " in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["multi_label", "regression"])
def test_diagnose_and_plan_run_for_labels_and_numbers(squares_csv, tmp_path, kind):
    recipe = str(_recipe(tmp_path, squares_csv, kind))
    diagnosed = run_cli("diagnose", "--config", recipe, "--batches", "2", "--out", str(tmp_path / "health"))
    assert diagnosed.returncode == 0, diagnosed.stderr[-3000:]
    health = json.loads((tmp_path / "health" / "gradient_health.json").read_text())
    # the loss of the kind (binary cross-entropy, or MSE on standardised targets) reaches every layer
    assert health["batches"] == 2 and health["error"] is None and len(health["layers"]) > 10
    head = next(layer for layer in health["layers"] if layer["name"] == "head.fc")
    assert math.isfinite(head["grad_norm"]) and head["grad_norm"] > 0
    assert "verdict:" in diagnosed.stdout and (tmp_path / "health" / "gradient_health.png").is_file()
    planned = run_cli("plan", "--config", recipe, env={"COLUMNS": "200"})
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "freeze plan" in planned.stdout and "backbone groups (bottom to top)" in planned.stdout
