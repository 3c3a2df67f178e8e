"""Packed (streaming) datasets: a folder packed with LitData trains on the same images, split between DDP
ranks, and bad files never reach a pack."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import NORM, TINY_BACKBONE, make_stripes_folder, quiet_trainer, run_cli
from lightning.pytorch.callbacks import Callback
from PIL import Image

import transferkit as tk

pytest.importorskip("litdata")


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


@pytest.fixture
def packed(tmp_path: Path) -> tuple[tk.ImageDataModule, Path]:
    """The stripes folder (PNG files and a few JPEGs) and its pack."""
    root = make_stripes_folder(tmp_path / "stripes", per_class=20)
    for png in sorted((root / "vertical").glob("*.png"))[:4]:
        Image.open(png).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    folder = tk.ImageDataModule(
        source="folder", root=str(root), pipeline={**NORM}, loader={"batch_size": 8, "num_workers": 0}
    )
    result = tk.pack_stream(folder, tmp_path / "pack")
    files = [Path(p) for p in folder.data.items]
    # the files' bytes as they are, not decoded pixels
    assert result["bytes"] >= sum(f.stat().st_size for f in files) and result["skipped"] == []
    assert result["bytes"] < 2 * sum(f.stat().st_size for f in files)
    return folder, tmp_path / "pack"


class RecordImages(Callback):
    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.seen.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen[-1] += [digest(image) for image in batch[0]]


def test_a_pack_trains_on_the_same_splits_and_augmented_images_as_its_folder(packed, tmp_path):
    folder, pack = packed
    stream = tk.ImageDataModule(
        source="stream", root=str(pack), pipeline={**NORM}, loader={"batch_size": 8, "num_workers": 2}
    )
    assert stream.class_names == folder.class_names and stream.summary() == folder.summary()
    stream.setup("fit")
    # evaluation: every image of the split once, decoded as from its file
    val = torch.cat([x for x, _ in stream.val_dataloader()])
    expected = [folder.datasets["val"][i][0] for i in range(len(folder.datasets["val"]))]
    assert sorted(map(digest, val)) == sorted(map(digest, expected))

    record = RecordImages()
    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, head={"hidden_dims": []}
    )
    trainer = quiet_trainer(tmp_path / "run", max_epochs=2, callbacks=[record])
    trainer.fit(model, stream)
    train = folder.datasets["train"]
    batches = len(train) // 8  # the last, partial batch is dropped
    drawn = [{digest(train[(epoch, i)][0]) for i in range(len(train))} for epoch in (0, 1)]
    for epoch, seen in enumerate(record.seen):
        # each epoch's augmentation draws, per image, are those of training from the folder that epoch
        assert len(seen) == len(set(seen)) == batches * 8 and set(seen) <= drawn[epoch]
    assert not set(record.seen[1]) <= drawn[0]  # epoch 1 is not epoch 0's draws again
    tested = trainer.test(model, stream, verbose=False)[0]
    assert 0.0 <= tested["test_acc"] <= 1.0


def _rank_draws(rank: int, pack: str, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dm = tk.ImageDataModule(
        source="stream",
        root=pack,
        pipeline={"augment": "none", **NORM},
        loader={"batch_size": 4, "num_workers": 1},
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[digest(image) for x, _ in loader for image in x] for _ in range(2)]
    torch.save(epochs, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_each_stream_their_own_part_of_every_epoch(packed, tmp_path):
    import socket

    folder, pack = packed
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_draws, args=(str(pack), port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    plain = tk.ImageDataModule(
        source="folder", root=str(folder.hparams.root), pipeline={"augment": "none", **NORM}
    )
    plain.setup("fit")
    everything = {digest(plain.datasets["train"][i][0]) for i in range(len(plain.datasets["train"]))}
    for epoch in range(2):
        first, second = (set(r[epoch]) for r in ranks)
        assert len(first) == len(second) >= 8 and not first & second  # even shares, no image twice
        assert first | second <= everything and len(first | second) >= len(everything) - 8
    assert ranks[0][0] != ranks[0][1]  # reshuffled each epoch


def test_packing_refuses_bad_files_and_full_folders_and_the_cli_says_what_it_wrote(tmp_path):
    root = make_stripes_folder(tmp_path / "stripes", per_class=12)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "horizontal" / "photo.jpg", quality=90)
    cut = root / "horizontal" / "cut.jpg"
    whole = (root / "horizontal" / "photo.jpg").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])  # the header passes set-up; the pixels are cut
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{backbone: {TINY_BACKBONE}, pretrained: false}}\n"
        f"data: {{source: folder, root: {root}, pipeline: {{image_size: 32}}, loader: {{num_workers: 0}}}}\n"
    )
    result = run_cli("pack-data", "--config", str(recipe), "--out", str(tmp_path / "pack"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cut.jpg" in result.stderr and "nothing was packed" in result.stderr
    assert not (tmp_path / "pack").exists()  # what it had written is removed

    result = run_cli(
        "pack-data",
        "--config",
        str(recipe),
        "--out",
        str(tmp_path / "pack"),
        "--data.skip_bad_images",
        "true",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cut.jpg" in result.stdout and "packed train" in result.stdout
    meta = tk.ImageDataModule(source="stream", root=str(tmp_path / "pack"), pipeline={**NORM}).data
    assert len(meta) == 25 and meta.class_names == ["horizontal", "vertical"]  # 26 files, 1 left out

    again = run_cli("pack-data", "--config", str(recipe), "--out", str(tmp_path / "pack"))
    assert again.returncode == 2 and "already holds files" in again.stderr


def test_a_pack_refuses_what_needs_every_file_at_hand(tmp_path, packed):
    _, pack = packed
    for named, setting in (
        ("data.loader.sampler: balanced", {"loader": {"sampler": "balanced"}}),
        ("data.cache.decoded_images", {"cache": {"decoded_images": True}}),
        ("data.split.train_fraction", {"split": {"train_fraction": 0.5}}),
        ("data.split.cv_folds", {"split": {"cv_folds": 3, "cv_fold": 0}}),
    ):
        with pytest.raises(tk.ConfigError, match=f"source 'stream' cannot be used with {named}"):
            tk.ImageDataModule(source="stream", root=str(pack), **setting, pipeline={**NORM})
    stream = tk.ImageDataModule(source="stream", root=str(pack), pipeline={**NORM})
    model = tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    cached = tk.Trainer(max_epochs=1, logger=False, callbacks=[tk.FreezeAndCache(feature_cache="clean")])
    with pytest.raises(tk.ConfigError, match="source 'stream' cannot be used with caches.feature_cache"):
        cached.fit(model, datamodule=stream)
    with pytest.raises(tk.ConfigError, match="probe on the folder or CSV it was packed from"):
        tk.probe(model, stream)
    with pytest.raises(tk.DatasetError, match="is not a packed dataset"):
        tk.ImageDataModule(source="stream", root=str(tmp_path), pipeline={**NORM})
    no_val = tk.ImageDataModule(source="digits", split={"val_fraction": 0}, pipeline={**NORM})
    tk.pack_stream(no_val, tmp_path / "no-val")
    dm = tk.ImageDataModule(source="stream", root=str(tmp_path / "no-val"), pipeline={**NORM})
    with pytest.raises(tk.DatasetError, match="the pack has no validation split"):
        dm.setup("fit")
    dm = tk.ImageDataModule(
        source="stream", root=str(tmp_path / "no-val"), split={"val_fraction": 0}, pipeline={**NORM}
    )
    dm.setup("fit")
    assert np.array_equal(dm.datasets["test"].labels, no_val.data.labels[no_val.split_indices["test"]])


def test_a_split_whose_every_image_is_bad_is_refused_not_packed_empty(tmp_path):
    root = make_stripes_folder(tmp_path / "stripes", per_class=10)
    folder = tk.ImageDataModule(
        source="folder",
        root=str(root),
        pipeline={**NORM},
        loader={"batch_size": 4, "num_workers": 0},
        skip_bad_images=True,
    )
    folder.setup()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "photo.jpg", quality=90)
    whole = (tmp_path / "photo.jpg").read_bytes()
    test_files = [Path(folder.data.items[i]) for i in folder.split_indices["test"]]
    for path in test_files:
        path.write_bytes(whole[: len(whole) // 2])  # the header passes set-up; the pixels are cut

    def pack(datamodule, out):
        """pack_stream in a thread, so a pack that waits forever fails the test instead of hanging it."""
        outcome: dict = {}

        def run():
            try:
                outcome["result"] = tk.pack_stream(datamodule, out)
            except BaseException as err:  # noqa: BLE001 - handed to the test below
                outcome["error"] = err

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "pack_stream did not return"
        return outcome

    outcome = pack(folder, tmp_path / "pack")
    assert isinstance(outcome.get("error"), tk.DatasetError)
    assert f"no image in the test split ({len(test_files)} files) can be decoded" in str(outcome["error"])
    assert not (tmp_path / "pack").exists()  # the folder it made is removed
    # into a folder the user made: what the call wrote goes, the folder stays
    (tmp_path / "mine").mkdir()
    outcome = pack(folder, tmp_path / "mine")
    assert isinstance(outcome.get("error"), tk.DatasetError)
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    # without skip_bad_images, the same files are named one by one
    strict = tk.ImageDataModule(
        source="folder", root=str(root), pipeline={**NORM}, loader={"batch_size": 4, "num_workers": 0}
    )
    outcome = pack(strict, tmp_path / "pack")
    assert f"{len(test_files)} image files cannot be decoded" in str(outcome.get("error"))
    assert not (tmp_path / "pack").exists()
