"""Albumentations pipelines: train-time augmentation presets, and the eval pipeline.

A pipeline is data: every pipeline built here round-trips through ``A.to_dict`` / ``A.from_dict``, so a
recipe can name it, a checkpoint can store it and inference can replay it exactly.

The train pipeline is ``resize (or random resized crop) -> augmentations -> normalize -> tensor``; the
eval pipeline is ``resize -> normalize -> tensor``, with the backbone's own mean and std.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network at import

from collections.abc import Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from transferkit.data.policies import POLICIES, policy  # noqa: E402
from transferkit.errors import ConfigError  # noqa: E402

__all__ = [
    "PRESETS",
    "Augment",
    "augmentations",
    "build_train_transform",
    "build_eval_transform",
    "decode_side",
    "normalization",
    "unnormalize",
]

PRESETS = ("none", "light", "medium", "heavy")

# a preset name, or inline Albumentations transforms: a list of {Name: {params}} /
# {"__class_fullname__": Name, ...} items, or the dict that A.to_dict writes
Augment = str | list[dict[str, Any]] | dict[str, Any]


def _preset(name: str) -> list[A.BasicTransform]:
    if name == "none":
        return []
    if name == "light":
        return [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.95, 1.05), translate_percent=(-0.03, 0.03), rotate=(-10, 10), p=0.5),
        ]
    if name == "medium":
        return [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-15, 15), p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        ]
    if name == "heavy":
        return [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.85, 1.15), translate_percent=(-0.08, 0.08), rotate=(-25, 25), shear=(-8, 8), p=0.8
            ),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.6),
            A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
            A.CoarseDropout(
                num_holes_range=(1, 6), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15), p=0.4
            ),
        ]
    raise ConfigError(
        f"unknown augmentation preset '{name}'; choose one of {', '.join(PRESETS)} or give transforms inline."
    )


def augmentations(augment: Augment) -> list[A.BasicTransform]:
    """The augmentation transforms named by a preset or described inline (without resize/normalize); an
    inline item may be a policy, ``{RandAugment: {num_ops, magnitude, ops}}`` or ``{TrivialAugment: {ops}}``
    (:mod:`transferkit.data.policies`)."""
    if isinstance(augment, str):
        return _preset(augment)
    if isinstance(augment, Mapping):
        if "transform" not in augment:
            raise ConfigError(
                "an inline augmentation dict must be what A.to_dict writes (with a 'transform' key); "
                f"got keys {sorted(augment)}. Or give a list of transforms, e.g. [{{HorizontalFlip: {{p: 0.5}}}}]."
            )
        composed = A.from_dict(dict(augment))
        return list(composed.transforms)
    if isinstance(augment, Sequence):
        return [_transform_from_item(item) for item in augment]
    raise ConfigError(
        f"augment must be a preset name, a list of transforms or an A.to_dict dict, got {augment!r}."
    )


def _transform_from_item(item: Mapping[str, Any]) -> A.BasicTransform:
    if not isinstance(item, Mapping):
        raise ConfigError(f"each inline transform must be a mapping, got {item!r}.")
    if "__class_fullname__" in item:
        spec = dict(item)
    elif len(item) == 1:
        ((name, params),) = item.items()
        spec = {"__class_fullname__": name, **(params or {})}
    else:
        raise ConfigError(
            f"cannot read transform {dict(item)}: write it as {{Name: {{param: value}}}}, "
            "e.g. {HorizontalFlip: {p: 0.5}}."
        )
    name = spec["__class_fullname__"]
    if name in POLICIES:
        params = {k: v for k, v in spec.items() if k != "__class_fullname__"}
        known = {"num_ops", "magnitude", "ops", "p"} if name == "RandAugment" else {"magnitude", "ops", "p"}
        if set(params) - known:
            raise ConfigError(
                f"{name} takes {', '.join(sorted(known))}; got {', '.join(sorted(set(params) - known))}."
            )
        if name == "TrivialAugment":
            params.setdefault("magnitude", 10.0)
        return policy(name, **params)
    if not hasattr(A, name):
        raise ConfigError(
            f"'{name}' is not an Albumentations transform (see albumentations' list of transforms)."
        )
    try:
        return A.from_dict({"transform": spec})
    except Exception as err:
        raise ConfigError(f"invalid parameters for {name}: {err}") from err


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def build_eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """``Resize(image_size) -> Normalize(mean, std) -> tensor``: ``(H, W, 3) uint8`` to ``(3, S, S)`` float."""
    return A.Compose([A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA), *_normalize(mean, std)])


def normalization(transform: A.Compose) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` of the pipeline's ``Normalize`` step (the statistics its tensors are in).

    Example:
        >>> normalization(build_eval_transform(64, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)))
        ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    """
    for step in getattr(transform, "transforms", []):
        if isinstance(step, A.Normalize):
            return tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
    raise ConfigError(
        "the pipeline has no Normalize step, so its tensors cannot be shown as an image: build it with "
        "build_eval_transform or build_train_transform."
    )


def unnormalize(tensor: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A pipeline's tensor ``(3, S, S)`` back to the image it shows, ``(S, S, 3)`` float32 in [0, 1]: what the
    model saw, for a figure or an overlay.

    Example:
        >>> pipeline = build_eval_transform(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        >>> image = np.full((40, 40, 3), 200, np.uint8)
        >>> shown = unnormalize(pipeline(image=image)["image"], *normalization(pipeline))
        >>> shown.shape, round(float(shown.max() * 255))
        ((32, 32, 3), 200)
    """
    image = tensor.float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(image * np.asarray(std, np.float32) + np.asarray(mean, np.float32), 0.0, 1.0)


def decode_side(transform: A.Compose) -> int | None:
    """The smallest side, in pixels, the pipeline needs of a decoded image without losing detail.

    The pipeline's first step sets it: ``Resize(S)`` needs ``S`` on both sides; ``RandomResizedCrop``
    to ``S`` needs ``S / sqrt(min scale x min aspect)`` so its smallest crop still holds ``S`` pixels
    each way (1.49 S for the ``heavy`` preset). A JPEG can then be decoded at a reduced scale
    (:func:`transferkit.data.images.load_image`). ``None`` where the first step is anything else
    (decode in full).

    Example:
        >>> decode_side(build_eval_transform(224, (0.5,) * 3, (0.5,) * 3))
        224
        >>> decode_side(build_train_transform("heavy", 224, (0.5,) * 3, (0.5,) * 3))
        334
    """
    first = transform.transforms[0] if len(transform.transforms) else None
    if isinstance(first, A.Resize):
        return int(max(first.height, first.width))
    if isinstance(first, A.RandomResizedCrop):
        smallest = math.sqrt(first.scale[0] * min(first.ratio[0], 1.0 / first.ratio[1]))
        return math.ceil(max(first.size) / min(smallest, 1.0))
    return None


def build_train_transform(
    augment: Augment, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> A.Compose:
    """Resize (the ``heavy`` preset: random resized crop), augment, normalize, to tensor."""
    if augment == "heavy":
        resize: A.BasicTransform = A.RandomResizedCrop(
            size=(image_size, image_size), scale=(0.6, 1.0), interpolation=cv2.INTER_AREA
        )
    else:
        resize = A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA)
    return A.Compose([resize, *augmentations(augment), *_normalize(mean, std)])
