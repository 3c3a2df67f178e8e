"""The new classifier head put on a pretrained backbone.

Each hidden layer is ``Linear -> BatchNorm -> activation -> Dropout`` (BN before the activation), with
weights initialised for the activation (He for the ReLU family and ELU, LeCun for SELU, Xavier for
tanh/sigmoid), and an optional max-norm constraint on every Linear's incoming weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from transferkit.errors import ConfigError

__all__ = ["ACTIVATIONS", "INITS", "ClassifierHead", "check_head", "make_activation", "init_linear"]

ACTIVATIONS = ("elu", "leaky_relu", "relu", "selu", "tanh", "sigmoid")
INITS = ("he", "xavier", "lecun")

# the init that keeps the activation's output variance equal to its input's (Glorot & Bengio; He et al.)
_RECOMMENDED_INIT = {
    "elu": "he",
    "leaky_relu": "he",
    "relu": "he",
    "selu": "lecun",
    "tanh": "xavier",
    "sigmoid": "xavier",
}


def make_activation(name: str, leaky_relu_slope: float = 0.01) -> nn.Module:
    """An activation module by name (one of :data:`ACTIVATIONS`)."""
    if name == "elu":
        return nn.ELU()
    if name == "leaky_relu":
        return nn.LeakyReLU(leaky_relu_slope)
    if name == "relu":
        return nn.ReLU()
    if name == "selu":
        return nn.SELU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ConfigError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}.")


def init_linear(
    layer: nn.Linear, init: str, activation: str = "relu", leaky_relu_slope: float = 0.01
) -> None:
    """Initialise ``layer.weight`` from a zero-mean normal with the scheme's variance; biases to zero.

    - ``he``: Var(w) = 2 / fan_in (for leaky ReLU: 2 / ((1 + a^2) fan_in)).
    - ``xavier``: Var(w) = 2 / (fan_in + fan_out).
    - ``lecun``: Var(w) = 1 / fan_in.
    """
    fan_out, fan_in = layer.weight.shape
    if init == "he":
        slope = leaky_relu_slope if activation == "leaky_relu" else 0.0
        std = math.sqrt(2.0 / ((1 + slope**2) * fan_in))
    elif init == "xavier":
        std = math.sqrt(2.0 / (fan_in + fan_out))
    elif init == "lecun":
        std = math.sqrt(1.0 / fan_in)
    else:
        raise ConfigError(f"unknown init '{init}'; choose one of {', '.join(INITS)}.")
    with torch.no_grad():
        layer.weight.normal_(0.0, std)
        if layer.bias is not None:
            layer.bias.zero_()


def check_head(
    hidden_dims: Sequence[int], activation: str, init: str | None, dropout: float, max_norm: float | None
) -> str:
    """Refuse head settings :class:`ClassifierHead` cannot build, naming the choices or the range; the
    init to use (``None``: the one that suits the activation)."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation '{activation}'; choose one of {', '.join(ACTIVATIONS)}.")
    init = init or _RECOMMENDED_INIT[activation]
    if init not in INITS:
        raise ConfigError(f"unknown init '{init}'; choose one of {', '.join(INITS)}.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}.")
    if max_norm is not None and max_norm <= 0:
        raise ConfigError(f"max_norm must be positive (or None to disable it), got {max_norm}.")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in hidden_dims):
        raise ConfigError(
            f"hidden_dims must be positive layer widths (or [] for a linear head), got {list(hidden_dims)}."
        )
    return init


class ClassifierHead(nn.Module):
    """A classifier for pooled backbone features: ``(B, in_features) -> (B, num_classes)`` logits.

    Args:
        in_features: width of the backbone's pooled features.
        num_classes: number of output classes.
        hidden_dims: widths of the hidden layers; ``()`` gives dropout + a single Linear (a linear head).
        activation: one of ``elu`` (default), ``leaky_relu``, ``relu``, ``selu``, ``tanh``, ``sigmoid``.
        init: ``he``, ``xavier`` or ``lecun``; ``None`` picks the one that suits the activation
            (He for ELU and the ReLU family, LeCun for SELU, Xavier for tanh and sigmoid).
        dropout: dropout rate after each hidden activation (and before a linear head).
        batch_norm: put BatchNorm1d between each hidden Linear and its activation.
        max_norm: if set, every Linear's incoming weight vector (each row) is rescaled to L2 norm
            at most ``max_norm`` by :meth:`apply_max_norm`, which the training loop calls after every
            optimizer step.
        leaky_relu_slope: the negative slope (alpha) of leaky ReLU.

    Example:
        >>> head = ClassifierHead(1280, 2, hidden_dims=(256,), dropout=0.3)
        >>> head(torch.randn(8, 1280)).shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_dims: Sequence[int] = (256,),
        activation: str = "elu",
        init: str | None = None,
        dropout: float = 0.2,
        batch_norm: bool = True,
        max_norm: float | None = None,
        leaky_relu_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if num_classes < 1:  # one output: a regression of one number, or a single label
            raise ConfigError(f"the head needs at least one output (num_classes), got {num_classes}.")
        init = check_head(hidden_dims, activation, init, dropout, max_norm)
        self.in_features = in_features
        self.num_classes = num_classes
        self.activation = activation
        self.init = init
        self.max_norm = max_norm

        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_dims:
            # the bias is redundant when BatchNorm's shift follows
            linear = nn.Linear(width, hidden, bias=not batch_norm)
            init_linear(linear, init, activation, leaky_relu_slope)
            layers.append(linear)
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(make_activation(activation, leaky_relu_slope))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        if not hidden_dims and dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        # softmax output: Xavier keeps the logits' scale independent of the width
        init_linear(self.fc, "xavier")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(features))

    @torch.no_grad()
    def apply_max_norm(self) -> None:
        """Rescale each Linear's rows (a unit's incoming weights) to L2 norm <= ``max_norm``."""
        if self.max_norm is None:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.renorm(module.weight, p=2, dim=0, maxnorm=self.max_norm))
