"""The LightningModule: a pretrained backbone, a new head, and the optimisation recipe."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from transferkit.backbones import BackboneError, Pretrained, create_backbone
from transferkit.finetuning import (
    FreezeSchedule,
    apply_freeze,
    backbone_groups,
    group_learning_rates,
    set_batchnorm_modes,
)
from transferkit.heads import ClassifierHead
from transferkit.optim import OPTIMIZERS, SCHEDULES, create_optimizer, create_scheduler

__all__ = ["TTA_VIEWS", "TransferClassifier"]


def _hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _vflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-2)


def _rot90(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(x, k, dims=(-2, -1))


# test-time augmentation: views of a batch (B, 3, H, W) whose probabilities are averaged
TTA_VIEWS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": [lambda x: x],
    "hflip": [lambda x: x, _hflip],
    "flips": [lambda x: x, _hflip, _vflip, lambda x: _vflip(_hflip(x))],
    "d4": [lambda x, k=k: _rot90(x, k) for k in range(4)]
    + [lambda x, k=k: _rot90(_hflip(x), k) for k in range(4)],
}


class TransferClassifier(L.LightningModule):
    """A pretrained timm backbone with a new classifier head, fine-tuned with Adam and exponential LR decay.

    ``forward(x)`` maps images ``(B, 3, H, W)`` to logits ``(B, num_classes)``.

    Args:
        num_classes: number of classes (the CLI fills it in from the data).
        backbone: timm architecture name.
        pretrained: where the backbone's weights come from: ``bundled``, ``hub``, a file path, or ``False``.
        class_names: names of the classes, in label order (the CLI fills them in from the data).
        hidden_dims: widths of the head's hidden layers (``[]`` for a linear head).
        activation: the head's activation (``elu``, ``leaky_relu``, ``relu``, ``selu``, ``tanh``, ``sigmoid``).
        init: the head's weight init (``he``, ``xavier``, ``lecun``; ``None`` = the one that suits the activation).
        dropout: dropout rate in the head.
        batch_norm: BatchNorm between each hidden Linear and its activation.
        max_norm: max-norm constraint on the head's incoming weight vectors, enforced after every step.
        optimizer: ``adam`` (default), ``adamw``, ``nadam``, ``sgd``, ``momentum``, ``nesterov``, ``adagrad``, ``rmsprop``.
        lr: learning rate of the head; backbone groups get ``lr * layer_decay ** depth``.
        weight_decay: L2 weight decay (decoupled for ``adamw``).
        momentum: momentum of ``momentum``/``nesterov``.
        layer_decay: factor between the learning rates of two neighbouring backbone groups (deeper = smaller).
        lr_schedule: ``exponential`` (default), ``piecewise``, ``performance`` (reduce on plateau of
            ``val_loss``), ``onecycle``, ``cosine`` or ``none``.
        decay_rate: exponential decay: ``lr(t) = lr0 * decay_rate ** (t / decay_steps)``; also the factor
            of each ``piecewise`` milestone and of each ``performance`` reduction.
        decay_steps: optimizer steps per ``decay_rate`` factor; ``None`` = the whole run.
        lr_milestones: ``piecewise``: epochs at which the LR is multiplied by ``decay_rate``.
        plateau_patience: ``performance``: epochs without improvement before the LR drops.
        label_smoothing: cross-entropy label smoothing.
        freeze_schedule: which backbone groups train when (default: all of them from the start).
        drop_path_rate: stochastic depth in the backbone, where the architecture supports it.
        tta: test-time augmentation for ``test`` and ``predict``: ``none``, ``hflip`` (image + mirror),
            ``flips`` (+ vertical flips), ``d4`` (all 8 flips and 90-degree rotations); the
            probabilities of the views are averaged.
        channels_last: run the backbone in channels-last memory layout (often faster with bf16 on GPUs).
        compile: compile the backbone with ``torch.compile`` when training starts.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: Pretrained = "bundled",
        class_names: list[str] | None = None,
        hidden_dims: tuple[int, ...] = (256,),
        activation: str = "elu",
        init: str | None = None,
        dropout: float = 0.2,
        batch_norm: bool = True,
        max_norm: float | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        layer_decay: float = 0.8,
        lr_schedule: str = "exponential",
        decay_rate: float = 0.1,
        decay_steps: int | None = None,
        lr_milestones: list[int] | None = None,
        plateau_patience: int = 2,
        label_smoothing: float = 0.0,
        freeze_schedule: FreezeSchedule | None = None,
        drop_path_rate: float | None = None,
        tta: str = "none",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        schedule = FreezeSchedule.coerce(freeze_schedule)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names given for num_classes={num_classes}.")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule '{lr_schedule}'; choose one of {', '.join(SCHEDULES)}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{optimizer}'; choose one of {', '.join(OPTIMIZERS)}.")
        if tta not in TTA_VIEWS:
            raise ValueError(f"unknown tta '{tta}'; choose one of {', '.join(TTA_VIEWS)}.")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
        self.save_hyperparameters(ignore=["freeze_schedule"])
        # plain types only, so checkpoints load with weights_only=True
        self.hparams["freeze_schedule"] = schedule.to_dict()
        self.hparams["hidden_dims"] = list(hidden_dims)

        self.backbone = create_backbone(backbone, pretrained=pretrained, drop_path_rate=drop_path_rate)
        self.head = ClassifierHead(
            self.backbone.num_features,
            num_classes,
            hidden_dims=tuple(hidden_dims),
            activation=activation,
            init=init,
            dropout=dropout,
            batch_norm=batch_norm,
            max_norm=max_norm,
        )
        self.freeze_schedule = schedule
        self.class_names = (
            list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        )
        self._groups: list[list[str]] | None = None
        self._pending_rng_state: torch.Tensor | None = None
        self.trainable_groups: int | None = None  # None: nothing frozen yet (before training starts)
        if schedule.active:
            _ = self.groups  # a backbone that cannot be split fails here, before any training

        def metrics() -> MetricCollection:
            # validate_args=False: the argument checks read values back from the device (a sync on
            # every step); labels are already checked by the data module and the loss.
            return MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
                    "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
                }
            )

        self.train_metrics = metrics().clone(prefix="train_")
        self.val_metrics = metrics().clone(prefix="val_")
        self.test_metrics = metrics().clone(prefix="test_")

    # --- model -------------------------------------------------------------------------------------

    @property
    def data_config(self) -> dict[str, Any]:
        """Input size, mean and std the backbone's weights expect."""
        return self.backbone.data_config

    @property
    def groups(self) -> list[list[str]]:
        """Backbone parameter names in ordered groups, bottom (stem) to top; built once."""
        if self._groups is None:
            try:
                self._groups = backbone_groups(self.backbone)
            except BackboneError:
                if self.freeze_schedule.active:
                    raise
                # nothing to freeze: the whole backbone is one group
                self._groups = [[name for name, _ in self.backbone.model.named_parameters()]]
        return self._groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> logits; pooled backbone features ``(B, num_features)`` (from the
        frozen-feature cache) go straight to the head."""
        if x.ndim == 2:
            return self.head(x)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(x))

    # --- freezing ----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        if self.hparams.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.hparams.compile and stage == "fit":
            self.backbone.model.compile()  # in place: parameter names (and checkpoints) stay the same

        strategy = self.trainer.strategy if self._trainer is not None else None
        if stage == "fit" and self.freeze_schedule.active and isinstance(strategy, DDPStrategy):
            # frozen groups get no gradients, and unfrozen ones start getting them mid-run: DDP must look
            # for unused parameters every step (it is set before the model is wrapped, which comes next)
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def on_train_epoch_start(self) -> None:
        if self._pending_rng_state is not None:
            torch.set_rng_state(self._pending_rng_state)  # resume with the RNG where the run left it
            self._pending_rng_state = None
        schedule = self.freeze_schedule
        if not schedule.active and schedule.bn_policy != "eval":
            return
        groups = len(self.groups)
        trainable = schedule.trainable_groups(self.current_epoch, groups) if schedule.active else groups
        self.trainable_groups = trainable
        apply_freeze(self.backbone, self.groups, trainable, schedule.bn_policy)
        self.log("trainable_groups", float(trainable), on_step=False, on_epoch=True)

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if mode and self.trainable_groups is not None:
            # BatchNorm of frozen groups stays in eval mode, whoever calls train()
            set_batchnorm_modes(
                self.backbone, self.groups, self.trainable_groups, self.freeze_schedule.bn_policy
            )
        return self

    # --- steps -------------------------------------------------------------------------------------

    def predict_proba(self, images: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)`` for images ``(B, 3, H, W)``, averaged over the
        test-time augmentation views (``tta``: ``none``, ``hflip``, ``flips``, ``d4``; default: the
        module's own ``tta``)."""
        views = TTA_VIEWS[tta or self.hparams.tta]
        return torch.stack([self(view(images)).softmax(dim=-1) for view in views]).mean(dim=0)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, stage: str):
        images, labels = batch
        if stage == "test" and self.hparams.tta != "none" and images.ndim == 4:
            # averaged probabilities; the loss is the NLL of the average
            logits = self.predict_proba(images).clamp_min(1e-12).log()
        else:
            logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        metrics.update(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, self.train_metrics, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)`` (with the module's test-time augmentation)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self.predict_proba(images)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.head.apply_max_norm()  # the constraint holds after every update

    # --- optimisation ------------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups, all built up front: the head, then backbone groups top to bottom."""
        hp = self.hparams
        named = dict(self.backbone.model.named_parameters())
        lrs = group_learning_rates(hp.lr, len(self.groups), hp.layer_decay)
        groups = [{"name": "head", "params": list(self.head.parameters()), "lr": hp.lr}]
        for index in reversed(range(len(self.groups))):
            groups.append(
                {
                    "name": f"backbone.{index}",
                    "params": [named[n] for n in self.groups[index]],
                    "lr": lrs[index],
                }
            )
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = create_optimizer(
            hp.optimizer,
            self.parameter_groups(),
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            momentum=hp.momentum,
        )
        total_steps, steps_per_epoch, max_epochs = 1, 1, 1
        if self._trainer is not None:
            total_steps = int(self.trainer.estimated_stepping_batches)
            max_epochs = self.trainer.max_epochs or 0
            steps_per_epoch = max(total_steps // max_epochs, 1) if max_epochs > 0 else total_steps
            max_epochs = max_epochs if max_epochs > 0 else 10_000
        scheduler = create_scheduler(
            hp.lr_schedule,
            optimizer,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            decay_rate=hp.decay_rate,
            decay_steps=hp.decay_steps,
            milestones=hp.lr_milestones or (),
            plateau_patience=hp.plateau_patience,
            unfreeze_steps=self._unfreeze_steps(steps_per_epoch, max_epochs),
            warmup_steps=self.freeze_schedule.warmup_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _unfreeze_steps(self, steps_per_epoch: int, max_epochs: int) -> list[int]:
        """Per optimizer group (head, then backbone top to bottom): the step at which it starts training."""
        steps = [0]
        for depth in range(1, len(self.groups) + 1):
            if not self.freeze_schedule.active:
                steps.append(0)
                continue
            epoch = self.freeze_schedule.unfreeze_epoch(depth, len(self.groups), max_epochs)
            steps.append(epoch * steps_per_epoch if epoch is not None else 10**9)
        return steps

    # --- checkpoints -------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["transferkit"] = {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights,
            "class_names": list(self.class_names),
            "data_config": _plain(self.data_config),
            "freeze_schedule": self.freeze_schedule.to_dict(),
            "trainable_groups": self.trainable_groups,
        }
        checkpoint["transferkit_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng_state = checkpoint.get("transferkit_rng_state")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
