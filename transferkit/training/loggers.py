"""The loggers a run gets by default: CSV (which the run report reads), plus TensorBoard when installed."""

from __future__ import annotations

import importlib.util
import os

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

__all__ = ["run_loggers"]


def run_loggers(save_dir: str | os.PathLike, tensorboard: bool | None = None) -> list[Logger]:
    """A :class:`CSVLogger` first, so ``metrics.csv``, checkpoints, ``config.yaml`` and the run report
    share its ``<save_dir>/lightning_logs/version_N``; then, when TensorBoard is installed
    (``tensorboard=None``), a :class:`TensorBoardLogger` writing into that directory's ``tensorboard/``.

    Example:
        >>> import tempfile
        >>> [type(logger).__name__ for logger in run_loggers(tempfile.mkdtemp(), tensorboard=False)]
        ['CSVLogger']
    """
    csv_logger = CSVLogger(save_dir)
    loggers: list[Logger] = [csv_logger]
    if tensorboard is None:
        tensorboard = any(
            importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX")
        )
    if tensorboard:
        loggers.append(
            TensorBoardLogger(
                save_dir,
                name=csv_logger.name,
                version=csv_logger.version,
                sub_dir="tensorboard",
                default_hp_metric=False,
            )
        )
    return loggers
