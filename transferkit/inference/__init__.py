"""Inference: models from checkpoints, predicting image files, BatchNorm folding, export."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "FoldingError": "transferkit.errors",
        "ExportResult": "transferkit.inference.export",
        "export_checkpoint": "transferkit.inference.export",
        "count_batchnorm": "transferkit.inference.folding",
        "fold_batchnorm": "transferkit.inference.folding",
        "load_checkpoint_model": "transferkit.inference.loading",
        "load_for_inference": "transferkit.inference.loading",
        "list_images": "transferkit.inference.predict",
        "predict_images": "transferkit.inference.predict",
        "write_predictions_csv": "transferkit.inference.predict",
    },
)
