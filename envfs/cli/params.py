"""Turning command-line values into request parameters, the way aws-cli v2 reads them.

=============  ==========================================================================
type           accepted forms
=============  ==========================================================================
string         ``VALUE``; ``file://PATH`` for a file's text (``--policy file://p.json``)
blob           ``fileb://PATH`` for a file's raw bytes; ``file://PATH`` or a plain value
               for base64 text (see :func:`decode_base64`)
integer        a decimal integer
boolean        ``--flag`` or ``--no-flag``
context        ``k=v,k2=v2`` or a JSON object; may be repeated
tags           ``TagKey=k,TagValue=v`` (one tag per word, repeatable) or a JSON list of
               ``{"TagKey": ..., "TagValue": ...}``
string list    words separated by spaces and/or commas, or a JSON list of strings
=============  ==========================================================================

Every form except ``fileb://`` also accepts ``file://PATH`` and reads the value from the
file. A value that does not parse is a usage error naming the flag (exit code 2).
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

from envfs.errors import UsageError
from envfs.kms.operations import Operation, Param, ParamType

BLOB_HINT = "use fileb://PATH to pass a file's raw bytes"
_INTEGER_RE = re.compile(r"^[+-]?[0-9]+$")


class ArgumentError(UsageError):
    """A command-line value that does not parse; ``hint`` says how to write it."""

    def __init__(self, flag: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"argument {flag}: {message}")
        self.hint = hint


# No request to the key service may be larger (kms/protocol.py's frame, the HTTP
# endpoint's body), so no file given as a parameter needs to be.
MAX_FILE_BYTES = 1 << 20


def read_file_bytes(flag: str, path: str) -> bytes:
    """The contents of ``path`` (``~`` expanded), or a usage error naming ``flag``; at most
    :data:`MAX_FILE_BYTES`, so that ``fileb:///dev/zero`` or a disk image given by mistake
    is refused at once instead of filling the memory."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ArgumentError(flag, f"cannot read {path!r}: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ArgumentError(
            flag,
            f"{path!r} is larger than {MAX_FILE_BYTES} bytes, more than any request to the"
            " key service may carry",
        )
    return data


