"""Bad input: unreadable and unusual image files, and datasets that cannot train as given."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import NORM, TINY_BACKBONE, merged, quiet_trainer
from PIL import Image

import transferkit as tk
from transferkit import ImageDataModule, TransferClassifier
from transferkit.data import DatasetError, ImageReadError, load_image
from transferkit.data.augment import build_eval_transform
from transferkit.data.datasets import ImageDataset
from transferkit.errors import TransferKitWarning


def _dm(root: Path, **kwargs) -> ImageDataModule:
    return ImageDataModule(
        source="folder",
        **merged(
            {
                "root": str(root),
                "loader": {"num_workers": 0, "batch_size": 8},
                "pipeline": {"augment": "none", **NORM},
            },
            kwargs,
        ),
    )


def _save(folder: Path, name: str, image: Image.Image, **kwargs) -> Path:
    path = folder / name
    image.save(path, **kwargs)
    return path


# --- images that read, with the right pixels ---------------------------------------------------------


def test_unusual_modes_read_as_rgb_with_the_right_pixels(tmp_path):
    gray16 = Image.fromarray(np.array([[0, 1000, 32768, 65535]], dtype=np.uint16))
    assert load_image(_save(tmp_path, "g16.png", gray16))[0, :, 0].tolist() == [0, 4, 128, 255]  # scaled
    half_red = Image.new("RGBA", (3, 2), (255, 0, 0, 128))  # alpha composited onto white
    assert load_image(_save(tmp_path, "rgba.png", half_red))[1, 2].tolist() == [255, 127, 127]
    clear_la = Image.new("LA", (2, 2), (0, 0))
    assert (load_image(_save(tmp_path, "la.png", clear_la)) == 255).all()
    assert load_image(_save(tmp_path, "l.png", Image.new("L", (2, 2), 77)))[0, 0].tolist() == [77] * 3
    red_cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert load_image(_save(tmp_path, "cmyk.tif", red_cmyk))[0, 0].tolist() == [255, 0, 0]
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_image(_save(tmp_path, "p.png", palette))[0, 0].tolist() == [10, 200, 30]
    one = load_image(_save(tmp_path, "one.png", Image.new("RGB", (1, 1), (1, 2, 3))))
    assert one.shape == (1, 1, 3) and one.dtype == np.uint8 and one[0, 0].tolist() == [1, 2, 3]
    # a 1x1 image goes through the pipeline to the network's input size
    dataset = ImageDataset(
        [str(tmp_path / "one.png")], np.array([0]), build_eval_transform(32, (0.5,) * 3, (0.5,) * 3)
    )
    assert tuple(dataset[0][0].shape) == (3, 32, 32)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_image_reads_and_one_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    big = Image.new("RGB", (6000, 6000), (9, 8, 7))
    big.putpixel((5999, 5999), (200, 100, 50))
    path = _save(tmp_path, "big.png", big, compress_level=1)
    array = load_image(path)
    assert array.shape == (6000, 6000, 3) and array[-1, -1].tolist() == [200, 100, 50]
    del array
    # over Pillow's limit (where it only warns) and over twice the limit (where it refuses)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000_000)
    with pytest.raises(ImageReadError, match=r"6000x6000 = 36,000,000 pixels is over the decompression-bomb"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ImageReadError, match=r"over the decompression-bomb limit of 1,000,000 pixels"):
        load_image(path)


# --- images that do not read: named, with the reason -------------------------------------------------


def _broken_files(folder: Path) -> dict[str, str]:
    """File name -> the reason expected for it."""
    folder.mkdir(parents=True, exist_ok=True)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    png = _save(folder, "full.png", noisy).read_bytes()
    jpg = _save(folder, "full.jpg", noisy).read_bytes()
    (folder / "full.png").unlink(), (folder / "full.jpg").unlink()
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "cut.jpg").write_bytes(jpg[: len(jpg) // 3])
    (folder / "page.jpg").write_text("<html><body>404 not found</body></html>")
    return {
        "empty.png": "empty",
        "cut.png": "truncated",
        "cut.jpg": "truncated",
        "page.jpg": "not an image",
    }


def test_each_unreadable_file_is_named_with_its_reason(tmp_path):
    for name, reason in _broken_files(tmp_path).items():
        with pytest.raises(ImageReadError, match=reason) as info:
            load_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name)


def test_setup_lists_the_bad_files_or_skips_them_and_training_goes_on(stripes_folder, tmp_path):
    expected = _broken_files(stripes_folder / "vertical")
    # set-up reads headers only: it finds the empty file and the web page, not the cut pixel data
    at_setup = {name: reason for name, reason in expected.items() if not name.startswith("cut.")}
    with pytest.raises(DatasetError) as info:
        _dm(stripes_folder).setup()
    message = str(info.value)
    assert message.startswith("2 of 84 images cannot be read") and "skip_bad_images=true" in message
    assert "check-data" in message
    for name, reason in at_setup.items():
        assert any(name in line and reason in line for line in message.splitlines()), name
    # decoding every file (what check-data runs) names all four, each with its reason
    found = {Path(err.path).name: err.reason for err in tk.check_images(_dm(stripes_folder).data)}
    assert set(found) == set(expected)
    assert all(reason in found[name] for name, reason in expected.items())

    dm = _dm(stripes_folder, skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipped 2 unreadable images"):
        dm.setup()
    model = TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    trainer = quiet_trainer(tmp_path / "run", max_epochs=1, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"cut\.(png|jpg).*truncated.*skipped \(skip_bad_images=true\)"):
        trainer.fit(model, datamodule=dm)  # a loader meets the cut files: others stand in, with a warning
    assert trainer.global_step > 0 and len(dm.skipped_images) == 2


@pytest.mark.slow
@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_file_that_breaks_after_setup_is_named_from_a_worker(stripes_folder, skip_bad):
    dm = _dm(stripes_folder, loader={"num_workers": 1}, skip_bad_images=skip_bad)
    dm.setup("fit")
    victim = Path(dm.datasets["train"].items[0])
    victim.write_bytes(b"")  # gone bad between the check at setup and loading
    loader = dm.train_dataloader()
    if not skip_bad:
        with pytest.raises(ImageReadError) as info:
            list(loader)
        assert info.value.path == str(victim) and "empty" in info.value.reason
        assert "DataLoader worker" in info.value.reason and "Traceback" not in str(info.value)
    else:
        batches = list(loader)  # another sample stands in for it
        assert sum(len(labels) for _, labels in batches) == len(loader) * dm.batch_size


# --- datasets that cannot train as given ------------------------------------------------------------


def test_dataset_layout_errors_say_what_is_wrong_and_what_to_do(tmp_path, stripes_folder):
    cases = []
    with pytest.raises(DatasetError) as info:
        _dm(tmp_path / "nowhere")
    cases.append((info, r"data root '.*nowhere' does not exist; pass data.root="))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as info:
        _dm(tmp_path / "empty")
    cases.append((info, r"has no class folders; expected '.*empty/<class name>/<images>'"))
    (tmp_path / "one" / "cats").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "one" / "cats" / "a.png")
    with pytest.raises(DatasetError) as info:
        _dm(tmp_path / "one")
    cases.append((info, r"has a single class \(cats\); a classifier needs at least 2"))
    (stripes_folder / "diagonal").mkdir()
    with pytest.raises(DatasetError) as info:
        _dm(stripes_folder)
    cases.append((info, r"class folder '.*diagonal' holds no images \(it is empty\).*Add images or remove"))
    for info, pattern in cases:
        assert info.match(pattern)


def test_a_class_found_only_in_val_or_test_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    layout = {"train": ("cats", "dogs"), "val": ("cats", "dogs", "owls"), "test": ("cats", "dogs")}
    for split, classes in layout.items():
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / split / name / f"{i}.png")
    with pytest.raises(DatasetError, match=r"in the val split but not in train: 'owls' \(3 images\)"):
        _dm(tmp_path).setup("fit")


def _with_a_one_image_class(stripes_folder: Path) -> Path:
    (stripes_folder / "rare").mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(stripes_folder / "rare" / "only.png")
    return stripes_folder


def test_a_class_too_small_to_split_is_named_by_its_name(stripes_folder):
    with pytest.raises(DatasetError) as info:
        _dm(_with_a_one_image_class(stripes_folder)).setup("fit")
    assert info.match(
        r"cannot carve a stratified test split .* Classes with fewer than 2 images: \{'rare': 1\}"
    )
    assert info.match(r"Add images, merge rare classes, or lower data.test_fraction")


@pytest.mark.slow
def test_a_data_error_ends_a_command_with_one_error_block_and_no_traceback(
    stripes_folder, tmp_path, capsys, monkeypatch
):
    from transferkit.cli import main

    args = _fit_args(_with_a_one_image_class(stripes_folder), tmp_path / "run")
    monkeypatch.delenv("TRANSFERKIT_TRACEBACK", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot carve a stratified test split"), err
    assert "'rare': 1" in err and "Traceback" not in err
    assert err.rstrip().endswith("(TRANSFERKIT_TRACEBACK=1 shows where it was raised)")
    # for debugging, the traceback on request
    monkeypatch.setenv("TRANSFERKIT_TRACEBACK", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback (most recent call last)" in err and "DatasetError" in err and "error: cannot carve" in err
    )


def _imbalanced(root: Path, large: int = 60, small: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for name, count in (("common", large), ("rare", small)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_severe_imbalance_warns_with_counts_and_the_balanced_sampler_evens_it_out(tmp_path):
    root = _imbalanced(tmp_path / "data")
    with pytest.warns(
        TransferKitWarning,
        match=r"severely imbalanced \(common: \d+, rare: \d+;.*data.loader.sampler: balanced",
    ) as seen:
        _dm(root).setup("fit")
    # the warning names the transferkit code that raised it, not the library that called set-up
    assert "transferkit" in Path(seen[0].filename).parts
    for chosen in ("shuffle", "balanced"):  # a sampler the recipe names was chosen knowing the counts
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no imbalance warning
            _dm(root, loader={"sampler": chosen}).setup("fit")
    dm = _dm(root, loader={"sampler": "balanced"})
    dm.setup("fit")
    loader = dm.train_dataloader()
    drawn = {}
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        drawn[epoch] = np.concatenate([labels.numpy() for _, labels in loader])
    train_share = dm.summary()["train"]["rare"] / sum(dm.summary()["train"].values())
    assert train_share < 0.1 and 0.35 < drawn[0].mean() < 0.65  # rare: about half the draws
    assert not np.array_equal(drawn[0], drawn[1])  # a new draw each epoch
    loader.sampler.set_epoch(0)
    assert np.array_equal(drawn[0], np.concatenate([labels.numpy() for _, labels in loader]))  # seeded


def test_identical_files_in_two_splits_are_named(stripes_folder):
    source = stripes_folder / "vertical" / "vertical_000.png"
    for i in range(12):
        (stripes_folder / "vertical" / f"copy_{i}.png").write_bytes(source.read_bytes())
    with pytest.warns(
        UserWarning,
        match=r"\d+ images appear in more than one split with identical bytes, e\.g\. .*\.png \(train\) = .*\.png \((val|test)\)",
    ):
        _dm(stripes_folder).setup("fit")


# --- configs that cannot work: refused before any training -------------------------------------------


def _model_error(**kwargs) -> str:
    with pytest.raises(ValueError) as info:
        TransferClassifier(**{"num_classes": 2, "backbone": TINY_BACKBONE, "pretrained": False, **kwargs})
    return str(info.value)


def test_unknown_names_are_refused_with_the_valid_choices():
    assert "Did you mean 'resnet50'" in _model_error(backbone="resnet5O")
    assert _model_error(head={"activation": "gelu_new"}) == (
        "unknown activation 'gelu_new'; choose one of elu, leaky_relu, relu, selu, tanh, sigmoid."
    )
    # a group's field is named where it sits in a recipe
    optimizer = _model_error(optimizer={"name": "adamax"})
    assert optimizer.startswith("model.optimizer.name must be one of ") and "adamw" in optimizer
    assert optimizer.endswith("got 'adamax'.")
    schedule = _model_error(lr_schedule={"name": "linear"})
    assert schedule.startswith("model.lr_schedule.name must be one of ") and "cosine" in schedule
    assert _model_error(optimizer={"lr": 0.0}).startswith("model.optimizer.lr must be a number > 0 or 'auto'")
    assert _model_error(optimizer={"lrr": 0.1}) == (
        "model.optimizer has no setting 'lrr'; its settings are: name, lr, backbone_lr, layer_decay, "
        "weight_decay, momentum, betas, eps, rho."
    )
    assert _model_error(head={"hidden_dims": [-1]}).startswith("hidden_dims must be positive layer widths")


def test_a_freeze_schedule_beyond_the_backbone_groups_is_refused():
    message = _model_error(freeze_schedule={"milestones": {0: 0, 1: 12}})
    assert message.startswith(
        f"freeze_schedule.milestones asks for 12 trainable backbone groups (at epoch 1), but '{TINY_BACKBONE}' has"
    )
    assert "or -1 for all" in message


@pytest.mark.parametrize(
    ("backbone", "size", "expected"),
    [
        (
            TINY_BACKBONE,
            16,
            "data.pipeline.image_size=16 is too small for 'test_efficientnet': it downsamples 32x",
        ),
        (
            "test_vit",
            40,
            "'test_vit' cannot take 40x40 inputs (data.pipeline.image_size=40): AssertionError: Input height (40) should be divisible by patch size",
        ),
    ],
)
def test_an_input_size_the_backbone_cannot_take_is_refused_before_training(
    stripes_folder, tmp_path, backbone, size, expected
):
    model = TransferClassifier(num_classes=2, backbone=backbone, pretrained=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    with pytest.raises(ValueError) as info:
        trainer.fit(model, datamodule=_dm(stripes_folder, pipeline={"image_size": size}))
    assert expected in str(info.value) and trainer.global_step == 0


@pytest.mark.slow
def test_fit_from_a_checkpoint_with_another_class_count_is_refused(stripes_folder, tmp_path, capsys):
    from transferkit.cli import main

    model = TransferClassifier(
        num_classes=3, backbone=TINY_BACKBONE, pretrained=False, class_names=["a", "b", "c"]
    )
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    dm = _dm(stripes_folder)
    trainer.fit(model, datamodule=dm)  # a 3-class model on 2-class data trains; only its shape matters here
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    args = [
        "fit",
        f"--model.backbone={TINY_BACKBONE}",
        "--model.pretrained=false",
        "--data.source=folder",
        f"--data.root={stripes_folder}",
        "--data.loader.num_workers=0",
        "--data.pipeline.image_size=32",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--ckpt_path={ckpt}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the checkpoint does not fit this model") and "Traceback" not in err
    assert re.search(r"num_classes: checkpoint 3 \(a, b, c\), model 2", err), err


# --- recipes and checkpoints that would run code ------------------------------------------------------


def _fit_args(root: Path, run: Path) -> list[str]:
    return [
        "fit",
        f"--model.backbone={TINY_BACKBONE}",
        "--model.pretrained=false",
        "--data.source=folder",
        f"--data.root={root}",
        "--data.loader.num_workers=0",
        "--data.pipeline.image_size=32",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={run}",
    ]


def test_a_recipe_with_python_tags_is_refused_and_never_runs(tmp_path, capsys):
    from transferkit.cli import main

    marker = tmp_path / "ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(
        f'model:\n  lr: 0.001\n  backbone: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    assert main(["fit", "--config", str(recipe)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: refused recipe '{recipe}': line 3 uses the YAML tag '!!python/object/apply:os.system'"
    )
    # a tag spelled so that the check above misses it still meets the parser's safe loader
    recipe.write_text(f'model:\n  backbone: !python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe)])
    assert info.value.code != 0 and "could not determine a constructor" in capsys.readouterr().err
    assert not marker.exists()


def test_fit_resuming_from_a_checkpoint_with_pickled_code_is_refused(stripes_folder, tmp_path, capsys):
    import lightning as L
    import torch

    from transferkit.cli import main

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "payload": L.LightningModule}, evil)
    assert main([*_fit_args(stripes_folder, tmp_path / "run"), f"--ckpt_path={evil}"]) == 2
    err = capsys.readouterr().err
    assert re.match(r"error: refused to resume from '.*evil.ckpt': it holds pickled code", err), err
    assert "Traceback" not in err
