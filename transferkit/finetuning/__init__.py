"""Fine-tuning mechanics the model uses: backbone groups, the freeze schedule and its controller, trunks,
optimizers and learning-rate schedules, progressive resizing. The tools that drive a model, data and a
Trainer (plan, probe, augment-search, cross-validation) are in :mod:`transferkit.tuning`."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "FreezeController": "transferkit.finetuning.freezing",
        "apply_freeze": "transferkit.finetuning.groups",
        "backbone_groups": "transferkit.finetuning.groups",
        "group_learning_rates": "transferkit.finetuning.groups",
        "set_batchnorm_modes": "transferkit.finetuning.groups",
        "FreezeSchedule": "transferkit.finetuning.schedule",
        "value_at": "transferkit.finetuning.schedule",
        "Trunk": "transferkit.finetuning.trunk",
    },
)
