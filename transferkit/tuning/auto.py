"""A fine-tuning plan that fits a wall-clock budget on this machine: ``tk.auto_plan`` (``python -m transferkit auto``).

A plan is one rung of a ladder of recipes (:data:`LADDER`), from a head trained on stored features of small
images up to several unfrozen groups of a larger backbone trained on augmented images. ``auto_plan`` measures
what one image costs on this machine for the rungs it considers (decoding it through the data's own
pipeline, a forward pass of the frozen backbone, a training step of the unfrozen top from the stored trunk,
each at the rung's backbone and input size), predicts each rung's wall time on the data's split sizes, phase
by phase, and picks the richest rung whose predicted time fits the budget with a margin. The plan is written
as an ordinary recipe (:meth:`AutoPlan.recipe`): ``finetune`` on it trains the same weights.

What the costs are measured on: random tensors of the rung's input size through the real backbone with its
bundled weights (compute does not depend on the pixels), and real images of the data through its eval
pipeline for decoding. One size per backbone is measured; other sizes of it scale by their pixel count. A
backbone is measured only when a rung that uses it could fit the budget by a cheaper backbone's estimate.

The ladder is data: a list of rungs (YAML, ``--rules FILE``) ordered from the cheapest to the richest. The
default (:data:`LADDER`) rests on what ELPV measured under the selection protocol (docs/elpv.md): the quick
start's schedule (3 head-only epochs, then the top 3 groups from a cached trunk) and, when the budget allows,
the 4-class recipe's (the top 5 groups on augmented images, 13 unfrozen epochs).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from transferkit.errors import ConfigError

__all__ = [
    "AUGMENTATIONS",
    "LADDER",
    "AutoPlan",
    "MachineCosts",
    "Rung",
    "auto_plan",
    "choose",
    "load_ladder",
    "parse_budget",
    "predict_seconds",
    "recipe_for",
]


def parse_budget(text: str | float | int) -> float:
    """Seconds in a budget written as seconds (``600``, ``90s``), minutes (``10m``) or hours (``1.5h``).

    Example:
        >>> parse_budget("10m"), parse_budget("90s"), parse_budget(45), parse_budget("1.5h")
        (600.0, 90.0, 45.0, 5400.0)
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text).lower())
        if match is None:
            raise ConfigError(
                f"--budget {text!r} is not a duration: write seconds (600 or 600s), minutes (10m) or hours (1.5h)."
            )
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--budget must be a positive duration, got {text!r}.")
    return seconds


