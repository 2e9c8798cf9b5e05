"""The golden volume of format version 2 (encrypted names) keeps mounting and reading.

``tests/golden/volume-v2/`` was made once by ``tests/golden/make_golden_volume_v2.py``;
version control keeps neither its backing entries' xattrs nor its hard links nor its
directory modes, so the xattrs are put back from ``backing-xattrs.json`` here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from tests.integration.conftest import Mount, golden_copy, live

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "volume-v2"


def restore_xattrs(backing: Path) -> None:
    stored = json.loads((GOLDEN / "backing-xattrs.json").read_text())
    for rel, xattrs in stored.items():
        for name, value in xattrs.items():
            os.setxattr(backing / rel, name, base64.b64decode(value), follow_symlinks=False)


def test_golden_volume_v2_mounts_and_reads(tmp_path: Path) -> None:
    expected = json.loads((GOLDEN / "expected.json").read_text())
    copy, golden_env = golden_copy(GOLDEN, tmp_path)
    backing = copy / "backing"
    restore_xattrs(backing)
    volume = json.loads((backing / ".envfs-volume.json").read_text())
    assert (volume["format_version"], volume["features"]) == (2, ["names"])
    # Nothing of the plaintext view is in the backing folder's names or targets.
    stored = [os.fsencode(p.name) for p in backing.rglob("*")]
    stored += [os.fsencode(os.readlink(p)) for p in backing.rglob("*") if p.is_symlink()]
    for rel in [*expected["files"], *expected["symlinks"], *expected["directories"]]:
        for part in Path(rel).parts:
            assert not [s for s in stored if os.fsencode(part) in s], part
    summary = json.loads(golden_env.run("info", str(backing)).stdout)
    assert (summary["FormatVersion"], summary["FileNames"]) == (2, "encrypted")
    assert summary["UnreadableFiles"] == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(golden_env, backing, mnt, tmp_path / "golden.log")
    with live(m):
        seen = {str(p.relative_to(mnt)) for p in mnt.rglob("*")}
        listed = {*expected["files"], *expected["symlinks"], *expected["directories"]}
        assert seen == listed
        for rel, want in expected["files"].items():
            data = (mnt / rel).read_bytes()
            assert (mnt / rel).stat().st_size == want["size"], rel
            assert (len(data), hashlib.sha256(data).hexdigest()) == (want["size"], want["sha256"])
        for rel, target in expected["symlinks"].items():
            assert os.readlink(mnt / rel) == target
            assert (mnt / rel).lstat().st_size == len(target.encode())
        for rel in expected["directories"]:
            assert (mnt / rel).is_dir() and not (mnt / rel).is_symlink()
        for rel, xattrs in expected["xattrs"].items():
            assert sorted(os.listxattr(mnt / rel)) == sorted(xattrs)
            for name, value in xattrs.items():
                assert os.getxattr(mnt / rel, name) == value.encode()
        long_name = max(expected["files"], key=len)
        (mnt / "new-file").write_bytes(b"written by this version\n")
        os.rename(mnt / long_name, mnt / "sub" / long_name)
        assert (mnt / "new-file").read_bytes() == b"written by this version\n"
        assert (mnt / "sub" / long_name).stat().st_size == expected["files"][long_name]["size"]
    assert "WARNING" not in m.log_text()
