"""Camera photos: set-up reads headers, JPEGs decode at the scale the pipeline needs, duplicates cost no read."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import NORM
from PIL import Image

import transferkit as tk
from transferkit.data import checks, datasets, decoded, images
from transferkit.data.augment import build_eval_transform, build_train_transform, decode_side
from transferkit.data.images import load_image


def make_photo(rng: np.random.Generator, width: int = 2016, height: int = 1512) -> Image.Image:
    """A photo-like RGB image: smooth shading, hard-edged shapes, sensor noise."""
    small = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(12):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(width // 40, width // 6)), color, -1)
        else:
            far = (x + int(rng.integers(20, width // 4)), y + int(rng.integers(20, height // 4)))
            cv2.rectangle(image, (x, y), far, color, -1)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = folder / f"photo_{i}.jpg"
        exif = Image.Exif()
        if i == 0:
            exif[0x0112] = 6  # EXIF orientation: the camera was turned 90 degrees
        make_photo(rng).save(path, quality=90, exif=exif)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_a_jpeg_decodes_at_the_smallest_scale_that_keeps_what_the_pipeline_uses(photos):
    assert decode_side(build_eval_transform(224, (0.5,) * 3, (0.5,) * 3)) == 224
    heavy = build_train_transform("heavy", 224, (0.5,) * 3, (0.5,) * 3)
    assert decode_side(heavy) == 334  # its smallest random crop still holds 224 px each way
    upright, turned = photos[1], photos[0]
    assert load_image(upright).shape == (1512, 2016, 3)
    assert load_image(upright, min_side=224).shape == (378, 504, 3)  # 1/4 scale: 378 >= 224, 1/8 is 189
    assert load_image(upright, min_side=334).shape == (378, 504, 3)
    assert load_image(upright, min_side=400).shape == (756, 1008, 3)  # 1/2: 378 would be under 400
    # EXIF orientation is applied to the reduced decode as to the full one
    assert load_image(turned).shape == (2016, 1512, 3)
    assert load_image(turned, min_side=224).shape == (504, 378, 3)
    # other formats decode in full
    png = photos[1].with_suffix(".png")
    Image.open(photos[1]).save(png)
    assert np.array_equal(load_image(png, min_side=224), load_image(png))


def test_elpv_reads_exactly_as_with_full_decoding():
    # ELPV is PNG: reduced-scale decoding leaves its images, and so its results, unchanged
    pipeline = {"augment": "none", "image_size": 96, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    now = tk.ImageDataModule(source="elpv", loader={"num_workers": 0}, pipeline=pipeline)
    full = tk.ImageDataModule(
        source="elpv", loader={"num_workers": 0}, pipeline={**pipeline, "jpeg_draft": False}
    )
    now.setup("fit")
    full.setup("fit")
    for split in ("train", "test"):
        for i in range(4):
            assert torch.equal(now.datasets[split][i][0], full.datasets[split][i][0])


def test_reduced_decoding_predicts_as_full_decoding_within_the_stated_tolerance(photos):
    # the documented tolerance (docs/guide.md): network input within 0.01 mean absolute difference
    # (normalised units), class probabilities within 0.05, the same predicted class
    torch.manual_seed(0)
    model = tk.TransferClassifier(num_classes=4, pretrained="bundled").eval()
    transform = build_eval_transform(224, model.data_config["mean"], model.data_config["std"])
    full = torch.stack([transform(image=load_image(p))["image"] for p in photos])
    reduced = torch.stack([transform(image=load_image(p, min_side=224))["image"] for p in photos])
    assert 0 < (full - reduced).abs().mean() < 0.01  # not the same pixels, nearly
    with torch.no_grad():
        p_full, p_reduced = model(full).softmax(1), model(reduced).softmax(1)
    assert (p_full - p_reduced).abs().max() < 0.05
    assert torch.equal(p_full.argmax(1), p_reduced.argmax(1))


def _photo_folder(root: Path, photos: list[Path]) -> Path:
    for i, photo in enumerate(photos):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(4):  # the same photo re-saved: other bytes, other sizes
            Image.open(photo).save(folder / f"{photo.stem}_{copy}.jpg", quality=80 + 4 * copy)
    return root


def test_setup_reads_headers_not_pixels_and_hashes_only_files_whose_size_repeats(
    tmp_path, photos, monkeypatch
):
    root = _photo_folder(tmp_path / "photos", photos)

    def no_decoding(*args, **kwargs):
        raise AssertionError("set-up decoded an image")

    hashed: list[str] = []
    digest = checks._file_digest
    monkeypatch.setattr(images, "load_image", no_decoding)
    monkeypatch.setattr(checks, "_file_digest", lambda path: hashed.append(path) or digest(path))
    dm = tk.ImageDataModule(source="folder", root=str(root), pipeline={**NORM}, loader={"num_workers": 0})
    dm.setup("fit")
    sizes = [Path(p).stat().st_size for p in dm.data.items]
    assert len(set(sizes)) == len(sizes) and hashed == []  # every size unique: nothing read
    # a copy of a training photo in another split: only same-size files are hashed, and it is named
    train, test = dm.datasets["train"].items, dm.datasets["test"].items
    Path(test[0]).write_bytes(Path(train[0]).read_bytes())
    dm = tk.ImageDataModule(source="folder", root=str(root), pipeline={**NORM}, loader={"num_workers": 0})
    with pytest.warns(UserWarning, match="1 images appear in more than one split with identical bytes"):
        dm.setup("fit")
    assert sorted(hashed) == sorted([train[0], test[0]])


def test_check_data_decodes_every_file_and_lists_each_bad_one(tmp_path, photos):
    from conftest import run_cli

    root = _photo_folder(tmp_path / "photos", photos[:2])
    good = next((root / "dogs").glob("*.jpg"))
    cut = root / "dogs" / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a header, half the pixel data
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{backbone: test_efficientnet, pretrained: false}}\n"
        f"data: {{source: folder, root: {root}, pipeline: {{image_size: 64}}, loader: {{num_workers: 0}}}}\n"
    )
    result = run_cli("check-data", "--config", str(recipe))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 of 9 image files cannot be decoded" in result.stdout
    assert "cut.jpg" in result.stdout and "truncated" in result.stdout
    cut.unlink()
    result = run_cli("check-data", "--config", str(recipe))
    assert result.returncode == 0 and "all 8 image files of 'folder' decode" in result.stdout


def _reading_forbidden(monkeypatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(images, "load_image", no_decoding)
    monkeypatch.setattr(datasets, "load_image", no_decoding)
    monkeypatch.setattr(decoded, "load_image", no_decoding)


def test_the_decoded_cache_decodes_each_photo_once_and_every_later_run_maps_it(tmp_path, photos, monkeypatch):
    root = _photo_folder(tmp_path / "photos", photos[:3])
    settings = {"source": "folder", "root": str(root), "pipeline": {**NORM, "image_size": 224}}
    cache = {"dir": str(tmp_path / "cache")}
    plain = tk.ImageDataModule(**settings, loader={"num_workers": 0, "batch_size": 4}, cache=cache)
    plain.setup("fit")
    cached = tk.ImageDataModule(
        **settings, loader={"num_workers": 2, "batch_size": 4}, cache={**cache, "decoded_images": True}
    )
    cached.setup("fit")
    assert len(cached.decoded) == 12 and cached.decoded.side == 258  # 1.15 x 224
    first = cached.datasets["val"].items[0]
    assert cached.decoded[first].shape == (258, 344, 3)  # shorter side 258, aspect kept
    # what the model sees from the cache is what it sees from the files, within the decoding tolerance
    from_files = torch.stack([plain.datasets["val"][i][0] for i in range(len(plain.datasets["val"]))])
    from_cache = torch.stack([cached.datasets["val"][i][0] for i in range(len(cached.datasets["val"]))])
    assert (from_files - from_cache).abs().mean() < 0.01

    # a later run (its loader workers too) reads the cache and decodes nothing
    with monkeypatch.context() as patch:
        _reading_forbidden(patch)
        later = tk.ImageDataModule(
            **settings, loader={"num_workers": 2, "batch_size": 4}, cache={**cache, "decoded_images": True}
        )
        later.setup("fit")
        images_seen = sum(len(labels) for _, labels in later.train_dataloader())
    assert images_seen == 4 and len(later.datasets["train"]) == 7  # one full batch (the last dropped)

    # a photo edited since is decoded again; a truncated one is not cached and is named by the loader
    edited = Path(first)
    make_photo(np.random.default_rng(7), 1600, 1200).save(edited, quality=85)
    cut = Path(cached.datasets["val"].items[1])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    again = tk.ImageDataModule(
        **settings, loader={"num_workers": 0, "batch_size": 4}, cache={**cache, "decoded_images": True}
    )
    again.setup("fit")
    assert again.decoded[str(edited)].shape == (258, 344, 3) and str(cut) not in again.decoded
    expected = cv2.resize(load_image(edited, min_side=258), (344, 258), interpolation=cv2.INTER_AREA)
    assert np.array_equal(again.decoded[str(edited)], expected)
    index = again.datasets["val"].items.index(str(cut))
    with pytest.raises(tk.ImageReadError, match="truncated") as info:
        again.datasets["val"][index]
    assert info.value.path == str(cut)
