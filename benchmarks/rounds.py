"""Ratios measured in rounds: the one summary every benchmark script reports.

A benchmark times the two things it compares alternately in one process (A, B, A, B, ...), one pair per
round, so a slow moment of the machine hits both sides of a round. ``per_round_ratio`` reports the median
of the per-round ratios, their range, and every round's ratio. The ratio of the best times (or rates),
which a quiet spell in one round can inflate, may be shown beside it, never instead of it.

    >>> per_round_ratio([2.0, 2.2, 1.8], [1.0, 1.0, 1.0])
    {'median': 2.0, 'range': [1.8, 2.2], 'per_round': [2.0, 2.2, 1.8]}
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def per_round_ratio(numerators: Sequence[float], denominators: Sequence[float], digits: int = 3) -> dict:
    """``numerators[i] / denominators[i]`` for each round ``i``: their median, ``[min, max]`` and each."""
    if not numerators or len(numerators) != len(denominators):
        raise ValueError(
            f"need one numerator and one denominator per round, got {len(numerators)} and {len(denominators)}"
        )
    ratios = [n / d for n, d in zip(numerators, denominators, strict=True)]
    return {
        "median": round(statistics.median(ratios), digits),
        "range": [round(min(ratios), digits), round(max(ratios), digits)],
        "per_round": [round(r, digits) for r in ratios],
    }
