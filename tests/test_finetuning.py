"""Freezing on a schedule: groups, resume, LR schedules across unfreezes, BatchNorm, no wasted backward."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, make_stripes_folder, merged, quiet_trainer, run_cli
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from transferkit import FreezeSchedule, ImageDataModule, Trainer, TransferClassifier
from transferkit.errors import BackboneError
from transferkit.finetuning import backbone_groups
from transferkit.models.backbones import create_backbone

TESTS = Path(__file__).resolve().parent


def _dm(root: Path, **kwargs) -> ImageDataModule:
    return ImageDataModule(
        source="folder",
        root=str(root),
        **merged(
            {"pipeline": {"augment": "none", **NORM}, "loader": {"num_workers": 0, "batch_size": 8}}, kwargs
        ),
    )


def _model(schedule: FreezeSchedule | None = None, **kwargs) -> TransferClassifier:
    kwargs = {"optimizer": {"lr": 1e-2, "layer_decay": 0.5}, "head": {"dropout": 0.3}, **kwargs}
    return TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, freeze_schedule=schedule, **kwargs
    )


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    return quiet_trainer(tmp_path, **{"enable_checkpointing": False, "num_sanity_val_steps": 0, **kwargs})


# --- groups and schedules ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY_BACKBONE, "test_resnet", "test_vit"])
def test_groups_follow_timm_stages_and_cover_every_parameter(name):
    backbone = create_backbone(name, pretrained=False)
    groups = backbone_groups(backbone)
    names = [n for n, _ in backbone.model.named_parameters()]
    flat = [n for group in groups for n in group]
    assert len(groups) >= 3
    assert sorted(flat) == sorted(names) and len(set(flat)) == len(flat)
    assert names[0] in groups[0]  # the stem is the bottom group
    assert names[-1] in groups[-1]  # the final layers are the top group


def test_a_backbone_without_stages_is_refused_before_training():
    with pytest.raises(BackboneError, match="no group_matcher"):
        backbone_groups(create_backbone("pit_ti_224", pretrained=False))
    with pytest.raises(BackboneError, match="cannot split it into freezable groups"):
        TransferClassifier(
            num_classes=2,
            backbone="pit_ti_224",
            pretrained=False,
            freeze_schedule=FreezeSchedule(frozen_epochs=1),
        )


def test_the_three_ways_to_write_a_schedule():
    epochs = range(7)
    assert [FreezeSchedule(frozen_epochs=2).trainable_groups(e, 5) for e in epochs] == [0, 0, 5, 5, 5, 5, 5]
    gradual = FreezeSchedule(frozen_epochs=1, unfreeze_every=2)
    assert [gradual.trainable_groups(e, 5) for e in epochs] == [0, 1, 1, 2, 2, 3, 3]
    milestones = FreezeSchedule.coerce({"milestones": {"1": 2, "4": -1}})  # as YAML gives it
    assert [milestones.trainable_groups(e, 5) for e in epochs] == [0, 2, 2, 2, 5, 5, 5]
    assert not FreezeSchedule().active
    with pytest.raises(ValueError, match="unfreeze_every"):
        FreezeSchedule(unfreeze_every=0)


# --- resume -----------------------------------------------------------------------------------------


class _StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _weights(model: TransferClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [0, 2], ids=["before-first-unfreeze", "after-first-unfreeze"])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(stripes_folder, tmp_path, stop_after):
    schedule = FreezeSchedule(frozen_epochs=1, unfreeze_every=1, warmup_steps=3)
    epochs = 4

    L.seed_everything(0)
    model = _model(schedule)
    _trainer(tmp_path / "full", max_epochs=epochs).fit(model, datamodule=_dm(stripes_folder))
    uninterrupted = _weights(model)

    L.seed_everything(0)
    model = _model(schedule)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(
        tmp_path / "cut",
        max_epochs=epochs,
        enable_checkpointing=True,
        callbacks=[checkpoint, _StopAfterEpoch(stop_after)],
    )
    trainer.fit(model, datamodule=_dm(stripes_folder))
    assert trainer.current_epoch == stop_after + 1  # really stopped early

    L.seed_everything(123)  # the resumed process starts from another state; the checkpoint must restore it
    resumed_model = _model(schedule)
    _trainer(tmp_path / "resumed", max_epochs=epochs).fit(
        resumed_model, datamodule=_dm(stripes_folder), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    resumed = _weights(resumed_model)
    assert resumed_model.trainable_groups == uninterrupted_groups(schedule, resumed_model, epochs)
    worst = max((resumed[k].double() - uninterrupted[k].double()).abs().max().item() for k in uninterrupted)
    assert worst <= 1e-6


class _RecordBatches(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images, labels = batch
        self.batches.append((trainer.current_epoch, images.clone(), labels.clone()))


@pytest.mark.slow
def test_a_run_resumed_in_the_same_process_with_loader_workers_sees_the_uninterrupted_batches(
    stripes_folder, tmp_path
):
    # Lightning iterates the train loader once before set_epoch when it resumes; workers draw their
    # first indices right then. The resumed epoch must still get its own order and augmentations.
    def data() -> ImageDataModule:
        return ImageDataModule(
            source="folder",
            root=str(stripes_folder),
            pipeline={"augment": "light", **NORM},
            loader={"num_workers": 2, "batch_size": 8},
            seed=0,
        )

    L.seed_everything(0)
    full = _RecordBatches()
    _trainer(tmp_path / "full", max_epochs=2, callbacks=[full]).fit(_model(), datamodule=data())

    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cut = _trainer(
        tmp_path / "cut", max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint, _StopAfterEpoch(0)]
    )
    cut.fit(_model(), datamodule=data())
    resumed = _RecordBatches()
    _trainer(tmp_path / "resumed", max_epochs=2, callbacks=[resumed]).fit(
        _model(), datamodule=data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )

    expected = [b for b in full.batches if b[0] == 1]
    assert [b[0] for b in resumed.batches] == [1] * len(expected)
    for (_, images, labels), (_, want_images, want_labels) in zip(resumed.batches, expected, strict=True):
        assert torch.equal(labels, want_labels)
        assert torch.equal(images, want_images)


def uninterrupted_groups(schedule: FreezeSchedule, model: TransferClassifier, epochs: int) -> int:
    return schedule.trainable_groups(epochs - 1, len(model.groups))


# --- learning rates ---------------------------------------------------------------------------------


class _RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def _onecycle(t: float, total: int) -> float:
    up, down = 0.45 * total, 0.9 * total
    if t <= up:
        return 0.1 + 0.9 * t / up
    if t <= down:
        return 1.0 - 0.9 * (t - up) / (down - up)
    return 0.1 - 0.099 * (t - down) / (total - down)


SCHEDULE_FORMULAS = {
    "exponential": lambda t, total: 0.1 ** (t / total),
    "cosine": lambda t, total: 0.5 * (1 + math.cos(math.pi * t / total)),
    "onecycle": _onecycle,
    "piecewise": lambda t, total: 0.1 ** sum(t >= m for m in (2 * total // 5, 4 * total // 5)),
}


@pytest.mark.slow
@pytest.mark.parametrize("schedule_name", [*SCHEDULE_FORMULAS, "performance"])
def test_every_group_has_the_expected_lr_at_every_step_across_unfreezes(
    stripes_folder, tmp_path, schedule_name
):
    epochs, warmup = 5, 0 if schedule_name == "performance" else 4
    freeze = FreezeSchedule(frozen_epochs=1, unfreeze_every=1, warmup_steps=warmup)
    model = _model(
        freeze,
        optimizer={"lr": 1e-2, "layer_decay": 0.5},
        lr_schedule={"name": schedule_name, "milestones": [2, 4], "plateau_patience": 0},
    )
    record = _RecordLR()
    trainer = _trainer(tmp_path, max_epochs=epochs, callbacks=[record])
    trainer.fit(model, datamodule=_dm(stripes_folder))
    total = int(trainer.estimated_stepping_batches)
    per_epoch = total // epochs
    assert len(record.lrs) == total and len(record.lrs[0]) == 1 + len(model.groups)

    for step, lrs in enumerate(record.lrs):
        for depth, lr in enumerate(lrs):  # 0 = head, 1 = top backbone group, ...
            base = 1e-2 * 0.5**depth
            if schedule_name == "performance":
                # reductions multiply every group alike: the discriminative ratios hold
                assert lr / lrs[0] == pytest.approx(0.5**depth, rel=1e-9)
                continue
            unfreeze_step = 0 if depth == 0 else (freeze.frozen_epochs + depth - 1) * per_epoch
            ramp = 1.0 if unfreeze_step == 0 else min(1.0, max(0.0, (step - unfreeze_step + 1) / warmup))
            expected = base * SCHEDULE_FORMULAS[schedule_name](step, total) * ramp
            assert lr == pytest.approx(expected, rel=1e-6, abs=1e-12), (schedule_name, step, depth)
    if schedule_name == "performance":
        assert record.lrs[-1][0] < record.lrs[0][0]  # patience 0 on noisy validation: it did reduce


# --- BatchNorm and autograd ---------------------------------------------------------------------------


class _CallTrainEveryBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.train()  # what user code and other callbacks do; frozen BN must stay frozen anyway


def _bn_stats(model: TransferClassifier) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in model.backbone.state_dict().items() if "running_" in k or "num_batches" in k
    }


@pytest.mark.parametrize("bn_policy", ["frozen", "train"])
def test_batchnorm_policy_of_frozen_groups(stripes_folder, tmp_path, bn_policy):
    model = _model(FreezeSchedule(frozen_epochs=1, bn_policy=bn_policy))
    before = _bn_stats(model)
    weights = {k: v.clone() for k, v in model.backbone.named_parameters()}
    _trainer(tmp_path, max_epochs=1, callbacks=[_CallTrainEveryBatch()]).fit(
        model, datamodule=_dm(stripes_folder)
    )
    after = _bn_stats(model)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    assert unchanged == (bn_policy == "frozen")
    assert all(torch.equal(weights[k], v) for k, v in model.backbone.named_parameters())  # frozen either way


class _GradientRecorder(Callback):
    def __init__(self) -> None:
        self.with_grad: set[str] = set()

    def on_after_backward(self, trainer, pl_module) -> None:
        self.with_grad |= {n for n, p in pl_module.backbone.model.named_parameters() if p.grad is not None}


def test_frozen_groups_run_no_backward(stripes_folder, tmp_path):
    model = _model(FreezeSchedule(milestones={0: 2}))
    recorder = _GradientRecorder()
    _trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[recorder]).fit(
        model, datamodule=_dm(stripes_folder)
    )
    top_two = {n for group in model.groups[-2:] for n in group}
    assert recorder.with_grad == top_two
    # below the lowest trainable group autograd records nothing at all
    bottom = model.backbone.model.conv_stem
    output = bottom(torch.randn(1, 3, 32, 32))
    assert not output.requires_grad


# --- DDP --------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, {tests!r})
from conftest import NORM, TINY_BACKBONE

import transferkit as tk

OUT = Path({out!r})


class Save(Callback):
    def on_fit_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            torch.save(dict(pl_module.named_parameters()), OUT / "initial.pt")

    def on_train_end(self, trainer, pl_module):
        params = {{k: v.detach().clone() for k, v in pl_module.named_parameters()}}
        torch.save(params, OUT / f"rank{{trainer.global_rank}}.pt")


if __name__ == "__main__":
    import lightning as L

    L.seed_everything(0)
    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, optimizer={{"lr": 1e-2, "layer_decay": 1.0}},
        freeze_schedule=tk.FreezeSchedule(frozen_epochs=1),
    )
    data = tk.ImageDataModule(
        source="folder", root={root!r}, loader={{"num_workers": 0, "batch_size": 8}},
        pipeline={{"augment": "light", **NORM}},
    )
    trainer = tk.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Save()],
    )
    trainer.fit(model, datamodule=data)
"""


