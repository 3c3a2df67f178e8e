"""INT8 against fp32 on ELPV: the quick start's checkpoints, accuracy kept and speed gained.

For each seed's quick-start run (``python benchmarks/time_to_accuracy.py --recipes recipes/quickstart.yaml``
writes them), it exports the best checkpoint to ONNX and quantises it under several settings, each calibrated
on the same 256 training images (:func:`transferkit.inference.quantize.quantize_onnx`). The setting is chosen
on validation, all seeds pooled: among the settings at least 2x faster than fp32 ONNX at batch 1, the one that
changes the fewest 4-class predictions against the fp32 model (ties: the faster). Then, once per seed, the test split is scored by fp32 and by the chosen int8
model: binary (the class groups' verdict) and 4-class accuracy, and the share of predictions that changed.
fp32 ONNX's test accuracy is checked against the run's own ``test_group_acc`` (the same model, so equal).

Latency, per seed's models, round-robin in one process (PyTorch eager, fp32 ONNX, each int8 candidate; ONNX
Runtime and torch at the machine's cores): median milliseconds per batch at batch 1 and batch 32, and the
median of the per-round ratios against fp32 ONNX and against PyTorch eager. Prints one JSON object.

    python benchmarks/quantize_elpv.py --runs runs/time-to-accuracy/quickstart --seeds 0 1 2 3 4 \\
        --out benchmarks/results/quantize-elpv-amd-epyc.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save, write  # noqa: E402
from rounds import per_round_ratio  # noqa: E402

from transferkit.cli.recipes import load_recipe  # noqa: E402
from transferkit.data.class_groups import group_labels  # noqa: E402
from transferkit.inference import export_checkpoint, load_for_inference  # noqa: E402
from transferkit.inference.exported import load_exported  # noqa: E402
from transferkit.inference.quantize import QuantizeSettings, quantize_onnx  # noqa: E402

CANDIDATES: dict[str, QuantizeSettings] = {
    "u8s8-full-minmax": QuantizeSettings(calibration="minmax"),
    "u8s8-full-percentile": QuantizeSettings(calibration="percentile"),
    # the blocks a one-block-at-a-time probe on seed 1's validation cells found most sensitive, kept in float
    "u8s8-full-percentile-blocks01-fp32": QuantizeSettings(
        calibration="percentile", keep_fp32=("backbone.model.blocks.0", "backbone.model.blocks.1")
    ),
    "u8s8-full-percentile-blocks013-fp32": QuantizeSettings(
        calibration="percentile",
        keep_fp32=("backbone.model.blocks.0", "backbone.model.blocks.1", "backbone.model.blocks.3"),
    ),
    "s8s8-full-minmax": QuantizeSettings(activations="int8", calibration="minmax"),
    # the schemes for CPUs without VNNI, where 8-bit weights can saturate: 7-bit weights, or U8U8
    "u8s8-reduced-percentile": QuantizeSettings(reduce_range=True, calibration="percentile"),
    "u8u8-full-minmax": QuantizeSettings(weights="uint8", calibration="minmax"),
}


def _run_of(runs: Path, seed: int) -> tuple[Path, Path]:
    folder = runs / f"seed{seed}"
    checkpoints = sorted(folder.glob("lightning_logs/version_*/checkpoints/best-*.ckpt"))
    if not checkpoints:
        raise SystemExit(
            f"no quick-start checkpoint in {folder}: run python benchmarks/time_to_accuracy.py --recipes "
            f"recipes/quickstart.yaml --seeds {seed} first."
        )
    return checkpoints[-1], checkpoints[-1].parents[1]


def _tensors(dm: Any, split: str, transform: Any) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = dm.datasets[split]
    images = dm.image_dataset(dataset.items, dataset.labels, transform)
    xs, ys = zip(*(images[i] for i in range(len(images))), strict=True)
    return torch.stack([x.float() for x in xs]), torch.as_tensor(np.asarray(ys))


def _predict(model: Any, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.predict_proba(x[i : i + batch], tta="none") for i in range(0, len(x), batch)])


def _scores(probs: torch.Tensor, labels: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, float]:
    from transferkit.data.class_groups import group_probabilities

    return {
        "acc_4class": float((probs.argmax(-1) == labels).float().mean()),
        "acc_binary": float(
            (group_probabilities(probs, groups).argmax(-1) == group_labels(labels, groups)).float().mean()
        ),
    }


def _changed(a: torch.Tensor, b: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, float]:
    from transferkit.data.class_groups import group_probabilities

    return {
        "changed_4class": float((a.argmax(-1) != b.argmax(-1)).float().mean()),
        "changed_binary": float(
            (group_probabilities(a, groups).argmax(-1) != group_probabilities(b, groups).argmax(-1))
            .float()
            .mean()
        ),
        "max_prob_diff": float((a - b).abs().max()),
    }


def _latency(
    runners: dict[str, Any], batch: torch.Tensor, rounds: int, iterations: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():  # warm-up
        run(batch)
        run(batch)
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(iterations):
                run(batch)
            times[name].append((time.perf_counter() - start) / iterations * 1000)
            time.sleep(0.05)  # the last runtime's worker threads stop spinning before the next one runs
    return times


def measure_seed(args: argparse.Namespace, seed: int, work: Path) -> dict[str, Any]:
    """Everything of one seed but its test split: run in a process of its own (ONNX Runtime's memory arenas
    and the data module are freed with it)."""
    ckpt, run = _run_of(Path(args.runs), seed)
    # the data as time_to_accuracy.py ran it: the recipe with the seed's split
    recipe = load_recipe(
        ["--config", args.recipe, "--seed_everything", str(seed), "--data.seed", str(seed)], logger=False
    )
    dm = recipe.datamodule
    dm.setup("fit")
    dm.setup("test")
    eager, transform = load_for_inference(ckpt)
    groups = eager.class_groups
    fp32_path = export_checkpoint(ckpt, "onnx", work / f"s{seed}" / "model.onnx").path
    fp32, _ = load_exported(fp32_path)
    train = dm.datasets["train"]
    order = np.random.default_rng(seed).permutation(len(train))[: args.calibration_count]
    calibration = dm.image_dataset([train.items[i] for i in order], train.labels[order], transform)
    cal = torch.stack([calibration[i][0].float() for i in range(len(calibration))]).numpy()
    val_x, val_y = _tensors(dm, "val", transform)
    test_x, test_y = _tensors(dm, "test", transform)
    models = {}
    ops: dict[str, Any] = {}
    for name in args.candidates:
        out = work / f"s{seed}" / f"{name}.onnx"
        result = quantize_onnx(
            fp32_path, (cal[i : i + 16] for i in range(0, len(cal), 16)), out, CANDIDATES[name]
        )
        models[name] = load_exported(result.path)[0]
        ops[name] = {
            "int8_ops": result.quantized_ops,
            "float_ops": result.float_ops,
            "size_mb": round(result.size_bytes / 1e6, 2),
        }
    fp32_val = _predict(fp32, val_x)
    entry: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "run_test_group_acc": _read_metric(run, "test_group_acc"),
        "val_images": len(val_y),
        "test_images": len(test_y),
        "fp32_val": _scores(fp32_val, val_y, groups),
        "val": {},
        "ops": ops,
    }
    val_probs = {}
    for name, model in models.items():
        val_probs[name] = _predict(model, val_x)
        entry["val"][name] = {
            **_scores(val_probs[name], val_y, groups),
            **_changed(fp32_val, val_probs[name], groups),
        }
    # latency: one batch of validation images, every model of this seed in each round
    runners = {
        "pytorch_eager": lambda b, m=eager: m.predict_proba(b, tta="none"),
        "onnx_fp32": fp32.run,
        **{f"int8:{n}": m.run for n, m in models.items()},
    }
    entry["latency_ms"] = {}
    with torch.no_grad():
        for size, iterations in ((1, 20), (32, 2)):
            batch = val_x[:size].contiguous()
            times = _latency(runners, batch, args.rounds, iterations)
            entry["latency_ms"][f"batch{size}"] = {
                "median": {n: round(statistics.median(t), 3) for n, t in times.items()},
                "speedup_vs_onnx_fp32": {
                    n: per_round_ratio(times["onnx_fp32"], t)
                    for n, t in times.items()
                    if n.startswith("int8")
                },
                "speedup_vs_pytorch_eager": {
                    n: per_round_ratio(times["pytorch_eager"], t)
                    for n, t in times.items()
                    if n != "pytorch_eager"
                },
            }
    # what the choice and the test need: the entry, the files, the test images (torch.save)
    torch.save({"x": test_x, "y": test_y, "groups": groups}, work / f"s{seed}" / "test.pt")
    entry["files"] = {"fp32": str(fp32_path), **{name: str(model.path) for name, model in models.items()}}
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/time-to-accuracy/quickstart")
    parser.add_argument("--recipe", default="recipes/quickstart.yaml", help="the recipe the runs trained")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--calibration-count", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--out", default=None)
    parser.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_seed is not None:  # a worker: one seed's measurements to <work>/s<seed>/entry.json
        entry = measure_seed(args, args.one_seed, Path(args.work))
        (Path(args.work) / f"s{args.one_seed}" / "entry.json").write_text(json.dumps(entry))
        return
    torch.set_num_threads(torch.get_num_threads())
    report: dict[str, Any] = {"provenance": provenance(), "candidates": {}, "seeds": {}}
    report["candidates"] = {n: CANDIDATES[n].describe() for n in args.candidates}
    work = Path(tempfile.mkdtemp(prefix="quantize-elpv-"))
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        # one process per seed: what a seed's runtimes hold is returned to the system when it ends
        (work / f"s{seed}").mkdir(parents=True, exist_ok=True)
        worker = [sys.executable, __file__, *sys.argv[1:], "--one-seed", str(seed), "--work", str(work)]
        subprocess.run(worker, check=True)
        entry = json.loads((work / f"s{seed}" / "entry.json").read_text())
        for name, values in entry.pop("ops").items():
            report["candidates"][name].update(values)
        per_seed[seed] = {"entry": entry}
        report["seeds"][str(seed)] = entry
        if args.out:
            write(report, args.out)
        print(f"seed {seed} done", file=sys.stderr)

    # the choice, on validation, all seeds pooled
    def pooled(name: str, key: str) -> float:
        return statistics.fmean(per_seed[s]["entry"]["val"][name][key] for s in per_seed)

    def speed(name: str) -> float:
        return statistics.fmean(
            per_seed[s]["entry"]["latency_ms"]["batch1"]["speedup_vs_onnx_fp32"][f"int8:{name}"]["median"]
            for s in per_seed
        )

    summary = {
        name: {
            "val_changed_4class": round(pooled(name, "changed_4class"), 4),
            "val_changed_binary": round(pooled(name, "changed_binary"), 4),
            "val_acc_binary_drop": round(
                statistics.fmean(per_seed[s]["entry"]["fp32_val"]["acc_binary"] for s in per_seed)
                - pooled(name, "acc_binary"),
                4,
            ),
            "batch1_speedup_vs_onnx_fp32": round(speed(name), 3),
        }
        for name in args.candidates
    }
    # the fewest changed 4-class predictions among the settings at least 2x faster than fp32 ONNX at batch 1
    # (the speed target), else among all
    fast = [n for n in args.candidates if summary[n]["batch1_speedup_vs_onnx_fp32"] >= 2.0] or args.candidates
    chosen = min(
        fast, key=lambda n: (summary[n]["val_changed_4class"], -summary[n]["batch1_speedup_vs_onnx_fp32"])
    )
    report["validation_summary"] = summary
    report["chosen_on_validation"] = chosen
    # the test split, once per seed: fp32 and the chosen setting
    test_rows = {}
    for seed, held in per_seed.items():
        files = held["entry"].pop("files")
        test = torch.load(work / f"s{seed}" / "test.pt", weights_only=True)
        a = _predict(load_exported(files["fp32"])[0], test["x"])
        b = _predict(load_exported(files[chosen])[0], test["x"])
        test_rows[seed] = {
            "fp32": _scores(a, test["y"], test["groups"]),
            "int8": _scores(b, test["y"], test["groups"]),
            **_changed(a, b, test["groups"]),
        }
        report["seeds"][str(seed)]["test"] = test_rows[seed]

    def stat(values: list[float]) -> dict[str, float]:
        return {
            "mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        }

    seeds = list(test_rows)
    report["test_summary"] = {
        "setting": chosen,
        "fp32_acc_binary": stat([test_rows[s]["fp32"]["acc_binary"] for s in seeds]),
        "int8_acc_binary": stat([test_rows[s]["int8"]["acc_binary"] for s in seeds]),
        "int8_minus_fp32_binary": stat(
            [test_rows[s]["int8"]["acc_binary"] - test_rows[s]["fp32"]["acc_binary"] for s in seeds]
        ),
        "fp32_acc_4class": stat([test_rows[s]["fp32"]["acc_4class"] for s in seeds]),
        "int8_acc_4class": stat([test_rows[s]["int8"]["acc_4class"] for s in seeds]),
        "int8_minus_fp32_4class": stat(
            [test_rows[s]["int8"]["acc_4class"] - test_rows[s]["fp32"]["acc_4class"] for s in seeds]
        ),
        "changed_binary": stat([test_rows[s]["changed_binary"] for s in seeds]),
        "changed_4class": stat([test_rows[s]["changed_4class"] for s in seeds]),
        "fp32_matches_run_test_group_acc": all(
            abs(test_rows[s]["fp32"]["acc_binary"] - (per_seed[s]["entry"]["run_test_group_acc"] or -1))
            < 1e-6
            for s in seeds
        ),
    }
    for size in ("batch1", "batch32"):
        rows = [per_seed[s]["entry"]["latency_ms"][size] for s in seeds]
        report["test_summary"][f"{size}_speedup_vs_onnx_fp32"] = stat(
            [r["speedup_vs_onnx_fp32"][f"int8:{chosen}"]["median"] for r in rows]
        )
        report["test_summary"][f"{size}_speedup_vs_pytorch_eager"] = stat(
            [r["speedup_vs_pytorch_eager"][f"int8:{chosen}"]["median"] for r in rows]
        )
        report["test_summary"][f"{size}_onnx_fp32_vs_pytorch_eager"] = stat(
            [r["speedup_vs_pytorch_eager"]["onnx_fp32"]["median"] for r in rows]
        )
        report["test_summary"][f"{size}_ms"] = {
            name: stat([r["median"][name] for r in rows])
            for name in ("pytorch_eager", "onnx_fp32", f"int8:{chosen}")
        }
    save(report, args.out)


def _read_metric(run: Path, key: str) -> float | None:
    path = run / "metrics.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return (data.get("test") or {}).get(key)


if __name__ == "__main__":
    main()
