"""The run report, ``interpret`` and the pictures for several labels per image and for numbers: a per-label
table whose figures are the test loop's, predicted against true in the targets' own units, images ranked by
loss or error with Grad-CAM per predicted label or target, and no section of the single-label kind."""

from __future__ import annotations

import csv
import json
import re
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import NORM, TINY_BACKBONE, run_cli
from PIL import Image
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

import transferkit as tk
from transferkit import plots
from transferkit.models.calibration import Calibration
from transferkit.reporting.interpretation import (
    interpret,
    label_losses,
    label_thresholds,
    per_label_markdown,
    per_label_table,
    per_target_table,
)
from transferkit.reporting.previews import target_text

TARGETS = {
    "multi_label": {"kind": "multi_label"},
    "regression": {"kind": "regression", "columns": ["level"]},
}


def _finetune(root: Path, squares_csv: Path, kind: str) -> types.SimpleNamespace:
    """A tiny finetune of one kind on the squares (red and blue squares; a background level in [0, 1]),
    with the default loggers, so the report has its learning curves."""
    L.seed_everything(0)
    data = tk.ImageDataModule(
        source="csv",
        csv_path=str(squares_csv),
        target=TARGETS[kind],
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0, "batch_size": 16},
    )
    model = tk.TransferClassifier(
        num_classes=data.num_classes,
        class_names=data.class_names,
        target=data.target_kind,
        backbone=TINY_BACKBONE,
        pretrained=False,
        head={"hidden_dims": (64,)},
        optimizer={"lr": 3e-3, "layer_decay": 1.0},
    )
    trainer = tk.Trainer(
        max_epochs=8,
        accelerator="cpu",
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    results = trainer.finetune(model, datamodule=data)
    run_dir = Path(results["run_dir"])
    return types.SimpleNamespace(
        run_dir=run_dir,
        report=(run_dir / "report.md").read_text(),
        metrics=json.loads((run_dir / "metrics.json").read_text()),
        found=json.loads((run_dir / "interpretation.json").read_text()),
        best=Path(results["best_checkpoint"]),
        model=model,
        data=data,
    )


@pytest.fixture(scope="module")
def labels_run(tmp_path_factory, squares_csv) -> types.SimpleNamespace:
    return _finetune(tmp_path_factory.mktemp("multi_label"), squares_csv, "multi_label")


@pytest.fixture(scope="module")
def values_run(tmp_path_factory, squares_csv) -> types.SimpleNamespace:
    return _finetune(tmp_path_factory.mktemp("regression"), squares_csv, "regression")


def _picture(path: Path, min_side: int = 200) -> np.ndarray:
    """A PNG that decodes, of a readable size, and not blank (its pixels vary)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert min(pixels.shape[:2]) >= min_side, pixels.shape
    assert pixels.std() > 10, f"{path.name} looks blank"
    return pixels


def _table(report: str, header: str) -> list[list[str]]:
    """The cells of the markdown table that starts with ``header``."""
    lines = report[report.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _no_warnings_and_no_class_confusion(run: types.SimpleNamespace) -> None:
    assert "## Warnings" not in run.report, run.report[run.report.find("## Warnings") :]
    assert "## Problems" not in run.report
    assert "Confusion matrix" not in run.report and not (run.run_dir / "confusion_matrix.png").exists()
    assert "reliability.png" not in run.report and not (run.run_dir / "reliability.png").exists()


# --- several labels per image ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_multi_label_report_holds_the_per_label_table_of_the_test_loop(labels_run):
    run, test = labels_run, labels_run.metrics["test"]
    assert test["test_map"] > 0.8  # learned (the squares are easy), so the figures mean something
    _no_warnings_and_no_class_confusion(run)
    assert "| labels | blue, red |" in run.report and "| classes |" not in run.report
    assert "## Per label (test split, best checkpoint)" in run.report

    rows = {r[0]: r for r in _table(run.report, "| label | test positives | AP |")}
    assert set(rows) == {"blue", "red", "*macro average*", "*micro average*"}
    # each label's AP in the table (3 decimals), their mean = test_map; the headline gives it to 4 decimals
    assert np.mean([float(rows[n][2]) for n in ("blue", "red")]) == pytest.approx(test["test_map"], abs=1e-3)
    assert f"mAP {test['test_map']:.4f}" in run.report
    assert float(rows["*macro average*"][4]) == pytest.approx(test["test_f1_macro"], abs=6e-4)
    assert float(rows["*micro average*"][4]) == pytest.approx(test["test_f1_micro"], abs=6e-4)
    # the test positives are the test split's
    truth = labels_run.data.split_targets("test")
    assert [int(rows[n][1]) for n in ("blue", "red")] == truth.sum(axis=0).astype(int).tolist()
    # the thresholds are the ones fitted on validation (metrics.json's calibration), and say so
    calibration = run.metrics["calibration"]
    for i, name in enumerate(("blue", "red")):
        fitted = calibration["label_fitted"][i]
        shown = f"{calibration['label_thresholds'][i]:.3f} (fitted)" if fitted else "0.5 (kept"
        assert rows[name][7].startswith(shown), rows[name]
    assert f"Thresholds fitted on {calibration['fitted_on']}" in run.report

    # interpret's figures to full precision: the per-label AP mean is test_map, the F1s the test loop's
    per_label = run.found["per_label"]
    assert np.mean([r["ap"] for r in per_label[:2]]) == pytest.approx(test["test_map"], abs=1e-4)
    assert run.found["summary"]["f1_macro"] == pytest.approx(test["test_f1_macro"], abs=1e-4)
    assert run.found["summary"]["f1_micro"] == pytest.approx(test["test_f1_micro"], abs=1e-4)
    assert run.found["summary"]["auroc"] == pytest.approx(test["test_auroc"], abs=1e-4)
    assert "accuracy" not in run.found and "calibration" not in run.found  # single-label fields left out

    for name in ("learning_curves.png", "label_confusion.png", "augmentation_preview.png", "top_losses.png"):
        assert f"]({name})" in run.report
        _picture(run.run_dir / name)
    curves = _picture(run.run_dir / "learning_curves.png")
    assert curves.shape[1] > curves.shape[0]  # loss beside the validation scores
    table = plots.epoch_metrics(run.run_dir / "metrics.csv")
    assert "val_map" in table and "val_acc" not in table  # what the second panel draws instead of accuracy
    # calibration is a single-label section: left out, and said why
    assert "Calibration (ECE, reliability diagram) is left out" in run.report


@pytest.mark.slow
def test_interpret_ranks_multi_label_images_by_loss_with_gradcam_per_predicted_label(
    labels_run, squares_csv, tmp_path
):
    squares = squares_csv.parent
    with squares_csv.open(newline="") as handle:
        chosen = list(csv.DictReader(handle))[::5]  # 40 files, the labels column as names
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels"])
        writer.writerows([row["path"], row["labels"]] for row in chosen)
    out = tmp_path / "interpretation"
    args = ["interpret", "--ckpt_path", str(labels_run.best), "--images", str(squares)]
    result = run_cli(*args, "--labels", str(labels), "--out", str(out), "--count", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mAP" in result.stdout and "threshold" in result.stdout  # the per-label table, printed

    found = json.loads((out / "interpretation.json").read_text())
    assert found["kind"] == "multi_label" and found["images"] == len(chosen)
    positives = [sum(n in row["labels"].split(";") for row in chosen) for n in ("blue", "red")]
    assert [r["positives"] for r in found["per_label"][:2]] == positives
    top = found["top_losses"]
    losses = [row["loss"] for row in top]
    assert len(top) == 6 and losses == sorted(losses, reverse=True) and losses[0] >= losses[-1]
    thresholds = {r["label"]: r["threshold"] for r in found["per_label"][:2]}
    for row in top:
        # the loss is the labels' binary cross-entropy, the mean over labels
        probs = np.array([[row["probabilities"][n] for n in ("blue", "red")]])
        truth = np.array([[n in row["true"] for n in ("blue", "red")]])
        assert label_losses(probs, truth)[0] == pytest.approx(row["loss"], rel=1e-5)
        # predicted = over its threshold, and one Grad-CAM overlay per predicted label
        assert row["predicted"] == [n for n in ("blue", "red") if row["probabilities"][n] >= thresholds[n]]
        assert row["gradcam"] == row["predicted"]
    assert found["gradcam_layer"].startswith("bn2")
    pixels = _picture(out / "top_losses.png")
    columns = 1 + max(len(row["gradcam"]) for row in top)
    assert pixels.shape[1] > 200 * columns * 0.9  # an overlay column per predicted label
    markdown = (out / "interpretation.md").read_text()
    assert "## Per label" in markdown and "label_confusion.png" in markdown
    assert "left out" in markdown and "reliability" not in found["pngs"]

    # a label the model does not know is refused, naming it and the model's labels
    with labels.open("a", newline="") as handle:
        csv.writer(handle).writerow([chosen[0]["path"], "green"])
    result = run_cli(*args, "--labels", str(labels), "--out", str(out))
    assert result.returncode != 0 and "green" in result.stderr and "blue" in result.stderr


def test_per_label_figures_are_the_torchmetrics_ones_the_test_loop_logs():
    rng = np.random.default_rng(0)
    truth = (rng.random((60, 3)) < [0.2, 0.5, 0.7]).astype(int)
    probs = np.clip(truth * 0.35 + rng.random((60, 3)) * 0.65, 0, 1)
    fitted = Calibration(
        fitted_on="val (60 images)", label_thresholds=[0.4, 0.5, 0.6], label_positives=[12, 3, 40],
        label_fitted=[True, False, True],
    )  # fmt: skip
    decided = (probs >= np.array(fitted.label_thresholds)).astype(int)
    rows = per_label_table(truth, probs, decided, ["a", "b", "c"], label_thresholds(fitted, 3))
    target = torch.as_tensor(truth)
    ap = MultilabelAveragePrecision(3, average="macro")(torch.as_tensor(probs).float(), target)
    f1 = MultilabelF1Score(3, average="macro")(torch.as_tensor(decided).float(), target)
    micro = MultilabelF1Score(3, average="micro")(torch.as_tensor(decided).float(), target)
    assert rows[3]["ap"] == pytest.approx(float(ap), abs=1e-6)
    assert rows[3]["f1"] == pytest.approx(float(f1), abs=1e-6)
    assert rows[4]["f1"] == pytest.approx(float(micro), abs=1e-6)
    assert [r["positives"] for r in rows[:3]] == truth.sum(axis=0).tolist()
    # a label that kept 0.5 for want of validation positives says so in the report
    text = "\n".join(per_label_markdown(rows))
    assert "| b | " in text and "0.5 (kept: too few validation positives or negatives)" in text
    assert "Kept at 0.5 here: b (3 validation positives)" in text
    assert "0.400 (fitted)" in text
    unfitted = "\n".join(per_label_markdown(per_label_table(truth, probs, decided, ["a", "b", "c"])))
    assert "No per-label thresholds were fitted" in unfitted


# --- numbers -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_regression_report_shows_predicted_against_true_in_the_targets_units(values_run):
    run, test = values_run, values_run.metrics["test"]
    assert test["test_r2"] > 0.5  # learned the background level
    _no_warnings_and_no_class_confusion(run)
    assert "| targets | level |" in run.report
    assert "## Predicted against true (test split, best checkpoint)" in run.report
    (row,) = _table(run.report, "| target | images | MAE |")
    assert row[0] == "level" and int(row[1]) == run.metrics["split_sizes"]["test"]
    assert float(row[2]) == pytest.approx(test["test_mae"], abs=6e-5)
    assert float(row[3]) == pytest.approx(test["test_rmse"], abs=6e-5)
    assert float(row[4]) == pytest.approx(test["test_r2"], abs=6e-5)
    # in the level's own units (0..1), not standardised: the error is a fraction of the level's spread
    truth = values_run.data.split_targets("test")[:, 0]
    assert test["test_mae"] < 0.5 * truth.std()
    scatter = run.run_dir / "predicted_vs_true_level.png"
    assert "](predicted_vs_true_level.png)" in run.report
    pixels = _picture(scatter)
    assert abs(pixels.shape[0] - pixels.shape[1]) < 0.2 * pixels.shape[0]  # square: equal axes, y = x
    for name in ("learning_curves.png", "augmentation_preview.png", "largest_errors.png"):
        _picture(run.run_dir / name)
    table = plots.epoch_metrics(run.run_dir / "metrics.csv")
    assert "val_mae" in table and "train_mae" in table
    assert "a regression model predicts numbers, not probabilities" in run.report


@pytest.mark.slow
def test_interpret_lists_the_largest_regression_errors_with_gradcam(values_run, tmp_path):
    model, data = values_run.model, values_run.data
    found = interpret(model, data, "test", out=tmp_path / "interpretation", count=5)
    test = values_run.metrics["test"]
    # the same split and model as the test loop: the same figures
    assert found.summary["mae"] == pytest.approx(test["test_mae"], abs=1e-4)
    assert found.summary["r2"] == pytest.approx(test["test_r2"], abs=1e-4)
    rows = found.largest_errors
    errors = [abs(r["error"]["level"]) for r in rows]
    assert len(rows) == 5 and errors == sorted(errors, reverse=True) and errors[0] >= errors[-1]
    truth = data.split_targets("test")[:, 0]
    for r in rows:
        assert r["true"]["level"] == pytest.approx(float(truth[r["index"]]), abs=1e-6)
        assert r["error"]["level"] == pytest.approx(r["predicted"]["level"] - r["true"]["level"], abs=1e-9)
    assert errors[0] >= found.summary["mae"]  # the largest error is at least the mean one
    assert found.gradcam_layer.startswith("bn2")
    assert {"largest_errors.png", "predicted_vs_true_level.png"} <= set(found.pngs)
    pixels = _picture(found.pngs["largest_errors.png"])
    assert pixels.shape[0] > pixels.shape[1]  # a row per image: the image, then Grad-CAM of the output
    markdown = found.markdown.read_text()
    assert "| image | true level | predicted level | error level |" in markdown
    assert "Grad-CAM from `bn2" in markdown and "left out" in markdown
    saved = json.loads((tmp_path / "interpretation" / "interpretation.json").read_text())
    assert saved["kind"] == "regression" and "per_class" not in saved and "top_losses" not in saved


@pytest.mark.slow
def test_interpret_command_reads_numeric_targets_from_labelled_files(values_run, squares_csv, tmp_path):
    with squares_csv.open(newline="") as handle:
        chosen = list(csv.DictReader(handle))[:30]
    labels = tmp_path / "levels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "level"])
        writer.writerows([row["path"], row["level"]] for row in chosen)
    out = tmp_path / "out"
    args = ["interpret", "--ckpt_path", str(values_run.best), "--images", str(squares_csv.parent)]
    result = run_cli(*args, "--labels", str(labels), "--out", str(out), "--count", "4", "--no-gradcam")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MAE" in result.stdout and "R^2" in result.stdout
    found = json.loads((out / "interpretation.json").read_text())
    true = [r["true"]["level"] for r in found["largest_errors"]]
    by_path = {Path(row["path"]).name: float(row["level"]) for row in chosen}
    assert true == [pytest.approx(by_path[r["image"]], abs=1e-6) for r in found["largest_errors"]]
    assert found["gradcam_layer"] is None and "predicted_vs_true_level.png" in found["pngs"]
    # a CSV without the model's target column is refused, naming it
    labels.write_text("path,severity\n" + "".join(f"{row['path']},0.5\n" for row in chosen))
    result = run_cli(*args, "--labels", str(labels), "--out", str(out))
    assert result.returncode != 0 and "level" in result.stderr


def test_per_target_figures_are_the_torchmetrics_ones_the_test_loop_logs():
    from torchmetrics import MeanAbsoluteError, MeanSquaredError, R2Score

    rng = np.random.default_rng(1)
    truth = rng.normal([10.0, 0.5], [3.0, 0.1], (50, 2))
    predicted = truth + rng.normal(0, [1.0, 0.05], (50, 2))
    rows = per_target_table(truth, predicted, ["age", "level"])
    t, v = torch.as_tensor(truth), torch.as_tensor(predicted)
    assert rows[2]["target"] == "all targets"
    assert rows[2]["mae"] == pytest.approx(float(MeanAbsoluteError()(v.flatten(), t.flatten())), rel=1e-6)
    assert rows[2]["rmse"] == pytest.approx(
        float(MeanSquaredError(squared=False)(v.flatten(), t.flatten())), rel=1e-6
    )
    assert rows[2]["r2"] == pytest.approx(float(R2Score(multioutput="uniform_average")(v, t)), rel=1e-6)
    for i, row in enumerate(rows[:2]):
        assert row["mae"] == pytest.approx(np.abs(predicted[:, i] - truth[:, i]).mean())  # in its own units
        assert row["r2"] == pytest.approx(float(R2Score()(v[:, i], t[:, i])), rel=1e-6)


# --- pictures and previews of every kind -------------------------------------------------------------


def test_learning_curves_draw_the_kinds_validation_scores_in_place_of_accuracy(tmp_path):
    curves = {
        "train_loss_epoch": [0.7, 0.4, 0.3],
        "val_loss": [0.6, 0.5, 0.45],
        "train_label_acc": [0.6, 0.8, 0.9],
        "val_map": [0.5, 0.7, 0.9],
        "val_f1_macro": [0.0, 0.5, 0.8],
    }
    png = plots.learning_curves(
        curves, tmp_path / "lc.png", unfreeze_epochs=[], scores=["train_label_acc", "val_map", "val_f1_macro"]
    )
    with Image.open(png) as image:
        assert image.size[0] > 1.8 * image.size[1]  # two panels: loss, and the scores
    only_loss = plots.learning_curves(
        {"val_loss": [0.6, 0.5]}, tmp_path / "loss.png", unfreeze_epochs=[], scores=["val_mae"]
    )
    with Image.open(only_loss) as image:
        assert image.size[0] < 1.5 * image.size[1]  # nothing of the scores logged: the loss alone
    with pytest.raises(ValueError, match="val_mae"):
        plots.learning_curves({"lr": [0.1, 0.01]}, tmp_path / "x.png", scores=["train_mae", "val_mae"])


@pytest.mark.parametrize("kind", ["multi_label", "regression"])
def test_augment_preview_captions_the_training_image_with_its_labels_or_numbers(kind, squares_csv, tmp_path):
    recipe = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(tmp_path / "run")},
        "model": {"backbone": TINY_BACKBONE, "pretrained": False},
        "data": {
            "source": "csv",
            "csv_path": str(squares_csv),
            "target": TARGETS[kind],
            "pipeline": {**NORM, "mean": list(NORM["mean"]), "std": list(NORM["std"]), "augment": "light"},
            "loader": {"num_workers": 0},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "preview.png"
    result = run_cli("augment-preview", "--config", str(path), "--out", str(out), "--n", "3", "--index", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    shown = re.search(r"training image 2 \((.*)\) through", result.stdout).group(1)
    if kind == "multi_label":
        assert shown in {"no label", "red", "blue", "blue, red"}
    else:
        assert re.fullmatch(r"level [0-9.e-]+", shown) and 0 <= float(shown.split()[1]) <= 1
    _picture(out, min_side=100)


def test_targets_read_as_words_for_each_kind():
    assert target_text("multi_label", ["crack", "finger"], np.array([0.0, 0.0])) == "no label"
    assert target_text("multi_label", ["crack", "finger"], np.array([1.0, 1.0])) == "crack, finger"
    assert target_text("regression", ["age", "level"], np.array([31.5, 0.25])) == "age 31.5, level 0.25"
    assert target_text("single_label", ["cat", "dog"], np.int64(0)) == "cat"
    with pytest.raises(ValueError, match="ordinal"):
        target_text("ordinal", ["a"], 0)
