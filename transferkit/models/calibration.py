"""Probabilities that mean what they say: temperature scaling, a decision threshold, and how to measure both.

A network trained with cross-entropy is usually over-confident: of the images it calls 95 % sure, fewer
than 95 % are right. Temperature scaling (Guo et al., 2017) divides the logits by one number ``T`` fitted on
the validation split to minimise its negative log-likelihood; it changes no ranking (accuracy stays the
same), only how sure the probabilities are. For two classes, a decision threshold on the positive class's
probability, chosen on validation, trades one kind of error for the other.

:class:`Calibration` is what a model carries (``TransferClassifier.calibration``), what a checkpoint stores
(its ``transferkit`` section) and what ``predict``, ``predict-images`` and ``export`` apply.
:func:`fit_calibration` fits one from validation logits; the other functions compute what the run report
and ``interpret`` draw (reliability bins, expected calibration error, ROC and precision-recall curves).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from transferkit.errors import ConfigError

__all__ = [
    "THRESHOLD_METRICS",
    "Calibration",
    "choose_threshold",
    "expected_calibration_error",
    "MIN_THRESHOLD_POSITIVES",
    "fit_calibration",
    "fit_label_thresholds",
    "fit_temperature",
    "negative_log_likelihood",
    "reliability_bins",
    "roc_pr_curves",
]

THRESHOLD_METRICS = ("accuracy", "f1")
ThresholdMetric = Literal["accuracy", "f1"]


@dataclass
class Calibration:
    """How a model's logits become probabilities and a predicted class.

    Attributes:
        temperature: the logits are divided by it before the softmax (``1.0`` = as trained).
        threshold: two classes only: class 1 is predicted when its probability is ``>= threshold``
            (``None`` = the most probable class, i.e. 0.5).
        threshold_metric: what the threshold maximised on validation (``accuracy`` or ``f1``).
        fitted_on: where it was fitted, e.g. ``val (296 images)``; ``None`` = not fitted.
        nll_before / nll_after: the validation negative log-likelihood at ``T = 1`` and at ``temperature``.
        label_thresholds: multi-label only: label ``i`` is predicted when its probability is
            ``>= label_thresholds[i]``, each fitted on validation to maximise that label's F1
            (:func:`fit_label_thresholds`); ``None`` = 0.5 for every label.
        label_positives: multi-label only: each label's positives in the split the thresholds were fitted on.
        label_fitted: multi-label only: whether each label's threshold was fitted; a label with fewer than
            :data:`MIN_THRESHOLD_POSITIVES` positives (or as few negatives) there keeps 0.5.
    """

    temperature: float = 1.0
    threshold: float | None = None
    threshold_metric: str | None = None
    fitted_on: str | None = None
    nll_before: float | None = None
    nll_after: float | None = None
    label_thresholds: list[float] | None = None
    label_positives: list[int] | None = None
    label_fitted: list[bool] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature!r}.")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"the decision threshold must lie in (0, 1), got {self.threshold!r}.")
        if self.label_thresholds is not None and not all(0.0 < t < 1.0 for t in self.label_thresholds):
            raise ConfigError(f"per-label thresholds must lie in (0, 1), got {self.label_thresholds!r}.")

    @property
    def fitted(self) -> bool:
        return self.fitted_on is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for a checkpoint (``weights_only=True``) or JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Calibration:
        return cls(**{k: v for k, v in (values or {}).items() if k in cls.__dataclass_fields__})

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``softmax(logits / temperature)`` over the last dimension."""
        return (logits / self.temperature).softmax(dim=-1)

    def predict(self, probs: torch.Tensor) -> torch.Tensor:
        """Class indices ``(B,)`` from probabilities ``(B, C)``: the threshold for two classes when set,
        else the most probable class."""
        if self.threshold is not None and probs.shape[-1] == 2:
            return (probs[..., 1] >= self.threshold).long()
        return probs.argmax(dim=-1)

    def describe(self) -> str:
        if self.label_thresholds is not None:
            return f"per-label thresholds fitted on {self.fitted_on} (F1 of each label): " + ", ".join(
                f"{t:.3f}"
                + ("" if self.label_kept(i) else " (0.5 kept: too few validation positives or negatives)")
                for i, t in enumerate(self.label_thresholds)
            )
        if not self.fitted:
            return "not calibrated (temperature 1, most probable class)"
        text = f"temperature {self.temperature:.3f} fitted on {self.fitted_on}"
        if self.nll_before is not None and self.nll_after is not None:
            text += f" (NLL {self.nll_before:.4f} -> {self.nll_after:.4f})"
        if self.threshold is not None:
            text += f"; class 1 when p >= {self.threshold:.3f} (maximises validation {self.threshold_metric})"
        return text

    def label_kept(self, label: int) -> bool:
        """Multi-label: whether label ``label``'s threshold was fitted (``False``: it kept 0.5 for want of
        validation positives or negatives)."""
        return self.label_fitted is None or bool(self.label_fitted[label])


