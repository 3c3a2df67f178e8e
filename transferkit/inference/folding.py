"""Faster inference: Batch Normalization folded into the convolution or linear layer before it.

In eval mode a BatchNorm is an affine map per channel, ``y = gamma * (x - mean) / sqrt(var + eps) + beta``,
so when its input is the output of a Conv2d or Linear it can be merged into that layer's weight and bias:
one layer less to run per block, the same function.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from transferkit.errors import FoldingError

__all__ = ["FoldingError", "count_batchnorm", "fold_batchnorm"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def count_batchnorm(model: nn.Module) -> int:
    """How many BatchNorm layers ``model`` runs."""
    return sum(isinstance(m, _BATCHNORMS) for m in model.modules())


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm that directly follows a Conv2d or Linear
    folded into it; ``model`` itself is left unchanged.

    Which BatchNorm follows which layer is read from one forward pass on ``example`` (a real input
    batch, e.g. ``(1, 3, H, W)``): a BatchNorm is folded when its input is exactly the tensor a Conv2d or
    Linear produced. timm's ``BatchNormAct2d`` (BatchNorm + activation) keeps its activation.

    Raises :class:`FoldingError` if the folded copy's output differs from the original's by more than
    ``atol`` on ``example`` (e.g. a layer's output also feeds another branch), so a wrong fold never
    goes unnoticed.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> folded = fold_batchnorm(net, torch.randn(1, 3, 16, 16))
        >>> count_batchnorm(net), count_batchnorm(folded)
        (1, 0)
    """
    was_training = model.training
    expected = model.eval()(example)
    model.train(was_training)
    model = copy.deepcopy(model).eval()
    names = {module: name for name, module in model.named_modules()}
    producers: dict[int, nn.Module] = {}
    outputs: list[torch.Tensor] = []  # kept alive so that ids stay unique during the pass
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def record_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs.append(output)
        producers[id(output)] = module

    def match_input(module: nn.Module, args: tuple) -> None:
        producer = producers.get(id(args[0]))
        if producer is not None and module.track_running_stats and module.running_mean is not None:
            pairs.append((producer, module))

    handles = [
        m.register_forward_hook(record_output)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    handles += [
        m.register_forward_pre_hook(match_input) for m in model.modules() if isinstance(m, _BATCHNORMS)
    ]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()

    for layer, bn in pairs:
        if isinstance(layer, nn.Conv2d):
            weight, bias = fuse_conv_bn_weights(
                layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        else:
            weight, bias = fuse_linear_bn_weights(
                layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        layer.weight, layer.bias = weight, bias
        _replace(model, names[bn], _after_normalisation(bn))

    difference = (model(example) - expected).abs().max().item()
    if difference > atol:
        raise FoldingError(
            f"folding {len(pairs)} BatchNorm layers changed the output by {difference:.3g} (> atol={atol}); "
            "some layer's output feeds more than its BatchNorm. Use the model unfolded."
        )
    return model


def _after_normalisation(bn: nn.Module) -> nn.Module:
    """What remains of a BatchNorm once its affine map lives in the previous layer."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):  # timm BatchNormAct2d
        return nn.Sequential(drop, act)
    return nn.Identity()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
