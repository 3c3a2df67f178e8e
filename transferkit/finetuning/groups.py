"""Which backbone layers form which group, how a group is frozen, and each group's learning rate.

The backbone is split once into ordered groups (bottom to top) from timm's own ``group_matcher``. A frozen
group is frozen by how it runs, not by rebuilding the optimizer:

- its parameters stop requiring gradients, so autograd records nothing below the lowest trainable
  group and no backward pass runs through it (the optimizer skips parameters whose grad is ``None``);
- with ``bn_policy="frozen"`` its BatchNorm layers are kept in eval mode on every ``train()`` call, so
  their running statistics do not move.

Every optimizer parameter group is built up front (head first, then the backbone from the top down),
each with its own learning rate, so schedulers never see groups appear or disappear mid-run.
"""

from __future__ import annotations

from collections.abc import Iterable

from timm.models import group_parameters
from torch import nn

from transferkit.finetuning.schedule import BNPolicy

__all__ = ["apply_freeze", "backbone_groups", "group_learning_rates", "set_batchnorm_modes"]


def backbone_groups(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone, split into ordered groups from bottom (stem) to top.

    Names are relative to ``backbone.model``. Uses timm's coarse ``group_matcher`` (stem, each stage,
    the final layers).
    """
    matcher = backbone.group_matcher(coarse=True)
    grouped = group_parameters(backbone.model, matcher)
    return [grouped[k] for k in sorted(grouped) if grouped[k]]


def _modules_of(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The modules that directly own the given parameters."""
    owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in names}
    return [module for module_name, module in model.named_modules() if module_name in owners]


def apply_freeze(backbone: nn.Module, groups: list[list[str]], trainable: int, bn_policy: BNPolicy) -> None:
    """Make the top ``trainable`` groups trainable and freeze the rest (see module doc for what that means)."""
    params = dict(backbone.model.named_parameters())
    frozen_count = len(groups) - trainable
    for index, names in enumerate(groups):
        requires_grad = index >= frozen_count
        for name in names:
            params[name].requires_grad_(requires_grad)
    set_batchnorm_modes(backbone, groups, trainable, bn_policy)


def set_batchnorm_modes(
    backbone: nn.Module, groups: list[list[str]], trainable: int, bn_policy: BNPolicy
) -> None:
    """Set every backbone BatchNorm's mode: eval everywhere (``eval``), in frozen groups (``frozen``),
    the backbone's own mode elsewhere (so a group unfrozen mid-run starts updating its statistics)."""
    frozen_count = len(groups) - trainable
    for index, names in enumerate(groups):
        keep_eval = bn_policy == "eval" or (bn_policy == "frozen" and index < frozen_count)
        for module in _modules_of(backbone.model, names):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(backbone.training and not keep_eval)


def group_learning_rates(
    head_lr: float, num_groups: int, layer_decay: float, top_lr: float | None = None
) -> list[float]:
    """Backbone groups' learning rates, bottom to top: the top group gets ``top_lr`` (default
    ``head_lr * layer_decay``), the one below it that times ``layer_decay``, and so on (deeper = smaller)."""
    top = head_lr * layer_decay if top_lr is None else top_lr
    return [top * layer_decay ** (num_groups - 1 - index) for index in range(num_groups)]
