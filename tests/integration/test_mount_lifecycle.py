"""A mount's life beyond the happy path: a daemon killed with SIGKILL, a mount point that
holds files, a busy mount detached lazily (issue 10 §3.1, §3.2, §5)."""

from __future__ import annotations

import errno
import os
import signal
import time

from envfs.files import mount as envfs_mount
from tests.integration.conftest import Env, Mount, is_mounted, live


def kill_daemon(m: Mount) -> int:
    """SIGKILL the mount daemon of ``m``; return once its mount is dead (ENOTCONN from
    ``statfs``, which always reaches the daemon; ``stat`` may come from the kernel's cache)."""
    pid = int(envfs_mount.pid_file_for(m.mnt).read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.statvfs(m.mnt)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                break
            assert exc.errno == errno.ECONNABORTED, exc  # in flight as the daemon died
        assert time.monotonic() < deadline, "the mount did not die"
        time.sleep(0.02)
    assert is_mounted(m.mnt)  # dead, and still in the mount table
    return pid


def wait_gone(pid: int, timeout: float = 10) -> None:
    assert envfs_mount.process_ended(pid, timeout), f"pid {pid} is still running"


def test_mount_clears_a_dead_mount_and_its_stale_pid_file(kms_env: Env, vol: Mount) -> None:
    """After kill -9 every restart failed with ``OSError(107, 'Transport endpoint is not
    connected')``, so systemd's ``Restart=`` looped forever. The next mount clears it."""
    (vol.mnt / "kept.txt").write_bytes(b"written before the crash\n")
    os.sync()
    pid_file = envfs_mount.pid_file_for(vol.mnt)
    old_pid = kill_daemon(vol)
    assert pid_file.exists()  # SIGKILL leaves it behind
    vol.mount()  # the same command a restart runs
    assert (vol.mnt / "kept.txt").read_bytes() == b"written before the crash\n"
    new_pid = int(pid_file.read_text())
    assert new_pid != old_pid and envfs_mount._read_pid(pid_file) == new_pid
    assert "cleared a dead envfs mount" in vol.log_text()


def test_umount_clears_a_dead_mount(kms_env: Env, vol: Mount) -> None:
    kill_daemon(vol)
    result = kms_env.run("umount", str(vol.mnt))
    assert "cleared a dead mount" in result.stderr
    assert not is_mounted(vol.mnt)
    assert not envfs_mount.pid_file_for(vol.mnt).exists()
    vol.mount()  # and the volume mounts again as usual
    assert is_mounted(vol.mnt)


def test_a_stale_pid_file_is_removed(kms_env: Env, vol: Mount) -> None:
    vol.umount()
    pid_file = envfs_mount.pid_file_for(vol.mnt)
    pid_file.write_text("999999999\n")  # no such process
    result = kms_env.run("umount", str(vol.mnt), check=False)
    assert result.returncode == 61 and "is not an envfs mount" in result.stderr
    assert not pid_file.exists()
    pid_file.write_text(f"{os.getpid()}\n")  # a live process, but no envfs mount daemon
    vol.mount()
    assert envfs_mount._read_pid(pid_file) not in (None, os.getpid())


def test_a_mount_point_that_holds_files_is_refused_unless_nonempty(kms_env: Env) -> None:
    kms_env.create_key("vol")
    backing, mnt = kms_env.root / "backing", kms_env.root / "mnt"
    kms_env.run("init", str(backing), "--key-id", "alias/vol")
    mnt.mkdir()
    (mnt / ".hidden-by-the-mount").write_bytes(b"under\n")
    m = Mount(kms_env, backing, mnt, kms_env.root / "mount.log")
    refused = kms_env.run("mount", str(backing), str(mnt), check=False)
    assert refused.returncode == 61, refused.stderr
    assert "is not empty" in refused.stderr and "-o nonempty" in refused.stderr
    assert not is_mounted(mnt)
    # Spelled alone or in a list; envfs's own option, never handed to libfuse 3 (which
    # refuses "nonempty").
    for options in (("-o", "nonempty"), ("-o", "noatime,nonempty")):
        m.extra = options
        with live(m):
            assert not (mnt / ".hidden-by-the-mount").exists()
            (mnt / "on-top.txt").write_bytes(b"over\n")
        assert (mnt / ".hidden-by-the-mount").read_bytes() == b"under\n"


def test_lazy_umount_detaches_a_busy_mount_and_loses_nothing(kms_env: Env, vol: Mount) -> None:
    pid = int(envfs_mount.pid_file_for(vol.mnt).read_text())
    fd = os.open(vol.mnt / "open.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before the stop\n")
        busy = kms_env.run("umount", str(vol.mnt), check=False)
        assert busy.returncode == 61 and "--lazy" in busy.stderr
        assert is_mounted(vol.mnt)
        detached = kms_env.run("umount", "--lazy", str(vol.mnt))
        assert "detached" in detached.stderr
        assert not is_mounted(vol.mnt)
        os.write(fd, b"after the detach\n")  # the open file keeps working
        vol.mount()  # a new daemon on the same mount point, while the old one serves fd
        new_pid = int(envfs_mount.pid_file_for(vol.mnt).read_text())
    finally:
        os.close(fd)
    wait_gone(pid)  # the old daemon ends with the last open file
    # ... and leaves the new daemon's pid file alone, so that umount can wait for it.
    assert envfs_mount._read_pid(envfs_mount.pid_file_for(vol.mnt)) == new_pid != pid
    assert (vol.mnt / "open.bin").read_bytes() == b"before the stop\nafter the detach\n"
    vol.umount()
    wait_gone(new_pid, timeout=0.5)  # umount waited for it
