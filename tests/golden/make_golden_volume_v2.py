"""Generate tests/golden/volume-v2/ once; the tests only ever mount copies of it.

A small volume of format version 2 with encrypted names, made through the real CLI and a
real mount (run as root, FUSE needed), laid out as ``volume-v1/`` is
(:mod:`make_golden_volume`): ``kms/local-1/`` (the key store), ``backing/`` and
``expected.json``, which here also lists hard links and ``user.`` xattrs. Version control
keeps neither xattrs nor hard links nor directory modes: the backing entries' xattrs (the
encrypted ``user.envfs.x.*``) are in ``backing-xattrs.json``, for a test to put back on its
copy; hard links come back as files of the same bytes (one file id), which read the same.
It holds what version 2 added: names of every kind (short, 159 and 255 bytes, non-ASCII,
starting with a dot), directories of unusual modes, symlinks, a hard link, xattrs.

Every later envfs must keep mounting it and reading the same plaintext. Regenerating it
defeats that purpose, so the script refuses to overwrite without ``--force``.

    .venv/bin/python -m tests.golden.make_golden_volume_v2 [--output DIR] [--force]
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from tests.golden.make_golden_volume import BLOCK, HERE, generate, run, save, store_env, stream

LONG = "L" * 200 + "-long name of 255 bytes, stored with a name file-" + "x" * 6
FILES: dict[str, bytes] = {
    "hello.txt": b"hello from the golden volume, format 2, encrypted names\n",
    "empty": b"",
    ".hidden": b"a name starting with a dot\n",
    "n" * 159: b"the longest name that is stored without a name file\n",
    LONG: b"a name of 255 bytes\n",
    "multi-block.bin": stream("v2 multi block", 2 * BLOCK + 100),
    "sub/nested.txt": b"a file in a subdirectory\n",
    "sub/deeper/n\u00e4me with spaces \u2603.txt": b"non-ASCII name, UTF-8\n",
    "read-only/inside": b"in a directory of mode 0555\n",
    "sticky/inside": b"in a directory of mode 1777\n",
}
SYMLINKS: dict[str, str] = {
    "link-to-hello": "hello.txt",
    "sub/link-up": "../multi-block.bin",
    "dangling": "/nowhere/" + "t" * 100,
}
HARDLINKS: dict[str, str] = {"sub/hard-link-to-hello": "hello.txt"}
XATTRS: dict[str, dict[str, str]] = {
    "hello.txt": {"user.colour": "blue", "user.comment": "an xattr of the golden volume"},
}
MODES: dict[str, int] = {  # directories made with these exact modes, after their files
    "sub": 0o755,
    "sub/deeper": 0o700,
    "read-only": 0o555,
    "sticky": 0o1777,
    "closed": 0o000,
}
assert len(LONG.encode()) == 255


def make(work: Path, output: Path) -> None:
    env = store_env(work)
    meta = json.loads(run(env, "kms", "create-key", "--description", "envfs golden volume v2"))
    key_arn = meta["KeyMetadata"]["Arn"]
    run(env, "kms", "create-alias", "--alias-name", "alias/golden", "--target-key-id", key_arn)
    backing, mnt = work / "backing", work / "mnt"
    mnt.mkdir()
    run(env, "init", str(backing), "--key-id", "alias/golden")
    run(env, "mount", str(backing), str(mnt))
    try:
        for rel in MODES:
            (mnt / rel).mkdir(parents=True, exist_ok=True)
        for rel, data in FILES.items():
            (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
            (mnt / rel).write_bytes(data)
        for rel, target in SYMLINKS.items():
            (mnt / rel).symlink_to(target)
        for rel, target in HARDLINKS.items():
            os.link(mnt / target, mnt / rel)
        for rel, xattrs in XATTRS.items():
            for name, value in xattrs.items():
                os.setxattr(mnt / rel, name, value.encode())
        for rel, mode in sorted(MODES.items(), key=lambda item: -len(item[0])):
            os.chmod(mnt / rel, mode)
    finally:
        run(env, "umount", str(mnt))

    output.mkdir(parents=True)
    save(work, backing, output)
    stored: dict[str, dict[str, str]] = {}
    for path in sorted(backing.rglob("*")):
        names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")]
        if names:
            stored[str(path.relative_to(backing))] = {
                n: base64.b64encode(os.getxattr(path, n, follow_symlinks=False)).decode()
                for n in sorted(names)
            }
    (output / "backing-xattrs.json").write_text(json.dumps(stored, indent=2) + "\n")
    volume = json.loads((backing / ".envfs-volume.json").read_text())
    every = {**FILES, **{rel: FILES[target] for rel, target in HARDLINKS.items()}}
    expected = {
        "comment": "made by tests/golden/make_golden_volume_v2.py; never regenerate",
        "region": "local-1",
        "key_arn": key_arn,
        "volume_id": volume["volume_id"],
        "format_version": 2,
        "features": ["names"],
        "files": {
            rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for rel, data in sorted(every.items())
        },
        "symlinks": dict(sorted(SYMLINKS.items())),
        "hardlinks": dict(sorted(HARDLINKS.items())),
        "directories": sorted(MODES),
        "xattrs": XATTRS,
    }
    (output / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    generate(__doc__, HERE / "volume-v2", make)
