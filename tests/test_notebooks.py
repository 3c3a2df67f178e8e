"""The notebooks in notebooks/ run top to bottom in small mode, and show what they promise.

Each notebook's first code cell is tagged ``parameters`` and holds its size knobs with full-size
defaults; the test inserts a cell after it that sets small values (and an output directory in a tmp dir),
then executes the notebook with nbclient in the ``python3`` kernel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell

# small-mode parameters per notebook: together they run in a few minutes on 2 CPU cores
SMALL: dict[str, dict[str, Any]] = {
    "01_quickstart": {"max_epochs": 3, "max_samples": 500, "data_source": "digits", "image_size": 64},
    "02_augmentation": {
        "n_images": 2,
        "n_views": 3,
        "image_size": 96,
        "search_samples": 160,
        "search_budget": "60m",  # never reached: no candidate may be skipped for time
        "search_epochs": 1,
        "search_repeats": 2,
    },
    "03_freeze_schedules": {
        "max_epochs": 6,
        "max_samples": 300,
        "data_source": "digits",
        "image_size": 64,
        "augment": "none",
        "lr_find_steps": 30,
    },
    "04_vanishing_gradients": {"max_epochs": 2, "max_samples": 600},
    # 4 epochs: the recipe's 3 head-only epochs (on clean cached features) and one its augmentation reaches
    "05_elpv": {"max_samples": 160, "max_epochs": 4, "image_size": 64, "tta": "none"},
    "06_optimizers_and_schedules": {"max_epochs": 4, "max_samples": 500, "image_size": 32},
    "07_interpretation_and_cv": {"max_epochs": 3, "max_samples": 300, "image_size": 64, "folds": 3},
    "08_labels_and_numbers": {"images": 240, "image_size": 64, "max_epochs": 3},
}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def parameters_index(nb: nbformat.NotebookNode) -> int:
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    first = nb.cells[code[0]]
    assert "parameters" in first.metadata.get("tags", []), (
        "the first code cell must hold the size knobs and be tagged 'parameters'"
    )
    return code[0]


def execute(path: Path, parameters: dict[str, Any]) -> nbformat.NotebookNode:
    """Run the notebook with ``parameters`` set right after its parameters cell; cell errors raise."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    index = parameters_index(nb)
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},  # run from notebooks/, as Jupyter does
    )
    client.execute()
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def images_shown(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if output.output_type in ("execute_result", "display_data")
    )


# --- what each notebook must show ------------------------------------------------------------------


def check_01_quickstart(nb, out: Path) -> None:
    text = text_of(nb)
    accuracy = float(re.search(r"test accuracy: ([\d.]+)", text).group(1))
    majority = float(re.search(r"most frequent class: ([\d.]+)", text).group(1))
    # 10 digit classes, head trained on pretrained features: far above always answering one class
    assert accuracy > majority + 0.25, (accuracy, majority)
    assert (out / "01_quickstart" / "confusion_matrix.png").is_file()
    assert list((out / "01_quickstart").rglob("metrics.json"))
    assert images_shown(nb) >= 2  # the predicted images and the confusion matrix


def check_02_augmentation(nb, out: Path) -> None:
    folder = out / "02_augmentation"
    for name in ("none", "light", "medium", "heavy"):
        assert (folder / f"preset_{name}.png").is_file(), name
    assert (folder / "inline.png").is_file()
    for name in ("policy_photometric_safe", "policy_default", "mixup", "cutmix"):
        assert (folder / f"{name}.png").is_file(), name
    assert images_shown(nb) >= 10
    text = text_of(nb)
    assert "round trip through A.to_dict / A.from_dict: identical" in text
    # the search's table: the baseline and the four candidates ranked, each with a validation loss
    ranked = re.findall(r"^\s*(\d)\s+([\d.]+)\s+[+-][\d.]+\s+[\d.]+\s+\d+\s+(.+)$", text, re.M)
    assert sorted(int(r[0]) for r in ranked) == [1, 2, 3, 4, 5], text
    assert any(r[2].startswith("baseline") for r in ranked) and any(
        r[2] == "none (no augmentation)" for r in ranked
    )
    losses = [float(r[1]) for r in sorted(ranked)]
    assert losses == sorted(losses)  # ranked by validation loss, lowest first
    assert "baseline seeds spread" in text
    assert (folder / "augment_search" / "augment_search.png").is_file()
    assert "augment:" in (folder / "augment_search" / "augment_search.yaml").read_text()


def check_03_freeze_schedules(nb, out: Path) -> None:
    text = text_of(nb)
    # the plan: 2 head-only epochs, then one more group every 2 epochs
    assert (
        re.search(r"0-1\s+0/\d+", text)
        and re.search(r"2-3\s+1/\d+", text)
        and re.search(r"4-5\s+2/\d+", text)
    )
    assert "unfrozen at epochs [2, 4] (schedule), [2, 4] (logged)" in text
    assert (out / "03_freeze_schedules" / "learning_curves.png").is_file()
    assert re.search(r"head phase \(epoch 0\): lr = [\d.e-]+: ", text)
    assert re.search(r"backbone phase \(epoch 2\): backbone_lr = [\d.e-]+: ", text)
    assert (out / "03_freeze_schedules" / "lr_find.png").is_file()
    assert images_shown(nb) >= 2


