"""The daemons under systemd's protocols, with systemd played by the test.

A test-owned ``NOTIFY_SOCKET`` (a datagram socket in a short /tmp folder) receives the
readiness messages; socket activation is a listening socket passed as descriptor 3 with
``LISTEN_FDS``/``LISTEN_PID``; the journal is a pipe named by ``JOURNAL_STREAM``. Every
daemon is killed and every mount detached when a test ends, even when it fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.kms.client import KMSClient
from tests.integration.conftest import ENVFS, Env, Mount, is_mounted, live

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating keys and mounting need root")

# What systemd does before it runs a socket-activated service: the socket becomes
# descriptor 3, and LISTEN_PID names the service's own process (exec keeps the pid).
SOCKET_ACTIVATION = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


class NotifySocket:
    """What systemd listens on for sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(
        self, proc: subprocess.Popen[str] | None = None, timeout: float = 10.0
    ) -> list[str]:
        """The lines of the next message; fails after ``timeout`` s or if ``proc`` exits."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.1)
        while True:
            try:
                return self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                pass
            if proc is not None and proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"the daemon exited {proc.returncode} before notifying:\n{err}")
            if time.monotonic() > deadline:
                pytest.fail(f"no notification within {timeout:g} seconds")

    def assert_silent(self) -> None:
        self.sock.settimeout(0)
        with pytest.raises(BlockingIOError):
            self.sock.recv(4096)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # sun_path holds 107 bytes: pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="envfs-", dir="/tmp"))
    sock = NotifySocket(folder / "notify")
    try:
        yield sock
    finally:
        sock.sock.close()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def daemon(
    args: list[str], env: dict[str, str], **popen: object
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(  # type: ignore[call-overload]
        args, env=env, stdout=subprocess.DEVNULL, text=True, **popen
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate(timeout=10)


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM ``proc``; its stderr once it exited."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    return err or ""


def generate_random(socket_path: Path) -> bytes:
    with KMSClient(socket_path, timeout=5, connect_timeout=2) as client:
        answer = client.call("GenerateRandom", {"NumberOfBytes": 16})
    return bytes(answer["Plaintext"])


# --- the key service -----------------------------------------------------------------------


def test_kms_serve_is_ready_only_when_it_answers_and_says_stopping_on_sigterm(
    kms_env: Env, notify_socket: NotifySocket
) -> None:
    sock = notify_socket.path.with_name("kms.sock")
    env = dict(kms_env.env, NOTIFY_SOCKET=str(notify_socket.path), ENVFS_KMS_SOCKET=str(sock))
    env.pop("JOURNAL_STREAM", None)
    with daemon([ENVFS, "kms", "serve"], env, stderr=subprocess.PIPE) as proc:
        message = notify_socket.receive(proc)
        assert "READY=1" in message
        assert any(line.startswith("STATUS=serving region local-1 on ") for line in message)
        assert len(generate_random(sock)) == 16  # no retry: it works the moment READY came
        err = stop(proc)
        assert notify_socket.receive() == ["STOPPING=1"]
        assert proc.returncode == 0, err
    notify_socket.assert_silent()
    assert not sock.exists()
    lines = err.splitlines()
    assert lines and all(TIMESTAMP.match(line) for line in lines), err  # not under systemd


def test_kms_serve_takes_its_socket_from_socket_activation(
    kms_env: Env, notify_socket: NotifySocket
) -> None:
    sock_path = notify_socket.path.with_name("activated.sock")
    unused = notify_socket.path.with_name("bound.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(16)
    env = dict(kms_env.env, NOTIFY_SOCKET=str(notify_socket.path), ENVFS_KMS_SOCKET=str(unused))
    fd = listener.fileno()
    args = [sys.executable, "-c", SOCKET_ACTIVATION, str(fd), ENVFS, "kms", "serve"]
    try:
        with daemon(args, env, stderr=subprocess.PIPE, pass_fds=(fd,)) as proc:
            assert "READY=1" in notify_socket.receive(proc)
            assert len(generate_random(sock_path)) == 16
            assert not unused.exists()  # --socket is not bound when systemd gives one
            err = stop(proc)
            assert proc.returncode == 0, err
        assert "socket from systemd" in err
        assert sock_path.exists()  # systemd's socket: not the daemon's to remove
    finally:
        listener.close()


def test_kms_serve_logs_with_syslog_priorities_to_the_journal(
    kms_env: Env, notify_socket: NotifySocket
) -> None:
    sock = notify_socket.path.with_name("kms.sock")
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = dict(
        kms_env.env,
        NOTIFY_SOCKET=str(notify_socket.path),
        ENVFS_KMS_SOCKET=str(sock),
        JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",  # stderr is "the journal"
    )
    try:
        with daemon([ENVFS, "kms", "serve"], env, stderr=write_end) as proc:
            os.close(write_end)
            assert "READY=1" in notify_socket.receive(proc)
            stop(proc)
            assert proc.returncode == 0
        with os.fdopen(read_end) as journal:
            err = journal.read()
    finally:
        for fd in (read_end, write_end):
            with contextlib.suppress(OSError):
                os.close(fd)
    lines = err.splitlines()
    assert any("SIGTERM" in line for line in lines), err
    assert all(line.startswith("<6>INFO ") for line in lines), err
    assert not any(TIMESTAMP.search(line) for line in lines), err


# --- the mount daemon ----------------------------------------------------------------------


def new_volume(kms_env: Env) -> tuple[Path, Path]:
    """A volume under a new key alias/vol: its backing folder and an empty mount point."""
    kms_env.create_key("vol")
    backing, mnt = kms_env.root / "backing", kms_env.root / "mnt"
    mnt.mkdir()
    kms_env.run("init", str(backing), "--key-id", "alias/vol")
    return backing, mnt


@contextlib.contextmanager
def foreground_mount(
    kms_env: Env, notify_socket: NotifySocket
) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    """``envfs mount --foreground`` of a new volume, reporting to ``notify_socket``: the
    process, the backing folder and the mount point. Killed and detached at the end."""
    backing, mnt = new_volume(kms_env)
    env = dict(kms_env.env, NOTIFY_SOCKET=str(notify_socket.path))
    args = [ENVFS, "mount", "--foreground", str(backing), str(mnt)]
    try:
        with daemon(args, env, stderr=subprocess.PIPE) as proc:
            yield proc, backing, mnt
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)


def test_mount_is_ready_when_live_and_sigterm_unmounts_after_flushing(
    kms_env: Env, notify_socket: NotifySocket
) -> None:
    data = os.urandom(100_000)
    with foreground_mount(kms_env, notify_socket) as (proc, backing, mnt):
        message = notify_socket.receive(proc)
        live_at_ready = is_mounted(mnt)
        assert "READY=1" in message
        assert live_at_ready
        assert f"STATUS=mounted {backing} on {mnt}" in message
        # Written, not closed: the daemon must flush it when told to stop.
        f = (mnt / "open.bin").open("wb", buffering=0)
        try:
            f.write(data)
            err = stop(proc)
        finally:
            with contextlib.suppress(OSError):
                f.close()  # the mount is gone: ENOTCONN
        assert notify_socket.receive()[0] == "STOPPING=1"
        assert proc.returncode == 0, err
        assert not is_mounted(mnt)
        assert "received SIGTERM" in err
        with live(Mount(kms_env, backing, mnt, kms_env.root / "mount.log")):
            assert (mnt / "open.bin").read_bytes() == data


def test_mount_stops_cleanly_on_sigint_the_moment_it_is_ready(
    kms_env: Env, notify_socket: NotifySocket
) -> None:
    with foreground_mount(kms_env, notify_socket) as (proc, _, mnt):
        assert "READY=1" in notify_socket.receive(proc)
        proc.send_signal(signal.SIGINT)  # systemd may stop a unit as soon as it started
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert notify_socket.receive()[0] == "STOPPING=1"
        assert "received SIGINT" in err
        assert not is_mounted(mnt)


def test_mount_stops_on_sigterm_under_a_stream_of_requests(
    kms_env: Env, notify_socket: NotifySocket
) -> None:
    """The mount's loop takes requests without trio while they keep coming (the pyfuse3
    fast path of scripts/build_pyfuse3.py); a stop signal must still be handled at once."""
    busy = "import os, sys\nwhile True:\n    os.listdir(sys.argv[1])\n"
    with foreground_mount(kms_env, notify_socket) as (proc, _, mnt):
        assert "READY=1" in notify_socket.receive(proc)
        (mnt / "a").write_bytes(b"a")
        # Several listers, so that a request is always waiting.
        loaders = [
            subprocess.Popen([sys.executable, "-c", busy, str(mnt)], stderr=subprocess.DEVNULL)
            for _ in range(4)
        ]
        try:
            time.sleep(0.5)
            assert all(p.poll() is None for p in loaders)  # the requests keep coming
            err = stop(proc)
        finally:
            for p in loaders:
                p.kill()
                p.wait(timeout=10)
        assert proc.returncode == 0, err
        assert notify_socket.receive()[0] == "STOPPING=1"
        assert "received SIGTERM" in err
        assert not is_mounted(mnt)
