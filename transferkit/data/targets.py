"""What each image is labelled with: the kind of target (``data.target``), and, for a CSV, where it is.

:class:`TargetSettings` is read by the sources (which parse the targets) and the data module (which hands the
kind to the model); it sits apart so that both can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transferkit.settings import SettingsGroup

__all__ = ["TARGET_KINDS", "TargetSettings"]

TARGET_KINDS = ("single_label", "multi_label", "regression")


@dataclass(frozen=True)
class TargetSettings(SettingsGroup):
    """What each image is labelled with (``data.target``): the kind of target, and where a CSV holds it.

    Args:
        kind: ``single_label`` (one class per image: a folder per class, a CSV's ``label`` column, ELPV's
            ``binary`` or ``4class`` task), ``multi_label`` (any number of labels per image: a CSV's ``labels``
            column of names separated by ``separator``, or one 0/1 column per label named in ``columns``;
            ELPV's ``defective_polycrystalline`` task) or ``regression`` (one or more numbers per image: a
            CSV's numeric columns named in ``columns``, or its ``target`` column; ELPV's
            ``defect_probability`` task). The model takes the same kind (the CLI hands it over).
        columns: the CSV columns that hold the targets: multi-label, one 0/1 column per label (named as the
            label); regression, the numeric target columns. ``None``: a multi-label CSV's ``labels`` column, a
            regression CSV's ``target`` column.
        names: multi-label with a ``labels`` column: the label names, in output order; a label the CSV
            names that is not among them is refused, naming the row. ``None``: every label the CSV names,
            sorted.
        separator: what separates the label names in a multi-label CSV's ``labels`` column.
        allow_empty: multi-label: whether an image may have no label at all (a cell without defects); when
            ``False``, an empty list is refused, naming the row.

    Example:
        >>> TargetSettings(kind="multi_label", columns=["crack", "finger"]).columns
        ('crack', 'finger')
    """

    where = "data.target"

    kind: Literal["single_label", "multi_label", "regression"] = "single_label"
    columns: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    separator: str = ";"
    allow_empty: bool = True

    def __post_init__(self) -> None:
        self.require(self.kind in TARGET_KINDS, "kind", f"one of {', '.join(TARGET_KINDS)}")
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(str(c) for c in self.columns))
            self.require(len(self.columns) >= 1, "columns", "a list of one or more CSV column names, or null")
            self.require(len(set(self.columns)) == len(self.columns), "columns", "a list without repeats")
            self.require(
                self.kind != "single_label", "columns", "null for single_label (its CSV has a 'label' column)"
            )
        if self.names is not None:
            object.__setattr__(self, "names", tuple(str(n) for n in self.names))
            self.require(
                self.kind == "multi_label" and self.columns is None,
                "names",
                "null unless the kind is multi_label with a 'labels' column (columns: null)",
            )
            self.require(
                len(self.names) >= 1 and len(set(self.names)) == len(self.names),
                "names",
                "a list of distinct label names",
            )
        self.require(
            isinstance(self.separator, str) and len(self.separator) >= 1, "separator", "a non-empty string"
        )
        self.require(
            self.separator == ";" or (self.kind == "multi_label" and self.columns is None),
            "separator",
            "';' unless the kind is multi_label with a 'labels' column (columns: null), where it splits the names",
        )
        self.require(
            self.allow_empty or self.kind == "multi_label",
            "allow_empty",
            "true unless the kind is multi_label (only a multi-label image can have no label)",
        )
