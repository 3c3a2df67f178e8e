"""Loading camera photos: set-up and loader throughput, today's way and transferkit's, in one process.

Generates photo-like JPEGs (``--photos`` of 4032x3024, two classes; smooth shading, hard-edged shapes,
sensor noise; a scene per 8 files, saved at qualities 85-92) and a folder of ``--small`` small files, then measures, each side by side in
this process:

- **set-up** (``ImageDataModule.setup("fit")``) in files/s, against the same set-up with the checks it
  ran before this version: every image decoded in full once (``drop_unreadable(decode=True)``) and every
  file hashed for the duplicate check;
- **loader** images/s over one epoch at 224 px (``augment: light``, batch 32) with 1 and 2 workers: every
  JPEG decoded in full (``jpeg_draft: false``, what the loader did before), decoded at reduced scale
  (``jpeg_draft``, the first epoch now), and read from the decoded-image cache (``decoded_cache``,
  every later epoch and run), with the cache's build time and size, and streamed from a LitData pack
  of the same files (``source: stream``, read from local disk here), with the time to pack them;
- plain Pillow on the same files, one core: full decode + resize, and ``draft`` decode + resize;
- an unfrozen tf_efficientnet_lite0 training step (batch 32, channels-last, as the Trainer runs it), in
  images/s: the rate the loader has to keep up with on this machine.

Loader rates are the median of ``--rounds`` epochs each, the rounds of the variants interleaved. Prints
one JSON object.

    python benchmarks/loading.py [--photos 200] [--small 20000] [--rounds 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import functools
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402
from rounds import per_round_ratio  # noqa: E402

from transferkit import ImageDataModule, TransferClassifier  # noqa: E402
from transferkit.data import datamodule  # noqa: E402
from transferkit.data.checks import _file_digest, drop_unreadable  # noqa: E402
from transferkit.data.stream import pack_stream  # noqa: E402
from transferkit.runtime import tune_allocator  # noqa: E402

SIDE = 224


def make_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    small = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(12):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(width // 40, width // 6)), color, -1)
        else:
            far = (
                x + int(rng.integers(1 + width // 20, 2 + width // 4)),
                y + int(rng.integers(1 + height // 20, 2 + height // 4)),
            )
            cv2.rectangle(image, (x, y), far, color, -1)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_folder(root: Path, count: int, width: int, height: int, seed: int) -> Path:
    """``count`` JPEGs in two class folders: a new scene every 8 files, each saved at its own quality
    (85-92), so every file has other bytes and size but a photo's decoding cost."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        if i % 8 == 0:
            scene = make_photo(rng, width, height)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        scene.save(folder / f"{i:05d}.jpg", quality=85 + i % 8)
    return root


def _hash_every_file(data, splits) -> None:
    """The duplicate check before this version: every file of every split read in full and hashed."""
    for split in ("train", "val", "test"):
        for i in splits.get(split, []):
            _file_digest(str(data.items[i]))


def _setup_seconds(root: Path, before: bool) -> float:
    dm = ImageDataModule(
        source="folder", root=str(root), pipeline={"image_size": SIDE, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    )
    start = time.perf_counter()
    if before:  # set-up as it was: every image decoded in full, every file hashed
        decode_all = functools.partial(drop_unreadable, decode=True)
        with (
            mock.patch.object(datamodule, "drop_unreadable", decode_all),
            mock.patch.object(datamodule, "warn_duplicates_across_splits", _hash_every_file),
        ):
            dm.setup("fit")
    else:
        dm.setup("fit")
    return time.perf_counter() - start


def setup_files_per_second(root: Path, rounds: int) -> dict:
    """``setup("fit")`` of a folder data module as it was and as it is, alternating, ``rounds`` each."""
    files = len(list(root.rglob("*.jpg")))
    seconds: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(rounds):
        for name in seconds:
            seconds[name].append(_setup_seconds(root, before=name == "before"))
    return {
        "files": files,
        "before_files_per_second": round(files / statistics.median(seconds["before"]), 1),
        "now_files_per_second": round(files / statistics.median(seconds["now"]), 1),
        "speedup": per_round_ratio(seconds["before"], seconds["now"], digits=1),
    }


def loader_images_per_second(dm: ImageDataModule) -> float:
    loader = dm.train_dataloader()
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - start)


