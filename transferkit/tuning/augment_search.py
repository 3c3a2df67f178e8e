"""Which augmentations earn their place on *this* data: candidates ranked by validation loss, in a budget.

Each trial trains the recipe's head, from the same initial weights, on the data module's augmented
feature cache (``feature_cache: augmented``: the frozen backbone's features of ``views`` augmented
copies of every training image, one drawn per epoch), for ``epochs`` epochs, and scores the validation
split (clean features, computed once for all trials). A trial therefore costs ``views`` backbone passes
over the training images plus seconds of head training, instead of a fine-tuning run.

The baseline is the recipe's own pipeline; each candidate is that pipeline plus one item (a transform or
a policy), or ``none`` (no augmentation). Every candidate is trained on the same ``repeats`` seeds as the
baseline, so differences are paired; the spread of the baseline's own seeds says how large a difference
has to be to mean anything.

What it measures, and what it does not: the effect of an augmentation on a head learning from frozen
pretrained features. Augmentations that help by teaching the backbone itself new invariances only show
once the backbone trains; check a winner with a full run on validation before adopting it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import yaml

from transferkit.data.augment import augmentations
from transferkit.errors import ConfigError

__all__ = [
    "DEFAULT_CANDIDATES",
    "AugmentSearchReport",
    "Trial",
    "augment_search",
    "headline_metric",
    "parse_budget",
]

DEFAULT_CANDIDATES: list[Any] = [
    "none",
    {"HorizontalFlip": {"p": 0.5}},
    {"VerticalFlip": {"p": 0.5}},
    {"RandomRotate90": {"p": 0.5}},
    {"Affine": {"rotate": [-15, 15], "translate_percent": [-0.05, 0.05], "scale": [0.9, 1.1], "p": 0.7}},
    {"RandomBrightnessContrast": {"brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5}},
    {"GaussianBlur": {"blur_limit": [3, 5], "p": 0.3}},
    {"GaussNoise": {"std_range": [0.02, 0.06], "p": 0.3}},
    {"CoarseDropout": {"num_holes_range": [1, 4], "hole_height_range": [0.05, 0.12], "hole_width_range": [0.05, 0.12], "p": 0.4}},
    {"RandAugment": {"num_ops": 2, "magnitude": 9, "ops": "photometric_safe"}},
    {"TrivialAugment": {"ops": "photometric_safe"}},
    {"RandAugment": {"num_ops": 2, "magnitude": 9, "ops": "default"}},
]  # fmt: skip


def parse_budget(budget: str | float) -> float:
    """Seconds from ``"20m"``, ``"90s"``, ``"1h"`` or a number of seconds.

    Example:
        >>> parse_budget("20m"), parse_budget("1.5h"), parse_budget(45)
        (1200.0, 5400.0, 45.0)
    """
    if isinstance(budget, int | float):
        seconds = float(budget)
    else:
        text = str(budget).strip().lower()
        units = {"s": 1.0, "m": 60.0, "h": 3600.0}
        try:
            seconds = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
        except ValueError as err:
            raise ConfigError(f"budget must be like 20m, 90s or 1h, got {budget!r}.") from err
    if not seconds > 0:
        raise ConfigError(f"budget must be > 0, got {budget!r}.")
    return seconds


def _name(candidate: Any) -> str:
    if candidate == "none":
        return "none (no augmentation)"
    ((name, params),) = candidate.items()
    inner = ", ".join(f"{k}={v}" for k, v in (params or {}).items())
    return f"+ {name}({inner})"


# how the table heads the kind's first validation metric (the one a trial reports beside its loss)
_METRIC_LABELS = {"val_acc": "val acc", "val_map": "val mAP", "val_mae": "val MAE"}


def headline_metric(model: Any) -> str:
    """The validation figure a trial reports beside its loss: the first of the model's kind's metrics
    (``val_acc``, ``val_map``, ``val_mae``); ``val_acc`` for a module without a task."""
    task = getattr(model, "task", None)
    return f"val_{task.metric_names[0]}" if task is not None else "val_acc"


@dataclass
class Trial:
    """One candidate's runs, one per seed: validation loss (what ranks) and the kind's ``metric``."""

    name: str
    candidate: Any  # "baseline", "none" or the item added
    val_loss: list[float] = field(default_factory=list)
    val_score: list[float] = field(default_factory=list)  # the kind's metric per seed
    seconds: float = 0.0
    metric: str = "val_acc"  # which figure val_score holds: val_acc, val_map, val_mae

    @property
    def val_acc(self) -> list[float]:
        """``val_score`` under the name single-label reports have always used."""
        return self.val_score

    def mean(self, metric: str) -> float:
        values = self.val_score if metric in ("val_score", self.metric) else getattr(self, metric)
        return float(np.mean(values)) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        """As ``augment_search.json`` holds it: the metric's values under its own name (``val_acc`` ...)."""
        out = {"name": self.name, "candidate": self.candidate, "val_loss": self.val_loss}
        out |= {self.metric: self.val_score, "seconds": self.seconds}
        return out if self.metric == "val_acc" else out | {"metric": self.metric}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Trial:
        metric = values.get("metric", "val_acc")
        return cls(
            values["name"], values["candidate"], list(values["val_loss"]), list(values[metric]),
            float(values.get("seconds", 0.0)), metric,
        )  # fmt: skip


