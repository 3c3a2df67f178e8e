"""The ELPV benchmark: fine-tune and test one model per seed on the protocol's split, print one JSON object.

Protocol (shared/DESIGN.md): ``train_test_split(indices, test_size=0.25, stratify=f"{p:.2f}_{type}",
random_state=seed)`` gives 1,968 training and 656 test cells; validation (early stopping, best
checkpoint) comes out of the 1,968 only. Reported per seed and as mean +- std: binary accuracy
(defective = defect probability >= 0.5), 4-class accuracy where the recipe's task is 4class, macro-F1,
accuracy on mono- and on polycrystalline cells and on the cells of each annotated defect probability
(``acc_binary_p0``, ``_p1_3``, ``_p2_3``, ``_p1``), with and without test-time augmentation; training wall
seconds and peak memory. Each seed runs in its own process, so its peak memory is its own, and writes its
test cells' probabilities to ``test_probabilities.npz`` in its run dir (``probabilities_file``).

    python benchmarks/elpv.py --seeds 0 1 2 --config recipes/elpv.yaml --tta d4
    python benchmarks/elpv.py --seeds 0 --config recipes/elpv-4class.yaml -- --trainer.max_epochs 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The four annotated defect probabilities, as the suffixes of the per-level binary accuracies.
_LEVELS = {0.0: "p0", 1 / 3: "p1_3", 2 / 3: "p2_3", 1.0: "p1"}


def _scores(probs, labels, task: str, cell_type, defect_probability) -> dict[str, float]:
    import numpy as np
    from sklearn.metrics import f1_score

    predicted = probs.argmax(1)
    out: dict[str, float] = {}
    if task == "4class":
        out["acc_4class"] = float((predicted == labels).mean())
        out["macro_f1_4class"] = float(f1_score(labels, predicted, average="macro"))
        # Defective = defect probability >= 0.5, i.e. classes 2/3 and 1; a 4-class model's
        # probability of that is the sum of its two defective classes.
        binary_pred, binary_true = probs[:, 2:].sum(1) >= 0.5, labels >= 2
    else:
        binary_pred, binary_true = probs[:, 1] >= 0.5, labels == 1
    out["acc_binary"] = float((binary_pred == binary_true).mean())
    out["macro_f1_binary"] = float(f1_score(binary_true, binary_pred, average="macro"))
    for kind in ("mono", "poly"):
        mask = np.asarray(cell_type) == kind
        out[f"acc_binary_{kind}"] = float((binary_pred[mask] == binary_true[mask]).mean())
    # Where the binary errors are: the share of each annotated level's cells called right. The 1/3 and 2/3
    # cells are the annotators' uncertain ones, on either side of the 0.5 boundary.
    for level, suffix in _LEVELS.items():
        mask = np.isclose(np.asarray(defect_probability), level)
        if mask.any():  # a subsample (data.max_samples) may hold no cell of a level
            out[f"acc_binary_{suffix}"] = float((binary_pred[mask] == binary_true[mask]).mean())
    return out


def run_seed(seed: int, config: str, tta: str, extra: list[str]) -> dict:
    import numpy as np
    import torch

    from transferkit.cli.lightning_cli import TransferKitCLI, cli_kwargs
    from transferkit.models.classifier import TransferClassifier

    args = [
        "--config",
        config,
        "--seed_everything",
        str(seed),
        "--data.seed",
        str(seed),
        "--trainer.default_root_dir",
        str(ROOT / "runs" / "elpv-benchmark" / f"seed{seed}"),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = TransferKitCLI(**cli_kwargs(args), run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    results = trainer.finetune(model, datamodule=data)
    train_seconds = time.perf_counter() - start - results["test_seconds"]

    device = trainer.strategy.root_device  # the device it trained on
    best = TransferClassifier.load_from_checkpoint(
        results["best_checkpoint"], map_location="cpu", weights_only=True
    )
    best = best.to(device).eval()
    test = data.datasets["test"]
    loader = torch.utils.data.DataLoader(test, batch_size=64, num_workers=data.num_workers)
    probs = {name: [] for name in ("none", tta)}
    with torch.no_grad():
        for images, _ in loader:
            for name in probs:
                probs[name].append(best.predict_proba(images.to(device), tta=name).cpu())
    labels = test.labels
    meta = {
        key: data.data.meta[key][data.split_indices["test"]] for key in ("cell_type", "defect_probability")
    }
    task = "4class" if data.num_classes == 4 else "binary"
    scores = {name: _scores(torch.cat(p).numpy(), labels, task, **meta) for name, p in probs.items()}
    # every test cell's probabilities, so other decision rules can be scored without training again
    saved = Path(results["run_dir"]) / "test_probabilities.npz"
    np.savez_compressed(
        saved,
        labels=np.asarray(labels),
        **meta,
        **{f"probs_{name}": torch.cat(p).numpy() for name, p in probs.items()},
    )
    out = {
        "seed": seed,
        "task": task,
        "split_sizes": results["split_sizes"],
        "epochs": results["epochs"],
        "train_seconds": round(train_seconds, 1),
        "peak_memory_mb": round(
            (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            )
            / 1024,
            1,
        ),
        "test": scores["none"],
        "probabilities_file": str(saved),
    }
    if tta != "none":
        out[f"test_tta_{tta}"] = scores[tta]
    return out


def _summary(runs: list[dict]) -> dict:
    summary = {}
    for section in [k for k in runs[0] if k.startswith("test")]:
        for metric in runs[0][section]:
            values = [r[section][metric] for r in runs if metric in r[section]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[f"{section}.{metric}"] = {"mean": round(statistics.mean(values), 4), "std": round(std, 4)}
    for key in ("train_seconds", "peak_memory_mb"):
        values = [r[key] for r in runs]
        summary[key] = {"mean": round(statistics.mean(values), 1), "max": max(values)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(ROOT / "recipes" / "elpv.yaml"))
    parser.add_argument("--tta", default="d4", choices=["none", "hflip", "flips", "d4"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]

    if args.worker:
        print("ELPV-RESULT " + json.dumps(run_seed(args.seeds[0], args.config, args.tta, extra)), flush=True)
        return

    runs = []
    for seed in args.seeds:
        command = [
            sys.executable,
            __file__,
            "--worker",
            "--seeds",
            str(seed),
            "--config",
            args.config,
            "--tta",
            args.tta,
            *extra,
        ]
        completed = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("ELPV-RESULT ")]
        if completed.returncode != 0 or not lines:
            sys.stderr.write(completed.stderr[-5000:])
            raise SystemExit(f"seed {seed} failed (exit {completed.returncode})")
        runs.append(json.loads(lines[-1][len("ELPV-RESULT ") :]))
        print(f"seed {seed}: {json.dumps(runs[-1]['test'])}", file=sys.stderr, flush=True)
    report = {
        "benchmark": "elpv",
        "config": args.config,
        "overrides": extra,
        "published_anchor": {"vgg19_finetuned_gpu": 0.8842, "svm": 0.8244},
        "seeds": runs,
        "summary": _summary(runs),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
