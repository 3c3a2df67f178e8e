"""Score trained ELPV runs again on validation under other test-time augmentations, without training.

For each seed, the best checkpoint under ``RUNS/seed<N>`` (as ``benchmarks/elpv.py`` and
``benchmarks/time_to_accuracy.py`` lay their runs out) is scored on that seed's validation split (the
protocol's split, rebuilt from ``--config`` and the seed) once per ``--tta`` mode. TTA changes nothing in
training or in the choice of the best checkpoint (validation during training runs without it), so a
recipe with ``model.prediction.tta: X`` would have scored exactly these figures: a paired comparison of the modes,
on the same weights. Only validation is read; the test split is never touched. Anything after ``--`` is
passed to the recipe as it was to the runs (``--data.split.max_samples 400``...), so the split is the one they
trained on.

    python benchmarks/rescore_elpv.py --config recipes/quickstart.yaml \\
        --runs runs/time-to-accuracy/quickstart --seeds 0 1 2 3 4 --tta none hflip flips d4 \\
        --out benchmarks/results/elpv-quickstart-tta-val-2core-cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elpv import score_split  # noqa: E402
from paired import paired_difference  # noqa: E402
from provenance import provenance, save  # noqa: E402


def best_checkpoint(runs: Path, seed: int) -> Path:
    found = sorted((runs / f"seed{seed}").rglob("best-*.ckpt"))
    if len(found) != 1:
        raise SystemExit(f"{runs / f'seed{seed}'}: expected one best-*.ckpt under it, found {len(found)}.")
    return found[0]


def rescore(config: str, runs: Path, seed: int, ttas: list[str], overrides: list[str] = ()) -> dict:
    import torch

    from transferkit.cli.lightning_cli import TransferKitCLI, cli_kwargs
    from transferkit.models.classifier import TransferClassifier

    path = best_checkpoint(runs, seed)
    args = ["--config", config, *overrides, "--seed_everything", str(seed), "--data.seed", str(seed)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = TransferKitCLI(**cli_kwargs(args), run=False).datamodule
    model = TransferClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    data.use_data_config(model.data_config)
    data.setup("fit")
    scores, _, _ = score_split(model, data, "val", ttas, torch.device("cpu"))
    return {"seed": seed, "checkpoint": str(path), "val": scores}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the recipe the runs trained with (for the split)")
    parser.add_argument("--runs", required=True, type=Path, help="folder holding seed<N>/ run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tta", nargs="+", default=["none", "hflip", "flips", "d4"])
    parser.add_argument("--out")
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if args.tta[0] != "none":
        args.tta.insert(0, "none")  # the differences are against no TTA

    seeds = [rescore(args.config, args.runs, seed, args.tta, overrides) for seed in args.seeds]
    summary = {}
    for tta in args.tta:
        values = [s["val"][tta]["acc_binary"] for s in seeds]
        paired = paired_difference([s["val"]["none"]["acc_binary"] for s in seeds], values)
        summary[tta] = {
            "acc_binary_per_seed": [round(v, 4) for v in values],
            "acc_binary_mean": round(statistics.mean(values), 4),
            "difference_per_seed": paired["per_seed"],
            "difference_mean": paired["mean"],
            "difference_std": paired["std"] if len(seeds) > 1 else 0.0,
        }
    save({"overrides": overrides, "seeds": seeds, "summary": summary, "provenance": provenance()}, args.out)


if __name__ == "__main__":
    main()
