"""The pictures: each writes a real PNG, and the data each one draws is right."""

from __future__ import annotations

import csv
import doctest
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import NORM, TINY_BACKBONE, quiet_trainer, stripes
from PIL import Image
from sklearn.metrics import confusion_matrix

from transferkit import plots


def assert_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.load()  # decodes the whole file: a truncated PNG fails here
    assert width >= min_size[0] and height >= min_size[1], (width, height)
    assert width <= 4000 and height <= 4000, (width, height)


def test_the_examples_in_the_docstrings_hold():
    failures, tried = doctest.testmod(plots, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


# --- augmentation ----------------------------------------------------------------------------------


@pytest.fixture
def stripe_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [stripes("h", rng), stripes("v", rng), stripes("h", rng)]


@pytest.mark.parametrize("augment", ["light", "medium", "heavy"])
def test_augmented_views_differ_from_the_originals(augment, stripe_images):
    views = plots.augmentation_views(augment, stripe_images, n_views=6, seed=0)
    assert views.shape == (3, 7, 32, 32, 3) and views.dtype == np.uint8
    originals, augmented = views[:, :1].astype(int), views[:, 1:].astype(int)
    changed = np.abs(augmented - originals).mean(axis=(2, 3, 4)) > 1.0  # (images, views)
    # every preset applies each of its transforms with p < 1: most views change, not necessarily all
    assert changed.mean() >= 0.5, changed
    # the original column is the image itself (resized to its own size: unchanged)
    np.testing.assert_array_equal(views[:, 0], np.stack(stripe_images))


def test_no_augmentation_leaves_every_view_equal_to_the_original(stripe_images):
    views = plots.augmentation_views("none", stripe_images, n_views=3)
    for column in range(1, 4):
        np.testing.assert_array_equal(views[:, column], views[:, 0])


def test_an_inline_pipeline_does_what_it_says(stripe_images):
    views = plots.augmentation_views([{"HorizontalFlip": {"p": 1.0}}], stripe_images, n_views=2)
    for row, image in zip(views, stripe_images, strict=True):
        np.testing.assert_array_equal(row[1], image[:, ::-1])
        np.testing.assert_array_equal(row[2], image[:, ::-1])


def test_views_are_reproducible_by_seed(stripe_images):
    first = plots.augmentation_views("heavy", stripe_images, n_views=3, seed=7)
    again = plots.augmentation_views("heavy", stripe_images, n_views=3, seed=7)
    other = plots.augmentation_views("heavy", stripe_images, n_views=3, seed=8)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_data_modules_own_pipeline_is_shown_as_pixels(stripe_images):
    from transferkit import ImageDataModule

    dm = ImageDataModule(source="digits", pipeline={"augment": "medium", **NORM})
    pipeline = dm.train_transform  # ends with Normalize and ToTensorV2
    views = plots.augmentation_views(pipeline, stripe_images, n_views=2, image_size=48)
    assert views.shape == (3, 3, 48, 48, 3) and views.dtype == np.uint8
    assert views.max() > 200  # pixel values, not normalised floats
    # the caller's pipeline is left as it was: it still normalises to a tensor
    assert tuple(pipeline(image=stripe_images[0])["image"].shape) == (3, 32, 32)


def test_augmentation_grid_writes_the_views(tmp_path, stripe_images):
    path = plots.augmentation_grid(
        "heavy", stripe_images, tmp_path / "grid.png", n_views=4, row_labels=["h", "v", "h"]
    )
    assert_png(path)
    with Image.open(path) as image:
        width, height = image.size
    assert width > height  # 5 columns, 3 rows
    # an image file path works like an array
    Image.fromarray(stripe_images[0]).save(tmp_path / "one.png")
    assert_png(
        plots.augmentation_grid("light", [tmp_path / "one.png"], tmp_path / "g1.png", n_views=2), (200, 100)
    )


def test_a_wrong_preset_or_label_count_is_explained(tmp_path, stripe_images):
    with pytest.raises(ValueError, match="none, light, medium, heavy"):
        plots.augmentation_grid("strong", stripe_images, tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        plots.augmentation_grid("light", stripe_images, tmp_path / "x.png", row_labels=["a", "b"])


# --- learning curves -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real 3-epoch fit (head only for epoch 0) whose CSVLogger wrote metrics.csv."""
    from conftest import make_stripes_folder
    from lightning.pytorch.loggers import CSVLogger

    from transferkit import FreezeSchedule, ImageDataModule, TransferClassifier

    root = tmp_path_factory.mktemp("run")
    data = make_stripes_folder(root / "stripes", per_class=30)
    dm = ImageDataModule(
        source="folder",
        root=str(data),
        pipeline={"augment": "none", **NORM},
        loader={"batch_size": 16, "num_workers": 0},
    )
    model = TransferClassifier(
        num_classes=2,
        backbone=TINY_BACKBONE,
        pretrained=False,
        head={"hidden_dims": (16,)},
        freeze_schedule=FreezeSchedule(frozen_epochs=1),
    )
    trainer = quiet_trainer(
        root,
        max_epochs=3,
        logger=CSVLogger(root, name="logs"),
        log_every_n_steps=1,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    return Path(trainer.log_dir) / "metrics.csv"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_epoch_metrics_collapses_the_nan_interleaved_rows_of_csvlogger(tiny_run):
    rows = _csv_rows(tiny_run)
    # what CSVLogger writes: several rows per epoch, each with most columns empty
    assert len(rows) > 3 and any(r["val_loss"] == "" for r in rows) and any(r["val_loss"] != "" for r in rows)

    table = plots.epoch_metrics(tiny_run)
    assert table["epoch"] == [0, 1, 2]
    for name in ("train_loss_epoch", "val_loss", "train_acc", "val_acc", "trainable_groups"):
        assert all(math.isfinite(v) for v in table[name]), (name, table[name])
    for epoch in range(3):
        logged = [float(r["val_loss"]) for r in rows if r["val_loss"] and int(r["epoch"]) == epoch]
        assert table["val_loss"][epoch] == logged[-1]
    # the same numbers from the run directory, from columns (a DataFrame's to_dict) and from row dicts
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    assert plots.epoch_metrics(tiny_run.parent) == table
    assert plots.epoch_metrics(columns) == table
    assert plots.epoch_metrics(rows) == table


def test_unfreeze_epochs_are_read_from_the_log(tiny_run):
    assert plots.unfreeze_epochs_from(tiny_run) == [1]  # FreezeSchedule(frozen_epochs=1)


def test_learning_curves_of_a_real_run(tmp_path, tiny_run):
    assert_png(plots.learning_curves(tiny_run, tmp_path / "curves.png"))
    assert_png(plots.learning_curves(tiny_run, tmp_path / "plain.png", unfreeze_epochs=[], title="run"))


def test_learning_curves_say_what_they_need(tmp_path):
    with pytest.raises(ValueError, match="val_loss"):
        plots.learning_curves({"lr": [0.1, 0.01]}, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        plots.learning_curves(tmp_path / "missing", tmp_path / "x.png")


# --- confusion matrix ------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [None, "true", "pred", "all"])
def test_confusion_counts_match_sklearn(normalize):
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 3, 200))  # class 3 never predicted
    y_true[y_true == 2] = 1  # class 2 never true
    ours = plots.confusion_counts(y_true, y_pred, num_classes=5, normalize=normalize)  # class 4: empty
    theirs = confusion_matrix(y_true, y_pred, labels=range(5), normalize=normalize)
    np.testing.assert_allclose(ours, theirs)
    if normalize is None:
        assert ours.sum() == 200 and ours.dtype.kind == "i"


def test_confusion_matrix_plot(tmp_path):
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 2]
    names = ["functional", "defective", "unknown"]
    assert_png(plots.confusion_matrix_plot(y_true, y_pred, names, tmp_path / "cm.png"), (250, 250))
    assert_png(
        plots.confusion_matrix_plot(y_true, y_pred, names, tmp_path / "n.png", normalize="true"), (250, 250)
    )
    with pytest.raises(ValueError, match="num_classes=2"):
        plots.confusion_matrix_plot(y_true, y_pred, names[:2], tmp_path / "bad.png")


# --- comparisons -----------------------------------------------------------------------------------


def test_compare_curves(tmp_path):
    curves = {
        "adam": [0.5, 0.8, 0.9],
        "sgd": {0: 0.2, 1: 0.4, 2: float("nan"), 3: 0.6},
        "rmsprop": np.array([0.4, 0.7, 0.85]),
    }
    assert_png(plots.compare_curves(curves, tmp_path / "cmp.png", ylabel="val acc", title="optimizers"))
    assert_png(plots.compare_curves({"a": [2.0, 0.5, 0.1]}, tmp_path / "log.png", log_y=True))
    with pytest.raises(ValueError, match="PNG"):
        plots.compare_curves(curves, tmp_path / "cmp.jpg")
    with pytest.raises(ValueError, match="at least one"):
        plots.compare_curves({}, tmp_path / "none.png")