# augmentation a rung trains with when it feeds images (named in rungs as data): kept to what suits any photo,
# digit or cell: no flip, no 90-degree turn (a 6 is not a 9; a photo's sky is up)
AUGMENTATIONS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "light": [
        {"Affine": {"scale": [0.9, 1.1], "translate_percent": [-0.05, 0.05], "rotate": [-10, 10], "p": 0.5}},
        {"RandomBrightnessContrast": {"brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.5}},
    ],
}


@dataclass(frozen=True)
class Rung:
    """One candidate plan: a backbone at an input size, ``head_epochs`` on stored features, then the top
    ``unfrozen_groups`` groups for ``unfrozen_epochs``, fed the stored trunk (``augment: none``) or augmented
    images (the frozen bottom runs every step)."""

    name: str
    backbone: str
    image_size: int
    head_epochs: int
    unfrozen_groups: int = 0
    unfrozen_epochs: int = 0
    augment: str = "none"

    def __post_init__(self) -> None:
        where = f"auto rung '{self.name}'"
        if not re.fullmatch(r"tf_efficientnet_lite[0-2]", self.backbone):
            raise ConfigError(
                f"{where}: backbone {self.backbone!r} has no bundled weights; use tf_efficientnet_lite0, 1 or 2."
            )
        if not 32 <= self.image_size <= 512:
            raise ConfigError(f"{where}: image_size must be in 32..512, got {self.image_size}.")
        if self.head_epochs < 0 or self.unfrozen_epochs < 0 or self.head_epochs + self.unfrozen_epochs < 1:
            raise ConfigError(f"{where}: needs at least one epoch (head_epochs + unfrozen_epochs >= 1).")
        if not 0 <= self.unfrozen_groups <= 7:
            raise ConfigError(f"{where}: unfrozen_groups must be in 0..7 (the backbone has 8 groups).")
        if (self.unfrozen_groups == 0) != (self.unfrozen_epochs == 0):
            raise ConfigError(f"{where}: unfrozen_groups and unfrozen_epochs are both 0 or both > 0.")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(
                f"{where}: augment must be one of {sorted(AUGMENTATIONS)}, got {self.augment!r}."
            )

    @property
    def epochs(self) -> int:
        return self.head_epochs + self.unfrozen_epochs

    @property
    def feeds_trunk(self) -> bool:
        """Whether the unfrozen epochs read the stored trunk (no augmentation reaches them)."""
        return self.unfrozen_groups > 0 and self.augment == "none"

    def scaled(self, factor: float) -> Rung:
        """This rung with its unfrozen (else head) epochs times ``factor``, rounded down, at least as many."""
        if self.unfrozen_epochs:
            return _replace(
                self, unfrozen_epochs=max(self.unfrozen_epochs, int(self.unfrozen_epochs * factor))
            )
        return _replace(self, head_epochs=max(self.head_epochs, int(self.head_epochs * factor)))


def _replace(rung: Rung, **changes: Any) -> Rung:
    values = {**asdict(rung), **changes}
    if changes:
        values["name"] = f"{rung.name} x{values.get('unfrozen_epochs') or values['head_epochs']} epochs"
    return Rung(**values)


#: the default ladder, cheapest first. The quick start is ``lite0-192-top3``; ``lite0-224-top5-augmented`` is
#: the 4-class recipe's schedule (its gain on ELPV: +0.020 +- 0.009 binary test accuracy, docs/elpv.md).
LADDER: tuple[Rung, ...] = (
    Rung("lite0-128-head", "tf_efficientnet_lite0", 128, head_epochs=5),
    Rung("lite0-160-head", "tf_efficientnet_lite0", 160, head_epochs=5),
    Rung("lite0-160-top2", "tf_efficientnet_lite0", 160, 3, 2, 3),
    Rung("lite0-192-top3-short", "tf_efficientnet_lite0", 192, 3, 3, 3),
    Rung("lite0-192-top3", "tf_efficientnet_lite0", 192, 3, 3, 6),
    Rung("lite0-192-top4", "tf_efficientnet_lite0", 192, 3, 4, 6),
    Rung("lite0-224-top5-augmented", "tf_efficientnet_lite0", 224, 3, 5, 13, augment="light"),
    Rung("lite1-240-top5-augmented", "tf_efficientnet_lite1", 240, 3, 5, 13, augment="light"),
)


def load_ladder(path: str | os.PathLike) -> tuple[Rung, ...]:
    """A ladder from a YAML file: a list of rungs (mappings of :class:`Rung`'s fields), cheapest first."""
    import yaml

    try:
        rows = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"could not read the auto rules '{path}': {err}") from err
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"the auto rules '{path}' must be a YAML list of rungs (mappings), cheapest first.")
    try:
        return tuple(Rung(**row) for row in rows)
    except TypeError as err:
        raise ConfigError(
            f"the auto rules '{path}': {err}; a rung's fields are {list(Rung.__dataclass_fields__)}."
        ) from err


# --- what an image costs on this machine ------------------------------------------------------------------

MEASURED_SIDE = {"tf_efficientnet_lite0": 192, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}
# per optimizer step and per epoch, beyond the images' compute: the loop, the optimizer, logging, the
# checkpoint of each epoch. Set by hand, not measured one by one; benchmarks/auto_budget.py checks the whole
# prediction against measured runs
STEP_OVERHEAD_S = 0.01
EPOCH_OVERHEAD_S = 1.0
REPORT_S = 12.0  # the run report's figures and the test's set-up, set by hand like the two above


