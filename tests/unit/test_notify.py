"""``envfs.notify``: sd_notify messages and LISTEN_FDS parsing, in process."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from envfs import notify


@pytest.fixture
def abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"envfs-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield sock
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready("up") is False
    assert notify.notify("READY=1") is False


def test_messages_reach_an_abstract_socket(abstract_notify_socket: socket.socket) -> None:
    assert notify.ready("serving\non two lines") is True
    assert abstract_notify_socket.recv(4096) == b"READY=1\nSTATUS=serving on two lines"
    assert notify.stopping() is True
    assert abstract_notify_socket.recv(4096) == b"STOPPING=1"
    assert notify.status("busy") is True
    assert abstract_notify_socket.recv(4096) == b"STATUS=busy"


def test_a_socket_nobody_listens_on_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", f"@envfs-test-nobody-{uuid.uuid4().hex}")
    assert notify.ready() is False
    assert "cannot notify systemd" in caplog.text


def test_listen_fds_for_another_process_are_ignored_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "kms")
    assert notify.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_no_listen_fds_without_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert notify.listen_fds() == []


def test_malformed_listen_fds_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "one")
    with pytest.raises(
        ValueError, match=r"^LISTEN_PID='\d+' and LISTEN_FDS='one' must be numbers$"
    ):
        notify.listen_fds()
    assert "LISTEN_FDS" not in os.environ
