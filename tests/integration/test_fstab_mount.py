"""``mount -t fuse.envfs``, ``/etc/fstab`` lines and ``mount.fuse3``, really mounted.

``mount(8)`` runs ``mount.fuse3``, which runs ``envfs`` through ``/bin/sh``; ``mount(8)``
removes ``$PATH`` first, so the shell looks in its default path (``/usr/local/sbin``,
``/usr/local/bin``, ``/usr/sbin``...). The tests that go through ``mount(8)`` therefore
run in a mount namespace of their own (``unshare --mount``) where a temporary folder
holding a link to this checkout's ``envfs`` is bind-mounted on ``/usr/local/sbin``: the
machine's folders and mount table are never touched, and the envfs mount lives and dies
inside that namespace. The fstab is a temporary file (``mount -T FILE``), never
``/etc/fstab``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import ENVFS, Env, backing_entry, is_mounted

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) and creating keys need root"),
]

MOUNT_FUSE3 = shutil.which("mount.fuse3") or "/sbin/mount.fuse3"


@pytest.fixture
def volume(kms_env: Env, tmp_path: Path) -> tuple[Path, Path]:
    kms_env.create_key("vol")
    backing, mnt = tmp_path / "data.envfs", tmp_path / "data"
    mnt.mkdir()
    kms_env.run("init", str(backing), "--key-id", "alias/vol")
    return backing, mnt


def mount_options(mnt: Path, mounts: str) -> list[str]:
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[1] == str(mnt):
            assert fields[2] == "fuse.envfs"
            return fields[3].split(",")
    raise AssertionError(f"{mnt} is not in:\n{mounts}")


def in_namespace(tmp_path: Path, env: Env, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) in a private mount namespace where ``envfs`` is this checkout's
    in the shell's default path; whatever it mounts is unmounted when it ends."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    bin_dir = tmp_path / "sbin"
    bin_dir.mkdir()
    (bin_dir / "envfs").symlink_to(ENVFS)
    wrapper = (
        "set -e\n"
        f"mount --bind {bin_dir} /usr/local/sbin\n"
        'trap \'grep -q " $MNT " /proc/self/mounts && umount -l "$MNT"\' EXIT\n'
        f"{script}\n"
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper],
        env=env.env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_mount_fuse3_runs_envfs_from_path(kms_env: Env, volume: tuple[Path, Path]) -> None:
    backing, mnt = volume
    log = kms_env.root / "mount.log"
    env = dict(kms_env.env, PATH=f"{Path(ENVFS).parent}:{os.environ.get('PATH', '')}")
    options = f"allow_other,noatime,log_file={log},key_cache_seconds=0"
    result = subprocess.run(
        [MOUNT_FUSE3, str(backing), str(mnt), "-t", "fuse.envfs", "-o", options],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)
        with open("/proc/self/mounts") as mounts:
            opts = mount_options(mnt, mounts.read())
        # mount.fuse3 appended dev,suid: envfs did not take them as a request.
        assert {"nodev", "nosuid", "noatime", "allow_other"} <= set(opts)
        (mnt / "hello.txt").write_text("through mount.fuse3\n")
        assert (mnt / "hello.txt").read_text() == "through mount.fuse3\n"
        behind = backing_entry(kms_env, backing, "hello.txt")
        assert b"through" not in behind.read_bytes()
        assert "mounted" in log.read_text()
    finally:
        kms_env.run("umount", str(mnt), check=False)
    assert not is_mounted(mnt)


def test_mount_t_fuse_envfs(kms_env: Env, volume: tuple[Path, Path], tmp_path: Path) -> None:
    backing, mnt = volume
    out = tmp_path / "out"
    script = (
        f"MNT={mnt}\n"
        f"mount -t fuse.envfs -o allow_other,kms_dir={tmp_path / 'kms'} {backing} {mnt}\n"
        f"grep ' {mnt} ' /proc/self/mounts > {out}.mounts\n"
        f"echo hello > {mnt}/hello.txt\n"
        f"cat {mnt}/hello.txt > {out}.read\n"
        f"umount {mnt}\n"
        f"sleep 0.2; ! grep -q ' {mnt} ' /proc/self/mounts\n"
    )
    result = in_namespace(tmp_path, kms_env, script)
    assert result.returncode == 0, result.stderr
    opts = mount_options(mnt, Path(f"{out}.mounts").read_text())
    assert {"rw", "nodev", "nosuid", "allow_other", "default_permissions"} <= set(opts)
    assert Path(f"{out}.read").read_text() == "hello\n"
    behind = backing_entry(kms_env, backing, "hello.txt")
    assert behind.read_bytes().startswith(b"\x89envfs\r\n")
    assert "hello" not in " ".join(os.listdir(backing))
    assert not is_mounted(mnt)  # never in this namespace


def test_fstab_line(kms_env: Env, volume: tuple[Path, Path], tmp_path: Path) -> None:
    """The line docs/mount.md recommends, with an embedded store instead of a daemon."""
    backing, mnt = volume
    out, fstab = tmp_path / "out", tmp_path / "fstab"
    fstab.write_text(
        "# a comment\n"
        f"{backing} {mnt} fuse.envfs allow_other,kms_dir={tmp_path / 'kms'},"
        f"log_file={tmp_path / 'fstab.log'},_netdev,nofail,noatime,"
        "x-systemd.after=envfs-kms@local-1.socket 0 0\n"
    )
    script = (
        f"MNT={mnt}\n"
        f"mount -T {fstab} {mnt}\n"
        f"grep ' {mnt} ' /proc/self/mounts > {out}.mounts\n"
        f"echo hello > {mnt}/hello.txt && cat {mnt}/hello.txt > {out}.read\n"
        f"umount {mnt}\n"
        # mount -a with the same table mounts it again; a second mount is refused.
        f"mount --fstab {fstab} -a -t fuse.envfs\n"
        f"cat {mnt}/hello.txt > {out}.again\n"
        f"! mount -T {fstab} {mnt} 2> {out}.busy\n"
        f"umount {mnt}\n"
    )
    result = in_namespace(tmp_path, kms_env, script)
    assert result.returncode == 0, result.stderr
    opts = mount_options(mnt, Path(f"{out}.mounts").read_text())
    assert {"nodev", "nosuid", "noatime", "allow_other"} <= set(opts)
    assert Path(f"{out}.read").read_text() == "hello\n"
    assert Path(f"{out}.again").read_text() == "hello\n"
    assert "envfs: error:" in Path(f"{out}.busy").read_text()
    assert "mounted" in (tmp_path / "fstab.log").read_text()


def test_fstab_line_with_a_bad_option(
    kms_env: Env, volume: tuple[Path, Path], tmp_path: Path
) -> None:
    backing, mnt = volume
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{backing} {mnt} fuse.envfs allow_other,bogus_option 0 0\n")
    result = in_namespace(tmp_path, kms_env, f"MNT={mnt}\nmount -T {fstab} {mnt}\n")
    assert result.returncode == 2  # mount(8) exits with its helper's code
    assert "envfs: error: mount option 'bogus_option' is neither an envfs option" in (result.stderr)
    assert "Traceback" not in result.stderr


def test_read_only(kms_env: Env, volume: tuple[Path, Path]) -> None:
    backing, mnt = volume
    log = str(kms_env.root / "ro.log")
    kms_env.run(str(backing), str(mnt), "-o", f"rw,log_file={log},dev,suid")
    try:
        (mnt / "kept.txt").write_text("kept\n")
    finally:
        kms_env.run("umount", str(mnt))
    kms_env.run(str(backing), str(mnt), "-o", f"ro,log_file={log},dev,suid")
    try:
        assert "ro" in mount_options(mnt, Path("/proc/self/mounts").read_text())
        assert (mnt / "kept.txt").read_text() == "kept\n"
        with pytest.raises(OSError, match="Read-only file system"):
            (mnt / "new.txt").write_text("no\n")
        with pytest.raises(OSError, match="Read-only file system"):
            (mnt / "kept.txt").write_text("changed\n")
    finally:
        kms_env.run("umount", str(mnt))
    assert not os.path.lexists(backing_entry(kms_env, backing, "new.txt"))
    kept = backing_entry(kms_env, backing, "kept.txt").name
    assert sorted(os.listdir(backing)) == sorted([".envfs-dir", ".envfs-volume.json", kept])


def test_bad_option_mounts_nothing(kms_env: Env, volume: tuple[Path, Path]) -> None:
    backing, mnt = volume
    result = kms_env.run(str(backing), str(mnt), "-o", "rw,nonsense=1", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("envfs: error: mount option 'nonsense=1' is neither")
    assert not is_mounted(mnt)
