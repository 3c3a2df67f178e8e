"""Target kinds: one class per image, several labels per image, or numbers, from the data to the checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import NORM, TINY_BACKBONE, make_squares_csv

import transferkit as tk
from transferkit.errors import ConfigError, DatasetError
from transferkit.models.calibration import fit_label_thresholds
from transferkit.models.checkpoint import read_checkpoint


def _write_csv(tmp_path: Path, header: str, rows: list[str]) -> Path:
    """A CSV of ``rows`` over ``header``, each row's first field an image that exists."""
    from PIL import Image

    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(len(rows)):
        Image.fromarray(np.full((8, 8, 3), i * 10 % 255, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    lines = [header] + [f"img/{i}.png,{row}" for i, row in enumerate(rows)]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _data(csv: Path, target: dict, **kwargs) -> tk.ImageDataModule:
    return tk.ImageDataModule(
        source="csv",
        csv_path=str(csv),
        target=target,
        pipeline={"augment": "none", **NORM},
        loader={"num_workers": 0, "batch_size": 16},
        **kwargs,
    )


def _model(dm: tk.ImageDataModule, **kwargs) -> tk.TransferClassifier:
    settings = dict(
        num_classes=dm.num_classes,
        class_names=dm.class_names,
        target=dm.target_kind,
        backbone=TINY_BACKBONE,
        pretrained=False,
        head={"hidden_dims": (64,)},
        optimizer={"lr": 3e-3, "layer_decay": 1.0},
    )
    return tk.TransferClassifier(**{**settings, **kwargs})


def _trainer(root: Path, epochs: int) -> tk.Trainer:
    return tk.Trainer(
        max_epochs=epochs,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        deterministic=True,
    )


# --- data: what a CSV says, and what it may not say ------------------------------------------------


def test_a_multi_label_csv_reads_label_lists_and_0_1_columns_alike(squares_csv):
    lists = _data(squares_csv, {"kind": "multi_label"})
    columns = _data(squares_csv, {"kind": "multi_label", "columns": ["red", "blue"]})
    assert lists.class_names == ["blue", "red"] and columns.class_names == ["red", "blue"]
    assert lists.data.labels.shape == (200, 2) and lists.data.labels.dtype == np.float32
    np.testing.assert_array_equal(lists.data.labels[:, ::-1], columns.data.labels)
    # the fixture's images 1, 2 and 3: red; blue; both
    assert lists.data.labels[1:4].tolist() == [[0, 1], [1, 0], [1, 1]]
    dm = _data(squares_csv, {"kind": "multi_label"})
    dm.setup("fit")
    image, target = dm.datasets["train"][0]
    assert target.dtype == torch.float32 and target.shape == (2,)


def test_bad_targets_are_refused_at_set_up_naming_the_file_and_row(tmp_path):
    csv = _write_csv(tmp_path, "path,labels", ["a;b", "a", "c"])
    with pytest.raises(DatasetError, match=r"t\.csv.*row 4: \['c'\].*data\.target\.names"):
        _data(csv, {"kind": "multi_label", "names": ["a", "b"]})
    csv = _write_csv(tmp_path, "path,labels", ["a;b", "", "a"])
    with pytest.raises(DatasetError, match=r"t\.csv.*empty list of labels.*row 3"):
        _data(csv, {"kind": "multi_label", "allow_empty": False})
    assert _data(csv, {"kind": "multi_label"}).data.labels[1].tolist() == [0, 0]  # allowed by default
    csv = _write_csv(tmp_path, "path,a,b", ["1,0", "1,2", "0,1"])
    with pytest.raises(DatasetError, match=r"row 3: b='2'.*0 or 1"):
        _data(csv, {"kind": "multi_label", "columns": ["a", "b"]})
    csv = _write_csv(tmp_path, "path,size,weight", ["1.5,2", "x,3", ",4", "nan,1", "2,inf"])
    with pytest.raises(DatasetError) as caught:
        _data(csv, {"kind": "regression", "columns": ["size", "weight"]})
    message = str(caught.value)
    for part in ("4 rows", "row 3: size='x' is not a number", "row 4: size='' is missing", "row 5: size='nan'",
                 "row 6: weight='inf'"):  # fmt: skip
        assert part in message, message
    with pytest.raises(DatasetError, match=r"no column \['target'\].*data\.target\.columns"):
        _data(csv, {"kind": "regression"})


def test_a_kind_a_source_cannot_give_is_refused_with_the_fix(stripes_folder):
    with pytest.raises(
        DatasetError, match=r"multi_label needs a CSV.*defective_polycrystalline.*one class per image"
    ):
        tk.ImageDataModule(source="folder", root=str(stripes_folder), target={"kind": "multi_label"})
    with pytest.raises(
        DatasetError, match=r"'defect_probability' task is regression.*data\.target\.kind: regression"
    ):
        tk.ImageDataModule(source="elpv", task="defect_probability")
    with pytest.raises(
        ConfigError, match=r"sampler: balanced does not apply to data\.target\.kind: regression"
    ):
        tk.ImageDataModule(
            source="elpv",
            task="defect_probability",
            target={"kind": "regression"},
            loader={"sampler": "balanced"},
        )


def test_elpv_label_sets_share_the_binary_tasks_cells_and_splits():
    sets = {
        "binary": "single_label",
        "cell_type": "single_label",
        "defective_polycrystalline": "multi_label",
        "defect_probability": "regression",
    }
    modules = {
        task: tk.ImageDataModule(source="elpv", task=task, target={"kind": kind})
        for task, kind in sets.items()
    }
    for dm in modules.values():
        dm.split_indices = None
    splits = {task: tk.data.splits.make_splits(dm.data, dm.settings.split, 0) for task, dm in modules.items()}
    for task in sets:
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(splits[task][split], splits["binary"][split])
    both = modules["defective_polycrystalline"].data.labels
    np.testing.assert_array_equal(both[:, 0], modules["binary"].data.labels)
    np.testing.assert_array_equal(both[:, 1], modules["cell_type"].data.labels)
    probability = modules["defect_probability"].data.labels[:, 0]
    assert sorted(np.unique(np.round(probability * 3)).tolist()) == [0, 1, 2, 3]


def test_multi_label_splits_and_folds_share_out_every_label(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):  # a rare label c (10 images) beside common a and b
        names = [n for n, p in (("a", 0.5), ("b", 0.3)) if rng.random() < p] + (["c"] if i % 12 == 0 else [])
        rows.append(";".join(names))
    dm = _data(_write_csv(tmp_path, "path,labels", rows), {"kind": "multi_label"})
    dm.setup("fit")
    rare = {split: int(dm.split_targets(split)[:, 2].sum()) for split in ("train", "val", "test")}
    assert rare["train"] >= 6 and rare["val"] >= 1 and rare["test"] >= 1, rare
    folds = [
        tk.data.splits.cv_split_indices(dm.data, 3, fold, 0.2, seed=0) for fold in range(3)
    ]  # every non-test image validates once, and every fold's validation holds the rare label
    validated = np.concatenate([f["val"] for f in folds])
    assert len(validated) == len(set(validated.tolist())) == len(folds[0]["train"]) + len(folds[0]["val"])
    assert all(dm.data.labels[f["val"], 2].sum() >= 2 for f in folds)


# --- the model: its kind, its loss, its checkpoint -------------------------------------------------


def test_settings_a_kind_cannot_use_are_refused_with_why():
    cases = [
        (dict(target="multi_label", mixing={"cutmix_alpha": 1.0}), r"model\.mixing.*cut out the only object"),
        (
            dict(target="regression", loss={"class_weights": "auto"}),
            r"class_weights does not apply to a regression",
        ),
        (dict(target="single_label", loss={"pos_weight": "auto"}), r"pos_weight does not apply"),
        (
            dict(target="multi_label", regularisation={"label_smoothing": 0.1}),
            r"label_smoothing does not apply",
        ),
        (dict(target="regression", prediction={"calibrate": True}), r"gives numbers, not probabilities"),
        (
            dict(target="multi_label", prediction={"decision_threshold": "f1"}),
            r"fits one threshold per label",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False, **kwargs)
    one = tk.TransferClassifier(num_classes=1, target="regression", backbone=TINY_BACKBONE, pretrained=False)
    assert one(torch.rand(2, 3, 32, 32)).shape == (2, 1)
    with pytest.raises(ConfigError, match=r"single_label model\) must be an integer >= 2"):
        tk.TransferClassifier(num_classes=1, backbone=TINY_BACKBONE, pretrained=False)


def test_the_loss_follows_the_kind_never_the_labels_shape():
    torch.manual_seed(0)
    outputs = torch.randn(4, 2)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    multi = tk.TransferClassifier(
        num_classes=2, target="multi_label", backbone=TINY_BACKBONE, pretrained=False
    )
    single = tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(outputs, targets)
    assert multi.loss(outputs, targets) == pytest.approx(bce.item())
    # 2-D targets are class distributions to a single-label model (soft labels): its soft cross-entropy
    distributions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.25, 0.75]])
    soft = -(distributions * outputs.log_softmax(dim=-1)).sum(dim=-1).mean()
    assert single.loss(outputs, distributions) == pytest.approx(soft.item())
    with pytest.raises(
        ConfigError, match=r"multi-label model of 2 labels takes targets of shape \(batch, 2\)"
    ):
        multi.loss(outputs, torch.tensor([0, 1, 1, 0]))
    weighted = tk.TransferClassifier(
        num_classes=2,
        target="multi_label",
        loss={"pos_weight": [3.0, 1.0]},
        backbone=TINY_BACKBONE,
        pretrained=False,
    )
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        outputs, targets, pos_weight=torch.tensor([3.0, 1.0])
    )
    assert weighted.loss(outputs, targets) == pytest.approx(expected.item())


