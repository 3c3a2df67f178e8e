"""How well ``doctor`` finds what is wrong with data, each finding against a random ranking and a single model's
own losses (what ``interpret``'s top losses rank by).

    python benchmarks/doctor.py --parts elpv flips duplicates --cv runs/cv/protocol/soft-binary-s0 \\
        --checkpoint runs/time-to-accuracy/quickstart/seed0 --out benchmarks/results/doctor-<cpu>.json

Parts:

- ``elpv``: ELPV's binary task (seed 0's protocol split; ``recipes/quickstart.yaml``'s data with ``task: binary``).
  About 15 % of the cells were given a defect probability of 1/3 or 2/3 by the annotators: their binary label
  is the least certain. For the non-test cells, the AUROC of each ranking for telling the uncertain cells from
  the certain ones, and how many of its top 50 are uncertain. Rankings: ``doctor`` (5-fold logistic regression
  on the backbone's features), ``doctor --cv`` (a stored 5-fold cross-validation of fine-tuned models, ``--cv``),
  a fine-tuned model's own loss on its training cells (``--checkpoint``: a ``finetune`` run of the quick start
  on this split, its 4 classes grouped into the binary verdict; scored on the training split, where it trained),
  and a random ranking. No test label is read.
- ``flips``: labels flipped at random in 5 % of the non-test images (``--seeds``), on two datasets a linear
  model does not nearly separate (ELPV binary; the photo digits of ``benchmarks/auto_budget.py``): precision and
  recall of the flipped images among the top k (k = the number flipped) of ``doctor``'s ranking, of a single
  logistic model's in-sample losses (fitted on all the images, flipped labels included, as a trained model's
  own top losses are), and of a random ranking.
- ``duplicates``: 30 training images of each dataset (ELPV, photo digits, digits) copied three ways (re-encoded
  as JPEG quality 70; resized to 60 %; cropped by 6 % a side and resized back) and placed in the test split.
  For two descriptors, the backbone's pooled features and a DCT hash of the 32x32 grey thumbnail (a continuous
  perceptual hash), each centred on the data's mean and compared by cosine similarity: the recall of the copies
  (the copy in one group with its original) and the false groups among the original images alone, at a sweep
  of thresholds. The threshold is chosen on the photo digits (the lowest with no false group) and reported on
  the other two.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT))
from auto_budget import DATASETS  # noqa: E402
from provenance import provenance, save, write  # noqa: E402

import transferkit as tk  # noqa: E402
from transferkit.data.checks import image_hashes, unit_rows  # noqa: E402
from transferkit.data.features import extract_features  # noqa: E402
from transferkit.tuning.doctor import (  # noqa: E402
    duplicate_groups,
    label_issue_scores,
    oof_probabilities,
    read_cv_probabilities,
    split_features,
)

SPLITS = ("train", "val", "test")
QUICK = {"image_size": 192}


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def _module(name: str, data_dir: Path, seed: int = 0, task: str = "binary") -> tuple[Any, Any]:
    if name == "elpv":
        dm = tk.ImageDataModule(
            source="elpv", task=task, seed=seed, split={"val_fraction": 0.15}, pipeline=QUICK,
            loader={"num_workers": 1},
        )  # fmt: skip
    else:
        dm = tk.ImageDataModule(
            source="folder", root=str(DATASETS[name](data_dir)), seed=seed, split={"val_fraction": 0.15},
            pipeline=QUICK, loader={"num_workers": 1},
        )  # fmt: skip
    model = tk.TransferClassifier(num_classes=dm.num_classes, class_names=dm.class_names)
    dm.use_data_config(model.data_config)
    dm.setup("fit")
    return dm, model


def _features(dm: Any, model: Any, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, data-module indices and split names of every image, splits in order."""
    features = split_features(model, dm, cache)
    x = torch.cat([features[s] for s in SPLITS]).numpy()
    index = np.concatenate([dm.split_indices[s] for s in SPLITS])
    split = np.concatenate([[s] * len(dm.split_indices[s]) for s in SPLITS])
    return x, index, split


def _precision_recall(scores: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    k = int(flipped.sum())
    top = np.argsort(-scores, kind="stable")[:k]
    hits = int(flipped[top].sum())
    return {"k": k, "hits": hits, "precision": hits / k, "recall": hits / k}


def _in_sample_loss(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A single logistic model's own loss on each image it was fitted on (``interpret``'s top losses' view)."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(features, labels)
    probs = np.zeros((len(labels), int(labels.max()) + 1))
    probs[:, model[-1].classes_] = model.predict_proba(features)
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1))


# --- ELPV's uncertain cells ----------------------------------------------------------------------------


