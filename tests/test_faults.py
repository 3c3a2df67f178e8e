"""Faults and repeatability: seeded augmentation, interruptions, killed runs, failed checkpoint writes."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, make_stripes_folder, quiet_trainer, run_cli
from lightning.pytorch.callbacks import Callback

from transferkit import ImageDataModule, TransferClassifier
from transferkit.errors import CheckpointError
from transferkit.models.checkpoint import read_checkpoint
from transferkit.training.checkpointing import RunCheckpoint


def _augmented_dm(root, seed: int, num_workers: int) -> ImageDataModule:
    return ImageDataModule(
        source="folder",
        root=str(root),
        seed=seed,
        pipeline={"augment": "heavy", **NORM},
        loader={"num_workers": num_workers, "batch_size": 8},
    )


def _epoch_batches(dm: ImageDataModule, epoch: int) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
    return [images for images, _ in loader]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmented_batches_repeat_with_the_seed_and_differ_across_seeds(stripes_folder, num_workers):
    first, second = _augmented_dm(stripes_folder, 3, num_workers), _augmented_dm(stripes_folder, 3, 0)
    other = _augmented_dm(stripes_folder, 4, num_workers)
    for dm in (first, second, other):
        dm.setup("fit")
    epochs = {e: _epoch_batches(first, e) for e in (0, 1)}
    for epoch, batches in epochs.items():
        # the same seed: the same augmented pixels, with any number of workers
        again = _epoch_batches(second, epoch)
        assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    # a new epoch draws new augmentations (not just a new order) ...
    first_images = {round(float(x.sum()), 3) for b in epochs[0] for x in b}
    second_images = {round(float(x.sum()), 3) for b in epochs[1] for x in b}
    assert first_images != second_images
    # ... and another seed other ones
    assert not torch.equal(epochs[0][0], _epoch_batches(other, 0)[0])


def test_a_resumed_epoch_draws_what_the_uninterrupted_run_drew(stripes_folder):
    dm = _augmented_dm(stripes_folder, 0, 0)
    dm.setup("fit")
    uninterrupted = [_epoch_batches(dm, e) for e in range(3)][2]
    fresh = _augmented_dm(stripes_folder, 0, 0)  # a new process resuming at epoch 2
    fresh.setup("fit")
    resumed = _epoch_batches(fresh, 2)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))


# --- checkpoints: every epoch, atomic ---------------------------------------------------------------


def _tiny_model() -> TransferClassifier:
    return TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, head={"hidden_dims": []}
    )


def _tiny_dm(root: Path) -> ImageDataModule:
    return ImageDataModule(
        source="folder",
        root=str(root),
        pipeline={"augment": "light", **NORM},
        loader={"num_workers": 0, "batch_size": 16},
    )


@pytest.mark.slow
def test_last_checkpoint_is_rewritten_every_epoch_even_without_a_new_best(stripes_folder, tmp_path):
    # monitoring "epoch" in mode "min": only epoch 0 is ever a new best
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", monitor="epoch", mode="min", save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[checkpoint], num_sanity_val_steps=0)
    trainer.fit(_tiny_model(), datamodule=_tiny_dm(stripes_folder))
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert [p.name.split("-")[0] for p in (tmp_path / "ckpt").glob("epoch=*")] == ["epoch=0"]  # one best


def test_a_checkpoint_write_that_fails_midway_leaves_the_previous_one_intact(
    stripes_folder, tmp_path, monkeypatch
):
    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=False, num_sanity_val_steps=0)
    model = _tiny_model()
    trainer.fit(model, datamodule=_tiny_dm(stripes_folder))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    real_write, written = os.write, [0]

    def disk_fills_up(fd: int, data) -> int:
        if written[0] > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data[:8192])
        return real_write(fd, data[:8192])

    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the new checkpoint would differ
    monkeypatch.setattr(os, "write", disk_fills_up)
    with pytest.raises(
        OSError,
        match=r"could not write checkpoint .*No space left on device.*previous 'model.ckpt' is unchanged",
    ):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert written[0] > 20_000  # it really failed midway
    assert path.read_bytes() == before and read_checkpoint(path)["state_dict"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no half-written file


@pytest.mark.slow
def test_a_disk_that_fills_during_a_run_ends_it_with_one_error_block_and_status_2(
    stripes_folder, tmp_path, monkeypatch
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"trainer: {{max_epochs: 3, accelerator: cpu, logger: false, enable_progress_bar: false, "
        f"enable_model_summary: false, default_root_dir: {tmp_path / 'run'}}}\n"
        f"model: {{backbone: {TINY_BACKBONE}, pretrained: false, head: {{hidden_dims: []}}}}\n"
        f"data: {{source: folder, root: {stripes_folder}, loader: {{num_workers: 0, batch_size: 16}}, "
        "pipeline: {image_size: 32, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}\n"
    )
    # the disk fills in epoch 1: epoch 0's checkpoints (best and last) are written, the next one is not
    real_write, started = os.write, []

    def disk_fills_up(fd: int, data) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.endswith(".tmp") and ".ckpt." in target:
            if target not in started:
                started.append(target)
            if len(started) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to tell a checkpoint's writes from others")
    monkeypatch.setattr(os, "write", disk_fills_up)
    result = run_cli("fit", "--config", str(recipe))
    monkeypatch.undo()
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.match(
        r"error: could not write checkpoint '.*\.ckpt' \(No space left on device\); .*Free disk space",
        errors[0],
    )
    # nothing half-written, and epoch 0's last.ckpt is there to resume from
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")] == []
    assert read_checkpoint(checkpoints / "last.ckpt")["epoch"] == 0


# --- interruptions ----------------------------------------------------------------------------------

FIT_SCRIPT = """
import os, signal, sys, time
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
import lightning as L, torch
from lightning.pytorch.callbacks import Callback
from transferkit import FreezeAndCache, ImageDataModule, Trainer, TransferClassifier
from transferkit.training.checkpointing import RunCheckpoint