def check_07_interpretation_and_cv(nb, out: Path) -> None:
    text = text_of(nb)
    folder = out / "07_interpretation_and_cv"
    nll = re.search(r"validation NLL ([\d.]+) -> ([\d.]+)", text)
    assert nll and float(nll.group(2)) <= float(nll.group(1))  # temperature scaling never raises it
    assert re.search(r"ECE before temperature scaling [\d.]+, after [\d.]+", text)
    for name in ("top_losses", "most_confident", "reliability", "confusion_normalised"):
        assert (folder / "interpretation" / f"{name}.png").is_file(), name
    cv = json.loads((folder / "cv" / "cv.json").read_text())
    assert len(cv["folds"]) == 3 and cv["ensemble_test_acc"] is not None
    # 10 digit classes from frozen pretrained features: every fold far above chance
    assert min(f["val_acc"] for f in cv["folds"]) > 0.3
    assert images_shown(nb) >= 2


def check_04_vanishing_gradients(nb, out: Path) -> None:
    text = text_of(nb)

    def diagnosed(setup: str) -> tuple[str, int]:
        """The verdict and the number of unhealthy layers in the diagnosis summary."""
        row = re.search(rf"^{re.escape(setup)}\s+(\w+)\s+(\d+)/12\s", text, re.MULTILINE)
        assert row, f"no diagnosis row for {setup}"
        return row.group(1), int(row.group(2))

    def final_accuracy(setup: str) -> float:
        row = re.search(rf"^{re.escape(setup)}\s+\w+\s+([\d.]+)\s+[\d.]+", text, re.MULTILINE)
        assert row, f"no training row for {setup}"
        return float(row.group(1))

    # 12 layers: N(0, 1) weights drive the sigmoids to their bounds; He + ELU + BatchNorm keeps all healthy
    assert diagnosed("sigmoid + N(0,1)")[0] != "healthy"
    assert diagnosed("sigmoid + Xavier")[0] == "vanishing"  # no saturation, but (1/4)^11 of the gradient
    assert diagnosed("ELU + He + BN") == ("healthy", 0)
    # and training agrees: 10 classes, so 0.1 is chance
    assert final_accuracy("ELU + He + BN") > 0.6
    assert final_accuracy("sigmoid + Xavier") < 0.2
    assert "stopped: non-finite loss" in text  # ReLU + N(0,1) blows up and the guard ends the run
    folder = out / "04_vanishing_gradients"
    for name in ("gradient_health_worst", "gradient_health_best", "learning_curves"):
        assert (folder / f"{name}.png").is_file(), name
    assert images_shown(nb) == 3
    assert re.search(r"^best after 2 epochs: .+ at [\d.]+ validation accuracy", text, re.MULTILINE)


def check_05_elpv(nb, out: Path) -> None:
    text = text_of(nb)
    assert "0.882" in text  # the stored 3-seed mean binary accuracy, read from benchmarks/results
    report = json.loads((out / "05_elpv" / "elpv-benchmark.json").read_text())
    (seed,) = report["seeds"]
    assert seed["split_sizes"]["test"] == 40  # 25 % of 160 cells, the protocol's test share
    # a comparison run: validation scored and shown, the test split left alone (and no ledger line)
    assert report["splits_scored"] == ["val"] and "test" not in seed
    assert f"{'val, s0':<14}{seed['val']['acc_binary']:>17.3f}" in text  # the row shows this run's score
    ledger = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "elpv-test-ledger.jsonl"
    assert str(out) not in ledger.read_text()


def check_06_optimizers_and_schedules(nb, out: Path) -> None:
    from transferkit.finetuning.optim import OPTIMIZERS, SCHEDULES

    text = text_of(nb)
    for name in (*OPTIMIZERS, *SCHEDULES):
        assert re.search(rf"^\s*{name}\s+[\d.]+\s+[\d.]+\s+[\d.]+", text, re.MULTILINE), name
    for family in ("optimizers", "schedules"):
        for curve in ("train_loss", "val_acc"):
            assert (out / "06_optimizers_and_schedules" / f"{family}_{curve}.png").is_file()
    assert images_shown(nb) == 4
    assert re.search(r"Adam: [\d.]+ best validation accuracy, rank \d of 8", text)
    assert "verdict:" in text


def check_08_labels_and_numbers(nb, out: Path) -> None:
    text = text_of(nb)
    printed = float(re.search(r"test mAP ([\d.]+)", text).group(1))
    # the per-label table's APs, computed apart with scikit-learn, average to the model's own test_map
    assert float(re.search(r"mean AP over labels: ([\d.]+)", text).group(1)) == pytest.approx(
        printed, abs=2e-3
    )
    table = re.findall(r"^\s+(\d)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    assert sorted(int(row[0]) for row in table) == list(range(10)), text
    assert all(0 < float(row[4]) < 1 for row in table)  # every threshold a probability
    assert re.search(r"test MAE [\d.]+, RMSE [\d.]+, R\^2 -?[\d.]+", text)
    # predictions are in the targets' own units: counts of 2-4 digits, not standardised values near 0
    scaling = re.search(r"'count': \(([\d.]+), ([\d.]+)\)", text)
    assert 2 <= float(scaling.group(1)) <= 4
    assert (out / "08_labels_and_numbers" / "regression_scatter.png").is_file()
    assert images_shown(nb) >= 1


CHECKS = {name[len("check_") :]: f for name, f in globals().items() if name.startswith("check_")}


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_committed_notebooks_are_clean(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    parameters_index(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                "commit notebooks with outputs stripped"
            )
    assert path.stem in SMALL, f"add small-mode parameters for {path.name} to SMALL in {Path(__file__).name}"


@pytest.mark.slow
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_in_small_mode(path: Path, tmp_path: Path):
    if path.stem not in SMALL:
        pytest.fail(f"add small-mode parameters for {path.name} to SMALL in {Path(__file__).name}")
    nb = execute(path, {**SMALL[path.stem], "output_dir": str(tmp_path)})
    check = CHECKS.get(path.stem)
    assert check is not None, f"add a check_{path.stem} that asserts what the notebook shows"
    check(nb, tmp_path)
