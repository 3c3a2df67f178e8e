"""Runs people can look at and models they can ship: the run report, augment-preview, self-describing
checkpoints, predict-images, export, and the refusal of checkpoints holding code."""

from __future__ import annotations

import csv
import json
import math
import re
import types
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from conftest import NORM, TINY_BACKBONE, make_stripes_folder, merged, quiet_trainer
from PIL import Image

import transferkit as tk
from transferkit import plots
from transferkit.cli import main
from transferkit.data.images import load_image
from transferkit.training.loggers import run_loggers


def _recipe(root: Path, stripes: Path, **trainer: object) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 8,
            "accelerator": "cpu",
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "deterministic": True,
            **trainer,
        },
        "model": {
            "backbone": TINY_BACKBONE,
            "pretrained": False,
            "head": {"hidden_dims": [64]},
            "optimizer": {"lr": 0.003, "layer_decay": 1.0},
            "freeze_schedule": {"frozen_epochs": 1},  # head only in epoch 0: one unfreeze point
        },
        "data": {
            "source": "folder",
            "root": str(stripes),
            "pipeline": {
                "image_size": 32,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                # Albumentations draws from its own unseeded generator: no augmentation keeps the run exact
                "augment": "none",
            },
            "loader": {"num_workers": 0, "batch_size": 16},
        },
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """One tiny finetune through the command line, with the default loggers."""
    root = tmp_path_factory.mktemp("report")
    stripes = make_stripes_folder(root / "stripes", per_class=60)
    recipe = _recipe(root / "run", stripes)
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    assert main(["finetune", "--config", str(recipe_path)]) == 0
    (metrics_json,) = (root / "run").rglob("metrics.json")
    metrics = json.loads(metrics_json.read_text())
    return types.SimpleNamespace(
        root=root,
        stripes=stripes,
        recipe=recipe,
        recipe_path=recipe_path,
        run_dir=metrics_json.parent,
        metrics=metrics,
        best=Path(metrics["best_checkpoint"]),
    )


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _test_images(stripes: Path, count: int = 6) -> list[Path]:
    files = sorted((stripes / "horizontal").glob("*.png"))[-count // 2 :]
    return files + sorted((stripes / "vertical").glob("*.png"))[-count // 2 :]


# --- run report ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_leaves_a_report_with_the_final_figures_and_pictures(run):
    run_dir, metrics = run.run_dir, run.metrics
    assert metrics["test"]["test_acc"] > 0.6  # learned (chance is 0.5), so the figures mean something
    for name in ("config.yaml", "metrics.csv", "metrics.json", "report.md", "hparams.yaml"):
        assert (run_dir / name).is_file(), name
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["optimizer"]["lr"] == 0.003
    assert Path(metrics["best_checkpoint"]).parent == run_dir / "checkpoints"  # everything in one run dir

    curves = _png_size(run_dir / "learning_curves.png")
    confusion = _png_size(run_dir / "confusion_matrix.png")
    preview = _png_size(run_dir / "augmentation_preview.png")
    assert curves[0] > curves[1] > 200  # two panels side by side: loss and accuracy
    assert min(confusion) > 200
    assert preview[1] > 400  # four training images, one per row

    # the curves come from metrics.csv: one value per epoch, and the unfreeze after epoch 0
    table = plots.epoch_metrics(run_dir / "metrics.csv")
    assert [e for e, v in zip(table["epoch"], table["val_loss"], strict=True) if math.isfinite(v)] == list(
        range(8)
    )
    assert plots.unfreeze_epochs_from(run_dir / "metrics.csv") == [1]

    report = (run_dir / "report.md").read_text()
    test = metrics["test"]
    assert f"| test accuracy | {test['test_acc']:.4f} |" in report
    assert f"| test macro-F1 | {test['test_f1']:.4f} |" in report
    best_epoch = int(re.search(r"epoch=(\d+)", run.best.name).group(1))
    assert f"| best epoch (0-based) | {best_epoch} (val_loss {metrics['best_score']:.4f}) |" in report
    assert f"`checkpoints/{run.best.name}`" in report
    assert f"| train time | {metrics['fit_seconds']:.1f} s" in report
    # every link resolves; no warnings: each picture was drawn, and the confusion matrix (the test
    # loop's own predictions) has exactly the test accuracy of the best checkpoint
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {"learning_curves.png", "confusion_matrix.png", "augmentation_preview.png", "config.yaml"} <= set(
        links
    )
    assert all((run_dir / link).is_file() for link in links)
    assert "## Warnings" not in report


@pytest.mark.slow
def test_report_with_logging_off_goes_to_the_root_dir_and_lists_failed_pictures(run, tmp_path, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "confusion_matrix_plot", broken_plot)
    recipe = _recipe(tmp_path / "run", run.stripes, max_epochs=2, logger=False)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["finetune", "--config", str(tmp_path / "recipe.yaml")]) == 0  # the run succeeds

    root = tmp_path / "run"
    assert not (root / "lightning_logs").exists()  # the recipe turned the loggers off
    for name in ("report.md", "metrics.json", "config.yaml", "augmentation_preview.png"):
        assert (root / name).is_file(), name
    assert not (root / "learning_curves.png").exists() and not (root / "confusion_matrix.png").exists()
    report = (root / "report.md").read_text()
    warnings_section = report.split("## Warnings", 1)[1]
    assert "`confusion_matrix.png` was not drawn: OSError: disk full" in warnings_section
    assert "`learning_curves.png` was not drawn" in warnings_section and "CSVLogger" in warnings_section
    assert "| test accuracy |" in report


def test_a_failing_report_never_fails_the_training(tmp_path, stripes_folder, monkeypatch):
    import transferkit.reporting.run_report

    def broken_report(*args, **kwargs):
        raise RuntimeError("matplotlib is gone")

    monkeypatch.setattr(transferkit.reporting.run_report, "write_run_report", broken_report)
    data = tk.ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0},
    )
    model = tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    with pytest.warns(UserWarning, match="run report could not be written: RuntimeError: matplotlib is gone"):
        results = quiet_trainer(tmp_path, max_epochs=1).finetune(model, datamodule=data)
    assert results["report"] is None and "test_acc" in results["test"]
    assert (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_finetune_reads_the_test_split_once_and_its_confusion_matrix_matches_the_test(
    tmp_path, stripes_folder
):
    data = tk.ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0},
    )
    reads: list[int] = []
    test_dataloader = data.test_dataloader

    def counting_test_dataloader() -> torch.utils.data.DataLoader:
        loader = test_dataloader()

        class Counting(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(loader.dataset)

            def __getitem__(self, index: int):
                reads.append(index)
                return loader.dataset[index]

        return torch.utils.data.DataLoader(Counting(), batch_size=loader.batch_size)

    data.test_dataloader = counting_test_dataloader
    model = tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    results = quiet_trainer(tmp_path, max_epochs=2).finetune(model, datamodule=data)

    size = results["split_sizes"]["test"]
    assert len(reads) == size, (
        f"{len(reads)} test images read for a test split of {size}: read more than once"
    )
    truth, predicted = model.scoring.test_predictions
    assert len(truth) == size
    accuracy = float((truth == predicted).mean())
    assert accuracy == pytest.approx(results["test"]["test_acc"], abs=1e-6)
    report = Path(results["report"]).read_text()
    assert f"accuracy {accuracy:.3f}" in report or f"{accuracy:.3f}" in report


def test_default_loggers_keep_csv_first_and_share_its_run_dir(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    (csv_logger,) = run_loggers(tmp_path, tensorboard=False)
    assert isinstance(csv_logger, CSVLogger)
    pytest.importorskip("tensorboard")
    csv_logger, board = run_loggers(tmp_path)
    assert Path(board.log_dir) == Path(csv_logger.log_dir) / "tensorboard"


def test_a_finetune_logs_its_curves_to_tensorboard_too(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = run.run_dir / "tensorboard"
    assert list(board.glob("events.out.tfevents.*")), sorted(p.name for p in run.run_dir.iterdir())
    events = EventAccumulator(str(board))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train_loss_epoch", "val_loss", "val_acc"} <= set(scalars), scalars
    epochs = len(events.Scalars("val_loss"))
    assert epochs == run.metrics["epochs"]  # one point per epoch, like metrics.csv


# --- augment-preview -------------------------------------------------------------------------------


def test_augment_preview_draws_one_training_image_through_the_recipe_pipeline(run, tmp_path, capsys):
    from transferkit.reporting.previews import pipeline_text

    recipe = ["augment-preview", "--config", str(run.recipe_path), "--n", "5", "--index", "3"]
    light, heavy = tmp_path / "light.png", tmp_path / "heavy.png"
    assert main([*recipe, "--out", str(light), "--data.pipeline.augment", "light"]) == 0
    width, height = _png_size(light)
    assert width > 400 and height > 300  # 6 panels in 2 rows of 3, the listing under them
    assert "training image 3 (" in capsys.readouterr().out
    assert main([*recipe, "--out", str(heavy), "--data.pipeline.augment", "heavy"]) == 0
    assert _png_size(heavy)[1] > height  # the same grid; heavy lists more transforms under it

    data = tk.ImageDataModule(**merged(run.recipe["data"], {"pipeline": {"augment": "light"}}))
    listing = pipeline_text(data.train_transform)
    assert listing.splitlines()[1] == "2. HorizontalFlip(p=0.5)"
    assert "Affine(p=0.5" in listing and "rotate=(-10.0, 10.0)" in listing and "Normalize(" in listing

    assert main([*recipe, "--out", str(tmp_path / "x.png"), "--index", "9999"]) == 2
    assert "outside the training split" in capsys.readouterr().err

    # without --out: beside the recipe's runs (its default_root_dir), and it says where
    assert main([*recipe, "--trainer.default_root_dir", str(tmp_path / "runs")]) == 0
    written = tmp_path / "runs" / "augmentation_preview.png"
    assert written.is_file() and f"wrote {written}:" in capsys.readouterr().out


# --- self-describing checkpoints -------------------------------------------------------------------


def _no_weights_from_anywhere(monkeypatch):
    import transferkit.models.backbones as backbones
    import transferkit.models.hub as hub

    def refuse(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not fetch backbone weights")

    for name in ("bundled_state_dict", "load_weights_file"):
        monkeypatch.setattr(backbones, name, refuse)
    monkeypatch.setattr(hub, "create_from_hub", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_checkpoint_loads_without_recipe_or_network_and_reproduces_the_test(run, monkeypatch):
    section = torch.load(run.best, map_location="cpu", weights_only=True)["transferkit"]
    assert section["backbone"] == TINY_BACKBONE and section["weights"] == "random"
    assert section["class_names"] == ["horizontal", "vertical"]
    assert section["preprocessing"]["input_size"] == [3, 32, 32]
    assert section["preprocessing"]["mean"] == [0.5] * 3 and section["preprocessing"]["std"] == [0.5] * 3
    assert section["freeze_schedule"]["frozen_epochs"] == 1
    last = torch.load(run.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["transferkit"]["trainable_groups"] == section["num_groups"]  # all unfrozen after epoch 0

    _no_weights_from_anywhere(monkeypatch)
    model, transform = tk.load_for_inference(run.best)
    data = tk.ImageDataModule(**run.recipe["data"])
    assert A.to_dict(transform) == A.to_dict(data.eval_transform)
    assert not model.training and model.class_names == ["horizontal", "vertical"]

    # the loaded model, fed through its own pipeline, scores exactly the run's test accuracy
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            correct += int((model.predict_proba(images).argmax(-1) == labels).sum())
            total += len(labels)
    assert correct / total == pytest.approx(run.metrics["test"]["test_acc"], abs=1e-6)
    same = tk.TransferClassifier.from_checkpoint(str(run.best))
    assert all(
        torch.equal(a, b)
        for a, b in zip(same.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_mismatched_checkpoint_says_what_differs_and_what_to_do(run, tmp_path):
    with pytest.raises(
        tk.CheckpointMismatchError, match=r"num_classes: checkpoint 2 \(horizontal, vertical\), model 3"
    ):
        tk.TransferClassifier.from_checkpoint(str(run.best), num_classes=3)
    with pytest.raises(tk.CheckpointMismatchError) as caught:
        tk.TransferClassifier.load_from_checkpoint(
            run.best, backbone="resnet18", pretrained=False, weights_only=True
        )
    message = str(caught.value)
    assert "backbone: checkpoint 'test_efficientnet', model 'resnet18'" in message
    assert "backbone='test_efficientnet', num_classes=2" in message and "from_checkpoint" in message

    # resuming a run whose recipe changed the head is refused before any training
    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, head={"hidden_dims": (32,)}
    )
    data = tk.ImageDataModule(**run.recipe["data"])
    with pytest.raises(tk.CheckpointMismatchError, match=r"hidden_dims: checkpoint \[64\], model \[32\]"):
        quiet_trainer(tmp_path, max_epochs=9).fit(model, datamodule=data, ckpt_path=str(run.best))


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_checkpoint_holding_pickled_code_is_refused_without_running_it(run, tmp_path, capsys):
    checkpoint = torch.load(run.best, map_location="cpu", weights_only=True)
    marker = tmp_path / "marker.txt"
    checkpoint["callbacks"] = {"evil": _RunsCodeWhenUnpickled(marker)}
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)

    with pytest.raises(tk.CheckpointError, match="refused to load .*pickled code or objects"):
        tk.load_for_inference(evil)
    with pytest.raises(tk.CheckpointError, match="weights_only=True"):
        tk.TransferClassifier.from_checkpoint(str(evil))
    assert main(["predict-images", "--ckpt_path", str(evil), "--images", str(run.stripes)]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


# --- predict-images --------------------------------------------------------------------------------


def test_predict_images_writes_one_row_per_file_and_lists_unreadable_ones(run, tmp_path, capsys):
    folder = tmp_path / "incoming"
    folder.mkdir()
    good = _test_images(run.stripes)
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")  # not an image suffix: not listed
    missing = tmp_path / "missing.png"
    out = tmp_path / "predictions.csv"
    args = ["predict-images", "--ckpt_path", str(run.best), "--images", str(folder), str(missing)]
    assert main([*args, "--out", str(out), "--tta", "hflip", "--batch-size", "4"]) == 0

    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
        header = list(rows[0].keys())
    assert header == ["file", "predicted", "prob_horizontal", "prob_vertical", "error"]
    assert len(rows) == len(good) + 3
    errors = {Path(r["file"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"broken.png", "empty.jpg", "missing.png"}
    assert "empty" in errors["empty.jpg"] and errors["missing.png"] == "no such file"
    assert all(r["predicted"] == "" and r["prob_vertical"] == "" for r in rows if r["error"])
    stderr = capsys.readouterr().err
    assert f"predicted {len(good)} of {len(good) + 3} images" in stderr and "broken.png" in stderr

    # the rows are the checkpoint model's hflip-averaged probabilities, through its own pipeline
    model, transform = tk.load_for_inference(run.best)
    batch = torch.stack([transform(image=load_image(folder / p.name))["image"] for p in good])
    expected = model.predict_proba(batch, tta="hflip").detach().numpy()
    predicted = {Path(r["file"]).name: r for r in rows if not r["error"]}
    got = np.array([[float(predicted[p.name][f"prob_{c}"]) for c in model.class_names] for p in good])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [predicted[p.name]["predicted"] for p in good] == [
        model.class_names[i] for i in expected.argmax(1)
    ]

    # Monte Carlo dropout adds the predictive entropy: between 0 and ln(2) for two classes
    assert main([*args, "--out", str(out), "--mc-dropout", "4"]) == 0
    with out.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if not r["error"]]
    assert len(rows) == len(good)
    assert all(0.0 <= float(r["uncertainty"]) <= math.log(2) + 1e-6 for r in rows)


# --- export ----------------------------------------------------------------------------------------


def _real_batch(transform: A.Compose, files: list[Path]) -> torch.Tensor:
    return torch.stack([transform(image=load_image(f))["image"] for f in files])


def test_torchscript_export_loads_and_matches_the_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "model.torchscript.pt"
    assert main(["export", "--ckpt_path", str(run.best), "--format", "torchscript", "--out", str(out)]) == 0
    assert "BatchNorm layers folded" in capsys.readouterr().out
    preprocessing = json.loads((tmp_path / "model.preprocessing.json").read_text())
    assert preprocessing["class_names"] == ["horizontal", "vertical"]

    model, transform = tk.load_for_inference(run.best)
    batch = _real_batch(A.from_dict(preprocessing["eval_transform"]), _test_images(run.stripes, 6)[1:])
    extra = {"preprocessing.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    logits, probabilities = scripted(batch)
    with torch.no_grad():
        expected = model(batch)
    assert (logits - expected).abs().max() < 1e-4
    assert torch.allclose(probabilities, expected.softmax(-1), atol=1e-5)
    assert json.loads(extra["preprocessing.json"]) == preprocessing


@pytest.mark.slow
def test_onnx_export_of_the_bundled_backbone_matches_pytorch_on_real_images(
    run, tmp_path, monkeypatch, capsys
):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    # a checkpoint of the bundled EfficientNet-Lite0 (one short head-only epoch at 64 px)
    data = tk.ImageDataModule(
        source="folder",
        root=str(run.stripes),
        pipeline={"image_size": 64, "augment": "none"},
        loader={"num_workers": 0, "batch_size": 16},
    )
    model = tk.TransferClassifier(
        num_classes=2,
        class_names=data.class_names,
        backbone="tf_efficientnet_lite0",
        pretrained="bundled",
        freeze_schedule=tk.FreezeSchedule(frozen_epochs=5),
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    checkpoint = tmp_path / "lite0.ckpt"
    trainer.save_checkpoint(checkpoint)

    _no_weights_from_anywhere(monkeypatch)  # the checkpoint alone is enough
    out = tmp_path / "lite0.onnx"
    assert main(["export", "--ckpt_path", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    preprocessing = json.loads((tmp_path / "lite0.preprocessing.json").read_text())
    assert preprocessing["input_size"] == [3, 64, 64] and preprocessing["class_names"] == data.class_names
    assert preprocessing["mean"] == pytest.approx([0.5, 0.5, 0.5])  # tf_efficientnet_lite0's own
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(metadata["transferkit.preprocessing"]) == preprocessing

    # five real images (the trace used two): files decoded and prepared by the exported pipeline
    batch = _real_batch(A.from_dict(preprocessing["eval_transform"]), _test_images(run.stripes, 6)[1:])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(None, {"images": batch.numpy()})
    reference, _ = tk.load_for_inference(checkpoint)  # unfolded
    with torch.no_grad():
        expected = reference(batch).numpy()
    assert logits.shape == (5, 2)
    assert np.abs(logits - expected).max() < 1e-4
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
