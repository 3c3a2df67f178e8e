"""Heads on frozen features from one or several depths, on ELPV validation, paired with the quick start.

    python benchmarks/depth_heads.py --seeds 0 1 2 3 4 --out benchmarks/results/depth-heads-elpv-val-2core-cpu.json

What a head trained on a frozen backbone can reach, and whether features from several depths help: for every
seed, the average-pooled output of each backbone group (``transferkit.tuning.probing.group_outputs``, the
features ``python -m transferkit probe`` scores) is computed once for the training and validation cells of the
protocol's split (docs/elpv.md), and a logistic-regression head is fitted on the training cells for each set of
groups below, its strength (C) chosen by shuffled 5-fold cross-validation (log loss) on the training cells only:

- ``top``: the last group (the features the quick start's head sees);
- ``top2``, ``top3``: the last two or three groups, pooled and concatenated;
- ``probe``: the single group ``probe`` suggests (best validation score; chosen on validation, so optimistic);
- ``top3_4class``: ``top3`` trained on ELPV's four annotated defect levels, read out as defective when
  P(2/3) + P(1) >= 0.5.

Scored on validation only (binary accuracy), each seed paired with the quick start's validation accuracy from
``--baseline`` (benchmarks/elpv.py on recipes/quickstart.yaml). No test split is read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_difference  # noqa: E402
from provenance import provenance, save, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "benchmarks" / "results" / "elpv-quickstart-val-5seeds-2core-cpu.json"
CS = [1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]


def group_features(seed: int, backbone_name: str) -> tuple[list[str], dict[str, list[np.ndarray]], dict]:
    """Pooled outputs of every group for the train and val cells of ``seed``'s split, and their 4-class labels."""
    import torch
    from torch.utils.data import DataLoader

    import transferkit as tk
    from transferkit.tuning.probing import group_outputs

    backbone = tk.create_backbone(backbone_name, pretrained="bundled")
    config = backbone.model.pretrained_cfg
    dm = tk.ImageDataModule(
        source="elpv",
        task="4class",  # the same split as task binary (both stratify on level and cell type)
        seed=seed,
        split={"val_fraction": 0.15},
        pipeline={"image_size": int(config["input_size"][-1]), "mean": config["mean"], "std": config["std"]},
        loader={"num_workers": 1},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 4-class imbalance warning: the heads below weigh nothing
        dm.setup("fit")
    features, labels = {}, {}
    for split in ("train", "val"):
        dataset = dm.datasets[split]
        loader = DataLoader(dm.image_dataset(dataset.items, dataset.labels, dm.eval_transform), batch_size=64)
        with torch.no_grad():
            names, outputs = group_outputs(backbone, loader)
        features[split] = [o.numpy() for o in outputs]
        labels[split] = np.asarray(dataset.labels)
    return names, features, labels


def fit_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray) -> tuple[np.ndarray, float]:
    """Standardise, fit a logistic regression with C chosen by 5-fold CV (log loss) on the training cells;
    P(classes) on val, and the C chosen (an end of ``CS`` means the grid was too narrow)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(),
        # shuffled folds: the cells come in file order, where neighbours share a module, and unshuffled
        # folds chose the strongest regularisation on the grid for every head and seed
        LogisticRegressionCV(
            Cs=CS, cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="neg_log_loss", max_iter=5000
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notices of coming default changes
        model.fit(x_train, y_train)
    return model.predict_proba(x_val), float(model[-1].C_[0])


def score_seed(seed: int, backbone: str) -> dict:
    start = time.perf_counter()
    names, features, labels = group_features(seed, backbone)
    extract_seconds = time.perf_counter() - start
    y4_train, y4_val = labels["train"], labels["val"]
    y_train, y_val = (y4_train >= 2).astype(int), (y4_val >= 2).astype(int)
    last = len(names) - 1

    def stack(split: str, groups: list[int]) -> np.ndarray:
        return np.concatenate([features[split][g] for g in groups], axis=1)

    # the probe's choice: the best single group on validation, as `transferkit probe` suggests it
    single = {}
    for g in range(len(names)):
        probs, _ = fit_head(features["train"][g], y_train, features["val"][g])
        single[names[g]] = float(((probs[:, 1] >= 0.5) == y_val).mean())
    probe_group = names.index(max(single, key=single.get))
    sets = {
        "top": [last],
        "top2": [last - 1, last],
        "top3": [last - 2, last - 1, last],
        "probe": [probe_group],
    }
    heads = {}
    for name, groups in sets.items():
        probs, c = fit_head(stack("train", groups), y_train, stack("val", groups))
        heads[name] = {
            "groups": [names[g] for g in groups],
            "C": c,
            "val_acc": float(((probs[:, 1] >= 0.5) == y_val).mean()),
        }
    probs, c = fit_head(stack("train", sets["top3"]), y4_train, stack("val", sets["top3"]))
    heads["top3_4class"] = {
        "groups": heads["top3"]["groups"],
        "C": c,
        "val_acc": float(((probs[:, 2:].sum(axis=1) >= 0.5) == y_val).mean()),
    }
    return {
        "seed": seed,
        "split_sizes": {"train": len(y_train), "val": len(y_val)},
        "extract_seconds": round(extract_seconds, 1),
        "single_group_val_acc": single,
        "heads": heads,
    }


def paired(runs: list[dict], baseline: dict[int, float]) -> dict:
    out = {}
    for head in runs[0]["heads"]:
        accs = [r["heads"][head]["val_acc"] for r in runs]
        row = {"val_acc_per_seed": [round(a, 4) for a in accs], "mean": round(statistics.mean(accs), 4)}
        paired_runs = [r for r in runs if r["seed"] in baseline]
        if len(paired_runs) >= 2:
            paired = paired_difference(
                [baseline[r["seed"]] for r in paired_runs], [r["heads"][head]["val_acc"] for r in paired_runs]
            )
            row["minus_quickstart_per_seed"] = paired["per_seed"]
            row["minus_quickstart_mean"] = paired["mean"]
            row["minus_quickstart_std"] = paired["std"]
            row["beyond_spread"] = paired["beyond_the_spread"]
        out[head] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--baseline", default=str(BASELINE), help="benchmarks/elpv.py results to pair with")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    base = json.loads(Path(args.baseline).read_text())
    baseline = {s["seed"]: s["val"]["acc_binary"] for s in base["seeds"]}
    report = {
        "benchmark": "depth_heads",
        "backbone": args.backbone,
        "baseline": {"file": str(Path(args.baseline).relative_to(ROOT)), "val_acc_per_seed": baseline},
        "seeds": [],
        "provenance": provenance(),
    }
    for seed in args.seeds:
        report["seeds"].append(score_seed(seed, args.backbone))
        report["summary"] = paired(report["seeds"], baseline)
        if args.out:
            write(report, args.out)  # partial: a stopped run keeps its seeds
        print(
            f"seed {seed}: "
            + ", ".join(f"{k} {v['val_acc']:.3f}" for k, v in report["seeds"][-1]["heads"].items()),
            file=sys.stderr,
        )
    save(report, args.out)


if __name__ == "__main__":
    main()