@dataclass
class BackboneCosts:
    """Seconds per image of one backbone at ``side`` px (``bottom``/``top_train``/``top_eval`` by the number
    of trainable top groups), and the trunk's stored bytes per image."""

    side: int
    forward: float
    bottom: dict[int, float] = field(default_factory=dict)
    top_train: dict[int, float] = field(default_factory=dict)
    top_eval: dict[int, float] = field(default_factory=dict)
    trunk_bytes: dict[int, int] = field(default_factory=dict)

    def at(self, side: int) -> BackboneCosts:
        """These costs scaled to ``side`` px by the pixel count (compute grows with it)."""
        s = (side / self.side) ** 2
        return BackboneCosts(
            side,
            self.forward * s,
            {k: v * s for k, v in self.bottom.items()},
            {k: v * s for k, v in self.top_train.items()},
            {k: v * s for k, v in self.top_eval.items()},
            {k: int(v * s) for k, v in self.trunk_bytes.items()},
        )


@dataclass
class MachineCosts:
    """What ``auto_plan`` measured: decoding an image of the data, and each backbone's costs."""

    decode: float
    setup_s: float
    backbones: dict[str, BackboneCosts] = field(default_factory=dict)
    measuring_s: float = 0.0

    def of(self, rung: Rung) -> BackboneCosts:
        return self.backbones[rung.backbone].at(rung.image_size)


def _median_seconds(fn: Any, repeats: int = 2) -> float:
    fn()  # warm-up: allocations, kernels chosen
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_backbone(
    backbone: str, groups: Sequence[int], batch: int = 16, repeats: int = 2
) -> BackboneCosts:
    """Seconds per image of ``backbone`` (bundled weights) at its measured side: a no-grad forward, and per
    number of trainable top groups ``k``: the frozen bottom's forward, the top's no-grad forward from the
    bottom's output, and a training step of the top (forward, head, loss, backward).

    One staged forward pass, timed stage by stage, gives every split of the backbone at once; a training step
    is timed for the deepest ``k`` only, and its ratio to that top's forward scales the others (a backward pass
    costs about twice a forward, whatever the depth).
    """
    from transferkit.finetuning.schedule import FreezeSchedule
    from transferkit.models.classifier import TransferClassifier

    side = MEASURED_SIDE[backbone]
    model = TransferClassifier(
        num_classes=2,
        backbone=backbone,
        pretrained="bundled",
        freeze_schedule=FreezeSchedule(milestones={0: 0}),
    ).eval()  # BatchNorm on its stored statistics throughout, as bn_policy: eval trains
    # the layout training runs in (runtime.channels_last, on in every rung's recipe)
    model.backbone.to(memory_format=torch.channels_last)
    net = model.backbone.model
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    stages = [
        lambda t: net.bn1(net.conv_stem(t)),
        *list(net.blocks),
        lambda t: net.forward_head(net.bn2(net.conv_head(t))),
    ]
    times: list[list[float]] = [[] for _ in stages]
    shapes: list[torch.Size] = []
    with torch.no_grad():
        for repeat in range(repeats + 1):  # the first is a warm-up
            out = x
            for i, stage in enumerate(stages):
                begin = time.perf_counter()
                out = stage(out)
                if repeat:
                    times[i].append(time.perf_counter() - begin)
                elif i < len(stages) - 1:
                    shapes.append(out.shape[1:])
    stage_s = [statistics.median(t) / batch for t in times]
    costs = BackboneCosts(side, sum(stage_s))
    groups_total = len(model.freezing.groups)
    splits = {
        k: model.freezing.trunk(groups_total - k).stages for k in sorted(set(groups)) if 0 < k < groups_total
    }
    for k, blocks in splits.items():  # the trunk: the stem and the first ``blocks`` block stages
        costs.bottom[k] = sum(stage_s[: blocks + 1])
        costs.top_eval[k] = sum(stage_s[blocks + 1 :])
        costs.trunk_bytes[k] = int(torch.Size(shapes[blocks]).numel()) * 2  # stored as float16
    if splits:
        deepest = max(splits)
        trunk = model.freezing.trunk(groups_total - deepest)
        with torch.no_grad():
            maps = trunk(x)
        y = torch.randint(0, 2, (batch,))

        def step() -> None:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model.head(trunk.rest(maps)), y).backward()

        ratio = _median_seconds(step, repeats) / batch / max(costs.top_eval[deepest], 1e-9)
        costs.top_train = {k: costs.top_eval[k] * ratio for k in splits}
    return costs


