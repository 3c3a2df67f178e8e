"""Training-step time with the backbone frozen vs unfrozen, on tf_efficientnet_lite0 (bundled weights).

Frozen groups run without autograd, so a head-only step is a forward pass plus a tiny backward. Prints
one JSON object: seconds per step for each setting and their ratios to the fully unfrozen step.

    python benchmarks/freeze_step.py --batch-size 32 --image-size 224 --steps 5
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from transferkit import FreezeSchedule, TransferClassifier
from transferkit.finetuning import apply_freeze
from transferkit.runtime import tune_allocator


def step_seconds(
    model: TransferClassifier, trainable: int, batch: torch.Tensor, labels: torch.Tensor, steps: int
) -> float:
    apply_freeze(model.backbone, model.groups, trainable, model.freeze_schedule.bn_policy)
    model.trainable_groups = trainable
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    tune_allocator()
    torch.manual_seed(0)
    model = TransferClassifier(
        num_classes=2, pretrained="bundled", freeze_schedule=FreezeSchedule(frozen_epochs=1)
    )
    batch = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 2, (args.batch_size,))
    num_groups = len(model.groups)
    settings = {"head_only": 0, "top_3_groups": 3, "fully_unfrozen": num_groups}
    seconds = {
        name: step_seconds(model, trainable, batch, labels, args.steps)
        for name, trainable in settings.items()
    }
    result = {
        "benchmark": "freeze_step",
        "backbone": "tf_efficientnet_lite0",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "seconds_per_step": {k: round(v, 4) for k, v in seconds.items()},
        "images_per_second": {k: round(args.batch_size / v, 1) for k, v in seconds.items()},
        "speedup_vs_fully_unfrozen": {k: round(seconds["fully_unfrozen"] / v, 2) for k, v in seconds.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
