"""Progressive resizing: smaller training images in early epochs, the data's size later.

A schedule ``{epoch: side}`` says from which epoch on training batches are resized so that their shorter
side is ``side`` before the backbone sees them; validation, test and prediction always run at the data's
size. Like the freeze schedule it is a pure function of the epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from transferkit.errors import ConfigError
from transferkit.finetuning.schedule import value_at

__all__ = ["image_side_at", "parse_progressive_resizing", "resize_shorter_side"]


def parse_progressive_resizing(value: Mapping[Any, Any] | None) -> dict[int, int] | None:
    """A ``{epoch: side}`` schedule with integer keys (YAML and the command line may give strings),
    sorted by epoch; refused with the expected form if it is not one.

    Example:
        >>> parse_progressive_resizing({"13": 224, 3: 176})
        {3: 176, 13: 224}
    """
    if value is None:
        return None
    try:
        parsed = {int(k): int(v) for k, v in dict(value).items()}
    except (TypeError, ValueError):
        raise ConfigError(
            f"progressive_resizing maps epoch -> image side, e.g. {{3: 176, 13: 224}}; got {value!r}."
        ) from None
    bad = {k: v for k, v in parsed.items() if k < 0 or v < 1}
    if bad:
        raise ConfigError(
            f"progressive_resizing maps epoch (>= 0) -> image side in pixels (>= 1); got {bad}."
        )
    return dict(sorted(parsed.items()))


def image_side_at(schedule: Mapping[int, int] | None, epoch: int) -> int | None:
    """The shorter training-image side ``schedule`` asks for at ``epoch`` (``None``: the data's)."""
    return value_at(schedule or {}, epoch)


def resize_shorter_side(images: torch.Tensor, side: int) -> torch.Tensor:
    """Images ``(B, C, H, W)`` resized (bilinear, antialiased) so that their shorter side is ``side``,
    the aspect ratio kept; unchanged when it already is."""
    height, width = images.shape[-2:]
    if min(height, width) == side:
        return images
    scale = side / min(height, width)
    size = (max(round(height * scale), 1), max(round(width * scale), 1))
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
