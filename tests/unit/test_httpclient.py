"""The HTTP endpoint's client (``envfs.kms.httpclient``) and the client side of the JSON 1.1
mapping (``awsjson.encode_request``/``decode_result``).

The client talks to ``tests.unit.endpointd``: a small threaded ``http.server`` on 127.0.0.1
that checks signatures with ``envfs.kms.sigv4.verify`` and answers through ``awsjson`` from
a real ``KeyService``, so that the client's tests do not depend on the daemon's listener
(the integration tests run the real one).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest

from envfs import errors
from envfs.kms import awsjson, sigv4
from envfs.kms.httpclient import (
    REPEATABLE,
    Credentials,
    Endpoint,
    EndpointUnavailableException,
    HTTPKMSClient,
    error_from_answer,
    loopback_server_uid,
    sign,
)
from envfs.kms.operations import OPERATIONS, ParamType
from envfs.kms.service import KeyService
from tests.tlscert import make_certificate
from tests.unit.endpointd import (  # noqa: F401 (fixtures)
    REGION,
    ROOT,
    Endpointd,
    root_key_fixture,
    serve,
    server_fixture,
    service_fixture,
)


def client_for(url: str, credentials: Credentials, **kwargs: Any) -> HTTPKMSClient:
    kwargs.setdefault("sleep", lambda seconds: None)
    return HTTPKMSClient(Endpoint.parse(url), credentials, REGION, **kwargs)


# --- every operation ----------------------------------------------------------------------


def every_operation(call: Callable[[str, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Call every operation of ``OPERATIONS`` once, as root; each one's result (or the
    KMSError it raised) by name."""
    out: dict[str, Any] = {}

    def run(operation: str, **params: Any) -> Any:
        try:
            out[operation] = call(operation, params)
        except errors.KMSError as exc:
            out[operation] = exc
        return out[operation]

    key = run("CreateKey", Description="every operation", Tags=[{"TagKey": "t", "TagValue": "v"}])
    key_id = key["KeyMetadata"]["KeyId"]
    other = call("CreateKey", {})["KeyMetadata"]["KeyId"]
    run("DescribeKey", KeyId=key_id)
    run("ListKeys", Limit=5)
    run("DisableKey", KeyId=key_id)
    run("EnableKey", KeyId=key_id)
    run("UpdateKeyDescription", KeyId=key_id, Description="changed")
    run("CreateAlias", AliasName="alias/every", TargetKeyId=key_id)
    run("UpdateAlias", AliasName="alias/every", TargetKeyId=key_id)
    run("ListAliases", KeyId=key_id)
    run("TagResource", KeyId=key_id, Tags=[{"TagKey": "u", "TagValue": "w"}])
    run("UntagResource", KeyId=key_id, TagKeys=["u"])
    run("ListResourceTags", KeyId=key_id)
    context = {"purpose": "test", "$b": "not a tag"}
    sealed = run(
        "Encrypt", KeyId="alias/every", Plaintext=b"\x00secret\xff", EncryptionContext=context
    )
    run("Decrypt", CiphertextBlob=sealed["CiphertextBlob"], EncryptionContext=context)
    run(
        "ReEncrypt",
        CiphertextBlob=sealed["CiphertextBlob"],
        SourceEncryptionContext=context,
        DestinationKeyId=other,
    )
    run("GenerateDataKey", KeyId=key_id, KeySpec="AES_256", AuditNote="a note")
    run("GenerateDataKeyWithoutPlaintext", KeyId=key_id, NumberOfBytes=16)
    run("GenerateRandom", NumberOfBytes=32)
    run("EnableKeyRotation", KeyId=key_id, RotationPeriodInDays=90)
    run("GetKeyRotationStatus", KeyId=key_id)
    run("DisableKeyRotation", KeyId=key_id)
    run("RotateKeyOnDemand", KeyId=key_id)
    run("ListKeyRotations", KeyId=key_id)
    policy = run("GetKeyPolicy", KeyId=key_id)
    assert run("ListKeyPolicies", KeyId=key_id)["PolicyNames"] == ["default"]
    run("PutKeyPolicy", KeyId=key_id, Policy=policy["Policy"])
    run("ListAuditRecords", KeyId=key_id, Limit=3)
    run("VerifyAudit")
    made = run("CreateAccessKey", UserName="root")
    made_id = made["AccessKey"]["AccessKeyId"] if isinstance(made, dict) else "EKIAAAAAAAAAAAAAAAAA"
    run("ListAccessKeys", UserName="root")
    run("UpdateAccessKey", AccessKeyId=made_id, Status="Inactive")
    run("DeleteAccessKey", AccessKeyId=made_id)
    run("DeleteAlias", AliasName="alias/every")
    run("ScheduleKeyDeletion", KeyId=other, PendingWindowInDays=7)
    run("CancelKeyDeletion", KeyId=other)
    assert set(out) == set(OPERATIONS)
    return out


