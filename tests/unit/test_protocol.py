"""The key-service wire protocol: framing, tagged bytes, request and answer shapes."""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

import pytest

from envfs.errors import (
    InvalidRequestException,
    KMSInternalException,
    NotFoundException,
    ThrottlingException,
)
from envfs.kms import protocol


def frame_of(text: str | bytes) -> bytes:
    payload = text.encode() if isinstance(text, str) else text
    return struct.pack(">I", len(payload)) + payload


def split_frame(frame: bytes) -> bytes:
    length = protocol.frame_length(frame[:4])
    assert len(frame) == 4 + length
    return frame[4:]


def round_trip(message: dict[str, Any]) -> dict[str, Any]:
    return protocol.decode_payload(split_frame(protocol.encode_frame(message)))


# --- framing -----------------------------------------------------------------------------


def test_frame_is_big_endian_length_and_utf8_json() -> None:
    frame = protocol.encode_frame({"v": 1, "op": "Ünïcode"})
    payload = '{"v":1,"op":"Ünïcode"}'.encode()
    assert frame == struct.pack(">I", len(payload)) + payload


def test_encode_decode_round_trip() -> None:
    message = {"v": 1, "ok": {"a": [1, 2.5, None, True, "x"], "b": {}}}
    assert round_trip(message) == message


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    assert protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME)) == protocol.MAX_FRAME


def test_oversize_length_is_refused() -> None:
    with pytest.raises(
        InvalidRequestException, match=r"^frame of 1048577 bytes is larger than the 1048576-byte"
    ):
        protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME + 1))


def test_garbage_header_is_an_oversize_length() -> None:
    with pytest.raises(InvalidRequestException, match="larger than"):
        protocol.frame_length(b"GET ")


def test_empty_frame_and_short_header_are_refused() -> None:
    with pytest.raises(InvalidRequestException, match=r"^frame is empty$"):
        protocol.frame_length(b"\0\0\0\0")
    with pytest.raises(InvalidRequestException, match=r"^frame header must be 4 bytes, got 3$"):
        protocol.frame_length(b"\0\0\1")


def test_encoding_an_oversize_message_is_refused() -> None:
    with pytest.raises(InvalidRequestException, match=r"frame limit$"):
        protocol.encode_frame({"x": "a" * protocol.MAX_FRAME})


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": object()}, {"x": "\ud800"}])
def test_encoding_what_json_cannot_carry_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestException, match=r"^message cannot be encoded as JSON"):
        protocol.encode_frame(bad)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe", r"^frame payload is not valid UTF-8$"),
        (b"{not json", r"^frame payload is not valid JSON"),
        (b'{"a": 1, "a": 2}', r"duplicate key"),
        (b'{"a": NaN}', r"NaN is not allowed"),
        (b"[1, 2]", r"^frame payload must be a JSON object, got an array$"),
        (b'"text"', r"got a string$"),
        (b"null", r"got null$"),
        (b"[" * 100_000, r"not valid JSON|nested too deeply"),
    ],
)
def test_malformed_payloads_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestException, match=message):
        protocol.decode_payload(payload)


# --- tagged values -----------------------------------------------------------------------


def test_bytes_are_tagged_base64() -> None:
    assert protocol.to_wire(b"\x00\xffhi") == {"$b": "AP9oaQ=="}
    assert protocol.from_wire({"$b": "AP9oaQ=="}) == b"\x00\xffhi"
    assert protocol.to_wire(bytearray(b"a")) == {"$b": "YQ=="}
    assert protocol.to_wire(b"") == {"$b": ""}
    assert protocol.from_wire({"$b": ""}) == b""


def test_nested_bytes_round_trip_through_a_frame() -> None:
    value = {
        "CiphertextBlob": b"\x01" * 40,
        "List": [b"a", {"Deep": [b"b", "str"]}, []],
        "Context": {"k": "v"},
        "Tuple": (b"c", 1),
    }
    wire = protocol.to_wire(value)
    decoded = protocol.from_wire(round_trip(wire))
    assert decoded == {**value, "Tuple": [b"c", 1]}


@pytest.mark.parametrize(
    "value",
    [
        {"$b": "not bytes, a string"},
        {"$o": "x"},
        {"$x": 1},
        {"$b": b"real bytes"},
        {"$": {"$b": b"x"}},
    ],
)
def test_user_objects_that_look_tagged_round_trip(value: dict[str, Any]) -> None:
    wire = protocol.to_wire(value)
    assert next(iter(wire)) == "$o"
    assert protocol.from_wire(round_trip({"x": wire}))["x"] == value


def test_objects_of_several_keys_are_never_tags() -> None:
    value = {"$b": "AAAA", "other": 1}
    assert protocol.to_wire(value) == value
    assert protocol.from_wire(value) == value


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ({"$b": 5}, r"^'\$b' must hold a base64 string$"),
        ({"$b": "a!=="}, r"^'\$b' holds malformed base64$"),
        ({"$b": "abc"}, r"^'\$b' holds malformed base64$"),
        ({"$b": "é"}, r"^'\$b' holds malformed base64$"),
        ({"$o": {"a": 1, "b": 2}}, r"^'\$o' must wrap an object of one key$"),
        ({"$o": [1]}, r"^'\$o' must wrap an object of one key$"),
        ({"$q": 1}, r"^unknown tag '\$q'$"),
    ],
)
def test_malformed_tags_are_refused(wire: Any, message: str) -> None:
    with pytest.raises(InvalidRequestException, match=message):
        protocol.from_wire(wire)


