"""Fine-tuning: backbone groups, the freeze schedule and its controller, trunks, optimizers, plan, probe."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "FreezeController": "transferkit.finetuning.freezing",
        "apply_freeze": "transferkit.finetuning.groups",
        "backbone_groups": "transferkit.finetuning.groups",
        "group_learning_rates": "transferkit.finetuning.groups",
        "set_batchnorm_modes": "transferkit.finetuning.groups",
        "plan": "transferkit.finetuning.planning",
        "plan_phases": "transferkit.finetuning.planning",
        "probe": "transferkit.finetuning.probing",
        "FreezeSchedule": "transferkit.finetuning.schedule",
        "value_at": "transferkit.finetuning.schedule",
        "Trunk": "transferkit.finetuning.trunk",
    },
)
