"""The key service's HTTP endpoint, served in-process on loopback: boto3 as a client, and
raw requests signed here for what boto3 will not send (skew, replays, oversized or slow
requests). Each test runs a real ``server.serve`` with its Unix socket and HTTP endpoint
over a temporary store."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import hmac
import http.client
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest
import trio

from envfs.errors import UsageError
from envfs.identity import Caller
from envfs.kms import server, sigv4
from envfs.kms.httpserver import (
    REPEAT_GRACE,
    HttpEndpoint,
    bind_tcp,
    client_network,
    is_loopback,
    parse_address,
    tls_context,
)
from envfs.kms.limits import Rate
from envfs.kms.model import AccessKeyStatus
from envfs.kms.service import KeyService
from envfs.kms.store import AccessKeyRecord, KeyStore
from tests.tlscert import make_certificate

REGION = "local-1"
ROOT = Caller(0, 0, frozenset({0}), "root", frozenset({"root"}))
NOBODY = Caller(65534, 65534, frozenset({65534}), "nobody")


@pytest.fixture(autouse=True)
def no_aws_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """boto3 reads no file of this machine's and no credentials from the environment."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@dataclass
class Key:
    access_key_id: str
    secret: str


@dataclass
class Endpoint:
    url: str
    service: KeyService
    root: Key
    nobody: Key

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self, key: Key, **config: Any) -> Any:
        session = boto3.session.Session(
            aws_access_key_id=key.access_key_id,
            aws_secret_access_key=key.secret,
            region_name=REGION,
        )
        return session.client(
            "kms",
            endpoint_url=self.url,
            config=botocore.config.Config(retries={"max_attempts": 1}, **config),
        )


def _access_key(service: KeyService, user: str) -> Key:
    out = service.handle(ROOT, "CreateAccessKey", {"UserName": user})["AccessKey"]
    return Key(out["AccessKeyId"], out["SecretAccessKey"])


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *, tls: ssl.SSLContext | None = None, **settings: Any
) -> AsyncIterator[Endpoint]:
    """A key service on a Unix socket and an HTTP endpoint on 127.0.0.1, with access keys
    for root and nobody."""
    KeyStore.init(tmp_path / REGION, REGION).close()
    service = KeyService(KeyStore.open(tmp_path / REGION, REGION))
    try:
        root, nobody = _access_key(service, "root"), _access_key(service, "nobody")
        http = HttpEndpoint(
            bind_tcp("127.0.0.1", 0),
            REGION,
            secret_for=service.signing_secret,
            key_used=service.access_key_used,
            tls=tls,
            **settings,
        )
        sock = server.bind_unix_socket(tmp_path / "kms.sock")
        async with trio.open_nursery() as nursery:
            address = await nursery.start(partial(server.serve, service.handle, sock, http=http))
            url = address.rsplit(" and ", 1)[1]
            yield Endpoint(url, service, root, nobody)
            nursery.cancel_scope.cancel()
    finally:
        service.close()


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[Endpoint]:
    async with serving(tmp_path) as ep:
        yield ep


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


def aws_error(exc: botocore.exceptions.ClientError) -> tuple[str, int]:
    return exc.response["Error"]["Code"], exc.response["ResponseMetadata"]["HTTPStatusCode"]


# --- raw requests, signed here ------------------------------------------------------------


