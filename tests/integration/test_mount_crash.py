"""A crash of the mount daemon (kill -9) during heavy writes loses at most unsynced data."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

from envfs.files import fileformat
from envfs.files import mount as envfs_mount
from tests.integration.conftest import Env, Mount, backing_of

WRITER = r"""
import hashlib, json, os, random, sys
mnt, count = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
round_ = 0
while True:
    round_ += 1
    for i in range(count):
        path = os.path.join(mnt, f"f{i:03d}")
        data = rng.randbytes(rng.choice([0, 1, 4096, 16384, 16385, 70000, 200000]))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        if i % 2 == 0:
            os.fsync(fd)
            os.close(fd)
            # Only now is this content promised to survive.
            print(json.dumps([path, hashlib.sha256(data).hexdigest(), round_]), flush=True)
        else:
            os.close(fd)
"""


def test_kill_9_during_writes_loses_only_unsynced_data(kms_env: Env, vol: Mount) -> None:
    pid = int(envfs_mount.pid_file_for(vol.mnt).read_text())
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(vol.mnt), "40"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    synced: dict[str, str] = {}
    assert writer.stdout is not None
    try:
        for _ in range(50):  # two and a half rounds of fsynced files
            line = writer.stdout.readline()
            assert line, "the writer stopped early"
            path, digest, _ = json.loads(line)
            synced[path] = digest
        os.kill(pid, signal.SIGKILL)  # in the middle of the writer's next files
    finally:
        writer.kill()
        rest = writer.communicate()[0]
    for line in rest.splitlines():  # acknowledged before the kill took effect
        path, digest, _ = json.loads(line)
        synced[path] = digest
    assert len(synced) >= 20
    vol.force_cleanup()
    vol.mount()
    # No backing file was left without a valid header.
    for backing in vol.backing.iterdir():
        if backing.name.startswith(".envfs-volume") or backing.name in (
            ".envfs-dir",
            ".envfs-journal",
        ):
            continue
        raw = backing.read_bytes()
        header = fileformat.FileHeader.parse(raw)  # what `envfs inspect` reads; raises if bad
        fileformat.plaintext_size(len(raw), header.block_shift)
    # Every file whose last write was fsynced reads back exactly; none gives EIO.
    touched_after = set()
    for name in sorted(p.name for p in vol.mnt.iterdir()):
        data = (vol.mnt / name).read_bytes()  # raises on EIO
        path = str(vol.mnt / name)
        if path in synced and hashlib.sha256(data).hexdigest() != synced[path]:
            touched_after.add(name)
    # The writer rewrites each file in turn: at most the file it was writing when the
    # daemon died may hold newer, unsynced content.
    assert len(touched_after) <= 1, touched_after


def test_kill_9_loses_no_audit_record_of_an_open(kms_env: Env, vol: Mount) -> None:
    """The mount's key service batches the audit records of opens (docs/kms.md §8): a
    record waits in the store's journal for up to about 0.1 s before it joins the chain.
    Killed in that time, the mount loses none: the next user of the store adds them."""
    names = [f"f{i:02d}" for i in range(20)]
    for name in names:
        (vol.mnt / name).write_bytes(name.encode())
    pid = int(envfs_mount.pid_file_for(vol.mnt).read_text())
    store_dir = kms_env.root / "kms" / "local-1"
    for name in names:
        assert (vol.mnt / name).read_bytes() == name.encode()  # one Decrypt each
    os.kill(pid, signal.SIGKILL)  # at once: the last records are in the journal only
    vol.force_cleanup()
    assert list(store_dir.glob("audit-journal-*.log")), "the mount left no journal"
    records = kms_env.kms("audit")["Records"]  # this opener adds the journal to the chain
    assert isinstance(records, list)
    opened = [
        r["request"]["AuditNote"]
        for r in records
        if r["operation"] == "Decrypt"
        and r["outcome"] == "Success"
        and r["request"]["AuditNote"].startswith(f"{vol.backing}/")
    ]
    assert sorted(opened) == sorted(str(backing_of(vol, name)) for name in names)
    assert list(store_dir.glob("audit-journal-*.log")) == []
    assert "audit log verified" in kms_env.run("kms", "audit", "--verify").stdout
