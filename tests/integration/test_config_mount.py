"""``envfs mount --config NAME`` and ``envfs umount --config NAME``, really mounted.

The configuration directory is a temporary folder (``--config-dir`` once, then
``$ENVFS_CONFIG_DIR``), never ``/etc/envfs/volumes``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.conftest import Env, backing_entry, is_mounted

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating keys needs root"),
]


def test_mount_and_umount_through_config(kms_env: Env, tmp_path: Path) -> None:
    kms_env.create_key("vol")
    backing, mnt, log = tmp_path / "backing", tmp_path / "mnt", tmp_path / "mount.log"
    mnt.mkdir()
    kms_env.run("init", str(backing), "--key-id", "alias/vol")
    config_dir = tmp_path / "volumes"
    config_dir.mkdir()
    (config_dir / "data.toml").write_text(
        f'backing = "{backing}"\nmountpoint = "{mnt}"\nlog_file = "{log}"\n'
        'options = ["noatime"]\n'
        f'[kms]\nregion = "local-1"\nservice = "embedded"\ndir = "{tmp_path / "kms"}"\n'
    )
    kms_env.run("mount", "--config", "data", "--config-dir", str(config_dir))
    try:
        assert is_mounted(mnt)
        with open("/proc/self/mounts") as mounts:
            line = next(entry for entry in mounts if entry.split()[1] == str(mnt))
        assert "noatime" in line.split()[3].split(",")
        (mnt / "hello.txt").write_text("hello through --config\n")
        assert (mnt / "hello.txt").read_text() == "hello through --config\n"
        assert b"hello" not in backing_entry(kms_env, backing, "hello.txt").read_bytes()
        assert not (backing / "hello.txt").exists()  # the name is encrypted too
        assert "mounted" in log.read_text()  # the file's log_file was used
        kms_env.env["ENVFS_CONFIG_DIR"] = str(config_dir)
        kms_env.run("umount", "--config", "data")
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            kms_env.run("umount", str(mnt), check=False)
    assert not (mnt / "hello.txt").exists()
