"""A dataset of several objects per image, built from scikit-learn's digits: for multi-label and regression.

Each image is a grey canvas holding 2 to 4 different digits of scikit-learn's 8x8 set, each upscaled and
pasted at its own place without overlap. Its labels are the digits it holds (multi-label, names ``0`` ...
``9``), its numbers the count of digits and their sum (regression). The digits come from one pool per split
of scikit-learn's images, so no digit image of a test composite is seen in training.

Example:
    >>> import tempfile
    >>> csv = write_digit_composites(tempfile.mkdtemp(), count=6, seed=0, side=48)
    >>> lines = csv.read_text().splitlines()
    >>> lines[0]
    'path,labels,count,sum,split'
    >>> len(lines), all(2 <= int(line.split(",")[2]) <= 4 for line in lines[1:])
    (7, True)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from transferkit.errors import ConfigError

__all__ = ["write_digit_composites"]


def write_digit_composites(
    folder: str | os.PathLike,
    count: int = 2000,
    seed: int = 0,
    side: int = 64,
    digits_per_image: tuple[int, int] = (2, 4),
    test_fraction: float = 0.2,
) -> Path:
    """Write ``count`` composite images into ``folder/images/`` and ``folder/composites.csv`` (columns
    ``path,labels,count,sum,split``); return the CSV's path.

    Args:
        folder: where to write (created).
        count: images to write.
        seed: the draw of digits, places and splits.
        side: the canvas's side in pixels; each digit is pasted at ``side // 4`` pixels.
        digits_per_image: the fewest and most digits per image (different digits each).
        test_fraction: the share of images in the ``test`` split; their digits come from scikit-learn
            images no training composite uses (the ``split`` column keeps them apart).
    """
    from sklearn.datasets import load_digits

    low, high = digits_per_image
    if not 1 <= low <= high <= 9:
        raise ConfigError(
            f"digits_per_image must be (low, high) with 1 <= low <= high <= 9, got {digits_per_image}."
        )
    cell = side // 4
    if cell < 8:
        raise ConfigError(f"side must be at least 32 pixels (each digit is side // 4 >= 8), got {side}.")
    rng = np.random.default_rng(seed)
    digits = load_digits()
    order = rng.permutation(len(digits.target))
    held = order[: int(len(order) * test_fraction)]
    pools = {
        split: {d: idx[digits.target[idx] == d] for d in range(10)}
        for split, idx in (("test", held), ("train", order[len(held) :]))
    }
    out = Path(folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels,count,sum,split"]
    places = [(y, x) for y in range(4) for x in range(4)]
    for i in range(count):
        split = "test" if rng.random() < test_fraction else "train"
        chosen = sorted(rng.choice(10, size=int(rng.integers(low, high + 1)), replace=False).tolist())
        canvas = np.full((side, side), 20.0) + rng.normal(0, 6, (side, side))
        for digit, place in zip(
            chosen, rng.choice(len(places), size=len(chosen), replace=False), strict=True
        ):
            image = digits.images[rng.choice(pools[split][digit])] * (235 / 16)  # 0..16 -> 0..235
            big = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((cell, cell), Image.BILINEAR))
            y, x = places[place]
            canvas[y * cell : (y + 1) * cell, x * cell : (x + 1) * cell] += big
        name = f"images/{i:05d}.png"
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(out / name)
        rows.append(f"{name},{';'.join(map(str, chosen))},{len(chosen)},{sum(chosen)},{split}")
    csv = out / "composites.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv
