"""Tools that drive a model, data and a Trainer, above the mechanics they use: ``plan`` (the phases of a
run without training), ``auto_plan`` (a plan that fits a wall-clock budget), ``probe`` (a linear probe per backbone depth), ``augment_search`` (candidate
augmentations ranked on validation) and ``cross_validate`` (k-fold runs). The learning-rate range test
runs inside ``fit`` for ``model.optimizer.lr: auto``, so it lives with the Trainer (:mod:`transferkit.training.lr_finder`)."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "augment_search": "transferkit.tuning.augment_search",
        "auto_plan": "transferkit.tuning.auto",
        "cross_validate": "transferkit.tuning.cross_validation",
        "plan": "transferkit.tuning.planning",
        "plan_phases": "transferkit.tuning.planning",
        "probe": "transferkit.tuning.probing",
    },
)