@pytest.mark.slow
def test_ddp_two_processes_stay_identical_after_an_unfreeze(tmp_path):
    root = make_stripes_folder(tmp_path / "data", per_class=24)
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(TESTS), out=str(tmp_path), root=str(root))))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # the backbone was unfrozen in epoch 1 and really trained (on different shards, in sync)
    changed = [n for n in rank0 if n.startswith("backbone.") and not torch.equal(rank0[n], initial[n])]
    assert len(changed) > 0.9 * sum(n.startswith("backbone.") for n in rank0)


DDP_RESUME_SCRIPT = """
import shutil
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, {tests!r})
from conftest import NORM, TINY_BACKBONE

import transferkit as tk

OUT, MODE = Path({out!r}), sys.argv[1]


class Record(Callback):  # what each rank trains on in epoch 1
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            with open(OUT / f"{{MODE}}-rank{{trainer.global_rank}}.txt", "a") as f:
                f.write(f"{{batch_idx}} {{float(batch[0].double().sum()):.6f}} {{batch[1].tolist()}}\\n")


class KeepEpoch0(Callback):  # the checkpoint of epoch 0's end, as a run stopped there leaves it
    def on_train_epoch_start(self, trainer, pl_module):
        if MODE == "full" and trainer.current_epoch == 1 and trainer.global_rank == 0:
            shutil.copy(OUT / "ckpt" / "last.ckpt", OUT / "epoch0.ckpt")


class SaveMidEpoch(Callback):  # a checkpoint after epoch 1's first batch, as a callback would write it
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if MODE == "full" and trainer.current_epoch == 1 and batch_idx == 0:
            trainer.save_checkpoint(OUT / "mid.ckpt")


if __name__ == "__main__":
    import lightning as L

    L.seed_everything(0)
    model = tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    data = tk.ImageDataModule(
        source="folder", root={root!r}, loader={{"num_workers": 2, "batch_size": 8}}, seed=0,
        pipeline={{"augment": "light", **NORM}},
    )
    callbacks = [
        Record(), KeepEpoch0(), SaveMidEpoch(), ModelCheckpoint(dirpath=OUT / "ckpt", save_last=True)
    ]
    trainer = tk.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    resume_from = {{"resume": OUT / "epoch0.ckpt", "resume-mid": OUT / "mid.ckpt"}}.get(MODE)
    trainer.fit(model, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
"""


