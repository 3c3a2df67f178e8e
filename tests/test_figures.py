"""Every figure quoted in README.md, docs/*.md and the recipe headers is the value at the results file and key
that docs/figures.yaml gives for it (benchmarks/figures.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _figures_module():
    spec = importlib.util.spec_from_file_location("benchmark_figures", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


figures = _figures_module()


def test_every_quoted_figure_equals_the_value_at_its_results_file_and_key():
    found = figures.problems()
    assert not found, (
        f"{len(found)} figures differ from their results files (benchmarks/figures.py check):\n"
        + "\n".join(found[:25])
    )


def test_the_index_covers_the_readme_the_docs_and_every_recipe_header():
    index = figures.read_index()
    for name in ("README.md", "docs/elpv.md", "docs/benchmarks.md", "recipes/quickstart.yaml"):
        assert index.get(name), f"docs/figures.yaml lists no figures of {name}"
    assert all(entry[1] and entry[2] for entries in index.values() for entry in entries)


# --- the reader and the check, on a small document of their own ------------------------------------------


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "runs.json").write_text(
        json.dumps(
            {
                "recipes": [
                    {
                        "recipe": "recipes/a.yaml",
                        "acc_mean": 0.8761,
                        "acc_std": 0.0071,
                        "wall_s": [162.4, 171.9],
                    },
                    {
                        "recipe": "recipes/b.yaml",
                        "acc_mean": 0.8884,
                        "acc_std": 0.0071,
                        "wall_s": [490.6, 568.1],
                    },
                ],
                "published": {"VGG-19 (2019)": 0.884},
                "speedup": 1.42,
            }
        )
    )
    (folder / "gpu.jsonl").write_text('{"step_ms": 12.5}\n{\n  "step_ms": 20.25\n}\n')
    monkeypatch.setattr(figures, "RESULTS", folder)
    monkeypatch.setattr(figures, "_loaded", {})
    return folder


DOC = """# Title

Recipe `recipes/b.yaml` reaches 0.888 +- 0.007 in 491-568 s (`runs.json`), against a published 0.884.
`recipes/a.yaml` reaches 0.876 +- 0.007, 1.42x faster; the learning rate is `0.001`.

```
python run.py --lr 0.0003 --out benchmarks/results/runs.json
```

