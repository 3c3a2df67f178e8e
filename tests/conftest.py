"""Shared fixtures: tiny generated image datasets that a small network can learn."""

from __future__ import annotations

import os
import socket
import threading
import time
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


SERVE_CLASSES = ["0", "1/3", "2/3", "1"]
SERVE_GROUPS = {"functional": ["0", "1/3"], "defective": ["2/3", "1"]}


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-class checkpoint with ELPV's class groups (a tiny real timm model), its fp32 and int8 ONNX exports,
    and six PNG/JPEG images of different sizes."""
    import torch

    from transferkit import TransferClassifier
    from transferkit.inference import export_checkpoint
    from transferkit.inference.exported import load_exported
    from transferkit.inference.quantize import quantize_onnx
    from transferkit.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    trained = TransferClassifier(
        num_classes=4,
        backbone=TINY_BACKBONE,
        pretrained=False,
        class_names=SERVE_CLASSES,
        class_groups=SERVE_GROUPS,
    )
    for bn in (m for m in trained.modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)  # statistics as training leaves
    ckpt = root / "best.ckpt"
    save_checkpoint(trained, ckpt)
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(6):
        array = rng.integers(0, 255, (40 + 9 * i, 56 - 3 * i, 3), dtype=np.uint8)
        Image.fromarray(array).save(images / f"img{i}.{'png' if i % 2 else 'jpg'}")
    onnx_path = export_checkpoint(ckpt, "onnx", root / "model.onnx").path
    _, transform = load_exported(onnx_path)
    calibration = [
        np.stack(
            [
                transform(image=rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))["image"].numpy()
                for _ in range(8)
            ]
        )
        for _ in range(2)
    ]
    int8 = quantize_onnx(onnx_path, calibration).path
    return {"ckpt": ckpt, "onnx": onnx_path, "int8": int8, "images": images}


class Server:
    """A uvicorn server in a thread, on a port the OS picked, for the duration of a ``with``."""

    def __init__(self, predictor, settings=None) -> None:
        import uvicorn

        from transferkit.serving import ServeSettings, create_app

        settings = settings if settings is not None else ServeSettings()

        self.app = create_app(predictor, settings)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