# a multi-label threshold is fitted only on a label with at least this many validation positives and negatives
MIN_THRESHOLD_POSITIVES = 5


def fit_label_thresholds(probs: np.ndarray, truth: np.ndarray, split: str = "val") -> Calibration:
    """Multi-label: one threshold per label on its probability, each maximising that label's F1 on this
    split (:func:`choose_threshold`); a label with fewer than :data:`MIN_THRESHOLD_POSITIVES` positives or
    negatives here keeps 0.5 (a threshold fitted on two positives says more about them than about the label).

    Example:
        >>> p = np.array([[0.1, 0.9]] * 5 + [[0.3, 0.2]] * 5)
        >>> y = np.array([[0, 1]] * 5 + [[1, 0]] * 5)
        >>> fit_label_thresholds(p, y).label_thresholds
        [0.2, 0.55]
    """
    probs = np.asarray(probs, dtype=np.float64)
    truth = (np.asarray(truth) >= 0.5).astype(int)
    if probs.ndim != 2 or probs.shape != truth.shape:
        raise ValueError(f"probs and truth must both be (N, labels), got {probs.shape} and {truth.shape}.")
    thresholds, positives, fitted = [], [], []
    for label in range(probs.shape[1]):
        y = truth[:, label]
        found = int(y.sum())
        enough = min(found, len(y) - found) >= MIN_THRESHOLD_POSITIVES
        positives.append(found)
        fitted.append(enough)
        thresholds.append(choose_threshold(probs[:, label], y, "f1")[0] if enough else 0.5)
    return Calibration(
        fitted_on=f"{split} ({len(probs)} images)",
        label_thresholds=[float(t) for t in thresholds],
        label_positives=positives,
        label_fitted=fitted,
    )


