"""The ELPV benchmark scores a model the way the protocol in shared/DESIGN.md defines."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def _benchmark(script: str, module_name: str | None = None):
    """The module of ``benchmarks/<script>.py`` (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(module_name or script, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


elpv = _benchmark("elpv", "elpv_benchmark")


def test_elpv_scores_split_binary_errors_by_annotated_defect_level():
    # eight cells, two per annotated level (0, 1/3, 2/3, 1), one mono and one poly each
    level = np.repeat([0.0, 1 / 3, 2 / 3, 1.0], 2)
    labels = np.rint(level * 3).astype(int)
    cell_type = np.array(["mono", "poly"] * 4)
    probs = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],  # 0 -> 0: right
            [0.2, 0.2, 0.3, 0.3],  # 0 -> defective (0.6 on the two defective classes): binary error
            [0.3, 0.4, 0.2, 0.1],  # 1/3 -> functional: right
            [0.1, 0.6, 0.2, 0.1],  # 1/3: right
            [0.1, 0.45, 0.4, 0.05],  # 2/3: argmax 1/3, but 0.45 defective -> functional: binary error
            [0.1, 0.35, 0.3, 0.25],  # 2/3: argmax 1/3, yet 0.55 defective -> defective: right
            [0.0, 0.0, 0.1, 0.9],  # 1: right
            [0.0, 0.0, 0.2, 0.8],  # 1: right
        ]
    )
    scores = elpv._scores(probs, labels, "4class", cell_type, level)
    assert scores["acc_4class"] == pytest.approx(5 / 8)
    assert scores["acc_binary"] == pytest.approx(6 / 8)
    assert scores["acc_binary_p0"] == pytest.approx(0.5)
    assert scores["acc_binary_p1_3"] == pytest.approx(1.0)
    assert scores["acc_binary_p2_3"] == pytest.approx(0.5)
    assert scores["acc_binary_p1"] == pytest.approx(1.0)
    assert scores["acc_binary_mono"] == pytest.approx(3 / 4)
    assert scores["acc_binary_poly"] == pytest.approx(3 / 4)

    # a binary model: the second column is P(defective)
    binary = np.stack([1 - probs[:, 2:].sum(1), probs[:, 2:].sum(1)], axis=1)
    scores = elpv._scores(binary, (level >= 0.5).astype(int), "binary", cell_type, level)
    assert scores["acc_binary"] == pytest.approx(6 / 8)
    assert scores["acc_binary_p2_3"] == pytest.approx(0.5)


def _report(val: list[float], test: list[float]) -> dict:
    return {
        "seeds": [
            {"val": {"acc_binary": v}, "test": {"acc_binary": t}} for v, t in zip(val, test, strict=True)
        ]
    }


def test_the_variant_is_chosen_on_validation_even_when_test_says_otherwise():
    reports = {
        "baseline": _report(val=[0.86, 0.88], test=[0.90, 0.91]),  # better on test
        "variant": _report(val=[0.89, 0.90], test=[0.85, 0.86]),  # better on validation
    }
    chosen, means = elpv.select_on_validation(reports)
    assert chosen == "variant"
    assert means == pytest.approx({"baseline": 0.87, "variant": 0.895})
    # it reads nothing but validation: reports without test figures choose the same
    val_only = {name: {"seeds": [{"val": s["val"]} for s in r["seeds"]]} for name, r in reports.items()}
    assert elpv.select_on_validation(val_only)[0] == "variant"


