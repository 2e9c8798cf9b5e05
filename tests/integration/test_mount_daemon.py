"""Mounts backed by the key-service daemon: on-behalf-of calls, trust, outages."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.errors import AccessDeniedException
from envfs.kms.client import KMSClient
from tests.integration.conftest import (
    ENVFS,
    Env,
    Mount,
    as_user,
    backing_of,
    is_mounted,
    live,
    make_env,
)
from tests.integration.flood import connection_flood

KEY_USER = 4242
STRANGER = 4343
CACHE_SECONDS = 2.0  # how long a user's unwrapped data key is reused by the mount


class Daemon:
    """``envfs kms serve`` on a socket, as a subprocess."""

    def __init__(self, env: Env, sock: Path, *extra: str) -> None:
        self.env, self.sock, self.extra = env, sock, extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.sock.with_suffix(".log")
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                [ENVFS, "kms", "serve", "--socket", str(self.sock), *self.extra],
                env=self.env.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the key daemon did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short, world-traversable folder: socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="envfs-d-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def mount_on_daemon(short_dir: Path, *daemon_args: str) -> Iterator[tuple[Daemon, Mount]]:
    """A daemon (``envfs kms serve`` with ``daemon_args``) and a volume mounted over it
    (``--allow-other``), whose key root and KEY_USER may use."""
    env = make_env(short_dir)
    sock = short_dir / "kms.sock"
    env.env["ENVFS_KMS_SOCKET"] = str(sock)
    daemon = Daemon(env, sock, *daemon_args)
    daemon.start()
    try:
        key = env.kms("create-key", "--key-users", f"uid:0,uid:{KEY_USER}")
        key_id = str(key["KeyMetadata"]["KeyId"])  # type: ignore[index]
        env.kms("create-alias", "--alias-name", "alias/vol", "--target-key-id", key_id)
        kms = f"unix:{sock}"
        backing, mnt = short_dir / "backing", short_dir / "mnt"
        mnt.mkdir()
        env.run("init", str(backing), "--key-id", "alias/vol", "--kms", kms)
        extra = ("--allow-other", "--kms", kms, "--key-cache-seconds", str(CACHE_SECONDS))
        m = Mount(env, backing, mnt, short_dir / "mount.log", extra)
        with live(m):
            mnt.chmod(0o777)
            yield daemon, m
    finally:
        daemon.stop()


@pytest.fixture
def daemon_mount(short_dir: Path) -> Iterator[tuple[Daemon, Mount]]:
    with mount_on_daemon(short_dir) as (daemon, m):
        yield daemon, m


def test_per_user_decisions_through_the_daemon(daemon_mount: tuple[Daemon, Mount]) -> None:
    _, m = daemon_mount
    (m.mnt / "shared.txt").write_text("for the key user\n")
    (m.mnt / "shared.txt").chmod(0o666)
    allowed = as_user(KEY_USER, f"cat {m.mnt}/shared.txt && echo mine > {m.mnt}/mine.txt")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == "for the key user\n"
    assert (m.mnt / "mine.txt").stat().st_uid == KEY_USER
    denied = as_user(STRANGER, f"cat {m.mnt}/shared.txt")
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr
    records = json.loads(m.env.run("kms", "audit", "--key-id", "alias/vol").stdout)["Records"]
    by_uid = {(r["operation"], r["caller"]["uid"], r["outcome"]): r for r in records}
    ok = by_uid[("Decrypt", KEY_USER, "Success")]
    refused = by_uid[("Decrypt", STRANGER, "AccessDeniedException")]
    behind = backing_of(m, m.mnt / "shared.txt")
    assert behind.parent == m.backing and "shared" not in behind.name
    for record in (ok, refused):
        assert record["via"] == {"service": "envfs-mount", "uid": 0}
        assert record["request"]["AuditNote"] == str(behind)
        assert "envfs:file" in record["encryption_context"]
    assert ("GenerateDataKey", KEY_USER, "Success") in by_uid


def test_an_untrusted_caller_cannot_act_for_others(short_dir: Path) -> None:
    env = make_env(short_dir)
    sock = short_dir / "strict.sock"
    daemon = Daemon(env, sock, "--trust-on-behalf-of", "none")
    daemon.start()
    try:
        with KMSClient(sock) as client:
            assert client.call("GenerateRandom", {"NumberOfBytes": 8}, on_behalf_of=(0, 0))
            with pytest.raises(AccessDeniedException, match="not trusted to call on behalf of"):
                client.call("GenerateRandom", {"NumberOfBytes": 8}, on_behalf_of=(KEY_USER, 0))
    finally:
        daemon.stop()
    # The refusal is audited like any denied call.
    records = json.loads(env.run("kms", "audit", "--embedded").stdout)["Records"]
    refused = [r for r in records if r["outcome"] == "AccessDeniedException"]
    assert [(r["operation"], r["caller"]["uid"]) for r in refused] == [("GenerateRandom", 0)]
    assert f"asked for uid {KEY_USER}" in refused[0]["message"]


def test_key_service_down_and_back(daemon_mount: tuple[Daemon, Mount]) -> None:
    daemon, m = daemon_mount
    path = m.mnt / "held.txt"
    path.write_bytes(b"x" * 50000)
    with path.open("r+b") as held:
        daemon.stop()
        # Root's data key for the file was just used: a re-open needs no key service...
        assert path.read_bytes()[:5] == b"xxxxx"
        time.sleep(CACHE_SECONDS + 0.2)  # ...until the entry is older than the cache age
        # Files already open keep working; new opens fail with a clear errno.
        assert held.read(5) == b"xxxxx"
        held.seek(0)
        held.write(b"yy")
        held.flush()
        with pytest.raises(OSError) as exc:
            path.read_bytes()
        assert exc.value.errno == errno.EHOSTDOWN
        assert "key service unavailable" in m.log_text()
        daemon.start()
        deadline = time.monotonic() + 15
        while True:  # the mount retries by itself, with backoff
            try:
                data = path.read_bytes()
                break
            except OSError as again:
                assert again.errno == errno.EHOSTDOWN
                assert time.monotonic() < deadline, "the mount did not recover"
                time.sleep(0.2)
        assert data == b"yy" + b"x" * 49998
    assert "reachable again" in m.log_text()
    assert is_mounted(m.mnt)
    assert os.path.exists(m.mnt / "held.txt")


def test_a_policy_change_takes_effect_within_the_cache_age(
    daemon_mount: tuple[Daemon, Mount],
) -> None:
    _, m = daemon_mount
    (m.mnt / "doc.txt").write_text("v1\n")
    (m.mnt / "doc.txt").chmod(0o666)
    assert as_user(KEY_USER, f"cat {m.mnt}/doc.txt").stdout == "v1\n"
    policy = json.loads(m.env.kms("get-key-policy", "--key-id", "alias/vol")["Policy"])  # type: ignore[arg-type]
    for statement in policy["Statement"]:
        principals = statement["Principal"]["Unix"]
        if f"uid:{KEY_USER}" in principals:
            principals.remove(f"uid:{KEY_USER}")
    m.env.kms("put-key-policy", "--key-id", "alias/vol", "--policy", json.dumps(policy))
    # The user's recent decision may be reused for at most CACHE_SECONDS...
    time.sleep(CACHE_SECONDS + 0.2)
    # ...after which every new open asks the key service again, and is refused.
    denied = as_user(KEY_USER, f"cat {m.mnt}/doc.txt")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_creates_use_data_keys_made_in_advance(daemon_mount: tuple[Daemon, Mount]) -> None:
    daemon, m = daemon_mount
    (m.mnt / "first.txt").write_text("asks the key service\n")
    deadline = time.monotonic() + 10
    while True:  # the pool fills in the background, on root's behalf
        records = json.loads(m.env.run("kms", "audit", "--key-id", "alias/vol").stdout)
        notes = [r.get("request", {}).get("AuditNote", "") for r in records["Records"]]
        if sum("made in advance" in note for note in notes) >= 2:
            break
        assert time.monotonic() < deadline, "no data keys were made in advance"
        time.sleep(0.1)
    daemon.stop()
    # With the daemon gone, a create still needs no round trip...
    (m.mnt / "second.txt").write_text("made without the key service\n")
    assert (m.mnt / "second.txt").read_text() == "made without the key service\n"
    time.sleep(CACHE_SECONDS + 0.2)
    # ...until the keys made in advance are older than the cache age.
    with pytest.raises(OSError) as exc:
        (m.mnt / "third.txt").write_text("no key service\n")
    assert exc.value.errno == errno.EHOSTDOWN


def test_opens_keep_working_while_another_user_floods_the_daemon(short_dir: Path) -> None:
    # The daemon closes the mount's idle connection after 0.3 s, so each open below
    # reconnects in the middle of STRANGER's connection flood: it waits for room in the
    # daemon's backlog (it used to fail at once, and the open with EHOSTDOWN).
    with mount_on_daemon(short_dir, "--idle-timeout", "0.3") as (daemon, m):
        for n in range(5):
            (m.mnt / f"f{n}.txt").write_text(f"file {n}\n")
            (m.mnt / f"f{n}.txt").chmod(0o644)
        with connection_flood(daemon.sock, STRANGER, processes=2):
            for n in range(5):
                time.sleep(0.4)  # idle longer than the daemon keeps the connection
                read = as_user(KEY_USER, f"cat {m.mnt}/f{n}.txt")
                assert read.returncode == 0, read.stderr
                assert read.stdout == f"file {n}\n"
        assert "key service unavailable" not in m.log_text()
    # The flooder's connections beyond its rate were refused, and that is in the audit log.
    records = json.loads(m.env.run("kms", "audit", "--embedded").stdout)["Records"]
    refused = [
        r["throttled"]["connections"]
        for r in records
        if r["operation"] == "ThrottleSummary" and r["caller"]["uid"] == STRANGER
    ]
    assert sum(refused) > 0


def test_a_user_over_the_failure_rate_gets_eagain_and_the_others_do_not(short_dir: Path) -> None:
    with mount_on_daemon(short_dir, "--uid-failure-rate", "0.001:2") as (_, m):
        (m.mnt / "doc.txt").write_text("for the key user\n")
        (m.mnt / "doc.txt").chmod(0o644)
        for _ in range(2):
            denied = as_user(STRANGER, f"cat {m.mnt}/doc.txt")
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
        throttled = as_user(STRANGER, f"cat {m.mnt}/doc.txt")
        assert throttled.returncode != 0
        assert "Resource temporarily unavailable" in throttled.stderr  # EAGAIN
        allowed = as_user(KEY_USER, f"cat {m.mnt}/doc.txt")
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout == "for the key user\n"
        assert "key service unavailable" not in m.log_text()  # no backoff for everyone
