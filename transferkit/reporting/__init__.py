"""Reporting: every figure (as a function that computes and one that draws) and the run report."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "augment_preview": "transferkit.reporting.previews",
        "pipeline_text": "transferkit.reporting.previews",
        "write_run_report": "transferkit.reporting.run_report",
    },
)
