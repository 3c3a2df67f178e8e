"""Fitting a trained model's calibration (temperature, decision threshold) on its validation split.

:func:`split_outputs` runs a model over one split of a data module and keeps the raw logits of every
test-time augmentation view; :func:`calibrate` fits a :class:`~transferkit.models.calibration.Calibration`
on them and gives it to the model. :meth:`transferkit.Trainer.finetune` does this after training when the
model asks for it (``calibrate: true`` or ``decision_threshold``) and stores the result in the best
checkpoint, so ``test``, ``predict``, ``predict-images`` and ``export`` use it.
"""

from __future__ import annotations

from typing import Any

import torch

from transferkit.errors import ConfigError
from transferkit.models.calibration import Calibration, ThresholdMetric

__all__ = ["calibrate", "split_outputs"]


@torch.no_grad()
def split_outputs(
    model: Any, datamodule: Any, split: str = "val", device: Any = None, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits ``(V, N, C)`` (one slice per view of the model's test-time augmentation, no temperature)
    and what they are scored against (hard labels ``(N,)``; 0/1 labels or numbers ``(N, K)`` for the other
    kinds of target) of ``split`` (``val`` or ``test``), in the split's order, through the eval
    pipeline. The data module must be set up; the model is left as it was found."""
    datasets = getattr(datamodule, "datasets", None) or {}
    if split not in datasets:
        raise ConfigError(
            f"the data module has no '{split}' split set up (it has {sorted(datasets) or 'none'}); "
            f"call datamodule.setup('fit') first, or keep a validation split (data.split.val_fraction > 0)."
        )
    loader = torch.utils.data.DataLoader(
        datasets[split], batch_size=batch_size, num_workers=_workers(datamodule)
    )
    was_training = model.training
    original = next(model.parameters()).device
    device = torch.device(device) if device is not None else original
    model.to(device).eval()
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for images, targets in loader:
            images = images.to(device)
            logits.append(model.view_logits(images).float().cpu())
            labels.append(model.task.truth(targets).cpu())
    finally:
        model.to(original).train(was_training)
    if not logits:
        raise ConfigError(f"the '{split}' split is empty; there is nothing to fit or score on.")
    return torch.cat(logits, dim=1), torch.cat(labels)


def calibrate(
    model: Any, datamodule: Any, threshold: ThresholdMetric | None = None, split: str = "val"
) -> Calibration:
    """Fit ``model``'s temperature (and, for two classes with ``threshold`` = ``accuracy`` or ``f1``, or the
    model's own ``decision_threshold``, the decision threshold) on ``split``, set it as
    ``model.calibration`` and return it. Accuracy without a threshold is unchanged; probabilities become
    as sure as the model is right on that split. A multi-label model fits one threshold per label instead
    (each maximising the label's F1, :func:`~transferkit.models.calibration.fit_label_thresholds`).

    Example:
        >>> import tempfile, transferkit as tk
        >>> dm = tk.ImageDataModule(source="digits", pipeline={"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3},
        ...                         loader={"num_workers": 0}, split={"max_samples": 200}, cache={"dir": tempfile.mkdtemp()})
        >>> dm.setup("fit")
        >>> model = tk.TransferClassifier(num_classes=10, backbone="test_efficientnet", pretrained=False)
        >>> calibration = calibrate(model, dm)
        >>> calibration.fitted_on, calibration.nll_after <= calibration.nll_before
        ('val (24 images)', True)
    """
    prediction = model.settings.prediction
    if threshold is not None and model.settings.target != "single_label":
        raise ConfigError(
            f"threshold={threshold!r} chooses class 1's threshold for two classes; this model is "
            f"{model.settings.target}: leave it out (a multi-label model fits one threshold per label by itself)."
        )
    if threshold is not None:
        prediction = prediction.replace(decision_threshold=threshold)
    logits, labels = split_outputs(model, datamodule, split)
    calibration = model.task.fit_calibration(logits, labels, prediction, split)
    model.calibration = calibration
    return calibration


def _workers(datamodule: Any) -> int:
    """The data module's loader workers (an :class:`~transferkit.ImageDataModule`'s ``loader.num_workers``)."""
    settings = getattr(datamodule, "settings", None)
    return settings.loader.num_workers if hasattr(settings, "loader") else 0