def measure_decoding(dataset: Any, count: int = 16) -> float:
    """Seconds per image to read and prepare ``count`` images of ``dataset`` (its own pipeline), spread over it."""
    n = len(dataset)
    if n == 0:
        return 0.0
    picks = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(min(count, n))})
    start = time.perf_counter()
    for i in picks:
        dataset[i]
    return (time.perf_counter() - start) / len(picks)


# --- predicted time ---------------------------------------------------------------------------------------


def predict_seconds(
    rung: Rung, costs: MachineCosts, sizes: dict[str, int], batch_size: int
) -> dict[str, float]:
    """Predicted wall seconds of ``rung`` by phase, on splits of ``sizes`` (``train``, ``val``, ``test``)."""
    c = costs.of(rung)
    n_train, n_val, n_test = sizes.get("train", 0), sizes.get("val", 0), sizes.get("test", 0)
    fitted = n_train + n_val
    steps = math.ceil(n_train / batch_size) if n_train else 0
    k = rung.unfrozen_groups
    out = {"set-up": costs.setup_s}
    out["feature cache"] = fitted * (costs.decode + c.forward) if rung.head_epochs else 0.0
    out["head epochs"] = rung.head_epochs * (steps * STEP_OVERHEAD_S + EPOCH_OVERHEAD_S)
    if k:
        per_epoch = steps * STEP_OVERHEAD_S + EPOCH_OVERHEAD_S
        if rung.feeds_trunk:
            out["trunk cache"] = fitted * (costs.decode + c.bottom[k])
            per_epoch += n_train * c.top_train[k] + n_val * c.top_eval[k]
        else:  # augmented images: every step decodes and runs the frozen bottom; validation the whole net
            per_epoch += n_train * (costs.decode + c.bottom[k] + c.top_train[k]) + n_val * (
                costs.decode + c.forward
            )
        out["unfrozen epochs"] = rung.unfrozen_epochs * per_epoch
    out["test"] = n_test * (costs.decode + c.forward)
    out["report"] = REPORT_S
    return {name: round(seconds, 1) for name, seconds in out.items()}


# --- the plan ---------------------------------------------------------------------------------------------


@dataclass
class AutoPlan:
    """The rung ``auto_plan`` chose, its predicted time by phase, and every rung it weighed."""

    rung: Rung
    predicted: dict[str, float]
    budget_s: float
    spent_s: float  # seconds of the budget gone before training: start-up, set-up, measuring
    sizes: dict[str, int]
    costs: MachineCosts
    considered: list[dict[str, Any]]
    caps: dict[str, Any]

    @property
    def predicted_s(self) -> float:
        """Seconds from the process's start to printed results: those spent, and the plan's."""
        return round(self.spent_s + sum(self.predicted.values()), 1)

    def recipe(
        self, data: dict[str, Any], kind: str = "single_label", root_dir: str = "runs/auto"
    ) -> dict[str, Any]:
        """An ordinary recipe for this plan: ``finetune --config`` on it trains the same weights."""
        return recipe_for(self.rung, data, kind, root_dir)


