"""Printing responses as aws-cli does: JSON or text, after an optional ``--query``.

A response is first made printable: ``bytes`` become base64 text and the values of keys
ending in ``Date`` and of audit records' ``time`` (float seconds since the epoch) become
ISO 8601 UTC strings. The query,
if any, then selects from that printable form, so ``--query CiphertextBlob`` yields the
base64 text that ``base64 -d`` turns back into the blob.

Query language: a subset of JMESPath.

=================  ===================================================================
``A``              the value of key ``A`` (``null`` if missing)
``A.B``            key ``B`` of the value of ``A``
``A[0]``           an element of a list (negative indexes count from the end)
``A[*].B``         projection: ``B`` of every element of list ``A`` (missing ones dropped)
``A[].B``          flatten ``A`` one level, then project like ``[*]``
``[A, B]``         multiselect list: ``[value of A, value of B]``; also after a dot or a
                   projection: ``Keys[*].[KeyId, KeyArn]``
=================  ===================================================================

Text output follows aws-cli's layout: a scalar prints as it is; a list of scalars prints
tab-separated on one line; a map prints its scalar values (sorted by key) tab-separated on
one line, prefixed by the upper-cased name of the key that held it, then each nested map or
list the same way under its own key's name.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

# --- printable form ------------------------------------------------------------------------


def _is_date_key(key: str | None) -> bool:
    # AWS shapes name their dates ``...Date``; audit records carry a ``time``.
    return key is not None and (key.endswith("Date") or key == "time")


def printable(value: Any, key: str | None = None) -> Any:
    """Return ``value`` with bytes as base64 and date numbers as ISO 8601 UTC."""
    if isinstance(value, dict):
        return {k: printable(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v, key) for v in value]
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if _is_date_key(key) and isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).isoformat()
    return value


# --- query ---------------------------------------------------------------------------------


class QueryError(ValueError):
    """A ``--query`` expression outside the supported subset."""


@dataclass(frozen=True)
class _Field:
    name: str


@dataclass(frozen=True)
class _Index:
    index: int


@dataclass(frozen=True)
class _Project:
    flatten: bool


@dataclass(frozen=True)
class _MultiSelect:
    choices: tuple[Query, ...]


_Step = _Field | _Index | _Project | _MultiSelect


@dataclass(frozen=True)
class Query:
    """A parsed ``--query`` expression; :func:`parse_query` makes one."""

    steps: tuple[_Step, ...]

    def search(self, value: Any) -> Any:
        return _evaluate(self.steps, value)


def _evaluate(steps: Sequence[_Step], value: Any) -> Any:
    for position, step in enumerate(steps):
        if value is None:
            return None
        if isinstance(step, _Field):
            value = value.get(step.name) if isinstance(value, dict) else None
        elif isinstance(step, _Index):
            if not isinstance(value, list) or not -len(value) <= step.index < len(value):
                return None
            value = value[step.index]
        elif isinstance(step, _MultiSelect):
            value = [choice.search(value) for choice in step.choices]
        else:
            if not isinstance(value, list):
                return None
            elements: list[Any] = value
            if step.flatten:
                elements = []
                for element in value:
                    if isinstance(element, list):
                        elements.extend(element)
                    else:
                        elements.append(element)
            rest = steps[position + 1 :]
            results = (_evaluate(rest, element) for element in elements)
            return [result for result in results if result is not None]
    return value


class _QueryParser:
    """Recursive descent over the expression text; positions are reported 1-based."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> QueryError:
        return QueryError(f"{what} at position {self.pos + 1} of query {self.text!r}")

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def peek(self) -> str:
        self.skip_spaces()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "the end"
            raise self.fail(f"expected {char!r}, found {found}")
        self.pos += 1

    def identifier(self) -> str:
        self.skip_spaces()
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isalnum() or self.text[self.pos] == "_"
        ):
            self.pos += 1
        if start == self.pos or self.text[start].isdigit():
            raise self.fail("expected a key name")
        return self.text[start : self.pos]

    def bracket(self, multiselect: bool) -> _Step:
        """After ``[``: an index, ``*``, ``]`` (flatten) or, if allowed, a multiselect list.

        As in JMESPath, a multiselect list starts an expression or follows a dot:
        ``[A, B]`` and ``A.[B, C]``, never ``A[B]``.
        """
        self.expect("[")
        char = self.peek()
        if char == "*":
            self.pos += 1
            self.expect("]")
            return _Project(flatten=False)
        if char == "]":
            self.pos += 1
            return _Project(flatten=True)
        if char == "-" or char.isdigit():
            start = self.pos
            self.pos += 1
            while self.pos < len(self.text) and self.text[self.pos].isdigit():
                self.pos += 1
            try:
                index = int(self.text[start : self.pos])
            except ValueError:
                raise self.fail("expected an index") from None
            self.expect("]")
            return _Index(index)
        if not multiselect:
            raise self.fail("expected an index, '*' or ']'")
        choices = [self.expression()]
        while self.peek() == ",":
            self.pos += 1
            choices.append(self.expression())
        self.expect("]")
        return _MultiSelect(tuple(choices))

    def expression(self) -> Query:
        steps: list[_Step] = []
        steps.append(self.bracket(True) if self.peek() == "[" else _Field(self.identifier()))
        while True:
            char = self.peek()
            if char == ".":
                self.pos += 1
                steps.append(
                    self.bracket(True) if self.peek() == "[" else _Field(self.identifier())
                )
            elif char == "[":
                steps.append(self.bracket(False))
            else:
                return Query(tuple(steps))


