"""``auto``: a plan that fits a wall-clock budget, written as a recipe that ``finetune`` reruns to the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import quiet_trainer, run_cli

from transferkit.errors import ConfigError
from transferkit.tuning.auto import (
    LADDER,
    BackboneCosts,
    MachineCosts,
    Rung,
    choose,
    load_ladder,
    parse_budget,
    predict_seconds,
)

ROOT = Path(__file__).resolve().parents[1]
# a machine's costs, per image, as measure_backbone reports them (fixed here: the choice, not the clock, is tested)
LITE0 = BackboneCosts(
    192,
    forward=0.02,
    bottom={2: 0.015, 3: 0.014, 4: 0.012, 5: 0.010},
    top_train={2: 0.012, 3: 0.018, 4: 0.024, 5: 0.030},
    top_eval={2: 0.004, 3: 0.006, 4: 0.008, 5: 0.010},
    trunk_bytes={2: 32256, 3: 23040, 4: 46080, 5: 110592},
)


def _choose(sizes: dict[str, int], budget: float, ladder=LADDER, cache_cap=None):
    costs = MachineCosts(decode=0.002, setup_s=1.0)
    measured = []

    def measure(backbone: str) -> BackboneCosts:
        measured.append(backbone)
        scale = {"tf_efficientnet_lite0": 1.0, "tf_efficientnet_lite1": 1.6, "tf_efficientnet_lite2": 2.6}[
            backbone
        ]
        lite = BackboneCosts(**{**LITE0.__dict__})
        scaled = lite.at(192)
        for table in (scaled.bottom, scaled.top_train, scaled.top_eval):
            table.update({k: v * scale for k, v in table.items()})
        scaled.forward *= scale
        return scaled

    rung, predicted, considered = choose(
        ladder, sizes, 32, budget, spent_s=lambda: 10.0, costs=costs, measure=measure, cache_cap=cache_cap
    )
    return rung, predicted, considered, measured


ELPV = {"train": 1672, "val": 296, "test": 656}


def test_budget_is_read_in_seconds_minutes_or_hours_and_nonsense_is_refused():
    assert parse_budget("10m") == 600 and parse_budget("90s") == 90 and parse_budget("2h") == 7200
    assert parse_budget("300") == 300 and parse_budget(2.5) == 2.5
    for bad in ("ten minutes", "5 d", "0", "-3m", ""):
        with pytest.raises(ConfigError, match="budget"):
            parse_budget(bad)


def test_a_rung_that_cannot_run_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="no bundled weights"):
        Rung("r", "resnet50", 192, 3)
    with pytest.raises(ConfigError, match="both 0 or both > 0"):
        Rung("r", "tf_efficientnet_lite0", 192, 3, unfrozen_groups=3)
    with pytest.raises(ConfigError, match="augment must be one of"):
        Rung("r", "tf_efficientnet_lite0", 192, 3, 3, 6, augment="heavy")


def test_rules_file_errors_name_the_file_and_the_fields(tmp_path: Path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("rung: 1\n")
    with pytest.raises(ConfigError, match="must be a YAML list of rungs"):
        load_ladder(bad)
    bad.write_text("- {name: a, backbone: tf_efficientnet_lite0, image_size: 64, head_epochs: 1, depth: 3}\n")
    with pytest.raises(ConfigError, match="a rung's fields are"):
        load_ladder(bad)


def test_predicted_time_grows_with_the_images_and_the_epochs():
    costs = MachineCosts(decode=0.002, setup_s=1.0, backbones={"tf_efficientnet_lite0": LITE0})
    rung = next(r for r in LADDER if r.name == "lite0-192-top3")
    one = predict_seconds(rung, costs, ELPV, 32)
    ten = predict_seconds(rung, costs, {k: 10 * v for k, v in ELPV.items()}, 32)
    assert 9 < ten["unfrozen epochs"] / one["unfrozen epochs"] <= 10.5
    assert 9 < ten["trunk cache"] / one["trunk cache"] <= 10.5
    longer = predict_seconds(rung.scaled(2), costs, ELPV, 32)
    assert longer["unfrozen epochs"] == pytest.approx(2 * one["unfrozen epochs"], rel=0.01)
    assert longer["trunk cache"] == one["trunk cache"]  # stored once, whatever the epochs


def test_a_folder_ten_times_larger_gets_a_cheaper_plan_within_the_same_budget():
    names = [r.name for r in LADDER]
    small, small_predicted, *_ = _choose(ELPV, 600)
    large, large_predicted, *_ = _choose({k: 10 * v for k, v in ELPV.items()}, 600)
    assert names.index(large.name.split(" x")[0]) < names.index(small.name.split(" x")[0])
    for predicted in (small_predicted, large_predicted):
        assert 10 + sum(predicted.values()) <= 0.9 * 600


def test_a_tiny_folder_spends_spare_budget_on_more_epochs_of_the_richest_rung():
    tiny = {"train": 60, "val": 12, "test": 20}
    rung, predicted, considered, _ = _choose(tiny, 600)
    richest = LADDER[-1]
    assert rung.backbone == richest.backbone and rung.unfrozen_groups == richest.unfrozen_groups
    assert rung.unfrozen_epochs == 2 * richest.unfrozen_epochs  # up to twice, no more
    assert considered[-1]["fits"] and 10 + sum(predicted.values()) <= 0.9 * 600


def test_a_rung_below_the_richest_grows_into_the_time_the_next_rung_could_not_use():
    rung, predicted, considered, _ = _choose(ELPV, 600)
    names = [r.name for r in LADDER]
    base = LADDER[names.index(rung.name.split(" x")[0])]
    assert base != LADDER[-1]
    assert rung.unfrozen_epochs > base.unfrozen_epochs
    spent = 10 + sum(predicted.values())
    assert spent <= 0.9 * 600
    # one more epoch would not have fitted, unless the growth stopped at twice the rung's epochs
    per_epoch = predicted["unfrozen epochs"] / rung.unfrozen_epochs
    assert spent + per_epoch > 0.9 * 600 or rung.unfrozen_epochs == 2 * base.unfrozen_epochs
    richer = considered[names.index(base.name) + 1]
    assert not richer.get("fits")  # the richer rung stays over the budget


def test_a_backbone_is_not_measured_when_a_smaller_ones_cost_already_rules_it_out():
    _, _, considered, measured = _choose(ELPV, 300)
    assert measured == ["tf_efficientnet_lite0"]
    lite1 = next(row for row in considered if row["rung"].startswith("lite1"))
    assert "not measured" in lite1["why_not"]


def test_a_trunk_cache_over_the_cap_is_passed_over():
    rung, _, considered, _ = _choose(ELPV, 3600, cache_cap=10 * 2**20)  # 10 MiB: no trunk of 1,968 cells fits
    assert not rung.feeds_trunk
    assert any("over the cap" in row.get("why_not", "") for row in considered)


def test_a_budget_too_small_is_refused_with_the_smallest_that_fits():
    with pytest.raises(ConfigError, match=r"Give --budget (\d+)") as refused:
        _choose({k: 10 * v for k, v in ELPV.items()}, 30)
    needed = int(refused.value.args[0].split("Give --budget ")[1].split()[0])
    rung, *_ = _choose({k: 10 * v for k, v in ELPV.items()}, needed)  # the budget it names is enough
    assert rung == LADDER[0]


def test_time_budget_stops_an_overrunning_fit_and_otherwise_changes_nothing(
    tmp_path: Path, stripes_folder: Path
):
    import transferkit as tk
    from transferkit.training.budget import TimeBudget

    def fit(budget: TimeBudget | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = tk.TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False)
        dm = tk.ImageDataModule(
            root=str(stripes_folder), pipeline={"image_size": 32}, loader={"batch_size": 8, "num_workers": 0}
        )
        trainer = quiet_trainer(
            tmp_path / str(id(budget)), max_epochs=2, callbacks=[budget] if budget else []
        )
        trainer.fit(model, datamodule=dm)
        return {k: v.clone() for k, v in model.state_dict().items()}, trainer

    plain, plain_trainer = fit(None)
    generous = TimeBudget(deadline=time.time() + 3600)
    kept, kept_trainer = fit(generous)
    assert generous.stopped_at_epoch is None and kept_trainer.global_step == plain_trainer.global_step
    assert all(torch.equal(plain[k], kept[k]) for k in plain)

    spent = TimeBudget(deadline=time.time() - 1)  # the deadline has passed: stop at the first batch
    _, stopped = fit(spent)
    assert spent.stopped_at_epoch == 0 and stopped.global_step == 1

    # testing a checkpoint saved before the stop (the best one) restores the callbacks' states from it: the
    # stop this run made is kept, so auto-plan.json and the printed line say training was cut short
    before = tmp_path / "saved-before-the-stop.ckpt"
    stopped.save_checkpoint(before)
    checkpoint = torch.load(before, weights_only=True)
    states = [k for k in checkpoint["callbacks"] if k.startswith("TimeBudget")]
    assert states, checkpoint["callbacks"].keys()
    checkpoint["callbacks"][states[0]] = {"stopped_at_epoch": None}
    torch.save(checkpoint, before)
    model = tk.TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False)
    dm = tk.ImageDataModule(
        root=str(stripes_folder), pipeline={"image_size": 32}, loader={"batch_size": 8, "num_workers": 0}
    )
    stopped.test(model, datamodule=dm, ckpt_path=str(before), verbose=False)
    assert spent.stopped_at_epoch == 0
    # a fresh run resuming from a stopped one reads its stop
    resumed = TimeBudget(deadline=time.time() + 3600)
    resumed.load_state_dict({"stopped_at_epoch": 1})
    assert resumed.stopped_at_epoch == 1


def test_auto_refuses_model_and_trainer_settings_it_chooses_itself(stripes_folder: Path):
    done = run_cli(
        "auto", "--data.root", str(stripes_folder), "--budget", "60", "--model.optimizer.lr", "0.1"
    )
    assert done.returncode == 2
    assert "auto chooses the model and training settings itself" in done.stderr
    assert "--model.optimizer.lr" in done.stderr and "finetune --config" in done.stderr


TINY_LADDER = [
    {"name": "head-64", "backbone": "tf_efficientnet_lite0", "image_size": 64, "head_epochs": 2},
    {"name": "top2-64", "backbone": "tf_efficientnet_lite0", "image_size": 64, "head_epochs": 1,
     "unfrozen_groups": 2, "unfrozen_epochs": 2},
]  # fmt: skip


@pytest.mark.slow
def test_auto_keeps_to_a_tiny_budget_and_its_recipe_retrains_the_same_weights(
    tmp_path: Path, stripes_folder: Path
):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(TINY_LADDER))
    out = tmp_path / "auto"
    budget = 90
    command = [sys.executable, "-m", "transferkit", "auto", "--data.root", str(stripes_folder)]
    command += [
        "--data.loader.num_workers",
        "0",
        "--budget",
        str(budget),
        "--rules",
        str(rules),
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "auto-plan.json").read_text())
    # start to exit, measured from outside: within the budget + 10 % + the interpreter's exit (a few seconds)
    assert wall <= budget * 1.1 + 10, (wall, record["predicted_s"])
    assert record["measured_s"] <= wall and record["test"]["test_acc"] > 0.6
    assert "auto: epoch 1/" in done.stderr and "of the budget left" in done.stderr
    assert f"results in {record['measured_s']:.0f} s of a {budget} s budget" in done.stderr

    # finetune on the written recipe trains the same weights (unless the budget stopped training early)
    assert record["stopped_early_at_epoch"] is None
    again = tmp_path / "again"
    recipe = out / "auto-recipe.yaml"
    rerun = [sys.executable, "-m", "transferkit", "finetune", "--config", str(recipe)]
    done = subprocess.run(
        rerun + ["--trainer.default_root_dir", str(again)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first = sorted(out.rglob("last.ckpt"))[0]
    second = sorted(again.rglob("last.ckpt"))[0]
    a = torch.load(first, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(second, map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_budget_no_plan_fits_is_refused_with_one_that_does(tmp_path: Path, stripes_folder: Path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(TINY_LADDER))
    args = ["auto", "--data.root", str(stripes_folder), "--rules", str(rules), "--out", str(tmp_path / "a")]
    done = run_cli(*args, "--budget", "1")
    assert done.returncode == 2 and "no plan fits a budget of 1 s" in done.stderr
    needed = int(done.stderr.split("Give --budget ")[1].split()[0])
    done = run_cli(*args, "--budget", str(needed * 2), "--plan-only")  # with room for the clock's noise
    assert done.returncode == 0, done.stderr[-2000:]
    written = yaml.safe_load((tmp_path / "a" / "auto-recipe.yaml").read_text())
    assert written["data"]["root"] == str(stripes_folder) and written["model"]["pretrained"] == "bundled"


def test_auto_says_which_sections_of_a_given_recipe_the_plan_replaces(capsys):
    from transferkit.cli.auto import _say_what_a_config_gives

    _say_what_a_config_gives(["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--budget", "5m"])
    said = capsys.readouterr().err
    assert "takes the data section and the seed" in said
    assert "the plan replaces its caches, early_stopping, model, trainer" in said
