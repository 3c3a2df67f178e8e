"""Augmentation policies in Albumentations terms: RandAugment and TrivialAugment built from a list of ops.

A policy draws, for each image, ``num_ops`` ops from a list and applies each at a random strength up to a
magnitude ``M`` on a 0-10 scale (``M = 10`` is the strongest each op goes; ``0`` changes nothing). It is
an ``A.SomeOf`` (``A.OneOf`` for TrivialAugment) of ordinary Albumentations transforms, so it is data like
any pipeline: ``A.to_dict`` writes it, ``A.from_dict`` reads it back, ``augment-preview`` shows it, and
the draws stay seeded per ``(seed, epoch, sample)``.

In a recipe, as an item of ``data.pipeline.augment``::

    augment:
      - HorizontalFlip: {p: 0.5}
      - RandAugment: {num_ops: 2, magnitude: 9, ops: default}
      - TrivialAugment: {ops: photometric_safe}       # one op per image, strength up to 10

Op lists (``ops``): ``default`` is RandAugment's (geometry, brightness and contrast, sharpness, and the
colour and histogram ops: saturation, equalize, posterize, solarize, autocontrast); ``photometric_safe``
keeps geometry and intensity changes a camera or a lamp could make (brightness, contrast, gamma,
sharpness, blur, sensor noise) and leaves out every op that changes colours or remaps intensities in a
way no acquisition would (saturation, equalize, posterize, solarize): for grayscale, medical and
industrial images, where colour or absolute intensity carries meaning or none at all. A list of op
names picks any of :data:`OPS`.

Strengths follow timm's RandAugment at ``M``: rotate up to 3M degrees, shear up to 1.7M degrees,
translate up to 4.5M % of the side, brightness and contrast up to +-5M %, saturation up to +-9M %,
posterize down to 8 - 0.4M bits, solarize above a threshold down to 1 - M/10.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import albumentations as A

from transferkit.errors import ConfigError

__all__ = ["OPS", "OP_LISTS", "POLICIES", "policy"]


def _affine(**kwargs: object) -> A.Affine:
    return A.Affine(**kwargs, border_mode=0, p=1.0)


# each op: magnitude in [0, 10] -> one Albumentations transform applied with p=1 (the policy decides)
OPS: dict[str, Callable[[float], A.BasicTransform]] = {
    "rotate": lambda m: _affine(rotate=(-3.0 * m, 3.0 * m)),
    "shear_x": lambda m: _affine(shear={"x": (-1.7 * m, 1.7 * m), "y": (0.0, 0.0)}),
    "shear_y": lambda m: _affine(shear={"x": (0.0, 0.0), "y": (-1.7 * m, 1.7 * m)}),
    "translate_x": lambda m: _affine(translate_percent={"x": (-0.045 * m, 0.045 * m), "y": (0.0, 0.0)}),
    "translate_y": lambda m: _affine(translate_percent={"x": (0.0, 0.0), "y": (-0.045 * m, 0.045 * m)}),
    "brightness": lambda m: A.RandomBrightnessContrast(
        brightness_limit=(-0.05 * m, 0.05 * m), contrast_limit=(0.0, 0.0), p=1.0
    ),
    "contrast": lambda m: A.RandomBrightnessContrast(
        brightness_limit=(0.0, 0.0), contrast_limit=(-0.05 * m, 0.05 * m), p=1.0
    ),
    "gamma": lambda m: A.RandomGamma(gamma_limit=(100 - 5 * m, 100 + 5 * m), p=1.0),
    "sharpness": lambda m: A.Sharpen(alpha=(0.0, 0.09 * m), lightness=(1.0, 1.0), p=1.0),
    "blur": lambda m: A.GaussianBlur(
        blur_limit=(3, 3 + 2 * round(m / 5)), sigma_limit=(0.1, 0.1 + 0.2 * m), p=1.0
    ),
    "noise": lambda m: A.GaussNoise(std_range=(0.0, 0.01 * m), p=1.0),
    "saturation": lambda m: A.ColorJitter(
        brightness=0.0, contrast=0.0, saturation=(max(1 - 0.09 * m, 0.0), 1 + 0.09 * m), hue=0.0, p=1.0
    ),
    "equalize": lambda m: A.Equalize(p=1.0),
    "autocontrast": lambda m: A.AutoContrast(p=1.0),
    "posterize": lambda m: A.Posterize(num_bits=(max(8 - round(0.4 * m), 1), 8), p=1.0),
    "solarize": lambda m: A.Solarize(threshold_range=(1.0 - m / 10, 1.0), p=1.0),
}

OP_LISTS: dict[str, tuple[str, ...]] = {
    "default": (
        "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "contrast",
        "sharpness", "saturation", "equalize", "autocontrast", "posterize", "solarize",
    ),
    "photometric_safe": (
        "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "contrast", "gamma",
        "sharpness", "blur", "noise",
    ),
}  # fmt: skip

POLICIES = ("RandAugment", "TrivialAugment")


def _op_names(ops: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(ops, str):
        if ops not in OP_LISTS:
            raise ConfigError(
                f"unknown op list '{ops}'; choose {', '.join(OP_LISTS)}, or list ops from: {', '.join(OPS)}."
            )
        return OP_LISTS[ops]
    names = tuple(ops)
    unknown = [name for name in names if name not in OPS]
    if unknown or not names:
        raise ConfigError(f"unknown policy ops {unknown or '(none given)'}; choose from: {', '.join(OPS)}.")
    return names


def policy(
    kind: str = "RandAugment",
    num_ops: int = 2,
    magnitude: float = 9.0,
    ops: str | Sequence[str] = "default",
    p: float = 1.0,
) -> A.BaseCompose:
    """A RandAugment (``num_ops`` ops per image, each up to ``magnitude``) or TrivialAugment (one op per
    image, up to ``magnitude``, 10 by default) policy over ``ops``, as Albumentations transforms.

    Example:
        >>> import numpy as np
        >>> pipeline = A.Compose([policy("RandAugment", num_ops=2, magnitude=9, ops="photometric_safe")])
        >>> pipeline.set_random_seed(0)
        >>> pipeline(image=np.zeros((32, 32, 3), dtype=np.uint8))["image"].shape
        (32, 32, 3)
        >>> A.from_dict(A.to_dict(pipeline)).transforms[0].n
        2
    """
    if kind not in POLICIES:
        raise ConfigError(f"unknown augmentation policy '{kind}'; choose {' or '.join(POLICIES)}.")
    names = _op_names(ops)
    if not 0 <= magnitude <= 10:
        raise ConfigError(f"{kind} magnitude is on a 0-10 scale, got {magnitude}.")
    if not 0 <= p <= 1:
        raise ConfigError(f"{kind} p must be a probability in [0, 1], got {p}.")
    transforms = [OPS[name](float(magnitude)) for name in names]
    if kind == "TrivialAugment":
        return A.OneOf(transforms, p=p)
    if not 1 <= num_ops <= len(names):
        raise ConfigError(
            f"RandAugment num_ops must be between 1 and the {len(names)} ops listed, got {num_ops}."
        )
    return A.SomeOf(transforms, n=int(num_ops), replace=False, p=p)