@pytest.mark.slow
def test_ddp_with_loader_workers_resumes_into_the_uninterrupted_batches_at_and_within_an_epoch(tmp_path):
    root = make_stripes_folder(tmp_path / "data", per_class=32)
    script = tmp_path / "ddp_resume.py"
    script.write_text(
        textwrap.dedent(DDP_RESUME_SCRIPT.format(tests=str(TESTS), out=str(tmp_path), root=str(root)))
    )
    for mode in ("full", "resume", "resume-mid"):
        result = subprocess.run(
            [sys.executable, str(script), mode], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        full = (tmp_path / f"full-rank{rank}.txt").read_text().splitlines()
        resumed = (tmp_path / f"resume-rank{rank}.txt").read_text().splitlines()
        assert len(full) > 1, f"rank {rank} recorded {len(full)} batches of epoch 1"
        assert resumed == full, f"rank {rank}: the resumed epoch trained on other batches"
        # resumed after epoch 1's first batch: the epoch's other batches, in the same processes
        resumed_mid = (tmp_path / f"resume-mid-rank{rank}.txt").read_text().splitlines()
        assert resumed_mid == full[1:], f"rank {rank}: the epoch resumed mid-way trained on other batches"


# --- plan -------------------------------------------------------------------------------------------


def test_plan_prints_one_row_per_phase(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            trainer: {{max_epochs: 5, accelerator: cpu}}
            model:
              backbone: {TINY_BACKBONE}
              pretrained: false
              freeze_schedule: {{frozen_epochs: 2, unfreeze_every: 1}}
              runtime: {{progressive_resizing: {{1: 12, 4: 16}}}}
            data: {{source: digits, pipeline: {{image_size: 16, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}, loader: {{num_workers: 0}}}}
            """
        )
    )
    result = run_cli("plan", "--config", str(recipe), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    phase_rows = [r for r in rows if "/6" in r]
    # a phase ends where the trainable groups or the training image size change
    assert [r.split("│")[1].strip() for r in phase_rows] == ["0", "1", "2", "3", "4"]
    assert [r.split("│")[2].strip() for r in phase_rows] == ["0/6", "0/6", "1/6", "2/6", "3/6"]
    assert [r.split("│")[-2].strip() for r in phase_rows] == ["16 px", "12 px", "12 px", "12 px", "16 px"]
    assert "frozen groups: eval" in phase_rows[0] and "head=" in phase_rows[0] and "g5=" not in phase_rows[0]
    assert "g5=" in phase_rows[2]


def test_plan_of_a_recipe_with_lr_auto_shows_rates_relative_to_the_head():
    import transferkit as tk

    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, optimizer={"lr": "auto", "layer_decay": 0.5}, lr_schedule={"name": "none"}, freeze_schedule=tk.FreezeSchedule(frozen_epochs=2),
    )  # fmt: skip
    result = tk.plan(model, max_epochs=4)
    assert (
        result.relative_rates and model.settings.optimizer.lr == "auto"
    )  # planning leaves the recipe as it was
    head, unfrozen = result.phases
    assert head.group_lrs == {"head": 1.0}
    # the top group at layer_decay times the head's rate, each group below half again
    assert unfrozen.group_lrs["backbone.5"] == pytest.approx(0.5) and unfrozen.group_lrs[
        "backbone.4"
    ] == pytest.approx(0.25)


def test_probe_scores_every_depth_and_suggests_how_deep_to_unfreeze(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            trainer: {{max_epochs: 1, accelerator: cpu, default_root_dir: {str(tmp_path)!r}}}
            model: {{backbone: {TINY_BACKBONE}, pretrained: false}}
            data: {{source: digits, pipeline: {{image_size: 16, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}, loader: {{num_workers: 0}}}}
            """
        )
    )
    result = run_cli("probe", "--config", str(recipe), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("│ g")]
    assert [r.split("│")[1].strip() for r in rows] == [f"g{i}" for i in range(6)]
    val_accs = [float(r.split("│")[5].strip(" *")) for r in rows]
    assert max(val_accs) > 0.5  # ten digit classes: chance is 0.1, even random conv features do far better
    assert "suggestion: " in result.stdout and "unfreeze the top" in result.stdout.lower()
    assert list(tmp_path.glob("feature_cache/probe-train-g*.pt"))  # cached for the next probe


def test_probe_and_plan_are_functions_that_write_nothing_to_the_current_folder(tmp_path, monkeypatch):
    import transferkit as tk

    monkeypatch.chdir(tmp_path)  # where a surprise file would land
    norm = {"image_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    data = tk.ImageDataModule(
        source="digits", split={"max_samples": 400}, loader={"num_workers": 0}, pipeline=norm
    )
    model = tk.TransferClassifier(num_classes=10, backbone=TINY_BACKBONE, pretrained=False)
    report = tk.probe(model, data)
    assert [r.group for r in report.results] == list(range(6)) and report.suggestion
    assert max(r.val_acc for r in report.results) > 0.3  # ten classes: chance is 0.1
    assert list(tmp_path.iterdir()) == []  # no cache folder unless one is asked for
    cached = tk.probe(model, data, cache_dir=tmp_path / "cache")
    assert [r.val_acc for r in cached.results] == [r.val_acc for r in report.results]
    assert len(list((tmp_path / "cache").glob("probe-*.pt"))) == 12  # 6 groups x train/val
    phases = tk.plan(model, data, max_epochs=3).phases
    assert [(p.first_epoch, p.last_epoch, p.trainable_groups) for p in phases] == [(0, 2, 6)]


def test_bn_policy_eval_keeps_imagenet_statistics_while_the_backbone_trains(stripes_folder, tmp_path):
    model = _model(FreezeSchedule(bn_policy="eval"))  # nothing frozen, every group trains
    before = _bn_stats(model)
    weights = {k: v.clone() for k, v in model.backbone.named_parameters()}
    _trainer(tmp_path, max_epochs=1, callbacks=[_CallTrainEveryBatch()]).fit(
        model, datamodule=_dm(stripes_folder)
    )
    assert all(torch.equal(before[k], v) for k, v in _bn_stats(model).items())
    changed = [k for k, v in model.backbone.named_parameters() if not torch.equal(weights[k], v)]
    assert len(changed) == len(weights)  # BatchNorm scale and shift train too


def test_probe_suggestion_names_the_peak_and_prefers_a_deeper_group_within_a_point():
    from transferkit.tuning.probing import ProbeResult, suggest

    def results(*accs):
        return [ProbeResult(i, f"blocks.{i}", 8, 0.9, acc) for i, acc in enumerate(accs)]

    # the ELPV shape on EfficientNet-Lite0: a clear peak below the top, so retrain the groups above it
    groups, why = suggest(results(0.70, 0.80, 0.86, 0.83))
    assert groups == 2 and "peak after group g2" in why and "fall to 0.830" in why
    # the top is within a point of a lower peak: build on the top, and say it is not the peak itself
    groups, why = suggest(results(0.70, 0.80, 0.855, 0.848))
    assert groups == 2 and "within a point of the best (g2, blocks.2: 0.855)" in why
    groups, why = suggest(results(0.70, 0.80, 0.84, 0.86))
    assert groups == 2 and "features probe best (val acc 0.860)" in why


def test_early_stopping_gives_each_freeze_phase_its_own_patience(stripes_folder, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from transferkit.training.early_stopping import PhaseEarlyStopping

    epochs, saved = {}, {}
    for kind in (EarlyStopping, PhaseEarlyStopping):
        # a min_delta no epoch can beat: only the first check after a (re)start sets a best score
        stop = kind(monitor="val_loss", patience=2, min_delta=100.0)
        trainer = _trainer(tmp_path / kind.__name__, max_epochs=8, callbacks=[stop])
        trainer.fit(_model(FreezeSchedule(milestones={0: 0, 2: -1})), datamodule=_dm(stripes_folder))
        epochs[kind.__name__], saved[kind.__name__] = trainer.current_epoch, stop.state_dict()
    # counted across phases: epoch 0 sets the best, 1 and 2 miss it: the run stops after 3 epochs;
    # per phase: the unfreeze at epoch 2 starts a new count (2 sets it, 3 and 4 miss): 5 epochs
    assert epochs == {"EarlyStopping": 3, "PhaseEarlyStopping": 5}
    # the phase travels with the callback's state, so a resumed run keeps counting in the same phase
    assert saved["PhaseEarlyStopping"]["phase"] == 6  # every group of the tiny backbone trains
    restored = PhaseEarlyStopping(monitor="val_loss")
    restored.load_state_dict(saved["PhaseEarlyStopping"])
    assert restored.phase == 6 and restored.wait_count == 2


RANK_CALLBACK = """
import torch
from lightning.pytorch.callbacks import Callback


class SaveRank(Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.seen = []

    def on_train_epoch_start(self, trainer, pl_module):
        # the indices this rank's loader draws this epoch (Lightning's distributed sampler wraps ours)
        drawn = list(trainer.train_dataloader.sampler)
        self.seen.append([int(i[-1]) if isinstance(i, (tuple, list)) else int(i) for i in drawn])

    def on_train_end(self, trainer, pl_module):
        params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        info = {"params": params, "seen": self.seen, "world_size": trainer.world_size,
                "num_nodes": trainer.num_nodes, "node_rank": trainer.node_rank,
                "trainable_groups": pl_module.trainable_groups}
        torch.save(info, f"{self.out}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_two_nodes_launched_with_torchrun_train_one_model_on_split_data(tmp_path):
    """The multi-node launch of docs/guide.md, on one machine: two torchrun node ranks over gloo, one process each."""
    import socket

    root = make_stripes_folder(tmp_path / "data", per_class=24)
    (tmp_path / "ranksave.py").write_text(RANK_CALLBACK)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          max_epochs: 2
          logger: false
          enable_progress_bar: false
          default_root_dir: {tmp_path / "run"}
          callbacks: [{{class_path: ranksave.SaveRank, init_args: {{out: {tmp_path}}}}}]
        model:
          backbone: {TINY_BACKBONE}
          pretrained: false
          optimizer: {{lr: 0.01}}
          freeze_schedule: {{frozen_epochs: 1}}
        data:
          source: folder
          root: {root}
          loader: {{num_workers: 0, batch_size: 8}}
          pipeline: {{image_size: 32, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}
        """)
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "transferkit", "fit", "--config", str(recipe),
             "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["node_rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["num_nodes"] == 2 and r["trainable_groups"] > 0 for r in ranks)  # unfrozen in epoch 1
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name  # one model, kept in sync
    for epoch in range(2):  # each rank drew its own half of the training split
        first, second = (set(r["seen"][epoch]) for r in ranks)
        assert first and second and not first & second
