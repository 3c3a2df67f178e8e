"""Precise BatchNorm statistics: the head is judged with statistics of its current inputs, training is
unchanged, and frozen BatchNorm layers keep theirs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, quiet_trainer
from torch import nn

from transferkit import ConfigError, FreezeSchedule, ImageDataModule, PreciseBN, TransferClassifier


def _data(root, batch_size: int) -> ImageDataModule:
    return ImageDataModule(
        source="folder",
        root=str(root),
        pipeline={"augment": "none", **NORM},
        loader={"batch_size": batch_size},
        seed=0,
    )


def _fit(root, tmp_path, callbacks, batch_size: int = 8) -> tuple[TransferClassifier, ImageDataModule]:
    L.seed_everything(0)
    data = _data(root, batch_size)
    model = TransferClassifier(
        num_classes=2,
        backbone=TINY_BACKBONE,
        pretrained=False,
        # dropout masks: a callback that drew random numbers would change the weights
        head={"hidden_dims": [16], "dropout": 0.5},
        optimizer={"lr": 3e-2},
        # the backbone's top unfreezes at epoch 1 while its BatchNorm stays on its own statistics
        freeze_schedule=FreezeSchedule(milestones={0: 0, 1: 2}, bn_policy="eval"),
    )
    trainer = quiet_trainer(tmp_path, max_epochs=3, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(model, datamodule=data)
    return model, data


def _head_norm(model: TransferClassifier) -> nn.BatchNorm1d:
    return next(m for m in model.head.modules() if isinstance(m, nn.BatchNorm1d))


@torch.no_grad()
def _statistics_of_training_inputs(model: TransferClassifier, data: ImageDataModule) -> tuple:
    """Mean and unbiased variance, per feature, of what the head's BatchNorm receives on the whole
    training split from the model's final weights."""
    norm, seen = _head_norm(model), []
    hook = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.eval()
    for images, _ in data.train_dataloader():
        model(images)
    hook.remove()
    inputs = torch.cat(seen)
    return inputs.mean(0), inputs.var(0, unbiased=True)


def test_the_head_is_judged_with_statistics_of_its_current_inputs_and_training_is_unchanged(
    stripes_folder, tmp_path
):
    # one batch per epoch: the recomputed statistics are then exactly the training split's
    probe = _data(stripes_folder, 1)
    probe.setup("fit")
    size = len(probe.split_indices["train"])
    plain, _ = _fit(stripes_folder, tmp_path / "plain", [], batch_size=size)
    callback = PreciseBN(batches=1000)
    precise, data = _fit(stripes_folder, tmp_path / "precise", [callback], batch_size=size)

    # the weights trained exactly as without the callback (same dropout masks, same batches)
    for (name, value), (_, other) in zip(plain.named_parameters(), precise.named_parameters(), strict=True):
        assert torch.equal(value, other), f"{name} trained differently with PreciseBN"
    # the backbone's BatchNorm layers (eval policy) keep the statistics they had
    for (name, value), (_, other) in zip(
        plain.backbone.named_buffers(), precise.backbone.named_buffers(), strict=True
    ):
        assert torch.equal(value, other), f"frozen BatchNorm buffer {name} was changed"

    mean, var = _statistics_of_training_inputs(precise, data)
    norm, stale = _head_norm(precise), _head_norm(plain)
    torch.testing.assert_close(norm.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_var, var, rtol=1e-4, atol=1e-5)
    # without it, the running averages lag behind the weights: a check that could fail
    assert (stale.running_mean - mean).abs().max() > 10 * (norm.running_mean - mean).abs().max() + 1e-3

    # once per epoch (before validation, not again at the epoch's end), a count checkpoints keep
    assert callback.recomputed == 3
    restored = PreciseBN()
    restored.load_state_dict(callback.state_dict())
    assert restored.recomputed == 3


@pytest.mark.parametrize("batches", [0, -3, 2.5, True])
def test_a_bad_number_of_batches_is_refused_with_the_value(batches):
    with pytest.raises(ConfigError, match=f"got {batches!r}"):
        PreciseBN(batches=batches)