def plain_pillow(files: list[str]) -> dict:
    rates = {}
    for name, draft in (("full_decode_resize", False), ("draft_decode_resize", True)):
        start = time.perf_counter()
        for path in files:
            with Image.open(path) as image:
                if draft:
                    image.draft("RGB", (SIDE, SIDE))
                image.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR)
        rates[name] = round(len(files) / (time.perf_counter() - start), 1)
    return rates


def lite0_step_images_per_second(steps: int = 3) -> float:
    model = TransferClassifier(num_classes=2, pretrained="bundled").to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = torch.randn(32, 3, SIDE, SIDE).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (32,))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return 32 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200, help="4032x3024 JPEGs to generate")
    parser.add_argument("--small", type=int, default=20000, help="small files (64x64 JPEG) for set-up")
    parser.add_argument("--rounds", type=int, default=3, help="epochs timed per loader variant")
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
    args = parser.parse_args()
    tune_allocator()
    work = Path(tempfile.mkdtemp(prefix="transferkit-loading-"))
    try:
        photos = make_folder(work / "photos", args.photos, 4032, 3024, seed=0)
        small = make_folder(work / "small", args.small, 64, 64, seed=1)
        report: dict = {
            "benchmark": "loading",
            "photos": {
                "count": args.photos,
                "size": "4032x3024",
                "jpeg_quality": "85-92",
                "scenes": -(-args.photos // 8),
            },
            "small_files": {"count": args.small, "size": "64x64"},
            "image_size": SIDE,
            "batch_size": 32,
            "rounds": args.rounds,
        }
        report["setup"] = {
            "photos": setup_files_per_second(photos, args.rounds),
            "small_files": setup_files_per_second(small, args.rounds),
        }
        files = sorted(str(p) for p in photos.rglob("*.jpg"))
        report["plain_pillow_one_core_images_per_second"] = plain_pillow(files)

        pipeline = {"image_size": SIDE, "mean": (0.5,) * 3, "std": (0.5,) * 3, "augment": "light"}
        common = {"source": "folder", "root": str(photos), "cache": {"dir": str(work / "cache")}}

        def workers_of(n: int) -> dict:
            return {"loader": {"num_workers": n, "batch_size": 32}}

        loader: dict = {}
        source = ImageDataModule(**common, pipeline=pipeline, **workers_of(1))
        start = time.perf_counter()
        packed = pack_stream(source, work / "pack")  # decodes every file once on the way
        loader["pack_seconds"] = round(time.perf_counter() - start, 1)
        loader["pack_megabytes"] = round(packed["bytes"] / 2**20, 1)
        stream = {**common, "source": "stream", "root": str(work / "pack")}
        for workers in (1, 2):
            variants = {
                "full_decode": ImageDataModule(
                    **common, pipeline={**pipeline, "jpeg_draft": False}, **workers_of(workers)
                ),
                "reduced_decode": ImageDataModule(**common, pipeline=pipeline, **workers_of(workers)),
            }
            for dm in variants.values():
                dm.setup("fit")
            cached = ImageDataModule(
                source="folder",
                root=str(photos),
                pipeline=pipeline,
                cache={**common["cache"], "decoded_images": True},
                **workers_of(workers),
            )
            start = time.perf_counter()
            cached.setup("fit")  # builds the cache the first time (1 worker), reads it after
            if workers == 1:
                loader["decoded_cache_build_seconds"] = round(time.perf_counter() - start, 1)
                loader["decoded_cache_megabytes"] = round(cached.decoded.nbytes / 2**20, 1)
            variants["decoded_cache"] = cached
            variants["stream"] = ImageDataModule(**stream, pipeline=pipeline, **workers_of(workers))
            variants["stream"].setup("fit")
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, dm in variants.items():
                    rates[name].append(loader_images_per_second(dm))
            loader[f"workers_{workers}"] = {
                "images_per_second_median": {k: round(statistics.median(v), 1) for k, v in rates.items()},
                "speedup_over_full_decode": {
                    k: per_round_ratio(v, rates["full_decode"], digits=2) for k, v in rates.items()
                },
            }
        report["loader"] = loader
        report["lite0_unfrozen_step_images_per_second"] = round(lite0_step_images_per_second(), 1)
        report["peak_memory_mb_this_process"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        )
        report["peak_memory_mb_largest_child"] = round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["provenance"] = provenance()
    save(report, args.out)


if __name__ == "__main__":
    main()
