"""``doctor``: likely label issues from out-of-fold probabilities, near-duplicates across splits, outliers, and
``data.split.exclude`` acting on what it lists."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

import transferkit as tk
from transferkit.errors import ConfigError, TransferKitWarning
from transferkit.tuning.doctor import duplicate_groups, label_issue_scores, oof_probabilities, outlier_scores

SMALL = ["--data.pipeline.image_size", "64", "--data.loader.num_workers", "0"]
PIPELINE = {"image_size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_out_of_fold_scores_rank_flipped_labels_first():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 60)
    features = rng.normal(0, 1, (180, 16)) + 5.0 * np.eye(16)[labels]  # three clusters, apart
    flipped = rng.choice(180, 9, replace=False)
    given = labels.copy()
    given[flipped] = (labels[flipped] + 1) % 3
    probs = oof_probabilities(features, given, folds=5, seed=0)
    score, predicted = label_issue_scores(probs, given)
    ranked = np.argsort(-score)
    assert len(set(ranked[:9]) & set(flipped)) >= 8  # the top 9 are the flipped 9, but for one at most
    assert set(flipped) <= set(ranked[:12])
    assert (predicted[flipped] == labels[flipped]).all()  # and the suggestion is its true class
    # a model that saw the image would have rated it by its own memory: each row is from a model that did not
    assert np.allclose(probs.sum(axis=1), 1)


def test_out_of_fold_needs_two_images_of_a_class():
    with pytest.raises(ConfigError, match="at least two images of every class"):
        oof_probabilities(np.zeros((5, 2)), np.array([0, 0, 0, 0, 1]))


def test_duplicate_groups_join_near_copies_and_nothing_else():
    rng = np.random.default_rng(1)
    features = rng.normal(0, 1, (200, 64))
    features[150] = features[3] + rng.normal(0, 0.05, 64)
    features[151] = features[3] + rng.normal(0, 0.05, 64)  # two copies of one image: one group of three
    features[190] = features[7] * 3.0  # a brighter copy: same direction
    groups = duplicate_groups(features, 0.95, block=64)  # blocks smaller than the data: pairs across blocks
    assert sorted(m for m, _ in groups) == [[3, 150, 151], [7, 190]]
    assert duplicate_groups(rng.normal(0, 1, (200, 64)), 0.95) == []


def test_an_image_far_from_every_class_scores_highest():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 50)
    features = rng.normal(0, 0.3, (101, 8)) + np.eye(8)[np.r_[labels, 5]] * 3
    ratio, nearest = outlier_scores(features, np.arange(100), labels)
    assert ratio.argmax() == 100 and ratio[100] > 2
    assert (nearest[:100] == labels).mean() > 0.95
    assert np.quantile(ratio[:100], 0.5) < 1


def _textured_tiles(root: Path, per_class: int = 60) -> Path:
    """Tiles of scikit-learn's two sample photographs, one class per photograph, none overlapping, none flat
    (a tile of clear sky looks like every other)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    for name, photo in zip(("china", "flower"), load_sample_images().images, strict=True):
        (root / name).mkdir(parents=True)
        tiles = [(y, x) for y in range(0, photo.shape[0] - 48, 48) for x in range(0, photo.shape[1] - 48, 48)]
        textured = [t for t in tiles if photo[t[0] : t[0] + 48, t[1] : t[1] + 48].std() > 25]
        for k, t in enumerate(rng.choice(len(textured), per_class, replace=False)):
            y, x = textured[t]
            Image.fromarray(photo[y : y + 48, x : x + 48]).save(root / name / f"{name}_{k:03d}.png")
    return root


def test_a_test_image_that_is_a_training_image_in_other_bytes_is_warned_about(tmp_path: Path):
    root = _textured_tiles(tmp_path / "tiles", per_class=40)

    def set_up(**split) -> list[str]:
        dm = tk.ImageDataModule(source="folder", root=str(root), pipeline=PIPELINE, split=split)
        dm.setup("fit")  # headers only: the check is finetune's, before the test split is scored
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            dm.check_near_duplicates()
        return [str(w.message) for w in seen if "look like training or validation images" in str(w.message)]

    assert set_up() == []  # distinct pictures: no warning
    for path in sorted((root / "china").glob("*.png")):  # each picture again, resized and re-encoded
        Image.open(path).resize((40, 40)).save(path.with_name(f"copy_{path.stem}.jpg"), quality=75)
    (message,) = set_up()
    assert "(test) ~" in message and "copy_" in message and "doctor" in message
    assert set_up(near_duplicates="off") == []