def _bytes_paths(value: Any, path: str = "") -> list[str]:
    if isinstance(value, bytes):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _bytes_paths(v, f"{path}.{k}")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _bytes_paths(v, f"{path}[{i}]")]
    return []


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, as JSON gives them back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def test_every_operation_s_result_round_trips_with_its_blobs_as_bytes(
    service: KeyService,
) -> None:
    results = every_operation(lambda op, params: service.handle(ROOT, op, params))
    for operation, result in results.items():
        assert isinstance(result, dict), (operation, result)
        # The table names exactly the fields that hold bytes (nowhere else, never nested).
        assert _bytes_paths(result) == [
            f".{name}" for name in result if name in awsjson.RESULT_BLOBS.get(operation, ())
        ]
        assert awsjson.decode_result(operation, awsjson.encode_result(result)) == _plain(result)


def _sample(kind: ParamType) -> Any:
    return {
        ParamType.STRING: 'text \u00e9"',
        ParamType.BLOB: bytes(range(256)),
        ParamType.INTEGER: 7,
        ParamType.BOOLEAN: True,
        ParamType.CONTEXT: {"k": "v", "$b": "x"},
        ParamType.TAGS: [{"TagKey": "k", "TagValue": "v"}],
        ParamType.STRING_LIST: ["a", "b"],
    }[kind]


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_every_operation_s_request_round_trips_through_the_server_s_parser(
    operation: str,
) -> None:
    params = {p.name: _sample(p.type) for p in OPERATIONS[operation].params}
    body = awsjson.encode_request(operation, {**params, "Ignored": None})
    assert awsjson.parse_request(awsjson.TARGET_PREFIX + operation, body) == (operation, params)
    for param in OPERATIONS[operation].params:
        if param.type is ParamType.BLOB:
            assert json.loads(body)[param.name] == base64.b64encode(bytes(range(256))).decode()


def test_a_request_that_cannot_be_sent_is_refused_before_sending() -> None:
    with pytest.raises(errors.InvalidRequestException, match=r"^unknown operation 'Nope'$"):
        awsjson.encode_request("Nope", {})
    with pytest.raises(errors.InvalidRequestException, match=r"^Encrypt: a parameter cannot"):
        awsjson.encode_request("Encrypt", {"Plaintext": {1, 2}})
    with pytest.raises(errors.InvalidRequestException, match=r"over the limit"):
        awsjson.encode_request("Encrypt", {"Plaintext": b"x" * awsjson.MAX_BODY})


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"not json",
        b'{"a": 1, "a": 2}',
        b'{"Plaintext": "%%%"}',
        b'{"Plaintext": 3}',
        b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}",  # the printers recurse
        b'{"a": [1e999]}',
    ],
)
def test_a_malformed_answer_is_the_service_s_fault(body: bytes) -> None:
    with pytest.raises(errors.KMSInternalException, match=r"^Decrypt: the answer"):
        awsjson.decode_result("Decrypt", body)


def test_an_answer_nested_up_to_the_limit_is_read() -> None:
    body = b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}"
    assert json.dumps(awsjson.decode_result("Decrypt", body)) == body.decode()


