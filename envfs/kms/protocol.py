"""Wire protocol of the key-service daemon, version 1.

The daemon (``envfs kms serve``) listens on a Unix stream socket that anyone may connect
to. Who is calling is learned from the kernel (``SO_PEERCRED``, ``SO_PEERGROUPS``), never
from a message. On one connection the client sends a request and reads its answer, then
the next request; answers come in request order.

Frame::

    u32 length (big-endian) || payload (``length`` bytes)

The payload is one JSON object in UTF-8. ``1 <= length <= 1 MiB`` (1,048,576); a longer
length is refused before any of the payload is read. JSON texts with duplicate object keys,
``NaN`` or ``Infinity`` are refused.

Messages::

    request   {"v": 1, "op": "GenerateDataKey", "params": {"KeyId": "alias/home", ...}}
    success   {"v": 1, "ok": {"KeyId": "arn:...", "Plaintext": {"$b": "..."}, ...}}
    failure   {"v": 1, "error": {"type": "NotFoundException", "message": "..."}}

``op`` and ``params`` are the AWS KMS operation name and parameters (see
``envfs.kms.operations``); ``ok`` holds the operation's result; ``error.type`` is the AWS
error name, from which the client rebuilds the same exception class (an unknown name
becomes ``KMSInternalException``). No other keys are allowed in these objects.

Bytes: JSON has no bytes type, so a bytes value anywhere inside ``params`` or ``ok`` is
sent as ``{"$b": "<base64>"}`` (standard alphabet, with padding). An object with exactly
one key that starts with ``$`` is such a tagged value: ``$b`` is bytes, ``$o`` wraps an
ordinary object whose only key happens to start with ``$`` (the encryption context
``{"$b": "x"}`` is sent as ``{"$o": {"$b": "x"}}``), any other tag is refused. Values nest
at most 64 levels deep.

Errors in the protocol itself are answered with ``InvalidRequestException``: a payload that
is not a JSON object, a missing or mistyped key, an unknown operation. When the framing
is lost (a length over the limit, a frame that does not arrive in time) the daemon sends
that answer and closes the connection; otherwise the connection stays usable. A daemon
that will not serve a connection at all (too many from one uid) sends one failure
answer before any request and closes it.

Timeouts (daemon defaults, see ``envfs.kms.server.serve``): a connection idle for 60 s
between requests is closed without an answer; a frame must arrive within 10 s of its first
byte, and an answer must be taken within 10 s. The client (``envfs.kms.client``) gives up
connecting after 5 s and on a call after 30 s.

Versioning: every message carries ``"v"``. A daemon answers in the version it speaks; a
request of any other version gets an ``InvalidRequestException`` answer naming the
supported version, and the connection stays usable. The version changes when the frame
or the message shapes change; a new operation or parameter does not change it (an unknown
operation is an ``InvalidRequestException``, an unknown parameter a
``ValidationException``).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping
from typing import Any

from envfs.errors import InvalidRequestException, KMSError
from envfs.kms.operations import OPERATIONS

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_FRAME = 1 << 20
MAX_DEPTH = 64

BYTES_TAG = "$b"
OBJECT_TAG = "$o"

_REQUEST_KEYS = frozenset({"v", "op", "params", "on_behalf_of"})


# --- framing -----------------------------------------------------------------------------


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """Serialize a message already in wire form (see :func:`to_wire`) into one frame.

    Raises:
        InvalidRequestException: the message is not JSON-serializable or the payload is
            larger than :data:`MAX_FRAME`.
    """
    try:
        text = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        payload = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        # UnicodeEncodeError (a lone surrogate) is a ValueError.
        raise InvalidRequestException(f"message cannot be encoded as JSON: {exc}") from None
    if len(payload) > MAX_FRAME:
        raise InvalidRequestException(
            f"message of {len(payload)} bytes is larger than the {MAX_FRAME}-byte frame limit"
        )
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    """The payload length announced by a 4-byte frame header.

    Raises:
        InvalidRequestException: the length is 0 or larger than :data:`MAX_FRAME`.
    """
    if len(header) != HEADER_SIZE:
        raise InvalidRequestException(
            f"frame header must be {HEADER_SIZE} bytes, got {len(header)}"
        )
    (length,) = HEADER.unpack(header)
    if length == 0:
        raise InvalidRequestException("frame is empty")
    if length > MAX_FRAME:
        raise InvalidRequestException(
            f"frame of {length} bytes is larger than the {MAX_FRAME}-byte limit"
        )
    return int(length)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in object")
    return result


def loads_strict(text: str | bytes) -> Any:
    """JSON as this service reads it from the wire: no object key twice, no ``NaN`` or
    ``Infinity``.

    Raises:
        ValueError: not such JSON (``json.JSONDecodeError`` is one).
        RecursionError: nested too deeply.
    """
    return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_refuse_constant)


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parse a frame's payload into a JSON object (still in wire form).

    Raises:
        InvalidRequestException: not UTF-8, not JSON, or not an object.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestException("frame payload is not valid UTF-8") from None
    try:
        value = loads_strict(text)
    except RecursionError:
        raise InvalidRequestException("frame payload is nested too deeply") from None
    except ValueError as exc:
        # json.JSONDecodeError is a ValueError, and so are the hooks' refusals.
        raise InvalidRequestException(f"frame payload is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequestException(
            f"frame payload must be a JSON object, got {_json_type(value)}"
        )
    return value


# --- values ------------------------------------------------------------------------------


def to_wire(value: Any, _depth: int = 0) -> Any:
    """Turn a Python value into its JSON form, tagging bytes (see the module docstring).

    Raises:
        InvalidRequestException: a value of a type JSON cannot carry, a non-string object
            key, or nesting deeper than :data:`MAX_DEPTH`.
    """
    if _depth > MAX_DEPTH:
        raise InvalidRequestException(f"value is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {BYTES_TAG: base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        obj: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequestException(
                    f"object keys must be strings, got {type(key).__name__}"
                )
            obj[key] = to_wire(item, _depth + 1)
        if len(obj) == 1 and next(iter(obj)).startswith("$"):
            return {OBJECT_TAG: obj}
        return obj
    if isinstance(value, list | tuple):
        return [to_wire(item, _depth + 1) for item in value]
    raise InvalidRequestException(f"a value of type {type(value).__name__} cannot be sent")


def from_wire(value: Any, _depth: int = 0) -> Any:
    """Undo :func:`to_wire` on a decoded JSON value: tagged objects become bytes again.

    Raises:
        InvalidRequestException: an unknown or malformed tag, or nesting deeper than
            :data:`MAX_DEPTH`.
    """
    if _depth > MAX_DEPTH:
        raise InvalidRequestException(f"value is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, list):
        return [from_wire(item, _depth + 1) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == BYTES_TAG:
            return _decode_bytes(inner)
        if tag == OBJECT_TAG:
            if not isinstance(inner, dict) or len(inner) != 1:
                raise InvalidRequestException(f"{OBJECT_TAG!r} must wrap an object of one key")
            return {key: from_wire(item, _depth + 1) for key, item in inner.items()}
        if tag.startswith("$"):
            raise InvalidRequestException(f"unknown tag {tag!r}")
    return {key: from_wire(item, _depth + 1) for key, item in value.items()}


def _decode_bytes(text: Any) -> bytes:
    if not isinstance(text, str):
        raise InvalidRequestException(f"{BYTES_TAG!r} must hold a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise InvalidRequestException(f"{BYTES_TAG!r} holds malformed base64") from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _check_version(message: Mapping[str, Any]) -> None:
    if "v" not in message:
        raise InvalidRequestException('message has no protocol version "v"')
    version = message["v"]
    if type(version) is not int:
        raise InvalidRequestException(f'protocol version "v" must be an integer, got {version!r}')
    if version != PROTOCOL_VERSION:
        raise InvalidRequestException(
            f"protocol version {version} is not supported: this service speaks version"
            f" {PROTOCOL_VERSION}"
        )


# --- requests ----------------------------------------------------------------------------


def build_request(
    operation: str, params: Mapping[str, Any], on_behalf_of: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The wire form of a request (pass it to :func:`encode_frame`).

    Args:
        on_behalf_of: ``(uid, gid)`` of the user a trusted service calls for.

    Raises:
        InvalidRequestException: a parameter value cannot be sent.
    """
    request = {"v": PROTOCOL_VERSION, "op": operation, "params": to_wire(dict(params))}
    if on_behalf_of is not None:
        request["on_behalf_of"] = {"uid": on_behalf_of[0], "gid": on_behalf_of[1]}
    return request


