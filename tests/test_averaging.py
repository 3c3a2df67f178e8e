"""EMA of the weights: the average is what validation, checkpoints, test and the final model hold."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, quiet_trainer
from lightning.pytorch.callbacks import Callback

from transferkit import EMA, ImageDataModule, TransferClassifier
from transferkit.training.checkpointing import RunCheckpoint


class _RecordWeights(Callback):
    """The weights after every optimizer step (before any averaging callback swaps them)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _model() -> TransferClassifier:
    return TransferClassifier(
        num_classes=2,
        backbone=TINY_BACKBONE,
        pretrained=False,
        head={"hidden_dims": [16]},
        optimizer={"lr": 1e-2},
    )


def _data(root) -> ImageDataModule:
    return ImageDataModule(
        source="folder",
        root=str(root),
        pipeline={"augment": "none", **NORM},
        loader={"batch_size": 16},
        seed=0,
    )


@pytest.mark.slow
@pytest.mark.parametrize("start_epoch", [0, 1])
def test_the_model_after_fit_holds_the_running_average_of_the_weights(stripes_folder, tmp_path, start_epoch):
    L.seed_everything(0)
    decay = 0.8
    record = _RecordWeights()  # runs first, so it sees the raw weights of each step
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[record, EMA(decay=decay, start_epoch=start_epoch)],
    )
    model = _model()
    trainer.fit(model, datamodule=_data(stripes_folder))

    steps_per_epoch = len(record.steps) // 2
    expected = {k: v.clone() for k, v in record.steps[0].items()}
    for index, weights in enumerate(record.steps[1:], start=1):
        for name, value in weights.items():
            if index < start_epoch * steps_per_epoch or not value.is_floating_point():
                expected[name] = value.clone()  # before start_epoch the average is the weights
            else:
                expected[name].lerp_(value, 1 - decay)
    final = model.state_dict()
    head = (
        "head.net.0.weight"
        if "head.net.0.weight" in final
        else next(k for k in final if k.startswith("head"))
    )
    assert not torch.allclose(final[head], record.steps[-1][head]), "the model kept its raw last weights"
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} is not the EMA")


@pytest.mark.slow
def test_best_checkpoint_is_tested_with_its_averaged_weights(stripes_folder, tmp_path):
    L.seed_everything(0)
    data = _data(stripes_folder)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[EMA(decay=0.9), checkpoint])
    model = _model()
    trainer.fit(model, datamodule=data)
    tested = trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)[0]

    stored = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    assert "current_model_state" in stored  # raw weights kept beside the average, for resuming
    averaged = TransferClassifier.load_from_checkpoint(checkpoint.best_model_path, weights_only=True)
    raw = TransferClassifier.load_from_checkpoint(checkpoint.best_model_path, weights_only=True)
    raw.load_state_dict(stored["current_model_state"])
    judged_averaged = quiet_trainer(tmp_path).test(averaged, datamodule=data, verbose=False)[0]
    judged_raw = quiet_trainer(tmp_path).test(raw, datamodule=data, verbose=False)[0]

    assert judged_averaged["test_loss"] != pytest.approx(judged_raw["test_loss"], abs=1e-6)
    assert tested["test_loss"] == pytest.approx(judged_averaged["test_loss"], abs=1e-5)
    # validation judged the averaged weights too: the best checkpoint's score is theirs
    validated = quiet_trainer(tmp_path).validate(averaged, datamodule=data, verbose=False)[0]
    assert validated["val_loss"] == pytest.approx(float(checkpoint.best_model_score), abs=1e-5)


@pytest.mark.slow
def test_resuming_restores_both_the_average_and_the_raw_weights(stripes_folder, tmp_path):
    L.seed_everything(0)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[EMA(decay=0.9), checkpoint]).fit(
        _model(), datamodule=_data(stripes_folder)
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    stored = torch.load(last, map_location="cpu", weights_only=True)

    ema, seen = EMA(decay=0.9), {}

    class _Inspect(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen["raw"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen["average"] = {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}

    resumed = quiet_trainer(
        tmp_path / "resumed",
        max_epochs=3,
        callbacks=[ema, _Inspect(), RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    resumed.fit(_model(), datamodule=_data(stripes_folder), ckpt_path=str(last))
    differs = [
        k for k, v in stored["state_dict"].items() if not torch.equal(v, stored["current_model_state"][k])
    ]
    assert differs, "the average equals the raw weights: nothing to tell apart"
    for name, value in stored["current_model_state"].items():
        assert torch.equal(seen["raw"][name], value), f"raw weight {name} not restored"
    for name, value in stored["state_dict"].items():
        assert torch.equal(seen["average"][name], value), f"averaged weight {name} not restored"


@pytest.mark.parametrize("kwargs", [{"decay": 1.0}, {"decay": -0.1}, {"start_epoch": -1}])
def test_bad_ema_settings_are_refused_with_the_value(kwargs):
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        EMA(**kwargs)