def part_elpv(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    dm, model = _module("elpv", Path(args.data_dir))
    start = time.perf_counter()
    x, index, split = _features(dm, model, cache)
    feature_s = time.perf_counter() - start
    keep = split != "test"
    labels = np.asarray(dm.data.labels)[index[keep]]
    uncertain = np.isin(np.round(dm.data.meta["defect_probability"][index[keep]], 3), [0.333, 0.667])
    start = time.perf_counter()
    probs = oof_probabilities(x[keep], labels, 5, 0)
    oof_s = time.perf_counter() - start
    rankings = {"doctor (5-fold logistic on features)": label_issue_scores(probs, labels)[0]}
    rng = np.random.default_rng(0)
    rankings["random"] = rng.random(len(labels))
    files = [str(dm.data.items[i]) for i in index[keep]]
    names = dm.class_names
    if args.cv:
        images = [
            {"index": int(i), "file": f, "label": names[int(y)]}
            for i, f, y in zip(index[keep], files, labels, strict=True)
        ]
        cv_probs = read_cv_probabilities(args.cv, images, names)
        rankings[f"doctor --cv ({Path(args.cv).name})"] = label_issue_scores(cv_probs, labels)[0]
    rows = {}
    train = split[keep] == "train"
    for name, scores in rankings.items():
        rows[name] = _uncertain_figures(scores, uncertain, train)
    if args.checkpoint:
        ckpt = sorted(Path(args.checkpoint).rglob("best*.ckpt"))[-1]
        single = _checkpoint_losses(ckpt, dm, index[keep][train], labels[train])
        rows["fine-tuned model's own training losses"] = _uncertain_figures(single, uncertain[train], None)
        rows["fine-tuned model's own training losses"]["checkpoint"] = str(ckpt)
    return {
        "images_scored": int(keep.sum()),
        "uncertain": int(uncertain.sum()),
        "uncertain_in_train": int(uncertain[train].sum()),
        "train": int(train.sum()),
        "rankings": rows,
        "seconds": {"features": round(feature_s, 1), "out_of_fold": round(oof_s, 1)},
    }


def _uncertain_figures(scores: np.ndarray, uncertain: np.ndarray, train: np.ndarray | None) -> dict[str, Any]:
    top = np.argsort(-scores, kind="stable")[:50]
    out = {"auroc_all_non_test": _auroc(scores, uncertain), "uncertain_in_top50": int(uncertain[top].sum())}
    if train is not None:
        out["auroc_train"] = _auroc(scores[train], uncertain[train])
        out["uncertain_in_top50_train"] = int(
            uncertain[train][np.argsort(-scores[train], kind="stable")[:50]].sum()
        )
    else:  # scored on the training split only
        out = {
            "auroc_train": out["auroc_all_non_test"],
            "uncertain_in_top50_train": out["uncertain_in_top50"],
        }
    return out


def _checkpoint_losses(ckpt: Path, dm: Any, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A fine-tuned 4-class quick-start model's binary loss on each of ``indices`` (defective = P(2/3) + P(1))."""
    from transferkit.models.classifier import TransferClassifier

    model = TransferClassifier.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True).eval()
    dataset = dm.image_dataset([dm.data.items[i] for i in indices], labels, dm.eval_transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=1)
    with torch.no_grad():
        probs = torch.cat([model.predict_proba(images) for images, _ in loader]).numpy()
    if probs.shape[1] == 4:  # the quick start's classes 0, 1/3, 2/3, 1
        probs = np.stack([probs[:, 0] + probs[:, 1], probs[:, 2] + probs[:, 3]], axis=1)
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1))


# --- flipped labels --------------------------------------------------------------------------------------


def part_flips(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    out = {}
    for name in ("elpv", "photo-digits"):
        dm, model = _module(name, Path(args.data_dir))
        x, index, split = _features(dm, model, cache)
        keep = split != "test"
        truth = np.asarray(dm.data.labels)[index[keep]]
        classes = int(truth.max()) + 1
        runs = []
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            flipped = np.zeros(len(truth), bool)
            flipped[rng.choice(len(truth), round(0.05 * len(truth)), replace=False)] = True
            given = truth.copy()
            given[flipped] = (truth[flipped] + rng.integers(1, classes, flipped.sum())) % classes
            doctor = label_issue_scores(oof_probabilities(x[keep], given, 5, seed), given)[0]
            runs.append(
                {
                    "seed": seed,
                    "doctor": _precision_recall(doctor, flipped),
                    "single model in-sample loss": _precision_recall(
                        _in_sample_loss(x[keep], given), flipped
                    ),
                    "random": _precision_recall(rng.random(len(truth)), flipped),
                }
            )
        probe = 1 - label_issue_scores(oof_probabilities(x[keep], truth, 5, 0), truth)[0]
        out[name] = {
            "images": int(keep.sum()),
            "out_of_fold_accuracy_clean_labels": float(
                (oof_probabilities(x[keep], truth, 5, 0).argmax(1) == truth).mean()
            ),
            "mean_p_true_label_clean": float(probe.mean()),
            "runs": runs,
            "mean_precision": {
                key: float(np.mean([r[key]["precision"] for r in runs]))
                for key in ("doctor", "single model in-sample loss", "random")
            },
        }
    return out


# --- near-duplicates -------------------------------------------------------------------------------------


def _variants(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=70)
    dx, dy = max(1, round(0.06 * w)), max(1, round(0.06 * h))
    return {
        "jpeg70": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
        "resized60": image.resize((max(1, round(0.6 * w)), max(1, round(0.6 * h))), Image.BILINEAR),
        "cropped6": image.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.BILINEAR),
    }


