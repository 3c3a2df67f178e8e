"""Training: the Trainer and its defaults, and the callbacks every run gets (checkpoints, early stopping,
interruptions, the non-finite loss guard, exact resumption), plus weight averaging,
precise BatchNorm statistics and the learning-rate range test (``lr_find``, run by ``fit`` for ``lr: auto``)."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "EMA": "transferkit.training.averaging",
        "AtomicCheckpointIO": "transferkit.training.checkpointing",
        "RunCheckpoint": "transferkit.training.checkpointing",
        "PhaseEarlyStopping": "transferkit.training.early_stopping",
        "FreezeAndCache": "transferkit.training.feeding",
        "InterruptCheckpoint": "transferkit.training.interrupts",
        "run_loggers": "transferkit.training.loggers",
        "lr_find": "transferkit.training.lr_finder",
        "NonFiniteLossGuard": "transferkit.training.nonfinite",
        "PreciseBN": "transferkit.training.precise_bn",
        "ExactResume": "transferkit.training.resume",
        "align_train_loader": "transferkit.training.resume",
        "Trainer": "transferkit.training.trainer",
    },
)
