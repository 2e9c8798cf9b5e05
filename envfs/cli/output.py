"""Printing answers as aws-cli v2 does: an optional ``--query``, then JSON, text or a table.

A response is first made printable: ``bytes`` become base64 text and the values of keys
ending in ``Date`` and of audit records' ``time`` (float seconds since the epoch) become
ISO 8601 UTC strings. The query, if any, then selects from that printable form, so
``--query CiphertextBlob`` yields the base64 text that ``base64 -d`` turns back into the
blob.

The query language is JMESPath, evaluated by the ``jmespath`` library as aws-cli does
(this module is the only importer of it). An expression that does not parse, or calls a
function that does not exist or with the wrong number of arguments, is refused before the
call is made; one that fails on the answer (a function given the wrong type) is refused
after it, without printing any part of the answer.

Output formats, as aws-cli v2 prints them:

- ``json``: indented by 4, non-ASCII kept; an empty object prints nothing.
- ``text``: a scalar prints as it is; a list of scalars prints tab-separated on one line; a
  map prints its scalar values (sorted by key) tab-separated on one line, prefixed by the
  upper-cased name of the key that held it, then each nested map or list the same way
  under its own key's name; the maps of one list share their columns.
- ``table``: boxes drawn with ``-``, ``|`` and ``+`` (see :mod:`envfs.cli.table`).

In every format a string's control and format characters (an escape sequence, a
right-to-left override) print as ``\\uXXXX`` (:func:`visible`), after the query.
"""

from __future__ import annotations

import base64
import json
import shutil
import unicodedata
import warnings
from datetime import UTC, datetime
from typing import Any, TextIO

import jmespath
from jmespath import exceptions as jmespath_errors
from jmespath.functions import Functions

from envfs.cli.table import draw_table
from envfs.errors import UsageError

OUTPUT_FORMATS = ("json", "text", "table")

# --- printable form ------------------------------------------------------------------------


def _is_date_key(key: str | None) -> bool:
    # AWS shapes name their dates ``...Date``; audit records carry a ``time``.
    return key is not None and (key.endswith("Date") or key == "time")


def printable(value: Any, key: str | None = None) -> Any:
    """Return ``value`` with bytes as base64 and date numbers as ISO 8601 UTC (a number
    out of the calendar's range stays a number)."""
    if isinstance(value, dict):
        return {k: printable(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v, key) for v in value]
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if _is_date_key(key) and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC).isoformat()
        except (OverflowError, OSError, ValueError):
            return value  # no date a calendar has (an endpoint's 1e20): the number as sent
    return value


# --- query ---------------------------------------------------------------------------------


