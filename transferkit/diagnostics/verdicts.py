"""Judging gradient health: the per-layer report, the rules that give each layer its verdict, the fixes.

:class:`~transferkit.diagnostics.health.GradientHealth` records, over a few real training batches, for
every ``Linear`` / ``Conv`` layer: the norm of its weight's gradient, how far one optimizer step moves
its weights, and the statistics of the activation that follows it (mean, std, fraction saturated,
fraction of dead units). Each layer gets a verdict (``healthy``, ``vanishing``, ``exploding``, ``dying``,
or ``frozen`` when it does not train) and the run an overall one, with the fixes that apply.

Verdict rules (a layer gets the first that applies):

- ``exploding``: a non-finite gradient, weight or activation; or a relative gradient
  ``||grad|| / ||w||`` more than :data:`EXPLODING_FACTOR` (100) times the top layer's (gradients grow
  on their way to the input); or an optimizer step that moves the weights by more than their own
  norm (update ratio > :data:`MAX_UPDATE_RATIO`, 1).
- ``vanishing``: a relative gradient less than 1/:data:`VANISHING_FACTOR` (1/100) of the top layer's,
  or no gradient at all although the layer is trainable. With one learning rate such a layer learns
  two orders of magnitude slower than the top one; in a healthy deep net (an init that preserves the
  variance, or BatchNorm) the relative gradients of all layers stay within about one order of
  magnitude of each other.
  It is also the verdict of a *saturated* layer, the textbook cause of vanishing gradients: more than
  :data:`SATURATED_FRACTION` (a quarter) of the outputs of the sigmoid or tanh that follows lie
  within :data:`SATURATION_MARGIN` (0.01) of its bounds (sigmoid: < 0.01 or > 0.99; tanh: < -0.99 or
  > 0.99), where its derivative is below 0.01 (sigmoid; 0.25 at its centre) or 0.02 (tanh; 1 at its
  centre), so those outputs pass on less than 1/25 of the gradient. A layer
  initialised for its activation (Xavier, scaled inputs) has about 1% of its outputs there; with
  pre-activations a few times too large (e.g. N(0, 1) weights on 100 inputs) it is 40% or more.
- ``dying``: more than :data:`DEAD_FRACTION` (half) of the units (features of a ``Linear``, channels
  of a ``Conv``) of the rectifier that follows are dead: their output was never positive over all
  recorded samples and positions. For ReLU that is an output of exactly 0 and a zero gradient; for
  leaky ReLU, ELU, SELU, GELU, SiLU and kin it is the negative part, where the slope is small.

The *top layer* is the trainable layer nearest the output (the last to run in the forward pass); the
*relative gradient* in the report is a layer's ``||grad|| / ||w||`` divided by the top layer's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEAD_FRACTION",
    "EXPLODING_FACTOR",
    "MAX_UPDATE_RATIO",
    "SATURATED_FRACTION",
    "SATURATION_MARGIN",
    "VANISHING_FACTOR",
    "VERDICTS",
    "GradientHealthReport",
    "LayerHealth",
    "judge",
]

VERDICTS = ("healthy", "vanishing", "exploding", "dying", "frozen")
VANISHING_FACTOR = 100.0
EXPLODING_FACTOR = 100.0
MAX_UPDATE_RATIO = 1.0
DEAD_FRACTION = 0.5
SATURATED_FRACTION = 0.25
SATURATION_MARGIN = 0.01

# problems, most severe first: the order in which a layer's verdict is chosen
_SEVERITY = ("exploding", "vanishing", "dying")


_FIXES = {
    "exploding": (
        "lower the learning rate (model.optimizer.lr), clip the gradients (trainer.gradient_clip_val, e.g. 1.0), "
        "and use an init that preserves the variance (He for ReLU/ELU) or BatchNorm"
    ),
    "vanishing": (
        "initialise the weights for the activation (He for ReLU/ELU, LeCun for SELU, Xavier/Glorot for "
        "tanh/sigmoid), scale the inputs, use a non-saturating activation (ELU, leaky ReLU), put "
        "BatchNorm between the layers, or add residual connections"
    ),
    "dying": (
        "use leaky ReLU or ELU instead of ReLU, lower the learning rate (model.optimizer.lr), and He init; "
        "BatchNorm before the activation keeps units from settling in the negative part"
    ),
}


# --- the report ------------------------------------------------------------------------------------


@dataclass
class LayerHealth:
    """What one layer's gradients, updates and activations looked like over the recorded batches.

    Norms are L2 norms of the whole weight tensor, averaged over the recorded optimizer steps.
    ``update_ratio`` is the measured ``||w_after - w_before|| / ||w_before||`` of a step (what the
    optimizer really did: momentum, Adam's scaling, weight decay and clipping included).
    ``rel_grad`` is ``||grad|| / ||w||`` divided by the top layer's. Activation statistics are those of
    the activation module that runs right after the layer (``activation``), else of the layer's own
    output; ``saturated`` is measured for sigmoid/tanh, ``dead`` for the ReLU family.
    """

    index: int
    name: str
    layer: str
    activation: str | None
    params: int
    trainable: bool
    grad_norm: float | None = None
    weight_norm: float | None = None
    rel_grad: float | None = None
    update_ratio: float | None = None
    act_mean: float | None = None
    act_std: float | None = None
    saturated: float | None = None
    dead: float | None = None
    nonfinite: bool = False
    verdict: str = "healthy"
    reasons: list[str] = field(default_factory=list)


@dataclass
class GradientHealthReport:
    """Per-layer gradient health, in depth order (input first), and the verdict of the whole model.

    Attributes:
        layers: one :class:`LayerHealth` per ``Linear`` / ``Conv`` layer that ran, input to output.
        verdict: ``healthy`` when every trainable layer is, else the problem most layers have (ties go
            to the more severe: exploding, vanishing, dying).
        summary: what was found and what to do about it, in words.
        epoch: the epoch in which the recording started.
        batches: the number of training batches recorded.
        error: the message of the error that ended the recording early (e.g. a non-finite loss), if any.
    """

    layers: list[LayerHealth]
    verdict: str
    summary: str
    epoch: int = 0
    batches: int = 0
    error: str | None = None

    def __getitem__(self, name: str) -> LayerHealth:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(
            f"no layer named '{name}' in the report; layers: {', '.join(r.name for r in self.layers)}"
        )

    def table(self) -> str:
        """One text row per layer: name, gradient norm, relative gradient, update ratio, activation
        mean/std, saturated %, dead %, verdict; then the overall verdict."""
        header = (
            "#",
            "layer",
            "type",
            "activation",
            "grad norm",
            "rel grad",
            "update",
            "act mean",
            "act std",
            "sat %",
            "dead %",
            "verdict",
        )
        rows = [
            (
                str(r.index),
                r.name,
                r.layer,
                r.activation or "-",
                _sci(r.grad_norm),
                _sci(r.rel_grad),
                _sci(r.update_ratio),
                _num(r.act_mean, "+.3f"),
                _num(r.act_std, ".3f"),
                _pct(r.saturated),
                _pct(r.dead),
                r.verdict,
            )
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        left = {1, 2, 3, 11}

        def line(row: Sequence[str]) -> str:
            cells = [
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        lines = [line(header), line(["-" * w for w in widths])]
        lines += [line(row) for row in rows]
        lines += ["", f"verdict: {self.verdict} ({self.batches} batches from epoch {self.epoch})"]
        if self.summary:
            lines.append(self.summary)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (JSON, and checkpoints loaded with ``weights_only=True``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradientHealthReport:
        fields = {k: v for k, v in data.items() if k != "layers"}
        return cls(layers=[LayerHealth(**row) for row in data["layers"]], **fields)

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text; also written to ``path`` if given. Non-finite numbers become ``null``."""
        text = json.dumps(_finite_or_none(self.to_dict()), indent=2) + "\n"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of the report (:func:`transferkit.reporting.gradient_health.gradient_health_plot`)."""
        from transferkit.reporting.gradient_health import gradient_health_plot  # matplotlib only to draw

        return gradient_health_plot(self, path, VANISHING_FACTOR, EXPLODING_FACTOR)


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def judge(
    rows: list[LayerHealth], relative: list[float | None], epoch: int, batches: int, error: str | None
) -> GradientHealthReport:
    """Give each layer its verdict and the model its own.

    ``rows`` are the measured layers in depth order (input first), ``relative`` each one's mean
    ``||grad|| / ||w||`` (``None`` where it has none); ``rel_grad`` is set to that divided by the top
    layer's. ``error`` is the message of an error that ended the recording (the verdict is then
    ``exploding``).
    """
    # the reference: the trainable layer nearest the output that got a finite, non-zero relative gradient
    top = next(
        (
            v
            for r, v in zip(reversed(rows), reversed(relative), strict=True)
            if r.trainable and v and math.isfinite(v)
        ),
        None,
    )
    for row, rel in zip(rows, relative, strict=True):
        if rel is not None and top:
            row.rel_grad = rel / top
        _verdict(row)
    return _overall(rows, epoch, batches, error)


def _verdict(row: LayerHealth) -> None:
    reasons: dict[str, str] = {}
    if not row.trainable:
        row.verdict, row.reasons = "frozen", ["does not train (requires_grad=False)"]
        return
    if row.nonfinite:
        reasons["exploding"] = "non-finite gradient, weight or activation values"
    elif row.rel_grad is not None and row.rel_grad > EXPLODING_FACTOR:
        reasons["exploding"] = (
            f"relative gradient {row.rel_grad:.1e}x the top layer's (> {EXPLODING_FACTOR:g}x)"
        )
    elif row.update_ratio is not None and row.update_ratio > MAX_UPDATE_RATIO:
        reasons["exploding"] = f"one step moves the weights by {row.update_ratio:.2g}x their norm"
    if row.grad_norm is None or row.grad_norm == 0.0:
        if row.grad_norm == 0.0 or row.update_ratio is not None:
            reasons["vanishing"] = "no gradient reaches this layer"
    elif row.rel_grad is not None and row.rel_grad < 1.0 / VANISHING_FACTOR:
        reasons["vanishing"] = (
            f"relative gradient {row.rel_grad:.1e}x the top layer's (< 1/{VANISHING_FACTOR:g})"
        )
    if row.dead is not None and row.dead > DEAD_FRACTION:
        reasons["dying"] = f"{100 * row.dead:.0f}% of the units never output a positive value"
    if row.saturated is not None and row.saturated > SATURATED_FRACTION:
        # saturated units pass back almost no gradient: the vanishing-gradient problem at its source
        saturated = (
            f"saturated: {100 * row.saturated:.0f}% of the outputs within {SATURATION_MARGIN} of the "
            "activation's bounds, where it passes back < 1/25 of the gradient"
        )
        reasons["vanishing"] = f"{reasons['vanishing']}; {saturated}" if "vanishing" in reasons else saturated
    row.reasons = [reasons[k] for k in _SEVERITY if k in reasons]
    row.verdict = next((k for k in _SEVERITY if k in reasons), "healthy")


def _overall(rows: list[LayerHealth], epoch: int, batches: int, error: str | None) -> GradientHealthReport:
    judged = [r for r in rows if r.verdict != "frozen"]
    counts = {v: sum(r.verdict == v for r in judged) for v in _SEVERITY}
    problems = [v for v in _SEVERITY if counts[v]]
    if error is not None:
        verdict = "exploding"
    elif not problems:
        verdict = "healthy"
    else:
        verdict = max(problems, key=lambda v: (counts[v], -_SEVERITY.index(v)))
    lines: list[str] = []
    if error is not None:
        lines.append(f"training stopped: {error.splitlines()[0]}")
    if not judged:
        lines.append("no layer trained during the recording (all frozen).")
    elif not problems and error is None:
        rels = [r.rel_grad for r in judged if r.rel_grad]
        spread = (
            f"; relative gradients from {min(rels):.1e} to {max(rels):.1e} of the top layer's" if rels else ""
        )
        lines.append(f"all {len(judged)} trainable layers are healthy{spread}.")
    for problem in problems:
        names = [r.name for r in judged if r.verdict == problem]
        shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
        lines.append(
            f"{problem}: {len(names)} of {len(judged)} trainable layers ({shown}). Fix: {_FIXES[problem]}."
        )
    frozen = len(rows) - len(judged)
    if frozen:
        lines.append(f"{frozen} frozen layers are not judged.")
    return GradientHealthReport(rows, verdict, "\n".join(lines), epoch, batches, error)
