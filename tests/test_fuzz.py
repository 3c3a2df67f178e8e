"""Fuzzing (bounded): arbitrary file bytes never crash image reading, arbitrary recipe values never
crash the CLI with an error from deep inside."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_BACKBONE, make_stripes_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from transferkit.containers import plain
from transferkit.data import ImageReadError, load_image
from transferkit.errors import ConfigError


def _valid(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


VALID = {"png": _valid("PNG"), "jpg": _valid("JPEG"), "gif": _valid("GIF"), "bmp": _valid("BMP")}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-images")


def _assert_reads_or_is_named(folder: Path, data: bytes, suffix: str) -> None:
    path = folder / f"sample.{suffix}"
    path.write_bytes(data)
    try:
        array = load_image(path)
    except ImageReadError as err:
        assert err.path == str(path) and err.reason
        return
    assert array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8 and min(array.shape) >= 1


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.binary(max_size=300), suffix=st.sampled_from(["png", "jpg", "gif", "tif", "webp"]))
def test_random_bytes_read_as_rgb_or_raise_image_read_error(scratch, data, suffix):
    _assert_reads_or_is_named(scratch, data, suffix)


@settings(max_examples=250, deadline=None, derandomize=True)
@given(
    fmt=st.sampled_from(sorted(VALID)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 2_000),
)
def test_mutated_valid_images_read_as_rgb_or_raise_image_read_error(scratch, fmt, edits, cut):
    data = bytearray(VALID[fmt])
    for position, value in edits:
        data[position % len(data)] = value
    _assert_reads_or_is_named(scratch, bytes(data[:cut] if cut is not None else data), fmt)


# --- recipe values ----------------------------------------------------------------------------------

FIELDS = [
    "model.optimizer.lr",
    "model.head.hidden_dims",
    "model.head.activation",
    "model.head.dropout",
    "model.optimizer.name",
    "model.freeze_schedule",
    "model.optimizer.layer_decay",
    "model.prediction.tta",
    "data.loader.batch_size",
    "data.split.val_fraction",
    "data.split.train_fraction",
    "data.pipeline.augment",
    "data.split.max_samples",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-{}[]:, 0123456789", max_size=10),
    st.lists(st.integers(-3, 300), max_size=3),
    st.dictionaries(
        st.sampled_from(["milestones", "frozen_epochs", "p", "x"]), st.integers(-2, 20), max_size=2
    ),
)


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stripes_folder(tmp_path_factory.mktemp("fuzz") / "stripes", per_class=6, size=16)


# what each field may answer a bad value with: the error's type and its message, which names the field
_CHOICE = r"'.*'; choose one of [a-z0-9_, ]+\."
ACCEPTED: dict[str, list[tuple[type[Exception], str]]] = {
    "model.optimizer.lr": [
        (ConfigError, r"model\.optimizer\.lr must be a number > 0 or 'auto' .*, got .+\.")
    ],
    "model.head.hidden_dims": [
        (ConfigError, r"hidden_dims must be positive layer widths \(or \[\] for a linear head\), got .+\.")
    ],
    "model.head.activation": [(ConfigError, r"unknown activation " + _CHOICE)],
    "model.head.dropout": [(ConfigError, r"dropout must be in \[0, 1\), got .+\.")],
    "model.optimizer.name": [(ConfigError, r"model\.optimizer\.name must be one of [a-z, ]+, got .+\.")],
    "model.freeze_schedule": [
        (ConfigError, r"(frozen_epochs|unfreeze_every|warmup_steps) must be >= [01].*, got .+\."),
        (ConfigError, r"milestones map epoch \(>= 0\) -> trainable groups .*; got .+\."),
        (ConfigError, r"freeze_schedule\.milestones asks for .+ trainable backbone groups.*"),
    ],
    "model.optimizer.layer_decay": [
        (ConfigError, r"model\.optimizer\.layer_decay must be in \(0, 1\], got .+\.")
    ],
    "model.prediction.tta": [(ConfigError, r"model\.prediction\.tta must be one of [a-z0-9, ]+, got .+\.")],
    "data.loader.batch_size": [
        (ConfigError, r"data\.loader\.batch_size must be a whole number >= 1, got .+\.")
    ],
    "data.split.val_fraction": [(ConfigError, r"data\.split\.val_fraction must be in \[0, 1\) .*, got .+\.")],
    "data.split.train_fraction": [
        (ConfigError, r"data\.split\.train_fraction must be the share of the training split .*, got .+\.")
    ],
    "data.pipeline.augment": [
        (
            ConfigError,
            r"unknown augmentation preset '.*'; choose one of [a-z0-9_, ]+ or give transforms inline\.",
        ),
        (
            ConfigError,
            r"an inline augmentation dict must be what A\.to_dict writes \(with a 'transform' key\); .+",
        ),
        (ConfigError, r"each inline transform must be a mapping, got .+\."),
        (ConfigError, r"cannot read transform .+: write it as \{Name: \{param: value\}\}, .+"),
        (ConfigError, r"'.*' is not an Albumentations transform .+"),
        (ConfigError, r"invalid parameters for .+: .+"),
        (ConfigError, r"augment must be a preset name, a list of transforms or an A\.to_dict dict, got .+\."),
    ],
    "data.split.max_samples": [
        (ConfigError, r"data\.split\.max_samples must be a whole number >= 1, or null .*, got .+\.")
    ],
}
assert set(ACCEPTED) == set(FIELDS)


def _is_accepted(err: Exception, fields: list[str]) -> bool:
    return any(
        isinstance(err, kind) and re.fullmatch(pattern, str(err), flags=re.DOTALL)
        for field in fields
        for kind, pattern in ACCEPTED[field]
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(overrides=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=2))
def test_random_recipe_values_give_a_clear_error_or_a_working_setup(fuzz_folder, tmp_path, overrides):
    from transferkit.cli.lightning_cli import TransferKitCLI, cli_kwargs

    args = [
        f"--model.backbone={TINY_BACKBONE}",
        "--model.pretrained=false",
        "--data.source=folder",
        f"--data.root={fuzz_folder}",
        "--data.loader.num_workers=0",
        "--data.pipeline.image_size=32",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    args += [f"--{field}={json.dumps(value)}" for field, value in overrides.items()]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cli = TransferKitCLI(**cli_kwargs(args), run=False)  # parse, then build data, model, trainer
    except SystemExit as err:  # the parser's refusal: exit status 2, naming the key it refused
        assert err.code == 2
        named = re.findall(r'error: Parser key "([a-z_.]+)"', stderr.getvalue())
        # the key given, or the group it is in
        assert named and any(f == named[0] or f.startswith(named[0] + ".") for f in overrides), (
            stderr.getvalue()[-2000:]
        )
        return
    except Exception as err:
        # one of the errors listed for a field that was given a bad value, with its message
        assert _is_accepted(err, sorted(overrides)), f"{type(err).__name__}: {err}"
        return
    assert cli.model.settings.num_classes == 2  # a working setup
    for field, value in overrides.items():  # holding the value given
        section, *path = field.split(".")
        held = cli.model.settings if section == "model" else cli.datamodule.settings
        for name in path:
            held = getattr(held, name)
        if path != ["freeze_schedule"]:
            assert json.dumps(plain(held)) == json.dumps(value) or plain(held) == value, (field, held)
