"""Learning rates found, not guessed: a range test per training phase of a freeze schedule.

A range test trains for a short while with the learning rate growing exponentially from tiny to huge,
and records the (smoothed) training loss: it falls once the rate is large enough to learn, falls fastest
somewhere, then blows up. The suggestion is the middle, in log(rate), of the longest stretch over which
the smoothed loss keeps falling (fastai's "valley" rule, its default since fastai 2.5), measured from where
the loss has started to fall rather than from the sweep's first rate (see :func:`suggest`). The steepest
point of the curve (fastai's older "steep" rule, and Lightning's suggestion, which takes the slope against
the rate itself) is a single difference of a noisy curve: on ELPV the head's sweep starts with a few
batches whose loss goes up and down by 0.4 while the rate is still far too small to learn, and the
steepest drop there suggested 4.6e-6 for a loss that is lowest near 1e-2. The valley spans the whole
descent and is not moved by a bump at either end. Lightning's sweep and its smoothing are used as they
are.

:func:`lr_find` runs one test per phase of the recipe's freeze schedule:

- **head**, the epochs with the whole backbone frozen: Lightning's ``Tuner.lr_find`` on a Trainer, so the
  data module's frozen-feature cache serves it when it is on (seconds). Only the head trains here, so
  Lightning's sweep, which sets every parameter group to the same rate, changes nothing else. When the
  head phase holds fewer batches than the sweep's steps (small data, one frozen epoch), the sweep would
  run into the unfrozen epochs: then the loop below sweeps it, held at epoch 0.
- **backbone**, the first epoch that unfreezes backbone groups: the top backbone group's rate is swept,
  the unfrozen groups below it keep ``layer_decay`` times less each, and the head stays at its own rate
  (the head phase's suggestion), having first trained at it for as many steps as a sweep, as the
  frozen epochs would have trained it. Lightning's sweep would set every group to the same rate, erasing the
  layer decay, so this sweep is a short loop of its own, with the same smoothing, early stop and rule.
- **all**, a recipe that trains everything from the start: ``lr`` swept, every backbone group keeping its
  ratio to it.

The loss swept is the model's own (its task's: cross-entropy, binary cross-entropy per label, or MSE /
Huber on standardised targets, the scaling counted on the training split first), so every kind of target
is range-tested alike. The model's weights are put back after every test.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from transferkit.errors import ConfigError
from transferkit.models.tasks import check_same_kind
from transferkit.training.feeding import FreezeAndCache

__all__ = ["LRFindReport", "LRSweep", "lr_find", "suggest"]

SMOOTHING = 0.98  # Lightning's LR finder smooths the loss with this factor
SKIP_BEGIN, SKIP_END = 10, 1  # and ignores these many points at each end when suggesting
MIN_FALL = 0.05  # a valley that falls by less than this share of the loss is noise, not learning


@dataclass
class LRSweep:
    """One range test: the rates tried, the smoothed loss at each, and the suggested rate."""

    phase: str  # "head", "backbone" or "all"
    epoch: int  # the epoch of the schedule it stands for
    parameter: str  # the recipe field it sets: "lr" or "backbone_lr"
    lrs: list[float]
    losses: list[float]
    suggestion: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("phase", "epoch", "parameter", "suggestion", "reason")}


@dataclass
class LRFindReport:
    """What :func:`lr_find` found: one :class:`LRSweep` per phase, ``values`` the recipe fields they set."""

    sweeps: list[LRSweep] = field(default_factory=list)
    png: Path | None = None

    @property
    def values(self) -> dict[str, float]:
        return {s.parameter: s.suggestion for s in self.sweeps if s.suggestion is not None}

    def __str__(self) -> str:
        lines = [
            f"{s.phase} phase (epoch {s.epoch}): {s.parameter} = {_fmt(s.suggestion)}: {s.reason}"
            for s in self.sweeps
        ]
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3g}"


def suggest(lrs: list[float], losses: list[float]) -> tuple[float | None, str]:
    """The middle, in ``log(lr)``, of the falling part of the longest valley of the smoothed loss, and why;
    ``None`` when the curve is too short or never falls.

    The valley is the longest run of points (not necessarily adjacent) over which the loss keeps falling:
    the longest strictly decreasing subsequence, as in fastai's ``valley``. Its start often lies on the
    plateau of rates too small to learn, so where it starts depends on where the sweep started; here it is
    taken from the first of its points that has made a tenth of the fall from the plateau (the median of
    the valley's first quarter) to its lowest point, which makes the suggestion the middle of the actual
    descent, whatever ``min_lr`` was. The first 10 points and the last are left out, as Lightning does:
    the first smoothed values stand for a handful of batches. A valley whose fall is under
    :data:`MIN_FALL` (5 %) of the loss is the noise of a flat curve, and gives no suggestion.

    Example:
        >>> lrs = list(np.logspace(-6, 0, 60))
        >>> falling = [1.0 - 0.4 * math.tanh(2 + math.log10(lr)) for lr in lrs]  # falls from 1e-4 to 1
        >>> losses = [f if lr < 0.1 else 9.0 for f, lr in zip(falling, lrs)]  # and blows up at 0.1
        >>> round(math.log10(suggest(lrs, losses)[0]))
        -2
        >>> bump = [l + (0.4 if 12 <= k < 16 else 0.0) for k, l in enumerate(losses)]  # noise at 1e-5
        >>> round(math.log10(suggest(lrs, bump)[0]))
        -2
    """
    lrs_kept = np.asarray(lrs[SKIP_BEGIN:-SKIP_END], dtype=float)
    kept = np.asarray(losses[SKIP_BEGIN:-SKIP_END], dtype=float)
    finite = np.isfinite(kept)
    lrs_kept, kept = lrs_kept[finite], kept[finite]
    if len(kept) < 3:
        return None, f"only {len(kept)} usable points: give more steps (the data holds too few batches?)"
    valley = _longest_valley(kept)
    if len(valley) < 3:
        return None, "the loss never falls over the range tried: widen it (min_lr lower)"
    # the plateau's level: the median of the valley's first quarter, which a few noisy points do not move
    top, bottom = float(np.median(kept[valley[: max(1, len(valley) // 4)]])), kept[valley[-1]]
    if top - bottom < MIN_FALL * abs(top):
        return None, (
            f"the smoothed loss falls only {100 * (top - bottom) / abs(top):.1f}% over the range tried "
            f"({top:.3f} -> {bottom:.3f}, {_fmt(lrs[0])} to {_fmt(lrs[-1])}): that is noise, no rate in it "
            "made the model learn. Check that the labels match the images, or widen the range (max_lr higher)"
        )
    begin = next(i for i in valley if kept[i] <= top - 0.1 * (top - bottom))
    end = valley[-1]
    logs = np.log(lrs_kept[begin : end + 1])
    middle = begin + int(np.argmin(np.abs(logs - (logs[0] + logs[-1]) / 2)))  # the middle in log(lr)
    return float(lrs_kept[middle]), (
        f"the middle of the stretch where the smoothed loss keeps falling, {_fmt(lrs_kept[begin])} to "
        f"{_fmt(lrs_kept[end])} ({kept[begin]:.3f} -> {kept[end]:.3f}); the sweep ran {_fmt(lrs[0])} to "
        f"{_fmt(lrs[-1])} over {len(lrs)} steps"
    )


def _longest_valley(losses: np.ndarray) -> list[int]:
    """The indices of the longest strictly decreasing subsequence of ``losses`` (O(n^2); a sweep has ~100
    points), the earliest one when several are as long."""
    n = len(losses)
    length, previous = [1] * n, [-1] * n  # the longest decreasing run ending at i, and its point before i
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[j] + 1 > length[i]:
                length[i], previous[i] = length[j] + 1, j
    path = [int(np.argmax(length))]
    while previous[path[-1]] >= 0:
        path.append(previous[path[-1]])
    return path[::-1]


def lr_find(
    model: Any,
    datamodule: Any,
    steps: int = 100,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    out: str | os.PathLike | None = None,
    root_dir: str | os.PathLike | None = None,
    apply: bool = False,
    caches: FreezeAndCache | None = None,
) -> LRFindReport:
    """Range-test ``model``'s learning rates on ``datamodule``'s training split, phase by phase of its
    freeze schedule (see the module's text); the model's weights are unchanged afterwards.

    Args:
        steps: optimizer steps per sweep (fewer in a head phase shorter than that).
        min_lr, max_lr: the range swept (for the backbone phase, ``max_lr / 10`` at most).
        out: where to write ``lr_find.png`` (the loss against the rate per phase, the suggestion marked).
        root_dir: the Trainer folder of the head phase (its feature cache is shared with a run there).
        apply: set the model's ``lr`` (and ``backbone_lr``) to the suggestions.
        caches: the run's :class:`~transferkit.training.feeding.FreezeAndCache` settings: a head phase is
            swept on the same stored features the run trains on (``None``: on images).

    Example:
        >>> import transferkit as tk
        >>> dm = tk.ImageDataModule(source="digits", pipeline={"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3},
        ...                         loader={"num_workers": 0})
        >>> model = tk.TransferClassifier(num_classes=10, backbone="test_efficientnet", pretrained=False)
        >>> report = lr_find(model, dm, steps=30)
        >>> [s.phase for s in report.sweeps], report.values["lr"] > 0
        (['all'], True)
    """
    check_same_kind(model, datamodule)
    if steps < SKIP_BEGIN + SKIP_END + 3:
        raise ConfigError(f"lr_find needs at least {SKIP_BEGIN + SKIP_END + 3} steps per sweep, got {steps}.")
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"lr_find needs 0 < min_lr < max_lr, got {min_lr} and {max_lr}.")
    if hasattr(datamodule, "use_data_config"):
        datamodule.use_data_config(model.data_config)
    datamodule.setup("fit")
    train = datamodule.datasets["train"]
    steps_per_epoch = max(len(train) // datamodule.batch_size, 1)
    freezing = model.freezing
    groups = len(freezing.groups)
    first_unfreeze = (
        next((e for e in range(1, 1000) if freezing.trainable_at(e) > 0), None)
        if freezing.schedule.active and freezing.trainable_at(0) == 0
        else None
    )
    auto = model.settings.optimizer.lr == "auto"
    if auto:
        model.set_learning_rates(lr=1e-3)  # a placeholder while sweeping: every sweep sets the rates it tests
    report = LRFindReport()
    state = copy.deepcopy(model.state_dict())
    try:
        _prepare_task(model, datamodule)
        if freezing.schedule.active and freezing.trainable_at(0) == 0:
            head_steps = steps if first_unfreeze is None else steps_per_epoch * first_unfreeze
            if head_steps >= steps:
                feeding = caches.fresh() if caches is not None else FreezeAndCache()
                report.sweeps.append(_head_sweep(model, datamodule, steps, min_lr, max_lr, root_dir, feeding))
            else:  # a head phase of fewer batches than the sweep: ours, held at epoch 0 throughout
                sweep = _own_sweep(model, datamodule, 0, steps, min_lr, max_lr, swept={"head": 1.0}, fixed={})
                report.sweeps.append(_named(sweep, "head", 0, "lr"))
            head_lr = report.sweeps[-1].suggestion or model.settings.optimizer.lr
            if first_unfreeze is not None:
                # the frozen epochs train the head before anything unfreezes: so does the finder, at the
                # head's found rate, for as many steps as a sweep, so the backbone's sweep starts from a
                # trained head as the run's unfrozen epochs do (not from a random one, whose large
                # gradients would dominate the first steps)
                _own_sweep(model, datamodule, 0, steps, head_lr, head_lr, swept={"head": 1.0}, fixed={})
                trainable = freezing.trainable_at(first_unfreeze)
                sweep = _own_sweep(
                    model, datamodule, first_unfreeze, steps, min_lr, min(max_lr, max_lr / 10),
                    swept=_backbone_ratios(model, trainable, groups), fixed={"head": head_lr},
                )  # fmt: skip
                report.sweeps.append(_named(sweep, "backbone", first_unfreeze, "backbone_lr"))
        else:
            ratios = {"head": 1.0, **_backbone_ratios(model, groups, groups, relative_to_head=True)}
            sweep = _own_sweep(model, datamodule, 0, steps, min_lr, max_lr, swept=ratios, fixed={})
            report.sweeps.append(_named(sweep, "all", 0, "lr"))
    finally:
        model.load_state_dict(state)
        freezing.trainable_groups = None
    if auto and "lr" not in report.values:
        model.set_learning_rates(lr="auto")
        raise ConfigError(f"model.optimizer.lr: auto, but the range test found no rate:\n{report}")
    if apply or auto:
        model.set_learning_rates(**report.values, found=[sweep.to_dict() for sweep in report.sweeps])
    if out is not None:
        from transferkit.reporting.plots import lr_find_plot

        report.png = lr_find_plot(report, out)
    return report


def _prepare_task(model: Any, datamodule: Any) -> None:
    """Count on the training split what the task's loss counts when a fit starts (a regression's target
    scaling, ``class_weights`` / ``pos_weight: auto``), so the sweeps' loss is the one training minimises: the
    sweeps of our own loop run no Lightning ``setup``. The scaling is a buffer, put back with the weights."""
    task = getattr(model, "task", None)
    if task is not None and task.wants_training_targets("fit") and hasattr(datamodule, "split_targets"):
        task.prepare(datamodule.split_targets("train"))


def _named(sweep: tuple[list[float], list[float]], phase: str, epoch: int, parameter: str) -> LRSweep:
    lrs, losses = sweep
    suggestion, reason = suggest(lrs, losses)
    return LRSweep(phase, epoch, parameter, lrs, losses, suggestion, reason)


def _backbone_ratios(
    model: Any, trainable: int, groups: int, relative_to_head: bool = False
) -> dict[str, float]:
    """Each trainable backbone group's rate relative to the top group's (``layer_decay`` per group down),
    or to the head's (``relative_to_head``: the recipe's ``backbone_lr / lr`` kept)."""
    opt = model.settings.optimizer
    top = float(opt.backbone_lr) if opt.backbone_lr is not None else float(opt.lr) * opt.layer_decay
    scale = top / float(opt.lr) if relative_to_head else 1.0
    return {f"backbone.{groups - 1 - depth}": scale * opt.layer_decay**depth for depth in range(trainable)}


class _WeightsOnlyIO(TorchCheckpointIO):
    """Lightning's finder saves the model before sweeping and loads it back after: with ``weights_only``."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def _head_sweep(
    model: Any,
    datamodule: Any,
    steps: int,
    min_lr: float,
    max_lr: float,
    root_dir: Any,
    feeding: FreezeAndCache,
) -> LRSweep:
    from lightning.pytorch.tuner import Tuner

    # the finder writes a checkpoint into the Trainer's folder while it runs
    scratch = tempfile.mkdtemp(prefix="transferkit-lr-find-") if root_dir is None else None
    trainer = L.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        devices=1,
        max_epochs=1000,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root_dir or scratch),
        plugins=[_WeightsOnlyIO()],
        callbacks=[feeding],  # the head phase frozen, and fed the run's stored features
    )
    # Lightning's finder fits with its own callbacks in place of the Trainer's, so no epoch start freezes the
    # backbone: the head phase's state is applied here (its BatchNorm in eval mode, which Lightning notes)
    model.freezing.start_epoch(0)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
            finder = Tuner(trainer).lr_find(
                model,
                datamodule=datamodule,
                min_lr=min_lr,
                max_lr=max_lr,
                num_training=steps,
                update_attr=False,
            )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    lrs, losses = list(finder.results["lr"]), [float(v) for v in finder.results["loss"]]
    return LRSweep("head", 0, "lr", lrs, losses, *suggest(lrs, losses))