# argv: OUT MODE, or several OUT::MODE runs one after another in this process (no import cost per run);
# MODE is "fresh" or the checkpoint to resume from
runs = [arg.split("::") for arg in sys.argv[1:]] if "::" in sys.argv[1] else [sys.argv[1:3]]


class Hold(Callback):  # the test interrupts the run while it waits here, whatever the load
    def __init__(self, out):
        self.out = out

    def _hold(self, trainer, where):
        if os.environ.get("HOLD_AT", "") != where + ":" + str(trainer.current_epoch):
            return
        open(os.path.join(self.out, "held"), "w").close()
        deadline = time.monotonic() + 600
        while not os.path.exists(os.path.join(self.out, "release")):  # until the test has sent its signal
            assert time.monotonic() < deadline, "the test never released the run"
            time.sleep(0.02)

    def on_train_epoch_start(self, trainer, pl_module):
        self._hold(trainer, "start")

    def on_train_epoch_end(self, trainer, pl_module):  # before this epoch's last.ckpt, after the previous one's
        self._hold(trainer, "end")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # a scheduler's SIGTERM after this many optimizer steps (a spot instance ending mid-epoch)
        if trainer.global_step == int(os.environ.get("SIGTERM_AT_STEP", "-1")):
            os.kill(os.getpid(), signal.SIGTERM)


# FREEZE=1: the head alone for epoch 0, then the top group, then the top two;
# FREEZE=2: the head alone for epochs 0-1, then the top group, then the top two (a trunk each)
FREEZE = {{"1": {{"milestones": {{0: 0, 1: 1, 2: 2}}}}, "2": {{"milestones": {{0: 0, 2: 1, 3: 2}}}}}}
torch.set_num_threads(1)
for out, mode in runs:
    os.makedirs(out, exist_ok=True)
    L.seed_everything(0)
    model = TransferClassifier(num_classes=2, backbone="{backbone}", pretrained=False,
                               head={{"hidden_dims": []}}, optimizer={{"lr": 1e-2}},
                               freeze_schedule=FREEZE.get(os.environ.get("FREEZE", "")),
                               lr_schedule={{"name": os.environ.get("SCHEDULE", "exponential"), "plateau_patience": 0}})
    dm = ImageDataModule(source="folder", root="{root}",
                         loader={{"num_workers": int(os.environ.get("WORKERS", "0")), "batch_size": 16}},
                         pipeline={{"augment": os.environ.get("AUGMENT", "light"), "image_size": 32,
                                   "mean": (0.5,) * 3, "std": (0.5,) * 3}},
                         cache={{"decoded_images": os.environ.get("DECODED") == "1"}})
    feeding = FreezeAndCache(feature_cache=os.environ.get("FEATURE_CACHE", "off"),
                             trunk_cache=os.environ.get("TRUNK_CACHE", "off"), cache_views=2)
    trainer = Trainer(
        accelerator="cpu", max_epochs=4, deterministic=True, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=int(os.environ.get("SANITY", "0")),
        default_root_dir=out,
        callbacks=[RunCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="val_loss", save_last=True),
                   Hold(out), feeding],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=None if mode == "fresh" else mode)
    torch.save(model.state_dict(), os.path.join(out, "final.pt"))
    print(out, "global_step", trainer.global_step)
    scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    print(out, "scheduler", {{k: scheduler.get(k) for k in ("last_epoch", "best", "num_bad_epochs", "_last_lr")}})