@dataclass
class AugmentSearchReport:
    """Trials in rank order (lowest mean validation loss first), the baseline among them."""

    trials: list[Trial]
    baseline: Trial
    skipped: list[str]
    snippet: str  # the winning pipeline as a recipe's data.pipeline.augment, in YAML
    noise: float  # the spread (max - min) of the baseline's validation loss over the seeds
    png: Path | None = None
    in_recipe: list[str] = field(default_factory=list)  # candidates whose transform the recipe already has

    def table(self) -> str:
        base = self.baseline.mean("val_loss")
        label = _METRIC_LABELS.get(self.baseline.metric, self.baseline.metric)
        lines = [f"{'rank':>4}  {'val loss':>8}  {'vs base':>8}  {label:>7}  {'s':>5}  candidate"]
        for rank, trial in enumerate(self.trials, 1):
            delta = trial.mean("val_loss") - base
            lines.append(
                f"{rank:>4}  {trial.mean('val_loss'):>8.4f}  {delta:>+8.4f}  {trial.mean('val_score'):>7.3f}"
                f"  {trial.seconds:>5.0f}  {trial.name}"
            )
        lines.append(
            f"baseline seeds spread {self.noise:.4f} in validation loss: a difference inside it is no difference"
        )
        if self.skipped:
            lines.append(f"not tried (budget spent): {', '.join(self.skipped)}")
        if self.in_recipe:
            lines.append(
                f"not tried (the recipe's pipeline already has the transform): {', '.join(self.in_recipe)}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trials": [t.to_dict() for t in self.trials],
            "baseline": self.baseline.name,
            "noise_val_loss": self.noise,
            "skipped": self.skipped,
            "in_recipe": self.in_recipe,
            "snippet": self.snippet,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentSearchReport:
        """The report back from :meth:`to_dict` (what ``augment_search.json`` holds), to rank or compare
        a search that ran earlier without running it again."""
        try:
            trials = [Trial.from_dict(trial) for trial in values["trials"]]
            (baseline,) = [t for t in trials if t.name == values["baseline"]]
            return cls(
                trials=trials,
                baseline=baseline,
                skipped=list(values.get("skipped", [])),
                snippet=values["snippet"],
                noise=float(values["noise_val_loss"]),
                in_recipe=list(values.get("in_recipe", [])),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"not an augment-search report ({type(err).__name__}: {err}); pass the contents of the "
                "augment_search.json an augment search wrote, or AugmentSearchReport.to_dict()."
            ) from err


def _transform_name(item: Any) -> str | None:
    """``HorizontalFlip`` of ``{"HorizontalFlip": {...}}`` or of an ``A.to_dict`` item."""
    if isinstance(item, dict) and "__class_fullname__" in item:
        return str(item["__class_fullname__"]).rsplit(".", 1)[-1]
    if isinstance(item, dict) and len(item) == 1:
        return str(next(iter(item)))
    return None


def _items(augment: Any) -> list[Any]:
    """A pipeline as a list of recipe items (``{Name: params}`` or ``A.to_dict`` items)."""
    if isinstance(augment, list):
        return list(augment)
    return [t.to_dict()["transform"] if hasattr(t, "to_dict") else t for t in augmentations(augment)]


def augment_search(
    model: Any,
    datamodule: Any,
    budget: str | float = "20m",
    candidates: Sequence[Any] | None = None,
    epochs: int = 3,
    views: int = 2,
    repeats: int = 2,
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> AugmentSearchReport:
    """Rank ``candidates`` (default :data:`DEFAULT_CANDIDATES`) against the recipe's pipeline by validation
    loss, within ``budget`` (see the module's text). ``model`` and ``datamodule`` are the recipe's; they are
    not trained. ``out``: a folder for ``augment_search.png``, ``.json`` and ``.yaml`` (the winner).

    Every kind of target is ranked by its own validation loss (cross-entropy, binary cross-entropy per
    label, or the regression loss on standardised targets); each trial also reports the kind's first metric
    (:func:`headline_metric`: ``val_acc``, ``val_map`` or ``val_mae``), which is what a candidate that
    moves a label (a flip of a left/right label, a crop that cuts a positive label out) shows up in.

    Example:
        >>> import tempfile, transferkit as tk
        >>> dm = tk.ImageDataModule(source="digits", loader={"num_workers": 0}, split={"max_samples": 300},
        ...                         pipeline={"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "augment": "none"},
        ...                         cache={"dir": tempfile.mkdtemp()})
        >>> model = tk.TransferClassifier(num_classes=10, backbone="test_efficientnet", pretrained=False)
        >>> report = augment_search(model, dm, budget="5m", candidates=[{"HorizontalFlip": {"p": 0.5}}],
        ...                         epochs=1, repeats=1)
        >>> sorted(t.name for t in report.trials)
        ['+ HorizontalFlip(p=0.5)', 'baseline (the recipe: none)']
    """
    seconds = parse_budget(budget)
    if epochs < 1 or views < 1 or repeats < 1:
        raise ConfigError(f"epochs, views and repeats must be >= 1, got {epochs}, {views}, {repeats}.")
    if not datamodule.has_validation:
        raise ConfigError("augment_search ranks by validation loss: the data needs val_fraction > 0.")
    metric = headline_metric(model)
    candidates = list(DEFAULT_CANDIDATES if candidates is None else candidates)
    for candidate in candidates:
        if candidate != "none":
            augmentations([candidate])  # a bad candidate fails here, before any trial
    base_augment = (
        datamodule.settings.pipeline.preset
    )  # the pipeline the recipe trains with (its preset when none is named)
    base_items = _items(base_augment)
    described = base_augment if isinstance(base_augment, str) else f"{len(base_items)} inline transforms"
    pipelines: list[tuple[str, Any, Any]] = [(f"baseline (the recipe: {described})", "baseline", base_items)]
    present = {_transform_name(item) for item in base_items} - {None}
    in_recipe: list[str] = []
    for candidate in candidates:
        if candidate != "none" and _transform_name(candidate) in present:
            in_recipe.append(_name(candidate))  # a second flip on top of the recipe's measures nothing new
            continue
        pipelines.append(
            (_name(candidate), candidate, [] if candidate == "none" else [*base_items, candidate])
        )
    start = time.perf_counter()
    root = Path(
        cache_dir or datamodule.settings.cache.dir or os.path.join(os.getcwd(), "runs", "augment_search")
    )
    trials: list[Trial] = []
    skipped: list[str] = []
    slowest = 0.0
    for name, candidate, items in pipelines:
        elapsed = time.perf_counter() - start
        if trials and elapsed + slowest > seconds:
            skipped.append(name)
            continue
        trial = Trial(name, candidate, metric=metric)
        began = time.perf_counter()
        for seed in range(repeats):
            loss, score = _trial(model, datamodule, items, seed, epochs, views, root, metric)
            trial.val_loss.append(loss)
            trial.val_score.append(score)
        trial.seconds = time.perf_counter() - began
        slowest = max(slowest, trial.seconds)
        trials.append(trial)
    baseline = trials[0]
    ranked = sorted(trials, key=lambda t: t.mean("val_loss"))
    winner = ranked[0]
    winning_items = (
        base_items
        if winner.candidate == "baseline"
        else pipelines[[p[0] for p in pipelines].index(winner.name)][2]
    )
    snippet = yaml.safe_dump({"data": {"pipeline": {"augment": winning_items}}}, sort_keys=False)
    noise = float(np.ptp(baseline.val_loss)) if len(baseline.val_loss) > 1 else math.nan
    report = AugmentSearchReport(ranked, baseline, skipped, snippet, noise, in_recipe=in_recipe)
    if out is not None:
        from transferkit.reporting.plots import augment_search_plot

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        report.png = augment_search_plot(report, folder / "augment_search.png")
        (folder / "augment_search.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
        (folder / "augment_search.yaml").write_text(
            f"# the winner of augment-search: {winner.name}\n{snippet}"
        )
    return report


def _trial(
    model: Any,
    datamodule: Any,
    items: list[Any],
    seed: int,
    epochs: int,
    views: int,
    root: Path,
    metric: str = "val_acc",
) -> tuple[float, float]:
    """The recipe's head trained for ``epochs`` on ``views`` augmented feature views of the training
    images through ``items``; its validation loss and ``metric`` (the kind's: accuracy, mAP, MAE)."""
    import lightning as L

    from transferkit.data.datamodule import ImageDataModule
    from transferkit.finetuning.schedule import FreezeSchedule
    from transferkit.training.feeding import FreezeAndCache
    from transferkit.training.trainer import Trainer

    augment: Any = A.to_dict(A.Compose(augmentations(items))) if items else "none"
    # the recipe's data (its image size, mean and std as filled in), through the trial's pipeline
    settings = datamodule.settings.replace(pipeline={"augment": augment}, cache={"dir": str(root)})
    data = ImageDataModule(**settings.init_args())
    optimizer = model.settings.optimizer
    model_settings = model.settings.replace(
        optimizer=optimizer.replace(lr=1e-3) if optimizer.lr == "auto" else optimizer,
        freeze_schedule=FreezeSchedule(frozen_epochs=epochs + 1),  # the head alone, on the cached features
        mixing=None,  # no mixup or CutMix: nothing to mix in cached features
    )
    L.seed_everything(seed, verbose=False)
    trial_model = type(model)(**model_settings.init_args())
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_early_stopping=False,
        default_root_dir=str(root),
        callbacks=[FreezeAndCache(feature_cache="augmented", cache_views=views)],
    )
    trainer.fit(trial_model, datamodule=data)
    metrics = trainer.callback_metrics
    return float(metrics["val_loss"]), float(metrics[metric])
