"""Generate tests/golden/names-v2.json; the tests only ever read it.

Vectors for the encrypted names of format version 2 (``docs/format.md``, *Version 2:
encrypted names*): name keys from a volume secret, names encrypted in two directories
(short, the longest short, the shortest long, the longest, every byte but ``/`` and NUL), a
directory id file, a sealed symlink target, and ``user.`` xattr names and sealed values.
Names are deterministic; nonces are random, so sealed targets and values are only ever
decrypted. Made for the release of version 2 (the last ``--force`` added the xattrs and
left every name as it was); never again.

    .venv/bin/python -m tests.golden.make_names_vectors [--output PATH] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from envfs import crypto
from envfs.files import names
from tests.golden.make_format_vectors import label_bytes

HERE = Path(__file__).resolve().parent
VOLUME_ID = "6f1c2a1e-4b0d-4c55-9a3e-2d7f1b8c9e01"
SECRET = label_bytes("names-v2 volume secret", 32)
DIRS = {"root": label_bytes("names-v2 root dir id", 16), "sub": label_bytes("names-v2 sub", 16)}
NAMES = {
    "short": b"notes.txt",
    "dot": b".bashrc",
    "one byte": b"a",
    "exactly 32": b"x" * 32,
    "longest short (159)": b"s" * 159,
    "shortest long (160)": b"l" * 160,
    "longest (255)": bytes(range(1, 256)).replace(b"/", b"-"),
    "utf-8": "Grüße, 世界".encode(),
}


def build() -> dict[str, Any]:
    keys = names.NameKeys.derive(SECRET, VOLUME_ID)
    siv = crypto.Siv(keys.name_key)
    entries = []
    for label, name in NAMES.items():
        for dir_label, dir_id in DIRS.items():
            encoded = names.encrypt_name(siv, dir_id, name)
            entries.append(
                {
                    "label": f"{label} in {dir_label}",
                    "dir_id": dir_id.hex(),
                    "name": name.hex(),
                    "encoded": encoded.decode(),
                    "backing": names.backing_name(encoded).decode(),
                }
            )
    target = b"../some/where/else"
    return {
        "about": "envfs format v2 encrypted names; see docs/format.md, Version 2: encrypted names",
        "volume_id": VOLUME_ID,
        "volume_secret": SECRET.hex(),
        "keys": {
            "name_key": keys.name_key.hex(),
            "dir_mac_key": keys.dir_mac_key.hex(),
            "meta_key": keys.meta_key.hex(),
        },
        "names": entries,
        "dir_file": {
            "dir_id": DIRS["sub"].hex(),
            "content": names.encode_dir_file(keys, DIRS["sub"], VOLUME_ID).hex(),
        },
        "symlink": {
            "target": target.hex(),
            "encoded": names.encrypt_target(crypto.Aead(keys.meta_key), target).decode(),
        },
        "xattrs": [
            {
                "name": name.hex(),
                "backing_name": (stored := names.encrypt_xattr_name(siv, name)).decode(),
                "value": value.hex(),
                "sealed": names.encrypt_xattr_value(
                    crypto.Aead(keys.meta_key), stored, value
                ).hex(),
            }
            for name, value in (
                (b"user.colour", b"blue"),
                (b"user.empty", b""),
                (b"user." + b"x" * 159, bytes(range(256))),
            )
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "names-v2.json")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if args.output.exists() and not args.force:
        print(f"{args.output} exists; the tests read it as it is", file=sys.stderr)
        return 1
    args.output.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
