"""``envfs mount --busy-poll`` and ``busy_poll`` in a volume configuration, really mounted:
the mount works with any value, the value reaches pyfuse3, and 0 spends no time polling."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from envfs.files.mount import pid_file_for
from tests.integration.conftest import Env, Mount, is_mounted, mounted

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating keys needs root"),
]


@pytest.fixture
def debug_env(kms_env: Env) -> Env:
    """The key store of ``kms_env``; mounts log debug lines (``ENVFS_DEBUG=1``)."""
    kms_env.env["ENVFS_DEBUG"] = "1"
    kms_env.create_key("vol")
    return kms_env


def daemon_cpu_seconds(m: Mount) -> float:
    """utime + stime of the mount daemon, from /proc/PID/stat."""
    pid = int(pid_file_for(m.mnt).read_text())
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("microseconds", ["0", "150"])
def test_mount_works_and_the_value_reaches_pyfuse3(debug_env: Env, microseconds: str) -> None:
    with mounted(debug_env, extra=("--busy-poll", microseconds)) as m:
        (m.mnt / "a.txt").write_text("busy poll\n")
        assert (m.mnt / "a.txt").read_text() == "busy poll\n"
        assert sorted(os.listdir(m.mnt)) == ["a.txt"]
        # Read back from pyfuse3 after setting it, so the line proves it arrived.
        assert f"busy poll: {microseconds} µs after each answer" in m.log_text()
    assert "lacks" not in m.log_text() and "no effect" not in m.log_text()


def test_default_reaches_pyfuse3(debug_env: Env) -> None:
    from envfs.files.mountopts import BUSY_POLL_DEFAULT_US

    with mounted(debug_env) as m:
        assert f"busy poll: {BUSY_POLL_DEFAULT_US} µs after each answer" in m.log_text()


def test_busy_poll_from_the_volume_configuration(debug_env: Env, tmp_path: Path) -> None:
    backing, mnt, log = tmp_path / "backing", tmp_path / "mnt", tmp_path / "mount.log"
    mnt.mkdir()
    debug_env.run("init", str(backing), "--key-id", "alias/vol")
    config_dir = tmp_path / "volumes"
    config_dir.mkdir()
    (config_dir / "data.toml").write_text(
        f'backing = "{backing}"\nmountpoint = "{mnt}"\nlog_file = "{log}"\nbusy_poll = 0\n'
        f'[kms]\ndir = "{tmp_path / "kms"}"\n'
    )
    # The file decides the keys it sets: its 0 wins over the command line's 300.
    debug_env.run(
        "mount", "--config", "data", "--config-dir", str(config_dir), "--busy-poll", "300"
    )
    try:
        assert is_mounted(mnt)
        (mnt / "b").write_bytes(b"b")
        assert "busy poll: 0 µs after each answer" in log.read_text()
    finally:
        debug_env.run("umount", str(mnt), check=False)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)


def _cpu_for_paced_lookups(m: Mount, seconds: float, interval: float) -> float:
    """Daemon CPU seconds while one lookup of a new name comes every ``interval``."""
    names = [m.mnt / f"new-{i}" for i in range(int(seconds / interval))]
    before = daemon_cpu_seconds(m)
    start = time.monotonic()
    for i, name in enumerate(names):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        assert not name.exists()
    return daemon_cpu_seconds(m) - before


def test_polling_costs_cpu_between_requests_and_0_costs_none(debug_env: Env) -> None:
    """Requests 2 ms apart: polling 10 ms after each answer keeps the daemon busy all the
    time; with 0 it sleeps between them (a lookup costs well under 1 ms of CPU).

    Compared with each other, not with the second of wall time: on a loaded machine the
    polling daemon gets only its share of a core (CI once measured 0.46 s against 0.11 s)."""
    spent = {}
    for value in ("10000", "0"):
        with mounted(debug_env, name=f"v{value}", extra=("--busy-poll", value)) as m:
            spent[value] = _cpu_for_paced_lookups(m, seconds=1.0, interval=0.002)
    assert spent["0"] < 0.35, spent
    assert spent["10000"] > 3 * spent["0"] and spent["10000"] > 0.25, spent
