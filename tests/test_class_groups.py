"""Class groups: a model trained on fine classes also scored on the coarser classes they refine."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NORM, TINY_BACKBONE, merged, run_cli

from transferkit import ImageDataModule, TransferClassifier
from transferkit.data.class_groups import group_labels, group_probabilities, resolve_class_groups
from transferkit.errors import ConfigError

DIGITS = [str(i) for i in range(10)]
LOW_HIGH = {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9]}  # as YAML reads [0, 1, ...]: numbers


def test_groups_resolve_by_class_name_even_where_yaml_reads_numbers():
    assert resolve_class_groups(LOW_HIGH, DIGITS) == {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9]}
    # ELPV's 4-class names: YAML reads [0, 1/3] as 0 and '1/3', [2/3, 1] as '2/3' and 1
    elpv = resolve_class_groups({"functional": [0, "1/3"], "defective": ["2/3", 1]}, ["0", "1/3", "2/3", "1"])
    assert elpv == {"functional": [0, 1], "defective": [2, 3]}
    assert resolve_class_groups(None, DIGITS) is None


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (
            {"low": [0, 1, 2, 3, 4, "x"], "high": [5, 6, 7, 8, 9]},
            r"names 'x', which is not a class; the classes: '0',",
        ),
        (
            {"low": [0, 1, 2, 3, 4, 5], "high": [5, 6, 7, 8, 9]},
            r"class '5' is in class groups 'low' and 'high'",
        ),
        (
            {"low": [0, 1, 2, 3], "high": [5, 6, 7, 8, 9]},
            r"class_groups leave out '4'; every class must be in one",
        ),
        ({"all": DIGITS}, r"at least two group names"),
        ({"low": [], "high": DIGITS}, r"class group 'low' must list one class or more"),
    ],
)
def test_bad_groups_name_what_is_wrong(groups, message):
    with pytest.raises(ConfigError, match=message):
        resolve_class_groups(groups, DIGITS)


def test_group_probabilities_sum_the_classes_and_labels_map_to_their_group():
    groups = resolve_class_groups(LOW_HIGH, DIGITS)
    probs = torch.softmax(torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    grouped = group_probabilities(probs, groups)
    assert torch.allclose(grouped[:, 0], probs[:, :5].sum(1)) and torch.allclose(
        grouped.sum(1), torch.ones(6)
    )
    assert group_labels(torch.tensor([0, 4, 5, 9]), groups).tolist() == [0, 0, 1, 1]


def test_elpv_4class_carries_the_binary_classes_as_its_groups():
    four = ImageDataModule(source="elpv", task="4class", loader={"num_workers": 0})
    assert four.class_names == ["0", "1/3", "2/3", "1"]
    assert four.class_groups == {"functional": ["0", "1/3"], "defective": ["2/3", "1"]}
    assert ImageDataModule(source="elpv", task="binary", loader={"num_workers": 0}).class_groups is None


def test_a_bad_group_fails_when_the_data_is_set_up_not_after_training():
    with pytest.raises(ConfigError, match="class_groups leave out '9'"):
        ImageDataModule(source="digits", class_groups={"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8]})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_finetune_scores_the_groups_as_the_checkpoint_predicts_them(tmp_path: Path):
    data = {
        "source": "digits",
        "split": {"max_samples": 400},
        "loader": {"num_workers": 0, "batch_size": 32},
        "pipeline": {**NORM, "augment": "none"},
    }
    recipe = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 3, "accelerator": "cpu", "default_root_dir": str(tmp_path / "run")},
        "model": {
            "backbone": TINY_BACKBONE,
            "pretrained": False,
            "optimizer": {"lr": 0.003, "layer_decay": 1.0},
        },
        "data": merged(
            data,
            {"pipeline": {"mean": list(NORM["mean"]), "std": list(NORM["std"])}, "class_groups": LOW_HIGH},
        ),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli(
        "finetune", "--config", str(tmp_path / "recipe.yaml"), "--trainer.enable_progress_bar", "false"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_group_acc" in result.stdout  # printed with the other test results, and what it means
    printed = " ".join(result.stdout.split())  # Rich wraps narrow consoles
    assert "test_group_*: the classes scored in groups: high = 5, 6, 7, 8, 9; low = 0, 1, 2, 3, 4" in printed
    (metrics_file,) = (tmp_path / "run").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["class_groups"] == {"high": ["5", "6", "7", "8", "9"], "low": ["0", "1", "2", "3", "4"]}
    (curves,) = (tmp_path / "run").rglob("metrics.csv")
    assert "val_group_acc" in curves.read_text().splitlines()[0]

    # every figure of the printed table is in metrics.json and in report.md's headline, the groups' too
    run_dir = metrics_file.parent
    report = (run_dir / "report.md").read_text()
    headline = report.split("## Files")[0]
    for key, value in metrics["test"].items():
        assert re.search(rf"{key} \S {value:.4f}", printed), key  # the terminal's row
        assert f"{value:.4f} |" in headline, key
    assert "| test accuracy of the class groups | " in headline
    assert "| class groups | high = 5, 6, 7, 8, 9; low = 0, 1, 2, 3, 4 |" in headline
    # the interpretation of the test split scores the groups as the test loop did, with their table and
    # confusion matrix, in interpretation.json/.md and the run report
    interpretation = json.loads((run_dir / "interpretation.json").read_text())
    assert interpretation["groups"]["accuracy"] == pytest.approx(metrics["test"]["test_group_acc"], abs=1e-6)
    per_group = {row["class"]: row for row in interpretation["groups"]["per_group"]}
    assert set(per_group) == {"low", "high", "macro average"}
    assert per_group["low"]["support"] + per_group["high"]["support"] == metrics["split_sizes"]["test"]
    assert per_group["macro average"]["f1"] == pytest.approx(metrics["test"]["test_group_f1"], abs=1e-6)
    assert (run_dir / "confusion_groups.png").stat().st_size > 0
    for text in (report, (run_dir / "interpretation.md").read_text()):
        assert "# Per class group" in text and "(confusion_groups.png)" in text
        assert f"accuracy {metrics['test']['test_group_acc']:.4f}" in text
    # and `interpret` of the best checkpoint prints the groups' table
    shown = run_cli(
        "interpret",
        "--ckpt_path",
        metrics["best_checkpoint"],
        "--config",
        str(tmp_path / "recipe.yaml"),
        "--out",
        str(tmp_path / "interpreted"),
        "--no-gradcam",
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"class groups: accuracy {metrics['test']['test_group_acc']:.4f}" in shown.stdout
    assert (tmp_path / "interpreted" / "confusion_groups.png").is_file()

    # the checkpoint keeps its groups, and the printed figure is its grouped accuracy on the test split
    best = TransferClassifier.from_checkpoint(metrics["best_checkpoint"]).eval()
    assert best.class_groups == {"low": [0, 1, 2, 3, 4], "high": [5, 6, 7, 8, 9]}
    dm = ImageDataModule(**data)
    dm.setup("test")
    images, labels = zip(*(dm.datasets["test"][i] for i in range(len(dm.datasets["test"]))), strict=True)
    with torch.no_grad():
        probs = best.predict_proba(torch.stack(images))
    predicted = group_probabilities(probs, best.class_groups).argmax(1)
    truth = group_labels(torch.as_tensor(labels), best.class_groups)
    expected = (predicted == truth).float().mean().item()
    assert metrics["test"]["test_group_acc"] == pytest.approx(expected, abs=1e-6)
    assert expected > 0.5  # far from guessing: the digits are learnable in 3 epochs

    # predict-images adds the group columns: the most probable group, and each group's probability
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.fromarray(dm.datasets["test"].read(i)).save(tmp_path / "images" / f"digit{i}.png")
    out = tmp_path / "predictions.csv"
    done = run_cli(
        "predict-images",
        "--ckpt_path",
        metrics["best_checkpoint"],
        "--images",
        str(tmp_path / "images"),
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 4 and {"predicted_group", "prob_group_high", "prob_group_low"} <= set(rows[0])
    for row in rows:
        low = sum(float(row[f"prob_{c}"]) for c in "01234")
        assert float(row["prob_group_low"]) == pytest.approx(low, abs=1e-5)
        assert row["predicted_group"] == ("low" if low > 0.5 else "high")