"""


def _fit_process(
    tmp_path: Path,
    root: Path,
    out: Path,
    mode: str = "fresh",
    hold_at: str = "",
    sigterm_at_step: int = -1,
    settings: dict[str, str] | None = None,
    runs: list[tuple[Path, str]] | None = None,
) -> subprocess.Popen:
    """A fit in a new process, into ``out`` (from scratch, or resumed from the checkpoint ``mode``), or
    the ``runs`` ``(out, mode)`` one after another in one process."""
    script = tmp_path / "fit_script.py"
    if not script.exists():  # written once: a process still starting may be reading it
        script.write_text(textwrap.dedent(FIT_SCRIPT.format(backbone=TINY_BACKBONE, root=root)))
    env = {
        **os.environ,
        "HOLD_AT": hold_at,
        "SIGTERM_AT_STEP": str(sigterm_at_step),
        **(settings or {}),
        "OMP_NUM_THREADS": "1",
    }
    args = [f"{o}::{m}" for o, m in runs] if runs else [str(out), mode]
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        # a shell's background job ignores SIGINT, and a child inherits that: Python then never raises
        # KeyboardInterrupt, and the run finishes as if no Ctrl+C came. The run gets the default back.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=240)
    return process.returncode, stdout, stderr


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stripes_folder(tmp_path_factory.mktemp("faults") / "stripes", per_class=24)


class _Uninterrupted:
    """The uninterrupted run of each setting, trained once for all the tests that compare with it."""

    def __init__(self, folder: Path, data: Path) -> None:
        self.folder, self.data = folder, data
        self.runs: dict[str, tuple[dict[str, torch.Tensor], str]] = {}

    def __call__(self, settings: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], str]:
        """The final weights and the printed output of the run with ``settings``."""
        key = json.dumps(settings or {}, sort_keys=True)
        if key not in self.runs:
            out = self.folder / f"full-{len(self.runs)}"
            code, stdout, stderr = _finish(_fit_process(self.folder, self.data, out, settings=settings))
            assert code == 0 and "global_step 8" in stdout, stderr[-3000:]
            self.runs[key] = (torch.load(out / "final.pt", weights_only=True), stdout)
        return self.runs[key]


@pytest.fixture(scope="module")
def uninterrupted(fault_data: Path, tmp_path_factory: pytest.TempPathFactory) -> _Uninterrupted:
    return _Uninterrupted(tmp_path_factory.mktemp("uninterrupted"), fault_data)


# every cache setting a run can feed its model with (FREEZE=2: epochs 0-1 train the head alone, epoch 2
# the top group, epoch 3 the top two; a partly frozen epoch feeds the model the cached trunk of its own
# depth); the decoded-image cache on and off
CACHE_SETTINGS = {
    "no-cache": {},
    "feature-clean": {"FEATURE_CACHE": "clean"},
    "feature-augmented+decoded": {"FEATURE_CACHE": "augmented", "DECODED": "1"},
    "trunk-clean": {"TRUNK_CACHE": "clean"},
    "trunk-augmented+decoded": {"TRUNK_CACHE": "augmented", "DECODED": "1"},
    # the quick start's: every epoch fed clean stored outputs, so no augmentation (one would be refused)
    "feature-clean+trunk-clean+decoded": {
        "FEATURE_CACHE": "clean",
        "TRUNK_CACHE": "clean",
        "DECODED": "1",
        "AUGMENT": "none",
    },
}

# how each run is stopped: (signal, where the run is held when it comes, or the step after which the run
# sends itself SIGTERM, the checkpoint it leaves, that checkpoint's global step, the run's exit status).
# 2 batches an epoch; "head": while the head trains alone, "unfrozen": after the top groups unfroze.
INTERRUPTIONS = {
    # SIGKILL: no handler, no cleanup: only what is on disk survives (last.ckpt of the epoch before)
    "kill-head": (signal.SIGKILL, "end:1", -1, "last.ckpt", 2, -signal.SIGKILL),
    "kill-unfrozen": (signal.SIGKILL, "end:3", -1, "last.ckpt", 6, -signal.SIGKILL),
    # Ctrl+C inside an epoch's start hooks (whose checkpoint once resumed past that epoch)
    "sigint-head": (signal.SIGINT, "start:1", -1, "interrupted.ckpt", 2, 1),
    "sigint-unfrozen": (signal.SIGINT, "start:3", -1, "interrupted.ckpt", 6, 1),
    # a scheduler's SIGTERM in the middle of an epoch: Lightning stops at the next batch boundary
    "sigterm-head": (signal.SIGTERM, "", 3, "interrupted.ckpt", 3, 128 + signal.SIGTERM),
    "sigterm-unfrozen": (signal.SIGTERM, "", 7, "interrupted.ckpt", 7, 128 + signal.SIGTERM),
}


@pytest.mark.slow
@pytest.mark.parametrize("cache", list(CACHE_SETTINGS))
def test_a_run_killed_or_interrupted_in_any_phase_resumes_to_the_uninterrupted_weights(
    fault_data, tmp_path, cache
):
    # the sanity check on: it runs on the resumed epoch's loaders before any epoch starts
    settings = {**CACHE_SETTINGS[cache], "FREEZE": "2", "SANITY": "2"}

    def fit(out: str, **kwargs) -> subprocess.Popen:
        return _fit_process(tmp_path, fault_data, tmp_path / out, settings=settings, **kwargs)

    stopped = {}
    for name, (_, hold_at, step, _, _, _) in INTERRUPTIONS.items():
        stopped[name] = fit(name, hold_at=hold_at, sigterm_at_step=step)
    full = fit("uninterrupted")  # alongside: the interrupted runs wait where they are held
    for name, process in stopped.items():
        signum, hold_at = INTERRUPTIONS[name][:2]
        if hold_at:
            _wait_for(tmp_path / name / "held", process)  # the run waits where it is held ...
            process.send_signal(signum)
            (tmp_path / name / "release").touch()  # ... until the signal is on its way: no race with the run
    resumes = []
    for name, process in stopped.items():
        _, _, _, saved, step, status = INTERRUPTIONS[name]
        code, _, stderr = _finish(process)
        assert code == status, f"{name}: {stderr[-3000:]}"  # the run did not finish, and says so
        checkpoint = tmp_path / name / "ckpt" / saved
        if saved == "interrupted.ckpt":
            assert f"saved '{checkpoint}'" in stderr and f"--ckpt_path {checkpoint}" in stderr, stderr[-3000:]
        assert read_checkpoint(checkpoint)["global_step"] == step, name  # stopped where it was meant to
        resumes.append((tmp_path / name, str(checkpoint)))
    code, _, stderr = _finish(full)
    assert code == 0, stderr[-3000:]
    uninterrupted = torch.load(tmp_path / "uninterrupted" / "final.pt", weights_only=True)
    # every resume, one after another in one new process
    code, stdout, stderr = _finish(fit("resumed", runs=resumes))
    assert code == 0, stderr[-3000:]
    assert "dataloader is not resumable" not in stderr  # Lightning's warning: the epoch would restart
    for name in INTERRUPTIONS:
        assert f"{tmp_path / name} global_step 8" in stdout, name  # 4 epochs of 2 batches, none skipped
        resumed = torch.load(tmp_path / name / "final.pt", weights_only=True)
        assert resumed.keys() == uninterrupted.keys()
        for key, value in uninterrupted.items():
            assert torch.equal(value, resumed[key]), f"{name}: {key}"


MID_EPOCH_SETTINGS = {
    "unfrozen": {},
    # epoch 0 trains the head on cached features (its loaders are rebuilt every epoch), then the
    # backbone's top groups unfreeze one by one; a loader worker draws each epoch's order ahead
    "freeze-cache-worker": {"FREEZE": "1", "FEATURE_CACHE": "clean", "WORKERS": "1"},
    # ReduceLROnPlateau, stepped on the validation loss at every epoch's end
    "plateau": {"SCHEDULE": "performance"},
}


@pytest.mark.slow
@pytest.mark.parametrize("settings", list(MID_EPOCH_SETTINGS.values()), ids=list(MID_EPOCH_SETTINGS))
def test_a_run_stopped_mid_epoch_resumes_at_its_next_batch_and_ends_as_if_never_stopped(
    fault_data, tmp_path, settings, uninterrupted
):
    def fit(out: str, **kwargs) -> subprocess.Popen:
        return _fit_process(tmp_path, fault_data, tmp_path / out, settings=settings, **kwargs)

    # 2 batches an epoch: after step 3 the run is halfway through its second epoch
    code, _, stderr = _finish(fit("cut", sigterm_at_step=3))
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    saved = tmp_path / "cut" / "ckpt" / "interrupted.ckpt"
    state = read_checkpoint(saved)
    assert (state["global_step"], state["epoch"]) == (3, 1)
    # the end of epoch 0's checkpoint, before the resumed run rewrites it
    shutil.copy(tmp_path / "cut" / "ckpt" / "last.ckpt", tmp_path / "epoch0.ckpt")
    resumed = {
        "mid": fit("cut", mode=str(saved)),
        "epoch0": fit("cut-epoch0", mode=str(tmp_path / "epoch0.ckpt")),
    }
    full_weights, full_stdout = uninterrupted(settings)  # while the resumed runs train
    outputs = {name: _finish(process) for name, process in resumed.items()}
    for name, (code, stdout, stderr) in outputs.items():
        assert code == 0, f"{name}: {stderr[-3000:]}"
        assert "global_step 8" in stdout, name
        assert "dataloader is not resumable" not in stderr  # Lightning's warning: the epoch would restart

    # the resumed epoch trained on its second batch, not its first again: the same weights to the bit,
    # and the LR schedule where the uninterrupted run left it
    def scheduler(stdout: str) -> list[str]:
        return [line.split(" ", 1)[1] for line in stdout.splitlines() if " scheduler " in line]

    for name, out in (("mid", "cut"), ("epoch0", "cut-epoch0")):
        weights = torch.load(tmp_path / out / "final.pt", weights_only=True)
        for key, value in full_weights.items():
            assert torch.equal(value, weights[key]), f"resumed from {name}: {key}"
        assert scheduler(outputs[name][1]) == scheduler(full_stdout), name


def test_after_a_ctrl_c_in_process_the_next_ctrl_c_still_interrupts(stripes_folder, tmp_path):
    class CtrlC(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raise KeyboardInterrupt  # as a Ctrl+C in a notebook's kernel would, mid-epoch

    before = signal.getsignal(signal.SIGINT)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[CtrlC()], num_sanity_val_steps=0)
    with pytest.raises(SystemExit) as info:
        trainer.fit(_tiny_model(), datamodule=_tiny_dm(stripes_folder))
    assert info.value.code == 1 and (tmp_path / "checkpoints" / "interrupted.ckpt").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # Lightning had set it to "ignore"


def test_resuming_from_a_checkpoint_with_pickled_code_is_refused(stripes_folder, tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": L.LightningModule}, evil)  # a class: needs unpickling code
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    with pytest.raises(CheckpointError, match=r"refused to resume from '.*evil.ckpt': it holds pickled code"):
        trainer.fit(_tiny_model(), datamodule=_tiny_dm(stripes_folder), ckpt_path=str(evil))
    with pytest.raises(CheckpointError, match=r"no checkpoint to resume from at '.*missing.ckpt'"):
        trainer.fit(
            _tiny_model(), datamodule=_tiny_dm(stripes_folder), ckpt_path=str(tmp_path / "missing.ckpt")
        )
