"""A flood of connect/close cycles on a Unix socket, from processes running as another uid.

Used by the key-service tests to show that one uid cannot keep the others from being
served. Needs root (``setpriv``). Every process is stopped when the block ends, even
when the test fails.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Connects without blocking and closes, again and again, until SIGTERM (or a hard cap of
# max_seconds); then prints how many connects got in and how many found the backlog full.
FLOOD = r"""
import signal, socket, sys, time
path, max_seconds = sys.argv[1], float(sys.argv[2])
connected = full = 0
def report(*_):
    sys.stdout.write("%d %d\n" % (connected, full))
    sys.stdout.flush()
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
sys.stdout.write("flooding\n")
sys.stdout.flush()
end = time.monotonic() + max_seconds
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
        connected += 1
    except BlockingIOError:
        full += 1
    except OSError:
        pass
    s.close()
report()
"""


def as_uid(uid: int) -> list[str]:
    return ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]


@functools.cache
def python_for(uid: int) -> str:
    """An interpreter ``uid`` may run (the test's may live where it cannot reach)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run([*as_uid(uid), candidate, "-I", "-c", "pass"], check=False)
        if probe.returncode == 0:
            return candidate
    raise AssertionError(f"no python interpreter that uid {uid} may run")


@dataclass
class FloodStats:
    connected: int = 0  # connects that got into the backlog
    full: int = 0  # connects that found the backlog full (EAGAIN)


@contextlib.contextmanager
def connection_flood(
    path: Path, uid: int, processes: int = 2, max_seconds: float = 60.0
) -> Iterator[FloodStats]:
    """Flood ``path`` from ``processes`` processes of ``uid`` for the block (returns once
    every process floods); the stats are filled in when the block ends."""
    command = [*as_uid(uid), python_for(uid), "-I", "-c", FLOOD, str(path), str(max_seconds)]
    stats = FloodStats()
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(processes):
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout is not None
            assert proc.stdout.readline() == "flooding\n"
        yield stats
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            with contextlib.suppress(ValueError):
                connected, full = map(int, out.split())
                stats.connected += connected
                stats.full += full
