"""Channels-last vs the default (NCHW) memory layout: training-step images/s of several timm backbones,
side by side in one process.

Each round times a few full training steps (forward, cross-entropy, backward, Adam step) of every
backbone in both layouts, alternating, on the same random batch. The ratio reported is the median of the
per-round ratios, with their range; the best rate per layout is shown beside it. The allocator is set as
the transferkit Trainer sets it (``tune_allocator``). Weights are random: speed does not depend on them.

    python benchmarks/memory_format.py                       # CPU, the default backbones
    python benchmarks/memory_format.py --device cuda --batch-size 64
    python benchmarks/memory_format.py --backbones resnet18 vit_tiny_patch16_224

Prints one JSON object: per backbone, images/s in each layout and their ratio (channels-last / NCHW).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402
from rounds import per_round_ratio  # noqa: E402

DEFAULT_BACKBONES = [
    "tf_efficientnet_lite0",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "resnet18",
    "convnext_atto",
    "vit_tiny_patch16_224",
]


def _rate(model, images, labels, optimizer, steps: int, channels_last: bool, sync) -> float:
    import torch

    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return steps * images.shape[0] / (time.perf_counter() - start)


def measure(
    name: str, device: str, batch_size: int, image_size: int, steps: int, warmup: int, rounds: int
) -> dict:
    import timm
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    models = {}
    for layout in ("nchw", "channels_last"):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10).to(device).train()
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        _rate(model, images, labels, optimizer, warmup, layout == "channels_last", sync)
        models[layout] = (model, optimizer)
    rates: dict[str, list[float]] = {"nchw": [], "channels_last": []}
    for _ in range(rounds):
        for layout, (model, optimizer) in models.items():
            rates[layout].append(
                round(_rate(model, images, labels, optimizer, steps, layout == "channels_last", sync), 2)
            )
    best = {layout: max(values) for layout, values in rates.items()}
    return {
        "nchw_images_per_second_median": round(statistics.median(rates["nchw"]), 2),
        "channels_last_images_per_second_median": round(statistics.median(rates["channels_last"]), 2),
        "ratio_channels_last_to_nchw": per_round_ratio(rates["channels_last"], rates["nchw"]),
        "ratio_of_best_rates": round(best["channels_last"] / best["nchw"], 3),
        "all_rounds": rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and layout")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
    args = parser.parse_args()

    import torch

    from transferkit.runtime import tune_allocator

    tune_allocator()  # as the transferkit Trainer does
    report = {
        "benchmark": "memory_format",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "backbones": {},
    }
    for name in args.backbones:
        result = measure(
            name, args.device, args.batch_size, args.image_size, args.steps, args.warmup, args.rounds
        )
        report["backbones"][name] = result
        print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    ratios = [r["ratio_channels_last_to_nchw"]["median"] for r in report["backbones"].values()]
    report["slowest_ratio"] = min(ratios)
    report["provenance"] = provenance()
    save(report, args.out)


if __name__ == "__main__":
    main()
