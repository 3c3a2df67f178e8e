"""The LightningModule: a pretrained backbone, a new head, and the optimisation recipe."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import transferkit.models.checkpoint as checkpoint_format
import transferkit.models.prediction as prediction
from transferkit.data.class_groups import group_labels, group_probabilities, resolve_class_groups
from transferkit.errors import ConfigError
from transferkit.finetuning.freezing import FreezeController, StageKind
from transferkit.finetuning.optim import check_optimization, create_optimization
from transferkit.finetuning.resizing import image_side_at, parse_progressive_resizing, resize_shorter_side
from transferkit.finetuning.schedule import FreezeSchedule
from transferkit.finetuning.trunk import Trunk
from transferkit.lightning_internals import (
    attached_trainer,
    restarted_mid_epoch,
    set_ddp_find_unused_parameters,
)
from transferkit.models.backbones import Pretrained, create_backbone
from transferkit.models.calibration import THRESHOLD_METRICS, Calibration
from transferkit.models.heads import ClassifierHead
from transferkit.models.mixing import BatchMixing, hard_labels, soft_cross_entropy
from transferkit.models.regularisers import Regularisers

__all__ = ["TransferClassifier"]


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    # validate_args=False: the argument checks read values back from the device (a sync on every
    # step); labels are already checked by the data module and the loss.
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
            "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
        },
        prefix=prefix,
    )


class TransferClassifier(L.LightningModule):
    """A pretrained timm backbone with a new classifier head, fine-tuned with Adam and exponential LR decay.

    ``forward(x)`` maps images ``(B, 3, H, W)`` to logits ``(B, num_classes)``. The module holds the
    network and its optimisation recipe; freezing (:class:`~transferkit.finetuning.freezing.FreezeController`),
    penalties (:class:`~transferkit.models.regularisers.Regularisers`), TTA and MC dropout
    (:mod:`~transferkit.models.prediction`) and the checkpoint format (:mod:`~transferkit.models.checkpoint`)
    are units of their own; exact resumption is the Trainer's :class:`~transferkit.training.resume.ExactResume`.

    Args:
        num_classes: number of classes (the CLI fills it in from the data).
        backbone: timm architecture name.
        pretrained: where the backbone's weights come from: ``bundled``, ``hub``, a file path, or ``False``.
        class_names: names of the classes, in label order (the CLI fills them in from the data).
        class_groups: coarser classes the classes refine, ``{group: [class names]}`` (the CLI fills them
            in from ``data.class_groups`` or the source's own): validation and test then also log
            ``val_group_acc``/``val_group_f1`` and ``test_group_acc``/``test_group_f1``, a group's
            probability being the sum of its classes' (see :mod:`transferkit.data.class_groups`).
        hidden_dims: widths of the head's hidden layers (``[]`` for a linear head).
        activation: the head's activation (``elu``, ``leaky_relu``, ``relu``, ``selu``, ``tanh``, ``sigmoid``).
        init: the head's weight init (``he``, ``xavier``, ``lecun``; ``None`` = the one that suits the activation).
        dropout: dropout rate in the head.
        batch_norm: BatchNorm between each hidden Linear and its activation.
        max_norm: max-norm constraint on the head's incoming weight vectors, enforced after every step.
        optimizer: ``adam`` (default), ``adamw``, ``nadam``, ``sgd``, ``momentum``, ``nesterov``, ``adagrad``, ``rmsprop``.
        lr: learning rate of the head; backbone groups get ``lr * layer_decay ** depth`` unless
            ``backbone_lr`` is set. ``auto``: found by a range test when training starts
            (:func:`transferkit.training.lr_finder.lr_find`, run by :meth:`transferkit.Trainer.fit`):
            the head's in the frozen phase and, for a recipe that unfreezes, ``backbone_lr`` at the first
            unfreeze; the values chosen are logged and stored in the checkpoint.
        backbone_lr: learning rate of the top backbone group, the groups below it ``layer_decay`` times
            less each; ``None`` = ``lr * layer_decay``. Well under ``lr``, it keeps more pretrained features.
        weight_decay: L2 weight decay in the optimizer, on every trained parameter (decoupled for ``adamw``).
        l1: L1 penalty ``l1 * sum |w|`` on the weights of ``penalty_groups``, applied as its proximal step
            after every optimizer step, which sets weights exactly to zero (logged: ``l1_sparsity``).
        l2: L2 penalty ``l2 * sum w^2`` added to the loss, on the weights of ``penalty_groups``.
        penalty_groups: which weights ``l1``/``l2`` apply to: ``head``, ``backbone``, ``all``, or a list of
            optimizer group names (``head``, ``backbone.0`` ... ``backbone.N``, top = N); never biases.
        sparsity_threshold: ``|w|`` below which a penalised weight counts as zero in ``l1_sparsity``.
        momentum: momentum of ``momentum``/``nesterov``.
        betas: Adam/AdamW/NAdam's decay rates of the gradient's mean and of its square (beta1, beta2).
        eps: the term added to the denominator of the adaptive optimizers (AdaGrad, RMSProp, Adam...).
        rho: RMSProp's decay rate of the squared-gradient average.
        layer_decay: factor between the learning rates of two neighbouring backbone groups (deeper = smaller).
        lr_schedule: ``exponential`` (default), ``piecewise``, ``performance`` (reduce on plateau of
            ``val_loss``), ``onecycle``, ``cosine`` or ``none``.
        decay_rate: exponential decay: ``lr(t) = lr0 * decay_rate ** (t / decay_steps)``; also the factor
            of each ``piecewise`` milestone and of each ``performance`` reduction.
        decay_steps: optimizer steps per ``decay_rate`` factor; ``None`` = the whole run.
        lr_milestones: ``piecewise``: epochs at which the LR is multiplied by ``decay_rate``.
        plateau_patience: ``performance``: epochs without improvement before the LR drops.
        label_smoothing: cross-entropy label smoothing (towards the uniform distribution, also of mixed
            and soft targets).
        mixup_alpha: mixup of training batches: each image blended with another of the batch, ``lam ~
            Beta(a, a)``, the targets blended alike (:class:`~transferkit.models.mixing.BatchMixing`, timm's
            ``Mixup``); ``0`` = off, 0.2-0.4 is usual. Not with the feature or trunk caches.
        cutmix_alpha: CutMix of training batches: a box of another image pasted in, ``lam ~ Beta(a, a)``
            the share kept; ``0`` = off, ``1.0`` is usual.
        mix_prob: probability that a training batch is mixed at all.
        mix_switch_prob: with both mixup and CutMix on, probability that a mixed batch uses CutMix.
        freeze_schedule: which backbone groups train when (default: all of them from the start).
        drop_path_rate: stochastic depth in the backbone, where the architecture supports it.
        mc_dropout: Monte Carlo dropout at predict time: this many passes with the head's dropout on;
            ``predict`` then returns the mean probabilities and their uncertainty. ``0`` = off.
        tta: test-time augmentation for ``test`` and ``predict``, the views' probabilities averaged:
            ``none``, ``hflip`` (image + mirror), ``flips`` (+ vertical), ``d4`` (8 flips and rotations).
        channels_last: run the backbone in channels-last (NHWC) memory layout, which oneDNN and cuDNN
            convolutions run faster; ``False`` keeps NCHW.
        compile: compile the backbone with ``torch.compile`` when training starts.
        progressive_resizing: training image side by epoch, ``{epoch: side}`` (e.g. ``{3: 176, 13: 224}``):
            training batches are resized to it from each listed epoch on; validation, test and predict
            always run at the data's size, and cached features are not resized.
        progress_bar_step_loss: show each step's training loss in the progress bar, which reads it back
            from the device every step; ``None`` (default): on the CPU only, where that costs nothing.
        calibrate: after training, fit a temperature on the validation split (temperature scaling: the
            logits divided by one number so that the validation NLL is lowest; accuracy is unchanged) and
            store it in the best checkpoint; ``test``, ``predict``, ``predict-images`` and ``export`` then
            give calibrated probabilities (:class:`~transferkit.models.calibration.Calibration`).
        decision_threshold: two classes only: after training, choose the threshold on class 1's
            probability that maximises ``accuracy`` or ``f1`` on the validation split, store it with the
            temperature, and predict class 1 when its probability reaches it. ``None`` = most probable class.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: Pretrained = "bundled",
        class_names: list[str] | None = None,
        class_groups: dict[str, list[str | int]] | None = None,
        hidden_dims: tuple[int, ...] = (256,),
        activation: str = "elu",
        init: str | None = None,
        dropout: float = 0.2,
        batch_norm: bool = True,
        max_norm: float | None = None,
        optimizer: str = "adam",
        lr: float | Literal["auto"] = 1e-3,
        backbone_lr: float | None = None,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        l2: float = 0.0,
        penalty_groups: str | list[str] = "head",
        sparsity_threshold: float = 1e-3,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rho: float = 0.9,
        layer_decay: float = 0.8,
        lr_schedule: str = "exponential",
        decay_rate: float = 0.1,
        decay_steps: int | None = None,
        lr_milestones: list[int] | None = None,
        plateau_patience: int = 2,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
        freeze_schedule: FreezeSchedule | None = None,
        drop_path_rate: float | None = None,
        mc_dropout: int = 0,
        tta: str = "none",
        channels_last: bool = True,
        compile: bool = False,
        progressive_resizing: dict[int, int] | None = None,
        progress_bar_step_loss: bool | None = None,
        calibrate: bool = False,
        decision_threshold: Literal["accuracy", "f1"] | None = None,
    ) -> None:
        super().__init__()
        schedule = FreezeSchedule.coerce(freeze_schedule)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class_names given for num_classes={num_classes}.")
        if isinstance(lr, str) and lr != "auto":
            raise ConfigError(f"lr must be a number > 0 or 'auto' (found by a range test), got {lr!r}.")
        numeric_lr = 1e-3 if lr == "auto" else lr  # checked with a stand-in until the range test runs
        check_optimization(
            optimizer, numeric_lr, lr_schedule, backbone_lr, weight_decay, layer_decay, decay_rate
        )
        prediction.check_prediction_settings(tta, mc_dropout, dropout)
        if decision_threshold is not None and (
            decision_threshold not in THRESHOLD_METRICS or num_classes != 2
        ):
            raise ConfigError(
                f"decision_threshold chooses class 1's threshold for two classes, maximising "
                f"{' or '.join(THRESHOLD_METRICS)}; got {decision_threshold!r} with num_classes={num_classes}."
            )
        progressive_resizing = parse_progressive_resizing(progressive_resizing)
        self.save_hyperparameters(ignore=["freeze_schedule"])
        # plain types only, so checkpoints load with weights_only=True
        self.hparams["freeze_schedule"] = schedule.to_dict()
        self.hparams["hidden_dims"] = list(hidden_dims)
        self.hparams["betas"] = [float(b) for b in betas]
        if progressive_resizing is not None:
            self.hparams["progressive_resizing"] = progressive_resizing  # int keys, also from YAML

        self.regularisers = Regularisers(
            l1, l2, penalty_groups, sparsity_threshold, groups=self.parameter_groups
        )
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
        self.freezing = FreezeController(self.backbone, schedule)
        # temperature and decision threshold, fitted after training (calibrate, decision_threshold) or
        # read from a checkpoint; until then the identity (temperature 1, most probable class)
        self.calibration = Calibration()
        self._fed: tuple[StageKind, Any] | None = None  # what forward takes: images (see feed)
        self.preprocessing: dict[str, Any] | None = None  # set_preprocessing: how inputs are prepared
        self.mixing = BatchMixing(mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, num_classes)
        self.class_names = (
            list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        )
        # training accuracy is a batch-weighted mean kept on the device by self.log: torchmetrics'
        # confusion counts (bincount) read the device back on every step
        self.val_metrics = _metrics(num_classes, "val_")
        self.test_metrics = _metrics(num_classes, "test_")
        self.class_groups = resolve_class_groups(class_groups, self.class_names)  # {group: [class index]}
        if self.class_groups is not None:
            self.val_group_metrics = _metrics(len(self.class_groups), "val_group_")
            self.test_group_metrics = _metrics(len(self.class_groups), "test_group_")
        # (true labels, predicted labels) of the last test loop on this process, so the run report's
        # confusion matrix needs no second pass over the test split
        self.test_predictions: tuple[np.ndarray, np.ndarray] | None = None
        # and its raw logits per test-time view (V, N, C), before any temperature
        self.test_view_logits: torch.Tensor | None = None
        self._test_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    # --- what the model is -------------------------------------------------------------------------

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

    @trainable_groups.setter
    def trainable_groups(self, value: int | None) -> None:
        self.freezing.trainable_groups = value

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
        """Pooled backbone features ``(B, num_features)`` of images ``(B, 3, H, W)``, or of what the model
        is fed instead (see :meth:`feed`): pooled features pass through, a frozen trunk's feature maps go
        through the trainable top of the backbone."""
        fed = self._fed
        if fed is not None and fed[0] == "features":
            return x
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if fed is None:
            return self.backbone(x)
        return fed[1].rest(x.to(self.dtype))  # float16 trunk features; .to keeps the channels-last layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 3, H, W)`` (or of what the model is fed, see :meth:`feed`)."""
        return self.head(self.features(x))

    # --- freezing ----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.hparams.compile and stage == "fit":
            self.backbone.model.compile()  # in place: parameter names (and checkpoints) stay the same
        trainer = attached_trainer(self)
        strategy = trainer.strategy if trainer is not None else None
        if stage == "fit" and self.freeze_schedule.active and isinstance(strategy, DDPStrategy):
            # frozen groups get no gradients, and unfrozen ones start getting them mid-run: DDP must look
            # for unused parameters every step (set before the model is wrapped, which comes next)
            set_ddp_find_unused_parameters(strategy)

    def on_train_start(self) -> None:
        if restarted_mid_epoch(self.trainer):
            self._start_epoch()  # Lightning calls no on_train_epoch_start for an epoch resumed mid-way

    def on_train_epoch_start(self) -> None:
        self._start_epoch()

    def _start_epoch(self) -> None:
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
        return image_side_at(self.hparams.get("progressive_resizing"), epoch)

    # --- steps -------------------------------------------------------------------------------------

    def predict_proba(self, images: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)`` for images ``(B, 3, H, W)``, averaged over the
        test-time augmentation views (``tta``: ``none``, ``hflip``, ``flips``, ``d4``; default: the
        module's own ``tta``)."""
        return prediction.predict_proba(self, images, tta or self.hparams.tta, self.calibration.temperature)

    def view_logits(self, images: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """Raw logits ``(V, B, C)`` of each test-time augmentation view of images ``(B, 3, H, W)``
        (``V = 1`` without TTA), before the temperature."""
        return prediction.view_logits(self, images, tta or self.hparams.tta)

    def predict_labels(self, probs: torch.Tensor) -> torch.Tensor:
        """Class indices ``(B,)`` from :meth:`predict_proba`'s probabilities: the stored decision threshold
        for two classes when there is one, else the most probable class."""
        return self.calibration.predict(probs)

    def predict_mc_dropout(
        self, images: torch.Tensor, samples: int = 20, tta: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Monte Carlo dropout over ``samples`` passes (see :func:`transferkit.models.prediction.predict_mc_dropout`):
        mean ``probs`` ``(B, C)``, their ``std`` ``(B, C)`` and the predictive ``entropy`` ``(B,)``."""
        return prediction.predict_mc_dropout(
            self, images, samples, tta or self.hparams.tta, self.calibration.temperature
        )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        side = self.train_image_side(self.current_epoch)
        if side is not None and self._fed is None:  # stored features keep the size they were stored at
            images = resize_shorter_side(images, side)
        if self.mixing.active:
            if self._fed is not None:  # told it is fed stored features: there are no images to mix
                raise ConfigError("mixup/CutMix mix training images; this model is fed stored features.")
            images, labels = self.mixing.mix(images, labels)
        return self._shared_step(images, labels, None, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(*batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(*batch, self.test_metrics, "test")

    def on_test_epoch_start(self) -> None:
        self._test_batches = []

    def on_test_epoch_end(self) -> None:
        if self._test_batches:
            truth, predicted, views = zip(*self._test_batches, strict=True)
            self.test_predictions = (torch.cat(truth).cpu().numpy(), torch.cat(predicted).cpu().numpy())
            self.test_view_logits = torch.cat(views, dim=1).float().cpu()
        self._test_batches = []

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """Class probabilities ``(B, num_classes)`` (with the module's test-time augmentation); with
        ``mc_dropout`` a dict of the mean ``probs``, their ``std`` and the predictive ``entropy``."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        if self.hparams.mc_dropout:
            return self.predict_mc_dropout(images, self.hparams.mc_dropout)
        return self.predict_proba(images)

    def _shared_step(
        self, images: torch.Tensor, labels: torch.Tensor, metrics: MetricCollection | None, stage: str
    ) -> torch.Tensor:
        views = None
        if stage == "test" and images.ndim == 4:
            views = self.view_logits(images)  # (V, B, C), kept for the report's calibration and top losses
            if self.hparams.tta != "none" or self.calibration.fitted:
                # the loss is the NLL of the (calibrated) averaged probabilities, as predict_proba gives them
                probs = self.calibration.probabilities(views).mean(dim=0)
                logits = probs.clamp_min(1e-12).log()
            else:
                logits = views[0]
        else:
            logits = self(images)
        loss = self.loss(logits, labels)
        labels = hard_labels(labels)  # what accuracy and the other metrics score
        # the test split is scored as predict scores it: with the stored decision threshold, if any
        scored = self.predict_labels(logits.detach().softmax(dim=-1)) if stage == "test" else logits
        on_step = stage == "train"
        shown = not on_step or self._step_loss_in_progress_bar()
        self.log(
            f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=shown, batch_size=len(labels)
        )
        if metrics is None:
            correct = (logits.detach().argmax(dim=-1) == labels).float().mean()
            self.log(f"{stage}_acc", correct, on_step=False, on_epoch=True, batch_size=len(labels))
        else:
            metrics.update(scored.detach(), labels)
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)
        if self.class_groups is not None and stage in ("val", "test"):
            grouped = getattr(self, f"{stage}_group_metrics")
            probs = logits.detach().softmax(dim=-1)  # the (calibrated, averaged) probabilities on test
            grouped.update(
                group_probabilities(probs, self.class_groups), group_labels(labels, self.class_groups)
            )
            self.log_dict(grouped, on_step=False, on_epoch=True)
        if stage == "test":
            raw = views.detach() if views is not None else logits.detach()[None]
            self._test_batches.append((labels.detach(), scored.detach(), raw))
        if stage == "train" and self.regularisers.active:
            penalty = self.regularisers.penalty()  # logged; its L2 part is in the loss, L1 is a proximal step
            self.log("train_penalty", penalty, on_step=False, on_epoch=True, batch_size=len(labels))
            if self.regularisers.l2:
                loss = loss + self.regularisers.l2_term()
        return loss

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the module's label smoothing, against hard labels ``(B,)`` or class
        distributions ``(B, C)`` (mixed batches, soft labels)."""
        if labels.ndim == 2:
            return soft_cross_entropy(logits, labels, self.hparams.label_smoothing)
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)

    def _step_loss_in_progress_bar(self) -> bool:
        # Lightning reads progress-bar values back after every batch: a stall per step on a GPU
        shown = self.hparams.progress_bar_step_loss
        return self.device.type == "cpu" if shown is None else bool(shown)

    # --- regularisation ----------------------------------------------------------------------------

    @property
    def penalised_weights(self) -> list[torch.nn.Parameter]:
        """The weights ``l1``/``l2`` apply to (weight matrices and conv kernels of ``penalty_groups``)."""
        return self.regularisers.weights

    def sparsity(self) -> float:
        """Fraction of the penalised weights with ``|w| < sparsity_threshold`` (logged as ``l1_sparsity``)."""
        return self.regularisers.sparsity()

    def on_train_epoch_end(self) -> None:
        if self.hparams.l1:
            self.log("l1_sparsity", self.sparsity(), on_step=False, on_epoch=True)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, *args, **kwargs)
        self.regularisers.proximal_step(optimizer)
        self.head.apply_max_norm()  # the constraint holds after every update

    # --- optimisation ------------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups, all built up front: the head, then backbone groups top to bottom."""
        hp = self.hparams
        if isinstance(hp.lr, str):
            raise ConfigError(
                "model.lr is 'auto' and no range test has set it: transferkit.Trainer.fit runs one; with "
                "another Trainer, call transferkit.lr_find(model, datamodule) first."
            )
        return self.freezing.parameter_groups(
            list(self.head.parameters()), hp.lr, hp.layer_decay, hp.backbone_lr
        )

    def optimization(self, total_steps: int, steps_per_epoch: int, max_epochs: int) -> dict[str, Any]:
        """The optimizer and LR scheduler config for a run of ``max_epochs`` epochs of ``steps_per_epoch``
        optimizer steps (``total_steps`` in all), as :meth:`configure_optimizers` returns them."""
        return create_optimization(
            self.hparams,
            self.parameter_groups(),
            total_steps,
            steps_per_epoch,
            unfreeze_steps=self.freezing.unfreeze_steps(steps_per_epoch, max_epochs),
            warmup_steps=self.freeze_schedule.warmup_steps,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        total_steps, steps_per_epoch, max_epochs = 1, 1, 1
        trainer = attached_trainer(self)
        if trainer is not None:
            total_steps = int(trainer.estimated_stepping_batches)
            max_epochs = trainer.max_epochs or 0
            steps_per_epoch = max(total_steps // max_epochs, 1) if max_epochs > 0 else total_steps
            max_epochs = max_epochs if max_epochs > 0 else 10_000
        return self.optimization(total_steps, steps_per_epoch, max_epochs)

    # --- checkpoints -------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint self-describing (:func:`transferkit.models.checkpoint.checkpoint_section`)."""
        checkpoint[checkpoint_format.SECTION] = checkpoint_format.checkpoint_section(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with what differs and what to do, a checkpoint of another backbone, class count or head;
        take its calibration (temperature, decision threshold)."""
        if checkpoint_format.SECTION in checkpoint:
            checkpoint_format.check_compatible(self, checkpoint)
            self.calibration = checkpoint_format.calibration_of(checkpoint)
            if self.preprocessing is None:  # a model rebuilt from its checkpoint describes itself as before
                self.preprocessing = checkpoint_format.model_preprocessing(checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str, **overrides: Any) -> TransferClassifier:
        """The model saved in the checkpoint ``path``, in eval mode on the CPU, without its recipe: every
        weight comes from the checkpoint (read with ``weights_only=True``), none from a bundle, a file or
        the hub. ``overrides`` change what does not alter the weights' shapes (e.g. ``tta="hflip"``).
        :func:`transferkit.load_for_inference` also returns the eval pipeline it was tested with."""
        return checkpoint_format.build_model(cls, checkpoint_format.read_checkpoint(path), path, **overrides)
