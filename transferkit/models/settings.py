"""What can be set on a :class:`~transferkit.TransferClassifier`, in typed groups validated at construction.

A recipe's ``model`` section names the backbone and the classes, then one group per concern::

    model:
      backbone: tf_efficientnet_lite0
      head: {hidden_dims: [256], dropout: 0.3}
      optimizer: {name: adam, lr: 0.001, layer_decay: 0.75}
      lr_schedule: {name: cosine}
      freeze_schedule: {milestones: {0: 0, 3: 3}}
      regularisation: {label_smoothing: 0.1}
      mixing: {mixup_alpha: 0.2}
      prediction: {tta: hflip, calibrate: true}
      runtime: {channels_last: true}

and every field is one flag on the command line (``--model.optimizer.lr 3e-4``; the most used ones have
short forms, see :data:`transferkit.cli.SHORT_FLAGS`). :class:`HeadSettings`, :class:`RegularisationSettings`,
:class:`LossSettings`, :class:`MixingSettings`, :class:`PredictionSettings` and :class:`RuntimeSettings` are here;
:class:`~transferkit.finetuning.optim.OptimizerSettings`,
:class:`~transferkit.finetuning.optim.LRScheduleSettings` and
:class:`~transferkit.finetuning.schedule.FreezeSchedule` sit beside the mechanics they drive.
:class:`ClassifierSettings` holds them all: what a model is built from, what its checkpoint stores
(:meth:`ClassifierSettings.to_dict`), and what rebuilds it (:meth:`ClassifierSettings.init_args`).

Checkpoints written before the groups stored the settings flat (``lr``, ``dropout`` ...):
:func:`from_flat` reads them, and :data:`FLAT_KEYS` names each flat key's new place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from transferkit.errors import ConfigError
from transferkit.finetuning.optim import LRScheduleSettings, OptimizerSettings
from transferkit.finetuning.resizing import parse_progressive_resizing
from transferkit.finetuning.schedule import FreezeSchedule
from transferkit.models.calibration import THRESHOLD_METRICS
from transferkit.models.heads import check_head
from transferkit.models.prediction import TTA_VIEWS
from transferkit.models.tasks import TARGET_KINDS, TargetKind, inverse_frequency_weights
from transferkit.settings import GroupedSettings, SettingsGroup

__all__ = [
    "FLAT_KEYS",
    "GROUPS",
    "ClassifierSettings",
    "HeadSettings",
    "LossSettings",
    "MixingSettings",
    "PredictionSettings",
    "RegularisationSettings",
    "RuntimeSettings",
    "from_flat",
    "inverse_frequency_weights",
    "is_flat",
]


@dataclass(frozen=True)
class HeadSettings(SettingsGroup):
    """The new classifier head (``model.head``; :class:`~transferkit.models.heads.ClassifierHead`).

    Args:
        hidden_dims: widths of the hidden layers (``[]`` for a linear head).
        activation: ``elu``, ``leaky_relu``, ``relu``, ``selu``, ``tanh``, ``sigmoid``.
        init: ``he``, ``xavier``, ``lecun``; ``None`` = the one that suits the activation.
        dropout: dropout rate in the head.
        batch_norm: BatchNorm between each hidden Linear and its activation.
        max_norm: max-norm constraint on the incoming weight vectors, enforced after every step.

    Example:
        >>> HeadSettings(hidden_dims=[512, 128], dropout=0.5).hidden_dims
        (512, 128)
    """

    where = "model.head"

    hidden_dims: tuple[int, ...] = (256,)
    activation: str = "elu"
    init: str | None = None
    dropout: float = 0.2
    batch_norm: bool = True
    max_norm: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        check_head(self.hidden_dims, self.activation, self.init, self.dropout, self.max_norm)


@dataclass(frozen=True)
class RegularisationSettings(SettingsGroup):
    """Penalties and noise that keep the fine-tuned model general (``model.regularisation``).

    Args:
        l1: L1 penalty ``l1 * sum |w|`` on the weights of ``penalty_groups``, applied as its proximal step
            after every optimizer step, which sets weights exactly to zero (logged: ``l1_sparsity``).
        l2: L2 penalty ``l2 * sum w^2`` added to the loss, on the weights of ``penalty_groups``.
        penalty_groups: which weights ``l1``/``l2`` apply to: ``head``, ``backbone``, ``all``, or a list of
            optimizer group names (``head``, ``backbone.0`` ... ``backbone.N``, top = N); never biases.
        sparsity_threshold: ``|w|`` below which a penalised weight counts as zero in ``l1_sparsity``.
        label_smoothing: cross-entropy label smoothing (towards the uniform distribution, also of mixed
            and soft targets).
        drop_path_rate: stochastic depth in the backbone, where the architecture supports it.
    """

    where = "model.regularisation"

    l1: float = 0.0
    l2: float = 0.0
    penalty_groups: str | list[str] = "head"
    sparsity_threshold: float = 1e-3
    label_smoothing: float = 0.0
    drop_path_rate: float | None = None

    def __post_init__(self) -> None:
        self.require(self.l1 >= 0, "l1", ">= 0")
        self.require(self.l2 >= 0, "l2", ">= 0")
        groups = self.penalty_groups  # the names themselves are checked against the model's groups
        self.require(
            isinstance(groups, str)
            or (isinstance(groups, list | tuple) and all(isinstance(g, str) for g in groups)),
            "penalty_groups",
            "head, backbone, all, an optimizer group's name (backbone.0 ... backbone.N) or a list of them",
        )
        self.require(self.sparsity_threshold >= 0, "sparsity_threshold", ">= 0")
        self.require(0 <= self.label_smoothing <= 1, "label_smoothing", "in [0, 1]")
        self.require(
            self.drop_path_rate is None or 0 <= self.drop_path_rate < 1, "drop_path_rate", "in [0, 1) or null"
        )


def _weights(value: Any) -> bool:
    """A list of numbers > 0 (one per class or label)."""
    return isinstance(value, tuple) and all(
        isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in value
    )


@dataclass(frozen=True)
class LossSettings(SettingsGroup):
    """The training loss (``model.loss``): what it weighs, for the model's kind of target (``target``).

    Args:
        class_weights: single label: ``None`` (every image counts the same), ``auto`` (each class weighted
            by the inverse of its share of the training split, the weights normalised to a mean of 1, so a
            class with half the images counts twice as much per image), or one weight per class, in the
            order of the classes. For a training split whose classes matter equally but are unequally many
            (macro-F1, recall of a rare defect): the other fix is ``data.loader.sampler: balanced``, which
            shows the small classes more often instead. ``val_loss`` and ``test_loss`` weigh the classes the
            same way (``auto`` counts the training split for them too), so early stopping and the best
            checkpoint follow the weighted loss.
        pos_weight: multi-label: ``None``, ``auto`` (each label's negatives / positives on the training
            split, so a rare label's positives weigh as much as its negatives) or one weight per label: the
            weight of a label's positive term in the binary cross-entropy (PyTorch's ``pos_weight``).
        regression: regression: ``mse`` (mean squared error) or ``huber`` (squared near zero, linear beyond
            ``huber_delta``, for targets with outliers), on targets standardised on the training split.
        huber_delta: where Huber's loss turns linear, in standard deviations of the target.

    Example:
        >>> LossSettings(class_weights="auto").class_weights
        'auto'
        >>> inverse_frequency_weights([30, 10])
        [0.5, 1.5]
    """

    where = "model.loss"

    class_weights: str | tuple[float, ...] | None = None
    pos_weight: str | tuple[float, ...] | None = None
    regression: Literal["mse", "huber"] = "mse"
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        for name in ("class_weights", "pos_weight"):
            weights = getattr(self, name)
            if isinstance(weights, list):
                object.__setattr__(self, name, weights := tuple(weights))
            what = "class" if name == "class_weights" else "label"
            self.require(
                weights is None or weights == "auto" or _weights(weights),
                name,
                f"null, auto, or a list of one number > 0 per {what}",
            )
        self.require(self.regression in ("mse", "huber"), "regression", "'mse' or 'huber'")
        self.require(
            isinstance(self.huber_delta, int | float)
            and not isinstance(self.huber_delta, bool)
            and self.huber_delta > 0,
            "huber_delta",
            "a number > 0",
        )


@dataclass(frozen=True)
class MixingSettings(SettingsGroup):
    """Mixup and CutMix of training batches (``model.mixing``; :class:`~transferkit.models.mixing.BatchMixing`,
    timm's ``Mixup``). Not with the feature or trunk caches, which hold no images to mix.

    Args:
        mixup_alpha: each image blended with another of the batch, ``lam ~ Beta(a, a)``, the targets
            blended alike; ``0`` = off, 0.2-0.4 is usual.
        cutmix_alpha: a box of another image pasted in, ``lam ~ Beta(a, a)`` the share kept; ``0`` = off,
            ``1.0`` is usual.
        prob: probability that a training batch is mixed at all.
        switch_prob: with both mixup and CutMix on, probability that a mixed batch uses CutMix.
    """

    where = "model.mixing"

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        self.require(self.mixup_alpha >= 0, "mixup_alpha", ">= 0 (0 = off; 0.2-0.4 is usual)")
        self.require(self.cutmix_alpha >= 0, "cutmix_alpha", ">= 0 (0 = off; 1.0 is usual)")
        self.require(0 <= self.prob <= 1, "prob", "a probability in [0, 1]")
        self.require(0 <= self.switch_prob <= 1, "switch_prob", "a probability in [0, 1]")

    @property
    def active(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclass(frozen=True)
class PredictionSettings(SettingsGroup):
    """How the trained model predicts (``model.prediction``).

    Args:
        tta: test-time augmentation for ``test`` and ``predict``, the views' probabilities averaged:
            ``none``, ``hflip`` (image + mirror), ``flips`` (+ vertical), ``d4`` (8 flips and rotations).
        mc_dropout: Monte Carlo dropout at predict time: this many passes with the head's dropout on;
            ``predict`` then returns the mean probabilities and their uncertainty. ``0`` = off.
        calibrate: after training, fit a temperature on the validation split (the logits divided by one
            number so that the validation NLL is lowest; accuracy is unchanged) and store it in the best
            checkpoint; ``test``, ``predict``, ``predict-images`` and ``export`` then give calibrated
            probabilities (:class:`~transferkit.models.calibration.Calibration`).
        decision_threshold: two classes only: after training, choose the threshold on class 1's
            probability that maximises ``accuracy`` or ``f1`` on the validation split, store it with the
            temperature, and predict class 1 when its probability reaches it. ``None`` = most probable class.
    """

    where = "model.prediction"

    tta: str = "none"
    mc_dropout: int = 0
    calibrate: bool = False
    decision_threshold: Literal["accuracy", "f1"] | None = None

    def __post_init__(self) -> None:
        self.require(self.tta in TTA_VIEWS, "tta", f"one of {', '.join(TTA_VIEWS)}")
        self.require(
            isinstance(self.mc_dropout, int) and (self.mc_dropout == 0 or self.mc_dropout >= 2),
            "mc_dropout",
            "the number of stochastic passes (0 = off, >= 2 to measure a spread)",
        )
        self.require(
            self.decision_threshold in (None, *THRESHOLD_METRICS),
            "decision_threshold",
            f"null or the metric the threshold maximises ({', '.join(THRESHOLD_METRICS)})",
        )

    @property
    def fitted_after_training(self) -> bool:
        """Whether a temperature or a threshold is fitted on the validation split after training."""
        return self.calibrate or self.decision_threshold is not None


@dataclass(frozen=True)
class RuntimeSettings(SettingsGroup):
    """How fast a run goes, not what it learns (``model.runtime``).

    Args:
        channels_last: run the backbone in channels-last (NHWC) memory layout, which oneDNN and cuDNN
            convolutions run faster; ``False`` keeps NCHW.
        compile: compile the backbone with ``torch.compile`` when training starts.
        progressive_resizing: training image side by epoch, ``{epoch: side}`` (e.g. ``{3: 176, 13: 224}``):
            training batches are resized to it from each listed epoch on (small, fast epochs first);
            validation, test and predict always run at the data's size, and cached features are not resized.
        progress_bar_step_loss: show each step's training loss in the progress bar, which reads it back
            from the device every step; ``None`` (default): on the CPU only, where that costs nothing.
    """

    where = "model.runtime"

    channels_last: bool = True
    compile: bool = False
    progressive_resizing: dict[int, int] | None = None
    progress_bar_step_loss: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "progressive_resizing", parse_progressive_resizing(self.progressive_resizing)
        )

    def shows_step_loss(self, device_type: str) -> bool:
        """Whether the progress bar shows each step's loss on a ``device_type`` device (Lightning reads
        progress-bar values back after every batch: a stall per step on a GPU, nothing on the CPU)."""
        shown = self.progress_bar_step_loss
        return device_type == "cpu" if shown is None else bool(shown)


# constructor parameter -> its group, in constructor order
GROUPS: dict[str, type[SettingsGroup]] = {
    "head": HeadSettings,
    "optimizer": OptimizerSettings,
    "lr_schedule": LRScheduleSettings,
    "regularisation": RegularisationSettings,
    "loss": LossSettings,
    "mixing": MixingSettings,
    "prediction": PredictionSettings,
    "runtime": RuntimeSettings,
}


@dataclass(frozen=True)
class ClassifierSettings(GroupedSettings):
    """Everything a :class:`~transferkit.TransferClassifier` is built from, its groups validated.

    Example:
        >>> s = ClassifierSettings.build(num_classes=2, optimizer={"lr": 3e-4}, head={"dropout": 0.5})
        >>> s.optimizer.lr, s.head.dropout, s.lr_schedule.name
        (0.0003, 0.5, 'exponential')
        >>> ClassifierSettings.build(num_classes=2, optimizer={"lr": 0})
        Traceback (most recent call last):
        ...
        transferkit.errors.ConfigError: model.optimizer.lr must be a number > 0 or 'auto' (found by a range test when training starts), got 0.
    """

    groups = {**GROUPS, "freeze_schedule": FreezeSchedule}

    num_classes: int
    target: TargetKind = "single_label"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: Any = "bundled"
    class_names: list[str] | None = None
    class_groups: dict[str, list[str | int]] | None = None
    head: HeadSettings = field(default_factory=HeadSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    lr_schedule: LRScheduleSettings = field(default_factory=LRScheduleSettings)
    freeze_schedule: FreezeSchedule = field(default_factory=FreezeSchedule)
    regularisation: RegularisationSettings = field(default_factory=RegularisationSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    mixing: MixingSettings = field(default_factory=MixingSettings)
    prediction: PredictionSettings = field(default_factory=PredictionSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def check(self) -> None:
        n, kind = self.num_classes, self.target
        if kind not in TARGET_KINDS:
            raise ConfigError(f"model.target must be one of {', '.join(TARGET_KINDS)}, got {kind!r}.")
        smallest = 2 if kind == "single_label" else 1
        what = {"single_label": "classes", "multi_label": "labels", "regression": "targets"}[kind]
        if not isinstance(n, int) or isinstance(n, bool) or n < smallest:
            raise ConfigError(
                f"num_classes (the number of {what} of a {kind} model) must be an integer >= {smallest}, "
                f"got {n!r}."
            )
        if self.class_names is not None and len(self.class_names) != n:
            raise ConfigError(f"{len(self.class_names)} class_names given for num_classes={n}.")
        for name, weights in (
            ("class_weights", self.loss.class_weights),
            ("pos_weight", self.loss.pos_weight),
        ):
            if isinstance(weights, tuple) and len(weights) != n:
                one = "class" if name == "class_weights" else "label"
                raise ConfigError(
                    f"model.loss.{name} gives {len(weights)} weights for num_classes={n}: give one per "
                    f"{one}, in their order, or auto."
                )
        if self.prediction.mc_dropout and self.head.dropout == 0:
            raise ConfigError(
                "model.prediction.mc_dropout needs dropout in the head; set model.head.dropout > 0 (e.g. 0.2)."
            )
        if self.prediction.decision_threshold is not None and (n != 2 or kind != "single_label"):
            own = (
                ": a multi-label model fits one threshold per label on validation by itself"
                if kind == "multi_label"
                else ""
            )
            raise ConfigError(
                f"model.prediction.decision_threshold chooses class 1's threshold for two classes; this "
                f"model has num_classes={n} ({kind}). Leave it null{own}."
            )
        for name, on, why in self._refused_for_kind():
            if on:
                raise ConfigError(f"{name} does not apply to a {kind} model: {why}")

    def _refused_for_kind(self) -> list[tuple[str, bool, str]]:
        """(setting, whether it is set, why a model of this kind refuses it)."""
        kind = self.target
        single, multi, regression = (kind == k for k in ("single_label", "multi_label", "regression"))
        return [
            ("model.loss.class_weights", not single and self.loss.class_weights is not None,
             "it weighs the classes of one label per image; a multi-label model takes model.loss.pos_weight."),
            ("model.loss.pos_weight", not multi and self.loss.pos_weight is not None,
             "it weighs each label's positives in a multi-label model's binary cross-entropy."),
            ("model.loss.regression", not regression and self.loss.regression != "mse",
             "it chooses a regression model's loss; classes are trained with cross-entropy."),
            ("model.loss.huber_delta", self.loss.huber_delta != 1.0 and not (regression and self.loss.regression == "huber"),
             "it shapes the Huber loss of a regression model (model.loss.regression: huber); set that, or leave it."),
            ("model.class_groups", not single and bool(self.class_groups),
             "a group's probability is the sum of its classes', which holds for classes that exclude each other."),
            ("model.regularisation.label_smoothing", not single and self.regularisation.label_smoothing > 0,
             "it smooths a distribution over classes that exclude each other; set it to 0."),
            ("model.mixing", multi and self.mixing.active and self.mixing.cutmix_alpha > 0,
             "a CutMix box can cut out the only object of a positive label, which its target would still "
             "count; turn CutMix off."),
            ("model.mixing", multi and self.mixing.active and self.mixing.mixup_alpha > 0,
             "a blend of two images holds both images' labels, faded, and their blended targets say each is "
             "half present, which binary cross-entropy reads as uncertain labels; turn mixup off."),
            ("model.mixing", regression and self.mixing.active,
             "a blend of two images has no known target (their targets' blend is a guess); turn mixup and "
             "CutMix off."),
            ("model.prediction.calibrate", not single and self.prediction.calibrate,
             "temperature scaling calibrates a softmax over classes; a multi-label model fits per-label "
             "thresholds on validation instead, and a regression model gives numbers, not probabilities."),
        ]  # fmt: skip


# the flat settings of checkpoints and recipes from before the groups: old name -> (group, field)
FLAT_KEYS: dict[str, tuple[str, str]] = {
    **{k: ("head", k) for k in ("hidden_dims", "activation", "init", "dropout", "batch_norm", "max_norm")},
    "optimizer": ("optimizer", "name"),
    **{
        k: ("optimizer", k)
        for k in ("lr", "backbone_lr", "layer_decay", "weight_decay", "momentum", "betas", "eps", "rho")
    },
    "lr_schedule": ("lr_schedule", "name"),
    "decay_rate": ("lr_schedule", "decay_rate"),
    "decay_steps": ("lr_schedule", "decay_steps"),
    "lr_milestones": ("lr_schedule", "milestones"),
    "plateau_patience": ("lr_schedule", "plateau_patience"),
    **{
        k: ("regularisation", k)
        for k in ("l1", "l2", "penalty_groups", "sparsity_threshold", "label_smoothing", "drop_path_rate")
    },
    "mixup_alpha": ("mixing", "mixup_alpha"),
    "cutmix_alpha": ("mixing", "cutmix_alpha"),
    "mix_prob": ("mixing", "prob"),
    "mix_switch_prob": ("mixing", "switch_prob"),
    **{k: ("prediction", k) for k in ("tta", "mc_dropout", "calibrate", "decision_threshold")},
    **{
        k: ("runtime", k)
        for k in ("channels_last", "compile", "progressive_resizing", "progress_bar_step_loss")
    },
}


def is_flat(hparams: Mapping[str, Any]) -> bool:
    """Whether saved hyperparameters are in the flat form of checkpoints from before the groups."""
    return any(k in hparams and not isinstance(hparams[k], Mapping) for k in FLAT_KEYS)


def from_flat(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from saved hyperparameters, flat (from before the groups) or grouped.

    Example:
        >>> from_flat({"num_classes": 2, "lr": 0.01, "optimizer": "sgd", "dropout": 0.5})
        {'num_classes': 2, 'optimizer': {'lr': 0.01, 'name': 'sgd'}, 'head': {'dropout': 0.5}}
    """
    if not is_flat(hparams):
        return dict(hparams)
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if key in FLAT_KEYS:
            group, name = FLAT_KEYS[key]
            out.setdefault(group, {})[name] = value
        else:
            out[key] = value
    return out
