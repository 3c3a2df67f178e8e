"""Models: timm backbones and where their weights come from, the new head, the classifier, its checkpoints."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "Backbone": "transferkit.models.backbones",
        "create_backbone": "transferkit.models.backbones",
        "ClassifierHead": "transferkit.models.heads",
        "TransferClassifier": "transferkit.models.classifier",
    },
)
