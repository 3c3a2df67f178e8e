"""The LightningModule: a pretrained backbone, a new head, and the optimisation recipe."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import numpy as np
import torch
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
from transferkit.models.mixing import BatchMixing
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
)
from transferkit.models.tasks import TargetKind, check_same_kind, create_task

__all__ = ["TransferClassifier"]


class TransferClassifier(Predicting, SelfDescribing, L.LightningModule):
    """A pretrained timm backbone with a new head, fine-tuned with Adam and exponential LR decay.

    ``forward(x)`` maps images ``(B, 3, H, W)`` to the head's outputs ``(B, num_classes)``: the logits of the
    classes, of each label, or the standardised targets, as the model's ``target`` says; its :attr:`task`
    (:mod:`~transferkit.models.tasks`) turns them into the loss, the metrics and what a user reads. Its settings come in typed
    groups validated at construction (:mod:`transferkit.models.settings`), read back as :attr:`settings`;
    freezing, penalties, scores, prediction and the checkpoint format are units of their own
    (``self.freezing``, ``self.regularisers``, ``self.scoring``, :class:`~transferkit.models.prediction.Predicting`,
    :mod:`~transferkit.models.checkpoint`).

    Args:
        num_classes: number of classes, labels (multi-label) or targets (regression): the head's width (the
            CLI fills it in from the data).
        backbone: timm architecture name.
        pretrained: where the backbone's weights come from: ``bundled``, ``hub``, a file path, or ``False``.
        class_names: names of the classes, labels or targets, in output order (the CLI fills them in from
            the data).
        class_groups: coarser classes the classes refine, ``{group: [class names]}`` (the CLI fills them
            in from the data): validation and test also score the groups (``val_group_acc`` ...), a group's
            probability being the sum of its classes' (:mod:`transferkit.data.class_groups`).
        target: the kind of target: ``single_label`` (one class per image, softmax and cross-entropy),
            ``multi_label`` (labels each present or not, a sigmoid per label and binary cross-entropy, per-label
            thresholds fitted on validation) or ``regression`` (numbers, MSE or Huber on standardised targets);
            the CLI fills it in from ``data.target.kind``. Stored in the checkpoint, never read from the labels.
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
        target: TargetKind = "single_label",
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
            num_classes=num_classes, target=target, backbone=backbone, pretrained=pretrained, class_names=class_names,
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
        # the loss, the metrics and what outputs mean; its class or label weights set to auto, and a
        # regression's target scaling, are counted on the training split when a run starts (setup)
        self.task = create_task(target, self.class_names, s.loss, s.regularisation.label_smoothing)
        self.scoring = Scoring(self.task, self.class_groups)

    @property
    def class_weights(self) -> list[float] | None:
        """The single-label loss's class weights (given, or counted when a run starts: ``auto``)."""
        return getattr(self.task, "class_weights", None)

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
        # a plain Lightning Trainer (or a tool's own) skips transferkit.Trainer's checks: the kinds agree here
        check_same_kind(self, getattr(trainer, "datamodule", None))
        if stage in ("fit", "validate", "test") and self.task.wants_training_targets(stage):
            self.task.prepare(training_targets(trainer, self.settings))
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
        score = self.task.training_score(logits, labels)
        self.log(self.task.train_metric, score, on_step=False, on_epoch=True, batch_size=n)
        if self.regularisers.active:
            penalty = self.regularisers.penalty()  # logged; its L2 part is in the loss, L1 is a proximal step
            self.log("train_penalty", penalty, on_step=False, on_epoch=True, batch_size=n)
            if self.regularisers.l2:
                loss = loss + self.regularisers.l2_term()
        return loss

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task's loss (:mod:`~transferkit.models.tasks`): cross-entropy with the module's label smoothing
        and class weights against hard labels ``(B,)`` or class distributions ``(B, C)`` (mixed batches, soft
        labels); binary cross-entropy against 0/1 labels ``(B, L)``; MSE or Huber against standardised
        targets ``(B, T)``."""
        return self.task.loss(logits, labels)

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
        views = scores = decided = None
        logits = None
        if split == "test" and images.ndim == 4:
            # scored as predict scores: TTA views, calibration, stored thresholds
            views = self.view_logits(images).detach()  # (V, B, K), kept for the report
            scores = self.task.scores(views, self.calibration.temperature)
            decided = self.task.decide(scores, self.calibration)
            logits = self.task.scored_outputs(views, scores, self.calibration.fitted)
        else:
            logits = self(images)
        self.log(
            f"{split}_loss", self.loss(logits, labels), on_epoch=True, prog_bar=True, batch_size=len(labels)
        )
        logged = self.scoring.update(split, logits, labels, decided, views, scores, task=self.task)
        for metrics, shown in logged:
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


def training_targets(trainer: Any, settings: ClassifierSettings) -> np.ndarray:
    """The training split's targets of the run ``trainer`` runs, for what the task counts on them
    (``class_weights: auto``, ``pos_weight: auto``, a regression's target scaling)."""
    targets = getattr(getattr(trainer, "datamodule", None), "split_targets", None)
    if targets is None:
        raise ConfigError(
            "the model counts its training split's targets when a run starts (model.loss.class_weights or "
            "pos_weight: auto, a regression's target scaling), which this run's data does not give (a "
            "transferkit.ImageDataModule does): give the weights as a list, or train with an ImageDataModule."
        )
    found = np.asarray(targets("train"))
    width = 1 if found.ndim == 1 and settings.target == "single_label" else found.shape[-1]
    expected = 1 if settings.target == "single_label" else settings.num_classes
    if width != expected or (settings.target == "single_label" and found.ndim != 1):
        raise ConfigError(
            f"the data's targets ({found.shape[1:] or 'one class index'} per image) do not fit a "
            f"{settings.target} model of {settings.num_classes} outputs: give the model and the data the same "
            "target kind (data.target.kind) and count."
        )
    if settings.target == "single_label" and len(found) and found.max() >= settings.num_classes:
        raise ConfigError(
            f"the data has more classes than the model's {settings.num_classes}: give them the same."
        )
    return found
