"""Interpretation: top losses, Grad-CAM, per-class table, calibration pictures; in the run report and as
``python -m transferkit interpret``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import NORM, TINY_BACKBONE, make_stripes_folder, quiet_trainer, run_cli
from PIL import Image

import transferkit as tk
from transferkit.errors import ConfigError
from transferkit.inference.gradcam import gradcam_layer, gradcam_maps

PATCH = 24  # side of the planted square, pixels of a 96 x 96 image


def _patch_folder(
    root: Path, per_class: int = 60, size: int = 96, seed: int = 0
) -> dict[str, tuple[int, int]]:
    """Noise images with one square each, green (class 'green') or red ('red') at a random place: the colour
    of the square is the label, so the square is the only discriminative region. Returns file -> (y, x)."""
    rng = np.random.default_rng(seed)
    boxes = {}
    for name, colour in (("green", (40, 200, 40)), ("red", (200, 40, 40))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.normal(128, 40, (size, size, 3)).clip(0, 255).astype(np.uint8)
            y, x = (int(v) for v in rng.integers(0, size - PATCH, 2))
            image[y : y + PATCH, x : x + PATCH] = colour
            path = root / name / f"{name}_{i:03d}.png"
            Image.fromarray(image).save(path)
            boxes[str(path)] = (y, x)
    return boxes


@pytest.mark.slow
def test_gradcam_highlights_a_planted_discriminative_patch(tmp_path):
    boxes = _patch_folder(tmp_path / "patches")
    data = tk.ImageDataModule(
        source="folder",
        root=str(tmp_path / "patches"),
        pipeline={"image_size": 96, "mean": (0.5,) * 3, "std": (0.5,) * 3, "augment": "none"},
        loader={"num_workers": 0, "batch_size": 16},
    )
    L.seed_everything(0)
    model = tk.TransferClassifier(
        num_classes=2,
        class_names=data.class_names,
        backbone="test_resnet",
        pretrained=False,
        optimizer={"lr": 3e-3},
    )
    quiet_trainer(tmp_path / "run", max_epochs=5, enable_checkpointing=False).fit(model, datamodule=data)
    test = data.datasets["test"]
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = [int(test[i][1]) for i in range(len(test))]
    maps = gradcam_maps(model, images, classes=labels)
    assert maps.shape == (len(test), 96, 96) and maps.min() >= 0.0 and maps.max() <= 1.0
    inside_brighter, peak_on_patch = [], []
    for i, item in enumerate(test.items):
        y, x = boxes[str(item)]
        square = maps[i, y : y + PATCH, x : x + PATCH]
        outside = (maps[i].sum() - square.sum()) / (maps[i].size - square.size)
        inside_brighter.append(square.mean() > outside)
        py, px = np.unravel_index(maps[i].argmax(), maps[i].shape)
        # the map has the last feature map's resolution (3 x 3 cells of 32 px): half a patch of slack
        peak_on_patch.append(
            y - PATCH // 2 <= py < y + PATCH * 3 // 2 and x - PATCH // 2 <= px < x + PATCH * 3 // 2
        )
    # a map that ignored the square would be brighter on it about half the time, peak near it about 1 in 4
    assert np.mean(inside_brighter) >= 0.85, np.mean(inside_brighter)
    assert np.mean(peak_on_patch) >= 0.6, np.mean(peak_on_patch)
    # the weights are untouched and no gradient is left behind
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_reads_vit_tokens_on_their_grid_and_refuses_what_it_cannot_read():
    vit = tk.TransferClassifier(num_classes=3, backbone="test_vit", pretrained=False)
    layer, reshape, described = gradcam_layer(vit, 64)
    assert layer is vit.backbone.model.blocks[-1].norm1 and "4 x 4 grid" in described
    maps = gradcam_maps(vit, torch.randn(2, 3, 64, 64))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
    cnn = tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    assert gradcam_layer(cnn, 64)[2].startswith("bn2 (")  # EfficientNet's last feature map
    nhwc = tk.TransferClassifier(num_classes=2, backbone="test_mambaout", pretrained=False)
    with pytest.raises(ConfigError, match=r"MambaOut's forward_features gives \(1, 2, 2, 64\)"):
        gradcam_maps(nhwc, torch.randn(1, 3, 64, 64))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finetune run on stripes (two classes) and its recipe; its report holds the interpretation."""
    root = tmp_path_factory.mktemp("interpret")
    stripes = make_stripes_folder(root / "stripes", per_class=40)
    recipe = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "default_root_dir": str(root / "run"), "enable_progress_bar": False},
        "model": {"backbone": TINY_BACKBONE, "pretrained": False, "prediction": {"tta": "hflip"}},
        "data": {
            "source": "folder",
            "root": str(stripes),
            "loader": {"num_workers": 0, "batch_size": 16},
            "pipeline": {**NORM, "mean": list(NORM["mean"]), "std": list(NORM["std"])},
        },
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("finetune", "--config", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    best = next((root / "run").rglob("checkpoints/*.ckpt"))
    run_dir = next((root / "run").rglob("report.md")).parent
    return {"root": root, "stripes": stripes, "recipe": path, "run_dir": run_dir, "best": best}


@pytest.mark.slow
def test_the_run_report_shows_top_losses_gradcam_per_class_and_calibration(trained):
    run_dir = trained["run_dir"]
    report = (run_dir / "report.md").read_text()
    for heading in ("## Interpretation (test split", "### Per class", "### Top losses", "### Calibration"):
        assert heading in report
    for png in (
        "top_losses.png",
        "most_confident.png",
        "confusion_normalised.png",
        "reliability.png",
        "roc_pr.png",
    ):
        assert f"]({png})" in report and (run_dir / png).stat().st_size > 0
    found = json.loads((run_dir / "interpretation.json").read_text())
    # the figures agree with the test loop: same split size and accuracy as metrics.json
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert found["images"] == metrics["split_sizes"]["test"]
    assert found["accuracy"] == pytest.approx(metrics["test"]["test_acc"], abs=1e-6)
    assert found["gradcam_layer"].startswith("bn2") and "Grad-CAM from `bn2" in report


def test_interpret_command_on_labelled_files_ranks_losses_and_checks_labels(trained, tmp_path):
    files = sorted(trained["stripes"].rglob("*.png"))[::4]
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for f in files:
            writer.writerow([str(f.relative_to(trained["stripes"])), f.parent.name])
    out = tmp_path / "interpretation"
    args = ["interpret", "--ckpt_path", str(trained["best"]), "--images", str(trained["stripes"])]
    result = run_cli(*args, "--labels", str(labels), "--out", str(out), "--count", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision" in result.stdout and "ECE (15 bins) before temperature scaling" in result.stdout
    found = json.loads((out / "interpretation.json").read_text())
    assert found["images"] == len(files)
    losses = [row["loss"] for row in found["top_losses"]]
    assert len(losses) == 5 and losses == sorted(losses, reverse=True)
    confident = found["most_confident"]
    assert all(row["true"] == row["predicted"] for row in confident)
    probabilities = [row["probability"] for row in confident]
    assert probabilities == sorted(probabilities, reverse=True)
    assert found["per_class"][-1]["support"] == len(files)  # the macro row counts every image once
    # every image's loss is at most the largest one listed
    model, _ = tk.load_for_inference(trained["best"])
    assert losses[0] >= max(row["loss"] for row in confident)
    assert model.class_names == ["horizontal", "vertical"]
    # a label the model does not know is refused with the model's classes
    with labels.open("a", newline="") as handle:
        csv.writer(handle).writerow([str(files[0].relative_to(trained["stripes"])), "diagonal"])
    result = run_cli(*args, "--labels", str(labels), "--out", str(out))
    assert result.returncode != 0 and "diagonal" in result.stderr and "horizontal" in result.stderr


def test_interpret_command_with_the_recipe_reads_its_validation_split(trained, tmp_path):
    out = tmp_path / "val"
    args = ["interpret", "--ckpt_path", str(trained["best"]), "--config", str(trained["recipe"])]
    result = run_cli(*args, "--split", "val", "--out", str(out), "--no-gradcam")
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((out / "interpretation.json").read_text())
    assert found["split"] == "val" and found["gradcam_layer"] is None
    assert "optimistic" in found["calibration"]["source"]  # fitted on the split it is shown on, and says so
    result = run_cli("interpret", "--ckpt_path", str(trained["best"]))
    assert result.returncode == 2 and "--config" in result.stderr
