"""The ELPV benchmark scores a model the way the protocol in shared/DESIGN.md defines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "elpv_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "elpv.py"
)
elpv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(elpv)


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