def parse_on_behalf_of(message: Mapping[str, Any]) -> tuple[int, int] | None:
    """The ``(uid, gid)`` a request is made on behalf of, or None.

    Raises:
        InvalidRequestException: ``on_behalf_of`` is not ``{"uid": N, "gid": N}``.
    """
    obo = message.get("on_behalf_of")
    if obo is None:
        return None
    if (
        not isinstance(obo, dict)
        or set(obo) != {"uid", "gid"}
        or not all(type(obo[k]) is int and 0 <= obo[k] < 2**32 - 1 for k in ("uid", "gid"))
    ):
        raise InvalidRequestException('request "on_behalf_of" must be {"uid": N, "gid": N}')
    return obo["uid"], obo["gid"]


def parse_request(message: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check a decoded request and return its operation name and parameters.

    Raises:
        InvalidRequestException: an unsupported version, a missing or unknown key, an
            unknown operation, or malformed parameters.
    """
    _check_version(message)
    unknown = sorted(set(message) - _REQUEST_KEYS)
    if unknown:
        raise InvalidRequestException(f"request has unknown keys {unknown}")
    operation = message.get("op")
    if not isinstance(operation, str):
        raise InvalidRequestException('request "op" must be a string naming an operation')
    if operation not in OPERATIONS:
        raise InvalidRequestException(f"unknown operation {operation!r}")
    params = message.get("params")
    if not isinstance(params, dict):
        raise InvalidRequestException('request "params" must be an object')
    decoded: dict[str, Any] = from_wire(params)
    return operation, decoded


# --- responses ---------------------------------------------------------------------------


def ok_response(result: Mapping[str, Any]) -> dict[str, Any]:
    """The wire form of a successful answer.

    Raises:
        InvalidRequestException: a result value cannot be sent.
    """
    return {"v": PROTOCOL_VERSION, "ok": to_wire(dict(result))}


def error_response(error_type: str, message: str) -> dict[str, Any]:
    """The wire form of a failed answer; ``error_type`` is an AWS error name."""
    return {"v": PROTOCOL_VERSION, "error": {"type": error_type, "message": message}}


def parse_response(message: Mapping[str, Any]) -> dict[str, Any] | KMSError:
    """Check a decoded answer: the result, or the error the service answered with.

    The service's error is returned, not raised, so that a caller can tell it apart from
    a malformed answer.

    Raises:
        InvalidRequestException: the answer itself is malformed.
    """
    _check_version(message)
    keys = set(message)
    if keys == {"v", "ok"}:
        result = message["ok"]
        if not isinstance(result, dict):
            raise InvalidRequestException('answer "ok" must be an object')
        decoded: dict[str, Any] = from_wire(result)
        return decoded
    if keys == {"v", "error"}:
        error = message["error"]
        if (
            not isinstance(error, dict)
            or set(error) != {"type", "message"}
            or not isinstance(error["type"], str)
            or not isinstance(error["message"], str)
        ):
            raise InvalidRequestException('answer "error" must be {"type": str, "message": str}')
        return KMSError.from_wire(error["type"], error["message"])
    raise InvalidRequestException('answer must hold exactly one of "ok" and "error"')
