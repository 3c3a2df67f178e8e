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


# --- the cross-validated selection protocol's tests (docs/elpv.md) --------------------------------------


def corrected_t(differences: Sequence[float], n_train: int, n_test: int) -> dict:
    """Nadeau and Bengio's corrected resampled t-test of paired differences from k-fold cross-validation
    repeated over seeds (one difference per fold and seed). The folds share most of their training images,
    so their differences are correlated and the plain t-test's variance ``s^2 / J`` is too small: the
    correction uses ``s^2 * (1/J + n_test/n_train)`` (Nadeau & Bengio, 2003, Machine Learning 52).

    Returns the mean difference, its corrected standard error, t, the degrees of freedom ``J - 1`` and the
    two-sided p-value.

    >>> d = [0.02, 0.01, 0.03, 0.00, 0.02, 0.01, 0.02, 0.03, 0.01, 0.02]  # 5 folds x 2 seeds
    >>> r = corrected_t(d, n_train=1574, n_test=394)
    >>> r["mean"], r["df"], round(r["t"], 2), round(r["p"], 3)  # the plain paired t would be 5.67
    (0.017, 9, 3.03, 0.014)
    """
    from scipy import stats

    diffs = list(differences)
    if len(diffs) < 2:
        raise ValueError(f"the corrected t-test needs at least 2 paired differences, got {len(diffs)}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test are image counts >= 1, got {n_train} and {n_test}")
    mean = statistics.fmean(diffs)
    variance = statistics.variance(diffs)
    se = math.sqrt((1 / len(diffs) + n_test / n_train) * variance)
    df = len(diffs) - 1
    t = mean / se if se > 0 else (math.inf if mean else 0.0) * (1 if mean >= 0 else -1)
    p = 2 * stats.t.sf(abs(t), df) if math.isfinite(t) else (0.0 if mean else 1.0)
    return {"mean": round(mean, 4), "se": round(se, 4), "t": t, "df": df, "p": float(p)}


def mcnemar(base_correct: Sequence[bool], variant_correct: Sequence[bool]) -> dict:
    """McNemar's exact test over paired cells (the pooled out-of-fold predictions: every non-test cell once):
    of the cells the two get different right, how many the variant gets right (``variant_only``) against the
    base (``base_only``); the two-sided p-value of the binomial with p = 1/2.

    >>> mcnemar([True, True, False, False, True], [True, False, True, True, True])
    {'cells': 5, 'base_only': 1, 'variant_only': 2, 'difference': 0.2, 'p': 1.0}
    """
    from scipy import stats

    if len(base_correct) != len(variant_correct) or not base_correct:
        raise ValueError("need the same cells, at least one, scored by both")
    base_only = sum(1 for b, v in zip(base_correct, variant_correct, strict=True) if b and not v)
    variant_only = sum(1 for b, v in zip(base_correct, variant_correct, strict=True) if v and not b)
    discordant = base_only + variant_only
    p = (
        1.0
        if discordant == 0
        else min(1.0, 2 * stats.binom.cdf(min(base_only, variant_only), discordant, 0.5))
    )
    return {
        "cells": len(base_correct),
        "base_only": base_only,
        "variant_only": variant_only,
        "difference": round((variant_only - base_only) / len(base_correct), 4),
        "p": float(p),
    }


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of the p-values of several comparisons made at once (several knobs
    judged on the same folds): a knob is a gain at level a when its adjusted p-value is below a. It holds
    the family-wise error rate without assuming the comparisons independent.

    >>> holm({"cosine": 0.01, "smoothing": 0.04, "bn_eval": 0.30})
    {'cosine': 0.03, 'smoothing': 0.08, 'bn_eval': 0.3}
    """
    order = sorted(pvalues, key=pvalues.get)
    adjusted: dict[str, float] = {}
    running = 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[name]))
        adjusted[name] = round(running, 6)
    return {name: adjusted[name] for name in pvalues}


def smallest_resolved_gain(
    aa_differences: Sequence[float], n_train: int, n_test: int, alpha: float = 0.05
) -> float:
    """The smallest mean gain the protocol tells from noise at level ``alpha``, from an A/A comparison (the
    same recipe against itself, its seeds' runs paired by fold): ``t_{1-alpha/2, J-1}`` times the corrected
    standard error of the A/A differences.

    >>> round(smallest_resolved_gain([0.01, -0.01, 0.005, -0.005, 0.0, 0.01], n_train=1574, n_test=394), 4)
    0.0136
    """
    from scipy import stats

    diffs = list(aa_differences)
    corrected_t(diffs, n_train, n_test)  # the same checks of its input
    spread = math.sqrt((1 / len(diffs) + n_test / n_train) * statistics.variance(diffs))  # unrounded
    return float(stats.t.ppf(1 - alpha / 2, len(diffs) - 1) * spread)


def resolved_gain_floor(
    aa_differences: Sequence[float], n_train: int, n_test: int, alpha: float = 0.05
) -> float:
    """The smallest gain k-fold cross-validation on these images could resolve with any number of seeds: as
    the seeds grow, the corrected variance ``s^2 * (1/J + n_test/n_train)`` falls to ``s^2 * n_test/n_train``
    and ``t`` to the normal quantile, so more seeds buy less and less. Below this gain more images, not more
    seeds, are what helps.

    >>> round(resolved_gain_floor([0.01, -0.01, 0.005, -0.005, 0.0, 0.01], n_train=1574, n_test=394), 4)
    0.008
    """
    from scipy import stats

    spread = statistics.stdev(aa_differences)
    return float(stats.norm.ppf(1 - alpha / 2) * spread * math.sqrt(n_test / n_train))
