"""Class groups: coarser classes that the trained classes refine, scored alongside them.

A model trained on fine labels answers the coarser question too, so one model gives both answers.
ELPV's 4-class task (defect probability 0, 1/3, 2/3, 1) refines its binary one (functional = 0 and 1/3,
defective = 2/3 and 1); a folder of ``crack``, ``finger``, ``ok`` photos refines ``defective`` / ``ok``.
With ``data.class_groups`` (or a source's own groups) the model logs ``val_group_acc`` / ``test_group_acc``
and their macro F1: a group's probability is the sum of its classes' probabilities, and the predicted
group is the most probable one.

Example:
    >>> import torch
    >>> classes = ["crack", "finger", "good"]
    >>> groups = resolve_class_groups({"ok": ["good"], "defective": ["crack", "finger"]}, classes)
    >>> groups
    {'ok': [2], 'defective': [0, 1]}
    >>> group_probabilities(torch.tensor([[0.3, 0.3, 0.4]]), groups)
    tensor([[0.4000, 0.6000]])
    >>> group_labels(torch.tensor([0, 2]), groups)
    tensor([1, 0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from transferkit.errors import ConfigError

__all__ = ["group_labels", "group_probabilities", "resolve_class_groups"]


def resolve_class_groups(
    groups: Mapping[str, Sequence[str | int]] | None, class_names: Sequence[str]
) -> dict[str, list[int]] | None:
    """``{group: [class names]}`` as ``{group: [class indices]}``, checked: at least two groups, and every
    class in exactly one (the groups partition the classes, so their probabilities sum to one). Names are
    compared as text, so YAML's ``[0, 1/3]`` names ELPV's classes ``'0'`` and ``'1/3'``.

    Raises:
        ConfigError: a name that is not a class, a class in two groups or in none, fewer than two groups.
    """
    if groups is None:
        return None
    names = [str(n) for n in class_names]
    known = ", ".join(repr(n) for n in names)
    if not isinstance(groups, Mapping) or len(groups) < 2:
        raise ConfigError(
            f"class_groups must map at least two group names to lists of classes, got {groups!r}; e.g. "
            f"{{defective: [crack, finger], ok: [good]}} with classes from {known}."
        )
    resolved: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for group, members in groups.items():
        if isinstance(members, str | int) or not members:
            raise ConfigError(f"class group '{group}' must list one class or more, got {members!r}.")
        indices = []
        for member in members:
            if str(member) not in names:
                raise ConfigError(
                    f"class group '{group}' names {member!r}, which is not a class; the classes: {known}."
                )
            index = names.index(str(member))
            if index in owner:
                raise ConfigError(
                    f"class '{names[index]}' is in class groups '{owner[index]}' and '{group}'; put it in one."
                )
            owner[index] = str(group)
            indices.append(index)
        resolved[str(group)] = indices
    missing = [names[i] for i in range(len(names)) if i not in owner]
    if missing:
        raise ConfigError(
            f"class_groups leave out {', '.join(repr(n) for n in missing)}; every class must be in one group "
            f"(a group of its own is fine), so that the groups' probabilities sum to one."
        )
    return resolved


def _membership(groups: Mapping[str, Sequence[int]], device: torch.device) -> torch.Tensor:
    """``(C, G)`` one-hot: which group each class is in."""
    classes = sum(len(m) for m in groups.values())
    matrix = torch.zeros(classes, len(groups), device=device)
    for column, members in enumerate(groups.values()):
        matrix[list(members), column] = 1.0
    return matrix


def group_probabilities(probs: torch.Tensor, groups: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """Class probabilities ``(B, C)`` summed into group probabilities ``(B, G)``, groups in their order."""
    return probs @ _membership(groups, probs.device).to(probs.dtype)


def group_labels(labels: torch.Tensor, groups: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """Class indices ``(B,)`` as the indices of their groups ``(B,)``."""
    return _membership(groups, labels.device).argmax(dim=1)[labels]
