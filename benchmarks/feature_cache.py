"""A phase of training with and without the frozen-feature cache (or the trunk cache), in one process.

Fine-tunes the head of tf_efficientnet_lite0 (bundled weights, backbone frozen) on the ELPV training
split for ``--epochs`` epochs (the quick-start recipe's head-only phase is 3), three ways, one after the
other in this process:

- without the cache: every epoch runs the backbone over every image;
- with a cold cache: the features are extracted once (one pass over train and val, before the first
  epoch), then every epoch reads them;
- with a warm cache: the features are read from the files the cold run wrote (a second run of the recipe).

It reports the whole phase (``fit`` wall seconds, extraction included) and the median epoch of each. With
``--trunk`` the top 5 of the 8 groups train too (the ELPV recipe's phase, ImageNet BatchNorm statistics)
and ``caches.trunk_cache`` stores the frozen bottom's feature maps instead. Prints one JSON object.

    python benchmarks/feature_cache.py [--max-samples 800] [--trunk] [--out results.json]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402

from transferkit import FreezeAndCache, FreezeSchedule, ImageDataModule, Trainer, TransferClassifier  # noqa: E402


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def run(
    feature_cache: str, epochs: int, cache_dir: str, args: argparse.Namespace
) -> tuple[list[float], float]:
    L.seed_everything(0)
    data = ImageDataModule(
        source="elpv",
        split={"max_samples": args.max_samples},
        pipeline={"augment": "none"},
        loader={"batch_size": 32, "num_workers": args.workers},
        cache={"dir": cache_dir},
    )
    caches = FreezeAndCache(
        **({"trunk_cache": feature_cache} if args.trunk else {"feature_cache": feature_cache})
    )
    schedule = (
        FreezeSchedule(milestones={0: 5}, bn_policy="eval")
        if args.trunk
        else FreezeSchedule(frozen_epochs=epochs)
    )
    model = TransferClassifier(num_classes=2, freeze_schedule=schedule)
    timer = EpochTimer()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, caches],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    timer.fit_seconds = time.perf_counter() - start
    (result,) = trainer.validate(model, datamodule=data, verbose=False) if args.report_accuracy else [{}]
    return timer, result.get("val_acc", float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-samples", type=int, default=None, help="ELPV images to use (default: all 2,624)"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the phase (default: %(default)s)")
    parser.add_argument("--report-accuracy", action="store_true")
    parser.add_argument("--trunk", action="store_true", help="top 5 groups train; cache the frozen bottom")
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
    args = parser.parse_args()

    cache_dir = tempfile.mkdtemp(prefix="transferkit-bench-")
    try:
        runs = {
            "without_cache": run("off", args.epochs, cache_dir, args),
            "cold_cache": run("clean", args.epochs, cache_dir, args),  # extracts, then writes the files
            "warm_cache": run("clean", args.epochs, cache_dir, args),  # reads the files the cold run wrote
        }
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    phase = "top5_groups" if args.trunk else "head_only"
    timings = {
        name: {
            "phase_seconds": round(timer.fit_seconds, 1),  # the whole fit: extraction, every epoch
            "median_epoch_seconds": round(statistics.median(timer.seconds), 3),
            "epoch_seconds": [round(t, 3) for t in timer.seconds],
        }
        for name, (timer, _) in runs.items()
    }
    plain = timings["without_cache"]
    report = {
        "benchmark": "trunk_cache" if args.trunk else "feature_cache",
        "backbone": "tf_efficientnet_lite0",
        "phase": f"{phase}, {args.epochs} epochs, validation off",
        "max_samples": args.max_samples,
        "timings": timings,
        "speedup_per_phase": {
            # extraction included in the cold run; what a first run of a recipe gains
            "cold_cache": round(plain["phase_seconds"] / timings["cold_cache"]["phase_seconds"], 2),
            # the features already on disk; what a second run of the same recipe gains
            "warm_cache": round(plain["phase_seconds"] / timings["warm_cache"]["phase_seconds"], 2),
        },
        # an epoch once the features exist, extraction not included
        "speedup_per_epoch_after_extraction": round(
            plain["median_epoch_seconds"] / timings["warm_cache"]["median_epoch_seconds"], 1
        ),
        "peak_memory_mb_this_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "provenance": provenance(),
    }
    if args.report_accuracy:
        report["val_acc"] = {name: acc for name, (_, acc) in runs.items()}
    save(report, args.out)


if __name__ == "__main__":
    main()
