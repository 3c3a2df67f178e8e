"""Recording gradient health: :class:`GradientHealth`, a callback that measures every layer over a few
real training batches (gradient and weight norms, how far an optimizer step moves the weights, the
statistics of the activation after it), then judges them (:mod:`transferkit.diagnostics.verdicts`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from transferkit.diagnostics.verdicts import SATURATION_MARGIN, GradientHealthReport, LayerHealth, judge
from transferkit.errors import NonFiniteLossError
from transferkit.lightning_internals import callback_state_key

__all__ = ["GradientHealth"]

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
    docstring of :mod:`transferkit.diagnostics.verdicts`.

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
        return callback_state_key(self, batches=self.batches, every_n_epochs=self.every_n_epochs)

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
    """Rows of measurements, one per recorded layer, judged by :func:`~transferkit.diagnostics.verdicts.judge`."""
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
    return judge(rows, relative, epoch, batches, error)
