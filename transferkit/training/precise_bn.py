"""Precise BatchNorm statistics: recomputed with the current weights before the model is judged."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.errors import ConfigError

__all__ = ["PreciseBN", "recompute_batchnorm"]


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, list | tuple) else batch


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module, norms: list[_BatchNorm], batches: Any, limit: int, device: torch.device
) -> int:
    """Replace the running mean and variance of ``norms`` (BatchNorm layers of ``model``) by their plain
    average over up to ``limit`` batches of ``batches``, passed through ``model`` as it is now; returns
    the number of batches used. The layers' momentum is restored; the caller sets the modules' modes.

    This is what ``torch.optim.swa_utils.update_bn`` does, restricted to the given layers: that one resets
    every BatchNorm of the model, frozen ones included."""
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below, each weighted equally
    used = 0
    try:
        for batch in batches:
            if used >= limit:
                break
            model(_inputs(batch).to(device))
            used += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    return used


class PreciseBN(Callback):
    """Recompute the running statistics of the BatchNorm layers that train on batch statistics (the
    head's, and the backbone's with ``bn_policy: train``) before each validation and at the end of each
    training epoch, from ``batches`` training batches passed through the model with its current weights.

    BatchNorm's running statistics are an exponential average over the last steps, so while the weights
    below a BatchNorm move fast they lag behind them: right after a freeze schedule unfreezes backbone
    groups, the features the head sees change scale within an epoch, and validation (which uses the
    running statistics) drops far below what the same weights score with statistics of their own,
    although training itself is fine. Recomputed statistics make validation, early stopping, the best
    checkpoint and the final model judge the weights as they are. The passes run the model as it is judged
    (dropout off), so the statistics are those of the inputs the layers get at evaluation. Training is
    unchanged: it normalises with batch statistics, and the passes draw no random numbers from the
    run's generators.

    Cost: a forward pass (no backward) over ``batches`` training batches per epoch, through the part of
    the model that trains (the cached features or trunk when the data module caches them).

    With :class:`~transferkit.training.averaging.EMA`, validation judges the averaged weights, whose
    BatchNorm statistics are averaged too; this callback recomputes those of the raw weights only.

    Args:
        batches: training batches to average over (``>= 1``); the whole split if it has fewer.

    Example:
        >>> from transferkit import Trainer
        >>> trainer = Trainer(callbacks=[PreciseBN(batches=20)], max_epochs=1, logger=False)
        >>> [c.batches for c in trainer.callbacks if isinstance(c, PreciseBN)]
        [20]

    In a recipe::

        trainer:
          callbacks:
            - class_path: transferkit.PreciseBN
              init_args: {batches: 20}
    """

    def __init__(self, batches: int = 20) -> None:
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ConfigError(
                f"PreciseBN batches must be an integer >= 1, got {batches!r}; 20 batches of 32 images "
                "estimate a head's statistics well"
            )
        self.batches = batches
        self._norms: list[_BatchNorm] = []
        self._norms_epoch: int | None = None
        self._done_step: int | None = None
        self.recomputed = 0  # times the statistics were recomputed, kept in checkpoints

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the BatchNorm layers that normalise with batch statistics this epoch (a freeze schedule
        # changes which between epochs): theirs are the running statistics that lag behind
        if self._norms_epoch != trainer.current_epoch:
            self._norms = [
                module
                for module in pl_module.modules()
                if isinstance(module, _BatchNorm) and module.training and module.track_running_stats
            ]
            self._norms_epoch = trainer.current_epoch

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._recompute(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._recompute(trainer, pl_module)  # an epoch without validation ends with them too

    def _recompute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        norms = self._norms
        if not norms or self._done_step == trainer.global_step:
            return  # none trains on batch statistics, or already recomputed for these weights
        loader = trainer.train_dataloader
        if isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        elif isinstance(loader, list | tuple):
            loader = loader[0] if loader else None
        if loader is None:
            return
        modes = [(module, module.training) for module in pl_module.modules()]
        for module in pl_module.modules():
            # as the model is judged (dropout off), but these layers collecting statistics; set one by
            # one, since train() and eval() may re-apply a freeze policy
            module.training = False
        for norm in norms:
            norm.training = True
        generator = getattr(loader, "generator", None)  # a loader's iterator draws its workers' seed
        saved = generator.get_state() if generator is not None else None
        try:
            # no random numbers drawn from the run's generators (the CPU one, or the loader's own):
            # the run trains exactly as it would without this callback
            with torch.random.fork_rng(devices=[]):
                recompute_batchnorm(pl_module, norms, loader, self.batches, pl_module.device)
        finally:
            for module, training in modes:
                module.training = training
            if saved is not None:
                generator.set_state(saved)
        if trainer.world_size > 1:  # each process averaged its own batches: agree on their mean
            for norm in norms:
                for buffer in (norm.running_mean, norm.running_var):
                    buffer.copy_(trainer.strategy.reduce(buffer, reduce_op="mean"))
        self._done_step = trainer.global_step
        self.recomputed += 1

    def state_dict(self) -> dict[str, Any]:
        return {"recomputed": self.recomputed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recomputed = int(state_dict.get("recomputed", 0))