def recipe_for(
    rung: Rung, data: dict[str, Any], kind: str = "single_label", root_dir: str = "runs/auto"
) -> dict[str, Any]:
    """The recipe of ``rung`` on ``data`` (a recipe's data section) for a target of ``kind``: ``finetune --config``
    on it trains what ``auto`` trains."""
    r = rung  # short: it is read on every line below
    milestones = {0: 0} if not r.unfrozen_groups else {0: 0, r.head_epochs: r.unfrozen_groups}
    data = {**data, "pipeline": {**(data.get("pipeline") or {}), "image_size": r.image_size}}
    data["pipeline"]["augment"] = AUGMENTATIONS[r.augment] or "none"
    return {
        "seed_everything": data.get("seed", 0),
        "trainer": {
            "max_epochs": r.epochs,
            "accelerator": "cpu",
            "default_root_dir": root_dir,
            "log_every_n_steps": 10,
            "callbacks": [{"class_path": "transferkit.PreciseBN", "init_args": {"batches": 20}}],
        },
        "model": {
            "backbone": r.backbone,
            "pretrained": "bundled",
            "head": {"hidden_dims": [256], "activation": "elu", "dropout": 0.3},
            "optimizer": {"name": "adam", "lr": 0.001, "layer_decay": 0.75},
            "lr_schedule": {"name": "cosine"},
            "regularisation": {"label_smoothing": 0.1 if kind == "single_label" else 0.0},
            "freeze_schedule": {"milestones": milestones, "warmup_steps": 30, "bn_policy": "eval"},
        },
        "data": data,
        "caches": {"feature_cache": "clean", "trunk_cache": "clean" if r.feeds_trunk else "off"},
        "early_stopping": {"patience": 8},
    }


