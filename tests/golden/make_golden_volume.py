"""Generate tests/golden/volume-v1/ once; the tests only ever mount copies of it.

A small volume of the first released format, made through the real CLI and a real mount
(run as root, FUSE needed)::

    volume-v1/kms/local-1/keys.db, root.key   the key store (no passphrase) holding its key
    volume-v1/backing/                        the backing folder, volume file included
    volume-v1/expected.json                   what the plaintext view must show

Every later envfs must keep mounting it and reading the same plaintext. Regenerating it
defeats that purpose, so the script refuses to overwrite without ``--force``.

    .venv/bin/python tests/golden/make_golden_volume.py [--output DIR] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENVFS = str(Path(sys.executable).with_name("envfs"))
REGION = "local-1"
BLOCK = 16384


def stream(label: str, size: int) -> bytes:
    """Reproducible bytes, so that expected.json reads the same on every run."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"envfs golden volume {label} {counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


# Plaintext files by path (relative to the mount), and symlinks by path -> target.
FILES: dict[str, bytes] = {
    "empty": b"",
    "hello.txt": b"hello from the golden volume, format 1\n",
    "one-block.bin": stream("one block", BLOCK),
    "multi-block.bin": stream("multi block", 3 * BLOCK + BLOCK // 2),
    "sub/nested.txt": b"a file in a subdirectory\n",
    "sub/deeper/empty-too": b"",
    "sub/deeper/n\u00e4me with spaces.txt": b"non-ASCII name, UTF-8\n",
}
SYMLINKS: dict[str, str] = {
    "link-to-hello": "hello.txt",
    "sub/link-up": "../multi-block.bin",
}


def run(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [ENVFS, *args], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise SystemExit(f"envfs {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def store_env(work: Path) -> dict[str, str]:
    """The environment of ``envfs`` commands on a new embedded key store under ``work``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVFS_")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.update(
        ENVFS_KMS_DIR=str(work / "kms"),
        ENVFS_KMS_SOCKET=str(work / "no-daemon.sock"),
        ENVFS_REGION=REGION,
    )
    run(env, "kms", "init")
    return env


def make(work: Path, output: Path) -> None:
    env = store_env(work)
    meta = json.loads(run(env, "kms", "create-key", "--description", "envfs golden volume v1"))
    key_arn = meta["KeyMetadata"]["Arn"]
    run(env, "kms", "create-alias", "--alias-name", "alias/golden", "--target-key-id", key_arn)
    backing, mnt = work / "backing", work / "mnt"
    mnt.mkdir()
    run(env, "init", str(backing), "--key-id", "alias/golden")
    run(env, "mount", str(backing), str(mnt))
    try:
        for rel, data in FILES.items():
            (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
            (mnt / rel).write_bytes(data)
        for rel, target in SYMLINKS.items():
            (mnt / rel).symlink_to(target)
    finally:
        run(env, "umount", str(mnt))

    output.mkdir(parents=True)
    save(work, backing, output)
    volume = json.loads((backing / ".envfs-volume.json").read_text())
    expected = {
        "comment": "made by tests/golden/make_golden_volume.py; never regenerate",
        "region": REGION,
        "key_arn": key_arn,
        "volume_id": volume["volume_id"],
        "files": {
            rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for rel, data in sorted(FILES.items())
        },
        "symlinks": dict(sorted(SYMLINKS.items())),
        "directories": sorted({str(Path(rel).parent) for rel in FILES} - {"."}),
    }
    (output / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


def save(work: Path, backing: Path, output: Path) -> None:
    """Copy the key store made under ``work`` and the backing folder into ``output``."""
    store = output / "kms" / REGION
    store.mkdir(parents=True)
    for name in ("keys.db", "root.key"):
        shutil.copy2(work / "kms" / REGION / name, store / name)
    shutil.copytree(backing, output / "backing", symlinks=True)


def generate(doc: str, default: Path, make_one: Callable[[Path, Path], None]) -> None:
    """The command line of a golden volume's generator: ``--output``, ``--force``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=default)
    parser.add_argument("--force", action="store_true", help="replace an existing volume")
    args = parser.parse_args()
    if args.output.exists():
        if not args.force:
            raise SystemExit(f"{args.output} exists: golden volumes are never regenerated")
        shutil.rmtree(args.output)
    with tempfile.TemporaryDirectory(prefix="envfs-golden-") as work:
        make_one(Path(work), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    generate(__doc__, HERE / "volume-v1", make)
