"""``python -m transferkit plan --config X``: the freeze schedule of a recipe, phase by phase, without training."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transferkit.module import TransferClassifier

__all__ = ["Phase", "plan_phases", "main"]


@dataclass
class Phase:
    """A run of epochs with the same trainable groups and training image size."""

    first_epoch: int
    last_epoch: int
    trainable_groups: int
    num_groups: int
    trainable_params: int
    total_params: int
    group_lrs: dict[
        str, float
    ]  # optimizer group name -> LR at the phase's first step (trainable groups only)
    bn_mode: str
    train_image_side: int | None = None  # progressive_resizing's side; None = the data's size


def plan_phases(model: TransferClassifier, max_epochs: int, steps_per_epoch: int) -> list[Phase]:
    """Split ``max_epochs`` into phases of constant trainable groups and training image size
    (``progressive_resizing``), with their parameter counts and learning rates.

    The learning rates are the ones the optimizer holds at each phase's first step: each group's base LR
    (the top group's ``backbone_lr``, default the head's LR times ``layer_decay``, times ``layer_decay``
    per group down) times the schedule's factor at that step.
    """
    schedule = model.freeze_schedule
    groups = model.groups
    params = dict(model.backbone.model.named_parameters())
    group_sizes = [sum(params[n].numel() for n in names) for names in groups]
    head_params = sum(p.numel() for p in model.head.parameters())
    total = head_params + sum(group_sizes)

    optimizer_config = _optimizer_config(model, max_epochs, steps_per_epoch)
    optimizer = optimizer_config["optimizer"]
    multipliers = getattr(optimizer_config["lr_scheduler"]["scheduler"], "lr_lambdas", None)
    base_lrs = [g["initial_lr"] if "initial_lr" in g else g["lr"] for g in optimizer.param_groups]
    names = [g["name"] for g in optimizer.param_groups]

    def trainable_at(epoch: int) -> tuple[int, int | None]:
        trainable = schedule.trainable_groups(epoch, len(groups)) if schedule.active else len(groups)
        return trainable, model.train_image_side(epoch)

    phases: list[Phase] = []
    epoch = 0
    while epoch < max_epochs:
        trainable, side = trainable_at(epoch)
        last = epoch
        while last + 1 < max_epochs and trainable_at(last + 1) == (trainable, side):
            last += 1
        step = epoch * steps_per_epoch
        lrs = {}
        for index, (name, base) in enumerate(zip(names, base_lrs, strict=True)):
            depth = index  # 0 = head, 1 = top backbone group, ...
            if depth > trainable:
                continue
            factor = multipliers[index](step) if multipliers else 1.0
            lrs[name] = base * factor
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


def _optimizer_config(model: TransferClassifier, max_epochs: int, steps_per_epoch: int) -> dict[str, Any]:
    class _PlanTrainer:  # what configure_optimizers reads from a Trainer
        estimated_stepping_batches = max_epochs * steps_per_epoch

    _PlanTrainer.max_epochs = max_epochs
    model._trainer = _PlanTrainer()  # type: ignore[assignment]
    try:
        return model.configure_optimizers()
    finally:
        model._trainer = None


def _format_lrs(lrs: dict[str, float]) -> str:
    return "  ".join(f"{name.replace('backbone.', 'g')}={lr:.2e}" for name, lr in lrs.items())


def main(argv: Sequence[str]) -> int:
    """Parse a recipe like ``fit`` does, then print its phases."""
    from rich.console import Console
    from rich.table import Table

    from transferkit.cli import TransferKitCLI, cli_kwargs

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = TransferKitCLI(**cli_kwargs(list(argv)), run=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    datamodule.use_data_config(model.data_config)
    datamodule.setup("fit")
    train_size = len(datamodule.datasets["train"])
    batches = train_size // datamodule.batch_size if train_size > datamodule.batch_size else 1
    steps_per_epoch = max(batches // trainer.accumulate_grad_batches, 1)
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 10

    phases = plan_phases(model, max_epochs, steps_per_epoch)
    data_side = datamodule.image_size  # filled from the backbone by use_data_config above
    table = Table(title=f"freeze plan: {model.backbone.name}, {len(model.groups)} backbone groups + head")
    for column in (
        "epochs",
        "trainable groups",
        "trainable params",
        "learning rates (head, then top group down)",
        "BatchNorm",
        "train size",
    ):
        table.add_column(column)
    for phase in phases:
        table.add_row(
            f"{phase.first_epoch}-{phase.last_epoch}"
            if phase.last_epoch > phase.first_epoch
            else str(phase.first_epoch),
            f"{phase.trainable_groups}/{phase.num_groups}",
            f"{phase.trainable_params:,} / {phase.total_params:,}",
            _format_lrs(phase.group_lrs),
            phase.bn_mode,
            f"{phase.train_image_side or data_side} px",
        )
    console = Console(width=max(Console().width, 140))
    console.print(table)
    console.print(
        f"{steps_per_epoch} optimizer steps per epoch ({train_size} training images, batch {datamodule.batch_size}); "
        f"schedule '{model.hparams.lr_schedule}', layer_decay {model.hparams.layer_decay}"
        + (f", backbone_lr {model.hparams.backbone_lr}." if model.hparams.backbone_lr is not None else ".")
    )
    groups = Table(title="backbone groups (bottom to top)")
    groups.add_column("group")
    groups.add_column("parameters")
    groups.add_column("first tensor")
    params = dict(model.backbone.model.named_parameters())
    for index, names in enumerate(model.groups):
        groups.add_row(f"g{index}", f"{sum(params[n].numel() for n in names):,}", names[0])
    console.print(groups)
    return 0
