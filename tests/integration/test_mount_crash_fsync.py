"""kill -9 of the mount daemon at random moments never makes fsynced data unreadable.

A writer (``crashwriter.py``) appends, overwrites in the middle and now and then truncates a
few files through the mount, fsyncing every few changes and reporting the content each
fsync made durable. The daemon is killed at a random moment while it serves a large write,
the mount cleared and mounted again, and every file must read without an error and hold a
state it went through that is no older than the last one reported: its fsynced bytes, and
perhaps some later changes. The backing folders are on a small tmpfs.

A kill cuts a write to the backing file short (what tears a block) only when it lands in
the daemon's ``pwrite``, a few percent of its time: so each round kills the daemons of
several volumes, one after the other, and mounts them again together.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from envfs.files import mount as envfs_mount
from tests.integration import crashwriter
from tests.integration.conftest import Env, Mount, is_mounted, live

ROUNDS = 13
VOLUMES = 3
FILES = ["a", "b", "c"]
# The most operations a file may have gone through after its last report: the ones before
# the next fsync (at most 4), a truncation to cut it back, and that fsync's own if it
# returned but was not reported yet.
AFTER_REPORT = 12


@pytest.fixture
def tmpfs_volumes(kms_env: Env) -> Iterator[list[Mount]]:
    """``VOLUMES`` mounted volumes whose backing folders are on one 64 MiB tmpfs; every
    mount and the tmpfs are unmounted whatever happens."""
    kms_env.create_key("vol")
    disk = kms_env.root / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(disk)],
                   check=True)  # fmt: skip
    try:
        with ExitStack() as stack:
            mounts = []
            for i in range(VOLUMES):
                backing, mnt = disk / f"backing{i}", kms_env.root / f"mnt{i}"
                mnt.mkdir()
                kms_env.run("init", str(backing), "--key-id", "alias/vol")
                m = Mount(kms_env, backing, mnt, kms_env.root / f"mount{i}.log")
                mounts.append(stack.enter_context(live(m)))
            yield mounts
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def states(seed: int, index: int, start: bytes, count: int) -> Iterator[tuple[int, bytes]]:
    """The content of file ``index`` after 0, 1, ... ``count`` of the writer's operations."""
    content = bytearray(start)
    yield 0, bytes(content)
    done = 0
    for op in crashwriter.changes(seed, index, len(start)):
        if done == count:
            return
        if op is None:
            continue
        crashwriter.apply(content, op)
        done += 1
        yield done, bytes(content)


def partly_written(now: bytes, before: bytes, after: bytes) -> bool:
    """Whether ``now`` is ``before`` with a write that made ``after`` done in part: the
    kernel cuts a large write(2) into several requests at page boundaries, and the daemon
    may die between two of them. Every page either way, nothing else changed."""
    if not len(before) <= len(now) <= len(after) and len(now) != len(before):
        return False
    first = next((i for i, (x, y) in enumerate(zip(before, after, strict=False)) if x != y), None)
    start = (len(before) if first is None else min(first, len(before))) & ~4095
    if now[:start] != before[:start]:
        return False
    for page in range(start, len(now), 4096):
        got = now[page : page + 4096]
        if got not in (before[page : page + 4096], after[page : page + 4096]):
            return False
    return True


def crash_round(m: Mount, seed: int, rng: random.Random) -> dict[str, tuple[int, str]]:
    """Run the writer, kill the daemon at a random moment; the last report of each file."""
    pid = int(envfs_mount.pid_file_for(m.mnt).read_text())
    writer = subprocess.Popen(
        [sys.executable, crashwriter.__file__, str(m.mnt), str(seed), *FILES],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    reports: dict[str, tuple[int, str]] = {}
    assert writer.stdin is not None and writer.stdout is not None
    try:
        wanted = rng.randrange(1, 20)
        while True:
            line = writer.stdout.readline()
            assert line, "the writer stopped early"
            report = json.loads(line)
            if report:
                name, done, digest = report
                reports[name] = (done, digest)
                wanted -= 1
                continue
            writer.stdin.write("go\n")  # a large write waits for this
            writer.stdin.flush()
            if wanted <= 0:
                break
        # The large write (1 or 2 MiB: a few milliseconds of the daemon's work) has begun.
        deadline = time.perf_counter() + rng.random() * 0.0025
        while time.perf_counter() < deadline:
            pass
        os.kill(pid, signal.SIGKILL)
    finally:
        writer.kill()
        rest = writer.communicate()[0]
    for line in rest.splitlines():  # reported before the kill took effect
        if report := json.loads(line):
            name, done, digest = report
            reports[name] = (done, digest)
    return reports


def remount(mounts: list[Mount]) -> None:
    """Clear the mounts whose daemons were killed, and mount them again, together."""
    for m in mounts:
        subprocess.run(["fusermount3", "-uz", str(m.mnt)], check=True)
    time.sleep(0.2)
    for m in mounts:
        assert not is_mounted(m.mnt)
        m.force_cleanup()  # the pid file a killed daemon leaves
    with ThreadPoolExecutor(len(mounts)) as pool:
        list(pool.map(Mount.mount, mounts))


def check_round(
    m: Mount, content: dict[str, bytes], seed: int, reports: dict[str, tuple[int, str]]
) -> list[str]:
    """Check every file of ``m`` against its last report; the files that gave an error
    (made empty again, to go on)."""
    unreadable = []
    for index, name in enumerate(FILES):
        done, digest = reports.get(name, (0, hashlib.sha256(content[name]).hexdigest()))
        try:
            now = (m.mnt / name).read_bytes()
        except OSError as exc:
            unreadable.append(f"{m.mnt.name}/{name}: {exc.strerror} (seed {seed})")
            (m.mnt / name).unlink()
            with open(m.mnt / name, "wb") as f:
                os.fsync(f.fileno())
            content[name] = b""
            continue
        found, previous = None, b""
        for count, state in states(seed, index, content[name], done + AFTER_REPORT):
            if count == done:
                assert hashlib.sha256(state).hexdigest() == digest, "the replay went wrong"
            if count >= done and state == now:
                found = count
                break
            if count > done and partly_written(now, previous, state):
                found = count
                break
            previous = state
        assert found is not None, f"{m.mnt.name}/{name} (seed {seed}): older than its last fsync"
        content[name] = now
    return unreadable


def test_fsynced_data_survives_kill_9_at_random_moments(tmpfs_volumes: list[Mount]) -> None:
    contents = [{name: b"" for name in FILES} for _ in tmpfs_volumes]
    for m in tmpfs_volumes:
        for name in FILES:
            with open(m.mnt / name, "wb") as f:
                os.fsync(f.fileno())
    rng = random.Random(int.from_bytes(os.urandom(4)))
    unreadable: list[str] = []
    for round_ in range(ROUNDS):
        seeds = [rng.randrange(1 << 30) for _ in tmpfs_volumes]
        reports = [crash_round(m, seed, rng) for m, seed in zip(tmpfs_volumes, seeds, strict=True)]
        remount(tmpfs_volumes)
        for m, content, seed, report in zip(tmpfs_volumes, contents, seeds, reports, strict=True):
            unreadable += (f"round {round_}: {u}" for u in check_round(m, content, seed, report))
    assert not unreadable, unreadable
