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

from envfs import crypto
from envfs.files import mount as envfs_mount
from envfs.files import names
from envfs.files.names import NameKeys
from envfs.files.volume import Volume
from envfs.identity import Caller
from envfs.keys.embedded import EmbeddedKeyProvider
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

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


def _make_mount(
    kms_env: Env, name: str, extra: tuple[str, ...], init: tuple[str, ...] = ()
) -> Mount:
    backing = kms_env.root / f"{name}-backing"
    mnt = kms_env.root / f"{name}-mnt"
    mnt.mkdir()
    kms_env.run("init", str(backing), "--key-id", "alias/vol", *init)
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
def mounted(
    kms_env: Env, name: str = "vol", extra: tuple[str, ...] = (), init: tuple[str, ...] = ()
) -> Iterator[Mount]:
    """A new volume ``name`` (``envfs init`` under alias/vol with ``init``'s options; names
    encrypted unless ``--plaintext-names``), mounted with ``extra`` for the block."""
    with live(_make_mount(kms_env, name, extra, init)) as m:
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


# --- the backing path of a plaintext path ----------------------------------------------

_name_keys: dict[tuple[str, str, str], NameKeys] = {}


def name_keys(env: Env, backing: Path, caller: Caller | None = None) -> NameKeys:
    """The name keys of the volume in ``backing`` (encrypted names), as the mount derives
    them: its volume file authenticated by ``env``'s embedded key store, as ``caller``
    (root by default; pass a key user where root may not use the key). Kept per volume,
    so that a test's audit log gains one Decrypt at most."""
    volume = Volume.load(backing)
    assert volume.encrypted_names, f"{backing} keeps plaintext names"
    kms_dir, region = env.env["ENVFS_KMS_DIR"], env.env["ENVFS_REGION"]
    cache_key = (kms_dir, region, volume.volume_id)
    found = _name_keys.get(cache_key)
    if found is not None:
        return found
    service = KeyService(KeyStore.open(Path(kms_dir) / region, region))
    try:
        secret = volume.verify(EmbeddedKeyProvider(service), caller or Caller.from_ids(0, 0))
    finally:
        service.close()
    keys = NameKeys.derive(secret, volume.volume_id)
    _name_keys[cache_key] = keys
    return keys


def backing_entry(env: Env, backing: Path, rel: Path | str, caller: Caller | None = None) -> Path:
    """The backing path of ``rel`` (a path of the plaintext view, relative to its root) in
    the volume folder ``backing``: itself for plaintext names; for encrypted names each
    component encrypted with its parent's directory id (a long name gives its
    ``.envfs-L…`` entry, whose name file is :func:`long_name_file`)."""
    rel = Path(rel)
    assert not rel.is_absolute(), rel
    volume = Volume.load(backing)
    if not volume.encrypted_names:
        return backing / rel
    keys = name_keys(env, backing, caller)
    siv = crypto.Siv(keys.name_key)
    path = backing
    for part in rel.parts:
        dir_file = (path / os.fsdecode(names.DIR_FILE)).read_bytes()
        dir_id = names.parse_dir_file(keys, dir_file, volume.volume_id)
        encoded = names.encrypt_name(siv, dir_id, os.fsencode(part))
        path = path / os.fsdecode(names.backing_name(encoded))
    return path


def backing_of(m: Mount, path: Path | str, caller: Caller | None = None) -> Path:
    """The backing path of ``path``, a path in ``m``'s plaintext view (absolute, under
    ``m.mnt``, or relative to it)."""
    path = Path(path)
    rel = path.relative_to(m.mnt) if path.is_absolute() else path
    return backing_entry(m.env, m.backing, rel, caller)


def long_name_file(entry: Path) -> Path:
    """The name file beside a long name's backing entry."""
    return entry.with_name(entry.name + os.fsdecode(names.LONG_NAME_SUFFIX))


def view_name(m: Mount, behind: Path, caller: Caller | None = None) -> str:
    """The name in ``m``'s plaintext view of the backing entry ``behind``: itself for
    plaintext names, else decrypted with its folder's id (a long name from its name file).

    Raises:
        IntegrityError: not a name of that folder (moved from another, edited, not envfs's).
    """
    volume = Volume.load(m.backing)
    if not volume.encrypted_names:
        return behind.name
    keys = name_keys(m.env, m.backing, caller)
    dir_file = (behind.parent / os.fsdecode(names.DIR_FILE)).read_bytes()
    dir_id = names.parse_dir_file(keys, dir_file, volume.volume_id)
    encoded = os.fsencode(behind.name)
    if names.is_long(encoded):
        encoded = long_name_file(behind).read_bytes()
        names.check_long(os.fsencode(behind.name), encoded)
    return os.fsdecode(names.decrypt_name(crypto.Siv(keys.name_key), dir_id, encoded))


def as_user(uid: int, command: str) -> subprocess.CompletedProcess[str]:
    """``sh -c command`` as ``uid`` (its own gid, no other groups); never raises for its
    exit status."""
    return subprocess.run(
        [
            "setpriv",
            "--reuid",
            str(uid),
            "--regid",
            str(uid),
            "--clear-groups",
            "sh",
            "-c",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
