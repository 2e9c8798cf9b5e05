"""The key-service daemon's server and client over a real Unix socket, with a fake handler."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from envfs.errors import (
    DependencyTimeoutException,
    EnvfsError,
    InvalidRequestException,
    KMSError,
    KMSInternalException,
    KMSUnavailableException,
    LimitExceededException,
    NotFoundException,
    StoreCorruptError,
    ThrottlingException,
)
from envfs.identity import Caller
from envfs.kms import protocol
from envfs.kms.client import KMSClient
from envfs.kms.limits import Limits, Rate
from envfs.kms.server import bind_unix_socket, serve
from tests.integration.flood import connection_flood

pytestmark = pytest.mark.integration

FAST = {"idle_timeout": 5.0, "frame_timeout": 2.0}
NOBODY = 65534


class FakeService:
    """Echoes who called; some operations fail in the ways a real service can."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0
        self.periodic_calls = 0
        self.handled: list[tuple[int, str]] = []  # (uid, operation) of each handler call
        self.throttled: list[tuple[int, str | None, int, int]] = []  # (uid, user, calls, conns)

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1

    def handle(self, caller: Caller, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        with self.counted():
            return self._handle(caller, operation, params)

    def _handle(self, caller: Caller, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        self.handled.append((caller.uid, operation))
        if operation == "Decrypt":
            raise NotFoundException("key 'alias/missing' does not exist")
        if operation == "Encrypt":
            raise ValueError(f"bug while holding {params['Plaintext']!r}")
        if operation == "DisableKey":
            raise StoreCorruptError("the key store fails its integrity check")
        if operation == "ListKeys":
            return {"Keys": {1, 2}}  # a set cannot be sent
        if operation == "GenerateRandom":
            time.sleep(params["Sleep"])
        return {
            "Uid": caller.uid,
            "Gid": caller.gid,
            "Groups": sorted(caller.groups),
            "Operation": operation,
            "Params": params,
        }

    def record_throttled(
        self, caller: Caller, calls: int, connections: int, first: float, last: float
    ) -> None:
        assert first <= last
        self.throttled.append((caller.uid, caller.user_name, calls, connections))

    def periodic(self) -> None:
        with self.counted():
            self.periodic_calls += 1
            time.sleep(0.002)
            if self.periodic_calls == 1:
                raise RuntimeError("first maintenance run fails")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short (sun_path holds 107 bytes) and reachable by other uids, unlike pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="envfs-kms-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service() -> FakeService:
    return FakeService()


async def start(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService, **options: Any
) -> Path:
    path = socket_dir / "kms.sock"
    sock = bind_unix_socket(path)
    await nursery.start(functools.partial(serve, service.handle, sock, **{**FAST, **options}))
    return path


@pytest.fixture
async def server(nursery: trio.Nursery, socket_dir: Path, service: FakeService) -> Path:
    return await start(nursery, socket_dir, service)


async def call(client: KMSClient, operation: str, params: dict[str, Any]) -> dict[str, Any]:
    return await trio.to_thread.run_sync(client.call, operation, params)


def request_frame(operation: str = "DescribeKey", **params: Any) -> bytes:
    return protocol.encode_frame(protocol.build_request(operation, params))


async def read_answer(stream: trio.SocketStream) -> dict[str, Any] | KMSError:
    with trio.fail_after(3):
        data = b""
        while len(data) < 4 or len(data) < 4 + protocol.frame_length(data[:4]):
            chunk = await stream.receive_some()
            assert chunk, "the server closed the connection instead of answering"
            data += chunk
        return protocol.parse_response(protocol.decode_payload(data[4:]))


async def assert_closed(stream: trio.SocketStream, within: float = 3.0) -> None:
    with trio.fail_after(within):
        with contextlib.suppress(trio.BrokenResourceError):  # a reset: our bytes went unread
            assert await stream.receive_some() == b""


# --- calls -------------------------------------------------------------------------------


async def test_round_trip_identifies_the_caller_from_the_kernel(server: Path) -> None:
    with KMSClient(server) as client:
        result = await call(client, "DescribeKey", {"KeyId": "k", "Blob": [b"\x00\xff"]})
    assert result["Uid"] == os.geteuid()
    assert result["Gid"] == os.getegid()
    assert set(result["Groups"]) >= {os.getegid(), *os.getgroups()}
    assert result["Params"] == {"KeyId": "k", "Blob": [b"\x00\xff"]}


async def test_service_errors_are_rebuilt_as_their_class(server: Path) -> None:
    # One connection for all calls: no call waits for the server's idle timeout (5 s).
    with KMSClient(server) as client, trio.fail_after(1):
        with pytest.raises(NotFoundException, match=r"^key 'alias/missing' does not exist$"):
            await call(client, "Decrypt", {})
        assert (await call(client, "DescribeKey", {}))["Operation"] == "DescribeKey"
        with pytest.raises(NotFoundException):
            await call(client, "Decrypt", {})


async def test_unexpected_exception_is_logged_and_answered_internal(
    server: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with KMSClient(server) as client:
        with pytest.raises(KMSInternalException, match=r"^internal error$"):
            await call(client, "Encrypt", {"Plaintext": b"top secret"})
        assert (await call(client, "DescribeKey", {}))["Uid"] == os.geteuid()
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == "envfs.kms.server"
    assert record.exc_info is not None
    assert "top secret" not in record.getMessage()


async def test_non_kms_envfs_error_keeps_its_message(server: Path) -> None:
    with (
        KMSClient(server) as client,
        pytest.raises(KMSInternalException, match=r"^the key store fails its integrity"),
    ):
        await call(client, "DisableKey", {})


async def test_unsendable_result_is_an_internal_error(server: Path) -> None:
    with (
        KMSClient(server) as client,
        pytest.raises(KMSInternalException, match=r"^internal error$"),
    ):
        await call(client, "ListKeys", {})


async def test_start_and_stop_are_logged(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="envfs.kms.server")
    sock = bind_unix_socket(socket_dir / "kms.sock")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            address = await inner.start(functools.partial(serve, service.handle, sock))
            scope.cancel()
    assert address == str(socket_dir / "kms.sock")
    messages = [r.getMessage() for r in caplog.records]
    assert f"key service listening on {address}" in messages
    assert f"key service on {address} stopped" in messages
    assert sock.fileno() == -1


async def test_accepts_a_trio_socket_listener(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    sock = trio.socket.from_stdlib_socket(bind_unix_socket(socket_dir / "kms.sock"))
    await nursery.start(serve, service.handle, trio.SocketListener(sock))
    with KMSClient(socket_dir / "kms.sock") as client:
        assert (await call(client, "DescribeKey", {}))["Uid"] == os.geteuid()


# --- malformed and hostile clients -------------------------------------------------------


async def test_bad_json_is_answered_and_the_connection_stays_usable(server: Path) -> None:
    async with await trio.open_unix_socket(server) as stream:
        await stream.send_all(struct.pack(">I", 9) + b"{not json")
        error = await read_answer(stream)
        assert isinstance(error, InvalidRequestException)
        assert error.message.startswith("frame payload is not valid JSON")
        await stream.send_all(request_frame(KeyId="after"))
        answer = await read_answer(stream)
        assert not isinstance(answer, KMSError)
        assert answer["Params"] == {"KeyId": "after"}


async def test_unknown_version_and_operation_are_answered(server: Path) -> None:
    async with await trio.open_unix_socket(server) as stream:
        await stream.send_all(protocol.encode_frame({"v": 2, "op": "Encrypt", "params": {}}))
        error = await read_answer(stream)
        assert isinstance(error, InvalidRequestException)
        assert error.message == (
            "protocol version 2 is not supported: this service speaks version 1"
        )
        await stream.send_all(protocol.encode_frame({"v": 1, "op": "Format", "params": {}}))
        error = await read_answer(stream)
        assert isinstance(error, InvalidRequestException)
        assert error.message == "unknown operation 'Format'"


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        struct.pack(">I", protocol.MAX_FRAME + 1),
        b"\0\0\0\0",
    ],
)
async def test_lost_framing_is_answered_then_closed(server: Path, garbage: bytes) -> None:
    with KMSClient(server) as client:
        async with await trio.open_unix_socket(server) as stream:
            await stream.send_all(garbage)
            error = await read_answer(stream)
            assert isinstance(error, InvalidRequestException)
            assert await call(client, "DescribeKey", {"KeyId": "concurrent"})
            await assert_closed(stream)


async def test_half_frame_client_does_not_stall_others(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    path = await start(nursery, socket_dir, service, frame_timeout=0.5)
    async with await trio.open_unix_socket(path) as silent:
        await silent.send_all(request_frame()[:10])
        begun = trio.current_time()
        with KMSClient(path) as client:
            with trio.fail_after(0.4):
                assert (await call(client, "DescribeKey", {}))["Uid"] == os.geteuid()
        error = await read_answer(silent)
        assert isinstance(error, InvalidRequestException)
        assert error.message == "the request frame did not arrive within 0.5 seconds"
        assert trio.current_time() - begun >= 0.45
        await assert_closed(silent)


async def test_fifty_clients_at_once_are_served_one_handler_call_at_a_time(
    server: Path, service: FakeService
) -> None:
    results: dict[int, list[str]] = {}

    def work(index: int) -> None:
        with KMSClient(server, timeout=10) as client:
            results[index] = [
                client.call("GenerateRandom", {"Sleep": 0.002, "Id": f"{index}-{n}"})["Params"][
                    "Id"
                ]
                for n in range(3)
            ]

    threads = trio.CapacityLimiter(50)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for index in range(50):
                nursery.start_soon(
                    functools.partial(trio.to_thread.run_sync, work, index, limiter=threads)
                )
    assert results == {i: [f"{i}-0", f"{i}-1", f"{i}-2"] for i in range(50)}
    assert service.most_active == 1


async def test_idle_connection_is_closed_and_the_client_reconnects(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    path = await start(nursery, socket_dir, service, idle_timeout=0.2)
    with KMSClient(path) as client:
        await call(client, "DescribeKey", {})
        async with await trio.open_unix_socket(path) as idle:
            begun = trio.current_time()
            await assert_closed(idle, within=2)
            assert trio.current_time() - begun >= 0.15
        # The client's own connection was closed for idleness too; the call must not fail.
        assert (await call(client, "DescribeKey", {"KeyId": "again"}))["Params"]["KeyId"]


async def test_connections_over_the_uid_limit_are_refused(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    path = await start(nursery, socket_dir, service, limits=Limits(max_connections_per_uid=2))
    async with (
        await trio.open_unix_socket(path) as first,
        await trio.open_unix_socket(path) as second,
    ):
        for stream in (first, second):  # make sure both are counted
            await stream.send_all(request_frame())
            assert not isinstance(await read_answer(stream), KMSError)
        with (
            KMSClient(path) as client,
            pytest.raises(LimitExceededException, match=r"^too many connections from uid"),
        ):
            await call(client, "DescribeKey", {})
    with KMSClient(path) as client:
        assert await call(client, "DescribeKey", {})


async def test_connections_over_the_limit_wait(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    path = await start(nursery, socket_dir, service, max_connections=1)
    with KMSClient(path, timeout=0.3) as client:
        async with await trio.open_unix_socket(path) as holder:
            await holder.send_all(request_frame())
            assert not isinstance(await read_answer(holder), KMSError)
            with pytest.raises(DependencyTimeoutException, match=r"did not answer within 0\.3"):
                await call(client, "DescribeKey", {})
        assert (await call(client, "DescribeKey", {}))["Uid"] == os.geteuid()


async def test_periodic_runs_in_the_worker_and_survives_errors(
    nursery: trio.Nursery,
    socket_dir: Path,
    service: FakeService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = await start(
        nursery, socket_dir, service, periodic=service.periodic, periodic_interval=0.001
    )
    with KMSClient(path) as client, trio.fail_after(3):
        while service.periodic_calls < 10:
            await call(client, "GenerateRandom", {"Sleep": 0.002})
    assert service.most_active == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "periodic key maintenance failed"
    assert record.exc_info is not None


# --- client failures ---------------------------------------------------------------------


async def test_missing_socket_is_unavailable(socket_dir: Path) -> None:
    path = socket_dir / "absent.sock"
    with (
        KMSClient(path) as client,
        pytest.raises(KMSUnavailableException, match=rf"^cannot reach .* at '{path}'"),
    ):
        await call(client, "DescribeKey", {})


async def test_socket_without_listener_is_unavailable_after_the_connect_timeout(
    socket_dir: Path,
) -> None:
    bind_unix_socket(socket_dir / "dead.sock").close()
    with (
        KMSClient(socket_dir / "dead.sock", connect_timeout=0.3) as client,
        pytest.raises(KMSUnavailableException, match=r"Connection refused$"),
    ):
        begun = trio.current_time()
        try:
            await call(client, "DescribeKey", {})
        finally:
            assert trio.current_time() - begun >= 0.3  # it kept trying


async def test_slow_answer_times_out_and_the_next_call_reconnects(server: Path) -> None:
    with KMSClient(server, timeout=0.2) as client:
        begun = trio.current_time()
        with pytest.raises(
            DependencyTimeoutException, match=rf"^the key service at '{server}' did not answer"
        ):
            await call(client, "GenerateRandom", {"Sleep": 0.5})
        assert trio.current_time() - begun < 0.45
        client.timeout = 3.0
        answer = await call(client, "DescribeKey", {"KeyId": "next"})
        assert answer["Params"] == {"KeyId": "next"}


async def test_lost_connection_is_unavailable(socket_dir: Path) -> None:
    path = socket_dir / "rude.sock"
    listener = bind_unix_socket(path)

    def accept_and_hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.close()

    with listener, KMSClient(path) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, accept_and_hang_up)
            with pytest.raises(KMSUnavailableException, match=r"^lost the connection to"):
                await call(client, "DescribeKey", {})


def test_unsendable_params_are_refused_before_connecting(socket_dir: Path) -> None:
    with (
        KMSClient(socket_dir / "absent.sock") as client,
        pytest.raises(InvalidRequestException, match=r"^a value of type set cannot be"),
    ):
        client.call("TagResource", {"Tags": {1}})


# --- a busy, restarting or abused service ------------------------------------------------


def fill_backlog(path: Path) -> list[socket.socket]:
    """Connect without blocking until the listen backlog is full; the connections."""
    held = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:
            sock.close()
            return held
        held.append(sock)


async def test_a_full_backlog_is_waited_for_not_refused(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    path = socket_dir / "kms.sock"
    sock = bind_unix_socket(path, backlog=2)
    await nursery.start(functools.partial(serve, service.handle, sock, max_connections=1, **FAST))
    async with await trio.open_unix_socket(path) as holder:
        await holder.send_all(request_frame())  # served: it holds the only slot
        assert not isinstance(await read_answer(holder), KMSError)
        waiting = fill_backlog(path)  # nothing more is accepted while holder is open
        assert waiting
        answers: list[dict[str, Any]] = []

        async def patient_call() -> None:
            with KMSClient(path) as client:
                answers.append(await call(client, "DescribeKey", {"KeyId": "patient"}))

        async with trio.open_nursery() as inner:
            inner.start_soon(patient_call)
            await trio.sleep(0.2)
            assert answers == []  # connect() finds no room: it waits (it used to fail)...
            await holder.aclose()  # ...until the daemon accepts again
            for conn in waiting:
                conn.close()
    assert [a["Params"] for a in answers] == [{"KeyId": "patient"}]


async def test_a_daemon_starting_within_the_connect_timeout_is_reached(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    path = socket_dir / "kms.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))  # the file exists; nobody listens yet: ECONNREFUSED

    async def start_late() -> None:
        await trio.sleep(0.3)
        sock.listen(16)
        await serve(service.handle, sock, **FAST)

    nursery.start_soon(start_late)
    with KMSClient(path, connect_timeout=10) as client:
        assert (await call(client, "DescribeKey", {}))["Uid"] == os.geteuid()


async def test_a_connection_flood_from_one_uid_does_not_stop_the_others(
    socket_dir: Path, service: FakeService
) -> None:
    path = socket_dir / "kms.sock"
    sock = bind_unix_socket(path, backlog=16)  # small: the flood fills it for sure
    options = {"on_throttled": service.record_throttled, **FAST}

    def calls() -> list[str]:
        answers = []
        for n in range(10):  # a new connection each time, as the command line makes
            with KMSClient(path, connect_timeout=30, timeout=60) as client:
                answers.append(client.call("DescribeKey", {"KeyId": f"k{n}"})["Params"]["KeyId"])
        return answers

    async with trio.open_nursery() as inner:
        await inner.start(functools.partial(serve, service.handle, sock, **options))
        with connection_flood(path, NOBODY, processes=2) as flood:
            answers = await trio.to_thread.run_sync(calls)
        inner.cancel_scope.cancel()  # stopping reports what was refused
    assert answers == [f"k{n}" for n in range(10)]
    assert flood.full > 0, "the flood never filled the backlog"
    # Beyond its burst, the flooder's connections were refused as they were accepted.
    [(uid, user, calls_refused, connections_refused)] = service.throttled
    assert (uid, user, calls_refused) == (NOBODY, pwd.getpwuid(NOBODY).pw_name, 0)
    assert connections_refused > 0
    assert service.handled == [(os.geteuid(), "DescribeKey")] * 10


async def test_connections_over_the_uid_rate_are_throttled(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    limits = Limits(connection_rate=Rate(0.001, 2))  # two, then (practically) no more
    path = await start(nursery, socket_dir, service, limits=limits)
    for n in range(2):
        with KMSClient(path) as client:
            assert (await call(client, "DescribeKey", {"KeyId": n}))["Params"]["KeyId"] == n
    handled = len(service.handled)
    async with await trio.open_unix_socket(path) as stream:  # answered before any request
        error = await read_answer(stream)
        await assert_closed(stream)
    assert isinstance(error, ThrottlingException)
    assert error.message == (
        f"too many new connections from uid {os.geteuid()} (at most 0.001 a second, 2 at"
        " once); reduce the frequency of your calls"
    )
    with KMSClient(path) as client, pytest.raises(ThrottlingException):
        await call(client, "DescribeKey", {})
    assert len(service.handled) == handled


async def test_a_refusal_sent_before_the_request_is_read_by_the_client(
    socket_dir: Path,
) -> None:
    path = socket_dir / "refuses.sock"
    listener = bind_unix_socket(path)
    refused = threading.Event()

    def refuse_one() -> None:
        conn, _ = listener.accept()
        conn.sendall(protocol.encode_frame(protocol.error_response("ThrottlingException", "no")))
        conn.close()
        refused.set()

    class LateSender(KMSClient):
        def _check_server(self, sock: socket.socket) -> None:
            super()._check_server(sock)
            assert refused.wait(5)  # the daemon hung up before the request is sent

    with listener, LateSender(path) as client:
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.to_thread.run_sync, refuse_one)
            with pytest.raises(ThrottlingException, match=r"^no$"):
                await call(client, "DescribeKey", {})


async def start_trusting_me(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService, limits: Limits
) -> Path:
    """A server that trusts this process to call on behalf of other users."""
    trusted = {os.geteuid(): "envfs-test"}
    return await start(nursery, socket_dir, service, limits=limits, trusted_services=trusted)


async def call_for(client: KMSClient, uid: int) -> dict[str, Any]:
    """DescribeKey on behalf of ``uid``."""
    request = functools.partial(client.call, "DescribeKey", {}, on_behalf_of=(uid, uid))
    return await trio.to_thread.run_sync(request)


async def test_calls_over_the_rate_are_throttled_per_user(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    path = await start_trusting_me(nursery, socket_dir, service, Limits(call_rate=Rate(0.001, 3)))
    with KMSClient(path) as client:
        for _ in range(3):
            await call(client, "DescribeKey", {})
        with pytest.raises(
            ThrottlingException, match=rf"^too many calls from uid {os.geteuid()} \(at most"
        ):
            await call(client, "DescribeKey", {})
        # Calls a trusted service makes on behalf of a user count for that user.
        for _ in range(3):
            assert (await call_for(client, 4242))["Uid"] == 4242
        with pytest.raises(ThrottlingException, match=r"^too many calls from uid 4242 "):
            await call_for(client, 4242)
    assert service.handled == [(os.geteuid(), "DescribeKey")] * 3 + [(4242, "DescribeKey")] * 3


async def test_a_uid_that_keeps_failing_is_throttled_and_others_are_not(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    limits = Limits(failure_rate=Rate(0.001, 2))
    path = await start_trusting_me(nursery, socket_dir, service, limits)
    me = os.geteuid()
    with KMSClient(path) as client:
        for _ in range(2):
            with pytest.raises(NotFoundException):
                await call(client, "Decrypt", {})
        # Once over the rate of failed calls, every call is refused, without the handler.
        with pytest.raises(ThrottlingException, match=rf"^too many failed calls from uid {me} "):
            await call(client, "DescribeKey", {})
        assert (await call_for(client, 4242))["Uid"] == 4242  # another user is not concerned
    assert service.handled == [(me, "Decrypt"), (me, "Decrypt"), (4242, "DescribeKey")]


async def test_internal_errors_do_not_count_as_failed_calls(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    path = await start(nursery, socket_dir, service, limits=Limits(failure_rate=Rate(0.001, 1)))
    with KMSClient(path) as client:
        for _ in range(3):
            with pytest.raises(KMSInternalException):
                await call(client, "DisableKey", {})
        with pytest.raises(NotFoundException):
            await call(client, "Decrypt", {})
        with pytest.raises(ThrottlingException):
            await call(client, "Decrypt", {})


async def test_a_throttled_call_is_answered_without_being_decoded(
    nursery: trio.Nursery, socket_dir: Path, service: FakeService
) -> None:
    path = await start(nursery, socket_dir, service, limits=Limits(call_rate=Rate(0.001, 1)))
    async with await trio.open_unix_socket(path) as stream:
        await stream.send_all(request_frame())
        assert not isinstance(await read_answer(stream), KMSError)
        await stream.send_all(struct.pack(">I", 9) + b"{not json")
        answer = await read_answer(stream)
        assert isinstance(answer, ThrottlingException)  # not InvalidRequestException
        await stream.send_all(request_frame())
        assert isinstance(await read_answer(stream), ThrottlingException)  # still usable


async def test_refusals_are_reported_per_uid_and_logged_once(
    socket_dir: Path, service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    limits = Limits(call_rate=Rate(0.001, 1), connection_rate=Rate(0.001, 2))
    sock = bind_unix_socket(socket_dir / "kms.sock")
    options = {"limits": limits, "on_throttled": service.record_throttled, **FAST}
    async with trio.open_nursery() as inner:
        path = Path(await inner.start(functools.partial(serve, service.handle, sock, **options)))
        with KMSClient(path) as client:
            await call(client, "DescribeKey", {})
            for _ in range(4):
                with pytest.raises(ThrottlingException):
                    await call(client, "DescribeKey", {})
        for _ in range(3):  # the 3rd and 4th connections of this uid are refused
            with KMSClient(path) as client, pytest.raises(ThrottlingException):
                await call(client, "DescribeKey", {})
        assert service.throttled == []  # reported every 10 s, and when the service stops
        inner.cancel_scope.cancel()
    me = os.geteuid()
    assert service.throttled == [(me, pwd.getpwuid(me).pw_name, 5, 2)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"throttling calls of uid {me}: too many calls from uid {me} (at most 0.001 a second,"
        " 1 at once); reduce the frequency of your calls",
        f"refusing connections of uid {me}: too many new connections from uid {me} (at most"
        " 0.001 a second, 2 at once); reduce the frequency of your calls",
    ]


# --- the socket file ---------------------------------------------------------------------


def test_bind_creates_the_directory_and_an_open_socket(socket_dir: Path) -> None:
    path = socket_dir / "run" / "envfs" / "kms.sock"
    with bind_unix_socket(path):
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666


def test_bind_replaces_a_stale_socket_but_not_a_live_one(socket_dir: Path) -> None:
    path = socket_dir / "kms.sock"
    bind_unix_socket(path).close()
    with (
        bind_unix_socket(path),
        pytest.raises(EnvfsError, match=r"^another key service is already listening on"),
    ):
        bind_unix_socket(path)


def test_bind_refuses_to_replace_other_files(socket_dir: Path) -> None:
    path = socket_dir / "kms.sock"
    path.write_text("keep me")
    with pytest.raises(EnvfsError, match=r"exists and is not a socket; not replacing it$"):
        bind_unix_socket(path)
    assert path.read_text() == "keep me"


def test_bind_refuses_a_path_too_long(socket_dir: Path) -> None:
    with pytest.raises(EnvfsError, match=r"is longer than 107 bytes$"):
        bind_unix_socket(socket_dir / ("x" * 120))


# --- other users -------------------------------------------------------------------------

CHILD = r"""
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
body = json.dumps({"v": 1, "op": "DescribeKey", "params": {}}).encode()
s.sendall(struct.pack(">I", len(body)) + body)
data = b""
while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
    chunk = s.recv(65536)
    if not chunk:
        sys.exit("closed")
    data += chunk
sys.stdout.write(data[4:].decode())
"""


def setpriv(groups: str) -> list[str]:
    return ["setpriv", "--reuid", "65534", "--regid", "65534", "--groups", groups]


@functools.cache
def python_for_nobody() -> str | None:
    # The test's interpreter may live where uid 65534 cannot reach (e.g. under /root).
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run([*setpriv("65534"), candidate, "-I", "-c", "pass"], check=False)
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
@pytest.mark.parametrize("groups", [[4242], list(range(5000, 5300))], ids=["few", "300"])
async def test_other_uid_and_its_groups_are_seen(server: Path, groups: list[int]) -> None:
    python = python_for_nobody()
    if python is None:
        pytest.skip("no python interpreter that uid 65534 may run")
    command = [*setpriv(",".join(map(str, groups))), python, "-I", "-c", CHILD, str(server)]
    with trio.fail_after(5):
        done = await trio.run_process(command, capture_stdout=True)
    answer = protocol.parse_response(json.loads(done.stdout))
    assert not isinstance(answer, KMSError)
    assert (answer["Uid"], answer["Gid"]) == (65534, 65534)
    assert set(answer["Groups"]) == {65534, *groups}
