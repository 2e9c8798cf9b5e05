"""Generate tests/golden/broken-v1/ once: a volume whose backing folder was attacked.

Like ``volume-v1/`` (a key store and a backing folder, made through the real CLI and a real
mount, as root with FUSE), but most files were then broken the way someone who may write
the backing folder breaks them: cut, extended, tampered, swapped, a file of another volume
copied in, a file planted under another key the planter may use. ``expected.json`` says
what each file must give when read through a mount: its plaintext, or the errno, where it
fails (``open`` or ``read``) and a fragment of the WARNING naming it. Mount tests and later
tools (fsck) read it; regenerating it would defeat that, so the script refuses without
``--force``.

    .venv/bin/python tests/golden/make_broken_volume.py [--output DIR] [--force]
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from envfs.files import fileformat
from tests.golden.make_golden_volume import REGION, generate, run, save, store_env, stream

HERE = Path(__file__).resolve().parent
BLOCK = 16384
STRIDE = BLOCK + 28
HEADER = fileformat.HEADER_SIZE
HALF = 3 * BLOCK + BLOCK // 2


def at(i: int) -> int:
    return HEADER + i * STRIDE


def flip(raw: bytes, offset: int) -> bytes:
    return raw[:offset] + bytes([raw[offset] ^ 0x01]) + raw[offset + 1 :]


# name -> (plaintext written through the mount, how the backing file is broken, expected).
# Expected: (errno name, "open" or "read", a fragment of the WARNING line). A forged end of
# a file that is not empty fails at the first read (docs/format.md), before any byte.
Breakage = Callable[[bytes, dict[str, bytes]], bytes]
BROKEN: dict[str, tuple[bytes, Breakage, tuple[str, str, str]]] = {
    "truncated-at-boundary.bin": (
        stream("cut at a boundary", HALF),
        lambda raw, o: raw[: at(2)],
        ("EIO", "open", "impossible backing size"),
    ),
    "truncated-inside-a-block.bin": (
        stream("cut inside", HALF),
        lambda raw, o: raw[:-5],
        ("EIO", "read", "block 3 failed authentication"),
    ),
    "cut-to-look-whole.bin": (
        stream("cut to look whole", HALF),
        lambda raw, o: raw[: at(2) + 28],
        ("EIO", "read", "block 2 failed authentication"),
    ),
    "empty-final-block-replaced.bin": (
        stream("three whole blocks", 3 * BLOCK),
        lambda raw, o: raw[:-28] + stream("forged final block", 28),
        ("EIO", "read", "block 3 failed authentication"),
    ),
    "appended.bin": (
        b"a short file\n",
        lambda raw, o: raw + b"appended",
        ("EIO", "read", "block 0 failed authentication"),
    ),
    "tampered-header.bin": (
        b"a short file\n",
        lambda raw, o: flip(raw, fileformat.MAC_OFFSET + 3),
        ("EIO", "open", "header authentication failed"),
    ),
    "tampered-block.bin": (
        stream("tampered block", HALF),
        lambda raw, o: flip(raw, at(1) + 100),
        ("EIO", "read", "block 1 failed authentication"),
    ),
    "swapped-blocks.bin": (
        stream("swapped blocks", HALF),
        lambda raw, o: raw[:HEADER] + raw[at(1) : at(2)] + raw[at(0) : at(1)] + raw[at(2) :],
        ("EIO", "read", "block 0 failed authentication"),
    ),
    "zeroed-block.bin": (
        stream("zeroed block", HALF),
        lambda raw, o: raw[: at(1)] + bytes(STRIDE) + raw[at(2) :],
        ("EIO", "read", "block 1 failed authentication"),
    ),
    "foreign-volume.bin": (
        b"",  # replaced whole by a file of another volume under the same key
        lambda raw, o: o["foreign-volume"],
        ("EIO", "open", "its data key does not unwrap"),
    ),
    "foreign-key.bin": (
        b"",  # replaced whole by a file planted under another key
        lambda raw, o: o["foreign-key"],
        ("EIO", "open", "which the volume does not accept"),
    ),
    "not-envfs.txt": (
        b"",
        lambda raw, o: b"PLAINTEXT dropped into the backing folder\n",
        ("EIO", "open", "not an envfs file"),
    ),
    "sub/tampered-nested.bin": (
        b"nested and tampered\n",
        lambda raw, o: flip(raw, at(0) + 20),
        ("EIO", "read", "block 0 failed authentication"),
    ),
}
GOOD: dict[str, bytes] = {
    "good.txt": b"this file is fine\n",
    "good-empty": b"",
    "sub/good-nested.bin": stream("good nested", HALF),
}


def plant(env: dict[str, str], volume_id: str, block_shift: int) -> bytes:
    """A file with the volume's encryption context under the planter's key."""
    file_id = os.urandom(16)
    out = json.loads(
        run(
            env,
            "kms",
            "generate-data-key",
            "--key-id",
            "alias/planter",
            "--key-spec",
            "AES_256",
            "--encryption-context",
            f"envfs:volume={volume_id},envfs:file={file_id.hex()}",
        )
    )
    wrapped = base64.b64decode(out["CiphertextBlob"])
    header = fileformat.FileHeader(file_id, block_shift, out["KeyId"], wrapped)
    keys = fileformat.FileKeys.derive(base64.b64decode(out["Plaintext"]), file_id)
    return fileformat.encrypt_file(header, keys, b"planted: the planter keeps its data key\n")


def make(work: Path, output: Path) -> None:
    env = store_env(work)
    arns = {}
    for alias in ("broken", "planter"):
        meta = json.loads(run(env, "kms", "create-key", "--description", f"golden {alias}"))
        arns[alias] = meta["KeyMetadata"]["Arn"]
        run(env, "kms", "create-alias", "--alias-name", f"alias/{alias}", "--target-key-id",
            arns[alias])  # fmt: skip
    files = {**GOOD, **{name: plain for name, (plain, _, _) in BROKEN.items()}}
    volumes = {}
    for name in ("backing", "other"):
        backing, mnt = work / name, work / f"{name}-mnt"
        mnt.mkdir()
        run(env, "init", str(backing), "--key-id", "alias/broken")
        run(env, "mount", str(backing), str(mnt))
        try:
            for rel, data in files.items() if name == "backing" else [("f", b"other\n")]:
                (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
                (mnt / rel).write_bytes(data)
        finally:
            run(env, "umount", str(mnt))
        volumes[name] = json.loads((backing / ".envfs-volume.json").read_text())
    backing = work / "backing"
    others = {
        "foreign-volume": (work / "other" / "f").read_bytes(),
        "foreign-key": plant(env, volumes["backing"]["volume_id"], 14),
    }
    for rel, (_, breakage, _) in BROKEN.items():
        path = backing / rel
        path.write_bytes(breakage(path.read_bytes(), others))

    output.mkdir(parents=True)
    save(work, backing, output)
    expected = {
        "comment": "made by tests/golden/make_broken_volume.py; never regenerate",
        "region": REGION,
        "key_arn": arns["broken"],
        "planter_key_arn": arns["planter"],
        "volume_id": volumes["backing"]["volume_id"],
        "good": {
            rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for rel, data in sorted(GOOD.items())
        },
        "broken": {
            rel: {"errno": err, "fails_at": where, "warning": warning}
            for rel, (_, _, (err, where, warning)) in sorted(BROKEN.items())
        },
    }
    (output / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    generate(__doc__, HERE / "broken-v1", make)
