"""The ELPV benchmark: fine-tune one model per seed on the protocol's split, print one JSON object.

Protocol (docs/elpv.md): ``train_test_split(indices, test_size=0.25, stratify=f"{p:.2f}_{type}",
random_state=seed)`` gives 1,968 training and 656 test cells; validation (early stopping, the best
checkpoint, and every choice between recipes) comes out of the 1,968 only. Choices are made on the
validation split, and a seed's test split is scored once per adopted recipe:

- by default a run scores the **validation** split only (the best checkpoint's ``val`` metrics): what
  variants are compared on (:func:`select_on_validation` reads nothing else);
- ``--test`` also scores the **test** split, for a recipe that was adopted on validation, and appends
  one line per seed to ``benchmarks/results/elpv-test-ledger.jsonl``; scoring the same recipe's test
  split again (a fresh-clone re-run) needs ``--rerun``, so every look at a test split is on record.

Reported per seed and as mean +- std: binary accuracy (defective = defect probability >= 0.5), 4-class
accuracy where the recipe's task is 4class, macro-F1, accuracy on mono- and on polycrystalline cells and
on the cells of each annotated defect probability (``acc_binary_p0``, ``_p1_3``, ``_p2_3``, ``_p1``), with
and without test-time augmentation; training wall seconds; the peak memory of the seed's own process and
of its largest loader worker. Each seed runs in its own process and writes the probabilities it scored
to ``probabilities.npz`` in its run dir. The JSON carries the commit, command, machine and versions.

    python benchmarks/elpv.py --seeds 0 1 2 3 4 --config recipes/elpv.yaml --tta d4          # validation
    python benchmarks/elpv.py --seeds 0 1 2 3 4 --config recipes/elpv.yaml --test --out r.json
    python benchmarks/elpv.py --seeds 0 --config recipes/elpv-4class.yaml -- --trainer.max_epochs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "benchmarks" / "results" / "elpv-test-ledger.jsonl"


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
        if mask.any():  # a subsample (data.split.max_samples) may hold no cell of a level
            out[f"acc_binary_{suffix}"] = float((binary_pred[mask] == binary_true[mask]).mean())
    return out


def score_split(model, data, split: str, ttas: list[str], device) -> tuple[dict, dict, dict]:
    """``model``'s scores on ``data``'s ``split`` under each test-time augmentation of ``ttas`` (one pass
    over the images): ``({tta: scores}, {tta: probabilities}, {cell_type, defect_probability})``."""
    import torch

    dataset = data.datasets[split]
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=data.settings.loader.num_workers)
    probs: dict[str, list] = {name: [] for name in dict.fromkeys(ttas)}
    with torch.no_grad():
        for images, _ in loader:
            for name in probs:
                probs[name].append(model.predict_proba(images.to(device), tta=name).cpu())
    indices = data.split_indices[split]
    meta = {key: data.data.meta[key][indices] for key in ("cell_type", "defect_probability")}
    task = "4class" if data.num_classes == 4 else "binary"
    arrays = {name: torch.cat(p).numpy() for name, p in probs.items()}
    scores = {name: _scores(p, dataset.labels, task, **meta) for name, p in arrays.items()}
    return scores, arrays, meta


def run_seed(
    seed: int, config: str, tta: str, extra: list[str], score_test: bool, checkpoint: str = "best"
) -> dict:
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
    if score_test:
        results = trainer.finetune(model, datamodule=data)  # fit, then the test split, once
        train_seconds = time.perf_counter() - start - results["test_seconds"]
        best_path, run_dir, epochs = results["best_checkpoint"], results["run_dir"], results["epochs"]
    else:
        trainer.fit(model, datamodule=data)  # the test split is not touched
        train_seconds = time.perf_counter() - start
        callback = trainer.checkpoint_callback
        # "last": the model the last epoch ends with, what a run without a validation split keeps
        best_path = callback.last_model_path if checkpoint == "last" else callback.best_model_path
        run_dir, epochs = trainer.log_dir or trainer.default_root_dir, int(trainer.current_epoch)

    device = trainer.strategy.root_device  # the device it trained on
    best = TransferClassifier.load_from_checkpoint(best_path, map_location="cpu", weights_only=True)
    best = best.to(device).eval()
    task = "4class" if data.num_classes == 4 else "binary"
    out: dict = {
        "seed": seed,
        "task": task,
        "checkpoint": checkpoint,
        "split_sizes": {s: int(len(i)) for s, i in data.split_indices.items()},
        "epochs": epochs,
        "best_epoch" if checkpoint == "best" else "last_epoch": int(
            torch.load(best_path, map_location="cpu", weights_only=True)["epoch"]
        ),
        "train_seconds": round(train_seconds, 1),
    }
    saved: dict = {}
    for split in ("val", "test") if score_test else ("val",):
        scores, probs, meta = score_split(best, data, split, ["none", tta], device)
        out[split] = scores["none"]
        if tta != "none":
            out[f"{split}_tta_{tta}"] = scores[tta]
        saved[f"{split}_labels"] = np.asarray(data.datasets[split].labels)
        saved.update({f"{split}_{key}": value for key, value in meta.items()})
        saved.update({f"{split}_probs_{name}": p for name, p in probs.items()})
    probabilities = Path(run_dir) / "probabilities.npz"
    np.savez_compressed(probabilities, **saved)
    out["probabilities_file"] = str(probabilities)
    # this process (the seed's model, data and trainer) and its largest child (a loader worker), apart
    out["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["peak_memory_mb_largest_child"] = round(
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
    )
    return out


def _summary(runs: list[dict]) -> dict:
    """Mean and std over seeds of every metric; ``n`` is the number of seeds a metric was measured on
    (fewer than the run's seeds where some seed's record lacks it, e.g. in a combined file)."""
    summary = {}
    sections = dict.fromkeys(k for r in runs for k in r if k.startswith(("val", "test")))
    for section in sections:
        metrics = dict.fromkeys(m for r in runs if section in r for m in r[section])
        for metric in metrics:
            values = [r[section][metric] for r in runs if metric in r.get(section, {})]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[f"{section}.{metric}"] = {
                "mean": round(statistics.mean(values), 4),
                "std": round(std, 4),
                "n": len(values),
            }
    for key in ("train_seconds", "peak_memory_mb", "peak_memory_mb_largest_child"):
        values = [r[key] for r in runs if key in r]
        if values:
            summary[key] = {"mean": round(statistics.mean(values), 1), "max": max(values), "n": len(values)}
    return summary


def select_on_validation(
    reports: dict[str, dict], metric: str = "acc_binary"
) -> tuple[str, dict[str, float]]:
    """The variant to adopt among ``reports`` (name -> this script's JSON), chosen on validation alone.

    Returns the name with the highest mean ``val.<metric>`` over its seeds and the mean of each. Only the
    ``val`` sections of the runs are read; a report's test figures never enter the choice.
    """
    means = {}
    for name, report in reports.items():
        values = [run["val"][metric] for run in report["seeds"]]
        means[name] = statistics.mean(values)
    return max(means, key=means.get), means


def recipe_fingerprint(config: str, overrides: list[str]) -> str:
    """What identifies a recipe in the ledger: its settings (comments aside) and the overrides given with it."""
    import yaml

    settings = json.dumps(yaml.safe_load(Path(config).read_text()), sort_keys=True, default=str)
    return hashlib.sha256("\0".join([settings, *overrides]).encode()).hexdigest()[:16]


def already_tested(fingerprint: str, seeds: list[int], ledger: Path = LEDGER) -> list[int]:
    """The seeds among ``seeds`` whose test split the ledger says was scored for this recipe."""
    if not ledger.is_file():
        return []
    seen = {
        entry["seed"]
        for entry in map(json.loads, ledger.read_text().splitlines())
        if entry.get("recipe") == fingerprint
    }
    return sorted(seen & set(seeds))


def record_test_look(
    record: dict,
    config: str,
    overrides: list[str],
    fingerprint: str,
    seed: int,
    rerun: bool,
    test_acc_binary: float,
    ledger: Path | None = None,
) -> None:
    """Append one line to the test ledger: this recipe's test split of ``seed`` was scored (``rerun``: again)."""
    entry = {
        "date_utc": record["date_utc"],
        "commit": record["commit"],
        "config": str(Path(config)),
        "overrides": overrides,
        "recipe": fingerprint,
        "seed": seed,
        "rerun": rerun,  # this seed's test split had been scored before
        "test_acc_binary": test_acc_binary,
        "command": record.get("command"),
        "uncommitted_changes": record.get("uncommitted_changes"),
        "machine": (record.get("machine") or {}).get("cpu"),
    }
    with (ledger or LEDGER).open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def check_test_allowed(fingerprint: str, seeds: list[int], rerun: bool, ledger: Path = LEDGER) -> list[int]:
    """Refuse (``SystemExit`` with what to do) to score a test split the ledger holds, unless ``rerun``.

    Returns the seeds among ``seeds`` whose test split was scored before (those a re-run scores again)."""
    tested = already_tested(fingerprint, seeds, ledger)
    if tested and not rerun:
        raise SystemExit(
            f"the test split of seeds {tested} was already scored for this recipe ({ledger.name}); "
            "a recipe's test split is scored once. Compare variants on validation (run without --test), "
            "or pass --rerun to re-run this same recipe (a fresh-clone check), which is recorded too."
        )
    return tested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", default=str(ROOT / "recipes" / "elpv.yaml"))
    parser.add_argument("--tta", default="d4", choices=["none", "hflip", "flips", "d4"])
    parser.add_argument("--test", action="store_true", help="also score the test split (an adopted recipe)")
    parser.add_argument(
        "--rerun", action="store_true", help="with --test: a re-run of a recipe already tested"
    )
    parser.add_argument(
        "--checkpoint",
        default="best",
        choices=["best", "last"],
        help="validation only: score the best checkpoint (on val_loss) or the last epoch's",
    )
    parser.add_argument("--out", default=None, help="also write the JSON to this results file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]

    if args.worker:
        result = run_seed(args.seeds[0], args.config, args.tta, extra, args.test, args.checkpoint)
        print("ELPV-RESULT " + json.dumps(result), flush=True)
        return

    if args.test and args.checkpoint != "best":
        raise SystemExit(
            "--test scores the checkpoint the recipe's own run tests (finetune's); drop --checkpoint"
        )
    fingerprint = recipe_fingerprint(args.config, extra)
    seen_before = check_test_allowed(fingerprint, args.seeds, args.rerun) if args.test else []
    record = provenance()
    runs = []
    for seed in args.seeds:
        command = [sys.executable, __file__, "--worker", "--seeds", str(seed), "--config", args.config]
        command += [
            "--tta",
            args.tta,
            "--checkpoint",
            args.checkpoint,
            *(["--test"] if args.test else []),
            *extra,
        ]
        completed = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("ELPV-RESULT ")]
        if completed.returncode != 0 or not lines:
            sys.stderr.write(completed.stderr[-5000:])
            raise SystemExit(f"seed {seed} failed (exit {completed.returncode})")
        runs.append(json.loads(lines[-1][len("ELPV-RESULT ") :]))
        shown = {k: runs[-1][k] for k in ("val", "test") if k in runs[-1]}
        print(f"seed {seed}: {json.dumps(shown)}", file=sys.stderr, flush=True)
        if args.test:
            record_test_look(
                record,
                args.config,
                extra,
                fingerprint,
                seed,
                seed in seen_before,
                runs[-1]["test"]["acc_binary"],
            )
        if args.out is not None and len(runs) < len(args.seeds):
            # the seeds done so far, marked incomplete: a run stopped part-way keeps what it measured
            write(_report(args, extra, fingerprint, runs, record), args.out)
    save(_report(args, extra, fingerprint, runs, record), args.out)


def _report(
    args: argparse.Namespace, extra: list[str], fingerprint: str, runs: list[dict], record: dict
) -> dict:
    return {
        "benchmark": "elpv",
        "config": args.config,
        "overrides": extra,
        "recipe": fingerprint,
        "splits_scored": ["val", "test"] if args.test else ["val"],
        "checkpoint": args.checkpoint,
        "complete": len(runs) == len(args.seeds),  # False in a file written after each seed of a longer run
        "seeds_requested": args.seeds,
        "published_anchor": {"vgg19_finetuned_gpu": 0.8842, "svm": 0.8244},
        "seeds": runs,
        "summary": _summary(runs),
        "provenance": record,
    }


if __name__ == "__main__":
    main()