def test_thresholds_move_with_the_validation_data_and_keep_half_where_it_is_too_thin():
    rng = np.random.default_rng(0)
    truth = (rng.random((200, 2)) < 0.5).astype(int)
    low = np.where(truth == 1, rng.uniform(0.2, 0.4, truth.shape), rng.uniform(0.0, 0.2, truth.shape))
    high = low + 0.5
    assert all(0.15 < t < 0.25 for t in fit_label_thresholds(low, truth).label_thresholds)
    assert all(0.65 < t < 0.75 for t in fit_label_thresholds(high, truth).label_thresholds)
    thin = truth.copy()
    thin[:, 1] = 0
    thin[:3, 1] = 1  # three positives: too few to fit a threshold on
    fitted = fit_label_thresholds(low, thin)
    assert fitted.label_fitted == [True, False] and fitted.label_thresholds[1] == 0.5
    assert "0.5 kept: too few validation positives" in fitted.describe()


@pytest.mark.slow
def test_multi_label_training_recovers_the_planted_labels_and_stores_its_thresholds(squares_csv, tmp_path):
    L.seed_everything(0)
    dm = _data(squares_csv, {"kind": "multi_label"})
    model = _model(dm)
    results = _trainer(tmp_path, 8).finetune(model, datamodule=dm)
    assert results["test"]["test_map"] >= 0.85, results["test"]  # chance: each label's share, 0.5
    assert results["test"]["test_f1_macro"] >= 0.75, results["test"]
    stored = read_checkpoint(results["best_checkpoint"])["transferkit"]
    assert stored["target"] == {"kind": "multi_label", "names": ["blue", "red"]}
    thresholds = stored["calibration"]["label_thresholds"]
    assert len(thresholds) == 2 and stored["calibration"]["label_fitted"] == [True, True]
    loaded = tk.TransferClassifier.from_checkpoint(results["best_checkpoint"])
    assert loaded.settings.target == "multi_label" and loaded.calibration.label_thresholds == thresholds
    dm.setup("test")
    images, truth = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        probs = loaded.predict_proba(images)
    decided = loaded.predict_labels(probs)
    np.testing.assert_array_equal(decided.numpy(), (probs.numpy() >= np.asarray(thresholds)).astype(int))
    assert (decided.numpy() == truth.numpy()).mean() >= 0.8
    # a single-label model cannot take this checkpoint, and says why
    with pytest.raises(
        tk.errors.CheckpointMismatchError, match=r"target: checkpoint multi_label, model single_label"
    ):
        single = tk.TransferClassifier(
            num_classes=2, backbone=TINY_BACKBONE, pretrained=False, head={"hidden_dims": [64]}
        )
        single.on_load_checkpoint(read_checkpoint(results["best_checkpoint"]))


