"""L1 and L2 penalties on chosen weights: which weights, the penalty, L1's proximal step, sparsity."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from transferkit.errors import ConfigError

__all__ = ["Regularisers"]


class Regularisers:
    """``l1 * sum |w| + l2 * sum w^2`` over the weights of ``penalty_groups``.

    The L2 part is added to the training loss; the L1 part is applied as its proximal step after every
    optimizer step (soft-thresholding by ``lr * l1``, as in ISTA), which sets weights exactly to zero
    where a subgradient would leave them oscillating around it. Biases and normalisation parameters (any
    tensor of fewer than 2 dimensions) are never penalised, and a frozen group is not regularised (it
    cannot change).

    Args:
        l1: the L1 coefficient (>= 0).
        l2: the L2 coefficient (>= 0).
        penalty_groups: ``head``, ``backbone``, ``all``, or a list of optimizer group names (``head``,
            ``backbone.0`` ... ``backbone.N``, top = N).
        sparsity_threshold: ``|w|`` below which a penalised weight counts as zero in :meth:`sparsity`.
        groups: the optimizer parameter groups (dicts with ``name`` and ``params``) to choose from, or a
            function that returns them; read once, when the weights are first needed.

    Example:
        >>> layer = torch.nn.Linear(4, 2)
        >>> reg = Regularisers(l1=0.0, l2=0.5, groups=[{"name": "head", "params": list(layer.parameters())}])
        >>> [tuple(w.shape) for w in reg.weights]  # the weight matrix, not the bias
        [(2, 4)]
        >>> bool(reg.penalty() == 0.5 * layer.weight.square().sum())
        True
    """

    def __init__(
        self,
        l1: float = 0.0,
        l2: float = 0.0,
        penalty_groups: str | Sequence[str] = "head",
        sparsity_threshold: float = 1e-3,
        groups: Sequence[dict[str, Any]] | Callable[[], Sequence[dict[str, Any]]] = (),
    ) -> None:
        if l1 < 0 or l2 < 0:
            raise ConfigError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}.")
        self.l1 = l1
        self.l2 = l2
        self.penalty_groups = penalty_groups
        self.sparsity_threshold = sparsity_threshold
        self._groups = groups
        self._weights: list[torch.nn.Parameter] | None = None

    @property
    def active(self) -> bool:
        return bool(self.l1 or self.l2)

    @property
    def weights(self) -> list[torch.nn.Parameter]:
        """The weights to penalise, chosen once from the groups; raises
        :class:`~transferkit.errors.ConfigError` for a group name that does not exist."""
        if self._weights is None:
            groups = self._groups() if callable(self._groups) else self._groups
            names = [g["name"] for g in groups]
            chosen = self.penalty_groups
            if chosen == "all":
                wanted = set(names)
            elif chosen == "head":
                wanted = {"head"}
            elif chosen == "backbone":
                wanted = {n for n in names if n.startswith("backbone.")}
            else:
                wanted = {chosen} if isinstance(chosen, str) else set(chosen)
                unknown = wanted - set(names)
                if unknown:
                    raise ConfigError(
                        f"penalty_groups names unknown groups {sorted(unknown)}; choose 'head', 'backbone', "
                        f"'all' or a list of {names}."
                    )
            self._weights = [p for g in groups if g["name"] in wanted for p in g["params"] if p.ndim >= 2]
        return self._weights

    def _trained(self) -> list[torch.nn.Parameter]:
        return [w for w in self.weights if w.requires_grad]

    def penalty(self) -> torch.Tensor:
        """``l1 * sum |w| + l2 * sum w^2`` over the penalised weights that train now."""
        total = torch.zeros(())
        for weight in self._trained():
            if self.l1:
                total = total + self.l1 * weight.abs().sum()
            if self.l2:
                total = total + self.l2 * weight.square().sum()
        return total

    def l2_term(self) -> torch.Tensor:
        """``l2 * sum w^2``, the part added to the training loss."""
        return self.l2 * sum((w.square().sum() for w in self._trained()), torch.zeros(()))

    def sparsity(self) -> float:
        """Fraction of the penalised weights with ``|w| < sparsity_threshold``."""
        weights = self.weights
        if not weights:
            return 0.0
        small = sum(int((w.detach().abs() < self.sparsity_threshold).sum()) for w in weights)
        return small / sum(w.numel() for w in weights)

    @torch.no_grad()
    def proximal_step(self, optimizer: Any) -> None:
        """Soft-threshold each penalised weight that trains by its group's ``lr * l1``."""
        if not self.l1:
            return
        penalised = {id(w) for w in self._trained()}
        for group in optimizer.param_groups:
            threshold = group["lr"] * self.l1
            for weight in group["params"]:
                if id(weight) in penalised:
                    weight.copy_(weight.sign() * (weight.abs() - threshold).clamp_min(0))
