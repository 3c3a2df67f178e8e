"""Serving a model over HTTP: a predictor for checkpoints and exported models, dynamic batching, the app."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "Batcher": "transferkit.serving.batcher",
        "QueueFull": "transferkit.errors",
        "Predictor": "transferkit.serving.predictor",
        "ServeSettings": "transferkit.serving.app",
        "create_app": "transferkit.serving.app",
    },
)