@pytest.mark.slow
def test_regression_targets_are_standardised_on_train_and_predicted_in_their_own_units(tmp_path):
    csv = make_squares_csv(tmp_path / "sq", count=200)
    text = csv.read_text().splitlines()
    # the same brightness in other units: 1000 + 500 * level, so a model that forgot to undo the scaling is far off
    rows = [text[0] + ",grams"] + [
        f"{line},{1000 + 500 * float(line.rsplit(',', 1)[1]):.3f}" for line in text[1:]
    ]
    csv.write_text("\n".join(rows) + "\n")
    L.seed_everything(0)
    dm = _data(csv, {"kind": "regression", "columns": ["grams"]})
    model = _model(dm)
    results = _trainer(tmp_path / "run", 8).finetune(model, datamodule=dm)
    train = dm.split_targets("train")[:, 0]
    stored = read_checkpoint(results["best_checkpoint"])["transferkit"]["target"]
    assert stored["mean"][0] == pytest.approx(train.mean(), rel=1e-5)
    assert stored["std"][0] == pytest.approx(train.std(), rel=1e-4)
    assert results["test"]["test_r2"] >= 0.5, results["test"]
    assert results["test"]["test_mae"] <= 0.5 * np.abs(train - train.mean()).mean(), results["test"]
    loaded = tk.TransferClassifier.from_checkpoint(results["best_checkpoint"])
    images, truth = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        values = loaded.predict_proba(images)[:, 0].numpy()
    assert 1000 <= values.mean() <= 1500 and np.corrcoef(values, truth[:, 0].numpy())[0, 1] > 0.8