@pytest.fixture
def doctored_folder(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    """Tiles of scikit-learn's two sample photographs, one class per photograph (60 each, none overlapping),
    with 4 tiles moved into the other class's folder, and one tile copied under another name, re-encoded as
    a JPEG and resized."""
    from sklearn.datasets import load_sample_images

    root = tmp_path / "tiles"
    rng = np.random.default_rng(0)
    for name, photo in zip(("china", "flower"), load_sample_images().images, strict=True):
        (root / name).mkdir(parents=True)
        tiles = [(y, x) for y in range(0, photo.shape[0] - 48, 48) for x in range(0, photo.shape[1] - 48, 48)]
        for k, t in enumerate(rng.choice(len(tiles), 60, replace=False)):
            y, x = tiles[t]
            Image.fromarray(photo[y : y + 48, x : x + 48]).save(root / name / f"{name}_{k:03d}.png")
    moved = []
    for name, other in (("china", "flower"), ("flower", "china")):
        for i in (5, 17):
            source = root / name / f"{name}_{i:03d}.png"
            target = root / other / f"moved_{source.name}"
            shutil.move(source, target)
            moved.append(target)
    original = root / "flower" / "flower_030.png"
    copy = root / "flower" / "copy_of_30.jpg"
    Image.open(original).resize((40, 40)).save(copy, quality=80)
    return root, moved, copy


def test_doctor_lists_wrong_labels_copies_and_writes_grids(doctored_folder, tmp_path: Path):
    root, moved, copy = doctored_folder
    out = tmp_path / "doctor"
    done = run_cli(
        "doctor", "--data.source", "folder", "--data.root", str(root), "--out", str(out), *SMALL,
        "--trainer.default_root_dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "likely label issues" in done.stdout and "near-duplicate groups" in done.stdout
    issues = _rows(out / "label_issues.csv")
    listed = [row["file"] for row in issues]
    # the moved images are listed, each with its true class as the suggestion; few others are
    for path in moved:
        assert str(path) in listed[:8], (path, listed[:8])
        row = next(r for r in issues if r["file"] == str(path))
        assert row["suggested"] != row["label"] and row["split"] in ("train", "val")
        assert row["suggested"] in path.name and row["action"] == "drop"
    assert all(row["split"] != "test" for row in issues)  # the test split's labels are never read
    scores = [float(row["score"]) for row in issues]
    assert scores == sorted(scores, reverse=True)
    groups = _rows(out / "near_duplicates.csv")
    with_copy = [row for row in groups if row["file"] == str(copy)]
    assert with_copy, "the re-encoded, resized copy was not found"
    members = {row["file"] for row in groups if row["group"] == with_copy[0]["group"]}
    assert members == {str(copy), str(root / "flower" / "flower_030.png")}
    for name in ("label_issues.png", "near_duplicates.png"):
        assert (out / name).stat().st_size > 10_000
    record = json.loads((out / "doctor.json").read_text())
    assert record["label_issues"] == len(issues) and record["images"] == 121
    assert "logistic regression" in record["probabilities_from"]

    # acting on it is one setting: the listed training images are dropped, validation and test unchanged
    kept = tk.ImageDataModule(source="folder", root=str(root), pipeline=PIPELINE)
    kept.setup("fit")
    dropped = tk.ImageDataModule(
        source="folder", root=str(root), pipeline=PIPELINE, split={"exclude": str(out / "label_issues.csv")}
    )
    dropped.setup("fit")
    in_train = sum(row["split"] == "train" for row in issues)
    assert len(dropped.split_indices["train"]) == len(kept.split_indices["train"]) - in_train
    for split in ("val", "test"):
        assert dropped.split_indices[split].tolist() == kept.split_indices[split].tolist()
    assert dropped.exclusions["dropped"] == in_train
    assert dropped.exclusions["not_training"] == len(issues) - in_train


def test_exclude_relabels_keeps_and_refuses_what_it_cannot_do(stripes_folder: Path, tmp_path: Path):
    dm = tk.ImageDataModule(source="folder", root=str(stripes_folder), pipeline=PIPELINE)
    dm.setup("fit")
    train = dm.split_indices["train"]
    first, second = (str(dm.data.items[i]) for i in train[:2])
    listing = tmp_path / "issues.csv"
    other = "vertical" if dm.class_names[dm.data.labels[train[0]]] == "horizontal" else "horizontal"
    listing.write_text(f"file,suggested,action\n{first},{other},relabel\n{second},horizontal,keep\n")
    edited = tk.ImageDataModule(
        source="folder", root=str(stripes_folder), pipeline=PIPELINE, split={"exclude": str(listing)}
    )
    edited.setup("fit")
    assert edited.split_indices["train"].tolist() == train.tolist()
    assert edited.data.class_names[edited.data.labels[train[0]]] == other
    assert edited.exclusions == {"dropped": 0, "relabelled": 1, "kept": 1, "not_training": 0, "not_found": 0}

    def refused(text: str, match: str) -> None:
        listing.write_text(text)
        module = tk.ImageDataModule(
            source="folder", root=str(stripes_folder), pipeline=PIPELINE, split={"exclude": str(listing)}
        )
        with pytest.raises(ConfigError, match=match):
            module.setup("fit")

    refused(f"file,suggested,action\n{first},zebra,relabel\n", "not one of the classes")
    refused(f"path\n{first}\n", "no 'file' column")
    refused("file\n/elsewhere/a.png\n/elsewhere/b.png\n", "none of the 2 files listed")
    refused(f"file,action\n{first},burn\n", "not one of drop, relabel, keep")


def test_doctor_reads_a_stored_cross_validation_and_refuses_one_of_other_data(
    doctored_folder, tmp_path: Path
):
    root, moved, _ = doctored_folder
    dm = tk.ImageDataModule(
        source="folder", root=str(root), pipeline={"image_size": 64}, loader={"num_workers": 0}
    )
    model = tk.TransferClassifier(num_classes=2, class_names=dm.class_names, backbone="tf_efficientnet_lite0")
    dm.use_data_config(model.data_config)
    dm.setup("fit")
    # out-of-fold rows as cv writes them: every non-test image, its probabilities (here: certain of the
    # truth, which the file name tells)
    cv = tmp_path / "cv"
    cv.mkdir()
    lines = ["index,file,label,fold,predicted,p_china,p_flower"]
    for i in np.r_[dm.split_indices["train"], dm.split_indices["val"]]:
        file, label = str(dm.data.items[i]), dm.class_names[dm.data.labels[i]]
        truth = "china" if "china_" in Path(file).name else "flower"
        p = (0.9, 0.1) if truth == "china" else (0.1, 0.9)
        lines.append(f"{i},{file},{label},0,{truth},{p[0]},{p[1]}")
    (cv / "oof_predictions.csv").write_text("\n".join(lines) + "\n")
    report = tk.doctor(model, dm, tmp_path / "out", cv_dir=cv)
    listed = {row["file"] for row in report.label_issues}
    outside_test = {str(p) for p in moved} & {row["file"] for row in report.images if row["split"] != "test"}
    assert listed == outside_test and report.probabilities_from.startswith("cross-validation")

    (cv / "oof_predictions.csv").write_text(lines[0] + "\n" + lines[1].replace(".png", ".jpg") + "\n")
    with pytest.raises(ConfigError, match="does not match this recipe's data"):
        tk.doctor(model, dm, tmp_path / "out", cv_dir=cv)


@pytest.mark.parametrize("kind", ["multi_label", "regression"])
def test_doctor_finds_wrong_labels_and_numbers_of_the_other_kinds(kind: str, tmp_path: Path):
    from conftest import make_squares_csv

    table = make_squares_csv(tmp_path / "squares", count=160, size=48)
    lines = table.read_text().splitlines()
    wrong = list(range(1, 161, 20))  # 8 rows: a label dropped or added, or the brightness moved
    for row in wrong:
        path, labels, red, blue, level = lines[row].split(",")
        labels = "" if labels else "red;blue"
        level = f"{(float(level) + 0.5) % 1:.4f}"
        lines[row] = ",".join([path, labels, red, blue, level])
    table.write_text("\n".join(lines) + "\n")
    target = (
        {"kind": "multi_label"} if kind == "multi_label" else {"kind": "regression", "columns": ["level"]}
    )
    dm = tk.ImageDataModule(
        source="csv", csv_path=str(table), target=target, pipeline=PIPELINE, loader={"num_workers": 0}
    )
    model = tk.TransferClassifier(
        num_classes=dm.num_classes, class_names=dm.class_names, target=dm.target_kind
    )
    report = tk.doctor(model, dm, tmp_path / "out", cv_dir=tmp_path / "ignored")
    wrong_files = {str((tmp_path / "squares" / lines[row].split(",")[0]).resolve()) for row in wrong}
    scored = ~np.isnan(report.label_scores)
    assert not scored[[row["split"] == "test" for row in report.images]].any()
    order = np.argsort(-np.where(scored, report.label_scores, -np.inf), kind="stable")[: scored.sum()]
    ranking = [report.images[k]["file"] for k in order]
    ranks = [ranking.index(f) for f in wrong_files if f in ranking]
    # a random ranking puts them at half the list on average; doctor near the top
    assert len(ranks) >= 4 and np.mean(ranks) < 0.2 * len(ranking)
    assert sum(r < len(ranking) / 8 for r in ranks) >= len(ranks) / 2
    assert {row["file"] for row in report.label_issues} & set(wrong_files)
    assert "--cv is read for single-label data only" in report.notes[0]
    assert (tmp_path / "out" / "label_issues.png").is_file() and (tmp_path / "out" / "outliers.csv").is_file()


def test_finetune_warns_before_it_scores_a_test_split_holding_training_images(tmp_path: Path):
    from conftest import quiet_trainer

    root = _textured_tiles(tmp_path / "tiles", per_class=30)
    for path in sorted((root / "china").glob("*.png")):
        Image.open(path).resize((40, 40)).save(path.with_name(f"copy_{path.stem}.jpg"), quality=75)
    dm = tk.ImageDataModule(
        source="folder", root=str(root), pipeline={**PIPELINE, "image_size": 32, "augment": "none"},
        loader={"num_workers": 0, "batch_size": 16},
    )  # fmt: skip
    model = tk.TransferClassifier(num_classes=2, class_names=dm.class_names)
    with pytest.warns(TransferKitWarning, match="test images look like training or validation images"):
        quiet_trainer(tmp_path / "run", max_epochs=1).finetune(model, datamodule=dm)
