"""The LightningModule: a pretrained backbone, a new head, and the optimisation recipe."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy

from transferkit.data.class_groups import resolve_class_groups
from transferkit.errors import ConfigError
from transferkit.finetuning.freezing import FreezeController, StageKind
from transferkit.finetuning.optim import (
    LRScheduleSettings,
    OptimizerSettings,
    create_optimization,
    run_length,
)
from transferkit.finetuning.resizing import image_side_at, resize_shorter_side
from transferkit.finetuning.schedule import FreezeSchedule
from transferkit.finetuning.trunk import Trunk
from transferkit.lightning_internals import (
    attached_trainer,
    restarted_mid_epoch,
    set_ddp_find_unused_parameters,
)
from transferkit.models.backbones import Pretrained, create_backbone
from transferkit.models.calibration import Calibration
from transferkit.models.checkpoint import SelfDescribing
from transferkit.models.heads import ClassifierHead
from transferkit.models.mixing import BatchMixing, hard_labels, soft_cross_entropy
from transferkit.models.prediction import Predicting
from transferkit.models.regularisers import Regularisers
from transferkit.models.scoring import Scoring
from transferkit.models.settings import (
    ClassifierSettings,
    HeadSettings,
    LossSettings,
    MixingSettings,
    PredictionSettings,
    RegularisationSettings,
    RuntimeSettings,
    inverse_frequency_weights,
)

__all__ = ["TransferClassifier"]


class TransferClassifier(Predicting, SelfDescribing, L.LightningModule):
    """A pretrained timm backbone with a new classifier head, fine-tuned with Adam and exponential LR decay.

    ``forward(x)`` maps images ``(B, 3, H, W)`` to logits ``(B, num_classes)``. Its settings come in typed
    groups validated at construction (:mod:`transferkit.models.settings`), read back as :attr:`settings`;
    freezing, penalties, scores, prediction and the checkpoint format are units of their own
    (``self.freezing``, ``self.regularisers``, ``self.scoring``, :class:`~transferkit.models.prediction.Predicting`,
    :mod:`~transferkit.models.checkpoint`).

    Args:
        num_classes: number of classes (the CLI fills it in from the data).
        backbone: timm architecture name.
        pretrained: where the backbone's weights come from: ``bundled``, ``hub``, a file path, or ``False``.
        class_names: names of the classes, in label order (the CLI fills them in from the data).
        class_groups: coarser classes the classes refine, ``{group: [class names]}`` (the CLI fills them
            in from the data): validation and test also score the groups (``val_group_acc`` ...), a group's
            probability being the sum of its classes' (:mod:`transferkit.data.class_groups`).
        head, optimizer, lr_schedule, freeze_schedule, regularisation, mixing, prediction, runtime: the
            typed groups of settings (:mod:`transferkit.models.settings`), each given as itself, as a dict of
            the fields to change (``optimizer={"lr": 3e-4}``) or left out (its defaults).

    Example:
        >>> model = TransferClassifier(num_classes=3, backbone="test_efficientnet", pretrained=False,
        ...                            optimizer={"lr": 3e-4}, head={"hidden_dims": [64], "dropout": 0.3})
        >>> model.settings.optimizer.lr, model(torch.rand(2, 3, 32, 32)).shape
        (0.0003, torch.Size([2, 3]))
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: Pretrained = "bundled",
        class_names: list[str] | None = None,
        class_groups: dict[str, list[str | int]] | None = None,
        head: HeadSettings = HeadSettings(),
        optimizer: OptimizerSettings = OptimizerSettings(),
        lr_schedule: LRScheduleSettings = LRScheduleSettings(),
        freeze_schedule: FreezeSchedule | None = None,
        regularisation: RegularisationSettings = RegularisationSettings(),
        loss: LossSettings = LossSettings(),
        mixing: MixingSettings = MixingSettings(),
        prediction: PredictionSettings = PredictionSettings(),
        runtime: RuntimeSettings = RuntimeSettings(),
    ) -> None:
        super().__init__()
        s = ClassifierSettings.build(
            num_classes=num_classes, backbone=backbone, pretrained=pretrained, class_names=class_names,
            class_groups=class_groups, head=head, optimizer=optimizer, lr_schedule=lr_schedule,
            freeze_schedule=freeze_schedule, regularisation=regularisation, loss=loss, mixing=mixing,
            prediction=prediction, runtime=runtime,
        )  # fmt: skip
        self.settings = s
        self.save_hyperparameters(s.to_dict())  # plain types only: checkpoints load with weights_only=True
        reg = s.regularisation
        self.regularisers = Regularisers(
            reg.l1, reg.l2, reg.penalty_groups, reg.sparsity_threshold, groups=self.parameter_groups
        )
        self.backbone = create_backbone(backbone, pretrained=pretrained, drop_path_rate=reg.drop_path_rate)
        self.head = ClassifierHead(self.backbone.num_features, num_classes, **s.head.to_dict())
        self.freezing = FreezeController(self.backbone, s.freeze_schedule)
        # temperature and decision threshold, fitted after training (calibrate, decision_threshold) or
        # read from a checkpoint; until then the identity (temperature 1, most probable class)
        self.calibration = Calibration()
        self._fed: tuple[StageKind, Any] | None = None  # what forward takes: images (see feed)
        self.preprocessing: dict[str, Any] | None = None  # set_preprocessing: how inputs are prepared
        m = s.mixing
        self.mixing = BatchMixing(m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, num_classes)
        self.class_names = list(s.class_names) if s.class_names else [str(i) for i in range(num_classes)]
        self.class_groups = resolve_class_groups(class_groups, self.class_names)  # {group: [class index]}
        self.scoring = Scoring(num_classes, self.class_groups)
        # the loss's class weights: given, or counted on the training split when a fit starts (auto)
        weights = s.loss.class_weights
        self.class_weights: list[float] | None = list(weights) if isinstance(weights, tuple) else None

    # --- settings ----------------------------------------------------------------------------------

    def set_learning_rates(
        self, lr: float | None = None, backbone_lr: float | None = None, found: list[dict] | None = None
    ) -> None:
        """Set the head's ``lr`` and the top backbone group's ``backbone_lr`` (what a range test found:
        ``found``, its sweeps as dicts), in :attr:`settings` and in the hyperparameters the loggers and
        checkpoints record. Call before the optimizers are built."""
        changes = {k: v for k, v in (("lr", lr), ("backbone_lr", backbone_lr)) if v is not None}
        self.settings = dataclasses.replace(
            self.settings, optimizer=self.settings.optimizer.replace(**changes)
        )
        self.hparams["optimizer"] = self.settings.optimizer.to_dict()
        if found is not None:
            self.hparams["lr_found"] = found
        self.save_hyperparameters(dict(self.hparams))  # what the loggers record at the start of a fit

    # --- what the model is and what it is fed ------------------------------------------------------

    @property
    def data_config(self) -> dict[str, Any]:
        """Input size, mean and std the backbone's weights expect."""
        return self.backbone.data_config

    def check_input_size(self, side: int) -> None:
        """Refuse, before training, square inputs of ``side`` pixels the backbone cannot take."""
        self.backbone.check_input_size(side)

    @property
    def freeze_schedule(self) -> FreezeSchedule:
        return self.freezing.schedule

    @property
    def groups(self) -> list[list[str]]:
        """Backbone parameter names in ordered groups, bottom (stem) to top."""
        return self.freezing.groups

    @property
    def trainable_groups(self) -> int | None:
        """Backbone groups (from the top) that train in the current epoch; ``None`` before training."""
        return self.freezing.trainable_groups

    def trunk(self, frozen_groups: int) -> Trunk:
        """The bottom ``frozen_groups`` backbone groups as a :class:`~transferkit.finetuning.trunk.Trunk`."""
        return self.freezing.trunk(frozen_groups)

    def feed(self, stage: tuple[StageKind, Any] | None) -> None:
        """Say what :meth:`forward` is fed from now on: ``None``, images ``(B, 3, H, W)``; ``("features",
        backbone)``, the frozen backbone's pooled features ``(B, num_features)``; ``("trunk", trunk)``, a
        frozen :class:`~transferkit.finetuning.trunk.Trunk`'s feature maps ``(B, C, H, W)``, which the
        trainable top of the backbone takes on. Set by :class:`~transferkit.training.feeding.FreezeAndCache`
        epoch by epoch during a fit (test and predict always take images)."""
        self._fed = stage

    def set_preprocessing(self, preprocessing: dict[str, Any] | None) -> None:
        """How inputs are prepared for this model at evaluation (``image_size``, ``mean``, ``std``,
        ``eval_transform``, as :meth:`transferkit.ImageDataModule.preprocessing` gives them): what its
        checkpoints store to describe themselves. :class:`transferkit.Trainer` hands it over before a run;
        without it, checkpoints describe the backbone's own input size, mean and std."""
        self.preprocessing = preprocessing

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, num_features)`` of images, or of what the model is fed instead
        (see :meth:`feed`): pooled features pass through, a trunk's feature maps go through the top."""
        fed = self._fed
        if fed is not None and fed[0] == "features":
            return x
        if self.settings.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if fed is None:
            return self.backbone(x)
        return fed[1].rest(x.to(self.dtype))  # float16 trunk features; .to keeps the channels-last layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 3, H, W)`` (or of what the model is fed, see :meth:`feed`)."""
        return self.head(self.features(x))

    # --- training ----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.settings.runtime.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.settings.runtime.compile and stage == "fit":
            self.backbone.model.compile()  # in place: parameter names (and checkpoints) stay the same
        trainer = attached_trainer(self)
        if stage in ("fit", "validate", "test") and self.settings.loss.class_weights == "auto":
            # counted on the training split for every stage that computes the loss, so val_loss and
            # test_loss weigh the classes as training did (and as a checkpoint's monitor did)
            self.class_weights = inverse_frequency_weights(
                training_class_counts(trainer, self.settings.num_classes)
            )
        strategy = trainer.strategy if trainer is not None else None
        if stage == "fit" and self.freeze_schedule.active and isinstance(strategy, DDPStrategy):
            # frozen groups get no gradients, and unfrozen ones start getting them mid-run: DDP must look
            # for unused parameters every step (set before the model is wrapped, which comes next)
            set_ddp_find_unused_parameters(strategy)

    def on_train_start(self) -> None:
        if restarted_mid_epoch(self.trainer):
            self.on_train_epoch_start()  # Lightning calls no on_train_epoch_start for an epoch resumed mid-way

    def on_train_epoch_start(self) -> None:
        side = self.train_image_side(self.current_epoch)
        if side is not None:
            self.log("train_image_side", float(side), on_step=False, on_epoch=True)
        schedule = self.freeze_schedule
        if (schedule.active or schedule.bn_policy == "eval") and self.freezing.trainable_groups is None:
            raise ConfigError(
                "model.freeze_schedule freezes backbone groups epoch by epoch through the FreezeAndCache "
                "callback, which this Trainer lacks: train with transferkit.Trainer (it adds one), or add "
                "transferkit.FreezeAndCache() to the callbacks."
            )

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if mode and hasattr(self, "freezing"):
            self.freezing.keep_batchnorm_modes()  # BatchNorm of frozen groups stays in eval mode
        return self

    def train_image_side(self, epoch: int) -> int | None:
        """The shorter image side ``progressive_resizing`` asks for at ``epoch`` (``None``: the data's)."""
        return image_side_at(self.settings.runtime.progressive_resizing, epoch)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        side = self.train_image_side(self.current_epoch)
        if side is not None and self._fed is None:  # stored features keep the size they were stored at
            images = resize_shorter_side(images, side)
        if self.mixing.active:
            if self._fed is not None:  # told it is fed stored features: there are no images to mix
                raise ConfigError("mixup/CutMix mix training images; this model is fed stored features.")
            images, labels = self.mixing.mix(images, labels)
        logits = self(images)
        loss = self.loss(logits, labels)
        n = len(labels)
        shown = self.settings.runtime.shows_step_loss(self.device.type)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=shown, batch_size=n)
        correct = (logits.detach().argmax(dim=-1) == hard_labels(labels)).float().mean()
        self.log("train_acc", correct, on_step=False, on_epoch=True, batch_size=n)
        if self.regularisers.active:
            penalty = self.regularisers.penalty()  # logged; its L2 part is in the loss, L1 is a proximal step
            self.log("train_penalty", penalty, on_step=False, on_epoch=True, batch_size=n)
            if self.regularisers.l2:
                loss = loss + self.regularisers.l2_term()
        return loss

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the module's label smoothing and class weights, against hard labels ``(B,)`` or
        class distributions ``(B, C)`` (mixed batches, soft labels)."""
        smoothing = self.settings.regularisation.label_smoothing
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, dtype=logits.dtype, device=logits.device)
        if labels.ndim == 2:
            return soft_cross_entropy(logits, labels, smoothing, weight)
        return F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing)

    def on_train_epoch_end(self) -> None:
        if self.regularisers.l1:
            self.log("l1_sparsity", self.regularisers.sparsity(), on_step=False, on_epoch=True)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, *args, **kwargs)
        self.regularisers.proximal_step(optimizer)
        self.head.apply_max_norm()  # the constraint holds after every update

    # --- evaluation and prediction -----------------------------------------------------------------

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(*batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(*batch, "test")

    def _evaluate(self, images: torch.Tensor, labels: torch.Tensor, split: str) -> None:
        views, scored = None, None
        if (
            split == "test" and images.ndim == 4
        ):  # scored as predict scores: TTA views, calibration, stored decision threshold
            views = self.view_logits(images).detach()  # (V, B, C), kept for the report
            probs = self.calibration.probabilities(views).mean(dim=0)
            logits = (
                views[0]
                if self.settings.prediction.tta == "none" and not self.calibration.fitted
                else probs.clamp_min(1e-12).log()
            )
            scored = self.predict_labels(logits.softmax(dim=-1))
        else:
            logits = self(images)
        self.log(
            f"{split}_loss", self.loss(logits, labels), on_epoch=True, prog_bar=True, batch_size=len(labels)
        )
        labels = hard_labels(labels)  # what accuracy and the other metrics score
        for metrics, shown in self.scoring.update(
            split, logits, labels, logits if scored is None else scored, views
        ):
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=shown)

    def on_test_epoch_start(self) -> None:
        self.scoring.start_test()

    def on_test_epoch_end(self) -> None:
        self.scoring.end_test()

    # --- optimisation ------------------------------------------------------------------------------

    def parameter_groups(self, optimizer: OptimizerSettings | None = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups, all built up front: the head, then backbone groups top to bottom,
        with the learning rates of ``optimizer`` (default: the model's own settings)."""
        opt = optimizer or self.settings.optimizer
        if opt.lr == "auto":
            raise ConfigError(
                "model.optimizer.lr is 'auto' and no range test has set it: transferkit.Trainer.fit runs "
                "one; with another Trainer, call transferkit.lr_find(model, datamodule) first."
            )
        head = list(self.head.parameters())
        return self.freezing.parameter_groups(head, opt.lr, opt.layer_decay, opt.backbone_lr)

    def optimization(
        self,
        total_steps: int,
        steps_per_epoch: int,
        max_epochs: int,
        optimizer: OptimizerSettings | None = None,
    ) -> dict[str, Any]:
        """The optimizer and LR scheduler config for a run of ``max_epochs`` epochs of ``steps_per_epoch``
        optimizer steps (``total_steps`` in all), as :meth:`configure_optimizers` returns them; built with
        ``optimizer`` in place of the model's own optimizer settings if given."""
        optimizer = optimizer or self.settings.optimizer
        return create_optimization(
            optimizer,
            self.settings.lr_schedule,
            self.parameter_groups(optimizer),
            total_steps,
            steps_per_epoch,
            unfreeze_steps=self.freezing.unfreeze_steps(steps_per_epoch, max_epochs),
            warmup_steps=self.freeze_schedule.warmup_steps,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optimization(*run_length(attached_trainer(self)))


def training_class_counts(trainer: Any, num_classes: int) -> list[int]:
    """Images per class in the training split of the fit ``trainer`` runs (``class_weights: auto``)."""
    counts = getattr(getattr(trainer, "datamodule", None), "class_counts", None)
    if counts is None:
        raise ConfigError(
            "model.loss.class_weights: auto counts the classes of the training split, which this fit's data "
            "does not give (a transferkit.ImageDataModule does): give the weights as a list, one per class."
        )
    found = [int(c) for c in counts("train")]
    if len(found) != num_classes:
        raise ConfigError(
            f"the data has {len(found)} classes and the model {num_classes}: give them the same."
        )
    return found
