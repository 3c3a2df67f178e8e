"""Diagnostics: gradient health per layer (vanishing, exploding, dying, saturated units) and ``tk.diagnose``."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "diagnose": "transferkit.diagnostics.diagnosis",
        "GradientHealth": "transferkit.diagnostics.health",
        "VERDICTS": "transferkit.diagnostics.verdicts",
        "GradientHealthReport": "transferkit.diagnostics.verdicts",
        "LayerHealth": "transferkit.diagnostics.verdicts",
    },
)
