"""Every figure in README.md, docs/*.md and the recipe headers, traced to a results file and a key.

    python benchmarks/figures.py check       # every figure equals the value at its key (a test runs this)
    python benchmarks/figures.py annotate    # resolve new figures into docs/figures.yaml, keep the rest
    python benchmarks/figures.py where 0.876 # the entries of one figure: document, line, file, key

A figure is a measured number as the prose quotes it: any number with a decimal point (an accuracy, a
spread, a paired difference, a ratio, a rate), and a whole number with a unit of time, rate, memory or
ratio: ``162 s``, ``162-172 s``, ``172, 163, 164 s``, ``590 ms``, ``15-21 minutes``, ``154 img/s``,
``6 GB``, ``2x``. Settings are not figures: the documents write them as code (``lr: 0.001``,
``CC BY-NC-SA 4.0``), and code is not read.

The index ``docs/figures.yaml`` lists, per document and in the order they appear, every figure with its
results file and the key of its value there (``a.b[2].c``: dotted keys, ``[i]`` for a list's item, and for a
``.jsonl`` file ``[i]`` first for its i-th record). ``check`` fails when a document's figures and its index
differ (a figure added, removed or changed) or when a figure is not the value at its key, rounded to the
figure's own places. A figure worked out from others (a difference of two means) has the file ``derived``
and an expression for key: ``{a.json:x} - {b.json:y}`` (:func:`derive`). ``annotate`` keeps the entry of every figure whose text and line did not change and
resolves the others among the results files named on the figure's line, then its paragraph, then its
section, then the sections the line links to: among the keys whose value matches, the one whose record the
line names best (:func:`score`). Equal numbers are common (a spread of 0.007, a per-seed accuracy), so
such a key is a guess: ``annotate`` marks its entry ``"guessed"`` and ``check`` fails until someone has read
it, corrected it where another key is meant, and deleted the mark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INDEX = ROOT / "docs" / "figures.yaml"

_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
# order matters: a span taken by an earlier pattern is not read again by a later one
_LIST = rf"((?:{_NUM})(?:(?:, |-)(?:{_NUM}))*)"  # one number, a range (162-172) or a list (172, 163, 164)
PATTERNS = (
    ("seconds", re.compile(rf"(?<![\w.,/]){_LIST} ?s\b")),
    ("milliseconds", re.compile(rf"(?<![\w.,/]){_LIST} ?ms\b")),
    ("minutes", re.compile(rf"(?<![\w.,/]){_LIST} ?min(?:utes)?\b")),
    ("rate", re.compile(rf"(?<![\w.,/]){_LIST} ?(?:img|images|files|steps|it)/s\b")),
    ("percent", re.compile(r"(?<![\w.])([+-]?\d+\.\d+) ?%")),
    ("memory", re.compile(rf"(?<![\w.,]){_LIST} ?(?:GB|GiB|MB|MiB)\b")),
    ("ratio", re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)x\b")),
    # any other number with a decimal point: an accuracy, a spread, a difference, a ratio in a range
    ("decimal", re.compile(r"(?<![\w.,])([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)\.\d+)(?!\d|\.\d)")),
)
LISTS = ("seconds", "milliseconds", "minutes", "rate", "memory")  # kinds read as ranges and lists too
RESULTS_FILE = re.compile(r"([\w.+-]+\.jsonl?)\b")
_CODE_SPAN = re.compile(r"`[^`]*`")
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_COMMENT = re.compile(r"<!--.*?-->")


@dataclass
class Figure:
    document: str
    line: int  # 1-based
    text: str  # as quoted: "0.876", "1,059", "+0.029"
    kind: str
    context: str  # the quoted line, stripped
    files: list[list[str]]  # results files named on the line, in the paragraph, in the section
    before: str = ""  # the few characters before it on its line, and after it
    after: str = ""

    @property
    def value(self) -> float:
        return float(self.text.replace(",", ""))

    @property
    def places(self) -> int:
        return len(self.text.split(".")[1]) if "." in self.text else 0


def documents() -> list[Path]:
    """README.md, docs/*.md and recipes/*.yaml: the texts whose figures are checked."""
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "recipes").glob("*.yaml")),
    ]


def _lines(path: Path) -> list[str]:
    """The readable lines: a markdown file without its code blocks, a recipe's header comment (blanked
    elsewhere, so line numbers hold)."""
    raw = path.read_text().splitlines()
    out, fenced, header = [], False, True
    for line in raw:
        if path.suffix == ".yaml":
            header = header and line.startswith("#")
            out.append(line[1:].strip() if header and not line[1:].strip().startswith("python ") else "")
            continue
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return out


def _blocks(lines: list[str]) -> tuple[list[int], list[int]]:
    """Per line, the number of its paragraph (blank-line separated) and of its section (between headings)."""
    paragraph, section, p, s = [], [], 0, 0
    for line in lines:
        if not line.strip():
            p += 1
        if line.startswith("#"):
            s += 1
            p += 1
        paragraph.append(p)
        section.append(s)
    return paragraph, section


def figures_in(path: Path) -> list[Figure]:
    """The figures of one document, in order."""
    lines = _lines(path)
    paragraph, section = _blocks(lines)
    # a results file named in a command of a code block names it for its section too
    raw = path.read_text().splitlines() if path.suffix == ".md" else lines
    named = [RESULTS_FILE.findall(_COMMENT.sub("", line)) for line in raw]
    anchors = {_slug(line): section[i] for i, line in enumerate(lines) if line.startswith("#")}

    def files(indices: Iterator[int]) -> list[str]:
        return list(dict.fromkeys(f for i in indices for f in named[i]))

    found = []
    for i, line in enumerate(lines):
        readable = _COMMENT.sub(" ", _LINK_TARGET.sub("]", _CODE_SPAN.sub(" ", line)))
        readable = RESULTS_FILE.sub(" ", readable).replace("\u2212", "-")  # a typeset minus reads as one
        taken: list[tuple[int, int]] = []
        hits = []
        for kind, pattern in PATTERNS:
            for match in pattern.finditer(readable):
                start, end = match.span(1)
                if any(start < b and a < end for a, b in taken):
                    continue
                taken.append((start, end))
                text = match.group(1)
                parts = re.split(r", |-(?=\d)", text) if kind in LISTS else [text]
                offset = start
                for part in parts:
                    at = readable.index(part, offset)
                    hits.append(
                        (at, part, kind, readable[max(0, at - 6) : at], readable[at + len(part) :][:6])
                    )
                    offset = at + len(part)
        if not hits:
            continue
        context = [
            named[i],
            files(j for j in range(len(lines)) if paragraph[j] == paragraph[i]),
            files(j for j in range(len(lines)) if section[j] == section[i]),
            files(
                j
                for anchor in re.findall(r"\]\(#([^)]+)\)", line)
                for j in range(len(lines))
                if section[j] == anchors.get(anchor)
            ),
        ]
        for _, text, kind, before, after in sorted(hits):
            found.append(Figure(_relative(path), i + 1, text, kind, line.strip(), context, before, after))
    return found


def _slug(heading: str) -> str:
    """A markdown heading's anchor, as GitHub makes it."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


# --- results files ---------------------------------------------------------------------------------


_loaded: dict[str, Any] = {}


def load(name: str) -> Any:
    """A results file's JSON; a ``.jsonl`` (one or several JSON records, however laid out) as a list."""
    if name not in _loaded:
        path = RESULTS / name  # read at call time: a test points RESULTS elsewhere
        if not path.is_file():
            raise FileNotFoundError(f"{name} is not in benchmarks/results")
        text = path.read_text()
        if name.endswith(".jsonl"):
            decoder, records, at = json.JSONDecoder(), [], 0
            while at < len(text):
                while at < len(text) and text[at].isspace():
                    at += 1
                if at < len(text):
                    record, at = decoder.raw_decode(text, at)
                    records.append(record)
            _loaded[name] = records
        else:
            _loaded[name] = json.loads(text)
    return _loaded[name]


def lookup(name: str, key: str) -> Any:
    """The value at ``key`` in results file ``name``."""
    value = load(name)
    for index, quoted, field in re.findall(r'\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]|([^.\[\]]+)', key):
        value = value[int(index)] if index else value[json.loads(quoted) if quoted else field]
    return value


_REFERENCE = re.compile(r"\{([\w.+-]+\.jsonl?):([^}]+)\}")
_FUNCTIONS = {"abs": abs, "min": min, "max": max}


def derive(expression: str) -> float:
    """The value of a figure worked out from others: an arithmetic expression over ``{file:key}``
    references (``+ - * /``, parentheses, ``abs``, ``min``, ``max``), e.g. ``{a.json:x} - {b.json:y}``."""
    import ast

    names: dict[str, float] = {}

    def substitute(match: re.Match) -> str:
        name = f"v{len(names)}"
        names[name] = float(lookup(match.group(1), match.group(2)))
        return name

    tree = ast.parse(_REFERENCE.sub(substitute, expression), mode="eval")
    allowed = (
        ast.Expression,
        ast.BinOp,
        ast.UnaryOp,
        ast.Add,
        ast.Sub,
        ast.Mult,
        ast.Div,
        ast.USub,
        ast.UAdd,
        ast.Name,
        ast.Load,
        ast.Constant,
        ast.Call,
    )
    for node in ast.walk(tree):
        if not isinstance(node, allowed) or (
            isinstance(node, ast.Name) and node.id not in {*names, *_FUNCTIONS}
        ):
            raise ValueError(f"not an arithmetic expression over {{file:key}} references: {expression!r}")
    return float(eval(compile(tree, "<figure>", "eval"), {"__builtins__": {}}, {**_FUNCTIONS, **names}))


def matches(figure: Figure, value: Any) -> bool:
    """``value`` is ``figure`` as quoted, to the figure's own places (a percentage may be stored as a
    fraction)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    candidates = [float(value)]
    if figure.kind == "percent":
        candidates.append(float(value) * 100)
    tolerance = 0.5 * 10**-figure.places + 1e-9
    return any(abs(c - figure.value) <= tolerance for c in candidates)


def _candidates(
    value: Any, key: str = "", strings: tuple[str, ...] = ()
) -> Iterator[tuple[str, float, tuple]]:
    """(key, number, the strings of every record around it) for every number in ``value``."""
    if isinstance(value, dict):
        strings = strings + tuple(v for v in value.values() if isinstance(v, str))
        for k, v in value.items():
            k = str(k)
            part = f"[{json.dumps(k)}]" if re.search(r"[.\[\]\s]", k) or not k else (f".{k}" if key else k)
            yield from _candidates(v, key + part, strings)
    elif isinstance(value, list):
        for n, v in enumerate(value):
            yield from _candidates(v, f"{key}[{n}]", strings)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield key, float(value), strings


def _parent(key: str) -> str:
    return re.sub(r"(\.[^.\[\]]+|\[[^\]]+\])$", "", key)


def score(figure: Figure, key: str, strings: tuple[str, ...], previous: str | None) -> float:
    """How well ``key`` fits ``figure``'s line: the line names its record (a recipe, a variant), the key's
    words are the line's words (test, binary, wall), ``x +- y`` reads a mean and a spread, and figures of
    one line come from one record."""
    line = figure.context
    words = set(re.findall(r"[a-z]+", line.lower()))
    points = 3.0 * sum(1 for text in set(strings) if len(text) >= 4 and text in line)
    points += 0.5 * sum(1 for word in re.findall(r"[a-z]{3,}", key.lower()) if word in words)
    last = re.split(r"[.\[]", key)[-1].lower()
    if figure.before.rstrip().endswith(("+-", "±")):
        points += 2.0 * any(w in last for w in ("std", "spread", "sd", "se"))
    elif figure.after.lstrip().startswith(("+-", "±")):
        points += 2.0 * ("mean" in last or "difference" in last)
    if figure.kind == "seconds":
        points += 1.0 * any(w in key.lower() for w in ("second", "wall", "_s", "time"))
    if previous is not None:
        points += 2.0 * (_parent(previous) == _parent(key))
    return points


def resolve(figure: Figure, previous: tuple[str, str] | None = None) -> tuple[str, str] | None:
    """The (file, key) whose value matches the figure, among the files nearest it (its line, paragraph,
    section, linked sections), the best :func:`score` first and the file's order after."""
    for level in figure.files:
        best, best_points = None, -1.0
        for name in level:
            try:
                candidates = list(_candidates(load(name)))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            for key, value, strings in candidates:
                if matches(figure, value):
                    same_file = previous[1] if previous and previous[0] == name else None
                    points = score(figure, key, strings, same_file)
                    if points > best_points:
                        best, best_points = (name, key), points
        if best is not None:
            return best
    return None


# --- the index ----------------------------------------------------------------------------------------


def read_index(path: Path = INDEX) -> dict[str, list[list[Any]]]:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def annotate(path: Path = INDEX, docs: list[Path] | None = None) -> dict[str, int]:
    """Rebuild the index: entries of unchanged figures kept, the others resolved anew."""
    old = read_index(path)
    new: dict[str, list[list[Any]]] = {}
    counts = {"kept": 0, "resolved": 0, "unresolved": 0}
    for document in documents() if docs is None else docs:
        figures = figures_in(document)
        if not figures:
            continue
        # an entry is known by its figure, its line and which of that line's equal figures it is
        kept, seen = {}, Counter()
        previous_entries = old.get(_relative(document), [])
        for e in previous_entries:
            seen[e[0], e[3]] += 1
            kept[e[0], e[3], seen[e[0], e[3]]] = e
        seen = Counter()
        entries = []
        previous: tuple[str, str] | None = None
        for n, figure in enumerate(figures):
            if n == 0 or figures[n - 1].line != figure.line:
                previous = None
            seen[figure.text, _context(figure)] += 1
            entry = kept.get((figure.text, _context(figure), seen[figure.text, _context(figure)]))
            if (
                entry is None
                and len(previous_entries) == len(figures)
                and previous_entries[n][0] == figure.text
            ):
                # its line was reworded, the document's figures are the same ones in the same order: the
                # key carries over, a guess again unless the line still points to it
                entry = [*previous_entries[n][:3], _context(figure)]
                if resolve(figure, previous) != (entry[1], entry[2]):
                    entry.append("guessed")
            if entry is not None and entry[1]:
                counts["kept"] += 1
                entries.append(entry)
                previous = (entry[1], entry[2])
                continue
            found = resolve(figure, previous)
            previous = found or previous
            counts["resolved" if found else "unresolved"] += 1
            # a key found by value is a guess until someone reads it: check fails until "guessed" is deleted
            entries.append(
                [figure.text, *(found or (None, None)), _context(figure), *(["guessed"] if found else [])]
            )
        new[_relative(document)] = entries
    lines = [
        "# Every figure of README.md, docs/*.md and the recipe headers: [figure, results file, key, line]",
        "# in order per document. Checked by tests/test_figures.py; rebuilt by benchmarks/figures.py annotate.",
    ]
    for document, entries in new.items():
        lines.append(f"{document}:")
        lines += [f"  - {json.dumps(entry, ensure_ascii=False)}" for entry in entries]
    path.write_text("\n".join(lines) + "\n")
    return counts


def _context(figure: Figure) -> str:
    return figure.context[:100]


def problems(path: Path = INDEX, docs: list[Path] | None = None) -> list[str]:
    """What is wrong between the documents and the index: empty when every figure equals its key's value."""
    index = read_index(path)
    out = []
    seen = set()
    for document in documents() if docs is None else docs:
        name = _relative(document)
        figures = figures_in(document)
        entries = index.get(name, [])
        seen.add(name)
        for n, figure in enumerate(figures):
            where = f"{name}:{figure.line}: {figure.text}"
            if n >= len(entries) or entries[n][0] != figure.text or entries[n][3] != _context(figure):
                out.append(
                    f"{where} is not the index's figure {n + 1} of {name}: run benchmarks/figures.py annotate"
                )
                break
            _, file, key, _, *mark = entries[n]
            if mark:
                out.append(
                    f"{where}: its key {file}:{key} was guessed by annotate from an equal value: read it, correct "
                    'it if another is meant, and delete "guessed" from its entry in docs/figures.yaml'
                )
                continue
            if not file or not key:
                out.append(
                    f"{where} names no results file and key: name the file on its line or paragraph, "
                    "or set the entry's file and key in docs/figures.yaml"
                )
                continue
            try:
                value = derive(key) if file == "derived" else lookup(file, key)
            except (FileNotFoundError, KeyError, IndexError, TypeError, ValueError, SyntaxError) as err:
                out.append(f"{where}: {file} has no key {key} ({err})")
                continue
            if not matches(figure, value):
                out.append(f"{where} is {value} at {file}:{key}")
        else:
            if len(entries) > len(figures):
                out.append(
                    f"{name}: the index has {len(entries) - len(figures)} figures more than the text: "
                    "run benchmarks/figures.py annotate"
                )
    for name in set(index) - seen:
        out.append(f"docs/figures.yaml lists {name}, which is not a checked document")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    sub.add_parser("annotate")
    where = sub.add_parser("where")
    where.add_argument("figure")
    args = parser.parse_args()
    if args.command == "annotate":
        print(json.dumps(annotate()))
    elif args.command == "where":
        for document, entries in read_index().items():
            for entry in entries:
                if entry[0] == args.figure:
                    print(document, entry)
        return
    found = problems()
    with contextlib.suppress(BrokenPipeError):  # the output piped into head
        print("\n".join(found) or "every figure equals the value at its key")
    sys.exit(1 if found and args.command == "check" else 0)


if __name__ == "__main__":
    main()
