"""The LightningModule on a real Trainer: learning, LR decay, freezing, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, quiet_trainer
from lightning.pytorch.callbacks import Callback

from transferkit import FreezeSchedule, ImageDataModule, Trainer, TransferClassifier


def _trainer(tmp_path, **kwargs) -> Trainer:
    return quiet_trainer(tmp_path, **kwargs)


def _model(**kwargs) -> TransferClassifier:
    return TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False, **kwargs)


def test_fit_on_learnable_images_beats_chance_clearly(stripes_folder_large, tmp_path):
    L.seed_everything(0)
    dm = ImageDataModule(
        source="folder", root=str(stripes_folder_large), num_workers=0, batch_size=32, augment="none", **NORM
    )
    model = _model(lr=3e-3, layer_decay=1.0, hidden_dims=(64,))  # from scratch: no smaller LR low down
    trainer = _trainer(tmp_path, max_epochs=12)
    trainer.fit(model, datamodule=dm)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert result["test_acc"] >= 0.85, result  # chance is 0.5


class _RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_exponential_decay_per_optimizer_step_in_every_group(stripes_folder, tmp_path):
    dm = ImageDataModule(source="folder", root=str(stripes_folder), num_workers=0, batch_size=8, **NORM)
    model = _model(lr=1e-2, layer_decay=0.5, decay_rate=0.1, decay_steps=4)
    record = _RecordLR()
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[record], limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adam)
    names = [g["name"] for g in optimizer.param_groups]
    assert names[0] == "head" and len(names) == 1 + len(model.groups)
    for step, lrs in enumerate(record.lrs):
        for depth, lr in enumerate(lrs):  # head, then backbone top (depth 1) to bottom
            expected = 1e-2 * 0.5**depth * 0.1 ** (step / 4)
            assert lr == pytest.approx(expected, rel=1e-6), (step, depth)


def test_a_frozen_epoch_leaves_the_backbone_and_its_batchnorm_untouched(stripes_folder, tmp_path):
    dm = ImageDataModule(source="folder", root=str(stripes_folder), num_workers=0, batch_size=8, **NORM)
    model = _model(freeze_schedule=FreezeSchedule(frozen_epochs=1))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.fc.weight.clone()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=dm)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert not torch.equal(head_before, model.head.fc.weight)
    assert model.trainable_groups == 0


def test_the_checkpoint_loads_safely_and_holds_the_recipe(stripes_folder, tmp_path):
    dm = ImageDataModule(source="folder", root=str(stripes_folder), num_workers=0, batch_size=8, **NORM)
    model = _model(
        class_names=["horizontal", "vertical"], freeze_schedule=FreezeSchedule(frozen_epochs=1), max_norm=3.0
    )
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    path = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(path, weights_only=True)  # plain data, no pickled code
    hparams = checkpoint["hyper_parameters"]
    assert hparams["backbone"] == TINY_BACKBONE and hparams["max_norm"] == 3.0
    assert hparams["freeze_schedule"]["frozen_epochs"] == 1
    assert checkpoint["transferkit"]["class_names"] == ["horizontal", "vertical"]
    restored = TransferClassifier.load_from_checkpoint(path, weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))


def test_max_norm_holds_after_training_steps(stripes_folder, tmp_path):
    dm = ImageDataModule(source="folder", root=str(stripes_folder), num_workers=0, batch_size=8, **NORM)
    model = _model(max_norm=0.2, lr=0.05)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    norms = [
        m.weight.norm(dim=1).max().item() for m in model.head.modules() if isinstance(m, torch.nn.Linear)
    ]
    assert max(norms) <= 0.2 + 1e-5


@pytest.mark.parametrize(
    ("tta", "transform"), [("hflip", lambda x: x.flip(-1)), ("d4", lambda x: torch.rot90(x, 1, (-2, -1)))]
)
def test_test_time_augmentation_makes_predictions_invariant(tta, transform):
    torch.manual_seed(0)
    model = _model(tta=tta).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        probs = model.predict_proba(x)
        torch.testing.assert_close(model.predict_proba(transform(x)), probs, atol=1e-5, rtol=1e-4)
        plain = model.predict_proba(x, tta="none")
    assert not torch.allclose(plain, probs, atol=1e-4)  # the views really changed the prediction
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_channels_last_computes_the_same_function():
    torch.manual_seed(0)
    model = _model().eval()
    fast = _model(channels_last=True).eval()
    fast.load_state_dict(model.state_dict())
    fast.backbone.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)
