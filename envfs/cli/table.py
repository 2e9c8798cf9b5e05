"""``--output table``: an answer drawn in boxes, laid out as aws-cli v2 lays it out.

What goes where. The answer becomes a list of *sections*, each a title, an optional header
row, rows of cells and an indent level:

- a map: its scalar keys (sorted) are the headers of one row of their values; a map with
  a single scalar key gives one row ``key | value`` and no headers. Each key holding a
  map or a list (sorted) becomes a section of its own, titled by the key, one level
  deeper;
- a list of maps: a column table (headers: every scalar key of any of the maps, sorted; a
  missing one is an empty cell). When the maps hold nested values, each map after the
  first starts a new section repeating the title and headers, and its nested values
  follow it;
- any other list: a one-cell row per scalar and a row per list of scalars; deeper lists
  add their rows (or columns, for lists of maps) to the same section;
- empty lists and maps are left out, and an empty answer prints nothing. A scalar answer
  is one row under the title (aws-cli draws only the title there and loses the value).

How it is drawn. The table is as wide as its widest section needs (each column its widest
cell plus 4, the borders 2, each indent level 2 more; or the title and those edges). If
that is wider than the terminal, every section with headers and a single row is turned
on its side (a ``header | value`` row per column) and the width computed again. Then a
line of ``-``, and each section between one ``|`` per indent level on either side: its
title centred between ``|``; a ``+---+`` rule under a title that has nothing below it;
the columns stretched in proportion to fill the width (rounded half to even; what the
rounding adds is taken back from the first columns, what it misses given to the last);
the headers, centred, after a rule; the rows, each cell left-aligned after two spaces,
between rules. East Asian wide, full-width and ambiguous characters count as two columns.

Where aws-cli fails on an answer, with an error (a list mixing maps with other values,
rows of different lengths in one section) or by printing a map's keys in place of its
values (a map inside a list of scalars), this module still draws every value.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_CELL_PADDING = 4  # two spaces before a cell's text, at least two after it


def text_width(text: str) -> int:
    """Terminal columns ``text`` takes: two for wide and ambiguous East Asian characters."""
    return sum(2 if unicodedata.east_asian_width(char) in "WFA" else 1 for char in text)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


@dataclass
class _Section:
    title: str
    indent: int
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    # The widest cell of each column, of every header row and row ever added: a section
    # whose headers are replaced keeps the room the earlier ones took, as in aws-cli.
    widths: list[int] = field(default_factory=list)

    def _widen(self, cells: list[str]) -> None:
        for i, cell in enumerate(cells):
            if i == len(self.widths):
                self.widths.append(0)
            self.widths[i] = max(self.widths[i], text_width(cell))

    def set_headers(self, headers: list[str]) -> None:
        self.headers = headers
        self._widen(headers)

    def add_row(self, cells: list[str]) -> None:
        self.rows.append(cells)
        self._widen(cells)

    def natural_width(self) -> int:
        edges = 2 + 2 * self.indent
        columns = sum(w + _CELL_PADDING for w in self.widths)
        return max(text_width(self.title), columns) + edges

    def on_its_side(self) -> _Section:
        """A one-row section with headers as ``header | value`` rows."""
        turned = _Section(self.title, self.indent)
        for header, value in zip(self.headers, self.rows[0], strict=False):
            turned.add_row([header, value])
        return turned


def _scalar_keys(maps: list[Any]) -> list[str]:
    """Every key holding a scalar in any of the maps among ``maps``, sorted."""
    return sorted({k for m in maps if isinstance(m, dict) for k, v in m.items() if _is_scalar(v)})


class _Builder:
    """Turns an answer into sections, in the order they are drawn."""

    def __init__(self) -> None:
        self.sections: list[_Section] = []

    def add(self, title: str | None, value: Any, indent: int) -> None:
        """``value`` in a new section titled ``title``, or in the last one if ``title`` is None.

        Nothing for an empty value. A scalar given a title (a key that is nested in one map
        of a list and scalar in another) gets the title with nothing under it, as in
        aws-cli: its value is in the row above.
        """
        if not value:
            return
        if title is not None:
            self.sections.append(_Section(title, indent))
        if _is_scalar(value):
            return
        if isinstance(value, dict):
            self.map(value, indent)
        elif isinstance(value[0], dict):
            self.maps(title, value, indent)
        else:
            for element in value:
                self.item(element)

    def item(self, element: Any) -> None:
        """An element of a list that is not a list of maps: a row, or more rows."""
        current = self.sections[-1]
        if _is_scalar(element):
            current.add_row([str(element)])
        elif isinstance(element, dict):
            # aws-cli prints the map's keys here, in place of its values.
            self.add(current.title, element, current.indent + 1)
        elif all(_is_scalar(e) for e in element):
            current.add_row([str(e) for e in element])
        else:
            mismatched = current.rows and current.headers != _scalar_keys(element)
            if isinstance(element[0], dict) and mismatched:
                # Not under headers that are not its own (aws-cli fails there).
                self.sections.append(_Section("", current.indent))
            # Deeper lists join the current section, and their nested values start at the
            # top indent level, as aws-cli places them.
            self.add(None, element, 0)

    def map(self, value: dict[str, Any], indent: int) -> None:
        current = self.sections[-1]
        scalars = _scalar_keys([value])
        if len(scalars) == 1:
            current.add_row([scalars[0], str(value[scalars[0]])])
        elif scalars:
            current.set_headers(scalars)
            current.add_row([str(value[k]) for k in scalars])
        for key in sorted(k for k, v in value.items() if not _is_scalar(v)):
            self.add(key, value[key], indent + 1)

    def maps(self, title: str | None, value: list[Any], indent: int) -> None:
        headers = _scalar_keys(value)
        maps = [m for m in value if isinstance(m, dict)]
        nested = sorted({k for m in maps for k, v in m.items() if not _is_scalar(v)})
        self.sections[-1].set_headers(headers)
        after_other = False
        for position, element in enumerate(value):
            if not isinstance(element, dict):
                # aws-cli fails here; the value gets a section of its own rather than a row
                # under headers that are not its own.
                self.sections.append(_Section("", indent))
                self.item(element)
                after_other = True
                continue
            if position and (nested or after_other):
                self.sections.append(_Section(title or "", indent))
                self.sections[-1].set_headers(headers)
            after_other = False
            # As in aws-cli, a key that is scalar in another map shows what it holds here,
            # even a nested value (which then also gets its section below).
            self.sections[-1].add_row([str(element.get(h, "")) for h in headers])
            for key in nested:
                if key in element:
                    self.add(key, element[key], indent + 1)


def _fit(widths: list[int], total: int) -> list[int]:
    """``widths`` stretched in proportion so that they add up to exactly ``total``."""
    scale = total / sum(widths)
    fitted = [round(scale * w) for w in widths]
    excess = sum(fitted) - total
    order = list(range(len(fitted))) if excess > 0 else list(reversed(range(len(fitted))))
    step = 1 if excess > 0 else -1
    for turn in range(abs(excess)):
        fitted[order[turn % len(order)]] -= step
    return fitted


def _centred(text: str, width: int, left_edge: str) -> str:
    """``text`` centred in a cell ``width`` wide, right edge included."""
    start = width // 2 - text_width(text) // 2 - 1
    fill = width - len(left_edge) - start - text_width(text) - 1
    return f"{left_edge}{' ' * start}{text}{' ' * fill}|"


def _left_aligned(text: str, width: int, left_edge: str) -> str:
    size = text_width(text)
    padding = 2 if size + 2 + len(left_edge) + 1 <= width else 0
    fill = width - len(left_edge) - padding - size - 1
    return f"{left_edge}{' ' * padding}{text}{' ' * fill}|"


def _rule(widths: list[int]) -> str:
    return "+" + "".join("-" * (w - (2 if i == 0 else 1)) + "+" for i, w in enumerate(widths))


def _line(cells: list[str], widths: list[int], cell: Callable[[str, int, str], str]) -> str:
    """One line of cells; the first draws the left border, a short row gets empty cells."""
    cells = cells + [""] * (len(widths) - len(cells))
    pairs = enumerate(zip(cells, widths, strict=True))
    return "".join(cell(text, width, "" if i else "|") for i, (text, width) in pairs)


def _section_lines(section: _Section, inner: int) -> list[str]:
    lines = []
    if section.title:
        lines.append(_centred(section.title, inner, "|"))
        if not section.headers and not section.rows:
            lines.append(_rule([inner]))
    if not section.widths:
        return lines
    widths = _fit([w + _CELL_PADDING for w in section.widths], inner)
    if section.headers:
        lines += [_rule(widths), _line(section.headers, widths, _centred)]
    if section.rows:
        lines.append(_rule(widths))
        lines += [_line(row, widths, _left_aligned) for row in section.rows]
        lines.append(_rule(widths))
    return lines


def draw_table(title: str, value: Any, terminal_width: int) -> str:
    """The table of ``value`` (a printable answer) under ``title``, as text lines.

    ``terminal_width``: a wider table has its one-row sections turned on their side.
    """
    builder = _Builder()
    if _is_scalar(value):
        builder.sections.append(_Section(title, 0))
        builder.item(value)
    else:
        builder.add(title, value, 0)
    sections = builder.sections
    if not sections:
        return ""
    width = max(s.natural_width() for s in sections)
    if width > terminal_width:
        sections = [s.on_its_side() if s.headers and len(s.rows) == 1 else s for s in sections]
        width = max(s.natural_width() for s in sections)
    lines = ["-" * width]
    for section in sections:
        edge = "|" * section.indent
        inner = width - 2 * section.indent
        lines += [f"{edge}{line}{edge}" for line in _section_lines(section, inner)]
    return "".join(line + "\n" for line in lines)
