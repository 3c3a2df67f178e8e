"""Paired differences over seeds: the one rule every accuracy comparison here reports.

Two recipes (or one recipe scored two ways) are compared seed by seed, on the same cells: the per-seed
differences (variant minus base), their mean and their standard deviation. A mean inside its spread
(``|mean| <= std``) is no difference; with one seed there is no spread, and nothing lies beyond it.

    >>> paired_difference([0.80, 0.82, 0.84], [0.85, 0.84, 0.88])
    {'per_seed': [0.05, 0.02, 0.04], 'mean': 0.0367, 'std': 0.0153, 'beyond_the_spread': True}
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def paired_difference(base: Sequence[float], variant: Sequence[float], digits: int = 4) -> dict:
    """``variant[i] - base[i]`` for each seed ``i``, their mean and std (``nan`` for one seed), and whether
    the mean lies beyond the std."""
    if not base or len(base) != len(variant):
        raise ValueError(f"need one base and one variant score per seed, got {len(base)} and {len(variant)}")
    diffs = [v - b for b, v in zip(base, variant, strict=True)]
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return {
        "per_seed": [round(d, digits) for d in diffs],
        "mean": round(mean, digits),
        "std": round(std, digits),
        "beyond_the_spread": len(diffs) > 1 and abs(mean) > std,
    }