def test_an_unreadable_success_says_the_call_was_done(
    server: Endpointd, root_key: Credentials
) -> None:
    # A CreateKey whose answer is lost made its key all the same: not to be tried again.
    server.canned.append((200, b"<html>ok</html>"))
    with pytest.raises(
        errors.KMSInternalException,
        match=r"^CreateKey: the answer is not JSON \(the service answered 200 OK: the call was"
        r" done\)$",
    ):
        client_for(server.url, root_key).call("CreateKey", {})
    assert len(server.requests) == 1


def test_every_operation_through_the_client_as_the_socket_client_answers(
    service: KeyService, server: Endpointd, root_key: Credentials
) -> None:
    client = client_for(server.url, root_key)
    over_http = every_operation(client.call)
    direct = every_operation(lambda op, params: service.handle(ROOT, op, params))
    for operation, result in over_http.items():
        if operation in ("CreateAccessKey", "UpdateAccessKey", "DeleteAccessKey"):
            # Signed requests may not manage access keys (httpserver's rule, kept here).
            assert isinstance(result, errors.AccessDeniedException), result
            continue
        assert isinstance(result, dict), (operation, result)
        assert sorted(result) == sorted(direct[operation]), operation
        for name in awsjson.RESULT_BLOBS.get(operation, ()):
            assert isinstance(result[name], bytes), (operation, name)
    assert over_http["Decrypt"]["Plaintext"] == b"\x00secret\xff"
    # Each call had its own invocation id, signed.
    ids = [headers["amz-sdk-invocation-id"] for _, headers in server.requests]
    assert len(set(ids)) == len(ids)
    assert all("amz-sdk-invocation-id" in h["authorization"] for _, h in server.requests)


def test_identical_calls_in_one_second_are_not_refused_as_replays(
    server: Endpointd, root_key: Credentials
) -> None:
    client = client_for(server.url, root_key, clock=lambda: 1_900_000_000.0)
    server.replays = sigv4.ReplayCache()
    now = dt.datetime.fromtimestamp(1_900_000_000, dt.UTC)
    original = sigv4.verify

    def at_that_time(*args: Any, **kwargs: Any) -> str:
        return original(*args, **{**kwargs, "now": now})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sigv4, "verify", at_that_time)
        first = client.call("GenerateRandom", {"NumberOfBytes": 8})
        second = client.call("GenerateRandom", {"NumberOfBytes": 8})
    assert first != second


# --- signing ------------------------------------------------------------------------------


def test_the_signature_is_botocore_s() -> None:
    credentials = Credentials("EKIAJ5QW2LBVXZ3HK4MA", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    headers = [
        ("Host", "127.0.0.1:8443"),
        ("Content-Type", awsjson.CONTENT_TYPE),
        ("X-Amz-Target", "TrentService.ListKeys"),
        ("amz-sdk-invocation-id", "0f1e2d3c-0000-4000-8000-000000000000"),
        ("amz-sdk-request", "attempt=1; max=3"),
    ]
    body = b'{"Limit":5}'
    when = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    ours = dict(sign(headers, body, path="/", credentials=credentials, region=REGION, when=when))

    request = botocore.awsrequest.AWSRequest(
        method="POST",
        url="https://127.0.0.1:8443/",
        data=body,
        headers={k: v for k, v in headers if k != "Host"} | {"X-Amz-Date": "20260101T000000Z"},
    )
    request.context["timestamp"] = "20260101T000000Z"
    auth = botocore.auth.SigV4Auth(
        botocore.credentials.Credentials(credentials.access_key_id, credentials.secret_access_key),
        "kms",
        REGION,
    )
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    assert ours["Authorization"].endswith(f"Signature={signature}")
    assert ours["X-Amz-Date"] == "20260101T000000Z"
    assert (
        "SignedHeaders=amz-sdk-invocation-id;amz-sdk-request;content-type;host;x-amz-date;x-amz-target,"
        in ours["Authorization"]
    )


def test_a_session_token_is_signed_and_sent_and_the_service_refuses_it(
    server: Endpointd, root_key: Credentials
) -> None:
    with_token = Credentials(root_key.access_key_id, root_key.secret_access_key, "token")
    with pytest.raises(sigv4.UnrecognizedClientException, match="no temporary credentials") as err:
        client_for(server.url, with_token).call("ListKeys", {})
    assert err.value.exit_code == 12
    assert "x-amz-security-token" in server.requests[-1][1]["authorization"]


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(errors.KMSError.registry))
def test_every_known_error_name_is_its_class(name: str) -> None:
    error = error_from_answer(name, "text")
    assert type(error) is errors.KMSError.registry[name]
    assert error.aws_name == name and error.message == "text"