def _memory_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def auto_plan(
    datamodule: Any,
    budget_s: float,
    spent_s: float = 0.0,
    ladder: Sequence[Rung] = LADDER,
    margin: float = 0.9,
    max_epoch_scale: float = 2.0,
    cache_dir: str | os.PathLike = ".",
) -> AutoPlan:
    """Measure this machine's costs on ``datamodule`` and choose the richest rung of ``ladder`` that fits
    ``margin * budget_s`` (see :func:`choose`).

    Args:
        datamodule: the user's data (an :class:`~transferkit.ImageDataModule`); it is set up here.
        budget_s: the whole budget, start to printed results, in seconds.
        spent_s: seconds already gone when this is called (the process's start, imports); the set-up and the
            measuring done here count too.
        ladder: rungs, cheapest first.
        margin: the share of the budget a plan may be predicted to take (the rest absorbs prediction error).
        max_epoch_scale: when the chosen rung leaves budget unused, its epochs grow up to this factor.
        cache_dir: where the caches will be stored (its free disk caps them).

    Raises:
        ConfigError: when no rung fits, naming the smallest budget that would.
    """
    start = time.perf_counter()
    datamodule.setup("fit")
    sizes = datamodule.split_sizes()
    batch_size = int(datamodule.settings.loader.batch_size)
    setup_s = round(time.perf_counter() - start, 2)
    decode = measure_decoding(datamodule.datasets.get("val") or datamodule.datasets["train"])
    costs = MachineCosts(decode=decode, setup_s=setup_s)
    memory, disk = _memory_available(), shutil.disk_usage(_existing(Path(cache_dir))).free
    cache_cap = int(min(c for c in (memory and memory // 4, disk // 2) if c))
    caps = {"trunk_cache_bytes": cache_cap, "why": "a quarter of the available memory, half the free disk"}
    groups = sorted({r.unfrozen_groups for r in ladder if r.unfrozen_groups})
    measure_start = time.perf_counter()
    rung, predicted, considered = choose(
        ladder,
        sizes,
        batch_size,
        budget_s,
        spent_s=lambda: spent_s + time.perf_counter() - start,
        costs=costs,
        measure=lambda backbone: measure_backbone(backbone, groups),
        margin=margin,
        max_epoch_scale=max_epoch_scale,
        cache_cap=cache_cap,
    )
    costs.measuring_s = round(time.perf_counter() - measure_start, 1)
    return AutoPlan(
        rung,
        predicted,
        budget_s,
        round(spent_s + time.perf_counter() - start, 1),
        sizes,
        costs,
        considered,
        caps,
    )


def choose(
    ladder: Sequence[Rung],
    sizes: dict[str, int],
    batch_size: int,
    budget_s: float,
    spent_s: Any,
    costs: MachineCosts,
    measure: Any,
    margin: float = 0.9,
    max_epoch_scale: float = 2.0,
    cache_cap: int | None = None,
) -> tuple[Rung, dict[str, float], list[dict[str, Any]]]:
    """The richest rung of ``ladder`` whose predicted time, after the seconds ``spent_s()`` already gone, fits
    ``margin * budget_s``; its predicted phases; and a row per rung weighed (its prediction and why not).

    A backbone's costs are measured (``measure(backbone) -> BackboneCosts``, stored in ``costs``) the first time
    a rung needs them, unless the rung's time at an already measured, smaller backbone's cost is over the
    budget. A rung whose trunk cache would pass ``cache_cap`` bytes is passed over. When the chosen rung leaves
    budget unused (the next richer one does not fit, or there is none), its epochs grow (up to
    ``max_epoch_scale`` times) to use it.

    Raises:
        ConfigError: when no rung fits, naming the smallest budget that would.
    """
    available = budget_s * margin
    considered: list[dict[str, Any]] = []
    chosen: tuple[Rung, dict[str, float]] | None = None
    for rung in ladder:
        row: dict[str, Any] = {"rung": rung.name}
        if rung.backbone not in costs.backbones:
            lower = _lower_bound(rung, costs, sizes, batch_size)
            if lower is not None and spent_s() + lower > available:
                row.update(
                    predicted_s=round(lower, 1),
                    why_not="over the budget at a smaller backbone's cost (not measured)",
                )
                considered.append(row)
                continue
            costs.backbones[rung.backbone] = measure(rung.backbone)
        predicted = predict_seconds(rung, costs, sizes, batch_size)
        total = sum(predicted.values())
        row["predicted_s"] = round(total, 1)
        trunk = _trunk_bytes(rung, costs, sizes) if rung.feeds_trunk else 0
        if cache_cap is not None and trunk > cache_cap:
            row["why_not"] = (
                f"its trunk cache ({trunk / 2**30:.1f} GiB) is over the cap ({cache_cap / 2**30:.1f} GiB)"
            )
        elif spent_s() + total > available:
            row["why_not"] = "over the budget"
        else:
            row["fits"] = True
            chosen = (rung, predicted)
        considered.append(row)

    if chosen is None:
        smallest = min((r["predicted_s"] for r in considered if "predicted_s" in r), default=0.0)
        need = (spent_s() + smallest) / margin
        total_images = sum(sizes.values())
        raise ConfigError(
            f"no plan fits a budget of {budget_s:.0f} s on this machine for {total_images} images (train "
            f"{sizes.get('train', 0)}, validation {sizes.get('val', 0)}, test {sizes.get('test', 0)}): the cheapest "
            f"('{ladder[0].name}') is predicted to need {need:.0f} s in all. Give --budget {math.ceil(need)} or more, "
            "or fewer images (data.split.max_samples)."
        )
    rung, predicted = chosen
    if max_epoch_scale > 1:  # the chosen rung with budget to spare (the next one did not fit): more epochs
        base = rung.unfrozen_epochs or rung.head_epochs
        phase = "unfrozen epochs" if rung.unfrozen_epochs else "head epochs"
        per_epoch = predicted[phase] / base
        left = available - spent_s() - sum(predicted.values())
        extra = int(left // per_epoch) if per_epoch > 0 else 0
        factor = min(max_epoch_scale, (base + max(extra, 0)) / base)
        if factor > 1 and rung.scaled(factor) != rung:
            rung = rung.scaled(factor)
            predicted = predict_seconds(rung, costs, sizes, batch_size)
            considered.append(
                {"rung": rung.name, "predicted_s": round(sum(predicted.values()), 1), "fits": True}
            )
    return rung, predicted, considered


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (the disk the caches will be written to)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _lower_bound(rung: Rung, costs: MachineCosts, sizes: dict[str, int], batch_size: int) -> float | None:
    """The rung's predicted time at the cost of a smaller bundled backbone already measured (a larger one
    costs at least as much per pixel), or ``None`` when none is."""
    measured = sorted(costs.backbones)
    if not measured:
        return None
    proxy = Rung(**{**asdict(rung), "backbone": measured[0]})
    return sum(predict_seconds(proxy, costs, sizes, batch_size).values())


def _trunk_bytes(rung: Rung, costs: MachineCosts, sizes: dict[str, int]) -> int:
    per_image = costs.of(rung).trunk_bytes.get(rung.unfrozen_groups, 0)
    return per_image * (sizes.get("train", 0) + sizes.get("val", 0))
