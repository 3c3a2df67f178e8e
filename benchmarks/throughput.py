"""Training throughput: transferkit's step (Lightning Trainer) vs a hand-written PyTorch loop, in one process.

Both train the same TransferClassifier (bundled tf_efficientnet_lite0 + head, fully unfrozen) with the
same Adam parameter groups and exponential decay, on the same in-memory batches. They alternate
(loop, trainer, loop, trainer, ...; ``--repeats`` rounds); the ratio reported is the median of the
per-round ratios (trainer / loop of the same round), with their range, and the best-over-best beside it. Also measured:
the data pipeline alone (a recipe's augmentation and workers, decoding ELPV images), so one sees which
side limits. With ``--ablate``, each round also times the transferkit step without its non-finite-loss
guard, without ``self.log``, and under a plain ``lightning.Trainer``, which says where a gap comes from.
Every measurement is printed to stderr as it finishes; the result is one JSON object on stdout.

    python benchmarks/throughput.py                                  # CPU, fp32, channels-last
    python benchmarks/throughput.py --no-channels-last               # the NCHW layout
    python benchmarks/throughput.py --precision bf16-mixed
    python benchmarks/throughput.py --device cuda --batch-size 128 --steps 30
    python benchmarks/throughput.py --device cuda --batch-size 128 --steps 60 --ablate --no-pipeline
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402
from rounds import per_round_ratio  # noqa: E402

from transferkit import ImageDataModule, Trainer, TransferClassifier  # noqa: E402
from transferkit.runtime import tune_allocator  # noqa: E402
from transferkit.training.nonfinite import NonFiniteLossGuard  # noqa: E402


class _Timer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.seconds = time.perf_counter() - self.start

    @staticmethod
    def _sync(module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()


def _model(args: argparse.Namespace) -> TransferClassifier:
    torch.manual_seed(0)
    return TransferClassifier(
        num_classes=2,
        pretrained="bundled",
        runtime={"channels_last": args.channels_last, "compile": args.compile},
    )


def _loader(args: argparse.Namespace) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    count = args.batch_size * (args.steps + args.warmup)
    images = torch.randn(count, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=False)


class _NoGuard(NonFiniteLossGuard):
    """Stands in for the guard the transferkit Trainer adds, and checks nothing."""

    def on_train_batch_start(self, *args, **kwargs) -> None: ...
    def on_before_backward(self, *args, **kwargs) -> None: ...
    def on_train_epoch_end(self, *args, **kwargs) -> None: ...
    def on_validation_start(self, *args, **kwargs) -> None: ...
    def on_save_checkpoint(self, *args, **kwargs) -> None: ...
    def on_train_end(self, *args, **kwargs) -> None: ...


class _Silent(TransferClassifier):
    """The same module with ``self.log`` switched off."""

    def log(self, *args, **kwargs) -> None: ...


def lightning_images_per_second(args: argparse.Namespace, variant: str = "transferkit") -> float:
    """``variant``: ``transferkit``, ``no_guard``, ``no_log`` or ``plain_lightning`` (lightning.Trainer)."""
    model = _model(args)
    if variant == "no_log":
        model.__class__ = _Silent
    timer = _Timer(args.warmup)
    callbacks = [timer, _NoGuard()] if variant == "no_guard" else [timer]
    trainer = (L.Trainer if variant == "plain_lightning" else Trainer)(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, train_dataloaders=_loader(args))
    return args.batch_size * args.steps / timer.seconds


def loop_images_per_second(args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    model = _model(args).to(device)
    if args.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    if args.compile:
        model.backbone.model.compile()
    model.train()
    config = model.configure_optimizers()  # the same parameter groups and schedule
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision.startswith("bf16")
        else contextlib.nullcontext()
    )
    start = 0.0
    for step, (images, labels) in enumerate(_loader(args)):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch_size * args.steps / (time.perf_counter() - start)


def pipeline_images_per_second(args: argparse.Namespace) -> tuple[float, dict]:
    recipe = yaml.safe_load(Path(args.recipe).read_text()) if args.recipe else {}
    data_args = recipe.get("data", {})
    augment = data_args.get("augment", "light")
    workers = data_args.get("num_workers", 2)
    dm = ImageDataModule(
        source="elpv",
        pipeline={"augment": augment, "image_size": args.image_size, "mean": (0.5,) * 3, "std": (0.5,) * 3},
        loader={"batch_size": args.batch_size, "num_workers": workers},
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    count, start = 0, 0.0
    for step, (images, _) in enumerate(loader):
        if step == 2:  # worker start-up excluded
            start, count = time.perf_counter(), 0
        count += len(images)
        if step == args.pipeline_batches + 2:
            break
    return count / (time.perf_counter() - start), {"num_workers": workers, "augment": augment}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC layout (the default)",
    )
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--recipe", default="recipes/elpv.yaml", help="whose augmentation and workers the pipeline uses"
    )
    parser.add_argument("--pipeline-batches", type=int, default=20)
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (loop, trainer) timings")
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="also time the step without the guard, without logging, plain Lightning",
    )
    args = parser.parse_args()

    tune_allocator()
    L.seed_everything(0, verbose=False)
    variants = ["transferkit", *(["no_guard", "no_log", "plain_lightning"] if args.ablate else [])]
    runs: dict[str, list[float]] = {"raw_loop": [], **{v: [] for v in variants}}
    for _ in range(args.repeats):
        for name in runs:
            rate = (
                loop_images_per_second(args)
                if name == "raw_loop"
                else lightning_images_per_second(args, name)
            )
            runs[name].append(rate)
            print(f"{name}: {rate:.1f} img/s", file=sys.stderr, flush=True)
    loop, lightning = runs["raw_loop"], runs["transferkit"]

    result = {
        "benchmark": "throughput",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps_per_round": args.steps,
        "rounds": args.repeats,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "raw_loop_images_per_second_median": round(statistics.median(loop), 2),
        "transferkit_images_per_second_median": round(statistics.median(lightning), 2),
        # the median of the per-round ratios (each round's trainer over the same round's loop)
        "ratio_transferkit_to_raw": per_round_ratio(lightning, loop),
        "ratio_of_best_rates": round(max(lightning) / max(loop), 3),
        "all_runs": {name: [round(v, 2) for v in rates] for name, rates in runs.items()},
    }
    if args.ablate:
        result["ratio_to_raw_per_round"] = {
            name: per_round_ratio(rates, loop) for name, rates in runs.items()
        }
    if not args.no_pipeline:
        rate, settings = pipeline_images_per_second(args)
        result["data_pipeline_images_per_second"] = round(rate, 1)
        result["data_pipeline"] = settings
        result["bottleneck"] = "data pipeline" if rate < statistics.median(lightning) else "model"
    result["provenance"] = provenance()
    save(result, args.out)


if __name__ == "__main__":
    main()