def read_file_text(flag: str, path: str) -> str:
    data = read_file_bytes(flag, path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArgumentError(
            flag, f"{path!r} is not UTF-8 text", "use fileb://PATH for binary data"
        ) from None


def _text(flag: str, raw: str) -> str:
    """``raw`` itself, or the text of the file a ``file://`` or ``fileb://`` prefix names."""
    for prefix in ("file://", "fileb://"):
        if raw.startswith(prefix):
            return read_file_text(flag, raw[len(prefix) :])
    return raw


_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def decode_base64(text: str) -> bytes:
    """The bytes of ``text``, which must be standard base64 exactly as an encoder writes it.

    Accepted: the standard alphabet (``A-Z a-z 0-9 + /``), padded with ``=`` to a multiple
    of 4 characters, with no stray bits in the last character; line breaks (LF or CRLF)
    anywhere, as ``base64`` and MIME wrap long text. Refused: spaces and tabs (``Some
    text`` is text, not base64 with a space to drop), the URL-safe ``-`` and ``_``, missing
    or extra padding.

    Raises:
        ValueError: why ``text`` is refused; positions count from 1 in ``text`` as given.
            The message never quotes ``text``.
    """
    for position, char in enumerate(text, 1):
        if char == " " or char == "\t":
            kind = "a space" if char == " " else "a tab"
            raise ValueError(f"character {position} is {kind}, which base64 does not use")
        if char not in _BASE64_ALPHABET and char not in "\r\n":
            raise ValueError(
                f"character {position} is outside the standard base64 alphabet"
                " (A-Z, a-z, 0-9, +, /, and = to pad)"
            )
    compact = text.replace("\r", "").replace("\n", "")
    if len(compact) % 4:
        raise ValueError(
            f"it has {len(compact)} characters (line breaks aside), not a multiple of 4"
        )
    body = compact.rstrip("=")
    if "=" in body or len(compact) - len(body) > 2:
        raise ValueError("'=' pads only the end, once or twice")
    data = base64.b64decode(compact)
    if base64.b64encode(data).decode("ascii") != compact:
        raise ValueError("its last character has bits set that an encoder leaves zero")
    return data


def parse_blob(flag: str, raw: str) -> bytes:
    """A blob flag's bytes: a file's with ``fileb://``, else decoded base64 text.

    Raises:
        ArgumentError: the file cannot be read, or the text is not base64. The message
            never quotes the value: a ``--plaintext`` value is the secret itself.
    """
    if raw.startswith("fileb://"):
        return read_file_bytes(flag, raw[len("fileb://") :])
    if raw.startswith("file://"):
        path = raw[len("file://") :]
        text, what, reads = read_file_text(flag, path), repr(path), "file:// reads base64 text"
    else:
        text, what, reads = raw, "the value", "a plain value is read as base64"
    try:
        return decode_base64(text)
    except ValueError as e:
        raise ArgumentError(
            flag, f"{what} is not valid base64: {e}", f"{reads}; {BLOB_HINT}"
        ) from None


def parse_integer(flag: str, raw: str) -> int:
    text = _text(flag, raw).strip()
    if not _INTEGER_RE.match(text):
        raise ArgumentError(flag, f"expected an integer, got {text!r}")
    return int(text)


def _json(flag: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ArgumentError(flag, f"invalid JSON ({e.msg} at character {e.pos + 1})") from None


def parse_context(flag: str, raws: list[str]) -> dict[str, str]:
    """``k=v,k2=v2`` words or JSON objects, merged; a key given twice is an error."""
    context: dict[str, str] = {}
    for raw in raws:
        text = _text(flag, raw).strip()
        pairs: list[tuple[str, str]] = []
        if text.startswith("{"):
            value = _json(flag, text)
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ArgumentError(flag, "expected a JSON object of strings")
            pairs.extend(value.items())
        else:
            for item in text.split(","):
                if not item.strip():
                    continue
                key, sep, val = item.partition("=")
                if not sep or not key.strip():
                    raise ArgumentError(
                        flag,
                        f"expected KEY=VALUE, got {item!r}",
                        "write k=v,k2=v2 or a JSON object",
                    )
                pairs.append((key.strip(), val))
        for key, val in pairs:
            if key in context:
                raise ArgumentError(flag, f"key {key!r} is given twice")
            context[key] = val
    return context


def parse_tags(flag: str, raws: list[str]) -> list[dict[str, str]]:
    tags: list[dict[str, str]] = []
    hint = 'write TagKey=KEY,TagValue=VALUE (one tag per word) or [{"TagKey": ..., ...}]'
    for raw in raws:
        text = _text(flag, raw).strip()
        if text.startswith("["):
            value = _json(flag, text)
            if not isinstance(value, list):
                raise ArgumentError(flag, "expected a JSON list of tags", hint)
            for element in value:
                if (
                    not isinstance(element, dict)
                    or set(element) != {"TagKey", "TagValue"}
                    or not all(isinstance(v, str) for v in element.values())
                ):
                    raise ArgumentError(
                        flag, f"expected {{'TagKey': str, 'TagValue': str}}, got {element!r}", hint
                    )
                tags.append({"TagKey": element["TagKey"], "TagValue": element["TagValue"]})
            continue
        tag: dict[str, str] = {}
        for item in text.split(","):
            name, sep, val = item.partition("=")
            name = name.strip()
            if not sep or name not in ("TagKey", "TagValue"):
                raise ArgumentError(flag, f"expected TagKey=KEY,TagValue=VALUE, got {text!r}", hint)
            if name in tag:
                raise ArgumentError(flag, f"{name} is given twice in {text!r}", hint)
            tag[name] = val
        if set(tag) != {"TagKey", "TagValue"}:
            raise ArgumentError(flag, f"expected TagKey=KEY,TagValue=VALUE, got {text!r}", hint)
        tags.append({"TagKey": tag["TagKey"], "TagValue": tag["TagValue"]})
    return tags


def parse_string_list(flag: str, raws: list[str]) -> list[str]:
    items: list[str] = []
    for raw in raws:
        text = _text(flag, raw).strip()
        if text.startswith("["):
            value = _json(flag, text)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ArgumentError(flag, "expected a JSON list of strings")
            items.extend(value)
        else:
            items.extend(part.strip() for part in text.split(",") if part.strip())
    return items


def convert(param: Param, raw: Any) -> Any:
    """The request value of ``param`` from what argparse collected for its flag."""
    flag = param.flag
    match param.type:
        case ParamType.STRING:
            return _text(flag, raw)
        case ParamType.BLOB:
            return parse_blob(flag, raw)
        case ParamType.INTEGER:
            return parse_integer(flag, raw)
        case ParamType.BOOLEAN:
            return bool(raw)
        case ParamType.CONTEXT:
            return parse_context(flag, raw)
        case ParamType.TAGS:
            return parse_tags(flag, raw)
        case ParamType.STRING_LIST:
            return parse_string_list(flag, raw)
    raise AssertionError(f"unhandled parameter type {param.type}")  # pragma: no cover


def build_request(operation: Operation, values: dict[str, Any]) -> dict[str, Any]:
    """The request for ``operation`` from the parsed flags (``values`` keyed by param name)."""
    request: dict[str, Any] = {}
    for param in operation.params:
        raw = values.get(param.name)
        if raw is not None:
            request[param.name] = convert(param, raw)
    return request
