"""``python -m transferkit plan --config X``: a recipe's freeze schedule, phase by phase, without training."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from transferkit.cli.recipes import load_recipe
from transferkit.tuning.planning import plan


def main(argv: Sequence[str]) -> int:
    recipe = load_recipe(argv, logger=False)
    trainer = recipe.trainer
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 10
    result = plan(recipe.model, recipe.datamodule, max_epochs, trainer.accumulate_grad_batches)

    table = Table(title=f"freeze plan: {result.backbone}, {len(result.groups)} backbone groups + head")
    rates_title = "learning rates (head, then top group down)"
    if result.relative_rates:
        rates_title = "learning rates relative to the head's (lr: auto)"
    columns = ("epochs", "trainable groups", "trainable params", rates_title)
    for column in (*columns, "BatchNorm", "train size"):
        table.add_column(column)
    for phase in result.phases:
        epochs = (
            f"{phase.first_epoch}-{phase.last_epoch}"
            if phase.last_epoch > phase.first_epoch
            else str(phase.first_epoch)
        )
        rates = "  ".join(
            f"{name.replace('backbone.', 'g')}={lr:.2e}" for name, lr in phase.group_lrs.items()
        )
        table.add_row(
            epochs,
            f"{phase.trainable_groups}/{phase.num_groups}",
            f"{phase.trainable_params:,} / {phase.total_params:,}",
            rates,
            phase.bn_mode,
            f"{phase.train_image_side or result.data_side} px",
        )
    console = Console(width=max(Console().width, 140))
    console.print(table)
    settings = result.settings
    backbone_lr = f", backbone_lr {settings['backbone_lr']}." if settings["backbone_lr"] is not None else "."
    console.print(
        f"{result.steps_per_epoch} optimizer steps per epoch ({result.train_images} training images, batch "
        f"{result.batch_size}); schedule '{settings['lr_schedule']}', layer_decay {settings['layer_decay']}"
        + backbone_lr
    )
    groups = Table(title="backbone groups (bottom to top)")
    for column in ("group", "parameters", "first tensor"):
        groups.add_column(column)
    for group in result.groups:
        groups.add_row(f"g{group.index}", f"{group.params:,}", group.first_tensor)
    console.print(groups)
    if result.relative_rates:
        console.print(
            "lr: auto: a range test sets the head's rate (and, for a schedule that unfreezes, backbone_lr) "
            "when training starts; the rates above are multiples of it. See them beforehand with "
            "python -m transferkit lr-find --config <recipe>."
        )
    return 0
