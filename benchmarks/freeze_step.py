"""Training-step time with the backbone frozen vs unfrozen, on tf_efficientnet_lite0 (bundled weights).

Frozen groups run without autograd, so a head-only step is a forward pass plus a tiny backward. Each of
``--rounds`` rounds times ``--steps`` steps of every setting in turn (one process, the same batch, the
allocator as the transferkit Trainer sets it). Prints one JSON object: the median seconds per step of
each setting, and its speed-up over the fully unfrozen step as the median of the per-round ratios with
their range.

    python benchmarks/freeze_step.py --batch-size 32 --image-size 224 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402
from rounds import per_round_ratio  # noqa: E402

from transferkit import FreezeSchedule, TransferClassifier  # noqa: E402
from transferkit.finetuning import apply_freeze  # noqa: E402
from transferkit.runtime import tune_allocator  # noqa: E402


def step_seconds(
    model: TransferClassifier, trainable: int, batch: torch.Tensor, labels: torch.Tensor, steps: int
) -> float:
    apply_freeze(model.backbone, model.groups, trainable, model.freeze_schedule.bn_policy)
    model.freezing.trainable_groups = trainable
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
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
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
    rounds: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, trainable in settings.items():
            rounds[name].append(step_seconds(model, trainable, batch, labels, args.steps))
    seconds = {name: statistics.median(values) for name, values in rounds.items()}
    result = {
        "benchmark": "freeze_step",
        "backbone": "tf_efficientnet_lite0",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_step_median": {k: round(v, 4) for k, v in seconds.items()},
        "images_per_second_median": {k: round(args.batch_size / v, 1) for k, v in seconds.items()},
        # the fully unfrozen step's time over this setting's, per round: median, range, each round
        "speedup_vs_fully_unfrozen": {
            name: per_round_ratio(rounds["fully_unfrozen"], values, digits=2)
            for name, values in rounds.items()
        },
        "all_rounds_seconds": {k: [round(v, 4) for v in values] for k, values in rounds.items()},
        "provenance": provenance(),
    }
    save(result, args.out)


if __name__ == "__main__":
    main()