def _batches(datamodule: Any, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    train = datamodule.datasets["train"]
    generator = torch.Generator().manual_seed(datamodule.seed + epoch)
    while True:
        loader = DataLoader(
            train, batch_size=datamodule.batch_size, shuffle=True, drop_last=len(train) > datamodule.batch_size,
            generator=generator, num_workers=0,
        )  # fmt: skip
        yield from loader


def _own_sweep(
    model: Any,
    datamodule: Any,
    epoch: int,
    steps: int,
    min_lr: float,
    max_lr: float,
    swept: dict[str, float],
    fixed: dict[str, float],
) -> tuple[list[float], list[float]]:
    """Sweep the groups in ``swept`` (rate = value x ratio) from ``min_lr`` to ``max_lr`` over ``steps``
    steps at ``epoch`` of the schedule, ``fixed`` groups at their rate; the smoothed loss at each step."""
    model.freezing.start_epoch(epoch)
    model.train()
    optimizer = model.optimization(steps, steps, 1)["optimizer"]
    for group in optimizer.param_groups:
        if group.get("name") not in swept:
            group["lr"] = fixed.get(group.get("name"), 0.0)
    lrs: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    batches = _batches(datamodule, epoch)
    for step in range(steps):
        value = min_lr * (max_lr / min_lr) ** (step / max(steps - 1, 1))
        for group in optimizer.param_groups:
            if group.get("name") in swept:
                group["lr"] = value * swept[group["name"]]
        images, labels = next(batches)
        if model.mixing.active:
            images, labels = model.mixing.mix(images, labels)
        loss = model.loss(model(images), labels)  # the training step's loss, without its logging
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average = SMOOTHING * average + (1 - SMOOTHING) * float(loss.detach())
        smoothed = average / (1 - SMOOTHING ** (step + 1))
        lrs.append(value)
        losses.append(smoothed)
        best = min(best, smoothed)
        if step > SKIP_BEGIN and (not math.isfinite(smoothed) or smoothed > 4 * best):
            break  # diverged: Lightning's early stop at 4x the best loss
    return lrs, losses