def sign(
    ep: Endpoint,
    key: Key,
    operation: str,
    params: dict[str, Any],
    *,
    when: _dt.datetime | None = None,
    region: str = REGION,
) -> tuple[list[tuple[str, str]], bytes]:
    """The headers and body of a request signed with ``key`` at ``when`` (now)."""
    moment = when or _dt.datetime.now(_dt.UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    body = json.dumps(params).encode()
    headers = [
        ("Content-Type", "application/x-amz-json-1.1"),
        ("Host", f"127.0.0.1:{ep.port}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Target", f"TrentService.{operation}"),
    ]
    names = sorted(n.lower() for n, _ in headers)
    request = sigv4.SignedRequest("POST", "/", "", headers, body)
    canonical = sigv4.canonical_request(request, names, hashlib.sha256(body).hexdigest())
    scope = f"{amz_date[:8]}/{region}/kms/aws4_request"
    signature = hmac.new(
        sigv4.signing_key(key.secret.encode(), amz_date[:8], region, "kms"),
        sigv4.string_to_sign(amz_date, scope, canonical).encode(),
        hashlib.sha256,
    ).hexdigest()
    headers.append(
        (
            "Authorization",
            f"AWS4-HMAC-SHA256 Credential={key.access_key_id}/{scope},"
            f" SignedHeaders={';'.join(names)}, Signature={signature}",
        )
    )
    return headers, body


def send(
    ep: Endpoint, headers: list[tuple[str, str]], body: bytes, method: str = "POST"
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", ep.port, timeout=10)
    try:
        conn.putrequest(method, "/", skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


async def call_raw(
    ep: Endpoint, key: Key, operation: str, params: dict[str, Any], **kw: Any
) -> Any:
    headers, body = sign(ep, key, operation, params, **kw)
    return await in_thread(send, ep, headers, body)


# --- boto3 against the endpoint -----------------------------------------------------------


async def test_boto3_makes_a_key_encrypts_decrypts_and_gets_data_keys(endpoint: Endpoint) -> None:
    kms = endpoint.client(endpoint.root)
    key = (await in_thread(kms.create_key, Description="over http"))["KeyMetadata"]
    assert key["Arn"].startswith(f"arn:envfs:kms:{REGION}:")
    context = {"volume": "v1"}
    blob = (
        await in_thread(
            kms.encrypt, KeyId=key["KeyId"], Plaintext=b"Some text\n", EncryptionContext=context
        )
    )["CiphertextBlob"]
    out = await in_thread(kms.decrypt, CiphertextBlob=blob, EncryptionContext=context)
    assert out["Plaintext"] == b"Some text\n"
    assert out["KeyId"] == key["Arn"]
    data_key = await in_thread(kms.generate_data_key, KeyId=key["KeyId"], KeySpec="AES_256")
    assert len(data_key["Plaintext"]) == 32
    again = await in_thread(kms.decrypt, CiphertextBlob=data_key["CiphertextBlob"])
    assert again["Plaintext"] == data_key["Plaintext"]
    keys = await in_thread(kms.list_keys)
    assert [k["KeyId"] for k in keys["Keys"]] == [key["KeyId"]]


async def test_a_signed_request_is_decided_and_audited_as_the_key_s_user(
    endpoint: Endpoint,
) -> None:
    root, nobody = endpoint.client(endpoint.root), endpoint.client(endpoint.nobody)
    key_id = (await in_thread(root.create_key))["KeyMetadata"]["KeyId"]
    # nobody is neither a key creator nor named by the key's policy.
    for call in (
        partial(nobody.create_key),
        partial(nobody.encrypt, KeyId=key_id, Plaintext=b"x"),
        partial(nobody.disable_key, KeyId=key_id),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            await in_thread(call)
        assert aws_error(caught.value) == ("AccessDeniedException", 400)
        assert "nobody(65534)" in caught.value.response["Error"]["Message"]
    records = endpoint.service.handle(ROOT, "ListAuditRecords", {})["Records"]
    by_http = [r for r in records if "signed_with" in r]
    assert [(r["caller"]["uid"], r["operation"], r["outcome"]) for r in by_http] == [
        (0, "CreateKey", "Success"),
        (65534, "CreateKey", "AccessDeniedException"),
        (65534, "Encrypt", "AccessDeniedException"),
        (65534, "DisableKey", "AccessDeniedException"),
    ]
    assert by_http[0]["signed_with"]["access_key_id"] == endpoint.root.access_key_id
    assert by_http[1]["signed_with"]["access_key_id"] == endpoint.nobody.access_key_id
    assert by_http[1]["signed_with"]["source"].startswith("127.0.0.1:")
    # Calls from the kernel-known caller have no signed_with.
    assert all("signed_with" not in r for r in records if r["operation"] == "CreateAccessKey")


async def test_errors_reach_boto3_under_aws_names(endpoint: Endpoint) -> None:
    kms = endpoint.client(endpoint.root)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        await in_thread(kms.describe_key, KeyId="alias/none")
    assert aws_error(caught.value) == ("NotFoundException", 400)
    with pytest.raises(kms.exceptions.NotFoundException):
        await in_thread(kms.describe_key, KeyId="alias/none")


async def test_a_wrong_secret_an_unknown_key_and_another_region_are_refused(
    endpoint: Endpoint,
) -> None:
    wrong = Key(endpoint.root.access_key_id, "x" * 40)
    unknown = Key("EKIAAAAAAAAAAAAAAAAA", endpoint.root.secret)
    for key, name in (
        (wrong, "InvalidSignatureException"),
        (unknown, "UnrecognizedClientException"),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            await in_thread(endpoint.client(key).list_keys)
        assert aws_error(caught.value) == (name, 400)
    status, body = await call_raw(endpoint, endpoint.root, "ListKeys", {}, region="us-east-1")
    assert (status, body["__type"]) == (400, "InvalidSignatureException")
    assert "local-1" in body["message"]


async def test_an_unsigned_request_is_refused(endpoint: Endpoint) -> None:
    headers, body = sign(endpoint, endpoint.root, "ListKeys", {})
    unsigned = [(n, v) for n, v in headers if n != "Authorization"]
    status, answer = await in_thread(send, endpoint, unsigned, body)
    assert (status, answer["__type"]) == (403, "MissingAuthenticationTokenException")


async def test_a_request_too_old_or_from_the_future_is_refused(endpoint: Endpoint) -> None:
    now = _dt.datetime.now(_dt.UTC)
    for skew in (_dt.timedelta(minutes=-6), _dt.timedelta(minutes=6)):
        status, body = await call_raw(endpoint, endpoint.root, "ListKeys", {}, when=now + skew)
        assert (status, body["__type"]) == (400, "InvalidSignatureException")
        assert "Signature" in body["message"]
    status, body = await call_raw(
        endpoint, endpoint.root, "ListKeys", {}, when=now - _dt.timedelta(minutes=4)
    )
    assert status == 200, body


async def test_a_replayed_request_is_refused_after_the_repeat_grace(endpoint: Endpoint) -> None:
    headers, body = sign(endpoint, endpoint.root, "CreateKey", {"Description": "once"})
    first = await in_thread(send, endpoint, headers, body)
    assert first[0] == 200
    await trio.sleep(REPEAT_GRACE + 0.2)
    for operation in ("CreateKey", "ListKeys"):
        if operation == "ListKeys":
            headers, body = sign(endpoint, endpoint.root, "ListKeys", {})
            assert (await in_thread(send, endpoint, headers, body))[0] == 200
            await trio.sleep(REPEAT_GRACE + 0.2)
        status, answer = await in_thread(send, endpoint, headers, body)
        assert (status, answer["__type"]) == (400, "InvalidSignatureException")
        assert "replayed" in answer["message"]
    keys = endpoint.service.handle(ROOT, "ListKeys", {})["Keys"]
    assert len(keys) == 1


async def test_the_same_call_twice_in_one_second_is_served_twice(endpoint: Endpoint) -> None:
    # boto3 signs the time to the second and, by default, nothing else that changes
    # between calls: the same call twice in one second is the same request.
    kms = endpoint.client(endpoint.root)
    for _ in range(3):
        await in_thread(kms.create_key)
    assert len(endpoint.service.handle(ROOT, "ListKeys", {})["Keys"]) == 3
    key_id = (await in_thread(kms.create_key))["KeyMetadata"]["KeyId"]
    blob = (await in_thread(kms.encrypt, KeyId=key_id, Plaintext=b"p"))["CiphertextBlob"]
    for _ in range(3):
        await in_thread(kms.list_keys)
        await in_thread(kms.describe_key, KeyId=key_id)
    headers, body = sign(endpoint, endpoint.root, "Decrypt", {"CiphertextBlob": _b64(blob)})
    for _ in range(2):
        status, answer = await in_thread(send, endpoint, headers, body)
        assert status == 200 and answer["Plaintext"] == _b64(b"p")
    decrypts = [
        r
        for r in endpoint.service.handle(ROOT, "ListAuditRecords", {})["Records"]
        if r["operation"] == "Decrypt"
    ]
    assert len(decrypts) == 2  # each one audited


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


async def test_an_inactive_or_deleted_access_key_is_refused(endpoint: Endpoint) -> None:
    kms = endpoint.client(endpoint.nobody)
    await in_thread(kms.list_keys)
    params = {"AccessKeyId": endpoint.nobody.access_key_id, "Status": "Inactive"}
    endpoint.service.handle(ROOT, "UpdateAccessKey", params)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        await in_thread(kms.list_keys)
    assert aws_error(caught.value) == ("UnrecognizedClientException", 400)
    endpoint.service.handle(ROOT, "UpdateAccessKey", {**params, "Status": "Active"})
    await in_thread(kms.list_keys)
    endpoint.service.handle(ROOT, "DeleteAccessKey", {"AccessKeyId": params["AccessKeyId"]})
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        await in_thread(kms.list_keys)
    assert aws_error(caught.value) == ("UnrecognizedClientException", 400)


async def test_access_keys_are_not_managed_with_an_access_key(endpoint: Endpoint) -> None:
    for operation, params in (
        ("CreateAccessKey", {}),
        ("CreateAccessKey", {"UserName": "nobody"}),
        ("UpdateAccessKey", {"AccessKeyId": endpoint.nobody.access_key_id, "Status": "Inactive"}),
        ("DeleteAccessKey", {"AccessKeyId": endpoint.root.access_key_id}),
    ):
        status, body = await call_raw(endpoint, endpoint.root, operation, params)
        assert (status, body["__type"]) == (400, "AccessDeniedException"), (operation, body)
    listed = endpoint.service.handle(ROOT, "ListAccessKeys", {})["AccessKeyMetadata"]
    assert sorted(k["Status"] for k in listed) == ["Active", "Active"]
    status, body = await call_raw(endpoint, endpoint.nobody, "ListAccessKeys", {})
    assert status == 200
    assert [k["AccessKeyId"] for k in body["AccessKeyMetadata"]] == [endpoint.nobody.access_key_id]
    records = endpoint.service.handle(ROOT, "ListAuditRecords", {})["Records"]
    refused = [r for r in records if r["outcome"] == "AccessDeniedException"]
    assert len(refused) == 4


async def test_an_access_key_s_last_use_is_recorded(endpoint: Endpoint) -> None:
    before = endpoint.service.handle(ROOT, "ListAccessKeys", {"UserName": "nobody"})
    assert "LastUsedDate" not in before["AccessKeyMetadata"][0]
    await in_thread(endpoint.client(endpoint.nobody).list_keys)
    after = endpoint.service.handle(ROOT, "ListAccessKeys", {"UserName": "nobody"})
    assert after["AccessKeyMetadata"][0]["LastUsedDate"] >= time.time() - 60


async def test_a_user_that_no_longer_exists_is_refused(endpoint: Endpoint) -> None:
    key = _access_key(endpoint.service, "nobody")  # then its uid is given away below
    with endpoint.service.store.transaction():
        endpoint.service.store._conn.execute(
            "UPDATE access_keys SET uid=? WHERE access_key_id=?", (4_000_000_001, key.access_key_id)
        )
    status, body = await call_raw(endpoint, key, "ListKeys", {})
    # The sealed secret is bound to its uid: a changed uid does not open.
    assert status == 500 and body["__type"] == "KMSInternalException"


async def test_a_key_of_a_deleted_user_does_not_act_as_the_next_owner_of_its_uid(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, failure_rate=Rate(0.1, 2)) as ep:
        # A key made for "alice", whose uid (here nobody's) was then given to another user.
        key = Key("EKIA" + "B" * 16, "s" * 40)
        record = AccessKeyRecord(
            key.access_key_id, NOBODY.uid, "alice", AccessKeyStatus.ACTIVE, time.time(), None
        )
        with ep.service.store.transaction():
            ep.service.store.insert_access_key(record, key.secret.encode())
        status, body = await call_raw(ep, key, "ListKeys", {})
        assert (status, body["__type"]) == (400, "AccessDeniedException")
        assert body["message"] == (
            f"access key {key.access_key_id} belongs to user 'alice', who is no longer uid"
            f" {NOBODY.uid} here"
        )
        records = ep.service.handle(ROOT, "ListAuditRecords", {})["Records"]
        assert not [r for r in records if r["operation"] == "ListKeys"]
        # Counted as a failed signature: a holder of such keys is slowed like a guesser.
        names = [(await call_raw(ep, key, "ListKeys", {}))[1]["__type"] for _ in range(2)]
        assert names == ["AccessDeniedException", "ThrottlingException"]


async def test_the_unix_socket_is_served_beside_http(endpoint: Endpoint, tmp_path: Path) -> None:
    from envfs.kms.client import KMSClient

    await in_thread(endpoint.client(endpoint.root).create_key)
    client = KMSClient(tmp_path / "kms.sock")
    try:
        keys = await in_thread(client.call, "ListKeys", {})
    finally:
        client.close()
    assert len(keys["Keys"]) == 1


# --- HTTP framing and abuse ---------------------------------------------------------------


async def test_a_date_off_the_calendar_is_answered_and_the_service_goes_on(
    endpoint: Endpoint,
) -> None:
    headers, body = sign(endpoint, endpoint.root, "ListKeys", {})
    dated = [(n, v) for n, v in headers if n != "X-Amz-Date"]
    dated.append(("Date", "Fri, 31 Dec 9999 23:59:59 -2359"))
    status, answer = await in_thread(send, endpoint, dated, body)
    assert (status, answer["__type"]) == (400, "IncompleteSignatureException")
    assert (await call_raw(endpoint, endpoint.root, "ListKeys", {}))[0] == 200


async def test_only_post_is_served(endpoint: Endpoint) -> None:
    status, body = await in_thread(send, endpoint, [("Host", "x")], b"", "GET")
    assert (status, body["__type"]) == (405, "UnknownOperationException")


async def test_an_unknown_operation_or_a_body_that_is_not_json(endpoint: Endpoint) -> None:
    status, body = await call_raw(endpoint, endpoint.root, "Sign", {})
    assert (status, body["__type"]) == (400, "UnknownOperationException")
    headers, _ = sign(endpoint, endpoint.root, "ListKeys", {})
    status, body = await in_thread(send, endpoint, headers, b'{"Limit": 1}')  # not as signed
    assert (status, body["__type"]) == (400, "InvalidSignatureException")
    status, body = await call_raw(endpoint, endpoint.root, "ListKeys", [])  # type: ignore[arg-type]
    assert (status, body["__type"]) == (400, "SerializationException")


async def test_a_body_over_the_limit_is_refused_before_it_is_read(endpoint: Endpoint) -> None:
    def oversized() -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as conn:
            conn.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n" + b"{" * 1000
            )
            head = conn.recv(65536)
            return int(head.split()[1]), head

    status, head = await in_thread(oversized)
    assert status == 413
    assert b"SerializationException" in head


async def test_a_head_over_the_limit_is_refused(endpoint: Endpoint) -> None:
    status, _ = await in_thread(send, endpoint, [("Host", "x"), ("X-Padding", "a" * 20000)], b"{}")
    assert status == 431


async def test_a_malformed_request_is_answered_400_and_closed(endpoint: Endpoint) -> None:
    def garbage() -> bytes:
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as conn:
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            return conn.recv(65536)

    answer = await in_thread(garbage)
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_a_slow_request_times_out_and_an_idle_connection_is_closed(tmp_path: Path) -> None:
    async with serving(tmp_path, request_timeout=0.5, idle_timeout=0.5) as ep:

        def slow() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", ep.port), timeout=10) as conn:
                conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
                answer = conn.recv(65536)
            with socket.create_connection(("127.0.0.1", ep.port), timeout=10) as idle:
                closed = idle.recv(10)  # nothing sent: closed after the idle timeout
            return answer, closed

        started = time.monotonic()
        answer, closed = await in_thread(slow)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert closed == b""
        assert time.monotonic() - started < 5


async def test_keep_alive_serves_many_requests_on_one_connection(endpoint: Endpoint) -> None:
    def two_on_one() -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
        statuses = []
        try:
            for _ in range(2):
                headers, body = sign(endpoint, endpoint.root, "ListKeys", {})
                conn.putrequest("POST", "/", skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
                time.sleep(1.01)  # a new X-Amz-Date: not a replay
        finally:
            conn.close()
        return statuses

    assert await in_thread(two_on_one) == [200, 200]


async def test_one_address_holds_a_bounded_number_of_connections(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections_per_address=2, request_timeout=30) as ep:

        def hold_three() -> tuple[list[bytes], int]:
            # A silent connection is kept for 30 s: the third is closed only by the bound.
            conns = [socket.create_connection(("127.0.0.1", ep.port), timeout=5) for _ in range(3)]
            try:
                third = conns[2].recv(10)  # closed as it was accepted
                headers, body = sign(ep, ep.root, "ListKeys", {})
                request = (
                    b"POST / HTTP/1.1\r\n"
                    + b"".join(f"{n}: {v}\r\n".encode() for n, v in headers)
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                conns[0].sendall(request)
                first = conns[0].recv(65536)
            finally:
                for conn in conns:
                    conn.close()
            time.sleep(0.2)
            status, _ = send(ep, *sign(ep, ep.root, "GenerateRandom", {"NumberOfBytes": 1}))
            return [third, first[:12]], status

        (third, first), status = await in_thread(hold_three)
        assert third == b""
        assert first == b"HTTP/1.1 200"
        assert status == 200  # the closed connections' places were given back


def _signed_bytes(ep: Endpoint, operation: str, params: dict[str, Any]) -> bytes:
    headers, body = sign(ep, ep.root, operation, params)
    head = "".join(f"{n}: {v}\r\n" for n, v in headers)
    return f"POST / HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def test_clients_without_a_signed_request_cannot_hold_every_connection(
    tmp_path: Path,
) -> None:
    settings = {"max_connections": 3, "request_timeout": 30, "idle_timeout": 30}
    async with serving(tmp_path, **settings) as ep:

        def crowd_out() -> tuple[bytes, bytes]:
            address = ("127.0.0.1", ep.port)
            signed = socket.create_connection(address, timeout=5)
            signed.sendall(_signed_bytes(ep, "ListKeys", {}))
            assert signed.recv(65536).startswith(b"HTTP/1.1 200")
            # Two silent connections take the other slots, and would keep them 30 s.
            silent = [socket.create_connection(address, timeout=5) for _ in range(2)]
            time.sleep(0.2)
            try:
                status, _ = send(ep, *sign(ep, ep.root, "GenerateRandom", {"NumberOfBytes": 1}))
                assert status == 200
                closed = silent[0].recv(10)  # the oldest silent one made room
                signed.sendall(_signed_bytes(ep, "DescribeKey", {"KeyId": "alias/none"}))
                return closed, signed.recv(12)
            finally:
                for conn in (signed, *silent):
                    conn.close()

        closed, kept = await in_thread(crowd_out)
        assert closed == b""
        assert kept == b"HTTP/1.1 400"  # the signed connection was kept, and answered


async def test_idle_signed_connections_give_way_when_every_slot_is_taken(
    tmp_path: Path,
) -> None:
    settings = {"max_connections": 2, "request_timeout": 30, "idle_timeout": 30}
    async with serving(tmp_path, **settings) as ep:

        def crowd_out() -> tuple[list[bytes], int]:
            address = ("127.0.0.1", ep.port)
            idle = [socket.create_connection(address, timeout=5) for _ in range(2)]
            try:
                for n, conn in enumerate(idle):
                    conn.sendall(_signed_bytes(ep, "GenerateRandom", {"NumberOfBytes": n + 1}))
                    assert conn.recv(65536).startswith(b"HTTP/1.1 200")
                status, _ = send(ep, *sign(ep, ep.root, "ListKeys", {}))
                return [conn.recv(10) for conn in idle[:1]], status
            finally:
                for conn in idle:
                    conn.close()

        (oldest,), status = await in_thread(crowd_out)
        assert status == 200
        assert oldest == b""  # closed for the newcomer


async def test_a_connection_over_its_address_s_bound_makes_no_other_give_way(
    tmp_path: Path,
) -> None:
    settings = {"max_connections": 2, "max_connections_per_address": 2, "request_timeout": 30}
    async with serving(tmp_path, **settings) as ep:

        def over_the_bound() -> tuple[bytes, list[bool]]:
            address = ("127.0.0.1", ep.port)
            held = [socket.create_connection(address, timeout=5) for _ in range(2)]
            time.sleep(0.2)
            try:
                with socket.create_connection(address, timeout=5) as third:
                    refused = third.recv(10)
                for conn in held:
                    conn.settimeout(0.3)
                still_open = []
                for conn in held:
                    try:
                        still_open.append(conn.recv(10) != b"")
                    except TimeoutError:
                        still_open.append(True)
                return refused, still_open
            finally:
                for conn in held:
                    conn.close()

        refused, still_open = await in_thread(over_the_bound)
        assert refused == b""
        assert still_open == [True, True]


async def test_a_new_connection_must_send_within_the_request_timeout(tmp_path: Path) -> None:
    async with serving(tmp_path, request_timeout=0.3, idle_timeout=30) as ep:

        def silent() -> bytes:
            with socket.create_connection(("127.0.0.1", ep.port), timeout=10) as conn:
                return conn.recv(10)

        started = time.monotonic()
        assert await in_thread(silent) == b""
        assert time.monotonic() - started < 5


async def test_failed_signatures_from_one_address_are_throttled(tmp_path: Path) -> None:
    async with serving(tmp_path, failure_rate=Rate(0.1, 3)) as ep:
        wrong = Key(ep.root.access_key_id, "y" * 40)
        names = []
        for _ in range(5):
            _status, body = await call_raw(ep, wrong, "ListKeys", {})
            names.append(body["__type"])
        assert names == ["InvalidSignatureException"] * 3 + ["ThrottlingException"] * 2
        # The right key from the same address is refused too until the bucket refills.
        _status, body = await call_raw(ep, ep.root, "ListKeys", {})
        assert body["__type"] == "ThrottlingException"


# --- TLS ----------------------------------------------------------------------------------


async def test_tls_serves_clients_that_trust_the_certificate(tmp_path: Path) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    async with serving(tmp_path, tls=tls_context(cert_file, key_file)) as ep:
        assert ep.url.startswith("https://127.0.0.1:")
        session = boto3.session.Session(
            aws_access_key_id=ep.root.access_key_id,
            aws_secret_access_key=ep.root.secret,
            region_name=REGION,
        )
        config = botocore.config.Config(retries={"max_attempts": 1})
        trusting = session.client("kms", endpoint_url=ep.url, verify=str(cert_file), config=config)
        await in_thread(trusting.list_keys)
        untrusting = session.client("kms", endpoint_url=ep.url, config=config)
        with pytest.raises(botocore.exceptions.SSLError):
            await in_thread(untrusting.list_keys)
        plain = ep.client(ep.root)
        plain_url = ep.url.replace("https://", "http://")
        plain = session.client("kms", endpoint_url=plain_url, config=config)
        with pytest.raises(botocore.exceptions.ConnectionClosedError):
            await in_thread(plain.list_keys)
        # The service is still there after the failed handshakes.
        await in_thread(trusting.list_keys)


def test_tls_files_that_do_not_load_are_clear_errors(tmp_path: Path) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    other_cert, other_key = make_certificate(tmp_path / ".." / tmp_path.name)  # same dir, new pair
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(UsageError, match="no such file"):
        tls_context(tmp_path / "missing.crt", key_file)
    with pytest.raises(UsageError, match="cannot load the certificate"):
        tls_context(tmp_path / "junk.pem", key_file)
    second = tmp_path / "second"
    second.mkdir()
    _cert2, key2 = make_certificate(second)
    with pytest.raises(UsageError, match="cannot load the certificate") as caught:
        tls_context(cert_file, key2)
    assert "PRIVATE KEY" not in str(caught.value)
    del other_cert, other_key


# --- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("0.0.0.0:443", ("0.0.0.0", 443)),
    ],
)
def test_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["8443", "host:", ":8443", "host:65536", "host:-1", "h:80x"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(text)


def test_an_ipv6_client_counts_as_its_64_and_an_ipv4_client_as_its_address() -> None:
    one_site = {client_network(f"[2001:db8:1:2:{n:x}::{n:x}]") for n in range(1, 100)}
    assert one_site == {"[2001:db8:1:2::/64]"}
    assert client_network("[2001:db8:1:3::1]") == "[2001:db8:1:3::/64]"
    assert client_network("192.0.2.7") != client_network("192.0.2.8")
    assert client_network("192.0.2.7") == "192.0.2.7"
    assert client_network("an unknown address") == "an unknown address"


def test_loopback_is_told_from_other_addresses() -> None:
    with bind_tcp("127.0.0.1", 0) as v4:
        assert is_loopback(v4)
    with bind_tcp("0.0.0.0", 0) as anywhere:
        assert not is_loopback(anywhere)
    with pytest.raises(UsageError, match="cannot listen"):
        bind_tcp("no-such-host.invalid", 0)


async def test_boto3_reaches_every_operation_envfs_shares_with_aws(endpoint: Endpoint) -> None:
    """Every operation of envfs's table that AWS's KMS model has, called through boto3."""
    from envfs.kms.operations import OPERATIONS

    kms = endpoint.client(endpoint.root)
    shared = set(OPERATIONS) & set(kms.meta.service_model.operation_names)
    key = (await in_thread(kms.create_key, Description="all"))["KeyMetadata"]["KeyId"]
    other = (await in_thread(kms.create_key))["KeyMetadata"]["KeyId"]
    blob = (await in_thread(kms.encrypt, KeyId=key, Plaintext=b"x"))["CiphertextBlob"]
    policy = (await in_thread(kms.get_key_policy, KeyId=key, PolicyName="default"))["Policy"]
    calls: list[tuple[str, dict[str, Any]]] = [
        ("CreateKey", {}),
        ("DescribeKey", {"KeyId": key}),
        ("ListKeys", {"Limit": 10}),
        ("DisableKey", {"KeyId": other}),
        ("EnableKey", {"KeyId": other}),
        ("ScheduleKeyDeletion", {"KeyId": other, "PendingWindowInDays": 7}),
        ("CancelKeyDeletion", {"KeyId": other}),
        ("EnableKey", {"KeyId": other}),  # a cancelled deletion leaves the key disabled
        ("UpdateKeyDescription", {"KeyId": key, "Description": "new"}),
        ("CreateAlias", {"AliasName": "alias/all", "TargetKeyId": key}),
        ("UpdateAlias", {"AliasName": "alias/all", "TargetKeyId": other}),
        ("ListAliases", {"KeyId": other}),
        ("DeleteAlias", {"AliasName": "alias/all"}),
        ("TagResource", {"KeyId": key, "Tags": [{"TagKey": "k", "TagValue": "v"}]}),
        ("ListResourceTags", {"KeyId": key}),
        ("UntagResource", {"KeyId": key, "TagKeys": ["k"]}),
        ("Encrypt", {"KeyId": key, "Plaintext": b"y", "EncryptionContext": {"a": "b"}}),
        ("Decrypt", {"CiphertextBlob": blob, "KeyId": key}),
        ("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": other}),
        ("GenerateDataKey", {"KeyId": key, "NumberOfBytes": 16}),
        ("GenerateDataKeyWithoutPlaintext", {"KeyId": key, "KeySpec": "AES_128"}),
        ("GenerateRandom", {"NumberOfBytes": 8}),
        ("EnableKeyRotation", {"KeyId": key, "RotationPeriodInDays": 90}),
        ("GetKeyRotationStatus", {"KeyId": key}),
        ("DisableKeyRotation", {"KeyId": key}),
        ("RotateKeyOnDemand", {"KeyId": key}),
        ("ListKeyRotations", {"KeyId": key}),
        ("GetKeyPolicy", {"KeyId": key}),
        ("ListKeyPolicies", {"KeyId": key, "Limit": 5}),
        ("PutKeyPolicy", {"KeyId": key, "PolicyName": "default", "Policy": policy}),
    ]
    assert {name for name, _ in calls} == shared
    for name, params in calls:
        method = getattr(kms, _snake(name))
        out = await in_thread(method, **params)
        assert out["ResponseMetadata"]["HTTPStatusCode"] == 200, name
    random = await in_thread(kms.generate_random, NumberOfBytes=8)
    assert isinstance(random["Plaintext"], bytes) and len(random["Plaintext"]) == 8


def _snake(name: str) -> str:
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


async def test_a_request_cannot_ask_to_act_for_another_user(endpoint: Endpoint) -> None:
    # The Unix socket's on_behalf_of is a field of its frames, not a parameter: in an HTTP
    # body it is an unknown parameter, refused, and the call is not made for uid 0.
    for params in ({"on_behalf_of": {"uid": 0, "gid": 0}}, {"OnBehalfOf": 0}):
        status, body = await call_raw(endpoint, endpoint.nobody, "CreateKey", params)
        assert (status, body["__type"]) == (400, "ValidationException"), body
    assert endpoint.service.handle(ROOT, "ListKeys", {})["Keys"] == []


async def test_a_late_tls_handshake_leaves_only_the_rest_of_the_timeout_for_a_request(
    tmp_path: Path,
) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    tls = tls_context(cert_file, key_file)
    async with serving(tmp_path, tls=tls, request_timeout=1.0, idle_timeout=30) as ep:
        headers, body = sign(ep, ep.root, "ListKeys", {})
        head = "".join(f"{n}: {v}\r\n" for n, v in headers)
        request = f"POST / HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode()
        client = ssl.create_default_context(cafile=str(cert_file))

        def late() -> bytes:
            with socket.create_connection(("127.0.0.1", ep.port), timeout=10) as raw:
                time.sleep(0.75)
                with client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                    time.sleep(0.75)  # 1.5 s after connecting: past the request timeout
                    try:
                        conn.sendall(request + body)
                        return conn.recv(100)
                    except (ssl.SSLError, OSError):
                        return b""

        assert await in_thread(late) == b""


async def test_a_tls_handshake_that_never_comes_is_cut_off(tmp_path: Path) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    tls = tls_context(cert_file, key_file)
    async with serving(tmp_path, tls=tls, request_timeout=0.3, idle_timeout=30) as ep:

        def silent() -> bytes:
            with socket.create_connection(("127.0.0.1", ep.port), timeout=10) as conn:
                return conn.recv(10)

        started = time.monotonic()
        assert await in_thread(silent) == b""  # closed, no handshake was offered
        assert time.monotonic() - started < 5

        # A client that sends something other than TLS is closed too, and the service goes on.
        def garbage() -> bytes:
            with socket.create_connection(("127.0.0.1", ep.port), timeout=10) as conn:
                conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
                return conn.recv(100)

        assert b"200" not in await in_thread(garbage)
        session = boto3.session.Session(
            aws_access_key_id=ep.root.access_key_id,
            aws_secret_access_key=ep.root.secret,
            region_name=REGION,
        )
        kms = session.client("kms", endpoint_url=ep.url, verify=str(cert_file))
        await in_thread(kms.list_keys)