def test_a_model_and_data_of_different_kinds_are_refused_before_training(squares_csv, tmp_path):
    dm = _data(squares_csv, {"kind": "regression", "columns": ["level"]})
    model = tk.TransferClassifier(
        num_classes=1, target="multi_label", backbone=TINY_BACKBONE, pretrained=False
    )
    with pytest.raises(
        ConfigError, match=r"data's targets are regression.*model is multi_label.*target='regression'"
    ):
        _trainer(tmp_path, 1).fit(model, datamodule=dm)


@pytest.mark.slow
def test_finetune_from_a_recipe_hands_the_kind_to_the_model(squares_csv, tmp_path):
    recipe = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False},
        "model": {"backbone": TINY_BACKBONE, "pretrained": False, "head": {"hidden_dims": [32]}},
        "data": {
            "source": "csv",
            "csv_path": str(squares_csv),
            "target": {"kind": "regression", "columns": ["level"]},
            "pipeline": {
                "augment": "none",
                **{k: list(v) if isinstance(v, tuple) else v for k, v in NORM.items()},
            },
            "loader": {"num_workers": 0, "batch_size": 16},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    from transferkit.cli import main

    assert main(["finetune", "--config", str(path)]) == 0
    (metrics,) = list((tmp_path / "run").rglob("metrics.json"))
    import json

    figures = json.loads(metrics.read_text())
    assert set(figures["test"]) >= {"test_mae", "test_rmse", "test_r2", "test_loss"}
    assert figures["target"]["kind"] == "regression" and figures["target"]["names"] == ["level"]


def test_a_streaming_pack_of_another_kind_is_refused_before_anything_is_written(squares_csv, tmp_path):
    from transferkit.data.stream import pack_stream

    dm = _data(squares_csv, {"kind": "multi_label"})
    with pytest.raises(
        ConfigError, match=r"pack-data packs one class per image.*multi_label.*train from its CSV"
    ):
        pack_stream(dm, tmp_path / "pack")
    assert not (tmp_path / "pack").exists()


def test_test_scores_count_the_decisions_of_the_stored_thresholds_not_half():
    from sklearn.metrics import f1_score

    from transferkit.models.calibration import Calibration
    from transferkit.models.scoring import Scoring
    from transferkit.models.tasks import create_task

    task = create_task("multi_label", ["a", "b"])
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.2], [0.85, 0.4], [0.3, 0.15], [0.92, 0.6]])
    truth = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    calibration = Calibration(fitted_on="val", label_thresholds=[0.9, 0.1])
    decided = task.decide(probs, calibration)
    assert decided.tolist() == [[1, 0], [0, 1], [0, 1], [0, 1], [1, 1]]
    scoring = Scoring(task)
    logits = torch.logit(probs)
    (metrics, _), *_ = scoring.update("test", logits, truth, decided, logits[None], probs, task)
    computed = metrics.compute()
    expected = f1_score(truth.numpy(), decided.numpy(), average="macro")
    at_half = f1_score(truth.numpy(), (probs >= 0.5).long().numpy(), average="macro")
    assert computed["test_f1_macro"].item() == pytest.approx(expected) and expected != pytest.approx(at_half)


