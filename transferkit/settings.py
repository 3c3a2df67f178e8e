"""Typed groups of settings: dataclasses validated at construction, in one plain-data form.

A group (the model's ``head``, ``optimizer``, ``lr_schedule`` ...) is a frozen dataclass that checks its
values in ``__post_init__`` and raises :class:`~transferkit.errors.ConfigError` naming the field, the value
and what it may be. The same group comes from Python (``OptimizerSettings(lr=3e-4)``), from a recipe or
the command line (``model.optimizer.lr: 3e-4``, ``--model.optimizer.lr 3e-4``: jsonargparse builds
dataclasses), and from a checkpoint (:meth:`SettingsGroup.coerce` of its dict form); its
:meth:`~SettingsGroup.to_dict` form holds plain types only, so a checkpoint holding it loads with
``weights_only=True``.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Box(SettingsGroup):
    ...     side: int = 1
    ...     def __post_init__(self):
    ...         self.require(self.side >= 1, "side", "an integer >= 1")
    >>> Box.coerce({"side": 3}), Box.coerce(None).to_dict()
    (Box(side=3), {'side': 1})
    >>> Box.coerce({"sides": 3})
    Traceback (most recent call last):
    ...
    transferkit.errors.ConfigError: Box has no setting 'sides'; its settings are: side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from transferkit.containers import plain
from transferkit.errors import ConfigError

__all__ = ["GroupedSettings", "SettingsGroup"]

G = TypeVar("G", bound="SettingsGroup")
S = TypeVar("S", bound="GroupedSettings")


@dataclasses.dataclass(frozen=True)
class SettingsGroup:
    """Base of a frozen dataclass of settings (see the module docstring); a dataclass itself, without
    fields, so that jsonargparse takes its subclasses as plain groups of fields."""

    #: where the group sits in a recipe (``model.optimizer``), for error messages
    where: ClassVar[str] = ""

    def require(self, ok: bool, field: str, expected: str) -> None:
        """Raise :class:`ConfigError` unless ``ok``: ``<where>.<field> must be <expected>, got <value>``."""
        if not ok:
            name = f"{self.where}.{field}" if self.where else field
            raise ConfigError(f"{name} must be {expected}, got {getattr(self, field)!r}.")

    @classmethod
    def coerce(cls: type[G], value: G | Mapping[str, Any] | None) -> G:
        """The group from itself, its dict form (a recipe, a checkpoint; missing fields take their
        defaults) or ``None`` (every default)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
            unknown = [k for k in value if k not in names]
            if unknown:
                label = cls.where or cls.__name__
                raise ConfigError(
                    f"{label} has no setting {unknown[0]!r}; its settings are: {', '.join(names)}."
                )
            return cls(**value)
        raise ConfigError(
            f"{cls.where or cls.__name__} takes a {cls.__name__} or a mapping of its settings "
            f"({', '.join(f.name for f in dataclasses.fields(cls))}), got {value!r}."  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain types (tuples as lists), in field order."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def replace(self: G, **changes: Any) -> G:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


class GroupedSettings:
    """Base of the frozen dataclass of everything a module is built from: plain top-level fields and the
    groups named in :attr:`groups` (``{field: group class}``). The model's and the data module's settings
    (:class:`~transferkit.models.settings.ClassifierSettings`, :class:`~transferkit.data.settings.DataSettings`)
    are its subclasses."""

    #: the fields that are groups, and their classes (any dataclass with a ``coerce``)
    groups: ClassVar[dict[str, Any]] = {}

    @classmethod
    def build(cls: type[S], **kwargs: Any) -> S:
        """The settings from constructor arguments, each group as itself, its dict form or ``None`` (its
        defaults); then :meth:`check`, the checks that span groups."""
        for name, group in cls.groups.items():
            kwargs[name] = group.coerce(kwargs.get(name))
        settings = cls(**kwargs)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings whose groups do not go together (none here)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (groups as dicts), so a checkpoint holding it loads with ``weights_only=True``."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if f.name in self.groups else plain(value)
        return out

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments that build a module with these settings."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def replace(self: S, **changes: Any) -> S:
        """A copy with ``changes``, checked again: a group given as a dict changes the fields it names, as
        an instance (or ``None``, its defaults) it is replaced whole."""
        args = self.init_args()
        for name, value in changes.items():
            if name in self.groups and isinstance(value, Mapping):
                value = dataclasses.replace(args[name], **value)
            args[name] = value
        return type(self).build(**args)
