"""Data: sources, splits, image modes, bad input, Albumentations pipelines."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from conftest import NORM, merged
from PIL import Image

from transferkit.data import DatasetError, ImageDataModule, ImageReadError, load_image
from transferkit.data.augment import build_train_transform
from transferkit.errors import ConfigError


def _datamodule(**kwargs) -> ImageDataModule:
    return ImageDataModule(**merged({"loader": {"num_workers": 0}, "pipeline": NORM}, kwargs))


def test_folder_splits_are_stratified_seeded_and_disjoint(stripes_folder):
    dm = _datamodule(
        source="folder", root=str(stripes_folder), split={"val_fraction": 0.25, "test_fraction": 0.25}, seed=3
    )
    dm.setup("fit")
    splits = dm.split_indices
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(80))
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 45,
        "val": 15,
        "test": 20,
    }  # val: 25 % of the rest
    assert dm.summary()["test"] == {"horizontal": 10, "vertical": 10}
    again = _datamodule(
        source="folder", root=str(stripes_folder), split={"val_fraction": 0.25, "test_fraction": 0.25}, seed=3
    )
    again.setup("fit")
    other = _datamodule(
        source="folder", root=str(stripes_folder), split={"val_fraction": 0.25, "test_fraction": 0.25}, seed=4
    )
    other.setup("fit")
    assert all(np.array_equal(splits[s], again.split_indices[s]) for s in splits)
    assert not np.array_equal(splits["test"], other.split_indices["test"])


def test_train_fraction_trains_on_a_stratified_share_and_keeps_validation_and_test():
    whole = _datamodule(source="digits", seed=2)
    whole.setup("fit")
    half = _datamodule(source="digits", seed=2, split={"train_fraction": 0.5})
    half.setup("fit")
    full, part = whole.split_indices, half.split_indices
    # a learning curve's points are scored on the same cells: validation and test are untouched
    assert np.array_equal(full["val"], part["val"]) and np.array_equal(full["test"], part["test"])
    assert set(part["train"]) < set(full["train"]) and len(part["train"]) == round(len(full["train"]) / 2)
    assert len(half.train_dataloader().dataset) == len(part["train"])  # what trains is the share
    counts, share = (np.bincount(whole.data.labels[i], minlength=10) for i in (full["train"], part["train"]))
    assert np.all(np.abs(share - counts / 2) <= 1)  # every class keeps its share
    again = _datamodule(source="digits", seed=2, split={"train_fraction": 0.5})
    again.setup("fit")
    assert np.array_equal(again.split_indices["train"], part["train"])  # seeded
    for bad in (0, 1.5, -0.1):
        with pytest.raises(
            ConfigError,
            match=r"data\.split\.train_fraction must be the share of the training split .*\(1: the whole split\)",
        ):
            _datamodule(source="digits", split={"train_fraction": bad})


def test_batches_have_the_network_input_shape(stripes_folder):
    dm = _datamodule(
        source="folder", root=str(stripes_folder), pipeline={"augment": "heavy"}, loader={"batch_size": 8}
    )
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1}
    assert dm.num_classes == 2 and dm.class_names == ["horizontal", "vertical"]


def test_predefined_train_val_test_folders_are_kept(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    dm = _datamodule(source="folder", root=str(tmp_path))
    dm.setup()
    assert {s: sum(c.values()) for s, c in dm.summary().items()} == {"train": 12, "val": 4, "test": 6}


def _save(tmp_path, name, image: Image.Image) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def test_every_image_mode_becomes_three_channel_uint8(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    gray16 = Image.fromarray((np.arange(120).reshape(10, 12) * 500).astype(np.uint16))
    cases = {
        "gray.png": base.convert("L"),
        "rgba.png": base.convert("RGBA"),
        "palette.png": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"),
        "gray16.png": gray16,
        "bw.png": base.convert("1"),
    }
    for name, image in cases.items():
        array = load_image(_save(tmp_path, name, image))
        assert array.shape == (10, 12, 3) and array.dtype == np.uint8, name
    # 16-bit values are scaled to 8 bits, not clipped
    array16 = load_image(str(tmp_path / "gray16.png"))
    assert array16.max() > 200 and array16.min() == 0
    # transparent pixels are composited onto white
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_save(tmp_path, "clear.png", clear)).min() == 255


def test_unreadable_images_are_named_with_the_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    for name, reason in (("empty.jpg", "empty"), ("text.png", "not an image"), ("cut.jpg", "truncated")):
        with pytest.raises(ImageReadError, match=reason) as info:
            load_image(tmp_path / name)
        assert info.value.path.endswith(name)


def test_a_bad_image_stops_setup_or_is_skipped_and_counted(stripes_folder):
    (stripes_folder / "vertical" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"1 of 81 images cannot be read:\n.*broken.png"):
        _datamodule(source="folder", root=str(stripes_folder)).setup()
    dm = _datamodule(source="folder", root=str(stripes_folder), skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        dm.setup()
    assert len(dm.skipped_images) == 1 and sum(sum(c.values()) for c in dm.summary().values()) == 80


def test_missing_root_and_empty_class_folder_are_named(tmp_path, stripes_folder):
    with pytest.raises(DatasetError, match="does not exist"):
        _datamodule(source="folder", root=str(tmp_path / "nowhere"))
    (stripes_folder / "diagonal").mkdir()
    (stripes_folder / "diagonal" / "notes.txt").write_text("todo")
    with pytest.raises(DatasetError, match=r"class folder '.*diagonal' holds no images"):
        _datamodule(source="folder", root=str(stripes_folder))


def test_csv_source_reads_paths_and_labels(stripes_folder, tmp_path):
    files = sorted(stripes_folder.rglob("*.png"))
    rows = ["path,label"] + [f"{p.relative_to(stripes_folder)},{p.parent.name}" for p in files]
    (stripes_folder / "labels.csv").write_text("\n".join(rows) + "\n")
    dm = _datamodule(source="csv", csv_path=str(stripes_folder / "labels.csv"))
    dm.setup()
    assert dm.class_names == ["horizontal", "vertical"] and sum(dm.summary()["train"].values()) > 40
    (tmp_path / "bad.csv").write_text("path,label\nmissing.png,a\n")
    with pytest.raises(DatasetError, match="do not exist.*missing.png"):
        _datamodule(source="csv", csv_path=str(tmp_path / "bad.csv"))


def test_elpv_follows_the_benchmark_protocol():
    dm = _datamodule(source="elpv", split={"val_fraction": 0.15}, seed=0)
    dm.setup()
    sizes = {s: len(v) for s, v in dm.split_indices.items()}
    assert sizes["test"] == 656 and sizes["train"] + sizes["val"] == 1968
    # the protocol's own split, reproduced exactly
    from sklearn.model_selection import train_test_split

    probs, types = dm.data.meta["defect_probability"], dm.data.meta["cell_type"]
    keys = [f"{p:.2f}_{t}" for p, t in zip(probs, types, strict=True)]
    _, test = train_test_split(np.arange(2624), test_size=0.25, stratify=keys, random_state=0)
    assert np.array_equal(np.sort(test), dm.split_indices["test"])
    assert dm.class_names == ["functional", "defective"]
    image, label = dm.datasets["test"][0]
    assert image.shape == (3, 32, 32)
    four = _datamodule(source="elpv", task="4class")
    assert four.num_classes == 4 and set(np.unique(four.data.labels)) == {0, 1, 2, 3}


def test_digits_source():
    dm = _datamodule(source="digits", pipeline={"image_size": 16})
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (3, 16, 16) and dm.num_classes == 10


def test_inline_augmentations_and_round_trip():
    transform = build_train_transform(
        [{"HorizontalFlip": {"p": 1.0}}, {"__class_fullname__": "VerticalFlip", "p": 1.0}],
        4,
        (0.0,) * 3,
        (1.0,) * 3,
    )
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    out = transform(image=image)["image"]
    expected = torch.from_numpy(image[::-1, ::-1].copy() / 255.0).permute(2, 0, 1).float()
    torch.testing.assert_close(out, expected)
    replayed = A.from_dict(A.to_dict(transform))
    torch.testing.assert_close(replayed(image=image)["image"], out)
    with pytest.raises(ValueError, match="not an Albumentations transform"):
        build_train_transform([{"Flipp": {}}], 4, (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        build_train_transform("extreme", 4, (0.0,) * 3, (1.0,) * 3)


def test_eval_pipeline_normalises_with_the_given_mean_and_std(stripes_folder):
    dm = _datamodule(source="folder", root=str(stripes_folder), pipeline={"augment": "none"})
    dm.setup()
    raw = dm.datasets["val"].read(0)
    image, _ = dm.datasets["val"][0]
    expected = (raw.astype(np.float32) / 255.0 - 0.5) / 0.5
    torch.testing.assert_close(image, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-5, rtol=0)


def test_a_bad_augmentation_fails_when_the_data_module_is_built_not_at_fit(stripes_folder):
    from transferkit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown augmentation preset 'extreme'; choose one of none, light"):
        _datamodule(source="folder", root=str(stripes_folder), pipeline={"augment": "extreme"})
    with pytest.raises(ConfigError, match="'Flipp' is not an Albumentations transform"):
        _datamodule(source="folder", root=str(stripes_folder), pipeline={"augment": [{"Flipp": {}}]})
