"""Fixtures that really mount: a key store, a volume and an envfs mount in temporary folders.

Every mount is unmounted and every daemon stopped even when a test fails; key stores live
in the test's temporary folder, never in the machine's state directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from envfs.files import mount as envfs_mount

ENVFS = str(Path(sys.executable).with_name("envfs"))


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


@dataclass
class Env:
    """An embedded key store and how to run ``envfs`` against it."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, *args: str, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [ENVFS, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            input=None if input is None else input.decode(),
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"envfs {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def kms(self, *args: str) -> dict[str, object]:
        out = self.run("kms", *args).stdout
        return json.loads(out) if out.strip() else {}

    def create_key(self, alias: str, *extra: str) -> str:
        key_id = str(self.kms("create-key", "--description", alias, *extra)["KeyMetadata"]["KeyId"])  # type: ignore[index]
        self.kms("create-alias", "--alias-name", f"alias/{alias}", "--target-key-id", key_id)
        return key_id


@dataclass
class Mount:
    """A live envfs mount."""

    env: Env
    backing: Path
    mnt: Path
    log: Path
    extra: tuple[str, ...] = ()

    def mount(self) -> None:
        self.env.run(
            "mount", str(self.backing), str(self.mnt), "--log-file", str(self.log), *self.extra
        )
        assert is_mounted(self.mnt)

    def umount(self) -> None:
        self.env.run("umount", str(self.mnt))
        assert not is_mounted(self.mnt)

    def remount(self) -> None:
        self.umount()
        self.mount()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def force_cleanup(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], check=False)
            time.sleep(0.2)
        envfs_mount.remove_stale_pid_file(self.mnt)  # a daemon killed by the test leaves one


@pytest.fixture
def kms_env(tmp_path: Path) -> Env:
    """A fresh embedded key store (region local-1) under the test's temporary folder."""
    return make_env(tmp_path)


def make_env(root: Path) -> Env:
    """A fresh embedded key store (region local-1) under ``root`` (for wider-scoped fixtures)."""
    env = dict(os.environ)
    env.update(
        ENVFS_KMS_DIR=str(root / "kms"),
        ENVFS_KMS_SOCKET=str(root / "no-daemon.sock"),
        ENVFS_REGION="local-1",
    )
    env.pop("CREDENTIALS_DIRECTORY", None)
    e = Env(root, env)
    e.run("kms", "init")
    return e


def _make_mount(kms_env: Env, name: str, extra: tuple[str, ...]) -> Mount:
    backing = kms_env.root / f"{name}-backing"
    mnt = kms_env.root / f"{name}-mnt"
    mnt.mkdir()
    kms_env.run("init", str(backing), "--key-id", "alias/vol")
    return Mount(kms_env, backing, mnt, kms_env.root / f"{name}.log", extra)


@contextlib.contextmanager
def live(m: Mount) -> Iterator[Mount]:
    """Mount ``m`` for the block; always unmounted afterwards, even if the daemon died."""
    m.mount()
    try:
        yield m
    finally:
        try:
            if is_mounted(m.mnt):
                m.env.run("umount", str(m.mnt), check=False)
        finally:
            m.force_cleanup()


@contextlib.contextmanager
def mounted(kms_env: Env, name: str = "vol", extra: tuple[str, ...] = ()) -> Iterator[Mount]:
    with live(_make_mount(kms_env, name, extra)) as m:
        yield m


@pytest.fixture
def vol(kms_env: Env) -> Iterator[Mount]:
    """A mounted volume under key alias/vol, created by root (admin and user of the key)."""
    kms_env.create_key("vol")
    with mounted(kms_env) as m:
        yield m


def golden_copy(golden: Path, tmp_path: Path) -> tuple[Path, Env]:
    """A copy of a golden volume folder (``kms/`` and ``backing/``) and an ``Env`` for its
    key store; version control keeps no modes, and the key store refuses to open if others
    may read it."""
    expected = json.loads((golden / "expected.json").read_text())
    copy = tmp_path / golden.name
    shutil.copytree(golden, copy, symlinks=True)
    for path in [copy, *copy.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o700)
        elif path.parent.name == expected["region"]:
            path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVFS_")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.update(
        ENVFS_KMS_DIR=str(copy / "kms"),
        ENVFS_KMS_SOCKET=str(tmp_path / "no-daemon.sock"),
        ENVFS_REGION=expected["region"],
    )
    return copy, Env(tmp_path, env)