def test_unsendable_values_are_refused() -> None:
    with pytest.raises(InvalidRequestException, match=r"^a value of type set cannot be sent$"):
        protocol.to_wire({"x": {1}})
    with pytest.raises(InvalidRequestException, match=r"^object keys must be strings, got int$"):
        protocol.to_wire({1: "x"})


def test_nesting_is_limited() -> None:
    deep: Any = "leaf"
    for _ in range(protocol.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(InvalidRequestException, match=r"^value is nested deeper than 64 levels$"):
        protocol.to_wire(deep)
    with pytest.raises(InvalidRequestException, match=r"^value is nested deeper than 64 levels$"):
        protocol.from_wire(deep)


# --- requests ----------------------------------------------------------------------------


def test_request_round_trip() -> None:
    params = {"KeyId": "alias/x", "Plaintext": b"secret", "EncryptionContext": {"a": "b"}}
    wire = protocol.build_request("Encrypt", params)
    assert wire["v"] == 1
    assert wire["params"]["Plaintext"] == {"$b": "c2VjcmV0"}
    assert protocol.parse_request(round_trip(wire)) == ("Encrypt", params)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"op": "Encrypt", "params": {}}, r'^message has no protocol version "v"$'),
        ({"v": "1", "op": "Encrypt", "params": {}}, r"must be an integer, got '1'$"),
        ({"v": True, "op": "Encrypt", "params": {}}, r"must be an integer, got True$"),
        (
            {"v": 2, "op": "Encrypt", "params": {}, "new": 1},
            r"^protocol version 2 is not supported: this service speaks version 1$",
        ),
        ({"v": 1, "op": "Encrypt", "params": {}, "x": 1}, r"^request has unknown keys \['x'\]$"),
        ({"v": 1, "params": {}}, r'^request "op" must be a string naming an operation$'),
        ({"v": 1, "op": 5, "params": {}}, r'^request "op" must be a string'),
        ({"v": 1, "op": "FormatDisk", "params": {}}, r"^unknown operation 'FormatDisk'$"),
        ({"v": 1, "op": "Encrypt"}, r'^request "params" must be an object$'),
        ({"v": 1, "op": "Encrypt", "params": [1]}, r'^request "params" must be an object$'),
        ({"v": 1, "op": "Encrypt", "params": {"P": {"$b": 1}}}, r"base64 string$"),
    ],
)
def test_malformed_requests_are_refused(request_: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestException, match=message):
        protocol.parse_request(request_)


# --- answers -----------------------------------------------------------------------------


def test_ok_answer_round_trip() -> None:
    result = {"KeyId": "arn:x", "Plaintext": b"\x00" * 32, "Versions": [{"Blob": b"z"}]}
    wire = protocol.ok_response(result)
    assert json.loads(json.dumps(wire))["ok"]["Plaintext"] == {"$b": "A" * 43 + "="}
    assert protocol.parse_response(round_trip(wire)) == result


def test_error_answer_rebuilds_the_error_class() -> None:
    wire = protocol.error_response("NotFoundException", "key 'x' does not exist")
    assert wire == {
        "v": 1,
        "error": {"type": "NotFoundException", "message": "key 'x' does not exist"},
    }
    error = protocol.parse_response(round_trip(wire))
    assert type(error) is NotFoundException
    assert error.message == "key 'x' does not exist"


def test_throttling_answer_on_the_wire() -> None:
    message = "too many calls from uid 1000 (at most 2000 a second, 4000 at once)"
    frame = protocol.encode_frame(protocol.error_response("ThrottlingException", message))
    assert split_frame(frame) == (
        b'{"v":1,"error":{"type":"ThrottlingException","message":"too many calls from uid'
        b' 1000 (at most 2000 a second, 4000 at once)"}}'
    )
    error = protocol.parse_response(protocol.decode_payload(split_frame(frame)))
    assert type(error) is ThrottlingException
    assert error.message == message
    # Retry later: the filesystem answers EAGAIN, the command line exits 29.
    assert (error.errno, error.exit_code, error.aws_name) == (
        errno.EAGAIN,
        29,
        "ThrottlingException",
    )


def test_unknown_error_type_becomes_internal() -> None:
    error = protocol.parse_response(protocol.error_response("NoSuchThing", "m"))
    assert type(error) is KMSInternalException


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"v": 2, "ok": {}}, r"^protocol version 2 is not supported"),
        ({"v": 1}, r'exactly one of "ok" and "error"$'),
        ({"v": 1, "ok": {}, "error": {}}, r'exactly one of "ok" and "error"$'),
        ({"v": 1, "ok": []}, r'^answer "ok" must be an object$'),
        ({"v": 1, "error": {"type": "X"}}, r'^answer "error" must be'),
        ({"v": 1, "error": {"type": 1, "message": "m"}}, r'^answer "error" must be'),
        ({"v": 1, "ok": {"x": {"$b": "?"}}}, r"malformed base64$"),
    ],
)
def test_malformed_answers_are_refused(answer: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestException, match=message):
        protocol.parse_response(answer)
