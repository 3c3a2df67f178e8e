"""transferkit: fine-tune pretrained image models on small real datasets, offline.

>>> import transferkit as tk
>>> backbone = tk.create_backbone("tf_efficientnet_lite0", pretrained="bundled")
>>> model = tk.TransferClassifier(num_classes=2, freeze_schedule=tk.FreezeSchedule(frozen_epochs=2))
"""

import os

# Albumentations asks PyPI for its latest version at import; offline machines wait on that for nothing
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from transferkit.averaging import EMA  # noqa: E402
from transferkit.backbones import Backbone, BackboneError, HubUnreachableError, create_backbone  # noqa: E402
from transferkit.data import ImageDataModule  # noqa: E402
from transferkit.diagnostics import (  # noqa: E402
    GradientHealth,
    GradientHealthReport,
    LayerHealth,
    NonFiniteLossError,
    NonFiniteLossGuard,
    diagnose,
)
from transferkit.export import export_checkpoint  # noqa: E402
from transferkit.finetuning import FreezeSchedule  # noqa: E402
from transferkit.heads import ClassifierHead  # noqa: E402
from transferkit.module import TransferClassifier  # noqa: E402
from transferkit.report import write_run_report  # noqa: E402
from transferkit.serving import CheckpointError, CheckpointMismatchError, load_for_inference  # noqa: E402
from transferkit.trainer import Trainer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "Backbone",
    "BackboneError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ClassifierHead",
    "FreezeSchedule",
    "GradientHealth",
    "GradientHealthReport",
    "HubUnreachableError",
    "ImageDataModule",
    "LayerHealth",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "Trainer",
    "TransferClassifier",
    "create_backbone",
    "diagnose",
    "export_checkpoint",
    "load_for_inference",
    "write_run_report",
]
