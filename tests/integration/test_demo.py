"""`make demo`'s script: it mounts a demo encrypted folder and says how to unmount it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import Env, backing_entry, is_mounted

REPO = Path(__file__).resolve().parents[2]
ENVFS = str(Path(sys.executable).with_name("envfs"))


def run_demo(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEMO_DIR": str(tmp_path / "demo"), "ENVFS": ENVFS}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_demo_mounts_an_encrypted_folder(tmp_path: Path) -> None:
    mnt = tmp_path / "demo" / "mnt"
    try:
        result = run_demo(tmp_path)
        assert is_mounted(mnt)
        assert (mnt / "myfile.txt").read_text() == "Some text, written through the mount\n"
        backing = tmp_path / "demo" / "backing"
        demo_env = Env(
            tmp_path, {"ENVFS_KMS_DIR": str(tmp_path / "demo" / "kms"), "ENVFS_REGION": "local-1"}
        )
        behind = backing_entry(demo_env, backing, "myfile.txt")
        assert b"Some text" not in behind.read_bytes()
        assert sorted(os.listdir(backing)) == sorted(
            [".envfs-dir", ".envfs-volume.json", behind.name]
        )
        listing = result.stdout.split("\n$ ls -la backing\n")[1].split("\n$ ")[0]
        assert behind.name in listing and "myfile" not in listing
        assert "the backing folder holds no plaintext name" in result.stdout
        assert "the backing file holds no plaintext" in result.stdout
        assert '"KeyVersion": 1' in result.stdout
        assert f"umount {mnt}" in result.stdout
        run_demo(tmp_path)  # running it again starts over cleanly, over the live mount
        subprocess.run([ENVFS, "umount", str(mnt)], check=True, timeout=60)
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
