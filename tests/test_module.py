"""The LightningModule on a real Trainer: learning, LR decay, freezing, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, quiet_trainer
from lightning.pytorch.callbacks import Callback

from transferkit import FreezeSchedule, ImageDataModule, Trainer, TransferClassifier
from transferkit.errors import ConfigError
from transferkit.models.mixing import soft_cross_entropy


def _trainer(tmp_path, **kwargs) -> Trainer:
    return quiet_trainer(tmp_path, **kwargs)


def _model(**kwargs) -> TransferClassifier:
    return TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False, **kwargs)


@pytest.mark.slow
def test_fit_on_learnable_images_beats_chance_clearly(stripes_folder_large, tmp_path):
    L.seed_everything(0)
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder_large),
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0, "batch_size": 32},
    )
    model = _model(
        head={"hidden_dims": (64,)}, optimizer={"lr": 3e-3, "layer_decay": 1.0}
    )  # from scratch: no smaller LR low down
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
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"num_workers": 0, "batch_size": 8},
    )
    model = _model(
        optimizer={"lr": 1e-2, "layer_decay": 0.5}, lr_schedule={"decay_rate": 0.1, "decay_steps": 4}
    )
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


def test_backbone_lr_sets_the_top_group_and_layer_decay_the_groups_below(stripes_folder, tmp_path):
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"num_workers": 0, "batch_size": 8},
    )
    model = _model(
        optimizer={"lr": 1e-2, "backbone_lr": 1e-4, "layer_decay": 0.5}, lr_schedule={"name": "none"}
    )
    record = _RecordLR()
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[record], limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    head, *backbone = record.lrs[-1]  # head, then backbone top to bottom
    assert head == pytest.approx(1e-2)
    assert backbone == pytest.approx([1e-4 * 0.5**depth for depth in range(len(model.groups))])
    with pytest.raises(ValueError, match="model.optimizer.backbone_lr must be a number > 0"):
        _model(optimizer={"backbone_lr": 0.0})


def test_progressive_resizing_trains_small_then_full_and_always_validates_at_full_size(
    stripes_folder, tmp_path
):
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"num_workers": 0, "batch_size": 8},
    )
    model = _model(runtime={"progressive_resizing": {"0": 16, 2: 32}})  # YAML/CLI keys may arrive as strings
    seen: list[tuple[int, bool, tuple[int, int]]] = []  # (epoch, training step?, image size)
    model.backbone.register_forward_pre_hook(
        lambda _, args: seen.append((model.current_epoch, torch.is_grad_enabled(), tuple(args[0].shape[-2:])))
    )
    trainer = _trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    train_sizes = {
        epoch: {size for e, training, size in seen if training and e == epoch} for epoch in range(3)
    }
    assert train_sizes == {0: {(16, 16)}, 1: {(16, 16)}, 2: {(32, 32)}}
    assert {size for _, training, size in seen if not training} == {(32, 32)}  # validation: the data's size
    assert trainer.callback_metrics["train_image_side"] == 32
    assert model.settings.runtime.progressive_resizing == {0: 16, 2: 32}
    with pytest.raises(ValueError, match="image side in pixels"):
        _model(runtime={"progressive_resizing": {3: 0}})
    with pytest.raises(ValueError, match="maps epoch -> image side"):
        _model(runtime={"progressive_resizing": [176, 224]})


def test_a_frozen_epoch_leaves_the_backbone_and_its_batchnorm_untouched(stripes_folder, tmp_path):
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"num_workers": 0, "batch_size": 8},
    )
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
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"num_workers": 0, "batch_size": 8},
    )
    model = _model(
        class_names=["horizontal", "vertical"],
        freeze_schedule=FreezeSchedule(frozen_epochs=1),
        head={"max_norm": 3.0},
    )
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    path = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(path, weights_only=True)  # plain data, no pickled code
    hparams = checkpoint["hyper_parameters"]
    assert hparams["backbone"] == TINY_BACKBONE and hparams["head"]["max_norm"] == 3.0
    assert hparams["freeze_schedule"]["frozen_epochs"] == 1
    assert checkpoint["transferkit"]["class_names"] == ["horizontal", "vertical"]
    restored = TransferClassifier.load_from_checkpoint(path, weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))


def test_max_norm_holds_after_training_steps(stripes_folder, tmp_path):
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"num_workers": 0, "batch_size": 8},
    )
    model = _model(head={"max_norm": 0.2}, optimizer={"lr": 0.05})
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
    model = _model(prediction={"tta": tta}).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        probs = model.predict_proba(x)
        torch.testing.assert_close(model.predict_proba(transform(x)), probs, atol=1e-5, rtol=1e-4)
        plain = model.predict_proba(x, tta="none")
    assert not torch.allclose(plain, probs, atol=1e-4)  # the views really changed the prediction
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_channels_last_computes_the_same_function():
    torch.manual_seed(0)
    model = _model(runtime={"channels_last": False}).eval()
    fast = _model().eval()  # channels-last is the default
    fast.load_state_dict(model.state_dict())
    fast.backbone.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)


def _fit_penalised(stripes_folder, tmp_path, **kwargs) -> tuple[TransferClassifier, dict]:
    L.seed_everything(0)
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0, "batch_size": 16},
    )
    model = _model(
        head={"hidden_dims": (64,), "dropout": 0.0},
        optimizer={"lr": 3e-3, "layer_decay": 1.0},
        lr_schedule={"name": "none"},
        **kwargs,
    )
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=dm)
    return model, {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.slow
def test_l1_makes_the_penalised_weights_sparse_and_l2_shrinks_them(stripes_folder_large, tmp_path):
    data = stripes_folder_large
    plain, _ = _fit_penalised(data, tmp_path / "plain")
    sparse, metrics = _fit_penalised(data, tmp_path / "l1", regularisation={"l1": 1.0})
    small, _ = _fit_penalised(data, tmp_path / "l2", regularisation={"l2": 1e-2})
    assert metrics["l1_sparsity"] == pytest.approx(sparse.regularisers.sparsity())
    sparsity = sparse.regularisers.sparsity(), plain.regularisers.sparsity()
    assert sparsity[0] > 0.5 and sparsity[1] < 0.1, sparsity
    exact_zeros = sum(int((w == 0).sum()) for w in sparse.regularisers.weights)
    penalised = sum(w.numel() for w in sparse.regularisers.weights)
    assert exact_zeros / penalised > 0.5  # truly zero, not just small
    assert metrics["val_acc"] >= 0.8, metrics  # still a classifier (chance 0.5)
    # L2 on the head only: head weights shrink, the backbone is not penalised
    norm = lambda m: sum(w.norm() ** 2 for w in m.regularisers.weights).sqrt().item()  # noqa: E731
    assert norm(small) < 0.7 * norm(plain), (norm(small), norm(plain))
    assert all(p.ndim >= 2 for p in small.regularisers.weights)
    assert {id(p) for p in small.regularisers.weights} <= {id(p) for p in small.head.parameters()}


def test_penalty_groups_are_checked_by_name():
    model = _model(regularisation={"l1": 1e-4, "penalty_groups": ["head", "backbone.99"]})
    with pytest.raises(ValueError, match="unknown groups.*backbone.99"):
        _ = model.regularisers.weights
    whole = _model(regularisation={"l2": 1e-4, "penalty_groups": "all"})
    assert len(whole.regularisers.weights) > len(_model(regularisation={"l2": 1e-4}).regularisers.weights)


def test_mc_dropout_returns_mean_probabilities_and_their_spread():
    torch.manual_seed(0)
    model = _model(head={"dropout": 0.5}, prediction={"mc_dropout": 16}).eval()
    x = torch.randn(6, 3, 32, 32)
    out = model.predict_step(x, 0)
    assert set(out) == {"probs", "std", "entropy"}
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(6))
    assert (out["std"] > 0).all()  # the passes really differ
    assert ((out["entropy"] >= 0) & (out["entropy"] <= torch.log(torch.tensor(2.0)) + 1e-6)).all()
    assert not model.training and not any(m.training for m in model.modules())  # left in eval mode
    # the mean of many passes approaches the deterministic (dropout-scaled) prediction
    many = model.predict_mc_dropout(x, samples=400)["probs"]
    torch.testing.assert_close(many, model.predict_proba(x), atol=0.05, rtol=0)


def test_mc_dropout_without_dropout_is_refused():
    with pytest.raises(ValueError, match="dropout"):
        _model(head={"dropout": 0.0}, prediction={"mc_dropout": 10})
    with pytest.raises(ValueError, match="at least 2"):
        _model(head={"dropout": 0.2}).predict_mc_dropout(torch.randn(1, 3, 32, 32), samples=1)


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_gradient_clipping_bounds_every_update(stripes_folder, tmp_path, algorithm):
    # plain SGD with lr 1: an update is exactly the (clipped) gradient
    dm = ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"num_workers": 0, "batch_size": 8},
    )
    model = _model(
        head={"dropout": 0.0},
        optimizer={"name": "sgd", "lr": 1.0, "layer_decay": 1.0},
        lr_schedule={"name": "none"},
    )
    clip = 1e-4
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(
        tmp_path,
        max_steps=1,
        limit_val_batches=0,
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
    )
    trainer.fit(model, datamodule=dm)
    # BatchNorm running statistics are buffers, not parameters: only the optimizer moved these
    deltas = [(p.detach() - b) for p, b in zip(model.parameters(), before, strict=True)]
    largest = max(d.abs().max().item() for d in deltas)
    total = torch.sqrt(sum((d**2).sum() for d in deltas)).item()
    assert largest > 0  # it trained
    if algorithm == "value":
        assert largest <= clip * (1 + 1e-3)  # float32 rounding of w + update - w
        assert total > clip  # many coordinates at the bound: not a norm clip
    else:
        assert total <= clip * (1 + 1e-3)


@pytest.mark.parametrize(
    ("optimizer", "settings", "expected"),
    [
        ("adam", {"betas": (0.8, 0.99), "eps": 1e-6}, {"betas": (0.8, 0.99), "eps": 1e-6}),
        ("nadam", {"betas": (0.85, 0.995)}, {"betas": (0.85, 0.995)}),
        ("rmsprop", {"rho": 0.95, "eps": 1e-7}, {"alpha": 0.95, "eps": 1e-7}),
        ("nesterov", {"momentum": 0.8}, {"momentum": 0.8, "nesterov": True}),
    ],
)
def test_optimizer_hyperparameters_reach_every_group(optimizer, settings, expected):
    model = _model(optimizer={"name": optimizer, **settings})
    built = model.configure_optimizers()["optimizer"]
    for group in built.param_groups:
        for key, value in expected.items():
            got = tuple(group[key]) if isinstance(group[key], tuple | list) else group[key]
            assert got == pytest.approx(value), (key, got)


@pytest.mark.parametrize("shown", [True, False])
def test_the_step_loss_in_the_progress_bar_is_read_back_every_step_only_when_shown(
    stripes_folder, tmp_path, monkeypatch, shown
):
    """Lightning turns progress-bar values into numbers after every batch (``Tensor.item``: a device
    stall on a GPU); without the step loss in the bar, no logged value is read back per step."""
    from lightning.pytorch.trainer.connectors.logger_connector import result

    convert = result.convert_tensors_to_scalars
    read_back = []

    def counting_convert(value):
        if isinstance(value, torch.Tensor):
            read_back.append(1)
        return convert(value)

    monkeypatch.setattr(result, "convert_tensors_to_scalars", counting_convert)

    def reads(batches: int) -> int:
        L.seed_everything(0)
        dm = ImageDataModule(
            source="folder",
            root=str(stripes_folder),
            pipeline={"augment": "none", **NORM},
            loader={"num_workers": 0, "batch_size": 4},
        )
        trainer = _trainer(
            tmp_path,
            max_epochs=1,
            limit_train_batches=batches,
            limit_val_batches=0,
            enable_checkpointing=False,
        )
        read_back.clear()
        trainer.fit(_model(runtime={"progress_bar_step_loss": shown}), datamodule=dm)
        return len(read_back)

    per_step = (reads(12) - reads(4)) / 8
    assert per_step == (1 if shown else 0), f"{per_step} logged values read back per training step"
    assert _model().settings.runtime.progress_bar_step_loss is None
    # the default on a CPU, where a read-back costs nothing
    assert _model().settings.runtime.shows_step_loss("cpu")
    assert not _model().settings.runtime.shows_step_loss("cuda")


def test_class_weights_auto_count_the_training_split_and_weight_the_loss(stripes_folder, tmp_path):
    # 30 vertical images against 40 horizontal: the smaller class counts more per image
    for extra in sorted((stripes_folder / "vertical").iterdir())[30:]:
        extra.unlink()
    dm = ImageDataModule(
        source="folder", root=str(stripes_folder), pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0, "batch_size": 16, "sampler": "shuffle"},
    )  # fmt: skip
    model = _model(loss={"class_weights": "auto"})
    assert model.class_weights is None  # counted when a fit starts, on its training split
    _trainer(tmp_path, max_epochs=1).fit(model, datamodule=dm)
    horizontal, vertical = dm.class_counts("train")
    assert vertical < horizontal
    w = model.class_weights
    assert w[1] / w[0] == pytest.approx(horizontal / vertical, rel=1e-4) and sum(w) / 2 == pytest.approx(1.0)
    # the loss is the weighted mean over the batch, as torch's weighted cross-entropy
    logits, labels = torch.randn(6, 2), torch.tensor([0, 0, 0, 0, 1, 1])
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor(w))
    assert model.loss(logits, labels) == pytest.approx(expected.item(), rel=1e-5)
    assert model.loss(logits, labels) != pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item()
    )
    # soft targets (mixup, soft labels) are weighted alike: one-hot ones give the same loss
    one_hot = torch.nn.functional.one_hot(labels, 2).float()
    assert model.loss(logits, one_hot) == pytest.approx(expected.item(), rel=1e-5)
    smoothed = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor(w), label_smoothing=0.1)
    assert soft_cross_entropy(logits, one_hot, 0.1, torch.tensor(w)) == pytest.approx(
        smoothed.item(), rel=1e-5
    )
    # validation and test weigh the loss the same way: a validate run alone counts the training split too
    fresh = _model(loss={"class_weights": "auto"})
    _trainer(tmp_path, max_epochs=1).validate(fresh, datamodule=dm, verbose=False)
    assert fresh.class_weights == w
    # the setting, not the counted weights, is what the checkpoint holds: a resumed fit counts again
    assert model.hparams["loss"]["class_weights"] == "auto"


def test_class_weights_given_per_class_are_checked_against_the_classes():
    model = _model(loss={"class_weights": [1, 3]})
    assert model.class_weights == [1.0, 3.0]
    with pytest.raises(ConfigError, match=r"class_weights gives 3 weights for num_classes=2"):
        _model(loss={"class_weights": [1, 2, 3]})
    with pytest.raises(ConfigError, match=r"model.loss.class_weights must be null, auto, or a list"):
        _model(loss={"class_weights": [1, -1]})
