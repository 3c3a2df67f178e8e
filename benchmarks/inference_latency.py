"""Inference latency: the default head vs the "lightning-fast" head, each with and without BatchNorm folded.

Four models, timed side by side in one process (round-robin over ``--repeats`` rounds), in eval mode on
the same inputs: the default head (Linear -> BatchNorm -> ELU -> dropout), the fast head (Linear ->
leaky ReLU -> dropout, no BatchNorm), and each of them with every BatchNorm folded into the layer
before it (backbone included). Reported: the median milliseconds per batch for batch 1 and a larger
batch, the speed-up over the default unfolded model as the median of the per-round ratios with their
range (best-over-best beside it), and the largest output difference folding introduced. Prints one JSON
object.

    python benchmarks/inference_latency.py
    python benchmarks/inference_latency.py --batch-sizes 1 64 --repeats 20
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

from transferkit import TransferClassifier  # noqa: E402
from transferkit.inference import count_batchnorm, fold_batchnorm  # noqa: E402
from transferkit.runtime import tune_allocator  # noqa: E402


def _seconds(model: torch.nn.Module, x: torch.Tensor, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        model(x)
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=5, help="forward passes per timing")
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
    args = parser.parse_args()

    tune_allocator()
    torch.manual_seed(0)
    default = TransferClassifier(num_classes=2, backbone=args.backbone, pretrained="bundled").eval()
    fast = TransferClassifier(
        num_classes=2,
        backbone=args.backbone,
        pretrained="bundled",
        head={"batch_norm": False, "activation": "leaky_relu"},
    ).eval()
    example = torch.randn(1, 3, args.image_size, args.image_size)
    models = {
        "default_head": default,
        "fast_head": fast,
        "default_head_folded": fold_batchnorm(default, example),
        "fast_head_folded": fold_batchnorm(fast, example),
    }
    result: dict = {
        "benchmark": "inference_latency",
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batchnorm_layers": {name: count_batchnorm(m) for name, m in models.items()},
        "ms_per_batch": {},
        "speedup_vs_default_head": {},
        "speedup_of_best_times": {},
    }
    with torch.inference_mode():
        x = torch.randn(4, 3, args.image_size, args.image_size)
        result["max_abs_output_change_from_folding"] = max(
            (models["default_head_folded"](x) - default(x)).abs().max().item(),
            (models["fast_head_folded"](x) - fast(x)).abs().max().item(),
        )
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.image_size, args.image_size)
            for model in models.values():
                model(x)  # warm-up
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(args.repeats):
                for name, model in models.items():
                    times[name].append(_seconds(model, x, args.iterations))
            key = f"batch_{batch}"
            result["ms_per_batch"][key] = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
            # the default unfolded model's time over each one's, per round: median, range, each round
            result["speedup_vs_default_head"][key] = {
                k: per_round_ratio(times["default_head"], v) for k, v in times.items()
            }
            result["speedup_of_best_times"][key] = {
                k: round(min(times["default_head"]) / min(v), 3) for k, v in times.items()
            }
    result["provenance"] = provenance()
    save(result, args.out)


if __name__ == "__main__":
    main()
