"""Feature caches on disk: while the whole backbone (or its bottom) is frozen, its output for an image never changes.

BatchNorm runs in eval mode in frozen groups, so ``backbone(image)`` is a fixed function of the image:
compute it once and train the head on the stored vectors. ``clean`` stores one vector per image (the
eval pipeline); ``augmented`` stores ``views`` vectors per image, each through the train pipeline, and
every epoch draws one of them per image. Head-only epochs then cost a pass over a small matrix instead
of a backbone pass.

A cache file is keyed by everything that changes the features: the architecture, a hash of the weights,
the pipeline (its Albumentations dict, which holds the input size, mean and std), the images (paths,
sizes and modification times, or the pixels of in-memory arrays), the split, the views and the seed.
Any change gives another key, so a stale cache is never read. Files hold plain tensors and load with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.files import atomic_write

__all__ = ["FeatureCache", "backbone_fingerprint", "extract_features", "items_fingerprint"]


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A hash of the architecture (``backbone.name``) and every weight and buffer of ``backbone.model``
    (a :class:`~transferkit.models.backbones.Backbone`, or a :class:`~transferkit.finetuning.trunk.Trunk`,
    whose ``model`` holds its own layers only)."""
    digest = hashlib.sha256(backbone.name.encode())
    for name, tensor in backbone.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def items_fingerprint(items: Sequence[str | np.ndarray]) -> str:
    """A hash of the images: file path, size and modification time, or the pixels of an array."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, np.ndarray):
            digest.update(np.ascontiguousarray(item).tobytes())
        else:
            stat = os.stat(item)
            digest.update(f"{item}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: DataLoader, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Outputs ``(N, ...)`` of every image the loader yields, in order, in eval mode, stored as ``dtype``
    (pooled features of a backbone, feature maps of a trunk)."""
    modes = {module: module.training for module in backbone.modules()}
    device = next(backbone.parameters()).device  # the trainer's device (a GPU when training on one)
    for module in modes:
        module.training = False
    try:
        chunks = [backbone(images.to(device, non_blocking=True)).to("cpu", dtype) for images, _ in loader]
    finally:
        for module, training in modes.items():  # each module's own mode back (a trunk's are the model's)
            module.training = training
    return torch.cat(chunks)


class FeatureCache:
    """Backbone features on disk, one file per (split, key).

    Args:
        directory: where the files live (created when first written).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(
        backbone: nn.Module,
        transform: A.Compose,
        items: Sequence[str | np.ndarray],
        split: str,
        views: int,
        seed: int,
        decoding: str | None = None,
    ) -> str:
        parts: dict[str, Any] = {
            "backbone": backbone.name,
            "weights": backbone_fingerprint(backbone),
            "pipeline": A.to_dict(transform),
            "items": items_fingerprint(items),
            "split": split,
            "views": views,
            "seed": seed,
        }
        if decoding is not None:  # reduced-scale JPEGs, or the decoded-image cache: (slightly) other pixels
            parts["decoding"] = decoding
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, split: str, key: str) -> Path:
        return self.directory / f"{split}-{key[:20]}.pt"

    def load(self, split: str, key: str) -> torch.Tensor | None:
        """The cached ``(views, N, F)`` features for ``key``, or ``None`` if absent or for another key."""
        path = self.path(split, key)
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a partial or foreign file is recomputed, never trusted
            return None
        if not isinstance(stored, dict) or stored.get("key") != key:
            return None
        return stored["features"]

    def save(self, split: str, key: str, features: torch.Tensor) -> Path:
        """Write atomically: a crash mid-write never leaves a truncated cache file behind."""
        stored = {"key": key, "features": features.contiguous()}
        return atomic_write(
            self.path(split, key),
            lambda handle: torch.save(stored, handle),
            what="feature cache",
            advice="Free disk space, set data.cache.dir to another folder, or turn the cache off.",
        )