def test_a_regression_loss_in_bfloat16_standardises_its_targets_in_float32():
    model = tk.TransferClassifier(
        num_classes=1, target="regression", backbone=TINY_BACKBONE, pretrained=False
    )
    model.task.prepare(np.asarray([[1003.1], [1250.37], [1497.6]]))
    targets = torch.tensor([[1250.37], [1003.1]])
    perfect = model.task.standardise(targets)
    # outputs in bf16 carry their own rounding (about 4e-3 here); targets rounded to bf16 first would add 0.01
    assert model.loss(perfect.bfloat16(), targets).item() < 2e-5
    assert model.task.values(perfect.bfloat16()).dtype == torch.float32


def test_more_settings_a_kind_ignores_are_refused():
    with pytest.raises(ConfigError, match=r"model\.loss\.huber_delta does not apply"):
        tk.TransferClassifier(
            num_classes=1,
            target="regression",
            loss={"huber_delta": 2.0},
            backbone=TINY_BACKBONE,
            pretrained=False,
        )
    huber = tk.TransferClassifier(
        num_classes=1,
        target="regression",
        loss={"regression": "huber", "huber_delta": 2.0},
        backbone=TINY_BACKBONE,
        pretrained=False,
    )
    assert huber.settings.loss.huber_delta == 2.0
    from transferkit.data.targets import TargetSettings

    with pytest.raises(ConfigError, match=r"data\.target\.names must be a list of distinct label names"):
        TargetSettings(kind="multi_label", names=["a", "a"])
    with pytest.raises(ConfigError, match=r"data\.target\.separator must be ';' unless"):
        TargetSettings(kind="multi_label", columns=["a"], separator="|")
    with pytest.raises(ConfigError, match=r"data\.target\.allow_empty must be true unless"):
        TargetSettings(kind="regression", allow_empty=False)
    with pytest.raises(DatasetError, match=r"data\.target\.columns says how a CSV holds its targets; ELPV"):
        tk.ImageDataModule(
            source="elpv", task="defect_probability", target={"kind": "regression", "columns": ["p"]}
        )


def test_tools_refuse_a_model_and_data_of_different_kinds(squares_csv, tmp_path):
    dm = _data(squares_csv, {"kind": "regression", "columns": ["level"]})
    dm.setup("fit")
    labels = tk.TransferClassifier(
        num_classes=1, target="multi_label", backbone=TINY_BACKBONE, pretrained=False
    )
    with pytest.raises(ConfigError, match=r"data's targets are regression.*model is multi_label"):
        tk.interpret(labels, dm, out=str(tmp_path / "i"), split="val")
    with pytest.raises(ConfigError, match=r"data's targets are regression.*model is multi_label"):
        tk.lr_find(labels, dm, out=str(tmp_path / "lr.png"))
    classes = tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    multi = _data(squares_csv, {"kind": "multi_label"})
    with pytest.raises(ConfigError, match=r"data's targets are multi_label.*model is single_label"):
        L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False).fit(classes, datamodule=multi)
