"""Stratified k-fold cross-validation: disjoint stratified folds around the recipe's own test split,
out-of-fold predictions for every non-test image, resuming in the fold it stopped in, and ``cv``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_BACKBONE, merged, quiet_trainer, run_cli
from lightning.pytorch.callbacks import Callback

import transferkit as tk
from transferkit.data.datamodule import cv_split_indices
from transferkit.tuning.cross_validation import cross_validate

DATA = {
    "source": "digits",
    "pipeline": {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "augment": "none"},
    "loader": {"num_workers": 0},
    "split": {"max_samples": 200},
}


def _model(**overrides) -> tk.TransferClassifier:
    return tk.TransferClassifier(num_classes=10, backbone=TINY_BACKBONE, pretrained=False, **overrides)


def test_folds_are_disjoint_stratified_cover_every_non_test_image_once_and_keep_the_recipes_test_split():
    recipe = tk.ImageDataModule(**DATA)  # the val_fraction split the recipe would train with
    recipe.setup("fit")
    test = set(recipe.split_indices["test"].tolist())
    non_test = sorted(set(range(len(recipe.data))) - test)
    expected = np.bincount(recipe.data.labels[non_test], minlength=10) / 5  # images per class per fold
    validated = []
    for fold in range(5):
        dm = tk.ImageDataModule(**merged(DATA, {"split": {"cv_folds": 5, "cv_fold": fold}}))
        dm.setup("fit")
        train, val = set(dm.split_indices["train"].tolist()), set(dm.split_indices["val"].tolist())
        assert set(dm.split_indices["test"].tolist()) == test  # exactly the recipe's test split
        assert not (train | val) & test  # no test image trains or validates
        assert not train & val and sorted(train | val) == non_test
        per_class = np.bincount(dm.data.labels[sorted(val)], minlength=10)
        assert np.all(np.abs(per_class - expected) <= 1), (per_class, expected)  # stratified
        validated += sorted(val)
    assert sorted(validated) == non_test  # every non-test image validates exactly once


@pytest.mark.parametrize(
    ("folds", "fold", "message"),
    [
        (5, 5, r"cv_fold is 0-based and must be in 0\.\.4 for cv_folds=5, got 5"),
        (5, -1, r"must be in 0\.\.4 for cv_folds=5, got -1"),
        (1, 0, r"cv_folds must be >= 2 .*got 1"),
        (5, None, r"cv_folds and cv_fold go together, got cv_folds=5, cv_fold=None"),
        (None, 2, r"cv_folds and cv_fold go together"),
    ],
)
def test_bad_cv_settings_are_refused_naming_the_value(folds, fold, message):
    with pytest.raises(tk.ConfigError, match=message):
        tk.ImageDataModule(**merged(DATA, {"split": {"cv_folds": folds, "cv_fold": fold}}))


def test_cross_validate_refuses_bad_folds_and_classes_too_small_before_writing_anything(tmp_path):
    dm = tk.ImageDataModule(**DATA)
    with pytest.raises(tk.ConfigError, match="cv_folds must be >= 2"):
        cross_validate(_model(), dm, folds=1, out=tmp_path / "cv")
    with pytest.raises(
        tk.DatasetError, match=r"at least 40 non-test images of every class.*at most cv_folds="
    ):
        cross_validate(_model(), dm, folds=40, out=tmp_path / "cv")
    assert not (tmp_path / "cv").exists()


class _Seen(Callback):
    """Records the epoch each fit of a fold starts at (0: from scratch; more: resumed), and each test."""

    def __init__(self, starts: list[int], tests: list[int]) -> None:
        self.starts, self.tests = starts, tests

    def on_train_start(self, trainer, pl_module) -> None:
        self.starts.append(trainer.current_epoch)

    def on_test_start(self, trainer, pl_module) -> None:
        self.tests.append(len(self.starts))


class _CrashAtEpoch(Callback):
    """A crash part-way through a fold, after its first epoch's checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_a_stopped_cross_validation_resumes_in_its_fold_without_retraining_finished_ones(tmp_path):
    out, starts, tests, crash_in = tmp_path / "cv", {}, [], {1}

    def trainer(fold: int, folder: Path):
        callbacks = [_Seen(starts.setdefault(fold, []), tests)]
        callbacks += [_CrashAtEpoch(1)] if fold in crash_in else []
        # two epochs for the fold that crashes in its second, one for the others; no sanity check (time)
        epochs = 2 if fold == 1 else 1
        return quiet_trainer(folder, max_epochs=epochs, num_sanity_val_steps=0, callbacks=callbacks)

    dm = tk.ImageDataModule(**DATA)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cross_validate(_model(), dm, folds=3, out=out, trainer=trainer)
    state = json.loads((out / "cv_state.json").read_text())
    assert list(state["finished"]) == ["0"] and (out / "fold_1" / "checkpoints" / "last.ckpt").is_file()
    finished = {p: p.stat().st_mtime_ns for p in (out / "fold_0" / "checkpoints").iterdir()}

    crash_in.clear()
    report = cross_validate(_model(), dm, folds=3, out=out, trainer=trainer)
    assert starts == {0: [0], 1: [0, 1], 2: [0]}  # fold 1 resumed at epoch 1, fold 0 never refitted
    assert {p: p.stat().st_mtime_ns for p in (out / "fold_0" / "checkpoints").iterdir()} == finished
    # without the ensemble the test split is never scored: no test loop, no test probabilities stored
    assert not tests and report.ensemble_test_acc is None
    assert not any("test_probs" in np.load(out / f"fold_{k}" / "cv_predictions.npz").files for k in range(3))

    # out-of-fold predictions: one row per non-test image, from the fold that validated it
    with open(report.oof_csv) as f:
        rows = list(csv.DictReader(f))
    test = set(cv_split_indices(dm.data, 3, 0, dm.test_fraction, dm.seed)["test"].tolist())
    assert sorted(int(r["index"]) for r in rows) == sorted(set(range(len(dm.data))) - test)
    for fold in range(3):
        val = cv_split_indices(dm.data, 3, fold, dm.test_fraction, dm.seed)["val"].tolist()
        assert sorted(int(r["index"]) for r in rows if r["fold"] == str(fold)) == val
    probs = np.asarray([[float(r[f"p_{c}"]) for c in range(10)] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    labels = [r["label"] for r in rows]
    assert labels == [dm.class_names[dm.data.labels[int(r["index"])]] for r in rows]

    summary = json.loads((out / "cv.json").read_text())
    accuracies = [fold["val_acc"] for fold in summary["folds"]]
    assert summary["mean"]["val_acc"] == pytest.approx(np.mean(accuracies))
    assert summary["std"]["val_acc"] == pytest.approx(np.std(accuracies, ddof=1))

    # the ensemble, asked for afterwards: the finished folds are scored on the test split, not retrained
    ensemble = cross_validate(_model(), dm, folds=3, out=out, trainer=trainer, ensemble=True)
    assert starts == {0: [0], 1: [0, 1], 2: [0]} and len(tests) == 3
    summary = json.loads((out / "cv.json").read_text())
    tested = [fold["test"]["test_acc"] for fold in summary["folds"]]
    assert summary["mean_fold_test_acc"] == pytest.approx(np.mean(tested)) == ensemble.mean_fold_test_acc
    with open(out / "ensemble_test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["index"]) for r in rows) == sorted(test) and ensemble.test_images == len(test)
    assert ensemble.ensemble_test_acc == pytest.approx(np.mean([r["label"] == r["predicted"] for r in rows]))
    for fold in range(3):
        metrics = json.loads((out / f"fold_{fold}" / "metrics.json").read_text())
        assert metrics["cross_validation"]["fold"] == fold and metrics["test"]["test_acc"] == tested[fold]
        assert "## Cross-validation" in (out / f"fold_{fold}" / "report.md").read_text()

    with pytest.raises(
        tk.ConfigError, match=r"another recipe \(model\.optimizer\.lr: 0\.001 then, 0\.01 now"
    ):
        cross_validate(_model(optimizer={"lr": 0.01}), dm, folds=3, out=out, trainer=trainer)


@pytest.mark.slow
def test_the_cv_command_prints_the_folds_and_writes_the_summary(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    data = merged(DATA, {"pipeline": {"mean": [0.5] * 3, "std": [0.5] * 3}, "split": {"max_samples": 120}})
    trainer = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "default_root_dir": str(tmp_path / "run"),
        "logger": False,
        "num_sanity_val_steps": 0,
    }
    recipe.write_text(
        yaml.safe_dump(
            {"trainer": trainer, "model": {"backbone": TINY_BACKBONE, "pretrained": False}, "data": data}
        )
    )
    bad = run_cli("cv", "--config", str(recipe), "--folds", "1")
    assert bad.returncode == 2 and "error: cv_folds must be >= 2" in bad.stderr, bad.stderr[-2000:]

    out = tmp_path / "cv"
    result = run_cli("cv", "--config", str(recipe), "--folds", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean" in result.stdout and "std" in result.stdout and "out-of-fold accuracy" in result.stdout
    with open(out / "cv.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["fold"] for row in table] == ["0", "1", "mean", "std"]
    with open(out / "oof_predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == 96  # 120 images, 24 held out for the test
    fold_config = yaml.safe_load((out / "fold_1" / "config.yaml").read_text())
    split = fold_config["data"]["split"]
    assert (split["cv_folds"], split["cv_fold"]) == (2, 1)  # the fold's recipe


@pytest.mark.slow
def test_a_fixed_epochs_cross_validation_scores_each_folds_last_epoch_and_never_stops_early(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    dm = tk.ImageDataModule(**merged(DATA, {"split": {"max_samples": 120}}))
    trainer = {
        "max_epochs": 3,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        # would end every fold after its first epoch if it were kept
        "callbacks": [EarlyStopping(monitor="val_loss", patience=0, min_delta=100.0)],
    }
    report = cross_validate(_model(), dm, folds=2, out=tmp_path / "cv", trainer=trainer, checkpoint="last")
    for fold in report.folds:
        metrics = json.loads(next((tmp_path / "cv" / f"fold_{fold.fold}").rglob("metrics.json")).read_text())
        assert metrics["epochs"] == 3 and Path(fold.best_checkpoint).name == "last.ckpt"
    # the same out with the best checkpoint is another run, not a resume of this one
    with pytest.raises(tk.ConfigError, match="another recipe"):
        cross_validate(_model(), dm, folds=2, out=tmp_path / "cv", trainer=trainer)
    with pytest.raises(tk.ConfigError, match="checkpoint is 'best' or 'last'"):
        cross_validate(_model(), dm, folds=2, out=tmp_path / "cv2", trainer=trainer, checkpoint="first")


def test_a_cross_validation_started_before_a_setting_existed_resumes_while_it_is_at_its_default(tmp_path):
    from transferkit.tuning.cross_validation import _default_settings, _load_or_start

    model = _model()
    defaults = _default_settings(model)
    now = {"folds": 5, "model": {"loss": {"class_weights": None}, "head": {"dropout": 0.2}}}
    before = {"folds": 5, "model": {"head": {"dropout": 0.2}}}  # written before model.loss existed
    (tmp_path / "fold_0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "fold_0" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "cv_state.json").write_text(json.dumps({"recipe": before, "finished": {"0": {}}}))
    assert _load_or_start(tmp_path, now, defaults)["finished"] == {"0": {}}  # resumed, nothing lost
    weighted = {**now, "model": {**now["model"], "loss": {"class_weights": "auto"}}}
    with pytest.raises(tk.ConfigError, match=r"model\.loss\.class_weights: '<unset>' then, 'auto' now"):
        _load_or_start(tmp_path, weighted, defaults)
