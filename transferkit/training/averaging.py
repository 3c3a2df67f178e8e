"""Weight averaging: an exponential moving average of the weights, used for validation and kept."""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from transferkit.errors import ConfigError
from transferkit.lightning_internals import averaged_model, latest_update_step, set_latest_update_step

__all__ = ["EMA"]


class EMA(WeightAveraging):
    """Keep an exponential moving average (EMA) of the weights and use it wherever a model is judged.

    After every optimizer step from ``start_epoch`` on, ``ema = decay * ema + (1 - decay) * weights``
    (one fused update over all tensors; BatchNorm statistics are averaged too). Validation runs on the
    averaged weights, so early stopping and the best checkpoint judge them; checkpoints hold them as
    their ``state_dict`` (the raw weights ride along to resume), and at the end of ``fit`` the module
    holds them. On small datasets the average smooths the last epochs' noise out of the weights.

    Unlike Lightning's ``EMAWeightAveraging``, a checkpoint loaded to ``test``/``validate``/``predict``
    after ``fit`` (``ckpt_path="best"``) is judged by its averaged weights, not by the raw ones stored
    beside them for resuming.

    Args:
        decay: weight of the running average per step, in [0, 1); its horizon is about
            ``1 / (1 - decay)`` steps (0.99: the last ~100 steps).
        start_epoch: first epoch whose steps update the average; before it, the average follows the
            weights.

    Example:
        >>> from transferkit import Trainer
        >>> trainer = Trainer(callbacks=[EMA(decay=0.99)], max_epochs=1, logger=False)
        >>> [c.decay for c in trainer.callbacks if isinstance(c, EMA)]
        [0.99]

    In a recipe::

        trainer:
          callbacks:
            - class_path: transferkit.EMA
              init_args: {decay: 0.99}
    """

    def __init__(self, decay: float = 0.99, start_epoch: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(
                f"EMA decay must be in [0, 1), got {decay}; 0.99 averages about the last 100 steps"
            )
        if start_epoch < 0:
            raise ConfigError(f"EMA start_epoch must be >= 0, got {start_epoch}")
        super().__init__(use_buffers=True)
        self.decay = decay
        self.start_epoch = start_epoch
        self._updates = 0

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # AveragedModel.update_parameters asks `n_averaged == 0` of a device tensor, a read-back that
        # stalls a GPU every step; the count of updates is kept here instead
        model = averaged_model(self)
        if model is None or trainer.global_step <= latest_update_step(self):
            return
        set_latest_update_step(self, trainer.global_step)
        average = model.module
        pairs = list(
            zip(
                itertools.chain(average.parameters(), average.buffers()),
                itertools.chain(pl_module.parameters(), pl_module.buffers()),
                strict=True,
            )
        )
        if trainer.current_epoch < self.start_epoch or self._updates == 0:
            for averaged, current in pairs:  # not averaging yet: the average is the weights
                averaged.copy_(current)
        else:
            floats = [(a, c) for a, c in pairs if a.is_floating_point()]
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - self.decay)
            for averaged, current in pairs:
                if not averaged.is_floating_point():
                    averaged.copy_(current)  # counters such as BatchNorm's num_batches_tracked
        self._updates += 1
        model.n_averaged.fill_(self._updates)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != "fit":
            # the checkpoint's state_dict already holds the averaged weights, which is what is judged
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        model = averaged_model(self)
        if model is not None:
            self._updates = int(model.n_averaged)  # once, when resuming
