"""Lightning's Trainer plus ``finetune``: fit, test the best checkpoint, write the results."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar

from transferkit.diagnostics import NonFiniteLossGuard
from transferkit.runtime import tune_allocator

__all__ = ["Trainer"]


class Trainer(L.Trainer):
    """Lightning's :class:`~lightning.pytorch.Trainer` with one more entry point, :meth:`finetune`.

    Creating one also tunes the memory allocator for CPU training (:func:`transferkit.runtime.tune_allocator`),
    and shows a Rich progress bar unless ``enable_progress_bar=False`` or another progress bar is given.
    A :class:`~transferkit.diagnostics.NonFiniteLossGuard` stops training at the first NaN/inf loss, before
    its optimizer step, with an error that says why and what to do.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tune_allocator()
        if kwargs.get("enable_progress_bar", True) is not False:
            callbacks = kwargs.get("callbacks") or []
            callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
            if not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, RichProgressBar()]
        callbacks = kwargs.get("callbacks") or []
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        if not any(isinstance(c, NonFiniteLossGuard) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, NonFiniteLossGuard()]
        super().__init__(*args, **kwargs)

    def finetune(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, Any]:
        """Fit, then test the best checkpoint, then print the results and write ``metrics.json`` and the run
        report (``report.md`` with learning curves, test confusion matrix and augmentation preview, see
        :func:`transferkit.report.write_run_report`) in the run dir.

        Args:
            model: the module to train.
            datamodule: the data; it must provide a test split.
            ckpt_path: resume the fit from this checkpoint.

        Returns:
            The figures written to ``metrics.json``.
        """
        start = time.perf_counter()
        self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_seconds = time.perf_counter() - start
        if self.interrupted:
            raise KeyboardInterrupt("training was interrupted; the last checkpoint is kept for resuming.")

        callback = self.checkpoint_callback
        best = getattr(callback, "best_model_path", "") or None
        start = time.perf_counter()
        tested = self.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        test_seconds = time.perf_counter() - start

        best_score = getattr(callback, "best_model_score", None)
        results: dict[str, Any] = {
            "test": {k: float(v) for k, v in (tested[0] if tested else {}).items()},
            "best_checkpoint": best,
            "monitor": getattr(callback, "monitor", None),
            "best_score": float(best_score) if best_score is not None else None,
            "epochs": int(self.current_epoch),
            "global_steps": int(self.global_step),
            "fit_seconds": round(fit_seconds, 2),
            "test_seconds": round(test_seconds, 2),
        }
        skipped = getattr(datamodule, "skipped_images", None)
        if skipped is not None:
            results["skipped_images"] = [f"{e.path}: {e.reason}" for e in skipped]
        if datamodule is not None and hasattr(datamodule, "summary"):
            results["class_names"] = list(getattr(datamodule, "class_names", []))
            results["split_sizes"] = {s: sum(c.values()) for s, c in datamodule.summary().items()}
        if self.is_global_zero:
            run_dir = Path(self.log_dir or self.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            results["run_dir"] = str(run_dir)
            results["report"] = _write_report(self, model, datamodule, results)
            _print_results(results)
        return results


def _write_report(
    trainer: Trainer, model: L.LightningModule, datamodule: Any, results: dict[str, Any]
) -> str | None:
    """report.md and its pictures; a failure is a warning, never a failed run (the model is trained)."""
    from transferkit.report import write_run_report

    try:
        return str(write_run_report(trainer, model, datamodule, results))
    except Exception as err:
        warnings.warn(f"the run report could not be written: {type(err).__name__}: {err}", stacklevel=3)
        return None


def _print_results(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="transferkit finetune: test results (best checkpoint)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(results["test"].items()):
        table.add_row(key, f"{value:.4f}")
    if results.get("best_score") is not None:
        table.add_row(f"best {results['monitor']}", f"{results['best_score']:.4f}")
    table.add_row("epochs", str(results["epochs"]))
    table.add_row("fit time", f"{results['fit_seconds']:.0f} s")
    console = Console()
    console.print(table)
    if results.get("skipped_images"):
        console.print(f"skipped {len(results['skipped_images'])} unreadable images (listed in metrics.json)")
    console.print(f"best checkpoint: {results['best_checkpoint']}")
    console.print(f"metrics written to {Path(results['run_dir']) / 'metrics.json'}")
    if results.get("report"):
        console.print(f"report: {results['report']}")
