"""The gradient-health figure: gradients, update ratios and activations of every layer, in depth order."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["gradient_health_plot"]


def _finite_points(layers: Sequence[Any], attr: str, positive: bool = False) -> tuple[list[int], list[float]]:
    """Indices and values of ``attr`` over ``layers`` where it is finite (and > 0 for a log axis)."""
    kept = [(i, getattr(r, attr)) for i, r in enumerate(layers)]
    kept = [(i, v) for i, v in kept if v is not None and math.isfinite(v) and (v > 0 or not positive)]
    return [i for i, _ in kept], [v for _, v in kept]


def gradient_health_plot(
    report: Any, path: str | os.PathLike, vanishing_factor: float = 100.0, exploding_factor: float = 100.0
) -> Path:
    """Draw a :class:`~transferkit.diagnostics.verdicts.GradientHealthReport` into the PNG ``path``, layers
    in depth order (input on the left), in three panels:

    1. gradient norm and relative gradient per layer (log scale), points coloured by verdict, with
       the vanishing (``1 / vanishing_factor``) and exploding (``exploding_factor``) limits of the
       relative gradient;
    2. update ratio ``||Δw|| / ||w||`` per layer (log scale);
    3. activation mean ± std, with the saturated and dead fractions as bars.
    """
    colors = {
        "healthy": "tab:green",
        "vanishing": "tab:blue",
        "exploding": "tab:red",
        "dying": "black",
        "frozen": "tab:gray",
    }
    count = len(report.layers)
    x = list(range(count))
    fig = Figure(figsize=(max(8.0, 0.3 * count + 3), 11.0), layout="constrained")
    grad_ax, update_ax, act_ax = fig.subplots(3, 1, sharex=True, height_ratios=(3, 2, 3))
    title = f"gradient health: {report.verdict} ({report.batches} batches from epoch {report.epoch})"
    grad_ax.set_title(title)

    gx, gy = _finite_points(report.layers, "grad_norm", positive=True)
    grad_ax.plot(gx, gy, color="0.5", marker="s", markersize=4, linewidth=1, label="||grad||")
    rx, ry = _finite_points(report.layers, "rel_grad", positive=True)
    grad_ax.plot(rx, ry, color="0.8", linewidth=1, zorder=1)
    grad_ax.scatter(rx, ry, c=[colors[report.layers[i].verdict] for i in rx], s=40, zorder=2)
    grad_ax.axhline(1 / vanishing_factor, color="tab:blue", linestyle=":", linewidth=1)
    grad_ax.axhline(exploding_factor, color="tab:red", linestyle=":", linewidth=1)
    if gy or ry:
        grad_ax.set_yscale("log")
    grad_ax.set_ylabel("gradient")
    grad_ax.grid(True, alpha=0.3)
    handles = [
        Line2D([], [], color="0.5", marker="s", markersize=4, label="||grad||"),
        Line2D([], [], color="0.8", marker="o", markerfacecolor="tab:green", label="relative gradient"),
        Line2D([], [], color="tab:blue", linestyle=":", label=f"vanishing below 1/{vanishing_factor:g}"),
        Line2D([], [], color="tab:red", linestyle=":", label=f"exploding above {exploding_factor:g}"),
    ]
    handles += [
        Line2D([], [], marker="o", linestyle="", color=c, label=v)
        for v, c in colors.items()
        if any(r.verdict == v for r in report.layers)
    ]
    grad_ax.legend(handles=handles, fontsize=7, loc="best", ncols=2)

    ux, uy = _finite_points(report.layers, "update_ratio", positive=True)
    update_ax.plot(ux, uy, color="tab:purple", marker="o", markersize=4, linewidth=1)
    if uy:
        update_ax.set_yscale("log")
    update_ax.set_ylabel("||Δw|| / ||w|| per step")
    update_ax.grid(True, alpha=0.3)

    ax, means = _finite_points(report.layers, "act_mean")
    _, stds = _finite_points(report.layers, "act_std")
    act_ax.errorbar(ax, means, yerr=stds, fmt="o", color="tab:blue", capsize=3, label="activation mean ± std")
    act_ax.set_ylabel("activation")
    act_ax.grid(True, alpha=0.3)
    frac_ax = act_ax.twinx()
    sat = [100 * (r.saturated or 0.0) for r in report.layers]
    dead = [100 * (r.dead or 0.0) for r in report.layers]
    frac_ax.bar([i - 0.2 for i in x], sat, width=0.4, color="tab:orange", alpha=0.5, label="saturated %")
    frac_ax.bar([i + 0.2 for i in x], dead, width=0.4, color="black", alpha=0.4, label="dead %")
    frac_ax.set_ylim(0, 100)
    frac_ax.set_ylabel("% saturated / dead")
    lines, labels = act_ax.get_legend_handles_labels()
    more, more_labels = frac_ax.get_legend_handles_labels()
    act_ax.legend(lines + more, labels + more_labels, fontsize=7, loc="best")
    act_ax.set_xticks(x)
    act_ax.set_xticklabels([r.name for r in report.layers], rotation=70, ha="right", fontsize=7)
    act_ax.set_xlabel("layer (input → output)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
