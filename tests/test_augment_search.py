"""augment-search: candidates ranked against the recipe's pipeline on cached features, in a budget."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_BACKBONE, make_stripes_folder, run_cli

import transferkit as tk


@pytest.mark.slow
def test_a_label_destroying_candidate_ranks_last_and_the_winner_is_a_usable_recipe_snippet(tmp_path):
    root = make_stripes_folder(tmp_path / "stripes", per_class=60)
    candidates = [{"HorizontalFlip": {"p": 0.5}}, {"Transpose": {"p": 1.0}}]  # Transpose swaps the label
    (tmp_path / "candidates.yaml").write_text(yaml.safe_dump(candidates))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {backbone: tf_efficientnet_lite0, pretrained: bundled, head: {hidden_dims: []}, optimizer: {lr: 0.01}}\n"
        f"data: {{source: folder, root: {root}, pipeline: {{image_size: 64, augment: none}}, loader: {{num_workers: 0, batch_size: 16}}}}\n"
        f"trainer: {{default_root_dir: {tmp_path / 'run'}}}\n"
    )
    out = tmp_path / "search"
    result = run_cli(
        "augment-search", "--config", str(recipe), "--candidates", str(tmp_path / "candidates.yaml"),
        "--budget", "10m", "--epochs", "4", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads((out / "augment_search.json").read_text())
    names = [t["name"] for t in found["trials"]]
    assert len(names) == 3 and names[-1] == "+ Transpose(p=1.0)"  # ranked by validation loss
    transpose = found["trials"][-1]
    assert max(transpose["val_acc"]) < 0.5 < min(found["trials"][0]["val_acc"])  # it teaches the wrong label
    assert all(len(t["val_loss"]) == 2 for t in found["trials"])  # two seeds each, paired
    assert "baseline seeds spread" in result.stdout and (out / "augment_search.png").is_file()
    winner = yaml.safe_load((out / "augment_search.yaml").read_text())["data"]["pipeline"]["augment"]
    assert "Transpose" not in json.dumps(winner)
    tk.ImageDataModule(
        source="folder", root=str(root), pipeline={"augment": winner or "none", "image_size": 32}
    )  # a valid recipe
    # the saved report reads back into the same report: the same ranking, table and snippet
    from transferkit.tuning.augment_search import AugmentSearchReport

    again = AugmentSearchReport.from_dict(found)
    assert again.to_dict() == found and again.trials[-1].name == "+ Transpose(p=1.0)"
    assert again.table().splitlines()[3].endswith("+ Transpose(p=1.0)")  # ranked last in the table too
    assert "baseline seeds spread" in again.table() and again.baseline.name == found["baseline"]
    with pytest.raises(tk.ConfigError, match="not an augment-search report"):
        AugmentSearchReport.from_dict({"trials": found["trials"]})


@pytest.mark.slow
def test_the_budget_stops_the_search_and_bad_candidates_are_refused_before_any_trial(tmp_path):
    dm = tk.ImageDataModule(
        source="digits", split={"max_samples": 200}, pipeline={"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}, loader={"num_workers": 0}, cache={"dir": str(tmp_path)},
    )  # fmt: skip
    model = tk.TransferClassifier(num_classes=10, backbone=TINY_BACKBONE, pretrained=False)
    with pytest.raises(tk.ConfigError, match="'Warp' is not an Albumentations transform"):
        tk.augment_search(model, dm, candidates=[{"HorizontalFlip": {"p": 0.5}}, {"Warp": {}}])
    with pytest.raises(tk.ConfigError, match="budget must be like 20m"):
        tk.augment_search(model, dm, budget="soon")
    report = tk.augment_search(model, dm, budget=0.001, epochs=1, repeats=1)
    # the 'light' preset already flips and applies an Affine: those candidates would measure nothing new
    assert report.in_recipe == [
        "+ HorizontalFlip(p=0.5)",
        "+ Affine(rotate=[-15, 15], translate_percent=[-0.05, 0.05], scale=[0.9, 1.1], p=0.7)",
    ]
    assert (
        len(report.trials) == 1 and len(report.skipped) == 10
    )  # the baseline ran, then the budget was spent
    assert "not tried (budget spent)" in report.table() and "already has the transform" in report.table()
