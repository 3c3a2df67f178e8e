"""The learning-rate finder: a range test per phase of the freeze schedule, lr-find and model.lr: auto."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, merged, quiet_trainer, run_cli

import transferkit as tk
from transferkit.training.lr_finder import SKIP_BEGIN


def digits(**kwargs) -> tk.ImageDataModule:
    return tk.ImageDataModule(
        source="digits", **merged({"loader": {"num_workers": 0, "batch_size": 32}, "pipeline": NORM}, kwargs)
    )


@pytest.mark.slow
def test_the_suggested_rate_trains_and_a_hundred_times_larger_one_diverges(tmp_path):
    L.seed_everything(0)
    model = tk.TransferClassifier(
        num_classes=10, backbone=TINY_BACKBONE, pretrained=False, lr_schedule={"name": "none"}
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tk.lr_find(model, digits(), steps=60, out=tmp_path / "lr_find.png")
    assert [s.phase for s in report.sweeps] == ["all"] and report.png.is_file()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights put back
    found = report.values["lr"]
    results = {}
    for lr in (found, 100 * found):
        L.seed_everything(0)
        model = tk.TransferClassifier(
            num_classes=10,
            backbone=TINY_BACKBONE,
            pretrained=False,
            optimizer={"lr": lr},
            lr_schedule={"name": "none"},
        )
        trainer = quiet_trainer(tmp_path / f"run-{lr}", max_epochs=3, enable_checkpointing=False)
        trainer.fit(model, digits())
        results[lr] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    good, bad = results[found], results[100 * found]
    assert good["val_acc"] >= 0.7 and good["train_loss"] < 1.0  # chance is 0.1, loss 2.3
    assert bad["train_loss"] > 10 * good["train_loss"] and bad["val_acc"] < good["val_acc"] - 0.3


def test_a_freeze_schedule_gets_a_sweep_per_phase_with_layer_decay_kept(tmp_path, monkeypatch):
    from transferkit.training import lr_finder

    L.seed_everything(0)
    model = tk.TransferClassifier(
        num_classes=10, backbone=TINY_BACKBONE, pretrained=False, optimizer={"layer_decay": 0.5}, freeze_schedule={"milestones": {1: 2}},
    )  # fmt: skip
    seen = []
    sweep = lr_finder._own_sweep

    def spy(model, datamodule, epoch, steps, min_lr, max_lr, swept, fixed):
        seen.append((epoch, swept, fixed))
        return sweep(model, datamodule, epoch, steps, min_lr, max_lr, swept, fixed)

    monkeypatch.setattr(lr_finder, "_own_sweep", spy)
    dm = digits()
    assert len(dm.data) // 32 > 30  # the head phase (epoch 0) holds the sweep: Lightning's finder runs it
    report = tk.lr_find(
        model, dm, steps=30, root_dir=tmp_path, caches=tk.FreezeAndCache(feature_cache="clean")
    )
    head, backbone = report.sweeps
    assert (head.phase, head.parameter, backbone.phase, backbone.parameter) == (
        "head",
        "lr",
        "backbone",
        "backbone_lr",
    )
    assert len(head.lrs) == 30 and len(backbone.lrs) <= 30
    assert backbone.epoch == 1 and head.suggestion and backbone.suggestion
    # each suggestion sits where the loss is falling, past the first points of its sweep
    for sweep in (head, backbone):
        at = sweep.lrs.index(sweep.suggestion)
        assert at >= SKIP_BEGIN and sweep.losses[at + 1] < sweep.losses[at - 1]
    top = len(model.freezing.groups) - 1
    # the head first trains at its rate (as the frozen epoch would), then the top two groups are swept
    assert seen == [
        (0, {"head": 1.0}, {}),
        (1, {f"backbone.{top}": 1.0, f"backbone.{top - 1}": 0.5}, {"head": head.suggestion}),
    ]
    assert (tmp_path / "feature_cache").is_dir()  # the head phase trained on the cached features


@pytest.mark.slow
def test_lr_auto_is_found_at_fit_logged_and_kept_in_the_checkpoint_and_lr_find_prints_it(
    tmp_path, monkeypatch
):
    L.seed_everything(0)
    model = tk.TransferClassifier(
        num_classes=10,
        backbone=TINY_BACKBONE,
        pretrained=False,
        optimizer={"lr": "auto"},
        freeze_schedule={"frozen_epochs": 1},
    )
    with pytest.raises(tk.ConfigError, match="model.optimizer.lr is 'auto' and no range test has set it"):
        model.configure_optimizers()
    trainer = quiet_trainer(tmp_path, max_epochs=2, logger=True)
    trainer.fit(model, digits(split={"max_samples": 400}))
    lr, backbone_lr = model.settings.optimizer.lr, model.settings.optimizer.backbone_lr
    assert isinstance(lr, float) and isinstance(backbone_lr, float) and backbone_lr < lr
    assert (tmp_path / "lightning_logs" / "version_0" / "lr_find.png").is_file()
    saved = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)["hyper_parameters"]
    assert saved["optimizer"]["lr"] == lr and saved["optimizer"]["backbone_lr"] == backbone_lr
    assert [s["phase"] for s in saved["lr_found"]] == ["head", "backbone"]
    hparams = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert f"lr: {lr}" in hparams  # logged

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{backbone: {TINY_BACKBONE}, pretrained: false, freeze_schedule: {{frozen_epochs: 1}}}}\n"
        "data: {source: digits, pipeline: {image_size: 32, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]},"
        " loader: {num_workers: 0}, split: {max_samples: 400}}\n"
        f"trainer: {{default_root_dir: {tmp_path / 'cli'}}}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the folder the command runs in gets nothing
    result = run_cli("lr-find", "--config", str(recipe), "--steps", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "head phase (epoch 0): lr = " in result.stdout
        and "backbone phase (epoch 1): backbone_lr = " in result.stdout
    )
    # the picture goes beside the recipe's runs, and the command says where
    assert (
        "In the recipe: model.optimizer.lr: " in result.stdout
        and f"wrote {tmp_path / 'cli' / 'lr_find.png'}." in result.stdout
    )
    assert (tmp_path / "cli" / "lr_find.png").is_file() and list(elsewhere.iterdir()) == []
    result = run_cli(
        "lr-find", "--config", str(recipe), "--steps", "30", "--out", str(tmp_path / "found.png")
    )
    assert result.returncode == 0 and (tmp_path / "found.png").is_file()


def test_noise_among_the_first_points_does_not_pull_the_suggestion_out_of_the_descent():
    import math

    import numpy as np

    from transferkit.training.lr_finder import suggest

    # the shape of ELPV's head sweep: the first smoothed points stand for a few batches and swing by 0.4
    # while the rate is far too small to learn; the loss then falls from 1.1 at 1e-5 to 0.72 at 2e-2, and
    # blows up above 0.1
    lrs = list(np.logspace(-6, 0, 100))
    rng = np.random.default_rng(0)
    losses = []
    for k, lr in enumerate(lrs):
        level = 1.1 - 0.38 * (1 + math.tanh(1.2 * (math.log10(lr) + 3.2))) / 2
        swing = 0.4 * math.sin(k) if k < 25 else 0.0  # the early swings
        blow = 3.0 * max(0.0, math.log10(lr) + 1.3)
        losses.append(level + swing + blow + rng.normal(0, 0.01))
    lr, why = suggest(lrs, losses)
    assert 1e-4 <= lr <= 1e-2, (lr, why)  # inside the descent, well below where the loss bottoms out
    assert "keeps falling" in why
    # a loss that only rises gives no suggestion, and says what to do
    lr, why = suggest(lrs, sorted(losses))
    assert lr is None and "never falls" in why


def test_a_flat_noisy_loss_gives_no_suggestion_rather_than_a_rate_picked_from_noise():
    import numpy as np

    from transferkit.training.lr_finder import SMOOTHING, suggest

    lrs = list(np.logspace(-6, 0, 100))
    for seed in range(5):  # labels that carry no signal: the loss only wobbles around its level
        raw = 1.0 + np.random.default_rng(seed).normal(0, 0.1, len(lrs))
        average, smoothed = 0.0, []
        for step, loss in enumerate(raw, 1):  # smoothed as lr_find smooths it
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            smoothed.append(average / (1 - SMOOTHING**step))
        lr, why = suggest(lrs, smoothed)
        assert lr is None and "falls only" in why and "labels" in why, (seed, lr, why)
    # the same wobble on a loss that falls by a third still gives a rate inside the fall
    falling = [
        s - 0.35 * (1 + np.tanh(2 * (np.log10(lr) + 3))) / 2 for s, lr in zip(smoothed, lrs, strict=True)
    ]
    lr, why = suggest(lrs, falling)
    assert lr is not None and 1e-5 <= lr <= 1e-1, why
