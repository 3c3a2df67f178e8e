"""Shared fixtures: tiny generated image datasets that a small network can learn."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
from PIL import Image

TINY_BACKBONE = "test_efficientnet"  # a real timm architecture, ~0.1 M parameters
NORM = {"image_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # data.pipeline fields


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes``, a group given in both (a dict) merged field by field: a helper's defaults
    for ``loader`` keep what a test's ``loader={"batch_size": 4}`` does not change."""
    out = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if both else value
    return out


def stripes(orientation: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """An RGB image of stripes, horizontal or vertical, with random period, phase and colours."""
    period = rng.integers(4, 9)
    phase = rng.integers(0, period)
    ramp = ((np.arange(size) + phase) // (period // 2)) % 2
    mask = np.tile(ramp[:, None], (1, size)) if orientation == "h" else np.tile(ramp[None, :], (size, 1))
    fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(fg.astype(int) - bg).sum() < 150:
        fg = rng.integers(0, 256, 3)
    image = np.where(mask[..., None] == 1, fg, bg).astype(np.float64)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_stripes_folder(root: Path, per_class: int = 40, seed: int = 0, size: int = 32) -> Path:
    """``root/horizontal/*.png`` and ``root/vertical/*.png``: orientation is the label."""
    rng = np.random.default_rng(seed)
    for name, orientation in (("horizontal", "h"), ("vertical", "v")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(stripes(orientation, rng, size)).save(folder / f"{name}_{i:03d}.png")
    return root


# No test reaches a model hub: these machines have none. Weights come from bundled packages or local
# files; tests of the hub path build a local cache, or check the error a user gets when the hub is out of
# reach (a test that wants the network path unsets HF_HUB_OFFLINE and keeps the dead endpoint).
NO_HUB_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture(autouse=True)
def _no_model_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", NO_HUB_ENDPOINT)
    monkeypatch.setenv("TRANSFERKIT_HUB_ENDPOINT", NO_HUB_ENDPOINT)


@pytest.fixture
def stripes_folder(tmp_path: Path) -> Path:
    return make_stripes_folder(tmp_path / "stripes", per_class=40)


@pytest.fixture(scope="session")
def stripes_folder_large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stripes_folder(tmp_path_factory.mktemp("data") / "stripes", per_class=150)


def quiet_trainer(root: Path, **kwargs):
    """A real transferkit Trainer on the CPU, deterministic, without progress bar, summary or logger."""
    from transferkit import Trainer

    defaults = dict(
        accelerator="cpu",
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        deterministic=True,
    )
    return Trainer(**{**defaults, **kwargs})


def run_cli(*args: str, env: dict[str, str] | None = None):
    """``python -m transferkit ARGS`` run in this process, as a ``CompletedProcess`` (exit status, stdout,
    stderr). The same code path as a new process, without importing torch and Lightning once more; tests
    of what only a new process shows (the entry point, import side effects) use ``subprocess``."""
    import contextlib
    import io
    import subprocess

    from transferkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as stop:  # argparse and LightningCLI end --help and their errors so
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def squares_image(
    red: bool, blue: bool, level: float, rng: np.random.Generator, size: int = 32
) -> np.ndarray:
    """A grey image of brightness ``level`` (0..1) with noise, holding a red and/or a blue square where asked."""
    image = np.full((size, size, 3), 40 + 150 * level, dtype=np.float64)
    image += rng.normal(0, 8, image.shape)
    side = size // 4
    for present, colour in ((red, (230, 20, 20)), (blue, (20, 20, 230))):
        if present:
            y, x = rng.integers(0, size - side, 2)
            image[y : y + side, x : x + side] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def make_squares_csv(root: Path, count: int = 160, seed: int = 0, size: int = 32) -> Path:
    """``root/images/*.png`` and ``root/targets.csv``: each image holds a red square, a blue one, both or
    neither (``labels`` as names separated by ';', and ``red``/``blue`` 0/1 columns), on a background whose
    brightness is the number ``level`` in [0, 1]: multi-label and regression targets a small network learns."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["path,labels,red,blue,level"]
    for i in range(count):
        red, blue = bool(i % 2), bool((i // 2) % 2)
        level = float(rng.uniform(0, 1))
        Image.fromarray(squares_image(red, blue, level, rng, size)).save(root / "images" / f"{i:04d}.png")
        names = ";".join(n for n, on in (("red", red), ("blue", blue)) if on)
        lines.append(f"images/{i:04d}.png,{names},{int(red)},{int(blue)},{level:.4f}")
    (root / "targets.csv").write_text("\n".join(lines) + "\n")
    return root / "targets.csv"


@pytest.fixture(scope="session")
def squares_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_squares_csv(tmp_path_factory.mktemp("data") / "squares", count=200)