def parse_query(text: str) -> Query:
    """Parse a ``--query`` expression.

    Raises:
        QueryError: the expression is empty or uses syntax outside the subset.
    """
    parser = _QueryParser(text)
    if not parser.peek():
        raise QueryError("the query is empty")
    query = parser.expression()
    if parser.peek():
        raise parser.fail(
            f"unexpected {parser.peek()!r} (supported: A, A.B, A[0], A[*].B, A[].B, [A, B])"
        )
    return query


# --- rendering -----------------------------------------------------------------------------


def render(response: Any, *, output: str, query: Query | None, stream: TextIO) -> None:
    """Print a response in the chosen ``output`` format (``json`` or ``text``)."""
    value = printable(response)
    if query is not None:
        value = query.search(value)
    elif value == {}:
        return  # operations with an empty answer print nothing, as in aws-cli
    if output == "json":
        stream.write(json.dumps(value, indent=4, ensure_ascii=False) + "\n")
    else:
        _write_text(value, None, stream)


def _scalar_text(value: Any) -> str:
    return str(value)  # aws-cli prints None and booleans the Python way in text output


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


def _write_text(value: Any, name: str | None, stream: TextIO) -> None:
    if isinstance(value, dict):
        _write_map(value, name, None, stream)
    elif isinstance(value, list):
        _write_list(value, name, stream)
    else:
        stream.write(_scalar_text(value) + "\n")


def _write_row(cells: list[str], name: str | None, stream: TextIO) -> None:
    if name is not None:
        cells = [name.upper(), *cells]
    stream.write("\t".join(cells) + "\n")


def _write_map(
    value: dict[str, Any], name: str | None, columns: list[str] | None, stream: TextIO
) -> None:
    """One row of scalars (``columns`` fixes them for rows of a list), then the rest."""
    if columns is None:
        columns = sorted(k for k, v in value.items() if _is_scalar(v))
    if columns:
        cells = [
            _scalar_text(value[k]) if k in value and _is_scalar(value[k]) else "" for k in columns
        ]
        _write_row(cells, name, stream)
    for key in sorted(k for k, v in value.items() if not _is_scalar(v)):
        _write_text(value[key], key, stream)


def _write_list(value: list[Any], name: str | None, stream: TextIO) -> None:
    if not value:
        return
    if any(isinstance(v, dict) for v in value):
        # Rows of one table: every map gets the same columns, in the same order.
        columns = sorted(
            {k for v in value if isinstance(v, dict) for k, x in v.items() if _is_scalar(x)}
        )
        for element in value:
            if isinstance(element, dict):
                _write_map(element, name, columns, stream)
            else:
                _write_text(element, name, stream)
        return
    scalars = [v for v in value if _is_scalar(v)]
    if scalars:
        if name is None:
            _write_row([_scalar_text(v) for v in scalars], None, stream)
        else:
            for element in scalars:
                _write_row([_scalar_text(element)], name, stream)
    for element in value:
        if not _is_scalar(element):
            _write_text(element, name, stream)