def _views(logits: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` or ``(V, N, C)`` (one slice per test-time augmentation view) -> ``(V, N, C)`` float64."""
    logits = torch.as_tensor(logits).detach().double().cpu()
    if logits.ndim == 2:
        logits = logits.unsqueeze(0)
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, C) or (views, N, C), got shape {tuple(logits.shape)}.")
    return logits


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean NLL of ``labels`` ``(N,)`` under the views' averaged ``softmax(logits / temperature)``."""
    views = _views(logits)
    probs = (views / temperature).softmax(dim=-1).mean(dim=0)
    labels = torch.as_tensor(labels).long().cpu()
    return float(-probs.clamp_min(1e-12).log().gather(1, labels[:, None]).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature that minimises the NLL of ``labels`` ``(N,)`` given ``logits`` ``(N, C)`` (or
    ``(V, N, C)``: the probabilities of V test-time views are averaged, as the model predicts).

    L-BFGS on ``log T`` (so ``T`` stays positive). The result is checked: if it does not lower the NLL
    below ``T = 1`` (e.g. a degenerate split), ``1.0`` is returned.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> labels = torch.randint(0, 3, (500,), generator=g)
        >>> logits = 4.0 * (torch.nn.functional.one_hot(labels, 3) + torch.randn(500, 3, generator=g))
        >>> fit_temperature(logits, labels) > 1.5  # over-confident logits get a temperature above 1
        True
    """
    views = _views(logits)
    labels = torch.as_tensor(labels).long().cpu()
    if len(labels) == 0:
        raise ConfigError("fitting a temperature needs validation images; the split is empty.")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        probs = (views / log_t.exp()).softmax(dim=-1).mean(dim=0)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or negative_log_likelihood(
        views, labels, temperature
    ) > negative_log_likelihood(views, labels, 1.0):
        return 1.0
    return temperature


def choose_threshold(
    positive_probs: np.ndarray, labels: np.ndarray, metric: ThresholdMetric = "accuracy"
) -> tuple[float, float]:
    """The threshold on class 1's probability that maximises ``metric`` (``accuracy`` or ``f1`` of class 1)
    on these labels, and the score it reaches. Candidates are the midpoints between distinct sorted
    probabilities; among equal scores the one nearest 0.5 wins (the least surprising).

    Example:
        >>> choose_threshold(np.array([0.1, 0.3, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        (0.325, 1.0)
    """
    if metric not in THRESHOLD_METRICS:
        raise ConfigError(
            f"decision_threshold must be one of {', '.join(THRESHOLD_METRICS)}, got {metric!r}."
        )
    p = np.asarray(positive_probs, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    if len(p) == 0 or len(np.unique(y)) < 2:
        raise ConfigError(
            "choosing a decision threshold needs validation images of both classes; this split has "
            f"{len(p)} images of classes {sorted(set(y.tolist()))}."
        )
    levels = np.unique(p)
    candidates = np.concatenate([[levels[0] / 2], (levels[:-1] + levels[1:]) / 2, [(levels[-1] + 1) / 2]])
    candidates = candidates[(candidates > 0) & (candidates < 1)]
    best = (-1.0, 0.0, 0.5)
    for t in candidates:
        predicted = p >= t
        if metric == "accuracy":
            score = float((predicted == y).mean())
        else:
            tp = float((predicted & (y == 1)).sum())
            denominator = float(predicted.sum() + (y == 1).sum())
            score = 2 * tp / denominator if denominator else 0.0
        key = (score, -abs(t - 0.5))
        if key > (best[0], -abs(best[2] - 0.5)):
            best = (score, -abs(t - 0.5), float(t))
    return round(best[2], 6), best[0]


def fit_calibration(
    logits: torch.Tensor,
    labels: torch.Tensor,
    threshold: ThresholdMetric | None = None,
    split: str = "val",
) -> Calibration:
    """A :class:`Calibration` fitted on one split's ``logits`` ``(N, C)`` or ``(V, N, C)`` and hard
    ``labels`` ``(N,)``: the temperature always, a decision threshold for two classes when ``threshold``
    names the metric to maximise."""
    views = _views(logits)
    labels = torch.as_tensor(labels).long().cpu()
    temperature = fit_temperature(views, labels)
    calibration = Calibration(
        temperature=temperature,
        fitted_on=f"{split} ({len(labels)} images)",
        nll_before=round(negative_log_likelihood(views, labels, 1.0), 6),
        nll_after=round(negative_log_likelihood(views, labels, temperature), 6),
    )
    if threshold is not None:
        if views.shape[-1] != 2:
            raise ConfigError(
                f"a decision threshold is for two classes; this model has {views.shape[-1]}. "
                "Leave model.prediction.decision_threshold unset."
            )
        probs = (views / temperature).softmax(dim=-1).mean(dim=0)[:, 1].numpy()
        calibration.threshold, _ = choose_threshold(probs, labels.numpy(), threshold)
        calibration.threshold_metric = threshold
    return calibration


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Confidence (the top class's probability) against accuracy in ``bins`` equal-width bins of
    confidence: ``edges`` ``(bins + 1,)``, and per bin ``confidence`` (mean), ``accuracy`` and ``count``
    (``nan`` where a bin is empty). What a reliability diagram draws."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins) / count
    return {"edges": edges, "confidence": mean_conf, "accuracy": accuracy, "count": count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over ``bins`` equal-width bins
    (Naeini et al., 2015; Guo et al., 2017's 15 bins). 0 = perfectly calibrated.

    Example:
        >>> expected_calibration_error(np.array([[0.9, 0.1]] * 10), np.array([0] * 9 + [1]))
        0.0
    """
    table = reliability_bins(probs, labels, bins)
    filled = table["count"] > 0
    if not filled.any():
        return float("nan")
    gaps = np.abs(table["confidence"][filled] - table["accuracy"][filled])
    return float(round((gaps * table["count"][filled]).sum() / table["count"].sum(), 12))


def roc_pr_curves(positive_probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Two classes: the ROC curve (``fpr``, ``tpr``, ``roc_auc``) and the precision-recall curve
    (``precision``, ``recall``, ``average_precision``) of class 1's probability (scikit-learn's)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    y = np.asarray(labels).astype(int)
    p = np.asarray(positive_probs, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ConfigError("ROC and precision-recall curves need images of both classes.")
    fpr, tpr, _ = roc_curve(y, p)
    precision, recall, _ = precision_recall_curve(y, p)
    return {
        "fpr": fpr,
        "tpr": tpr,
        "roc_auc": float(roc_auc_score(y, p)),
        "precision": precision,
        "recall": recall,
        "average_precision": float(average_precision_score(y, p)),
    }
