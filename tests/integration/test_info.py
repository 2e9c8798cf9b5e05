"""``envfs info`` on a fresh volume written through a real mount, and without a key service."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.conftest import Env, Mount, mounted

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating keys needs root"),
]


def info(env: Env, backing: Path) -> dict[str, object]:
    return json.loads(env.run("info", str(backing)).stdout)  # type: ignore[no-any-return]


LONG = "l" * 200  # a long name with encrypted names: its entry and a name file behind


@pytest.mark.parametrize("plaintext_names", [False, True])
def test_fresh_volume(kms_env: Env, plaintext_names: bool) -> None:
    key_id = kms_env.create_key("vol")
    init = ("--plaintext-names",) if plaintext_names else ()
    with mounted(kms_env, init=init) as m:
        (m.mnt / "a.txt").write_text("hello\n")
        (m.mnt / LONG).write_text("long\n")
        (m.mnt / "docs" / "deep").mkdir(parents=True)
        (m.mnt / "docs" / "deep" / "b.bin").write_bytes(os.urandom(40_000))
        (m.mnt / "empty").touch()
        (m.mnt / "link").symlink_to("a.txt")
        os.mkfifo(m.mnt / "fifo")
        with open(m.mnt / "sparse.img", "wb") as f:
            f.truncate(1 << 30)  # a hole of 1 GiB: FLAG_SPARSE
        kms_env.kms("rotate-key-on-demand", "--key-id", key_id)
        (m.mnt / "after-rotation.txt").write_text("new key version\n")
        backing = m.backing
        volume = json.loads((backing / ".envfs-volume.json").read_text())
        answer = info(kms_env, backing)
    assert answer["VolumeId"] == volume["volume_id"]
    assert answer["KeyArn"] == volume["key_arn"]
    assert answer["Region"] == "local-1"
    assert (answer["BlockSize"], answer["FormatVersion"]) == (16384, 2)
    if plaintext_names:
        assert (answer["Features"], answer["FileNames"]) == ([], "plaintext")
        own = {".envfs-volume.json"}
    else:
        assert (answer["Features"], answer["FileNames"]) == (["names"], "encrypted")
        own = {".envfs-volume.json", ".envfs-dir"}
        long_entry = [p.name for p in backing.iterdir() if p.name.startswith(".envfs-L")]
        assert len(long_entry) == 2  # the entry and its name file
        own.add(min(long_entry, key=len) + ".name")
    assert (answer["Files"], answer["Directories"], answer["Symlinks"]) == (6, 2, 1)
    assert (answer["SpecialFiles"], answer["SparseFiles"], answer["UnreadableFiles"]) == (1, 1, 0)
    assert answer["PlaintextSize"] == 6 + 5 + 40_000 + 0 + (1 << 30) + 16
    assert answer["BackingSize"] == sum(
        p.stat().st_size
        for p in backing.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name not in own
    )
    assert answer["KeyVersions"] == [
        {"KeyArn": volume["key_arn"], "KeyVersion": 1, "Files": 5},
        {"KeyArn": volume["key_arn"], "KeyVersion": 2, "Files": 1},
    ]
    assert answer["Problems"] == []


def test_needs_no_key_service(kms_env: Env) -> None:
    kms_env.create_key("vol")
    with mounted(kms_env) as m:
        (m.mnt / "a.txt").write_text("hello\n")
        backing = m.backing
    env = dict(kms_env.env, ENVFS_KMS_DIR="/nonexistent", ENVFS_KMS="unix:/nonexistent.sock")
    answer = info(Env(kms_env.root, env), backing)
    assert (answer["Files"], answer["PlaintextSize"]) == (1, 6)


def test_while_mounted(vol: Mount) -> None:
    (vol.mnt / "x").write_text("x")
    answer = info(vol.env, vol.backing)
    assert answer["Files"] == 1
    assert (vol.mnt / "x").read_text() == "x"  # the mount did not notice