def test_sigv4_refusals_are_known_with_their_exit_code() -> None:
    for cls in (
        sigv4.MissingAuthenticationTokenException,
        sigv4.IncompleteSignatureException,
        sigv4.UnrecognizedClientException,
        sigv4.InvalidSignatureException,
    ):
        error = error_from_answer(cls.aws_name, "m")
        assert isinstance(error, cls) and error.exit_code == 12


def test_an_unknown_name_is_a_generic_kms_error_carrying_it() -> None:
    error = error_from_answer("KeyUnavailableException", "try later")
    assert isinstance(error, errors.KMSError)
    assert error.aws_name == "KeyUnavailableException" and error.exit_code == 10
    assert str(error) == "try later"
    # Made for the answer only: the Unix-socket client still reads the name as before.
    assert "KeyUnavailableException" not in errors.KMSError.registry
    assert type(errors.KMSError.from_wire("KeyUnavailableException", "m")) is (
        errors.KMSInternalException
    )


def test_the_endpoint_s_protocol_errors_exit_as_the_socket_s() -> None:
    for name in ("SerializationException", "UnknownOperationException"):
        error = error_from_answer(name, "m")
        assert isinstance(error, errors.InvalidRequestException) and error.aws_name == name
        assert error.exit_code == 28


def test_the_endpoint_unavailable_class_does_not_displace_the_socket_s() -> None:
    assert errors.KMSError.registry["KMSUnavailableException"] is errors.KMSUnavailableException
    assert EndpointUnavailableException("m", "h").exit_code == 27


@pytest.mark.parametrize(
    ("body", "name"),
    [
        (b'{"__type": "com.amazonaws.kms#NotFoundException", "message": "m"}', "NotFoundException"),
        (b'{"__type": "NotFoundException:http://x/", "Message": "m"}', "NotFoundException"),
        (b'{"__type": "NotFoundException", "message": "m"}', "NotFoundException"),
    ],
)
def test_aws_s_spellings_of_an_error_name_are_read(
    server: Endpointd, root_key: Credentials, body: bytes, name: str
) -> None:
    server.canned.append((400, body))
    with pytest.raises(errors.NotFoundException, match=r"^m$"):
        client_for(server.url, root_key).call("DescribeKey", {"KeyId": "x"})


def test_an_error_message_s_control_characters_never_reach_the_terminal(
    server: Endpointd, root_key: Credentials
) -> None:
    # A hostile endpoint's message, printed on stderr, could retitle or rewrite the terminal.
    message = "\x1b]0;owned\x07\x1b[2Jgone\x9b1m\u202eevil\r\nenvfs: hint: run rm"
    answer = json.dumps({"__type": "NotFoundException", "message": message}).encode()
    server.canned.append((400, answer))
    with pytest.raises(errors.NotFoundException) as err:
        client_for(server.url, root_key).call("DescribeKey", {"KeyId": "x"})
    assert err.value.message == (
        "\\u001b]0;owned\\u0007\\u001b[2Jgone\\u009b1m\\u202eevil\\u000d\\u000aenvfs: hint: run rm"
    )


@pytest.mark.parametrize("body", [b"<html>bad gateway</html>", b'{"__type": "a b"}', b""])
def test_an_answer_without_an_aws_error_is_an_internal_error(
    server: Endpointd, root_key: Credentials, body: bytes
) -> None:
    server.canned.append((404, body))
    with pytest.raises(
        errors.KMSInternalException, match=r"answered HTTP 404 without an AWS error"
    ):
        client_for(server.url, root_key).call("DescribeKey", {"KeyId": "x"})


def test_a_wrong_secret_is_the_service_s_signature_refusal(
    server: Endpointd, root_key: Credentials
) -> None:
    wrong = Credentials(root_key.access_key_id, "A" * 40)
    with pytest.raises(sigv4.InvalidSignatureException) as err:
        client_for(server.url, wrong).call("ListKeys", {})
    assert err.value.exit_code == 12
    assert len(server.requests) == 1  # not retried


