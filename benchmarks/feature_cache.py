"""Epoch time with and without the frozen-feature cache (or the trunk cache), in one process.

Fine-tunes the head of tf_efficientnet_lite0 (bundled weights, backbone frozen) on the ELPV training
split. Without the cache every head-only epoch runs the backbone over every image; with it the first
epoch extracts the features once and later epochs read them. With ``--trunk`` the top 5 of its 8
groups train too (the ELPV recipe's phase, ImageNet BatchNorm statistics) and ``data.trunk_cache``
stores the frozen bottom's feature maps instead. Prints one JSON object.

    python benchmarks/feature_cache.py [--max-samples 800] [--trunk]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

from transferkit import FreezeSchedule, ImageDataModule, Trainer, TransferClassifier


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
        batch_size=32,
        num_workers=args.workers,
        augment="none",
        max_samples=args.max_samples,
        cache_dir=cache_dir,
        **({"trunk_cache": feature_cache} if args.trunk else {"feature_cache": feature_cache}),
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
        callbacks=[timer],
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
    parser.add_argument("--cached-epochs", type=int, default=3)
    parser.add_argument("--report-accuracy", action="store_true")
    parser.add_argument("--trunk", action="store_true", help="top 5 groups train; cache the frozen bottom")
    args = parser.parse_args()

    cache_dir = tempfile.mkdtemp(prefix="transferkit-bench-")
    try:
        plain, plain_acc = run("off", 1, cache_dir, args)
        cached, cached_acc = run("clean", 1 + args.cached_epochs, cache_dir, args)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    cached_epoch = sorted(cached.seconds[1:])[len(cached.seconds[1:]) // 2]
    phase = "top5" if args.trunk else "head_only"
    print(
        json.dumps(
            {
                "benchmark": "trunk_cache" if args.trunk else "feature_cache",
                "backbone": "tf_efficientnet_lite0",
                "max_samples": args.max_samples,
                f"{phase}_epoch_seconds_without_cache": round(plain.seconds[0], 3),
                # extraction (one pass over train and val) runs when the loaders are built, before
                # the first epoch starts, so it is in the fit's time but not in these epoch times
                "epoch0_seconds_with_cache": round(cached.seconds[0], 3),
                f"{phase}_epoch_seconds_with_cache": round(cached_epoch, 4),
                "fit_seconds_outside_epochs_with_cache": round(cached.fit_seconds - sum(cached.seconds), 1),
                "speedup": round(plain.seconds[0] / cached_epoch, 2 if args.trunk else 1),
                **(
                    {"val_acc_without_cache": plain_acc, "val_acc_with_cache": cached_acc}
                    if args.report_accuracy
                    else {}
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
