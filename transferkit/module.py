"""The LightningModule: a pretrained backbone, a new head, and the optimisation recipe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from transferkit.backbones import BackboneError, Pretrained, create_backbone
from transferkit.containers import plain
from transferkit.data.datamodule import align_train_loader
from transferkit.finetuning import (
    FreezeSchedule,
    Trunk,
    apply_freeze,
    backbone_groups,
    group_learning_rates,
    set_batchnorm_modes,
    value_at,
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
        lr: learning rate of the head; backbone groups get ``lr * layer_decay ** depth`` unless
            ``backbone_lr`` is set.
        backbone_lr: learning rate of the top backbone group, the groups below it ``layer_decay`` times
            less each; ``None`` = ``lr * layer_decay``. A rate well under the head's (e.g. ``1e-4``
            with ``lr: 1e-3``) keeps more of the pretrained features, which suits images close to
            ImageNet; on images far from it (ELPV) the larger default did better (README).
        weight_decay: L2 weight decay in the optimizer, on every trained parameter (decoupled for ``adamw``).
        l1: L1 penalty ``l1 * sum |w|`` on the weights of ``penalty_groups``, applied as its proximal
            step after every optimizer step (soft-thresholding by ``lr * l1``), which sets weights
            exactly to zero; the fraction under ``sparsity_threshold`` is logged as ``l1_sparsity``.
        l2: L2 penalty ``l2 * sum w^2`` added to the loss, on the weights of ``penalty_groups``.
        penalty_groups: which weights ``l1``/``l2`` apply to: ``head``, ``backbone``, ``all``, or a list of
            optimizer group names (``head``, ``backbone.0`` ... ``backbone.N``, top = N). Biases and
            normalisation parameters are never penalised.
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
        label_smoothing: cross-entropy label smoothing.
        freeze_schedule: which backbone groups train when (default: all of them from the start).
        drop_path_rate: stochastic depth in the backbone, where the architecture supports it.
        mc_dropout: Monte Carlo dropout at predict time: this many stochastic forward passes with the
            head's dropout on (BatchNorm stays in eval mode); ``predict`` then returns the mean
            probabilities and their uncertainty. ``0`` = off.
        tta: test-time augmentation for ``test`` and ``predict``: ``none``, ``hflip`` (image + mirror),
            ``flips`` (+ vertical flips), ``d4`` (all 8 flips and 90-degree rotations); the
            probabilities of the views are averaged.
        channels_last: run the backbone in channels-last (NHWC) memory layout, which oneDNN and cuDNN
            convolutions run faster (``benchmarks/memory_format.py``); ``False`` keeps NCHW.
        compile: compile the backbone with ``torch.compile`` when training starts.
        progressive_resizing: training image size by epoch, ``{epoch: side}``: from each listed epoch
            on, training batches are resized (bilinear, antialiased) so their shorter side is ``side``
            before the backbone sees them; epochs before the first key train at the data's size.
            Validation, test and predict always run at the data's size, so small early epochs buy
            time for more epochs at full size (``{3: 176, 13: 224}``: a 176 px training step costs
            about half a 224 px one on a CPU). Batches from ``feature_cache``/``trunk_cache`` are not
            resized.
        progress_bar_step_loss: show each step's training loss in the progress bar. Lightning turns
            progress-bar values into Python numbers after every batch, a read-back that stalls a GPU
            every step; ``None`` (default) shows it on the CPU, where that costs nothing, and elsewhere
            leaves it to the loggers (``train_loss_step``) and the epoch means.
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
        freeze_schedule: FreezeSchedule | None = None,
        drop_path_rate: float | None = None,
        mc_dropout: int = 0,
        tta: str = "none",
        channels_last: bool = True,
        compile: bool = False,
        progressive_resizing: dict[int, int] | None = None,
        progress_bar_step_loss: bool | None = None,
    ) -> None:
        super().__init__()
        schedule = FreezeSchedule.coerce(freeze_schedule)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        if backbone_lr is not None and not backbone_lr > 0:
            raise ValueError(f"backbone_lr must be > 0 (or null for lr * layer_decay), got {backbone_lr}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        if any(not isinstance(d, int) or d < 1 for d in hidden_dims):
            raise ValueError(
                f"hidden_dims must be positive layer widths (or [] for a linear head), got {list(hidden_dims)}."
            )
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
        if l1 < 0 or l2 < 0:
            raise ValueError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}.")
        if mc_dropout < 0 or mc_dropout == 1:
            raise ValueError(
                f"mc_dropout is the number of stochastic passes (0 = off, >= 2 to measure a spread), got {mc_dropout}."
            )
        if mc_dropout and dropout == 0:
            raise ValueError("mc_dropout needs dropout in the head; set model.dropout > 0 (e.g. 0.2).")
        if progressive_resizing is not None:
            try:
                progressive_resizing = {int(k): int(v) for k, v in dict(progressive_resizing).items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"progressive_resizing maps epoch -> image side, e.g. {{3: 176, 13: 224}}; got {progressive_resizing!r}."
                ) from None
            bad = {k: v for k, v in progressive_resizing.items() if k < 0 or v < 1}
            if bad:
                raise ValueError(
                    f"progressive_resizing maps epoch (>= 0) -> image side in pixels (>= 1); got {bad}."
                )
        self.save_hyperparameters(ignore=["freeze_schedule"])
        # plain types only, so checkpoints load with weights_only=True
        self.hparams["freeze_schedule"] = schedule.to_dict()
        self.hparams["hidden_dims"] = list(hidden_dims)
        self.hparams["betas"] = [float(b) for b in betas]
        if progressive_resizing is not None:
            self.hparams["progressive_resizing"] = dict(sorted(progressive_resizing.items()))

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
        self._trunks: dict[int, Trunk] = {}
        self._penalised: list[torch.nn.Parameter] | None = None
        self._pending_rng_state: torch.Tensor | None = None
        self._saved_epoch_metrics: dict[str, float] = {}  # a resumed checkpoint's epoch-end metrics
        self.trainable_groups: int | None = None  # None: nothing frozen yet (before training starts)
        if schedule.active:
            _ = self.groups  # a backbone that cannot be split fails here, before any training
            most = max(schedule.milestones.values()) if schedule.milestones else 0
            if most > len(self.groups):
                epoch = next(e for e, n in schedule.milestones.items() if n == most)
                raise ValueError(
                    f"freeze_schedule.milestones asks for {most} trainable backbone groups (at epoch {epoch}), "
                    f"but '{backbone}' has {len(self.groups)}; use at most {len(self.groups)}, or -1 for all of "
                    "them (python -m transferkit plan --config <recipe> shows the groups)."
                )

        def metrics() -> MetricCollection:
            # validate_args=False: the argument checks read values back from the device (a sync on
            # every step); labels are already checked by the data module and the loss.
            return MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
                    "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
                }
            )

        # training accuracy is a batch-weighted mean kept on the device by self.log: torchmetrics'
        # confusion counts (bincount) read the device back on every step
        self.val_metrics = metrics().clone(prefix="val_")
        self.test_metrics = metrics().clone(prefix="test_")
        # (true labels, predicted labels) of the last test loop on this process, so the run report's
        # confusion matrix needs no second pass over the test split
        self.test_predictions: tuple[np.ndarray, np.ndarray] | None = None
        self._test_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

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

    def trunk(self, frozen_groups: int) -> Trunk:
        """The bottom ``frozen_groups`` backbone groups as a :class:`~transferkit.finetuning.Trunk`."""
        if frozen_groups not in self._trunks:
            self._trunks[frozen_groups] = Trunk(self.backbone, self.groups, frozen_groups)
        return self._trunks[frozen_groups]

    def _is_image(self, x: torch.Tensor) -> bool:
        return x.ndim == 4 and x.shape[1] == self.data_config["input_size"][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> logits. Cached inputs from the data module's feature caches, while
        training: pooled backbone features ``(B, num_features)`` go straight to the head; feature maps
        ``(B, C, H, W)`` of the frozen trunk go through the trainable top of the backbone."""
        if x.ndim == 2:
            return self.head(x)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._is_image(x):
            return self.head(self.backbone(x))
        if self.trainable_groups is None or self.trainable_groups in (0, len(self.groups)):
            raise ValueError(
                f"got a {tuple(x.shape)} batch, neither images with {self.data_config['input_size'][0]} "
                "channels nor trunk features of a partly frozen backbone."
            )
        # float16 trunk features; .to keeps the channels-last layout
        return self.head(self.trunk(len(self.groups) - self.trainable_groups).rest(x.to(self.dtype)))

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

    def on_train_start(self) -> None:
        if self.trainer.fit_loop.restarted_mid_epoch:
            # Lightning calls no on_train_epoch_start for an epoch it resumes in the middle of
            self._start_epoch()
        self._catch_up_plateau_schedulers(self.current_epoch)
        align_train_loader(self.trainer)  # a resumed run's first epoch gets its own order, not epoch 0's

    def on_train_epoch_start(self) -> None:
        self._start_epoch()

    def _start_epoch(self) -> None:
        """The epoch's RNG (on resuming), image side and trainable groups."""
        if self._pending_rng_state is not None:
            torch.set_rng_state(self._pending_rng_state)  # resume with the RNG where the run left it
            self._pending_rng_state = None
        side = self.train_image_side(self.current_epoch)
        if side is not None:
            self.log("train_image_side", float(side), on_step=False, on_epoch=True)
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

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection | None, stage: str
    ):
        images, labels = batch
        if stage == "test" and self.hparams.tta != "none" and images.ndim == 4:
            # averaged probabilities; the loss is the NLL of the average
            logits = self.predict_proba(images).clamp_min(1e-12).log()
        else:
            logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        on_step = stage == "train"
        self.log(
            f"{stage}_loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            prog_bar=not on_step or self._step_loss_in_progress_bar(),
            batch_size=len(labels),
        )
        if metrics is None:
            correct = (logits.detach().argmax(dim=-1) == labels).float().mean()
            self.log(f"{stage}_acc", correct, on_step=False, on_epoch=True, batch_size=len(labels))
        else:
            metrics.update(logits, labels)
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)
        if stage == "test":
            self._test_batches.append((labels.detach(), logits.detach().argmax(dim=-1)))
        if stage == "train" and (self.hparams.l1 or self.hparams.l2):
            penalty = self.penalty()
            self.log("train_penalty", penalty, on_step=False, on_epoch=True, batch_size=len(labels))
            if self.hparams.l2:
                loss = loss + self.hparams.l2 * sum(
                    w.square().sum() for w in self.penalised_weights if w.requires_grad
                )
        return loss

    def _step_loss_in_progress_bar(self) -> bool:
        shown = self.hparams.progress_bar_step_loss
        return self.device.type == "cpu" if shown is None else bool(shown)

    # --- regularisation ----------------------------------------------------------------------------

    @property
    def penalised_weights(self) -> list[torch.nn.Parameter]:
        """The weights ``l1``/``l2`` apply to (weight matrices and conv kernels of ``penalty_groups``)."""
        if self._penalised is None:
            chosen = self.hparams.penalty_groups
            groups = self.parameter_groups()
            names = [g["name"] for g in groups]
            if chosen == "all":
                wanted = set(names)
            elif chosen == "head":
                wanted = {"head"}
            elif chosen == "backbone":
                wanted = {n for n in names if n.startswith("backbone.")}
            else:
                wanted = {chosen} if isinstance(chosen, str) else set(chosen)
                unknown = wanted - set(names)
                if unknown:
                    raise ValueError(
                        f"penalty_groups names unknown groups {sorted(unknown)}; choose 'head', 'backbone', "
                        f"'all' or a list of {names}."
                    )
            self._penalised = [p for g in groups if g["name"] in wanted for p in g["params"] if p.ndim >= 2]
        return self._penalised

    def penalty(self) -> torch.Tensor:
        """``l1 * sum |w| + l2 * sum w^2`` over :attr:`penalised_weights` that are trained now (logged as
        ``train_penalty``; the L2 part is in the training loss, the L1 part is applied by its proximal step)."""
        hp = self.hparams
        total = torch.zeros((), device=self.device)
        for weight in self.penalised_weights:
            if not weight.requires_grad:  # a frozen group is not regularised (it cannot change)
                continue
            if hp.l1:
                total = total + hp.l1 * weight.abs().sum()
            if hp.l2:
                total = total + hp.l2 * weight.square().sum()
        return total

    def sparsity(self) -> float:
        """Fraction of :attr:`penalised_weights` with ``|w| < sparsity_threshold``."""
        weights = self.penalised_weights
        if not weights:
            return 0.0
        small = sum(int((w.detach().abs() < self.hparams.sparsity_threshold).sum()) for w in weights)
        return small / sum(w.numel() for w in weights)

    def on_train_epoch_end(self) -> None:
        if self.hparams.l1:
            self.log("l1_sparsity", self.sparsity(), on_step=False, on_epoch=True)
        loop = self.trainer.fit_loop
        if loop.restarting and loop.epoch_loop._num_ready_batches_reached():
            # Lightning steps no plateau scheduler at the end of the epoch a run resumes in
            self._catch_up_plateau_schedulers(self.current_epoch + 1)
        self._saved_epoch_metrics = {}

    def _catch_up_plateau_schedulers(self, epochs_ended: int) -> None:
        """Step each plateau scheduler (``lr_schedule: performance``) that has seen fewer epoch ends than
        ``epochs_ended``, as an uninterrupted run would have, on the metric it watches: this process's
        validation, or the value the resumed checkpoint holds. Lightning leaves them a step behind after
        resuming from a checkpoint written at an epoch's end (before its scheduler step), and skips the
        step of an epoch resumed in the middle; both for want of that metric."""
        metrics = {**self._saved_epoch_metrics, **_scalars(self.trainer.callback_metrics)}
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not config.reduce_on_plateau or config.interval != "epoch" or config.frequency != 1:
                continue
            if scheduler.last_epoch < epochs_ended and config.monitor in metrics:
                scheduler.step(metrics[config.monitor])

    def train_image_side(self, epoch: int) -> int | None:
        """The shorter image side ``progressive_resizing`` asks for at ``epoch`` (``None``: the data's)."""
        return value_at(self.hparams.get("progressive_resizing") or {}, epoch)

    def resize_for_training(self, images: torch.Tensor) -> torch.Tensor:
        """Training images resized to this epoch's ``progressive_resizing`` side (unchanged without one)."""
        side = self.train_image_side(self.current_epoch)
        if side is None or not self._is_image(images) or min(images.shape[-2:]) == side:
            return images
        height, width = images.shape[-2:]
        scale = side / min(height, width)
        size = (max(round(height * scale), 1), max(round(width * scale), 1))
        return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.hparams.get("progressive_resizing"):
            images, labels = batch
            batch = (self.resize_for_training(images), labels)
        return self._shared_step(batch, None, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, self.test_metrics, "test")

    def on_test_epoch_start(self) -> None:
        self._test_batches = []

    def on_test_epoch_end(self) -> None:
        if self._test_batches:
            truth, predicted = zip(*self._test_batches, strict=True)
            self.test_predictions = (torch.cat(truth).cpu().numpy(), torch.cat(predicted).cpu().numpy())
        self._test_batches = []

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """Class probabilities ``(B, num_classes)`` (with the module's test-time augmentation); with
        ``mc_dropout`` a dict of the mean ``probs``, their ``std`` ``(B, num_classes)`` and the
        predictive ``entropy`` ``(B,)`` over the stochastic passes."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        if self.hparams.mc_dropout:
            return self.predict_mc_dropout(images, self.hparams.mc_dropout)
        return self.predict_proba(images)

    @torch.no_grad()
    def predict_mc_dropout(self, images: torch.Tensor, samples: int = 20) -> dict[str, torch.Tensor]:
        """Monte Carlo dropout (Gal & Ghahramani, 2016): ``samples`` forward passes of the head with
        dropout active, the backbone and every BatchNorm in eval mode.

        Returns ``probs`` (mean, ``(B, C)``), ``std`` (spread of each class probability, ``(B, C)``) and
        ``entropy`` (of the mean, ``(B,)``; high = uncertain). The backbone runs once per view.
        """
        if samples < 2:
            raise ValueError(f"MC dropout needs at least 2 samples, got {samples}.")
        dropouts = [m for m in self.head.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if not dropouts:
            raise ValueError("MC dropout needs dropout in the head; this model was built with dropout=0.")
        was_training = self.training
        self.eval()
        try:
            for m in dropouts:
                m.train()
            draws = []
            for view in TTA_VIEWS[self.hparams.tta]:
                x = view(images)
                features = (
                    x
                    if x.ndim == 2
                    else self.backbone(
                        x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x
                    )
                )
                draws += [self.head(features).softmax(dim=-1) for _ in range(samples)]
        finally:
            self.train(was_training)
        stacked = torch.stack(draws)
        probs = stacked.mean(dim=0)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
        return {"probs": probs, "std": stacked.std(dim=0), "entropy": entropy}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, *args, **kwargs)
        if self.hparams.l1:
            self._l1_proximal_step(optimizer)
        self.head.apply_max_norm()  # the constraint holds after every update

    @torch.no_grad()
    def _l1_proximal_step(self, optimizer: Any) -> None:
        # The proximal step of l1 * |w| (soft-thresholding by lr * l1, as in ISTA): weights the data
        # does not hold away from zero become exactly zero, where a subgradient would leave them
        # oscillating around it.
        penalised = {id(w) for w in self.penalised_weights}
        for group in optimizer.param_groups:
            threshold = group["lr"] * self.hparams.l1
            for weight in group["params"]:
                if id(weight) in penalised and weight.requires_grad:
                    weight.copy_(weight.sign() * (weight.abs() - threshold).clamp_min(0))

    # --- optimisation ------------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups, all built up front: the head, then backbone groups top to bottom."""
        hp = self.hparams
        named = dict(self.backbone.model.named_parameters())
        lrs = group_learning_rates(hp.lr, len(self.groups), hp.layer_decay, hp.backbone_lr)
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
            betas=tuple(hp.betas),
            eps=hp.eps,
            rho=hp.rho,
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
        """Make the checkpoint self-describing (see :mod:`transferkit.serving`): backbone and the source of
        its weights, class names, the eval pipeline (``A.to_dict``) with mean, std and input size, and
        the freeze schedule with its state. Plain types only, so it loads with ``weights_only=True``."""
        from transferkit.serving import SECTION_FORMAT, checkpoint_preprocessing

        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint["transferkit"] = {
            "format": SECTION_FORMAT,
            "backbone": self.backbone.name,
            "weights": self.backbone.weights,
            "class_names": list(self.class_names),
            "data_config": plain(self.data_config),
            "preprocessing": checkpoint_preprocessing(self, datamodule),
            "freeze_schedule": self.freeze_schedule.to_dict(),
            "trainable_groups": self.trainable_groups,
            "num_groups": len(self.groups),
        }
        checkpoint["transferkit_rng_state"] = torch.get_rng_state()
        # what a plateau scheduler reads at an epoch's end, for a run resumed there (_catch_up_plateau_schedulers)
        metrics = self._trainer.callback_metrics if self._trainer is not None else {}
        checkpoint["transferkit_epoch_metrics"] = _scalars(metrics)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with what differs and what to do, a checkpoint of another backbone, class count or head."""
        if "transferkit" in checkpoint:
            from transferkit.serving import check_compatible

            check_compatible(self, checkpoint)
        self._pending_rng_state = checkpoint.get("transferkit_rng_state")
        self._saved_epoch_metrics = dict(checkpoint.get("transferkit_epoch_metrics") or {})

    @classmethod
    def from_checkpoint(cls, path: str, **overrides: Any) -> TransferClassifier:
        """The model saved in the checkpoint ``path``, in eval mode on the CPU, without its recipe.

        Rebuilt from the checkpoint's own hyperparameters with ``pretrained=False``, so no weights are
        fetched from a bundle, a file or the hub: all of them come from the checkpoint, which is read
        with ``weights_only=True``. ``overrides`` change what does not alter the weights' shapes (e.g.
        ``tta="hflip"``). The eval pipeline it was tested with:
        :func:`transferkit.serving.load_for_inference` returns both.

        Example:
            >>> model = TransferClassifier.from_checkpoint("runs/x/checkpoints/best.ckpt")  # doctest: +SKIP
            >>> model.predict_proba(images)  # (B, num_classes)  # doctest: +SKIP
        """
        from transferkit.serving import load_checkpoint_model

        return load_checkpoint_model(path, **overrides)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-number entries of a metrics dict, as floats."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) or (torch.is_tensor(value) and value.numel() == 1)
    }