# --- retries ------------------------------------------------------------------------------


_FAULT = (500, b'{"__type": "KMSInternalException", "message": "boom"}')
_THROTTLED = (400, b'{"__type": "ThrottlingException", "message": "slow down"}')


def test_a_repeatable_call_is_retried_after_a_fault(
    server: Endpointd, root_key: Credentials
) -> None:
    server.canned.append(_FAULT)
    result = client_for(server.url, root_key).call("GenerateRandom", {"NumberOfBytes": 4})
    assert len(result["Plaintext"]) == 4
    attempts = [headers["amz-sdk-request"] for _, headers in server.requests]
    assert attempts == ["attempt=1; max=3", "attempt=2; max=3"]
    ids = {headers["amz-sdk-invocation-id"] for _, headers in server.requests}
    assert len(ids) == 1


def test_a_create_is_not_repeated_after_a_fault(server: Endpointd, root_key: Credentials) -> None:
    server.canned.append(_FAULT)
    with pytest.raises(errors.KMSInternalException, match=r"^boom$"):
        client_for(server.url, root_key).call("CreateKey", {})
    assert len(server.requests) == 1
    assert "CreateKey" not in REPEATABLE and "CreateAccessKey" not in REPEATABLE


def test_throttling_is_retried_for_any_operation_up_to_the_attempts(
    server: Endpointd, root_key: Credentials
) -> None:
    server.canned.extend([_THROTTLED, _THROTTLED])
    delays: list[float] = []
    client = client_for(server.url, root_key, sleep=delays.append)
    assert client.call("CreateKey", {})["KeyMetadata"]["Enabled"] is True
    assert len(delays) == 2 and 0 <= delays[0] <= 1 and 0 <= delays[1] <= 2
    server.canned.extend([_THROTTLED] * 3)
    with pytest.raises(errors.ThrottlingException, match=r"^slow down$"):
        client.call("CreateKey", {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_stopped_endpoint_cannot_be_reached_after_bounded_retries(
    root_key: Credentials,
) -> None:
    delays: list[float] = []
    client = client_for(f"http://127.0.0.1:{_free_port()}", root_key, sleep=delays.append)
    with pytest.raises(
        EndpointUnavailableException,
        match=r"^cannot reach the key service at 'http://127\.0\.0\.1:\d+': connection refused$",
    ) as err:
        client.call("CreateKey", {})  # nothing was sent: even a create may be tried again
    assert len(delays) == 2
    assert err.value.exit_code == 27 and "envfs kms serve --listen-http" in err.value.hint


def test_no_such_host_is_not_tried_again(
    root_key: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_host(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_host)
    delays: list[float] = []
    client = client_for("https://kms.invalid:8443", root_key, sleep=delays.append)
    with pytest.raises(
        EndpointUnavailableException,
        match=r"^cannot reach the key service at 'https://kms\.invalid:8443': no such host"
        r" \(Name or service not known\)$",
    ):
        client.call("ListKeys", {})
    assert delays == []


@pytest.mark.parametrize(("operation", "attempts"), [("CreateKey", 1), ("ListKeys", 3)])
def test_no_answer_in_time_is_a_timeout_repeated_only_where_harmless(
    root_key: Credentials, operation: str, attempts: int
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        client = client_for(f"http://127.0.0.1:{port}", root_key, read_timeout=0.2)
        with pytest.raises(
            errors.DependencyTimeoutException,
            match=r"did not answer within 0\.2 seconds \(the call may have been done\)$",
        ):
            client.call(operation, {})
        accepted = []
        listener.settimeout(0.5)
        try:
            while True:
                accepted.append(listener.accept()[0])
        except TimeoutError:
            pass
        for conn in accepted:
            conn.close()
        assert len(accepted) == attempts


def _timed_out(*args: object, **kwargs: object) -> None:
    raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")  # the kernel's, not a bound's


def test_the_system_s_tcp_timeout_without_a_bound_of_ours_is_a_clear_error(
    root_key: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With 0 (no bound) the kernel's ETIMEDOUT is still a TimeoutError; the message once
    # formatted the absent bound and the CLI answered "internal error: TypeError".
    with socket.socket() as listener:  # takes connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        unbounded = client_for(url, root_key, connect_timeout=None, read_timeout=None)
        with monkeypatch.context() as patch:
            patch.setattr(http.client.HTTPConnection, "getresponse", _timed_out)
            with pytest.raises(
                errors.DependencyTimeoutException,
                match=r"did not answer before the system's TCP timeout \(the call may have",
            ):
                unbounded.call("ListKeys", {})
    monkeypatch.setattr(socket, "create_connection", _timed_out)
    with pytest.raises(
        EndpointUnavailableException, match=r"no connection before the system's TCP timeout$"
    ):
        unbounded.call("ListKeys", {})


# --- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://kms.example.org", ("https", "kms.example.org", 443, "/")),
        ("https://kms.example.org:8443/", ("https", "kms.example.org", 8443, "/")),
        ("HTTPS://10.0.0.1:8443/kms", ("https", "10.0.0.1", 8443, "/kms")),
        ("http://127.0.0.1:8080", ("http", "127.0.0.1", 8080, "/")),
        ("http://127.8.9.10:8080", ("http", "127.8.9.10", 8080, "/")),
        ("http://[::1]:8080", ("http", "::1", 8080, "/")),
        ("http://localhost:8080", ("http", "localhost", 8080, "/")),
        ("http://LOCALHOST.", ("http", "localhost.", 80, "/")),
    ],
)
def test_good_urls(url: str, expected: tuple[str, str, int, str]) -> None:
    endpoint = Endpoint.parse(url)
    assert (endpoint.scheme, endpoint.host, endpoint.port, endpoint.path) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://kms.example.org:8080", r"is plain http to a host that is not this machine"),
        ("http://10.0.0.1", r"is plain http to a host that is not this machine"),
        ("http://[::ffff:127.0.0.1]:80", r"is plain http to a host that is not this machine"),
        ("http://127.0.0.1.example.org", r"is plain http to a host that is not this machine"),
        ("ftp://127.0.0.1", r"is not an https:// URL"),
        ("127.0.0.1:8080", r"is not an https:// URL"),
        ("kms.example.org", r"is not an https:// URL"),
        ("", r"is not a URL"),
        ("https://", r"names no host"),
        ("https://:8443", r"names no host"),
        ("https://host:99999", r"is not a URL: Port out of range"),
        ("https://host:port", r"is not a URL"),
        ("https://host:0", r"has port 0"),
        ("https://[::1", r"is not a URL"),
        ("https://host/ x", r"has spaces"),
        ("https://host/\nx", r"control"),
        ("https://host/?a=b", r"has a query or fragment"),
        ("https://host/#x", r"has a query or fragment"),
        ("https://host/?", r"has a query or fragment"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Endpoint.parse(url)


def test_credentials_in_a_url_are_refused_and_not_repeated() -> None:
    with pytest.raises(ValueError, match=r"^'https://\*\*\*@host:1/' holds credentials") as err:
        Endpoint.parse("https://EKIAJ5QW2LBVXZ3HK4MA:s3cr3tpassw0rd@host:1/")
    assert "s3cr3t" not in str(err.value) and "EKIA" not in str(err.value)


def test_plain_http_goes_to_loopback_only_even_when_a_name_resolves_elsewhere(
    root_key: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = client_for(f"http://localhost:{port}", root_key)
        real_create = socket.create_connection

        def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
            class ElsewhereSocket(socket.socket):
                def getpeername(self) -> Any:
                    return ("192.0.2.7", port)

            sock = real_create(("127.0.0.1", port), *args, **kwargs)
            return ElsewhereSocket(fileno=sock.detach())

        monkeypatch.setattr(socket, "create_connection", create_connection)
        with pytest.raises(EndpointUnavailableException, match=r"led to 192\.0\.2\.7"):
            client.call("ListKeys", {})


def test_plain_http_sends_nothing_to_a_listener_of_an_untrusted_uid(
    server: Endpointd, root_key: Credentials
) -> None:
    # Any local user may take a free loopback port: it would read the plaintexts, and could
    # replay the signed requests to the service (which never saw them) for 5 minutes.
    client = client_for(server.url, root_key, trusted_server_uids=frozenset({4242}))
    with pytest.raises(
        EndpointUnavailableException,
        match=rf"listening at '{server.url}' runs as uid {os.geteuid()}, which is not trusted",
    ):
        client.call("Encrypt", {"KeyId": "alias/x", "Plaintext": b"PLAINTEXT-MARK"})
    assert server.requests == []
    trusted = client_for(server.url, root_key, trusted_server_uids=frozenset({os.geteuid()}))
    assert "Keys" in trusted.call("ListKeys", {})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_listener_s_uid_is_read_from_the_kernel_s_table(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family)
    with listener, socket.create_connection((host, listener.getsockname()[1])) as conn:
        assert loopback_server_uid(conn) == os.geteuid()


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture
def tls_server(service: KeyService, tmp_path: Path) -> Iterator[tuple[Endpointd, Path]]:
    cert_file, key_file = make_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    for state in serve(Endpointd(service), context):
        yield state, cert_file


def test_https_with_the_ca_bundle_works(
    tls_server: tuple[Endpointd, Path], root_key: Credentials
) -> None:
    state, cert_file = tls_server
    client = client_for(state.url, root_key, ca_bundle=str(cert_file))
    assert "Keys" in client.call("ListKeys", {})


def test_https_never_writes_the_session_keys_to_sslkeylogfile(
    tls_server: tuple[Endpointd, Path],
    root_key: Credentials,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ssl.create_default_context honours it: what decrypts plaintexts and data keys, logged.
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "keys.log"))
    state, cert_file = tls_server
    client = client_for(state.url, root_key, ca_bundle=str(cert_file))
    assert "Keys" in client.call("ListKeys", {})
    assert not (tmp_path / "keys.log").exists()


def test_https_without_the_ca_is_a_certificate_error_and_not_retried(
    tls_server: tuple[Endpointd, Path], root_key: Credentials
) -> None:
    state, _ = tls_server
    delays: list[float] = []
    with pytest.raises(
        EndpointUnavailableException,
        match=r"^cannot reach the key service at 'https://127\.0\.0\.1:\d+' securely: its TLS"
        r" certificate does not verify \(self.signed certificate\)$",
    ) as err:
        client_for(state.url, root_key, sleep=delays.append).call("ListKeys", {})
    assert "--ca-bundle" in err.value.hint
    assert delays == [] and state.requests == []


def test_https_to_a_plain_http_server_is_a_handshake_error(
    server: Endpointd, root_key: Credentials
) -> None:
    url = server.url.replace("http://", "https://")
    with pytest.raises(EndpointUnavailableException, match=r"the TLS handshake failed"):
        client_for(url, root_key).call("ListKeys", {})


def test_an_unreadable_ca_bundle_is_named(
    server: Endpointd, root_key: Credentials, tmp_path: Path
) -> None:
    url = server.url.replace("http://", "https://")
    with pytest.raises(
        EndpointUnavailableException, match=r"^cannot use the CA bundle '.*nothing'"
    ):
        client_for(url, root_key, ca_bundle=str(tmp_path / "nothing")).call("ListKeys", {})


# --- secrets stay out of messages and logs -----------------------------------------------


def test_no_secret_in_errors_reprs_or_logs(
    server: Endpointd, root_key: Credentials, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = root_key.secret_access_key
    seen: list[str] = [repr(root_key), str(root_key)]
    client = client_for(server.url, root_key)
    sealed = client.call(
        "Encrypt",
        {
            "KeyId": client.call("CreateKey", {})["KeyMetadata"]["KeyId"],
            "Plaintext": b"PLAINTEXT-MARK",
        },
    )
    failures: list[Callable[[], Any]] = [
        lambda: client_for(server.url, Credentials(root_key.access_key_id, secret[::-1])).call(
            "ListKeys", {}
        ),
        lambda: client_for(f"http://127.0.0.1:{_free_port()}", root_key).call("ListKeys", {}),
        lambda: client.call("Decrypt", {"CiphertextBlob": sealed["CiphertextBlob"][:-1]}),
    ]
    server.canned.extend([_FAULT] * 3)
    failures.append(lambda: client.call("Encrypt", {"KeyId": "x", "Plaintext": b"PLAINTEXT-MARK"}))
    for fail in failures:
        with pytest.raises(errors.KMSError) as err:
            fail()
        seen += [str(err.value), repr(err.value), err.value.message]
        seen.append(getattr(err.value, "hint", ""))
    seen += [record.getMessage() for record in caplog.records]
    assert any("attempt" in line for line in seen)  # the retries were logged
    for text in seen:
        assert secret not in text and secret[::-1] not in text
        assert "PLAINTEXT-MARK" not in text and "Signature=" not in text


@pytest.mark.parametrize(
    "credentials",
    [
        Credentials("EKIAAAAAAAAAAAAAAAAA\r", "s" * 40),
        Credentials("EKIAAAAAAAAAAAAAAAAA", "s" * 40, "TOKEN-MARK\r"),
        Credentials("EKIA AAAAAAAAAAAAAAA", "s" * 40),
    ],
)
def test_credentials_a_header_cannot_carry_are_refused_without_quoting_them(
    server: Endpointd, credentials: Credentials
) -> None:
    # http.client's own refusal quotes the header: the signature, or the session token.
    with pytest.raises(errors.InvalidRequestException, match=r"^the access key id or the") as err:
        client_for(server.url, credentials).call("ListKeys", {})
    assert "Signature=" not in str(err.value) and "TOKEN-MARK" not in str(err.value)
    assert server.requests == []


# --- a hostile server's answers -----------------------------------------------------------


@contextlib.contextmanager
def answering(*answers: bytes) -> Iterator[str]:
    """A server on 127.0.0.1 that reads one request per connection and writes the next of
    ``answers`` as is (status line, headers and body): the URL to call."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        for answer in answers:
            try:
                conn = listener.accept()[0]
            except OSError:
                return
            with conn:
                received = b""
                while b"\r\n\r\n" not in received:
                    received += conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        thread.join(5)


def test_a_content_length_int_refuses_is_no_internal_error(root_key: Credentials) -> None:
    # "²" is a digit to str.isdigit() and not to int(), nor are 5000 digits: both were an
    # uncaught ValueError. The first is read to the end, the second is over the limit.
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
    with answering(head + b"\xb2\r\n\r\n{}", head + b"9" * 5000 + b"\r\n\r\n{}") as url:
        client = client_for(url, root_key, max_attempts=1)
        assert client.call("ListKeys", {}) == {}
        with pytest.raises(
            errors.KMSInternalException, match=r"announced an answer over the limit of 16777216"
        ):
            client.call("ListKeys", {})


@contextlib.contextmanager
def trickling(first: bytes, then: bytes, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A server on 127.0.0.1 (over ``tls`` if given) that takes one connection, reads once,
    sends ``first``, then a byte of ``then`` every 50 ms for at most 3 seconds (a test
    without a bound fails, not hangs): the address to call."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        try:
            conn = listener.accept()[0]
            if tls is not None:
                conn = tls.wrap_socket(conn, server_side=True)
        except OSError:
            return
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(first)
            for byte in then[:60]:
                conn.sendall(bytes([byte]))
                time.sleep(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_answer_sent_a_byte_at_a_time_is_bounded_by_the_read_timeout(
    root_key: Credentials, tmp_path: Path, scheme: str
) -> None:
    # Each wait is short, so the socket's timeout alone never trips.
    cert_file, key_file = make_certificate(tmp_path)
    tls = None
    if scheme == "https":
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert_file, key_file)
    with trickling(b"HTTP/1.1 200 OK\r\n", b"X" * 100, tls) as address:
        client = client_for(
            f"{scheme}://{address}",
            root_key,
            read_timeout=0.5,
            max_attempts=1,
            ca_bundle=str(cert_file),
        )
        began = time.monotonic()
        with pytest.raises(
            errors.DependencyTimeoutException, match=r"did not answer within 0\.5 seconds"
        ):
            client.call("ListKeys", {})
        assert time.monotonic() - began < 1.5
