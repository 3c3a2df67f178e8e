"""Gradient health: do the gradients vanish or explode on their way down, do units die or saturate?

:class:`GradientHealth` records, over a few real training batches, for every ``Linear`` / ``Conv``
layer: the norm of its weight's gradient, how far one optimizer step moves its weights, and the
statistics of the activation that follows it (mean, std, fraction saturated, fraction of dead units).
Each layer gets a verdict (``healthy``, ``vanishing``, ``exploding``, ``dying``, or ``frozen`` when it
does not train) and the run an overall one, with the fixes that apply.
:func:`diagnose` runs it on a model and its data; ``python -m transferkit diagnose --config X`` on a
recipe.

:class:`NonFiniteLossGuard`, which :class:`transferkit.Trainer` adds to every run, stops training at the
first non-finite loss, before its backward pass and optimizer step, with a
:class:`NonFiniteLossError` that says where, the learning rates, the likely cause and the fixes.

Verdict rules (a layer gets the first that applies):

- ``exploding``: a non-finite gradient, weight or activation; or a relative gradient
  ``||grad|| / ||w||`` more than :data:`EXPLODING_FACTOR` (100) times the top layer's (gradients grow
  on their way to the input); or an optimizer step that moves the weights by more than their own
  norm (update ratio > :data:`MAX_UPDATE_RATIO`, 1).
- ``vanishing``: a relative gradient less than 1/:data:`VANISHING_FACTOR` (1/100) of the top layer's,
  or no gradient at all although the layer is trainable. With one learning rate such a layer learns
  two orders of magnitude slower than the top one; in a healthy deep net (an init that preserves the
  variance, or BatchNorm) the relative gradients of all layers stay within about one order of
  magnitude of each other.
  It is also the verdict of a *saturated* layer, the textbook cause of vanishing gradients: more than
  :data:`SATURATED_FRACTION` (a quarter) of the outputs of the sigmoid or tanh that follows lie
  within :data:`SATURATION_MARGIN` (0.01) of its bounds (sigmoid: < 0.01 or > 0.99; tanh: < -0.99 or
  > 0.99), where its derivative is below 0.01 (sigmoid; 0.25 at its centre) or 0.02 (tanh; 1 at its
  centre), so those outputs pass on less than 1/25 of the gradient. A layer
  initialised for its activation (Xavier, scaled inputs) has about 1% of its outputs there; with
  pre-activations a few times too large (e.g. N(0, 1) weights on 100 inputs) it is 40% or more.
- ``dying``: more than :data:`DEAD_FRACTION` (half) of the units (features of a ``Linear``, channels
  of a ``Conv``) of the rectifier that follows are dead: their output was never positive over all
  recorded samples and positions. For ReLU that is an output of exactly 0 and a zero gradient; for
  leaky ReLU, ELU, SELU, GELU, SiLU and kin it is the negative part, where the slope is small.

The *top layer* is the trainable layer nearest the output (the last to run in the forward pass); the
*relative gradient* in the report is a layer's ``||grad|| / ||w||`` divided by the top layer's.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

__all__ = [
    "DEAD_FRACTION",
    "EXPLODING_FACTOR",
    "MAX_UPDATE_RATIO",
    "SATURATED_FRACTION",
    "SATURATION_MARGIN",
    "VANISHING_FACTOR",
    "VERDICTS",
    "GradientHealth",
    "GradientHealthReport",
    "LayerHealth",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "diagnose",
    "main",
]

VERDICTS = ("healthy", "vanishing", "exploding", "dying", "frozen")
VANISHING_FACTOR = 100.0
EXPLODING_FACTOR = 100.0
MAX_UPDATE_RATIO = 1.0
DEAD_FRACTION = 0.5
SATURATED_FRACTION = 0.25
SATURATION_MARGIN = 0.01

# problems, most severe first: the order in which a layer's verdict is chosen
_SEVERITY = ("exploding", "vanishing", "dying")

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# activation modules by lower-case class name (torch's and timm's), and what can go wrong with them
_ACTIVATIONS = {
    **dict.fromkeys(("sigmoid", "hardsigmoid"), "sigmoid"),
    **dict.fromkeys(("tanh", "hardtanh", "softsign"), "tanh"),
    **dict.fromkeys(
        (
            "relu",
            "relu6",
            "leakyrelu",
            "prelu",
            "rrelu",
            "elu",
            "selu",
            "celu",
            "gelu",
            "gelutanh",
            "quickgelu",
            "silu",
            "swish",
            "mish",
            "hardswish",
        ),
        "rectifier",
    ),
}

_FIXES = {
    "exploding": (
        "lower the learning rate (model.lr), clip the gradients (trainer.gradient_clip_val, e.g. 1.0), "
        "and use an init that preserves the variance (He for ReLU/ELU) or BatchNorm"
    ),
    "vanishing": (
        "initialise the weights for the activation (He for ReLU/ELU, LeCun for SELU, Xavier/Glorot for "
        "tanh/sigmoid), scale the inputs, use a non-saturating activation (ELU, leaky ReLU), put "
        "BatchNorm between the layers, or add residual connections"
    ),
    "dying": (
        "use leaky ReLU or ELU instead of ReLU, lower the learning rate (model.lr), and He init; "
        "BatchNorm before the activation keeps units from settling in the negative part"
    ),
}


# --- the report ------------------------------------------------------------------------------------


@dataclass
class LayerHealth:
    """What one layer's gradients, updates and activations looked like over the recorded batches.

    Norms are L2 norms of the whole weight tensor, averaged over the recorded optimizer steps.
    ``update_ratio`` is the measured ``||w_after - w_before|| / ||w_before||`` of a step (what the
    optimizer really did: momentum, Adam's scaling, weight decay and clipping included).
    ``rel_grad`` is ``||grad|| / ||w||`` divided by the top layer's. Activation statistics are those of
    the activation module that runs right after the layer (``activation``), else of the layer's own
    output; ``saturated`` is measured for sigmoid/tanh, ``dead`` for the ReLU family.
    """

    index: int
    name: str
    layer: str
    activation: str | None
    params: int
    trainable: bool
    grad_norm: float | None = None
    weight_norm: float | None = None
    rel_grad: float | None = None
    update_ratio: float | None = None
    act_mean: float | None = None
    act_std: float | None = None
    saturated: float | None = None
    dead: float | None = None
    nonfinite: bool = False
    verdict: str = "healthy"
    reasons: list[str] = field(default_factory=list)


@dataclass
class GradientHealthReport:
    """Per-layer gradient health, in depth order (input first), and the verdict of the whole model.

    Attributes:
        layers: one :class:`LayerHealth` per ``Linear`` / ``Conv`` layer that ran, input to output.
        verdict: ``healthy`` when every trainable layer is, else the problem most layers have (ties go
            to the more severe: exploding, vanishing, dying).
        summary: what was found and what to do about it, in words.
        epoch: the epoch in which the recording started.
        batches: the number of training batches recorded.
        error: the message of the error that ended the recording early (e.g. a non-finite loss), if any.
    """

    layers: list[LayerHealth]
    verdict: str
    summary: str
    epoch: int = 0
    batches: int = 0
    error: str | None = None

    def __getitem__(self, name: str) -> LayerHealth:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(
            f"no layer named '{name}' in the report; layers: {', '.join(r.name for r in self.layers)}"
        )

    def table(self) -> str:
        """One text row per layer: name, gradient norm, relative gradient, update ratio, activation
        mean/std, saturated %, dead %, verdict; then the overall verdict."""
        header = (
            "#",
            "layer",
            "type",
            "activation",
            "grad norm",
            "rel grad",
            "update",
            "act mean",
            "act std",
            "sat %",
            "dead %",
            "verdict",
        )
        rows = [
            (
                str(r.index),
                r.name,
                r.layer,
                r.activation or "-",
                _sci(r.grad_norm),
                _sci(r.rel_grad),
                _sci(r.update_ratio),
                _num(r.act_mean, "+.3f"),
                _num(r.act_std, ".3f"),
                _pct(r.saturated),
                _pct(r.dead),
                r.verdict,
            )
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        left = {1, 2, 3, 11}

        def line(row: Sequence[str]) -> str:
            cells = [
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        lines = [line(header), line(["-" * w for w in widths])]
        lines += [line(row) for row in rows]
        lines += ["", f"verdict: {self.verdict} ({self.batches} batches from epoch {self.epoch})"]
        if self.summary:
            lines.append(self.summary)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (JSON, and checkpoints loaded with ``weights_only=True``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradientHealthReport:
        fields = {k: v for k, v in data.items() if k != "layers"}
        return cls(layers=[LayerHealth(**row) for row in data["layers"]], **fields)

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text; also written to ``path`` if given. Non-finite numbers become ``null``."""
        text = json.dumps(_finite_or_none(self.to_dict()), indent=2) + "\n"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of the report, layers in depth order (input on the left), three panels:

        1. gradient norm and relative gradient per layer (log scale), points coloured by verdict, with
           the vanishing and exploding limits of the relative gradient;
        2. update ratio ``||Δw|| / ||w||`` per layer (log scale);
        3. activation mean ± std, with the saturated and dead fractions as bars.
        """
        from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone (renders with Agg)
        from matplotlib.lines import Line2D

        colors = {
            "healthy": "tab:green",
            "vanishing": "tab:blue",
            "exploding": "tab:red",
            "dying": "black",
            "frozen": "tab:gray",
        }
        count = len(self.layers)
        x = list(range(count))
        fig = Figure(figsize=(max(8.0, 0.3 * count + 3), 11.0), layout="constrained")
        grad_ax, update_ax, act_ax = fig.subplots(3, 1, sharex=True, height_ratios=(3, 2, 3))
        title = f"gradient health: {self.verdict} ({self.batches} batches from epoch {self.epoch})"
        grad_ax.set_title(title)

        gx, gy = _finite_points(self.layers, "grad_norm", positive=True)
        grad_ax.plot(gx, gy, color="0.5", marker="s", markersize=4, linewidth=1, label="||grad||")
        rx, ry = _finite_points(self.layers, "rel_grad", positive=True)
        grad_ax.plot(rx, ry, color="0.8", linewidth=1, zorder=1)
        grad_ax.scatter(rx, ry, c=[colors[self.layers[i].verdict] for i in rx], s=40, zorder=2)
        grad_ax.axhline(1 / VANISHING_FACTOR, color="tab:blue", linestyle=":", linewidth=1)
        grad_ax.axhline(EXPLODING_FACTOR, color="tab:red", linestyle=":", linewidth=1)
        if gy or ry:
            grad_ax.set_yscale("log")
        grad_ax.set_ylabel("gradient")
        grad_ax.grid(True, alpha=0.3)
        handles = [
            Line2D([], [], color="0.5", marker="s", markersize=4, label="||grad||"),
            Line2D([], [], color="0.8", marker="o", markerfacecolor="tab:green", label="relative gradient"),
            Line2D([], [], color="tab:blue", linestyle=":", label=f"vanishing below 1/{VANISHING_FACTOR:g}"),
            Line2D([], [], color="tab:red", linestyle=":", label=f"exploding above {EXPLODING_FACTOR:g}"),
        ]
        handles += [
            Line2D([], [], marker="o", linestyle="", color=c, label=v)
            for v, c in colors.items()
            if any(r.verdict == v for r in self.layers)
        ]
        grad_ax.legend(handles=handles, fontsize=7, loc="best", ncols=2)

        ux, uy = _finite_points(self.layers, "update_ratio", positive=True)
        update_ax.plot(ux, uy, color="tab:purple", marker="o", markersize=4, linewidth=1)
        if uy:
            update_ax.set_yscale("log")
        update_ax.set_ylabel("||Δw|| / ||w|| per step")
        update_ax.grid(True, alpha=0.3)

        ax, means = _finite_points(self.layers, "act_mean")
        _, stds = _finite_points(self.layers, "act_std")
        act_ax.errorbar(
            ax, means, yerr=stds, fmt="o", color="tab:blue", capsize=3, label="activation mean ± std"
        )
        act_ax.set_ylabel("activation")
        act_ax.grid(True, alpha=0.3)
        frac_ax = act_ax.twinx()
        sat = [100 * (r.saturated or 0.0) for r in self.layers]
        dead = [100 * (r.dead or 0.0) for r in self.layers]
        frac_ax.bar([i - 0.2 for i in x], sat, width=0.4, color="tab:orange", alpha=0.5, label="saturated %")
        frac_ax.bar([i + 0.2 for i in x], dead, width=0.4, color="black", alpha=0.4, label="dead %")
        frac_ax.set_ylim(0, 100)
        frac_ax.set_ylabel("% saturated / dead")
        lines, labels = act_ax.get_legend_handles_labels()
        more, more_labels = frac_ax.get_legend_handles_labels()
        act_ax.legend(lines + more, labels + more_labels, fontsize=7, loc="best")
        act_ax.set_xticks(x)
        act_ax.set_xticklabels([r.name for r in self.layers], rotation=70, ha="right", fontsize=7)
        act_ax.set_xlabel("layer (input → output)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path


def _finite_points(
    layers: Sequence[LayerHealth], attr: str, positive: bool = False
) -> tuple[list[int], list[float]]:
    """Indices and values of ``attr`` over ``layers`` where it is finite (and > 0 for a log axis)."""
    kept = [(i, getattr(r, attr)) for i, r in enumerate(layers)]
    kept = [(i, v) for i, v in kept if v is not None and math.isfinite(v) and (v > 0 or not positive)]
    return [i for i, _ in kept], [v for _, v in kept]


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


# --- recording -------------------------------------------------------------------------------------


class _LayerRecord:
    """Running sums for one weight layer over the recorded batches (tensors stay on the device)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.order: int | None = None  # position of the first call in the forward pass
        self.activation: str | None = None
        self.grad_norms: list[torch.Tensor] = []
        self.weight_norms: list[torch.Tensor] = []
        self.update_ratios: list[torch.Tensor] = []
        self.relative_grads: list[torch.Tensor] = []  # ||grad|| / ||w|| per step
        self.before: torch.Tensor | None = None
        self.own = _OutputStats()  # the layer's own output
        self.act = _OutputStats()  # the output of the activation that follows

    @property
    def channel_dim(self) -> int:
        return -1 if isinstance(self.module, nn.Linear) else 1


class _OutputStats:
    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None
        self.saturated: torch.Tensor | None = None
        self.ever_positive: torch.Tensor | None = None

    def add(
        self, output: torch.Tensor, channel_dim: int, kind: str | None, bounds: tuple[float, float]
    ) -> None:
        x = output.detach()
        if not x.is_floating_point() or x.numel() == 0:
            return
        finite = torch.isfinite(x)
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
        self.count += x.numel()
        self.total = _plus(self.total, x.sum(dtype=torch.float64))
        self.squares = _plus(self.squares, torch.linalg.vector_norm(x, dtype=torch.float64).square())
        self.nonfinite = _plus(self.nonfinite, (~finite).sum())
        if kind in ("sigmoid", "tanh"):
            low, high = bounds
            margin = SATURATION_MARGIN
            self.saturated = _plus(self.saturated, ((x < low + margin) | (x > high - margin)).sum())
        if kind == "rectifier" and x.ndim >= 2:
            dim = channel_dim % x.ndim
            positive = (x > 0).movedim(dim, -1).reshape(-1, x.shape[dim]).any(dim=0)
            if self.ever_positive is None or self.ever_positive.shape != positive.shape:
                self.ever_positive = positive
            else:
                self.ever_positive = self.ever_positive | positive

    def summary(self) -> dict[str, Any]:
        if self.count == 0 or self.total is None or self.squares is None:
            return {}
        mean = float(self.total) / self.count
        variance = max(float(self.squares) / self.count - mean * mean, 0.0)
        out: dict[str, Any] = {
            "mean": mean,
            "std": math.sqrt(variance),
            "nonfinite": int(self.nonfinite or 0),
        }
        if self.saturated is not None:
            out["saturated"] = float(self.saturated) / self.count
        if self.ever_positive is not None:
            out["dead"] = float((~self.ever_positive).float().mean())
        return out


def _plus(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


class GradientHealth(Callback):
    """Record gradient and activation health per layer over a few training batches, then judge each layer.

    While recording, forward hooks on every ``Linear`` / ``Conv1d/2d/3d`` layer and every activation
    module (ReLU family, ELU, SELU, GELU, SiLU, Mish, sigmoid, tanh; torch's and timm's, recognised by
    class name) collect activation statistics; an activation is paired with the weight layer that ran
    last before it. Gradients are read just before each optimizer step (after AMP unscaling, before
    clipping), and the weights are compared before and after the step. The hooks are removed when the
    recording ends, so training afterwards runs at full speed. The rules for the verdicts are in the
    docstring of :mod:`transferkit.diagnostics`.

    Args:
        batches: training batches per recording (spilling over into the next epoch if one is shorter).
        every_n_epochs: record at the start of every ``every_n_epochs``-th epoch (0, n, 2n, ...);
            ``None`` records once, at the start of training.

    Attributes:
        reports: one :class:`GradientHealthReport` per finished recording, oldest first.
        report: the latest report (``None`` until the first recording ends).

    Example:
        >>> import lightning as L
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from transferkit.diagnostics import GradientHealth
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.cross_entropy(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,))), batch_size=16)
        >>> health = GradientHealth(batches=3)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[health], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Net(), data)
        >>> [row.name for row in health.report.layers], health.report.verdict
        (['net.0', 'net.2'], 'healthy')
    """

    def __init__(self, batches: int = 5, every_n_epochs: int | None = None) -> None:
        if batches < 1:
            raise ValueError(f"batches must be at least 1, got {batches}.")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(
                f"every_n_epochs must be at least 1 (or None to record once), got {every_n_epochs}."
            )
        self.batches = batches
        self.every_n_epochs = every_n_epochs
        self.reports: list[GradientHealthReport] = []
        self._last_start_epoch: int | None = None
        self._records: dict[str, _LayerRecord] | None = None
        self._handles: list[Any] = []
        self._recorded = 0
        self._start_epoch = 0
        self._active = False
        self._calls = 0
        self._pending: _LayerRecord | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(batches=self.batches, every_n_epochs=self.every_n_epochs)

    @property
    def report(self) -> GradientHealthReport | None:
        return self.reports[-1] if self.reports else None

    @property
    def recording(self) -> bool:
        """Whether a recording is in progress (hooks installed)."""
        return self._records is not None

    # --- Lightning hooks -------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._records is None and self._due(trainer.current_epoch):
            self._start(pl_module, trainer.current_epoch)
        if self._records is not None:
            self._active = True
            self._pending = None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if not self._active or self._records is None:
            return
        for record in self._records.values():
            weight = record.module.weight
            if record.before is not None:
                continue  # several optimizers (or a closure run twice): keep the state before the first
            record.before = weight.detach().clone()
            weight_norm = torch.linalg.vector_norm(weight.detach().double())
            record.weight_norms.append(weight_norm)
            if weight.grad is not None:
                grad_norm = torch.linalg.vector_norm(weight.grad.detach().double())
                record.grad_norms.append(grad_norm)
                if weight_norm > 0:  # zero weights (a zero init) have no scale to compare the gradient with
                    record.relative_grads.append(grad_norm / weight_norm)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or self._records is None:
            return
        self._active = False
        for record in self._records.values():
            if record.before is None:
                continue
            before, record.before = record.before.double(), None
            scale = torch.linalg.vector_norm(before)
            if scale > 0:
                change = torch.linalg.vector_norm(record.module.weight.detach().double() - before)
                record.update_ratios.append(change / scale)
        self._recorded += 1
        if self._recorded >= self.batches:
            self._finish()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._records is not None:
            self._finish()  # training ended before enough batches were recorded

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._records is None:
            return
        if isinstance(exception, NonFiniteLossError):
            self._finish(error=str(exception))  # what led up to it is the diagnosis
        else:
            self._finish(keep=False)

    def state_dict(self) -> dict[str, Any]:
        return {"reports": [r.to_dict() for r in self.reports], "last_start_epoch": self._last_start_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reports = [GradientHealthReport.from_dict(r) for r in state_dict.get("reports", [])]
        self._last_start_epoch = state_dict.get("last_start_epoch")

    # --- recording -------------------------------------------------------------------------------

    def _due(self, epoch: int) -> bool:
        if self.every_n_epochs is None:
            return self._last_start_epoch is None
        return epoch % self.every_n_epochs == 0 and self._last_start_epoch != epoch

    def _start(self, pl_module: nn.Module, epoch: int) -> None:
        self._records = {}
        self._recorded = 0
        self._calls = 0
        self._start_epoch = epoch
        self._last_start_epoch = epoch
        for name, module in pl_module.named_modules():
            if isinstance(module, _WEIGHT_LAYERS) and isinstance(
                getattr(module, "weight", None), nn.Parameter
            ):
                record = _LayerRecord(name, module)
                self._records[name] = record
                self._handles.append(module.register_forward_hook(self._layer_hook(record)))
            elif type(module).__name__.lower() in _ACTIVATIONS:
                self._handles.append(module.register_forward_hook(self._activation_hook(module)))

    def _layer_hook(self, record: _LayerRecord):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self._active or not isinstance(output, torch.Tensor):
                return
            if record.order is None:
                record.order = self._calls
                self._calls += 1
            record.own.add(output, record.channel_dim, None, (0.0, 1.0))
            self._pending = record

        return hook

    def _activation_hook(self, module: nn.Module):
        kind = _ACTIVATIONS[type(module).__name__.lower()]
        if kind == "tanh":
            bounds = (float(getattr(module, "min_val", -1.0)), float(getattr(module, "max_val", 1.0)))
        else:
            bounds = (0.0, 1.0)

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            record = self._pending
            if not self._active or record is None or not isinstance(output, torch.Tensor):
                return
            self._pending = None  # one activation per layer call: the first that runs after it
            if record.activation is None:
                record.activation = type(module).__name__
            if record.activation == type(module).__name__:
                record.act.add(output, record.channel_dim, kind, bounds)

        return hook

    def _finish(self, error: str | None = None, keep: bool = True) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        records, self._records = self._records or {}, None
        self._active = False
        self._pending = None
        ran = sorted((r for r in records.values() if r.order is not None), key=lambda r: r.order)
        if ran and keep:
            self.reports.append(_judge(ran, self._start_epoch, self._recorded, error))


def _mean(values: list[torch.Tensor]) -> float | None:
    if not values:
        return None
    return float(torch.stack(values).mean())


def _judge(records: list[_LayerRecord], epoch: int, batches: int, error: str | None) -> GradientHealthReport:
    rows: list[LayerHealth] = []
    relative: list[float | None] = []
    for index, record in enumerate(records):
        weight = record.module.weight
        stats = record.act.summary() if record.activation is not None else record.own.summary()
        own = record.own.summary()
        grad_norm = _mean(record.grad_norms)
        weight_norm = _mean(record.weight_norms)
        relative.append(_mean(record.relative_grads))
        nonfinite = bool(stats.get("nonfinite") or own.get("nonfinite"))
        nonfinite |= not torch.isfinite(weight.detach()).all().item()
        nonfinite |= grad_norm is not None and not math.isfinite(grad_norm)
        rows.append(
            LayerHealth(
                index=index,
                name=record.name,
                layer=type(record.module).__name__,
                activation=record.activation,
                params=weight.numel(),
                trainable=weight.requires_grad,
                grad_norm=grad_norm,
                weight_norm=weight_norm,
                update_ratio=_mean(record.update_ratios),
                act_mean=stats.get("mean"),
                act_std=stats.get("std"),
                saturated=stats.get("saturated"),
                dead=stats.get("dead"),
                nonfinite=nonfinite,
            )
        )
    # the reference: the trainable layer nearest the output that got a finite, non-zero relative gradient
    top = next(
        (
            v
            for r, v in zip(reversed(rows), reversed(relative), strict=True)
            if r.trainable and v and math.isfinite(v)
        ),
        None,
    )
    for row, rel in zip(rows, relative, strict=True):
        if rel is not None and top:
            row.rel_grad = rel / top
        _verdict(row)
    return _overall(rows, epoch, batches, error)


def _verdict(row: LayerHealth) -> None:
    reasons: dict[str, str] = {}
    if not row.trainable:
        row.verdict, row.reasons = "frozen", ["does not train (requires_grad=False)"]
        return
    if row.nonfinite:
        reasons["exploding"] = "non-finite gradient, weight or activation values"
    elif row.rel_grad is not None and row.rel_grad > EXPLODING_FACTOR:
        reasons["exploding"] = (
            f"relative gradient {row.rel_grad:.1e}x the top layer's (> {EXPLODING_FACTOR:g}x)"
        )
    elif row.update_ratio is not None and row.update_ratio > MAX_UPDATE_RATIO:
        reasons["exploding"] = f"one step moves the weights by {row.update_ratio:.2g}x their norm"
    if row.grad_norm is None or row.grad_norm == 0.0:
        if row.grad_norm == 0.0 or row.update_ratio is not None:
            reasons["vanishing"] = "no gradient reaches this layer"
    elif row.rel_grad is not None and row.rel_grad < 1.0 / VANISHING_FACTOR:
        reasons["vanishing"] = (
            f"relative gradient {row.rel_grad:.1e}x the top layer's (< 1/{VANISHING_FACTOR:g})"
        )
    if row.dead is not None and row.dead > DEAD_FRACTION:
        reasons["dying"] = f"{100 * row.dead:.0f}% of the units never output a positive value"
    if row.saturated is not None and row.saturated > SATURATED_FRACTION:
        # saturated units pass back almost no gradient: the vanishing-gradient problem at its source
        saturated = (
            f"saturated: {100 * row.saturated:.0f}% of the outputs within {SATURATION_MARGIN} of the "
            "activation's bounds, where it passes back < 1/25 of the gradient"
        )
        reasons["vanishing"] = f"{reasons['vanishing']}; {saturated}" if "vanishing" in reasons else saturated
    row.reasons = [reasons[k] for k in _SEVERITY if k in reasons]
    row.verdict = next((k for k in _SEVERITY if k in reasons), "healthy")


def _overall(rows: list[LayerHealth], epoch: int, batches: int, error: str | None) -> GradientHealthReport:
    judged = [r for r in rows if r.verdict != "frozen"]
    counts = {v: sum(r.verdict == v for r in judged) for v in _SEVERITY}
    problems = [v for v in _SEVERITY if counts[v]]
    if error is not None:
        verdict = "exploding"
    elif not problems:
        verdict = "healthy"
    else:
        verdict = max(problems, key=lambda v: (counts[v], -_SEVERITY.index(v)))
    lines: list[str] = []
    if error is not None:
        lines.append(f"training stopped: {error.splitlines()[0]}")
    if not judged:
        lines.append("no layer trained during the recording (all frozen).")
    elif not problems and error is None:
        rels = [r.rel_grad for r in judged if r.rel_grad]
        spread = (
            f"; relative gradients from {min(rels):.1e} to {max(rels):.1e} of the top layer's" if rels else ""
        )
        lines.append(f"all {len(judged)} trainable layers are healthy{spread}.")
    for problem in problems:
        names = [r.name for r in judged if r.verdict == problem]
        shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
        lines.append(
            f"{problem}: {len(names)} of {len(judged)} trainable layers ({shown}). Fix: {_FIXES[problem]}."
        )
    frozen = len(rows) - len(judged)
    if frozen:
        lines.append(f"{frozen} frozen layers are not judged.")
    return GradientHealthReport(rows, verdict, "\n".join(lines), epoch, batches, error)


# --- the non-finite loss guard ---------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says where, why, and what to do.

    Attributes:
        epoch: the epoch of the bad batch.
        step: optimizer steps done before it (``trainer.global_step``).
        loss: the loss value (``nan``, ``inf`` or ``-inf``).
        learning_rates: optimizer parameter-group name -> learning rate at that step.
    """

    def __init__(
        self,
        message: str,
        epoch: int = 0,
        step: int = 0,
        loss: float = math.nan,
        learning_rates: dict[str, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.loss = loss
        self.learning_rates = dict(learning_rates or {})


class NonFiniteLossGuard(Callback):
    """Stop training at the first non-finite loss, and never write a checkpoint from its weights.

    On the CPU the loss is checked before its backward pass and optimizer step, so the weights are
    left as they were after the last good step. On an accelerator, reading the loss back every step
    would stall the device, so the check of a step's loss happens when the next step starts, and
    before every checkpoint and validation: the run stops one step later, and no checkpoint holds the
    non-finite weights. On CUDA the finite flag is copied to pinned host memory behind a stream event,
    so the check waits for that step's forward pass only, never for the step queued behind it. The
    :class:`NonFiniteLossError` names the epoch and step, the loss, the learning rates, the likely
    cause (non-finite inputs, weights already non-finite, or a learning rate too high / exploding
    gradients) and the fixes.
    :class:`transferkit.Trainer` adds one to every run.

    Example:
        >>> import lightning as L
        >>> from transferkit.diagnostics import NonFiniteLossGuard
        >>> trainer = L.Trainer(callbacks=[NonFiniteLossGuard()], max_epochs=1, logger=False)
    """

    def __init__(self) -> None:
        self._batch: Any = None
        self._batch_idx = 0
        # on an accelerator: (finite flag, the event after which it can be read (CUDA), loss, batch,
        # batch index, epoch, step)
        self._pending: tuple[torch.Tensor, Any, torch.Tensor, Any, int, int, int] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._check_pending(trainer, pl_module)
        self._batch, self._batch_idx = batch, batch_idx

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = None

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        loss = loss.detach()
        finite = torch.isfinite(loss).all()
        if loss.device.type != "cpu":
            ready = None
            if loss.device.type == "cuda":
                # reading `finite` itself later would queue behind the whole next step (a stall per
                # step); a non-blocking copy to pinned memory plus an event waits for this point only
                finite = finite.to("cpu", non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            self._pending = (
                finite,
                ready,
                loss,
                self._batch,
                self._batch_idx,
                trainer.current_epoch,
                trainer.global_step,
            )
            return
        if not bool(finite):
            self._raise(
                trainer,
                pl_module,
                loss,
                self._batch,
                self._batch_idx,
                trainer.current_epoch,
                trainer.global_step,
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_pending(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_pending(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._check_pending(trainer, pl_module)  # raising here leaves the previous checkpoint file as it was

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_pending(trainer, pl_module)

    def _check_pending(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        finite, ready, loss, batch, batch_idx, epoch, step = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()
        if not bool(finite):
            self._raise(trainer, pl_module, loss, batch, batch_idx, epoch, step)

    def _raise(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        loss: torch.Tensor,
        batch: Any,
        batch_idx: int,
        epoch: int,
        step: int,
    ) -> None:
        value = float(loss.float().flatten()[0]) if loss.numel() else math.nan
        rates = _learning_rates(trainer)
        message = _nonfinite_message(trainer, pl_module, value, rates, batch, batch_idx, epoch, step)
        self._batch = None
        raise NonFiniteLossError(message, epoch, step, value, rates)


def _learning_rates(trainer: L.Trainer) -> dict[str, float]:
    rates: dict[str, float] = {}
    for o, optimizer in enumerate(trainer.optimizers):
        for g, group in enumerate(optimizer.param_groups):
            name = group.get("name") or (
                f"group {g}" if len(trainer.optimizers) == 1 else f"optimizer {o} group {g}"
            )
            rates[str(name)] = float(group["lr"])
    return rates


def _nonfinite_values(batch: Any) -> tuple[int, int]:
    """Non-finite values and all values in the floating-point tensors of a batch."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            return int((~torch.isfinite(batch)).sum()), batch.numel()
        return 0, 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        counts = [_nonfinite_values(b) for b in batch]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    return 0, 0


def _nonfinite_message(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    loss: float,
    rates: dict[str, float],
    batch: Any,
    batch_idx: int,
    epoch: int,
    step: int,
) -> str:
    shown = list(rates.items())[:8]
    rate_text = ", ".join(f"{k}={v:.2e}" for k, v in shown) + (" ..." if len(rates) > len(shown) else "")
    bad_inputs, inputs = _nonfinite_values(batch)
    bad_weights = [n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
    largest = max((float(p.detach().abs().max()) for p in pl_module.parameters() if p.numel()), default=0.0)
    if bad_inputs:
        cause = (
            f"bad input values: this batch holds {bad_inputs} non-finite values (of {inputs}); "
            "look for corrupt images or a normalisation that divides by a zero std"
        )
    elif bad_weights:
        cause = (
            f"exploding gradients: the weights are already non-finite ({', '.join(bad_weights[:3])}"
            f"{', ...' if len(bad_weights) > 3 else ''}), so an earlier step's update overflowed"
        )
    else:
        cause = (
            "a learning rate too high or exploding gradients: the inputs and weights are finite "
            f"(largest weight magnitude {largest:.2e}), but the forward pass overflowed"
        )
    lines = [
        f"the training loss is {loss} at epoch {epoch}, step {step} "
        f"(batch {batch_idx} of the epoch); training stopped before this batch's backward pass and "
        "optimizer step, so the weights are those of the last good step.",
        f"learning rates: {rate_text or 'no optimizer'}",
        f"likely cause: {cause}.",
        "fixes:",
        "  - lower the learning rate (model.lr in a recipe, e.g. 10x smaller);",
        "  - clip the gradients: set trainer.gradient_clip_val (e.g. 1.0);",
        "  - check the inputs for NaN/inf values and the normalisation (mean/std);",
        "  - run `python -m transferkit diagnose --config <recipe>` to see which layers' gradients explode.",
    ]
    callback = trainer.checkpoint_callback
    saved = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    if saved:
        lines.append(f"the last checkpoint, {saved}, holds weights from before this step.")
    return "\n".join(lines)


# --- running it ------------------------------------------------------------------------------------


class _StopWhenRecorded(Callback):
    def __init__(self, health: GradientHealth) -> None:
        self.health = health

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.health.report is not None and not self.health.recording:
            trainer.should_stop = True


def diagnose(
    model: L.LightningModule,
    train_dataloaders: Any = None,
    datamodule: L.LightningDataModule | None = None,
    batches: int = 5,
    **trainer_kwargs: Any,
) -> GradientHealthReport:
    """Train a copy of ``model`` for ``batches`` batches with :class:`GradientHealth` and return its report.

    A real :class:`transferkit.Trainer` runs the module's own ``training_step`` and optimizers, so
    what is measured is what training does. The model passed in is not changed (a deep copy trains).
    A non-finite loss ends the recording early; the report then says so and its verdict is
    ``exploding``.

    Args:
        model: any LightningModule (e.g. a :class:`transferkit.TransferClassifier`).
        train_dataloaders: the training batches (or pass ``datamodule``).
        datamodule: a data module with a ``train_dataloader``; its frozen-feature cache is switched
            off for the run (features are not worth caching for a few batches).
        batches: training batches to record.
        **trainer_kwargs: passed to the Trainer; e.g. ``max_epochs`` of the real run, so the learning-rate
            schedule is the one training will use (default 1000: the start of a long run), ``accelerator``,
            ``precision``, ``gradient_clip_val``. Validation, checkpoints and logging are off.

    Returns:
        The :class:`GradientHealthReport`.
    """
    from transferkit.trainer import Trainer

    health = GradientHealth(batches=batches)
    callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    settings: dict[str, Any] = {
        "max_epochs": 1000,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **trainer_kwargs,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "callbacks": [*callbacks, health, _StopWhenRecorded(health)],
    }
    trainer = Trainer(**settings)
    copied = copy.deepcopy(model)
    cache = getattr(datamodule, "feature_cache", None)
    if cache not in (None, "off"):
        datamodule.feature_cache = "off"  # type: ignore[union-attr]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*val_dataloader.*")
            trainer.fit(copied, train_dataloaders=train_dataloaders, datamodule=datamodule)
    except NonFiniteLossError:
        pass  # GradientHealth.on_exception recorded what was measured, with the error
    finally:
        if cache not in (None, "off"):
            datamodule.feature_cache = cache  # type: ignore[union-attr]
    if health.report is None:
        raise RuntimeError(
            "no training batch was recorded: the training data is empty, or every layer was skipped; "
            "check the train dataloader (and limit_train_batches / max_steps)."
        )
    return health.report


def main(argv: Sequence[str]) -> int:
    """``python -m transferkit diagnose --config X [--batches N] [--out DIR]``: parse the recipe like
    ``fit`` does, train a copy for a few batches, print the per-layer table and write
    ``gradient_health.png`` and ``gradient_health.json``."""
    import argparse

    from transferkit.cli import TransferKitCLI, cli_kwargs

    parser = argparse.ArgumentParser(
        prog="python -m transferkit diagnose",
        description=(
            "Gradient health per layer (vanishing, incl. saturated units / exploding / dying) over a few training "
            "batches of a recipe. Other options are the recipe's, as for fit (--config X, --model.lr ...)."
        ),
    )
    parser.add_argument("--batches", type=int, default=5, help="training batches to record (default 5)")
    parser.add_argument(
        "--out", default=None, help="where to write the PNG and JSON (default: trainer.default_root_dir)"
    )
    options, rest = parser.parse_known_args(list(argv))
    if options.batches < 1:
        parser.error(f"--batches must be at least 1, got {options.batches}")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = TransferKitCLI(**cli_kwargs(rest), run=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if hasattr(datamodule, "use_data_config"):
        datamodule.use_data_config(model.data_config)
    config = cli.config.get("trainer") or {}
    carried = (
        "accelerator",
        "precision",
        "max_epochs",
        "max_steps",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "deterministic",
        "default_root_dir",
    )
    settings = {k: config[k] for k in carried if k in config and config[k] is not None}
    settings["devices"] = 1
    out = Path(options.out or trainer.default_root_dir)
    report = diagnose(model, datamodule=datamodule, batches=options.batches, **settings)
    print(report.table())
    if any(r.verdict == "frozen" for r in report.layers):
        print(
            "frozen layers follow the recipe's freeze_schedule at the start of training; to diagnose the "
            "whole network training, add --model.freeze_schedule null."
        )
    png = report.plot(out / "gradient_health.png")
    js = out / "gradient_health.json"
    report.to_json(js)
    print(f"\nwrote {png} and {js}")
    return 0
