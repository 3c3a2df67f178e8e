"""What the model predicts: one class per image, several labels per image, or numbers.

A task is the one object that knows, for its kind of target, the head's size, the loss, the metrics, and
how the head's outputs become what a user reads (class probabilities and the most probable class; each
label's probability and the labels over their thresholds; numbers in the targets' own units). The module,
the data module and the tools ask the task; none of them branches on the kind's name.

==================  ==========================  ==================================  =========================
kind                outputs                     loss                                metrics (val_*, test_*)
==================  ==========================  ==================================  =========================
``single_label``    softmax over the classes    cross-entropy (class weights,       ``acc``, ``f1`` (macro)
                                                label smoothing)
``multi_label``     a sigmoid per label         binary cross-entropy (per-label     ``map``, ``f1_macro``,
                                                positive weights)                   ``f1_micro``, ``auroc``
``regression``      a number per target         MSE or Huber on targets             ``mae``, ``rmse``, ``r2``
                                                standardised on the training split
==================  ==========================  ==================================  =========================

The kind is a setting (``data.target.kind``, and the model's ``target``, stored in its checkpoint), never read
from the shape of the labels: 2-D labels of a single-label task are class distributions (soft labels, mixup).

Example:
    >>> task = create_task("multi_label", ["crack", "finger"])
    >>> outputs = torch.tensor([[2.0, -2.0]])
    >>> task.scores(outputs[None]).round(decimals=2), task.decide(task.scores(outputs[None]))
    (tensor([[0.8800, 0.1200]]), tensor([[1, 0]]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAUROC,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from transferkit.errors import ConfigError
from transferkit.models.calibration import Calibration, fit_calibration, fit_label_thresholds
from transferkit.models.mixing import hard_labels, soft_cross_entropy

__all__ = [
    "TARGET_KINDS",
    "MultiLabel",
    "Regression",
    "SingleLabel",
    "TargetKind",
    "Task",
    "check_same_kind",
    "create_task",
    "inverse_frequency_weights",
    "positive_weights",
]

TargetKind = Literal["single_label", "multi_label", "regression"]
TARGET_KINDS: tuple[str, ...] = ("single_label", "multi_label", "regression")


def inverse_frequency_weights(counts: Sequence[int]) -> list[float]:
    """``class_weights: auto`` for a training split with ``counts`` images per class: ``1 / count``,
    normalised to a mean of 1. A class with no training image gets the largest weight of the others (it
    adds nothing to the loss, and a weight of infinity would say otherwise).

    Example:
        >>> inverse_frequency_weights([30, 10])
        [0.5, 1.5]
    """
    counts = [int(c) for c in counts]
    present = [c for c in counts if c > 0]
    if not present:
        raise ConfigError("model.loss.class_weights: auto found no training images to count.")
    raw = [1.0 / c if c > 0 else 1.0 / min(present) for c in counts]
    mean = sum(raw) / len(raw)
    return [round(w / mean, 6) for w in raw]


def positive_weights(positives: Sequence[int], images: int) -> list[float]:
    """``pos_weight: auto`` for a training split of ``images`` images with ``positives`` per label:
    negatives / positives (PyTorch's ``BCEWithLogitsLoss`` convention), so that a label's positives weigh
    as much in the loss as its negatives. A label with no positive (or no negative) gets 1.

    Example:
        >>> positive_weights([10, 50, 0], 100)
        [9.0, 1.0, 1.0]
    """
    out = []
    for p in positives:
        p = int(p)
        out.append(round((images - p) / p, 6) if 0 < p < images else 1.0)
    return out


class Task(nn.Module):
    """Base of the three kinds (see the module docstring). ``names``: the classes, labels or targets, in
    output order. ``loss`` is the :class:`~transferkit.models.settings.LossSettings` group; ``label_smoothing``
    the regularisation group's."""

    kind: ClassVar[str] = ""
    #: the validation metric the progress bar shows beside ``val_loss``, and every metric's suffix
    metric_names: ClassVar[tuple[str, ...]] = ()
    #: whether a larger value of each metric is better
    higher_is_better: ClassVar[dict[str, bool]] = {}
    #: what the progress bar calls the training score, logged per epoch
    train_metric: ClassVar[str] = ""

    def __init__(self, names: Sequence[str], loss: Any = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.names = [str(n) for n in names]
        self.loss_settings = loss
        self.label_smoothing = float(label_smoothing)

    @property
    def outputs(self) -> int:
        """The head's width."""
        return len(self.names)

    # --- training ---------------------------------------------------------------------------------------

    def prepare(self, training_targets: np.ndarray) -> None:
        """Whatever the loss counts on the training split (class or positive weights set to ``auto``, the
        regression targets' mean and spread); ``training_targets`` are the split's labels as the data
        module holds them."""

    def wants_training_targets(self, stage: str) -> bool:
        """Whether :meth:`prepare` needs the training split's targets before ``stage`` (``fit``,
        ``validate``, ``test``)."""
        return False

    def truth(self, targets: torch.Tensor) -> torch.Tensor:
        """What predictions are scored against: the targets as the data gives them."""
        return targets

    # --- after training ---------------------------------------------------------------------------------

    def fits_after_training(self, prediction: Any) -> bool:
        """Whether something is fitted on the validation split after training (``prediction``: the model's
        :class:`~transferkit.models.settings.PredictionSettings`)."""
        return False

    def fit_calibration(
        self, views: torch.Tensor, truth: torch.Tensor, prediction: Any, split: str
    ) -> Calibration:
        """What is fitted on ``split`` after training, from the raw outputs ``(V, N, K)`` of its views."""
        raise ConfigError(f"a {self.kind} model has nothing to calibrate.")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's :attr:`train_metric`, computed on the device (no read-back)."""
        raise NotImplementedError

    # --- prediction -------------------------------------------------------------------------------------

    def scores(self, views: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """What a user reads from the outputs ``(V, B, K)`` of ``V`` test-time views: ``(B, K)`` class
        probabilities, label probabilities or values, averaged over the views."""
        raise NotImplementedError

    def decide(self, scores: torch.Tensor, calibration: Any = None) -> torch.Tensor:
        """The prediction from :meth:`scores`: class indices ``(B,)``, 0/1 labels ``(B, K)``, or the values."""
        raise NotImplementedError

    def scored_outputs(self, views: torch.Tensor, scores: torch.Tensor, calibrated: bool) -> torch.Tensor:
        """Outputs ``(B, K)`` whose loss is the loss of what :meth:`scores` gives for the views ``(V, B, K)``
        (``test_loss``): the one view's outputs, or their mean over several views."""
        return views[0] if len(views) == 1 else views.mean(dim=0)

    def uncertainty(self, draws: torch.Tensor) -> dict[str, torch.Tensor]:
        """Monte Carlo dropout: ``draws`` ``(S, B, K)`` of :meth:`scores` -> the mean ``probs``, their ``std``
        and one uncertainty per image (``entropy``: of the mean distribution, or the mean spread)."""
        mean = draws.mean(dim=0)
        return {"probs": mean, "std": draws.std(dim=0), "entropy": draws.std(dim=0).mean(dim=-1)}

    # --- scoring ----------------------------------------------------------------------------------------

    def metrics(self, prefix: str) -> MetricCollection:
        raise NotImplementedError

    def update(
        self,
        metrics: MetricCollection,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        decided: torch.Tensor | None,
    ) -> None:
        """Add a batch to ``metrics``: the raw ``outputs`` ``(B, K)`` (or, at test, :meth:`scores` of the
        views as logits would give them), the ``targets`` as the data gives them, and ``decided`` (the
        prediction as the model makes it at test: stored thresholds, TTA), or ``None``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What a checkpoint and an export say about the target: plain types."""
        return {"kind": self.kind, "names": list(self.names)}

    def check_targets(self, targets: torch.Tensor) -> None:
        """Refuse targets of another kind (a batch of class indices given to a multi-label model ...)."""


class SingleLabel(Task):
    """One class per image: softmax over the classes, cross-entropy with the loss's class weights and
    label smoothing, against hard labels ``(B,)`` or class distributions ``(B, C)`` (soft labels, mixup)."""

    kind = "single_label"
    metric_names = ("acc", "f1")
    higher_is_better = {"acc": True, "f1": True}
    train_metric = "train_acc"

    def __init__(self, names: Sequence[str], loss: Any = None, label_smoothing: float = 0.0) -> None:
        super().__init__(names, loss, label_smoothing)
        weights = getattr(loss, "class_weights", None)
        self.class_weights: list[float] | None = list(weights) if isinstance(weights, tuple) else None

    def wants_training_targets(self, stage: str) -> bool:
        # counted for every stage that computes the loss, so val_loss and test_loss weigh the classes as
        # training did (and as a checkpoint's monitor did)
        return getattr(self.loss_settings, "class_weights", None) == "auto"

    def truth(self, targets: torch.Tensor) -> torch.Tensor:
        return hard_labels(targets)  # a class distribution is scored as its most probable class

    def fits_after_training(self, prediction: Any) -> bool:
        return bool(prediction.fitted_after_training)

    def fit_calibration(
        self, views: torch.Tensor, truth: torch.Tensor, prediction: Any, split: str
    ) -> Calibration:
        return fit_calibration(views, truth, threshold=prediction.decision_threshold, split=split)

    def prepare(self, training_targets: np.ndarray) -> None:
        if getattr(self.loss_settings, "class_weights", None) == "auto":
            counts = np.bincount(np.asarray(training_targets, dtype=np.int64), minlength=self.outputs)
            self.class_weights = inverse_frequency_weights(counts)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, dtype=outputs.dtype, device=outputs.device)
        if targets.ndim == 2:
            return soft_cross_entropy(outputs, targets, self.label_smoothing, weight)
        return F.cross_entropy(outputs, targets, weight=weight, label_smoothing=self.label_smoothing)

    def training_score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.detach().argmax(dim=-1) == hard_labels(targets)).float().mean()

    def scores(self, views: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return (views / temperature).softmax(dim=-1).mean(dim=0)

    def scored_outputs(self, views: torch.Tensor, scores: torch.Tensor, calibrated: bool) -> torch.Tensor:
        if len(views) == 1 and not calibrated:
            return views[0]
        return scores.clamp_min(1e-12).log()  # log-probabilities: the loss of the probabilities predict gives

    def decide(self, scores: torch.Tensor, calibration: Any = None) -> torch.Tensor:
        if calibration is not None:
            return calibration.predict(scores)
        return scores.argmax(dim=-1)

    def uncertainty(self, draws: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = draws.mean(dim=0)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
        return {"probs": probs, "std": draws.std(dim=0), "entropy": entropy}

    def metrics(self, prefix: str) -> MetricCollection:
        # validate_args=False: the argument checks read values back from the device (a sync on every
        # step); labels are already checked by the data module and the loss.
        n = self.outputs
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(n, average="micro", validate_args=False),
                "f1": MulticlassF1Score(n, average="macro", validate_args=False),
            },
            prefix=prefix,
        )

    def update(
        self,
        metrics: MetricCollection,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        decided: torch.Tensor | None,
    ) -> None:
        metrics.update((outputs if decided is None else decided).detach(), hard_labels(targets))


class MultiLabel(Task):
    """Several labels per image, each present or not: a sigmoid per label, binary cross-entropy (with the
    loss's per-label positive weights), and per-label decision thresholds fitted on the validation split
    after training (:func:`~transferkit.models.calibration.fit_label_thresholds`; 0.5 until then).

    Targets are ``(B, L)`` 0/1 floats. ``val_map`` is the mean over labels of the average precision (the
    area under each label's precision-recall curve), ``val_auroc`` the mean ROC AUC, both independent of
    any threshold; ``val_f1_macro`` (mean of the labels' F1) and ``val_f1_micro`` (F1 over every decision)
    count the labels the thresholds give."""

    kind = "multi_label"
    metric_names = ("map", "f1_macro", "f1_micro", "auroc")
    higher_is_better = {"map": True, "f1_macro": True, "f1_micro": True, "auroc": True}
    train_metric = "train_label_acc"

    def __init__(self, names: Sequence[str], loss: Any = None, label_smoothing: float = 0.0) -> None:
        super().__init__(names, loss, label_smoothing)
        weights = getattr(loss, "pos_weight", None)
        self.pos_weight: list[float] | None = list(weights) if isinstance(weights, tuple) else None

    def wants_training_targets(self, stage: str) -> bool:
        return getattr(self.loss_settings, "pos_weight", None) == "auto"

    def fits_after_training(self, prediction: Any) -> bool:
        return True  # the per-label thresholds

    def fit_calibration(
        self, views: torch.Tensor, truth: torch.Tensor, prediction: Any, split: str
    ) -> Calibration:
        return fit_label_thresholds(self.scores(views).numpy(), truth.numpy(), split=split)

    def prepare(self, training_targets: np.ndarray) -> None:
        if getattr(self.loss_settings, "pos_weight", None) == "auto":
            targets = np.asarray(training_targets)
            self.pos_weight = positive_weights((targets > 0.5).sum(axis=0), len(targets))

    def check_targets(self, targets: torch.Tensor) -> None:
        if targets.ndim != 2 or targets.shape[-1] != self.outputs:
            raise ConfigError(
                f"a multi-label model of {self.outputs} labels takes targets of shape (batch, {self.outputs}) "
                f"(0 or 1 per label), got {tuple(targets.shape)}: give it data whose data.target.kind is "
                "multi_label."
            )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.check_targets(targets)
        weight = None
        if self.pos_weight is not None:
            weight = torch.tensor(self.pos_weight, dtype=outputs.dtype, device=outputs.device)
        return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), pos_weight=weight)

    def training_score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((outputs.detach() >= 0) == (targets >= 0.5)).float().mean()

    def scores(self, views: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return views.sigmoid().mean(dim=0)

    def thresholds(self, calibration: Any = None) -> list[float]:
        fitted = getattr(calibration, "label_thresholds", None)
        return list(fitted) if fitted is not None else [0.5] * self.outputs

    def decide(self, scores: torch.Tensor, calibration: Any = None) -> torch.Tensor:
        thresholds = torch.tensor(self.thresholds(calibration), dtype=scores.dtype, device=scores.device)
        return (scores >= thresholds).long()

    def scored_outputs(self, views: torch.Tensor, scores: torch.Tensor, calibrated: bool) -> torch.Tensor:
        if len(views) == 1:
            return views[0]
        return torch.logit(scores.clamp(1e-6, 1 - 1e-6))  # the loss of the averaged probabilities predicted

    def metrics(self, prefix: str) -> MetricCollection:
        n = self.outputs
        return MetricCollection(
            {
                "map": MultilabelAveragePrecision(n, average="macro", validate_args=False),
                "f1_macro": MultilabelF1Score(n, average="macro", validate_args=False),
                "f1_micro": MultilabelF1Score(n, average="micro", validate_args=False),
                "auroc": MultilabelAUROC(n, average="macro", validate_args=False),
            },
            prefix=prefix,
            compute_groups=False,
        )

    def update(
        self,
        metrics: MetricCollection,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        decided: torch.Tensor | None,
    ) -> None:
        probs = outputs.detach().sigmoid() if decided is None else outputs.detach()
        truth = (targets.detach() >= 0.5).long()
        # F1 counts decisions: the fitted thresholds at test, 0.5 before (torchmetrics thresholds at 0.5)
        chosen = (probs >= 0.5).long() if decided is None else decided.detach()
        for name, metric in metrics.items(keep_base=True):
            metric.update(chosen.float() if "f1" in name else probs, truth)


class Regression(Task):
    """A number (or several) per image: a linear output per target, trained with MSE or Huber loss on targets
    standardised on the training split (their mean and standard deviation are buffers, so they travel in
    the checkpoint's weights), un-standardised for everything a user reads. Targets are ``(B, T)`` floats."""

    kind = "regression"
    metric_names = ("mae", "rmse", "r2")
    higher_is_better = {"mae": False, "rmse": False, "r2": True}
    train_metric = "train_mae"

    def __init__(self, names: Sequence[str], loss: Any = None, label_smoothing: float = 0.0) -> None:
        super().__init__(names, loss, label_smoothing)
        n = len(self.names)
        self.register_buffer("target_mean", torch.zeros(n))
        self.register_buffer("target_std", torch.ones(n))
        # 0 until the training split's moments are set: a model used before that predicts standardised values
        self.register_buffer("scaling_fitted", torch.zeros((), dtype=torch.bool))

    def wants_training_targets(self, stage: str) -> bool:
        # a fit standardises on its training split; validate and test keep a checkpoint's own scaling
        return stage == "fit" or not bool(self.scaling_fitted)

    def prepare(self, training_targets: np.ndarray) -> None:
        targets = np.asarray(training_targets, dtype=np.float64).reshape(len(training_targets), -1)
        if len(targets) == 0:
            raise ConfigError("regression targets are standardised on the training split, which is empty.")
        mean = targets.mean(axis=0)
        std = targets.std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)  # a constant target: nothing to scale
        self.target_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.target_std.copy_(torch.as_tensor(std, dtype=torch.float32))
        self.scaling_fitted.fill_(True)

    def standardise(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets in standard deviations from the training mean, in float32 (a bf16 target would be rounded
        before its mean is taken off: 300 +- 2 K in steps of 2)."""
        return (targets.float() - self.target_mean.float()) / self.target_std.float()

    def values(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs ``(..., T)`` in the targets' own units, in float32."""
        return outputs.float() * self.target_std.float() + self.target_mean.float()

    def check_targets(self, targets: torch.Tensor) -> None:
        if targets.ndim != 2 or targets.shape[-1] != self.outputs or not targets.is_floating_point():
            raise ConfigError(
                f"a regression model of {self.outputs} targets takes float targets of shape (batch, "
                f"{self.outputs}), got {tuple(targets.shape)} {targets.dtype}: give it data whose "
                "data.target.kind is regression."
            )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.check_targets(targets)
        scaled = self.standardise(targets)  # float32, whatever the precision the head ran in
        settings = self.loss_settings
        if getattr(settings, "regression", "mse") == "huber":
            return F.huber_loss(outputs.float(), scaled, delta=float(settings.huber_delta))
        return F.mse_loss(outputs.float(), scaled)

    def training_score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (self.values(outputs.detach()) - targets).abs().mean()

    def scores(self, views: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.values(views).mean(dim=0)

    def decide(self, scores: torch.Tensor, calibration: Any = None) -> torch.Tensor:
        return scores

    def uncertainty(self, draws: torch.Tensor) -> dict[str, torch.Tensor]:
        spread = draws.std(dim=0)
        return {"probs": draws.mean(dim=0), "std": spread, "entropy": spread.mean(dim=-1)}

    def metrics(self, prefix: str) -> MetricCollection:
        return MetricCollection(
            {
                "mae": MeanAbsoluteError(),
                "rmse": MeanSquaredError(squared=False),  # over every target's errors
                "r2": R2Score(multioutput="uniform_average"),
            },
            prefix=prefix,
            compute_groups=False,
        )

    def update(
        self,
        metrics: MetricCollection,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        decided: torch.Tensor | None,
    ) -> None:
        values = self.values(outputs.detach()) if decided is None else decided.detach()
        truth = targets.detach().to(values.dtype)
        for name, metric in metrics.items(keep_base=True):
            if name.endswith("r2"):  # one R^2 per target, averaged
                metric.update(*((values[:, 0], truth[:, 0]) if self.outputs == 1 else (values, truth)))
            else:
                metric.update(values.flatten(), truth.flatten())

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "mean": [float(v) for v in self.target_mean],
            "std": [float(v) for v in self.target_std],
            "standardised_on": "train" if bool(self.scaling_fitted) else None,
        }


_TASKS: dict[str, type[Task]] = {
    "single_label": SingleLabel,
    "multi_label": MultiLabel,
    "regression": Regression,
}


def create_task(kind: str, names: Sequence[str], loss: Any = None, label_smoothing: float = 0.0) -> Task:
    """The task of ``kind`` (``single_label``, ``multi_label``, ``regression``) for outputs named ``names``."""
    if kind not in _TASKS:
        raise ConfigError(f"unknown target kind {kind!r}; choose one of {', '.join(TARGET_KINDS)}.")
    return _TASKS[kind](names, loss, label_smoothing)


def check_same_kind(model: Any, datamodule: Any) -> None:
    """Refuse a model and data whose kinds of target differ (``model.settings.target`` against
    ``datamodule.target_kind``), or whose outputs are named differently, before anything is trained or scored:
    class indices read as numbers, or 0/1 labels read as class distributions, would give figures that mean
    nothing. Objects that do not say their kind are let through."""
    kind = getattr(datamodule, "target_kind", None)
    settings = getattr(model, "settings", None)
    if kind is None or settings is None:
        return
    if kind != settings.target:
        raise ConfigError(
            f"the data's targets are {kind} (data.target.kind) and the model is {settings.target} "
            f"(its target): build the model with target={kind!r}, or load data of its kind."
        )
    names = getattr(datamodule, "class_names", None)
    own = getattr(model, "class_names", None)
    if kind != "single_label" and names is not None and own is not None and list(names) != list(own):
        what = "labels" if kind == "multi_label" else "targets"
        raise ConfigError(
            f"the data's {what} {list(names)} are not the model's {list(own)}: give them the same."
        )