A setting is written as code, `dropout: 0.5`, and is not a figure; neither are seeds 0-4.
"""


def test_the_reader_finds_figures_in_prose_and_leaves_code_and_settings_alone(results: Path, tmp_path: Path):
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    found = [(f.line, f.text, f.kind) for f in figures.figures_in(doc)]
    assert found == [
        (3, "0.888", "decimal"),
        (3, "0.007", "decimal"),
        (3, "491", "seconds"),
        (3, "568", "seconds"),
        (3, "0.884", "decimal"),
        (4, "0.876", "decimal"),
        (4, "0.007", "decimal"),
        (4, "1.42", "ratio"),
    ]


def test_the_reader_knows_units_ranges_lists_signs_and_thousands(tmp_path: Path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# T\n\n| head only | 0.65 | 3.52x (3.50-3.77) | 27.4 ms | 2,144.5 files/s | 15-21 minutes |\n"
        "Seeds took 172, 163 s and 1,059-1,111 s; \u22120.0051 and -1.25 % apart; peak 5,752 MB; `lr 3e-4`.\n"
    )
    found = [(f.text, f.kind) for f in figures.figures_in(doc)]
    assert found == [
        ("0.65", "decimal"), ("3.52", "ratio"), ("3.50", "decimal"), ("3.77", "decimal"),
        ("27.4", "milliseconds"), ("2,144.5", "rate"), ("15", "minutes"), ("21", "minutes"),
        ("172", "seconds"), ("163", "seconds"), ("1,059", "seconds"), ("1,111", "seconds"),
        ("-0.0051", "decimal"), ("-1.25", "percent"), ("5,752", "memory"),
    ]  # fmt: skip
    percent = next(f for f in figures.figures_in(doc) if f.kind == "percent")
    assert (
        figures.matches(percent, -0.0125)
        and figures.matches(percent, -1.251)
        and not figures.matches(percent, -0.013)
    )


def test_annotate_picks_the_record_the_line_names_and_check_then_passes(results: Path, tmp_path: Path):
    doc, index = tmp_path / "doc.md", tmp_path / "figures.yaml"
    doc.write_text(DOC)
    assert figures.annotate(index, docs=[doc]) == {"kept": 0, "resolved": 8, "unresolved": 0}
    keys = [entry[2] for entry in figures.read_index(index)["doc.md"]]
    # 0.007 is the spread of both recipes and 0.884 is a published figure too: the line decides
    assert keys == [
        "recipes[1].acc_mean",
        "recipes[1].acc_std",
        "recipes[1].wall_s[0]",
        "recipes[1].wall_s[1]",
        'published["VGG-19 (2019)"]',
        "recipes[0].acc_mean",
        "recipes[0].acc_std",
        "speedup",
    ]
    # each key was found by its value: a guess, and the check fails until someone has read it
    guessed = figures.problems(index, docs=[doc])
    assert len(guessed) == 8 and all("was guessed" in p for p in guessed)
    _confirm(index)
    assert figures.problems(index, docs=[doc]) == []


def _confirm(index: Path) -> None:
    """Delete the "guessed" marks, as a reader does who has checked the keys."""
    index.write_text(index.read_text().replace(', "guessed"]', "]"))


def test_equal_figures_on_one_line_keep_their_own_keys(results: Path, tmp_path: Path):
    doc, index = tmp_path / "doc.md", tmp_path / "figures.yaml"
    doc.write_text("# T\n\nSpreads of a and b: 0.007 and 0.007 (`runs.json`).\n")
    figures.annotate(index, docs=[doc])
    entries = figures.read_index(index)["doc.md"]
    entries[0][1:] = ["runs.json", "recipes[0].acc_std", entries[0][3]]  # set by a reader
    entries[1][1:] = ["runs.json", "recipes[1].acc_std", entries[1][3]]
    index.write_text("doc.md:\n" + "".join(f"  - {json.dumps(e)}\n" for e in entries))
    figures.annotate(index, docs=[doc])  # run again: each keeps its own key
    assert [e[2] for e in figures.read_index(index)["doc.md"]] == ["recipes[0].acc_std", "recipes[1].acc_std"]
    assert figures.problems(index, docs=[doc]) == []


def test_a_reworded_line_keeps_the_keys_its_figures_had(results: Path, tmp_path: Path):
    doc, index = tmp_path / "doc.md", tmp_path / "figures.yaml"
    doc.write_text(DOC)
    figures.annotate(index, docs=[doc])
    _confirm(index)
    keys = [e[2] for e in figures.read_index(index)["doc.md"]]
    doc.write_text(DOC.replace("reaches 0.876 +- 0.007", "scores 0.876 +- 0.007 on a 2-core Intel Xeon"))
    assert figures.annotate(index, docs=[doc])["kept"] == 8
    assert [e[2] for e in figures.read_index(index)["doc.md"]] == keys
    assert figures.problems(index, docs=[doc]) == []


def test_the_check_fails_when_a_figure_or_its_file_changes(results: Path, tmp_path: Path):
    doc, index = tmp_path / "doc.md", tmp_path / "figures.yaml"
    doc.write_text(DOC)
    figures.annotate(index, docs=[doc])
    _confirm(index)

    doc.write_text(DOC.replace("0.876 +- 0.007", "0.879 +- 0.007"))  # a figure edited by hand
    assert any("0.879" in p and "annotate" in p for p in figures.problems(index, docs=[doc]))

    doc.write_text(DOC)
    (results / "runs.json").write_text((results / "runs.json").read_text().replace("0.8761", "0.8712"))
    figures._loaded.clear()  # the results file re-measured: the quoted figure is now wrong
    assert any(
        p.endswith("is 0.8712 at runs.json:recipes[0].acc_mean") for p in figures.problems(index, docs=[doc])
    )


def test_a_figure_with_no_results_file_near_it_is_reported(results: Path, tmp_path: Path):
    doc, index = tmp_path / "doc.md", tmp_path / "figures.yaml"
    doc.write_text("# Title\n\nIt reaches 0.912 on every seed.\n")
    assert figures.annotate(index, docs=[doc])["unresolved"] == 1
    (problem,) = figures.problems(index, docs=[doc])
    assert "doc.md:3: 0.912 names no results file and key" in problem


def test_derived_figures_are_worked_out_from_keys_and_nothing_else(results: Path):
    assert figures.derive(
        "{runs.json:recipes[1].acc_mean} - {runs.json:recipes[0].acc_mean}"
    ) == pytest.approx(0.0123)
    assert figures.derive("{gpu.jsonl:[1].step_ms} / {gpu.jsonl:[0].step_ms}") == pytest.approx(1.62)
    with pytest.raises(ValueError, match="not an arithmetic expression"):
        figures.derive("__import__('os').getcwd()")


def test_the_documents_name_the_cpu_model_of_their_figures_not_just_a_2_core_cpu():
    # the same recipe takes other times on an Intel Xeon and an AMD EPYC, both 2-core: "a 2-core CPU" is
    # not a machine; a figure whose CPU was not recorded says so
    vague = re.compile(r"\b2-core CPU\b|\bthis (?:2-core )?CPU\b|\bthis machine\b")
    for document in figures.documents():
        for n, line in enumerate(document.read_text().splitlines(), 1):
            if vague.search(line) and "not recorded" not in line:
                raise AssertionError(f"{document.name}:{n} names no CPU model: {line.strip()}")
