"""The training step with and without the allocator setting the transferkit Trainer makes (``tune_allocator``).

glibc's ``mallopt`` settings hold for a whole process, and setting them back does not restore glibc's
own adaptive defaults, so the two sides cannot share a process. Instead each of ``--rounds`` rounds runs
two fresh processes one after the other, one with ``TRANSFERKIT_TUNE_MALLOC=0`` (glibc as it comes) and
one with the Trainer's setting, each timing ``--steps`` fully unfrozen training steps of
tf_efficientnet_lite0 (bundled weights) on the same seeded batch after a warm-up step. The speed-up is
the median of the per-round ratios (default time / tuned time) with their range. Prints one JSON object.

    python benchmarks/allocator.py --batch-size 32 --steps 5 --rounds 3 [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402
from rounds import per_round_ratio  # noqa: E402


def worker(batch_size: int, image_size: int, steps: int) -> dict:
    import torch

    from transferkit import FreezeSchedule, TransferClassifier
    from transferkit.runtime import tune_allocator

    tuned = tune_allocator()  # a no-op under TRANSFERKIT_TUNE_MALLOC=0, as in the Trainer
    torch.manual_seed(0)
    model = TransferClassifier(
        num_classes=2, pretrained="bundled", freeze_schedule=FreezeSchedule(frozen_epochs=0)
    )
    model.train()
    batch = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, 2, (batch_size,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return {"tuned": tuned, "seconds_per_step": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("ALLOCATOR-RESULT " + json.dumps(worker(args.batch_size, args.image_size, args.steps)))
        return

    seconds: dict[str, list[float]] = {"glibc_default": [], "trainer_setting": []}
    for _ in range(args.rounds):
        for name, flag in (("glibc_default", "0"), ("trainer_setting", "1")):
            command = [sys.executable, __file__, "--worker", "--batch-size", str(args.batch_size)]
            command += ["--image-size", str(args.image_size), "--steps", str(args.steps)]
            env = {**os.environ, "TRANSFERKIT_TUNE_MALLOC": flag}
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("ALLOCATOR-RESULT "))
            result = json.loads(line.split(" ", 1)[1])
            if result["tuned"] != (flag == "1"):
                raise SystemExit(f"the allocator setting did not take effect as asked ({name}): {result}")
            seconds[name].append(result["seconds_per_step"])
            print(f"{name}: {result['seconds_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    report = {
        "benchmark": "allocator",
        "backbone": "tf_efficientnet_lite0",
        "step": "fully unfrozen, Adam",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps_per_process": args.steps,
        "rounds": args.rounds,
        "seconds_per_step_median": {k: round(statistics.median(v), 4) for k, v in seconds.items()},
        # the default allocator's step time over the Trainer's, per round (each side its own process)
        "speedup_of_trainer_setting": per_round_ratio(seconds["glibc_default"], seconds["trainer_setting"]),
        "all_rounds_seconds": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
        "provenance": provenance(),
    }
    save(report, args.out)


if __name__ == "__main__":
    main()
