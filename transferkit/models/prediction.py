"""Predicting with a trained classifier: test-time augmentation and Monte Carlo dropout.

Both work on any model with ``features(images)`` (images ``(B, 3, H, W)`` to pooled features, or
features passed through) and ``head(features)`` (to logits), as :class:`~transferkit.TransferClassifier` has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from transferkit.errors import ConfigError
from transferkit.models.tasks import SingleLabel

__all__ = [
    "TTA_VIEWS",
    "Predicting",
    "check_prediction_settings",
    "predict_mc_dropout",
    "predict_proba",
    "view_logits",
]


def _hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _vflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-2)


def _rot90(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(x, k, dims=(-2, -1))


# test-time augmentation: views of a batch (B, 3, H, W) whose probabilities are averaged
TTA_VIEWS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": [lambda x: x],
    "hflip": [lambda x: x, _hflip],
    "flips": [lambda x: x, _hflip, _vflip, lambda x: _vflip(_hflip(x))],
    "d4": [lambda x, k=k: _rot90(x, k) for k in range(4)]
    + [lambda x, k=k: _rot90(_hflip(x), k) for k in range(4)],
}


def check_prediction_settings(tta: str, mc_dropout: int, dropout: float) -> None:
    """Refuse an unknown ``tta``, a number of MC-dropout passes that measures no spread, or MC dropout
    on a head without dropout."""
    if tta not in TTA_VIEWS:
        raise ConfigError(f"unknown tta '{tta}'; choose one of {', '.join(TTA_VIEWS)}.")
    if mc_dropout < 0 or mc_dropout == 1:
        raise ConfigError(
            f"mc_dropout is the number of stochastic passes (0 = off, >= 2 to measure a spread), got {mc_dropout}."
        )
    if mc_dropout and dropout == 0:
        raise ConfigError("mc_dropout needs dropout in the head; set model.head.dropout > 0 (e.g. 0.2).")


def predict_proba(
    model: Any, images: torch.Tensor, tta: str = "none", temperature: float = 1.0
) -> torch.Tensor:
    """Class probabilities ``(B, num_classes)``, ``softmax(model(view) / temperature)`` averaged over the
    ``tta`` views."""
    return (view_logits(model, images, tta) / temperature).softmax(dim=-1).mean(dim=0)


def view_logits(model: Any, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits ``(V, B, C)`` of ``model`` on each of the ``tta`` views of images ``(B, 3, H, W)``."""
    check_prediction_settings(tta, 0, 0.0)
    return torch.stack([model(view(images)) for view in TTA_VIEWS[tta]])


@torch.no_grad()
def predict_mc_dropout(
    model: Any, images: torch.Tensor, samples: int = 20, tta: str = "none", temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """Monte Carlo dropout (Gal & Ghahramani, 2016): ``samples`` forward passes of the head with dropout
    active, the backbone and every BatchNorm in eval mode, for each ``tta`` view; the logits are divided
    by ``temperature`` (a calibrated model's) before the softmax.

    Returns ``probs`` (mean, ``(B, C)``), ``std`` (spread of each class probability, ``(B, C)``) and
    ``entropy`` (of the mean, ``(B,)``; high = uncertain). The backbone runs once per view. A model with a
    ``task`` (:mod:`~transferkit.models.tasks`) is scored by it: label probabilities or values, and their
    mean spread as the uncertainty.
    """
    if samples < 2:
        raise ConfigError(f"MC dropout needs at least 2 samples, got {samples}.")
    check_prediction_settings(tta, 0, 0.0)
    dropouts = [m for m in model.head.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if not dropouts:
        raise ConfigError("MC dropout needs dropout in the head; this model was built with dropout=0.")
    task = getattr(model, "task", None) or SingleLabel([])
    was_training = model.training
    model.eval()
    try:
        for m in dropouts:
            m.train()
        draws = []
        for view in TTA_VIEWS[tta]:
            features = model.features(view(images))
            draws += [task.scores(model.head(features)[None], temperature) for _ in range(samples)]
    finally:
        model.train(was_training)
    return task.uncertainty(torch.stack(draws))


class Predicting:
    """The prediction methods of a classifier module with ``settings.prediction`` (its ``tta`` and
    ``mc_dropout``, :class:`~transferkit.models.settings.PredictionSettings`) and a ``calibration``
    (temperature and decision threshold, :class:`~transferkit.models.calibration.Calibration`):
    ``predict_step`` for Lightning's ``predict``, and the same for a batch of images in hand."""

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Class probabilities ``(B, num_classes)`` (with the module's test-time augmentation), label
        probabilities ``(B, L)`` or values ``(B, T)`` in the targets' units, as the model's task gives them;
        with ``mc_dropout`` a dict of the mean ``probs``, their ``std`` and an uncertainty per image
        (``entropy``)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        if self.settings.prediction.mc_dropout:
            return self.predict_mc_dropout(images, self.settings.prediction.mc_dropout)
        return self.predict_proba(images)

    def predict_proba(self, images: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)`` for images ``(B, 3, H, W)``, averaged over the
        test-time augmentation views (``tta``: ``none``, ``hflip``, ``flips``, ``d4``; default: the
        module's own), with the calibrated temperature."""
        tta = tta or self.settings.prediction.tta
        return self.task.scores(view_logits(self, images, tta), self.calibration.temperature)

    def view_logits(self, images: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """Raw logits ``(V, B, C)`` of each test-time augmentation view of images ``(B, 3, H, W)``
        (``V = 1`` without TTA), before the temperature."""
        return view_logits(self, images, tta or self.settings.prediction.tta)

    def predict_labels(self, probs: torch.Tensor) -> torch.Tensor:
        """The prediction from :meth:`predict_proba`'s scores: class indices ``(B,)`` (the stored decision
        threshold for two classes when there is one, else the most probable class), 0/1 labels ``(B, L)``
        (each label's stored threshold), or the values themselves."""
        return self.task.decide(probs, self.calibration)

    def predict_mc_dropout(
        self, images: torch.Tensor, samples: int = 20, tta: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Monte Carlo dropout over ``samples`` passes (:func:`predict_mc_dropout`): mean ``probs``
        ``(B, C)``, their ``std`` ``(B, C)`` and the predictive ``entropy`` ``(B,)``."""
        tta = tta or self.settings.prediction.tta
        return predict_mc_dropout(self, images, samples, tta, self.calibration.temperature)