def part_duplicates(args: argparse.Namespace, cache: Path, planted_dir: Path) -> dict[str, Any]:
    thresholds = [0.80, 0.85, 0.90, 0.92, 0.94, 0.96, 0.98, 0.99, 0.995]
    out: dict[str, Any] = {}
    for name in ("photo-digits", "elpv", "digits"):
        dm, model = _module(name, Path(args.data_dir))
        x, index, split = _features(dm, model, cache)
        train = index[split == "train"]
        originals = np.random.default_rng(0).choice(train, 30, replace=False)
        files = [str(dm.data.items[i]) for i in index]
        planted, pairs = [], []
        folder = planted_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in originals:
            source = str(dm.data.items[i])
            for kind, copy in _variants(Image.open(source).convert("RGB")).items():
                path = folder / f"{Path(source).stem}-{kind}.png"
                copy.save(path)
                planted.append(str(path))
                pairs.append((files.index(source), len(files) + len(planted) - 1, kind))
        dataset = dm.image_dataset(planted, np.zeros(len(planted), dtype=np.int64), dm.eval_transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=1)
        x_planted = extract_features(model.backbone, loader).float().flatten(1).numpy()
        start = time.perf_counter()
        hashes = image_hashes(files + planted)
        hash_s = time.perf_counter() - start
        descriptors = {"backbone features": np.concatenate([x, x_planted]), "DCT hash": hashes}
        rows = {}
        for descriptor, values in descriptors.items():
            centred = unit_rows(values - values[: len(files)].mean(axis=0))
            sweep = []
            for threshold in thresholds:
                groups = duplicate_groups(centred, threshold)
                group_of = {m: g for g, (members, _) in enumerate(groups) for m in members}
                found = {kind: 0 for kind in ("jpeg70", "resized60", "cropped6")}
                for a, b, kind in pairs:
                    found[kind] += a in group_of and group_of.get(b) == group_of[a]
                clean = duplicate_groups(centred[: len(files)], threshold)
                sweep.append(
                    {
                        "threshold": threshold,
                        "recall": {k: v / len(originals) for k, v in found.items()},
                        "false_groups_without_copies": len(clean),
                    }
                )
            rows[descriptor] = sweep
        out[name] = {
            "images": len(files),
            "planted": len(planted),
            "sweep": rows,
            "dct_hash_seconds": round(hash_s, 1),
        }
    chosen = {}
    for descriptor in ("backbone features", "DCT hash"):
        clean = [r for r in out["photo-digits"]["sweep"][descriptor] if r["false_groups_without_copies"] == 0]
        chosen[descriptor] = clean[0]["threshold"] if clean else None
    out["threshold_chosen_on_photo_digits"] = chosen
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["elpv", "flips", "duplicates"])
    parser.add_argument("--cv", default=None, help="a stored cross-validation of ELPV's binary task (seed 0)")
    parser.add_argument("--checkpoint", default=None, help="a quick-start finetune run folder of seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "transferkit-auto-data"))
    parser.add_argument("--cache", default=str(ROOT / "runs" / "doctor-benchmark-cache"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "doctor", "parts": {}, "provenance": provenance()}
    cache = Path(args.cache)
    for part in args.parts:
        start = time.perf_counter()
        if part == "elpv":
            result = part_elpv(args, cache)
        elif part == "flips":
            result = part_flips(args, cache)
        elif part == "duplicates":
            with tempfile.TemporaryDirectory() as planted:
                result = part_duplicates(args, cache, Path(planted))
        else:
            raise SystemExit(f"unknown part {part!r}")
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        report["parts"][part] = result
        if args.out:
            write(report, args.out)
    save(report, args.out)


if __name__ == "__main__":
    main()