@pytest.mark.slow
def test_a_recipes_test_split_is_scored_once_unless_rerun_is_asked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# a comment\nmodel:\n  lr: 0.001\n")
    fingerprint = elpv.recipe_fingerprint(str(recipe), [])
    ledger = tmp_path / "ledger.jsonl"
    elpv.check_test_allowed(fingerprint, [0, 1], rerun=False, ledger=ledger)  # nothing scored yet
    record = {"date_utc": "2026-01-01T00:00:00+00:00", "commit": "abc"}
    elpv.record_test_look(record, str(recipe), [], fingerprint, 1, False, 0.9, ledger=ledger)
    assert json.loads(ledger.read_text())["test_acc_binary"] == 0.9
    with pytest.raises(SystemExit, match=r"seeds \[1\] was already scored.*--rerun"):
        elpv.check_test_allowed(fingerprint, [0, 1, 2], rerun=False, ledger=ledger)
    elpv.check_test_allowed(fingerprint, [0, 2], rerun=False, ledger=ledger)  # other seeds: fine
    # a declared re-run, which says which seeds it scores again (their ledger lines say rerun: true)
    assert elpv.check_test_allowed(fingerprint, [0, 1], rerun=True, ledger=ledger) == [1]
    # comments do not change the recipe; a setting or an override does
    recipe.write_text("# another comment\nmodel:\n  lr: 0.001\n")
    assert elpv.recipe_fingerprint(str(recipe), []) == fingerprint
    assert elpv.recipe_fingerprint(str(recipe), ["--trainer.max_epochs", "2"]) != fingerprint
    recipe.write_text("model:\n  lr: 0.002\n")
    assert elpv.recipe_fingerprint(str(recipe), []) != fingerprint

    # the test split is scored with the checkpoint the recipe's own run tests, never one picked otherwise
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "elpv.py"
    refused = subprocess.run(
        [sys.executable, str(script), "--test", "--checkpoint", "last", "--seeds", "0"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "drop --checkpoint" in refused.stderr


RESULTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*.json*"))
PROVENANCE = ("commit", "command", "date_utc", "machine", "versions")


def _provenances(path: Path) -> list[tuple[str, dict]]:
    """(where, provenance) in a results file: its ``provenance``, or for a ``.jsonl`` each record's (the test
    ledger's lines carry theirs at the top level)."""
    text = path.read_text()
    if path.suffix == ".json":
        return [(path.name, json.loads(text)["provenance"])]
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [(f"{path.name} record {i}", r.get("provenance", r)) for i, r in enumerate(records)]


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_says_where_it_comes_from(path):
    for where, record in _provenances(path):
        if path.name == "elpv-test-ledger.jsonl":  # one line per look at a test split
            assert record["config"] and (record["commit"] or "commit" in record.get("not_recorded", [])), (
                where
            )
            if "not_recorded" in record:  # written before the ledger kept these: said, not guessed
                assert all(record[key] is None for key in record["not_recorded"]), where
            else:
                assert record["command"].startswith("python benchmarks/") and record["machine"], where
                assert isinstance(record["uncommitted_changes"], bool), where
            continue
        if path.name == "published-anchors.json":  # figures copied from papers, each with its citation
            assert record.get("published") and record.get("source"), where
            continue
        assert all(key in record for key in PROVENANCE), (where, sorted(record))
        assert len(record["commit"]) == 40, where
        assert "uncommitted_changes" in record, f"{where} does not say whether the tree was clean"
        if record.get("reconstructed"):  # rebuilt afterwards, and it says how
            assert record["how"] and (record["machine"].get("description") or record["machine"].get("gpu")), (
                where
            )
        else:  # written by benchmarks/provenance.py when the figures were measured
            assert record["date_utc"].startswith("20"), where
            assert record["command"].startswith("python benchmarks/"), where
            assert record["machine"]["cpu"] and record["machine"]["cores"] >= 1, where
            assert record["versions"]["torch"] and record["versions"]["lightning"], where
            assert isinstance(record["uncommitted_changes"], bool), where


def test_provenance_records_this_checkout_and_the_command():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "elpv.py"
    record = elpv.provenance([str(script), "--seeds", "0", "--tta", "d 4"])
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    assert record["commit"] == head.stdout.strip()
    assert (
        record["command"] == "python benchmarks/elpv.py --seeds 0 --tta 'd 4'"
    )  # from the root, shell-quoted
    assert record["machine"]["cores"] == os.cpu_count()
    assert record["versions"]["torch"] == torch.__version__.split("+")[0]


def test_a_speed_up_is_the_median_of_per_round_ratios_not_best_over_best():
    rounds = _benchmark("rounds")
    # round 2 of the new side ran in a quiet spell: best-over-best says 1.2x, the rounds say no change
    new_rates, old_rates = [10.0, 12.0, 9.0], [10.0, 10.0, 9.0]
    summary = rounds.per_round_ratio(new_rates, old_rates)
    assert max(new_rates) / max(old_rates) == pytest.approx(1.2)
    assert summary == {"median": 1.0, "range": [1.0, 1.2], "per_round": [1.0, 1.2, 1.0]}
    with pytest.raises(ValueError, match="one numerator and one denominator per round"):
        rounds.per_round_ratio([1.0, 2.0], [1.0])


def test_a_paired_difference_is_no_difference_inside_its_spread():
    paired = _benchmark("paired")
    base = [0.80, 0.82, 0.84, 0.86]
    # better on average by 0.01, but two seeds up and two down: inside the spread
    mixed = paired.paired_difference(base, [0.83, 0.80, 0.87, 0.85])
    assert mixed["per_seed"] == [0.03, -0.02, 0.03, -0.01] and mixed["mean"] == pytest.approx(0.0075)
    assert mixed["std"] == pytest.approx(0.0263, abs=1e-4) and not mixed["beyond_the_spread"]
    steady = paired.paired_difference(
        base, [b + d for b, d in zip(base, [0.01, 0.012, 0.009, 0.011], strict=True)]
    )
    assert steady["beyond_the_spread"] and steady["mean"] == pytest.approx(0.0105)
    one = paired.paired_difference([0.8], [0.9])  # one seed: no spread, nothing beyond it
    assert one["per_seed"] == [0.1] and not one["beyond_the_spread"] and one["std"] != one["std"]
    with pytest.raises(ValueError, match="one base and one variant score per seed"):
        paired.paired_difference([0.8, 0.9], [0.8])


def test_combined_seeds_must_each_be_on_the_test_ledger_and_of_one_recipe(tmp_path):
    combine = _benchmark("combine_elpv")

    def results(name, commit, scores):
        runs = [{"seed": s, "val": {"acc_binary": 0.8}, "test": {"acc_binary": a}} for s, a in scores.items()]
        report = {"config": "r.yaml", "overrides": [], "seeds": runs, "provenance": {"commit": commit}}
        (tmp_path / name).write_text(json.dumps(report))
        return str(tmp_path / name)

    ledger = tmp_path / "ledger.jsonl"
    lines = [{"commit": "c1", "seed": 0, "recipe": "r", "test_acc_binary": 0.9}]
    lines += [{"commit": "c1", "seed": 1, "recipe": "r", "test_acc_binary": 0.8}]
    ledger.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first, second = results("a.json", "c1", {0: 0.9}), results("b.json", "c1", {1: 0.8})
    report = combine.combine([first, second], ledger=ledger)
    assert [run["seed"] for run in report["seeds"]] == [0, 1] and report["recipe"] == "r"
    assert report["summary"]["test.acc_binary"] == {"mean": 0.85, "std": 0.0707, "n": 2}
    with pytest.raises(SystemExit, match="seed 0 is in more than one file"):
        combine.combine([first, first], ledger=ledger)
    made_up = results("c.json", "c1", {2: 0.99})  # a score no --test run recorded
    with pytest.raises(SystemExit, match="seed 2's test accuracy 0.99 is not in the test ledger"):
        combine.combine([first, made_up], ledger=ledger)


def test_the_cv_benchmark_scores_the_estimate_the_ensemble_and_calibration_on_paired_images():
    elpv_cv = _benchmark("elpv_cv")
    rng = np.random.default_rng(0)
    test_labels = rng.integers(0, 4, 400)

    def overconfident(labels: np.ndarray, noise_seed: int) -> np.ndarray:
        # logits 70 % right, scaled x4: probabilities far surer than the model is right
        noise = np.random.default_rng(noise_seed).normal(size=(len(labels), 4))
        logits = 4.0 * (1.2 * np.eye(4)[labels] + noise)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    folds = []
    for fold in range(3):
        val_labels = rng.integers(0, 4, 200)
        folds.append(
            {
                "val_probs": overconfident(val_labels, 10 + fold),
                "val_label": val_labels,
                "test_index": np.arange(400),
                "test_label": test_labels,
                "test_probs": overconfident(test_labels, 20 + fold),
            }
        )
    report = elpv_cv.analyse(folds)
    single = [((f["test_probs"].argmax(1) == test_labels).mean()) for f in folds]
    assert report["test"]["fold_models_acc"]["mean"] == pytest.approx(np.mean(single))
    # independent errors: the averaged probabilities beat every single fold model on the same images
    assert report["test"]["ensemble"]["acc"] > max(single)
    assert report["test"]["ensemble_gain_acc"]["mean"] > 0
    binary = ((folds[0]["test_probs"][:, 2:].sum(1) >= 0.5) == (test_labels >= 2)).mean()
    assert report["folds"][0]["test"]["acc_binary"] == pytest.approx(binary)
    # temperatures fitted on each fold's validation part soften the over-confident test probabilities
    calibration = report["calibration"]
    assert calibration["temperature"]["mean"] > 1.5
    assert (
        calibration["fold_models_test_ece_after"]["mean"] < calibration["fold_models_test_ece_before"]["mean"]
    )
    assert (
        calibration["fold_models_test_nll_after"]["mean"] < calibration["fold_models_test_nll_before"]["mean"]
    )
    assert report["estimate"]["non_test_images"] == 600
    # a fold that scored other test images is not part of the same cross-validation
    folds[1]["test_index"] = np.arange(1, 401)
    with pytest.raises(SystemExit, match="other test images"):
        elpv_cv.analyse(folds)


def test_augment_search_agreement_ranks_the_search_against_paired_full_runs():
    agreement = _benchmark("augment_search_agreement")

    def full(scores):
        return {"seeds": [{"seed": s, "val": {"acc_binary": a}} for s, a in enumerate(scores)]}

    def trial(candidate, loss, acc):
        return {"candidate": candidate, "val_loss": [loss, loss + 0.002], "val_acc": [acc, acc]}

    search = {
        "trials": [
            trial({"Affine": {"p": 0.7}}, 0.30, 0.86),
            trial("none", 0.31, 0.85),
            trial("baseline", 0.32, 0.84),
            trial({"__class_fullname__": "transferkit.data.policies.RandAugment"}, 0.33, 0.83),
        ],
        "noise_val_loss": 0.002,
    }
    base = [0.84, 0.80, 0.86, 0.82, 0.83]
    runs = {
        "baseline": full(base),
        "Affine": full([a + 0.04 + d for a, d in zip(base, [0, 0.01, -0.01, 0.005, 0], strict=True)]),
        "none": full([a + 0.01 * (-1) ** s for s, a in enumerate(base)]),  # +-0.01: inside its spread
        "RandAugment": full([a - 0.03 for a in base]),
    }
    result = agreement.agreement(search, runs)
    rows = {r["pipeline"]: r for r in result["pipelines"]}
    assert [r["pipeline"] for r in result["pipelines"]] == ["Affine", "none", "baseline", "RandAugment"]
    assert rows["Affine"]["full_diff_mean"] == pytest.approx(0.041)
    assert rows["Affine"]["full_diff_per_seed"] == pytest.approx([0.04, 0.05, 0.03, 0.045, 0.04])
    # the full runs order Affine > none ~ baseline > RandAugment, as the search does (none: +0.002 mean)
    assert result["search_by_val_loss_vs_full"]["spearman"] == pytest.approx(1.0)
    assert result["search_winner"] == "Affine" and result["full_winners"] == ["Affine"]
    assert result["full_differences_beyond_spread"] == ["Affine", "RandAugment"]
    assert "Spearman +1.00" in agreement.table(result)
    # the opposite order of the search: a correlation of -1
    reversed_search = {
        "trials": [trial(t["candidate"], 1 - t["val_loss"][0], t["val_acc"][0]) for t in search["trials"]]
    }
    assert agreement.agreement(reversed_search, runs)["search_by_val_loss_vs_full"][
        "spearman"
    ] == pytest.approx(-1.0)
    # pairs need the same seeds, and every trial needs its full runs
    # a tie in the full runs is a shared rank, not an order the search gets right by luck
    tied = agreement.agreement(search, {**runs, "RandAugment": runs["baseline"]})
    ranks = {r["pipeline"]: r["full_rank"] for r in tied["pipelines"]}
    assert ranks["baseline"] == ranks["RandAugment"] == 3
    assert tied["search_by_val_loss_vs_full"]["spearman"] < 1.0
    # two candidates of one transform cannot be told apart by name
    twice = {"trials": [*search["trials"], trial({"Affine": {"p": 0.3}}, 0.35, 0.8)]}
    with pytest.raises(SystemExit, match="two candidates of Affine"):
        agreement.agreement(twice, runs)
    with pytest.raises(SystemExit, match="RandAugment's full runs are of seeds"):
        agreement.agreement(search, {**runs, "RandAugment": full([0.8, 0.8])})
    with pytest.raises(SystemExit, match=r"the search tried \['none'\] but no --full"):
        agreement.agreement(search, {k: v for k, v in runs.items() if k != "none"})


def test_the_frontier_holds_the_recipes_no_other_beats_on_both_accuracy_and_time():
    tta = _benchmark("time_to_accuracy")
    runs = [
        {"recipe": name, "seed": seed, "test_acc_binary": acc + 0.01 * seed, "wall_seconds": wall}
        for name, acc, wall in [
            ("quick", 0.84, 200),
            ("slow-better", 0.88, 1000),
            ("slow-worse", 0.83, 900),
            ("as-good-slower", 0.88, 1100),  # as accurate as slow-better, slower: dominated
        ]
        for seed in (0, 1)
    ]
    rows = {r["recipe"]: r for r in tta.summarise(runs)}
    assert rows["quick"]["test_acc_binary_mean"] == pytest.approx(0.845)
    assert rows["quick"]["wall_seconds_max"] == 200
    assert {name for name, r in rows.items() if r["on_frontier"]} == {"quick", "slow-better"}
    # each later recipe is paired with the first on the same seeds: the gain, and whether it beats the spread
    assert "against_first" not in rows["quick"]
    assert rows["slow-better"]["against_first"]["per_seed"] == pytest.approx([0.04, 0.04])
    assert rows["slow-better"]["against_first"]["beyond_the_spread"] is True
    assert rows["slow-worse"]["against_first"]["mean"] == pytest.approx(-0.01)


def test_time_to_accuracy_pairs_recipes_only_on_the_seeds_both_ran_and_tells_noise_from_a_gain():
    tta = _benchmark("time_to_accuracy")
    runs = [
        {"recipe": "quick", "seed": 0, "test_acc_binary": 0.86, "wall_seconds": 160},
        {"recipe": "quick", "seed": 1, "test_acc_binary": 0.88, "wall_seconds": 160},
        {"recipe": "quick", "seed": 2, "test_acc_binary": 0.87, "wall_seconds": 160},
        {"recipe": "noisy", "seed": 0, "test_acc_binary": 0.88, "wall_seconds": 500},
        {"recipe": "noisy", "seed": 1, "test_acc_binary": 0.86, "wall_seconds": 500},
        {"recipe": "one-seed", "seed": 0, "test_acc_binary": 0.90, "wall_seconds": 900},
    ]
    rows = {r["recipe"]: r for r in tta.summarise(runs)}
    noisy = rows["noisy"]["against_first"]
    assert noisy["seeds"] == [0, 1] and noisy["per_seed"] == pytest.approx([0.02, -0.02])
    assert noisy["beyond_the_spread"] is False
    assert "against_first" not in rows["one-seed"]  # one common seed has no spread to judge by


def test_time_to_accuracy_holds_auto_budgets_as_entries_with_their_slowest_seed_against_the_budget():
    tta = _benchmark("time_to_accuracy")
    runs = [{"recipe": "quick", "seed": s, "test_acc_binary": 0.87, "wall_seconds": 290} for s in (0, 1)]
    runs += [
        {
            "recipe": "auto --budget 5m",
            "seed": seed,
            "test_acc_binary": acc,
            "wall_seconds": wall,
            "budget_s": 300.0,
            "auto": {"rung": rung},
        }
        for seed, acc, wall, rung in [(0, 0.88, 270, "top4 x9 epochs"), (1, 0.89, 315, "top4 x8 epochs")]
    ]
    rows = {r["recipe"]: r for r in tta.summarise(runs)}
    auto = rows["auto --budget 5m"]
    assert auto["wall_over_budget_max"] == pytest.approx(1.05)  # the slowest seed, not the mean
    assert auto["rungs"] == ["top4 x8 epochs", "top4 x9 epochs"]
    assert auto["against_first"]["per_seed"] == pytest.approx([0.01, 0.02])
    assert "budget_s" not in rows["quick"]
    # the recipe to beat at a budget is the most accurate whose slowest seed fits it
    assert auto["against_best_fitting"]["recipe"] == "quick"
    runs[0]["wall_seconds"] = 301  # the quick start no longer fits 5 minutes: nothing to pair with
    assert "against_best_fitting" not in {r["recipe"]: r for r in tta.summarise(runs)}["auto --budget 5m"]


@pytest.mark.slow
def test_time_to_accuracy_times_a_fresh_finetune_and_puts_its_test_look_on_the_ledger(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_accuracy.py"
    out, ledger = tmp_path / "results" / "r.json", tmp_path / "ledger.jsonl"  # a folder not made yet
    tiny = [
        "--data.split.max_samples",
        "160",
        "--trainer.max_epochs",
        "1",
        "--data.pipeline.image_size",
        "64",
    ]
    base = [sys.executable, str(script), "--recipes", "recipes/quickstart.yaml", "--seeds", "0"]
    base += ["--ledger", str(ledger), "--runs-dir", str(tmp_path / "runs")]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([*base, "--out", str(out), "--", *tiny], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    # the whole command was timed (interpreter start to results), more than its training alone
    assert run["wall_seconds"] > run["fit_seconds"] > 0
    assert 0.0 <= run["test_acc_binary"] <= 1.0
    # what the command printed: the quick start trains on ELPV's 4 classes and prints their binary groups too
    assert run["test_acc_4class"] == pytest.approx(run["test_acc_printed"], abs=1e-6)
    assert run["test_acc_binary"] == pytest.approx(run["test_group_acc_printed"], abs=1e-6)
    assert out.with_suffix(".png").is_file()
    (line,) = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert line["seed"] == 0 and line["recipe"] == run["fingerprint"]
    # its test split is on the ledger: a second look needs --rerun; a resumed file looks at nothing
    again = subprocess.run([*base, "--", *tiny], capture_output=True, text=True, cwd=root)
    assert again.returncode != 0 and "--rerun" in again.stderr
    resumed = subprocess.run(
        [*base, "--resume", str(out), "--", *tiny], capture_output=True, text=True, cwd=root
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["runs"] == report["runs"]
    assert len(ledger.read_text().splitlines()) == 1

    # rescore_elpv.py scores the best checkpoint on the same validation split again: with no TTA it gives
    # the validation accuracy that training logged for that checkpoint's epoch
    rescore = [
        sys.executable,
        str(root / "benchmarks" / "rescore_elpv.py"),
        "--config",
        "recipes/quickstart.yaml",
    ]
    rescore += ["--runs", str(tmp_path / "runs" / "quickstart"), "--seeds", "0", "--tta", "none", "hflip"]
    done = subprocess.run([*rescore, "--", *tiny], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    rescored = json.loads(done.stdout)
    (metrics,) = (tmp_path / "runs" / "quickstart" / "seed0").rglob("metrics.csv")
    logged = [line.split(",") for line in metrics.read_text().splitlines()]
    column = logged[0].index("val_group_acc")
    (val_group_acc,) = [float(row[column]) for row in logged[1:] if row[column]]
    assert rescored["seeds"][0]["val"]["none"]["acc_binary"] == pytest.approx(val_group_acc, abs=1e-6)
    assert rescored["summary"]["none"]["difference_mean"] == 0.0
    assert 0.0 <= rescored["summary"]["hflip"]["acc_binary_mean"] <= 1.0
    assert rescored["overrides"] == tiny


def test_depth_heads_pairs_each_head_with_the_quick_start_seed_by_seed():
    depth_heads = _benchmark("depth_heads")
    runs = [
        {"seed": 0, "heads": {"top": {"val_acc": 0.80}, "top3": {"val_acc": 0.90}}},
        {"seed": 1, "heads": {"top": {"val_acc": 0.82}, "top3": {"val_acc": 0.84}}},
        {"seed": 2, "heads": {"top": {"val_acc": 0.78}, "top3": {"val_acc": 0.86}}},
    ]
    summary = depth_heads.paired(runs, {0: 0.81, 1: 0.80, 2: 0.79})
    # top: -0.01, +0.02, -0.01 -> mean 0, inside its spread; top3: +0.09, +0.04, +0.07 -> beyond it
    assert summary["top"]["minus_quickstart_per_seed"] == [-0.01, 0.02, -0.01]
    assert summary["top"]["beyond_spread"] is False
    assert summary["top3"]["minus_quickstart_mean"] == pytest.approx(0.0667, abs=1e-4)
    assert summary["top3"]["beyond_spread"] is True

    # a head on well-separated features is fitted on the training cells and scores the validation ones
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    x = rng.normal(size=(120, 5)) + 3 * y[:, None]
    probs, c = depth_heads.fit_head(x[::2], y[::2], x[1::2])
    assert probs.shape == (60, 2) and c in depth_heads.CS
    assert ((probs[:, 1] >= 0.5) == y[1::2]).mean() > 0.95


@pytest.mark.slow
def test_compare_elpv_pairs_two_recipes_seed_by_seed_across_files(tmp_path: Path):
    root = Path(__file__).resolve().parents[1]

    def results(name: str, scores: dict[int, float]) -> str:
        runs = [{"seed": s, "val": {"acc_binary": a, "macro_f1_binary": a - 0.1}} for s, a in scores.items()]
        (tmp_path / name).write_text(json.dumps({"seeds": runs}))
        return str(tmp_path / name)

    base = results("base.json", {0: 0.80, 1: 0.82, 2: 0.84})
    first, rest = results("v01.json", {0: 0.85, 1: 0.84}), results("v2.json", {2: 0.88})
    script = [sys.executable, str(root / "benchmarks" / "compare_elpv.py"), "--base", base]
    done = subprocess.run([*script, "--variant", first, rest], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["seeds"] == [0, 1, 2]
    assert report["acc_binary"]["difference_per_seed"] == [0.05, 0.02, 0.04]
    assert report["acc_binary"]["difference_mean"] == pytest.approx(0.0367, abs=1e-4)
    assert report["acc_binary"]["beyond_the_spread"] is True  # +0.037 against a std of 0.015
    assert report["provenance"]["command"].startswith("python benchmarks/compare_elpv.py --base ")

    twice = subprocess.run([*script, "--variant", first, first], capture_output=True, text=True, cwd=root)
    assert twice.returncode != 0 and "seed 0 is in two files of one recipe" in twice.stderr


@pytest.mark.slow
def test_val_curves_reads_each_runs_epochs_and_draws_them(tmp_path: Path):
    root = Path(__file__).resolve().parents[1]

    def run(name: str, values: list[float]) -> None:
        folder = tmp_path / name / "lightning_logs" / "version_0"
        folder.mkdir(parents=True)
        rows = ["epoch,step,train_loss_step,val_group_acc"]
        for epoch, value in enumerate(values):  # a training row without the metric, then validation's
            rows += [f"{epoch},{epoch * 10 + 5},0.9,", f"{epoch},{epoch * 10 + 9},,{value}"]
        (folder / "metrics.csv").write_text("\n".join(rows) + "\n")

    run("plain0", [0.80, 0.45, 0.85])
    run("plain1", [0.82, 0.55, 0.87])
    run("precise0", [0.80, 0.83, 0.86])
    out = tmp_path / "curves.json"
    command = [
        sys.executable,
        str(root / "benchmarks" / "val_curves.py"),
        "--runs",
        f"running={tmp_path}/plain*",
        "--runs",
        f"precise={tmp_path}/precise0",
        "--metric",
        "val_group_acc",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["curves"]["running"]["mean"] == {"0": 0.81, "1": 0.5, "2": 0.86}
    assert report["curves"]["running"]["min"]["1"] == 0.45
    assert report["curves"]["precise"]["mean"]["1"] == 0.83
    assert out.with_suffix(".png").stat().st_size > 10_000

    missing = subprocess.run([*command[:-2], "--metric", "val_f1"], capture_output=True, text=True, cwd=root)
    assert missing.returncode != 0 and "no 'val_f1' column" in missing.stderr


@pytest.mark.slow
def test_ensemble_elpv_scores_the_averaged_probabilities_of_members_on_the_same_cells(tmp_path: Path):
    root = Path(__file__).resolve().parents[1]
    labels = np.array([0, 1, 2, 3])  # one cell per annotated level

    def member(name: str, probs: list[list[float]], cells=labels) -> str:
        npz = tmp_path / f"{name}.npz"
        np.savez(
            npz,
            val_probs_none=np.array(probs),
            val_labels=cells,
            val_cell_type=np.array(["mono", "poly"] * 2),
            val_defect_probability=cells / 3,
        )
        scored = {"acc_binary": 0.75, "macro_f1_binary": 0.7}  # what the member scored alone
        runs = [{"seed": s, "val": scored, "probabilities_file": str(npz)} for s in (0, 1)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"seeds": runs}))
        return str(tmp_path / f"{name}.json")

    # each member calls one functional cell defective (0.6); averaged, both are outvoted (0.3 and 0.35)
    a = member("a", [[0.2, 0.2, 0.3, 0.3], [0.6, 0.3, 0.1, 0.0], [0.1, 0.1, 0.4, 0.4], [0.0, 0.1, 0.1, 0.8]])
    b = member("b", [[0.9, 0.1, 0.0, 0.0], [0.1, 0.3, 0.3, 0.3], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.2, 0.8]])
    script = [sys.executable, str(root / "benchmarks" / "ensemble_elpv.py"), "--members", a, b]
    done = subprocess.run(script, capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert [s["seed"] for s in report["seeds"]] == [0, 1]
    assert report["seeds"][0]["members_acc_binary"] == [0.75, 0.75]
    assert report["seeds"][0]["val"]["acc_binary"] == 1.0
    assert report["seeds"][0]["val"]["acc_binary_p1_3"] == 1.0  # scored per level as elpv.py scores
    assert report["against_base"]["acc_binary"]["difference_per_seed"] == [0.25, 0.25]  # base: member a

    other = member("c", [[0.25] * 4] * 4, cells=np.array([0, 0, 2, 3]))  # another split's cells
    refused = subprocess.run([*script[:-2], a, other], capture_output=True, text=True, cwd=root)
    assert refused.returncode != 0 and "members scored different validation cells" in refused.stderr
    Path(json.loads(Path(b).read_text())["seeds"][0]["probabilities_file"]).unlink()
    gone = subprocess.run(script, capture_output=True, text=True, cwd=root)
    assert gone.returncode != 0 and "is gone" in gone.stderr


def test_the_selection_protocol_tests_allow_for_folds_that_share_training_images():
    from scipy import stats

    paired = _benchmark("paired")
    diffs = [0.02, 0.01, 0.03, 0.00, 0.02, 0.01, 0.02, 0.03, 0.01, 0.02]  # 5 folds x 2 seeds
    corrected = paired.corrected_t(diffs, n_train=1574, n_test=394)  # ELPV's non-test cells in 5 folds
    plain = stats.ttest_1samp(diffs, 0.0)
    # the same differences are weaker evidence once the folds' overlap is allowed for
    assert corrected["p"] > plain.pvalue and corrected["t"] < plain.statistic
    assert corrected["p"] == pytest.approx(0.014, abs=0.001) and corrected["df"] == 9
    with pytest.raises(ValueError, match="at least 2 paired differences"):
        paired.corrected_t([0.01], 100, 25)
    # an A/A comparison's spread gives the smallest gain the design resolves; more runs resolve less
    aa = [0.01, -0.01, 0.005, -0.005, 0.0, 0.01]
    assert paired.smallest_resolved_gain(aa * 3, 1574, 394) < paired.smallest_resolved_gain(aa, 1574, 394)
    # more seeds resolve smaller gains, but never below the floor the shared training images set
    many = aa * 400  # the same spread over many seeds
    floor = paired.resolved_gain_floor(many, 1574, 394)
    srg = paired.smallest_resolved_gain
    assert floor < srg(many, 1574, 394) < srg(aa * 3, 1574, 394)
    assert srg(many, 1574, 394) == pytest.approx(floor, rel=0.02)

    # McNemar over the pooled out-of-fold cells: only the cells the two disagree on count
    same = paired.mcnemar([True] * 50 + [False] * 10, [True] * 50 + [False] * 10)
    assert same["p"] == 1.0 and same["difference"] == 0.0
    better = paired.mcnemar([False] * 30 + [True] * 70, [True] * 28 + [False] * 2 + [True] * 70)
    assert better["variant_only"] == 28 and better["base_only"] == 0 and better["p"] < 1e-6

    # several knobs judged at once: Holm's adjustment never lowers a p-value and keeps their order
    raw = {"cosine": 0.01, "smoothing": 0.04, "bn_eval": 0.30}
    adjusted = paired.holm(raw)
    assert adjusted == {"cosine": 0.03, "smoothing": 0.08, "bn_eval": 0.3}
    assert all(adjusted[k] >= raw[k] for k in raw)


def _cv_folder(root, predictions: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """A cross-validation output folder as `transferkit cv` writes it: fold_<k>/cv_predictions.npz."""
    for k, (index, labels, probs) in enumerate(predictions):
        (root / f"fold_{k}").mkdir(parents=True)
        np.savez(
            root / f"fold_{k}" / "cv_predictions.npz",
            val_index=index, val_label=labels, val_probs=probs, val_pred=probs.argmax(1),
        )  # fmt: skip
    return str(root)


def test_cross_validated_comparison_pairs_folds_by_their_cells_and_scores_groups(tmp_path):
    compare_cv = _benchmark("compare_cv")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    folds = [np.arange(k * 20, (k + 1) * 20) for k in range(3)]

    def run(name: str, right: float) -> str:  # a run that gets about `right` of the classes right
        probs = np.full((60, 4), 0.05)
        hit = rng.random(60) < right
        chosen = np.where(hit, labels, (labels + 1) % 4)
        probs[np.arange(60), chosen] = 0.85
        return _cv_folder(tmp_path / name, [(i, labels[i], probs[i]) for i in folds])

    base = [run("base0", 0.6), run("base1", 0.6)]
    variant = [run("var0", 0.95), run("var1", 0.95)]
    report = compare_cv.compare(base, variant)
    assert report["design"] == {"folds": 3, "seeds": 2, "cells_per_seed": 60}
    assert len(report["seeds"]) == 2 and len(report["seeds"][0]["per_fold_difference"]) == 3
    assert report["corrected_t"]["mean"] > 0.2 and report["corrected_t"]["p"] < 0.05
    assert report["seeds"][0]["mcnemar"]["variant_only"] > report["seeds"][0]["mcnemar"]["base_only"]
    # the same runs against themselves: an A/A comparison finds nothing
    same = compare_cv.compare(base, base)
    assert same["corrected_t"]["mean"] == 0 and same["corrected_t"]["p"] == 1.0
    # scored by groups of classes (ELPV's defective = levels 2 and 3)
    grouped = compare_cv.compare(base, variant, positive=[2, 3])
    assert grouped["scored"] == "group of classes [2, 3]" and grouped["seeds"][0]["variant_accuracy"] > 0.9
    # folds that validate on other cells are not paired
    shuffled = _cv_folder(
        tmp_path / "other", [(i[::-1], labels[i[::-1]], np.full((20, 4), 0.25)) for i in folds]
    )
    with pytest.raises(SystemExit, match="validate on other cells"):
        compare_cv.compare([base[0]], [shuffled])


def test_a_selection_variant_can_name_a_file_made_per_seed():
    selection = _benchmark("selection")
    command = selection.cv_command(
        "recipes/quickstart.yaml", 5, Path("runs/x"), 1, 1, ["data.split.exclude=runs/doctor/s{seed}/top.csv"]
    )
    assert command[-2:] == ["--data.split.exclude", "runs/doctor/s1/top.csv"]


def test_selection_judges_several_knobs_at_once_with_holms_adjustment_and_resumes(
    tmp_path, monkeypatch, capsys
):
    selection = _benchmark("selection")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    folds = [np.arange(k * 40, (k + 1) * 40) for k in range(5)]

    def finished_run(name: str, right: float) -> None:  # a cross-validation already run
        probs = np.full((200, 4), 0.05)
        chosen = np.where(rng.random(200) < right, labels, (labels + 1) % 4)
        probs[np.arange(200), chosen] = 0.85
        folder = Path(_cv_folder(tmp_path / "runs" / name, [(i, labels[i], probs[i]) for i in folds]))
        (folder / "cv.json").write_text("{}")

    for seed in (0, 1):
        finished_run(f"base-s{seed}", 0.6)
        finished_run(f"a-a-s{seed}", 0.6)
        finished_run(f"better-s{seed}", 0.95)
        finished_run(f"same-s{seed}", 0.6)
    ran, real_run = [], subprocess.run

    def no_training(command, *args, **kwargs):  # git (for the provenance) runs; cross-validation must not
        if "transferkit" in command:
            ran.append(command)
            return None
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(selection.subprocess, "run", no_training)
    out = tmp_path / "report.json"
    argv = ["selection.py", "--config", "recipes/quickstart.yaml", "--folds", "5", "--seeds", "0", "1",
            "--variant", "better", "model.x=1", "--variant", "same", "model.y=2",
            "--runs", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    selection.main()
    # runs made before their records were kept are checked once by transferkit cv (it reads finished
    # folds back and refuses another recipe), and say they are reconstructed
    assert len(ran) == 8 and all("--folds" in command for command in ran)
    report = json.loads(out.read_text())
    assert report["runs"]["base-s0"]["reconstructed"] is True
    ran.clear()
    selection.main()
    assert ran == []  # now every folder holds a record of its own command: nothing runs again
    report = json.loads(out.read_text())
    assert report["design"] == {"folds": 5, "seeds": 2, "cells_per_seed": 200}
    better, same = report["variants"]["better"], report["variants"]["same"]
    assert better["judged"] == "gain" and same["judged"] == "no difference"
    # Holm: the smaller p-value of two is doubled, the larger is at least that
    p = sorted([better["corrected_t"]["p"], same["corrected_t"]["p"]])
    assert better["holm_p"] == pytest.approx(min(1.0, 2 * p[0]), abs=1e-6)
    assert same["holm_p"] == pytest.approx(max(min(1.0, 2 * p[0]), p[1]), abs=1e-6)
    assert report["a_a"]["smallest_resolved_gain"] > 0
    # a folder of another command is refused, not reused
    argv[argv.index("model.x=1")] = "model.x=2"
    with pytest.raises(SystemExit, match="holds a cross-validation of another command"):
        selection.main()
    # reserved and repeated variant names are refused
    monkeypatch.setattr(
        sys, "argv", [*argv[:7], "--variant", "base", "model.z=1", "--runs", str(tmp_path / "r")]
    )
    with pytest.raises(SystemExit, match="variant names must differ"):
        selection.main()
    # an unfinished run is run with the variant's settings, its seed as training and data seed
    command = selection.cv_command("r.yaml", 5, tmp_path / "x", 1, 1, ["model.lr_schedule.name=exponential"])
    assert command[-6:] == [
        "--seed_everything",
        "1",
        "--data.seed",
        "1",
        "--model.lr_schedule.name",
        "exponential",
    ]
    with pytest.raises(SystemExit, match="key=value"):
        selection.cv_command("r.yaml", 5, tmp_path / "x", 0, 0, ["model.lr"])
    # a run that does train keeps its record beside it: the command as typed, the time it took
    record = selection.run(command, tmp_path / "x")
    assert ran[-1] == command
    assert record["command"].startswith("python -m transferkit cv --config r.yaml --folds 5")
    assert record["wall_s"] >= 0 and json.loads((tmp_path / "x" / "provenance.json").read_text()) == record


def test_compare_cv_pairs_regression_runs_only_as_decisions_and_multi_label_runs_label_by_label(tmp_path):
    compare_cv = _benchmark("compare_cv")
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 1, (40, 1)).astype(np.float32)

    def write(folder: Path, kind: str, label: np.ndarray, pred: np.ndarray) -> str:
        decided = (pred >= 0.5).astype(np.float32) if kind == "multi_label" else pred  # as cv writes them
        for fold in range(2):
            where = folder / f"fold_{fold}"
            where.mkdir(parents=True)
            cells = slice(fold * 20, fold * 20 + 20)
            np.savez(
                where / "cv_predictions.npz", val_index=np.arange(40)[cells], val_label=label[cells],
                val_probs=pred[cells], val_pred=decided[cells], kind=np.asarray(kind),
            )  # fmt: skip
        return str(folder)

    good = write(tmp_path / "good", "regression", truth, truth + 0.05)
    poor = write(tmp_path / "poor", "regression", truth, 1 - truth)
    with pytest.raises(SystemExit, match=r"errors are not right or wrong: give --threshold"):
        compare_cv.compare([good], [poor])
    report = compare_cv.compare([poor], [good], threshold=0.5)
    assert report["seeds"][0]["variant_accuracy"] > 0.9 > 0.2 > report["seeds"][0]["base_accuracy"]
    labels = (rng.uniform(0, 1, (40, 2)) < 0.5).astype(np.float32)
    right = write(tmp_path / "right", "multi_label", labels, labels * 0.8 + 0.1)
    half = write(
        tmp_path / "half", "multi_label", labels, np.stack([labels[:, 0] * 0.8 + 0.1, 1 - labels[:, 1]], 1)
    )
    report = compare_cv.compare([half], [right])
    # one of the two labels is always wrong in the base: no image has every label right, against all of them
    assert report["seeds"][0]["base_accuracy"] == 0.0 and report["seeds"][0]["variant_accuracy"] == 1.0


def test_auto_rules_keep_a_costlier_rung_only_where_the_other_datasets_found_it_better():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    rules = _benchmark("auto_rules")
    ladder = [r.name for r in rules.LADDER]
    # on a and b the third rung beats the first two, the fourth is no better than the third; c disagrees
    scores = {"a": [0.70, 0.72, 0.80, 0.79], "b": [0.60, 0.58, 0.70, 0.70], "c": [0.9, 0.95, 0.5, 0.99]}
    records = [
        {"dataset": d, "rung": {"name": ladder[i]}, "val_acc": acc}
        for d, values in scores.items()
        for i, acc in enumerate(values)
    ]
    chosen = rules.leave_one_out(records, ["a", "b", "c"])
    assert chosen["c"]["on"] == ["a", "b"]
    assert chosen["c"]["ladder"] == [ladder[0], ladder[2]]  # chosen without c's own scores
    # held out a: b and c's means are 0.75, 0.765, 0.60, 0.845: rungs 0, 1 and 3 kept
    assert chosen["a"]["ladder"] == [ladder[0], ladder[1], ladder[3]]
    assert all(not row["kept"] for row in chosen["a"]["rows"][4:])  # not run on every other dataset


def test_auto_rules_weigh_candidate_rungs_from_a_file_and_refuse_a_stored_run_of_another_rung(tmp_path):
    from dataclasses import asdict

    from transferkit.tuning.auto import load_ladder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    rules = _benchmark("auto_rules")
    ladder = load_ladder(
        Path(__file__).resolve().parents[1] / "benchmarks/configs/auto-ladder-candidates.yaml"
    )
    names = [r.name for r in ladder]
    assert (
        names.index("lite0-192-top4")
        < names.index("lite0-192-top5-augmented")
        < names.index("lite0-224-top5-augmented")
    )
    # a rung between top 4 and the augmented top 5 that the other datasets found better is kept
    accs = {name: 0.5 + 0.01 * i for i, name in enumerate(names)}
    records = [{"dataset": d, "rung": {"name": n}, "val_acc": a} for d in ("a", "b") for n, a in accs.items()]
    chosen = rules.leave_one_out(records, ["a", "b"], ladder)
    assert "lite0-192-top5-augmented" in chosen["a"]["ladder"]
    assert len(chosen["a"]["rows"]) == len(ladder)

    # a stored run is read back only for the rung it ran: another rung under the same name is refused
    rung = ladder[names.index("lite0-192-top4")]
    folder = tmp_path / f"elpv-{rung.name}-s0"
    folder.mkdir()
    other = asdict(rung) | {"unfrozen_epochs": 9}
    (folder / "record.json").write_text(json.dumps({"rung": other, "val_acc": 0.9}))
    with pytest.raises(SystemExit, match="holds a run of another rung named 'lite0-192-top4'"):
        rules.run_rung("elpv", rung, {}, 0, tmp_path)
    (folder / "record.json").write_text(json.dumps({"rung": asdict(rung), "val_acc": 0.9}))
    assert rules.run_rung("elpv", rung, {}, 0, tmp_path)["val_acc"] == 0.9