class QueryError(UsageError):
    """A ``--query`` expression that does not parse, or that fails on the answer."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"argument --query: {reason}")
        self.reason = reason


# jmespath's own words for a token that does not fit; anything else it says is an
# explanation worth passing on.
_GENERIC_PARSE_ERRORS = ("invalid token", "syntax error", "Unexpected token", "Expecting")


def _parse_error_reason(error: jmespath_errors.ParseError, text: str) -> str:
    if isinstance(error, jmespath_errors.IncompleteExpressionError):
        return f"the expression {text!r} is incomplete"
    where = f"at character {error.lex_position + 1} of {text!r}"
    if isinstance(error, jmespath_errors.LexerError):
        what = error.message
    elif error.msg.startswith(_GENERIC_PARSE_ERRORS):
        what = f"unexpected {error.token_value!r}"
    else:
        what = error.msg.rstrip(".")
    return f"{what[:1].lower()}{what[1:]} {where}"


def _check_tree(node: Any, text: str, expref_allowed: bool = False) -> None:
    """Refuse what jmespath would only find while evaluating, or not at all.

    An unknown function or a wrong number of arguments is found only when evaluation
    reaches the call: refusing them here means a misspelt query never lets a create-key
    run and then fail to print. An expression reference (``&KeyId``) anywhere but as the
    argument of a function that takes one evaluates to an object no output can print.
    """
    table: dict[str, Any] = Functions.FUNCTION_TABLE
    kind = node.get("type")
    children = [child for child in node.get("children", ()) if isinstance(child, dict)]
    if kind == "expref" and not expref_allowed:
        takers = [f"{name}()" for name, spec in sorted(table.items()) if _takes_expref(spec)]
        listed = ", ".join(takers[:-1]) + f" or {takers[-1]}"
        raise QueryError(
            f"an expression reference (&...) is only an argument of {listed}, in {text!r}"
        )
    if kind != "function_expression":
        for child in children:
            _check_tree(child, text)
        return
    name = node["value"]
    if name not in table:
        raise QueryError(f"unknown function {name}() (JMESPath has {', '.join(sorted(table))})")
    signature = table[name]["signature"]
    wanted, given = len(signature), len(children)
    variadic = bool(signature) and signature[-1].get("variadic", False)
    if given < wanted or (given > wanted and not variadic):
        at_least = "at least " if variadic else ""
        plural = "" if wanted == 1 else "s"
        raise QueryError(
            f"function {name}() takes {at_least}{wanted} argument{plural}, got {given}"
        )
    for position, child in enumerate(children):
        spec = signature[min(position, wanted - 1)]
        _check_tree(child, text, "expref" in spec.get("types", ()))


def _takes_expref(spec: dict[str, Any]) -> bool:
    return any("expref" in argument.get("types", ()) for argument in spec["signature"])


class Query:
    """A compiled ``--query`` expression; :func:`compile_query` makes one."""

    def __init__(self, text: str, parsed: jmespath.parser.ParsedResult) -> None:
        self.text = text
        self._parsed = parsed

    def search(self, value: Any) -> Any:
        """The expression's result on ``value`` (a printable answer).

        Raises:
            QueryError: the expression fails on this value. The message never shows the
                value: it may hold plaintext or a data key.
        """
        try:
            return self._parsed.search(value)
        except jmespath_errors.JMESPathTypeError as e:
            expected = ", ".join(e.expected_types)
            article = "an" if e.actual_type[:1] in "aeiou" else "a"
            raise QueryError(
                f"function {e.function_name}() was given {article} {e.actual_type}, expected"
                f" {expected} (in {self.text!r})"
            ) from None
        except jmespath_errors.JMESPathError:
            raise QueryError(f"the expression {self.text!r} fails on this answer") from None


def compile_query(text: str) -> Query:
    """Compile a ``--query`` expression.

    Raises:
        QueryError: the expression is empty, does not parse, calls an unknown function or
            one with the wrong number of arguments, or has an expression reference (``&x``)
            outside the arguments of the functions that take one.
    """
    if not text.strip():
        raise QueryError("the expression is empty")
    try:
        with warnings.catch_warnings():
            # A backtick literal that is not JSON (`foo`) is read as a string, as aws-cli
            # reads it; jmespath warns that this form is deprecated, which is not the
            # user's concern here.
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            parsed = jmespath.compile(text)
    except jmespath_errors.ParseError as e:
        raise QueryError(_parse_error_reason(e, text)) from None
    except jmespath_errors.JMESPathError:
        raise QueryError(f"the expression {text!r} does not parse") from None
    _check_tree(parsed.parsed, text)
    return Query(text, parsed)


# --- rendering -----------------------------------------------------------------------------


def terminal_width() -> int:
    """Columns of the terminal on stdout (``$COLUMNS`` first), 80 when it is not one."""
    return shutil.get_terminal_size((80, 24)).columns


def render(
    response: Any,
    *,
    output: str,
    query: Query | None,
    stream: TextIO,
    title: str,
    width: int | None = None,
) -> None:
    """Print a response in the chosen ``output`` format (one of :data:`OUTPUT_FORMATS`).

    ``title`` heads a table (aws-cli uses the operation's name); ``width`` is the width a
    table should fit in (default: the terminal's).

    Raises:
        QueryError: the query fails on this response (nothing is printed).
    """
    value = printable(response)
    if query is not None:
        value = query.search(value)
    if output == "json":
        if value != {}:  # operations with an empty answer print nothing, as in aws-cli
            text = json.dumps(value, indent=4, ensure_ascii=False)
            stream.write(visible(text, keep="\n") + "\n")  # in strings, \uXXXX is JSON
    elif output == "table":
        value = _visible_strings(value)
        stream.write(draw_table(title, value, terminal_width() if width is None else width))
    else:
        lines: list[str] = []
        _text(_visible_strings(value), None, None, lines)
        stream.write("".join(line + "\n" for line in lines))


def visible(text: str, keep: str = "") -> str:
    """``text`` with its control and format characters but those in ``keep`` written as
    ``\\uXXXX``: an answer's strings are not all the user's own (a description another
    user wrote, an HTTP endpoint's answer), and an escape sequence among them would
    recolour, retitle or rewrite the terminal, a right-to-left override reorder a line."""
    return "".join(
        f"\\u{ord(char):04x}"
        if char not in keep and unicodedata.category(char) in ("Cc", "Cf")
        else char
        for char in text
    )


def _visible_strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {visible(str(k)): _visible_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_visible_strings(v) for v in value]
    return visible(value) if isinstance(value, str) else value


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


def _text(value: Any, name: str | None, columns: list[str] | None, lines: list[str]) -> None:
    if isinstance(value, dict):
        _text_map(value, name, columns, lines)
    elif isinstance(value, list):
        _text_list(value, name, lines)
    else:
        lines.append(str(value))  # None and booleans the Python way, as aws-cli prints them


def _text_row(cells: list[str], name: str | None, lines: list[str]) -> None:
    lines.append("\t".join([name.upper(), *cells] if name is not None else cells))


def _text_map(
    value: dict[str, Any], name: str | None, columns: list[str] | None, lines: list[str]
) -> None:
    """One row of scalars, then the nested values under their keys' names.

    ``columns`` (the scalar keys of all maps of one list) fixes the row's cells; as in
    aws-cli, a cell holds whatever that key holds in this map (absent: empty), and only
    the keys outside ``columns`` are printed as nested values.
    """
    if columns is None:
        cells = [str(v) for k, v in sorted(value.items()) if _is_scalar(v)]
        nested = sorted(k for k, v in value.items() if not _is_scalar(v))
    else:
        cells = [str(value.get(k, "")) for k in columns]
        nested = sorted(set(value) - set(columns))
    if cells:
        _text_row(cells, name, lines)
    for key in nested:
        _text(value[key], key, None, lines)


def _text_list(value: list[Any], name: str | None, lines: list[str]) -> None:
    if any(isinstance(v, dict) for v in value):
        maps = [v for v in value if isinstance(v, dict)]
        columns = sorted({k for m in maps for k, v in m.items() if _is_scalar(v)})
        for element in value:
            _text(element, name, columns, lines)
        return
    scalars = [str(v) for v in value if _is_scalar(v)]
    if scalars and name is None:
        _text_row(scalars, None, lines)
    else:
        for cell in scalars:
            _text_row([cell], name, lines)
    for element in value:
        if not _is_scalar(element):
            _text(element, name, None, lines)
