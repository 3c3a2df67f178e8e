"""Stop training at the first non-finite loss, with an error that says where, why and what to do."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from transferkit.errors import NonFiniteLossError

__all__ = ["NonFiniteLossGuard"]


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
        "  - lower the learning rate (model.optimizer.lr in a recipe, or --lr; e.g. 10x smaller);",
        "  - clip the gradients: set trainer.gradient_clip_val (e.g. 1.0);",
        "  - check the inputs for NaN/inf values and the normalisation (mean/std);",
        "  - run `python -m transferkit diagnose --config <recipe>` to see which layers' gradients explode.",
    ]
    callback = trainer.checkpoint_callback
    saved = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    if saved:
        lines.append(f"the last checkpoint, {saved}, holds weights from before this step.")
    return "\n".join(lines)
