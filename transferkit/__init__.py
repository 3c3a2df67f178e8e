"""transferkit: fine-tune pretrained image models on small real datasets, offline.

>>> import transferkit as tk
>>> backbone = tk.create_backbone("tf_efficientnet_lite0", pretrained="bundled")
>>> model = tk.TransferClassifier(num_classes=2, freeze_schedule=tk.FreezeSchedule(frozen_epochs=2),
...                               optimizer=tk.OptimizerSettings(lr=3e-4), head={"dropout": 0.3})

The names below are imported when first used, so ``import transferkit`` itself loads neither torch,
Lightning nor matplotlib, and ``python -m transferkit --help`` answers at once.
"""

import os
from typing import TYPE_CHECKING

from transferkit._lazy import lazy_exports

# Albumentations asks PyPI for its latest version at import; offline machines wait on that for nothing
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

if TYPE_CHECKING:
    from transferkit.data.checks import check_images
    from transferkit.data.datamodule import ImageDataModule
    from transferkit.data.stream import pack_stream
    from transferkit.diagnostics.diagnosis import diagnose
    from transferkit.diagnostics.health import GradientHealth
    from transferkit.diagnostics.verdicts import GradientHealthReport, LayerHealth
    from transferkit.errors import (
        BackboneError,
        CheckpointError,
        CheckpointMismatchError,
        ConfigError,
        DatasetError,
        HubUnreachableError,
        ImageReadError,
        NonFiniteLossError,
        TransferKitError,
    )
    from transferkit.finetuning.optim import LRScheduleSettings, OptimizerSettings
    from transferkit.finetuning.schedule import FreezeSchedule
    from transferkit.inference.calibrate import calibrate
    from transferkit.inference.export import export_checkpoint
    from transferkit.inference.loading import load_for_inference
    from transferkit.models.backbones import Backbone, create_backbone
    from transferkit.models.calibration import Calibration
    from transferkit.models.classifier import TransferClassifier
    from transferkit.models.heads import ClassifierHead
    from transferkit.models.settings import (
        ClassifierSettings,
        HeadSettings,
        LossSettings,
        MixingSettings,
        PredictionSettings,
        RegularisationSettings,
        RuntimeSettings,
    )
    from transferkit.reporting import plots
    from transferkit.reporting.interpretation import interpret
    from transferkit.reporting.run_report import write_run_report
    from transferkit.training.averaging import EMA
    from transferkit.training.budget import TimeBudget
    from transferkit.training.feeding import FreezeAndCache
    from transferkit.training.lr_finder import lr_find
    from transferkit.training.nonfinite import NonFiniteLossGuard
    from transferkit.training.precise_bn import PreciseBN
    from transferkit.training.trainer import Trainer
    from transferkit.tuning.augment_search import augment_search
    from transferkit.tuning.auto import auto_plan
    from transferkit.tuning.cross_validation import cross_validate
    from transferkit.tuning.doctor import doctor
    from transferkit.tuning.planning import plan
    from transferkit.tuning.probing import probe

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "check_images": "transferkit.data.checks",
        "ImageDataModule": "transferkit.data.datamodule",
        "pack_stream": "transferkit.data.stream",
        "diagnose": "transferkit.diagnostics.diagnosis",
        "GradientHealth": "transferkit.diagnostics.health",
        "GradientHealthReport": "transferkit.diagnostics.verdicts",
        "LayerHealth": "transferkit.diagnostics.verdicts",
        "BackboneError": "transferkit.errors",
        "CheckpointError": "transferkit.errors",
        "CheckpointMismatchError": "transferkit.errors",
        "ConfigError": "transferkit.errors",
        "DatasetError": "transferkit.errors",
        "HubUnreachableError": "transferkit.errors",
        "ImageReadError": "transferkit.errors",
        "NonFiniteLossError": "transferkit.errors",
        "TransferKitError": "transferkit.errors",
        "lr_find": "transferkit.training.lr_finder",
        "plan": "transferkit.tuning.planning",
        "probe": "transferkit.tuning.probing",
        "auto_plan": "transferkit.tuning.auto",
        "doctor": "transferkit.tuning.doctor",
        "TimeBudget": "transferkit.training.budget",
        "FreezeSchedule": "transferkit.finetuning.schedule",
        "OptimizerSettings": "transferkit.finetuning.optim",
        "LRScheduleSettings": "transferkit.finetuning.optim",
        "ClassifierSettings": "transferkit.models.settings",
        "HeadSettings": "transferkit.models.settings",
        "LossSettings": "transferkit.models.settings",
        "MixingSettings": "transferkit.models.settings",
        "PredictionSettings": "transferkit.models.settings",
        "RegularisationSettings": "transferkit.models.settings",
        "RuntimeSettings": "transferkit.models.settings",
        "calibrate": "transferkit.inference.calibrate",
        "export_checkpoint": "transferkit.inference.export",
        "load_for_inference": "transferkit.inference.loading",
        "Backbone": "transferkit.models.backbones",
        "create_backbone": "transferkit.models.backbones",
        "Calibration": "transferkit.models.calibration",
        "TransferClassifier": "transferkit.models.classifier",
        "ClassifierHead": "transferkit.models.heads",
        "plots": "transferkit.reporting.plots:",
        "interpret": "transferkit.reporting.interpretation",
        "write_run_report": "transferkit.reporting.run_report",
        "augment_search": "transferkit.tuning.augment_search",
        "EMA": "transferkit.training.averaging",
        "FreezeAndCache": "transferkit.training.feeding",
        "cross_validate": "transferkit.tuning.cross_validation",
        "NonFiniteLossGuard": "transferkit.training.nonfinite",
        "PreciseBN": "transferkit.training.precise_bn",
        "Trainer": "transferkit.training.trainer",
    },
)
