"""How good is each depth of the pretrained backbone for this data? ``tk.probe`` and ``python -m transferkit probe``.

For every backbone group (stem, each stage, the final layers) the images' activations after that
group are average-pooled into a vector, a linear probe is fitted on the training split and scored on the
validation split. Where the score peaks says how far down the pretrained features stay useful, and so how
many groups from the top are worth unfreezing. Given a cache folder, features are stored like the
frozen-feature cache, so a second probe of the same data and weights costs seconds.

The probe and its score follow the data's kind of target:

================  ============================================  ==========================================
kind              probe                                         score
================  ============================================  ==========================================
``single_label``  logistic regression over the classes          accuracy (``acc``)
``multi_label``   one logistic regression per label             mAP: the labels' mean average precision
``regression``    ridge regression (its penalty chosen by       R^2, averaged over the targets
                  leave-one-out on the training split)
================  ============================================  ==========================================
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.data.datasets import ImageDataset
from transferkit.data.features import FeatureCache
from transferkit.errors import ConfigError
from transferkit.finetuning.groups import backbone_groups
from transferkit.models.backbones import Backbone

__all__ = ["METRIC_LABELS", "ProbeReport", "ProbeResult", "group_outputs", "probe", "probe_depths", "suggest"]


#: how each score is headed in tables and suggestions
METRIC_LABELS = {"acc": "acc", "map": "mAP", "r2": "R^2"}


@dataclass
class ProbeResult:
    """One group's probe: its ``metric`` (``acc``, ``map`` or ``r2``, by the kind of target) on the training
    and validation splits; higher is better for all three."""

    group: int
    module: str
    width: int
    train_score: float
    val_score: float
    metric: str = "acc"

    @property
    def train_acc(self) -> float:
        """``train_score``, under the name of single-label probes."""
        return self.train_score

    @property
    def val_acc(self) -> float:
        """``val_score``, under the name of single-label probes."""
        return self.val_score


def _output_module(model: nn.Module, names: Sequence[str]) -> str:
    """The module whose output is the group's output: the group's common parent, else its last layer."""
    owners = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names if "." in n))
    parts = [o.split(".") for o in owners]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    prefix = ".".join(common)
    modules = dict(model.named_modules())
    if prefix and prefix in modules and all(o == prefix or o.startswith(prefix + ".") for o in owners):
        return prefix
    return owners[-1]


def _pool(output: torch.Tensor) -> torch.Tensor:
    if output.ndim == 4:  # (B, C, H, W)
        return output.mean(dim=(2, 3))
    if output.ndim == 3:  # (B, tokens, C)
        return output.mean(dim=1)
    return output.flatten(1)


@torch.no_grad()
def group_outputs(backbone: Backbone, loader: DataLoader) -> tuple[list[str], list[torch.Tensor]]:
    """Average-pooled activations after every backbone group: names, and ``(N, C_g)`` per group."""
    groups = backbone_groups(backbone)
    names = [_output_module(backbone.model, g) for g in groups]
    modules = dict(backbone.model.named_modules())
    collected: list[list[torch.Tensor]] = [[] for _ in names]
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, i=i: collected[i].append(_pool(out).float()))
        for i, name in enumerate(names)
    ]
    was_training = backbone.training
    backbone.eval()
    try:
        for images, _ in loader:
            backbone(images)
    finally:
        backbone.train(was_training)
        for handle in handles:
            handle.remove()
    return names, [torch.cat(chunks) for chunks in collected]


def _split_features(
    dm: Any, backbone: Backbone, split: str, cache: FeatureCache | None
) -> tuple[list[str], list[torch.Tensor]]:
    dataset = dm.datasets[split]
    decoding = dm.decoding_for(dm.eval_transform) if hasattr(dm, "decoding_for") else None
    key = FeatureCache.key(backbone, dm.eval_transform, dataset.items, f"probe-{split}", 1, dm.seed, decoding)
    groups = backbone_groups(backbone)
    names = [_output_module(backbone.model, g) for g in groups]
    if cache is not None:
        stored = [cache.load(f"probe-{split}-g{i}", key) for i in range(len(groups))]
        if all(s is not None for s in stored):
            return names, stored
    loader = DataLoader(
        dm.image_dataset(dataset.items, dataset.labels, dm.eval_transform)
        if hasattr(dm, "image_dataset")
        else ImageDataset(dataset.items, dataset.labels, dm.eval_transform),
        batch_size=64,
        num_workers=dm.settings.loader.num_workers if hasattr(dm, "settings") else 0,
    )
    names, features = group_outputs(backbone, loader)
    if cache is not None:
        for i, f in enumerate(features):
            cache.save(f"probe-{split}-g{i}", key, f)
    return names, features


def _classes_probe() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=3000, C=0.1)


def _labels_probe() -> Any:
    from sklearn.multiclass import OneVsRestClassifier

    return OneVsRestClassifier(_classes_probe())


def _numbers_probe() -> Any:
    from sklearn.linear_model import RidgeCV

    return RidgeCV(alphas=np.logspace(-2, 4, 7))


def _accuracy(probe: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(probe.score(x, y))


def _mean_average_precision(probe: Any, x: np.ndarray, y: np.ndarray) -> float:
    """The mean over labels of the average precision; a label without a positive in ``y`` has none and is
    left out (``nan`` when no label has one)."""
    from sklearn.metrics import average_precision_score

    probs = probe.predict_proba(x)
    scored = [average_precision_score(y[:, k], probs[:, k]) for k in range(y.shape[1]) if y[:, k].any()]
    return float(np.mean(scored)) if scored else math.nan


def _r2(probe: Any, x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import r2_score

    return float(r2_score(y, probe.predict(x), multioutput="uniform_average"))


# what a linear probe is, and how it is scored, for each kind of target (the module's table)
_PROBES: dict[str, tuple[str, Any, Any]] = {
    "single_label": ("acc", _classes_probe, _accuracy),
    "multi_label": ("map", _labels_probe, _mean_average_precision),
    "regression": ("r2", _numbers_probe, _r2),
}


def _targets(dm: Any, split: str, kind: str) -> np.ndarray:
    targets = np.asarray(
        dm.split_targets(split) if hasattr(dm, "split_targets") else dm.datasets[split].labels
    )
    return (targets >= 0.5).astype(np.int64) if kind == "multi_label" else targets


def probe_depths(
    dm: Any, backbone: Backbone, cache_dir: str | os.PathLike | None = None
) -> list[ProbeResult]:
    """Fit a linear probe on each group's features (train split) and score it (val split): logistic
    regression scored by accuracy, one per label scored by mAP, or ridge regression scored by R^2, by the
    data module's kind of target (the module's table).

    ``dm`` is a set-up :class:`~transferkit.ImageDataModule`; the features of each split are stored in
    ``cache_dir`` when one is given (and read from it on the next call), else kept in memory only.
    """
    from sklearn.preprocessing import StandardScaler

    kind = getattr(dm, "target_kind", "single_label")
    metric, make_probe, score = _PROBES[kind]
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    names, train = _split_features(dm, backbone, "train", cache)
    _, val = _split_features(dm, backbone, "val", cache)
    y_train, y_val = _targets(dm, "train", kind), _targets(dm, "val", kind)
    results = []
    for index, (name, x_train, x_val) in enumerate(zip(names, train, val, strict=True)):
        scaler = StandardScaler().fit(x_train.numpy())
        seen, unseen = scaler.transform(x_train.numpy()), scaler.transform(x_val.numpy())
        probe = make_probe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on tiny feature sets, a label always absent
            probe.fit(seen, y_train)
            results.append(
                ProbeResult(
                    group=index,
                    module=name,
                    width=x_train.shape[1],
                    train_score=score(probe, seen, y_train),
                    val_score=score(probe, unseen, y_val),
                    metric=metric,
                )
            )
    return results


def suggest(results: Sequence[ProbeResult]) -> tuple[int, str]:
    """How many groups from the top to unfreeze, and why, from where the probe's score (accuracy, mAP or
    R^2; higher is better for each) peaks."""
    top = len(results) - 1
    label = METRIC_LABELS.get(results[top].metric, results[top].metric)
    scored = [r for r in results if not math.isnan(r.val_score)] or list(results)
    best_score = max(r.val_score for r in scored)
    # the deepest group within a point of the best: deeper features are cheaper to build on
    best = max(r.group for r in scored if r.val_score >= best_score - 0.01)
    if best == top:
        peak = max(scored, key=lambda r: r.val_score)
        how = (
            "best"
            if peak.group == top
            else f"within a point of the best (g{peak.group}, {peak.module}: {peak.val_score:.3f})"
        )
        return 2, (
            f"the top group's features probe {how} (val {label} {results[top].val_score:.3f}): the pretrained "
            "features fit this data. Train the head first (frozen_epochs), then unfreeze the top 2 groups."
        )
    trainable = top - best + 1
    return trainable, (
        f"features peak after group g{best} ({results[best].module}, val {label} {results[best].val_score:.3f}) "
        f"and fall to {results[top].val_score:.3f} at the top: the layers above g{best} are specific to "
        f"ImageNet. Unfreeze the top {trainable} groups (freeze_schedule: {{milestones: {{0: 0, 2: {trainable}}}}})."
    )


@dataclass
class ProbeReport:
    """What :func:`probe` returns: one result per backbone group, and the suggestion drawn from them."""

    backbone: str
    results: list[ProbeResult]
    trainable_groups: int  # how many groups from the top the suggestion unfreezes
    suggestion: str
    train_images: int
    val_images: int


def probe(model: Any, datamodule: Any, cache_dir: str | os.PathLike | None = None) -> ProbeReport:
    """Probe every depth of ``model``'s pretrained backbone on ``datamodule`` (train/val splits) and
    suggest how many groups from the top to unfreeze. Every kind of target is probed (the module's table).

    Args:
        model: a :class:`~transferkit.TransferClassifier` (or anything with a ``backbone`` and ``data_config``).
        datamodule: an :class:`~transferkit.ImageDataModule` with a validation split; it is set up here.
        cache_dir: a folder to keep the features of each group in (keyed, so a second probe of the same
            data and weights reads them); ``None`` keeps them in memory only.
    """
    if getattr(getattr(datamodule, "data", None), "name", None) == "stream":
        raise ConfigError(
            "probe reads the images of the train and val splits by index, which a pack (source: stream) "
            "does not offer; probe on the folder or CSV it was packed from (the splits are the same)."
        )
    if hasattr(datamodule, "use_data_config"):
        datamodule.use_data_config(model.data_config)
    datamodule.setup("fit")
    results = probe_depths(datamodule, model.backbone, cache_dir)
    trainable, text = suggest(results)
    return ProbeReport(
        backbone=model.backbone.name,
        results=results,
        trainable_groups=trainable,
        suggestion=text,
        train_images=len(datamodule.datasets["train"]),
        val_images=len(datamodule.datasets["val"]),
    )
