"""The freeze schedule of a model, phase by phase, without training: ``tk.plan`` and ``plan_phases``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FreezePlan", "GroupInfo", "Phase", "plan", "plan_phases"]


@dataclass
class Phase:
    """A run of epochs with the same trainable groups and training image size."""

    first_epoch: int
    last_epoch: int
    trainable_groups: int
    num_groups: int
    trainable_params: int
    total_params: int
    # optimizer group name -> LR at the phase's first step (trainable groups only)
    group_lrs: dict[str, float]
    bn_mode: str
    train_image_side: int | None = None  # progressive_resizing's side; None = the data's size


@dataclass
class GroupInfo:
    """One backbone group: its index (0 = bottom), parameter count and first parameter's name."""

    index: int
    params: int
    first_tensor: str


@dataclass
class FreezePlan:
    """What :func:`plan` returns: the phases of a run and what they were computed from."""

    backbone: str
    phases: list[Phase]
    groups: list[GroupInfo]
    max_epochs: int
    steps_per_epoch: int
    train_images: int | None = None
    batch_size: int | None = None
    data_side: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # lr, lr_schedule, layer_decay, backbone_lr

    @property
    def relative_rates(self) -> bool:
        """``lr: auto``: the phases' rates are relative to the head's rate, which a range test finds."""
        return self.settings.get("lr") == "auto"


def plan_phases(model: Any, max_epochs: int, steps_per_epoch: int) -> list[Phase]:
    """Split ``max_epochs`` into phases of constant trainable groups and training image size
    (``progressive_resizing``), with their parameter counts and learning rates.

    The learning rates are the ones the optimizer holds at each phase's first step: each group's base LR
    (the top group's ``backbone_lr``, default the head's LR times ``layer_decay``, times ``layer_decay``
    per group down) times the schedule's factor at that step. With ``lr: auto`` (found by a range test when
    training starts) they are relative to the head's: 1.0 stands for the rate the test will find.

    Args:
        model: a :class:`~transferkit.TransferClassifier`.
        max_epochs: epochs of the run.
        steps_per_epoch: optimizer steps per epoch.
    """
    schedule = model.freeze_schedule
    groups = model.groups
    params = dict(model.backbone.model.named_parameters())
    group_sizes = [sum(params[n].numel() for n in names) for names in groups]
    head_params = sum(p.numel() for p in model.head.parameters())
    total = head_params + sum(group_sizes)

    optimizer = model.settings.optimizer
    if (
        optimizer.lr == "auto"
    ):  # the range test sets the rates when training starts: plan with the head's at 1.0
        optimizer = optimizer.replace(lr=1.0)
    optimization = model.optimization(max_epochs * steps_per_epoch, steps_per_epoch, max_epochs, optimizer)
    optimizer = optimization["optimizer"]
    multipliers = getattr(optimization["lr_scheduler"]["scheduler"], "lr_lambdas", None)
    base_lrs = [g["initial_lr"] if "initial_lr" in g else g["lr"] for g in optimizer.param_groups]
    names = [g["name"] for g in optimizer.param_groups]

    def state_at(epoch: int) -> tuple[int, int | None]:
        trainable = schedule.trainable_groups(epoch, len(groups)) if schedule.active else len(groups)
        return trainable, model.train_image_side(epoch)

    phases: list[Phase] = []
    epoch = 0
    while epoch < max_epochs:
        trainable, side = state_at(epoch)
        last = epoch
        while last + 1 < max_epochs and state_at(last + 1) == (trainable, side):
            last += 1
        step = epoch * steps_per_epoch
        lrs = {}
        for depth, (name, base) in enumerate(zip(names, base_lrs, strict=True)):  # 0 = head, 1 = top group
            if depth <= trainable:
                lrs[name] = base * (multipliers[depth](step) if multipliers else 1.0)
        trainable_params = head_params + sum(group_sizes[len(groups) - trainable :])
        if schedule.bn_policy == "eval":
            bn_mode = "all eval (ImageNet statistics)"
        elif trainable == len(groups) or schedule.bn_policy == "train":
            bn_mode = "all train"
        else:
            bn_mode = "frozen groups: eval"
        phases.append(Phase(epoch, last, trainable, len(groups), trainable_params, total, lrs, bn_mode, side))
        epoch = last + 1
    return phases


def plan(
    model: Any, datamodule: Any | None = None, max_epochs: int = 10, accumulate_grad_batches: int = 1
) -> FreezePlan:
    """The phases a run of ``model`` on ``datamodule`` goes through, without training.

    Optimizer steps per epoch come from the training split's size (the data module is set up, which
    lists its images but trains nothing); without a data module they are taken as 1.

    Example:
        >>> import transferkit as tk
        >>> model = tk.TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False,
        ...                               freeze_schedule=tk.FreezeSchedule(frozen_epochs=2))
        >>> [(p.first_epoch, p.last_epoch, p.trainable_groups) for p in tk.plan(model, max_epochs=4).phases]
        [(0, 1, 0), (2, 3, 6)]
    """
    train_images = batch_size = data_side = None
    steps_per_epoch = 1
    if datamodule is not None:
        if hasattr(datamodule, "use_data_config"):
            datamodule.use_data_config(model.data_config)
        datamodule.setup("fit")
        train_images = len(datamodule.datasets["train"])
        batch_size = datamodule.batch_size
        batches = train_images // batch_size if train_images > batch_size else 1
        steps_per_epoch = max(batches // accumulate_grad_batches, 1)
        data_side = getattr(datamodule, "image_size", None)
    params = dict(model.backbone.model.named_parameters())
    groups = [
        GroupInfo(index, sum(params[n].numel() for n in names), names[0])
        for index, names in enumerate(model.groups)
    ]
    opt = model.settings.optimizer
    settings = {
        "lr": opt.lr,
        "lr_schedule": model.settings.lr_schedule.name,
        "layer_decay": opt.layer_decay,
        "backbone_lr": opt.backbone_lr,
    }
    return FreezePlan(
        backbone=model.backbone.name,
        phases=plan_phases(model, max_epochs, steps_per_epoch),
        groups=groups,
        max_epochs=max_epochs,
        steps_per_epoch=steps_per_epoch,
        train_images=train_images,
        batch_size=batch_size,
        data_side=data_side,
        settings=settings,
    )
