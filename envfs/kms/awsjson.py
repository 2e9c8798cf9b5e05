"""AWS KMS's own wire protocol, JSON 1.1, as aws-cli and boto3 speak it (issue 13, in part).

A request is an HTTP ``POST`` whose ``X-Amz-Target`` header names the operation
(``TrentService.Encrypt``) and whose body is a JSON object of the operation's parameters,
with ``Content-Type: application/x-amz-json-1.1``. Binary parameters and results (a
``Plaintext``, a ``CiphertextBlob``) are base64 strings (standard alphabet, padded). A
success is ``200`` with the result as a JSON object; a failure is ``400`` (``500`` for the
service's own faults) with ``{"__type": "<AWS error name>", "message": "..."}``.

This module only translates, bytes in and bytes out: the operation names and parameter
types are :mod:`envfs.kms.operations`'s (the same table the Unix-socket protocol and the
CLI use), the decisions are the key service's, and the HTTP listener that frames these
bodies and authenticates callers (AWS Signature Version 4) is separate.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

from envfs.errors import InvalidRequestException, KMSError, KMSInternalException
from envfs.kms.operations import OPERATIONS, ParamType
from envfs.kms.protocol import loads_strict

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."
MAX_BODY = 1 << 20  # as the Unix-socket protocol's frames
MAX_RESULT_DEPTH = 32  # levels of objects and arrays in an answer; AWS's are under 8

# The service's own faults; everything else is the caller's (AWS answers those with 400).
_SERVER_STATUS = {
    "KMSInternalException": 500,
    "DependencyTimeoutException": 503,
    "KMSUnavailableException": 500,
}


class WireError(Exception):
    """A request that is not one of the protocol's (no operation, a body that is not a
    JSON object, a binary parameter that is not base64): answered with ``aws_name``."""

    def __init__(self, aws_name: str, message: str) -> None:
        super().__init__(message)
        self.aws_name = aws_name
        self.message = message


def parse_request(target: str | None, body: bytes) -> tuple[str, dict[str, Any]]:
    """The operation and parameters of a request (binary ones decoded to bytes); the
    parameters' other types and values are checked by the key service.

    Raises:
        WireError: ``UnknownOperationException`` (no or an unknown ``X-Amz-Target``),
            ``SerializationException`` (a body that is not a JSON object of at most
            :data:`MAX_BODY` bytes, or a binary parameter that is not base64).
    """
    if target is None or not target.startswith(TARGET_PREFIX):
        raise WireError("UnknownOperationException", "no TrentService operation was named")
    name = target[len(TARGET_PREFIX) :]
    operation = OPERATIONS.get(name)
    if operation is None:
        raise WireError("UnknownOperationException", f"unknown operation {name!r}")
    if len(body) > MAX_BODY:
        raise WireError("SerializationException", f"the body is larger than {MAX_BODY} bytes")
    try:
        params = loads_strict(body or b"{}")
    except RecursionError:
        raise WireError("SerializationException", "the body is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError is one
        raise WireError("SerializationException", f"the body is not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise WireError("SerializationException", "the body must be a JSON object")
    for param in operation.params:
        value = params.get(param.name)
        if param.type is ParamType.BLOB and value is not None:
            params[param.name] = _blob(param.name, value)
    return name, params


def encode_result(result: Mapping[str, Any]) -> bytes:
    """A success's body: the result as JSON, bytes as base64."""
    return json.dumps(_jsonable(result), separators=(",", ":")).encode()


def encode_error(error: KMSError | WireError) -> tuple[int, bytes]:
    """A failure's HTTP status and body."""
    name = error.aws_name
    body = {"__type": name, "message": error.message}
    return _SERVER_STATUS.get(name, 400), json.dumps(body, separators=(",", ":")).encode()


def _blob(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise WireError("SerializationException", f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise WireError("SerializationException", f"{name} is not valid base64") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --- the client's side (``envfs kms --endpoint-url``) ------------------------------------

# The results' binary fields, by operation: base64 on the wire, bytes to the caller, as the
# Unix-socket client returns them. ``operations`` describes parameters only; these are AWS
# KMS's output shapes for the operations envfs has (its own operations return no bytes).
RESULT_BLOBS: dict[str, tuple[str, ...]] = {
    "Encrypt": ("CiphertextBlob",),
    "Decrypt": ("Plaintext",),
    "ReEncrypt": ("CiphertextBlob",),
    "GenerateDataKey": ("CiphertextBlob", "Plaintext"),
    "GenerateDataKeyWithoutPlaintext": ("CiphertextBlob",),
    "GenerateRandom": ("Plaintext",),
}


def encode_request(operation: str, params: Mapping[str, Any]) -> bytes:
    """A request's body: the parameters as a JSON object, bytes as base64; ``None`` values
    left out (as the service drops them). The parameters' types are the service's to check.

    Raises:
        InvalidRequestException: an unknown operation, a value JSON cannot carry, or a body
            over :data:`MAX_BODY` bytes; nothing is to be sent.
    """
    if operation not in OPERATIONS:
        raise InvalidRequestException(f"unknown operation {operation!r}")
    present = {name: value for name, value in params.items() if value is not None}
    try:
        body = json.dumps(_jsonable(present), separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidRequestException(f"{operation}: a parameter cannot be sent: {exc}") from None
    if len(body) > MAX_BODY:
        raise InvalidRequestException(
            f"{operation}: the request is {len(body)} bytes, over the limit of {MAX_BODY}"
        )
    return body


def _unprintable(result: dict[str, Any]) -> str | None:
    """What in an answer the command line could not print, if anything: nesting deeper than
    :data:`MAX_RESULT_DEPTH` (its printers recurse: a hostile endpoint's ``[[[[…`` within
    the size limit was a ``RecursionError``) or a number too large for a float (``1e999``,
    read as infinity and printed as JSON's non-standard ``Infinity``)."""
    pending: list[tuple[Any, int]] = [(result, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return "has a number out of range"
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, (dict, list)):
            if depth > MAX_RESULT_DEPTH:
                return f"is nested over {MAX_RESULT_DEPTH} levels deep"
            pending.extend((child, depth + 1) for child in children)
    return None


def decode_result(operation: str, body: bytes) -> dict[str, Any]:
    """A success's result: the JSON object, its binary fields (:data:`RESULT_BLOBS`) as bytes.

    Raises:
        KMSInternalException: the body is not a JSON object, is nested too deeply or has
            a number out of range, or a binary field is not base64 text (the service's
            fault, as the socket client reports a bad answer).
    """
    try:
        result = loads_strict(body or b"{}")
    except (ValueError, RecursionError):
        raise KMSInternalException(f"{operation}: the answer is not JSON") from None
    if not isinstance(result, dict):
        raise KMSInternalException(f"{operation}: the answer is not a JSON object")
    problem = _unprintable(result)
    if problem:
        raise KMSInternalException(f"{operation}: the answer {problem}")
    for name in RESULT_BLOBS.get(operation, ()):
        value = result.get(name)
        if value is None:
            continue
        try:
            result[name] = _blob(name, value)
        except WireError:
            raise KMSInternalException(
                f"{operation}: the answer's {name} is not base64 text"
            ) from None
    return result
