"""Generate tests/golden/format-v1-sparse.json once; the tests only ever read it.

Vectors for what version 1 gained after its first release: files with ``FLAG_SPARSE`` and
holes, and forged ends of files (an empty final block replaced, a file cut so that it looks
like whole blocks and an empty one), which a reader must refuse (docs/format.md). Like
``make_format_vectors.py`` it refuses to overwrite: block nonces are random.

    .venv/bin/python tests/golden/make_sparse_vectors.py [--output PATH] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from envfs.files import fileformat as fmt
from tests.golden.make_format_vectors import HERE, KEY_ARN, broken, label_bytes, pattern

SHIFT = 12
BLOCK = 1 << SHIFT
STRIDE = BLOCK + fmt.BLOCK_OVERHEAD
SPARSE = fmt.FLAG_SPARSE


def identities(name: str) -> tuple[bytes, bytes, bytes]:
    """Reproducible data key, file id and (opaque) wrapped key of vector ``name``."""
    return (
        label_bytes(f"{name} data key", 32),
        label_bytes(f"{name} file id", 16),
        b"\x01" + label_bytes(f"{name} wrapped key", 119),
    )


def vector(name: str, blocks: list[bytes | None], final: bytes, flags: int) -> dict[str, Any]:
    """A file of whole blocks (None: a hole, only with FLAG_SPARSE) and a short final block."""
    data_key, file_id, wrapped_key = identities(name)
    header = fmt.FileHeader(file_id, SHIFT, KEY_ARN, wrapped_key, flags=flags)
    keys = fmt.FileKeys.derive(data_key, file_id)
    parts, plaintext = [header.encode(keys)], b""
    for index, block in enumerate(blocks):
        if block is None:
            parts.append(bytes(STRIDE))
            plaintext += bytes(BLOCK)
        else:
            parts.append(fmt.encrypt_blocks(keys, file_id, index, block, SHIFT, final=False))
            plaintext += block
    parts.append(fmt.encrypt_blocks(keys, file_id, len(blocks), final, SHIFT, final=True))
    plaintext += final
    backing = b"".join(parts)
    assert fmt.decrypt_file(backing, keys) == plaintext
    return {
        "name": name,
        "block_shift": SHIFT,
        "flags": flags,
        "key_arn": KEY_ARN,
        "wrapped_key": wrapped_key.hex(),
        "file_id": file_id.hex(),
        "data_key": data_key.hex(),
        "plaintext": plaintext.hex(),
        "plaintext_size": len(plaintext),
        "backing_size": len(backing),
        "backing": backing.hex(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "format-v1-sparse.json")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args()
    if args.output.exists() and not args.force:
        print(f"make_sparse_vectors: error: {args.output} exists; golden vectors are made once")
        return 1
    h = fmt.HEADER_SIZE
    three = pattern(3 * BLOCK)
    vectors = [
        vector("sparse-hole-in-the-middle", [pattern(BLOCK), None], b"tail", SPARSE),
        vector("sparse-holes-then-empty-final", [None, None, pattern(BLOCK)], b"", SPARSE),
        vector(
            "three-whole-blocks", [three[i * BLOCK : (i + 1) * BLOCK] for i in range(3)], b"", 0
        ),
    ]
    by_name = {v["name"]: bytes.fromhex(v["backing"]) for v in vectors}
    holey = by_name["sparse-hole-in-the-middle"]
    whole = by_name["three-whole-blocks"]

    def patched(raw: bytes, offset: int, value: bytes) -> bytes:
        return raw[:offset] + value + raw[offset + len(value) :]

    hole_at = h + STRIDE
    cases = [
        broken(
            "hole-with-one-byte-set",
            patched(holey, hole_at + 100, b"\x01"),
            "sparse-hole-in-the-middle",
            "IntegrityError",
            r"^block 1 failed authentication$",
        ),
        broken(
            "final-block-zeroed",
            holey[: h + 2 * STRIDE] + bytes(len(holey) - h - 2 * STRIDE),
            "sparse-hole-in-the-middle",
            "IntegrityError",
            r"^block 2 failed authentication$",
        ),
        broken(
            "zeroed-block-without-the-flag",
            patched(whole, h + STRIDE, bytes(STRIDE)),
            "three-whole-blocks",
            "IntegrityError",
            r"^block 1 failed authentication$",
        ),
        broken(
            "flag-set-without-the-key",
            patched(whole, 12, b"\0\0\0\x02"),
            "three-whole-blocks",
            "IntegrityError",
            r"^header authentication failed$",
        ),
        broken(
            "empty-final-block-replaced",
            whole[: h + 3 * STRIDE] + label_bytes("forged final block", 28),
            "three-whole-blocks",
            "IntegrityError",
            r"^block 3 failed authentication$",
        ),
        broken(
            "empty-final-block-tag-flipped",
            patched(whole, len(whole) - 1, bytes([whole[-1] ^ 0x01])),
            "three-whole-blocks",
            "IntegrityError",
            r"^block 3 failed authentication$",
        ),
        broken(
            "cut-to-look-like-two-whole-blocks",
            whole[: h + 2 * STRIDE + 28],
            "three-whole-blocks",
            "IntegrityError",
            r"^block 2 failed authentication$",
        ),
        broken(
            "cut-to-the-empty-file-size",
            whole[: h + 28],
            "three-whole-blocks",
            "IntegrityError",
            r"^block 0 failed authentication$",
        ),
    ]
    document = {
        "description": (
            "envfs file format version 1: files with FLAG_SPARSE and forged file ends"
            " (docs/format.md). Made once by tests/golden/make_sparse_vectors.py; tests read"
            " them, never regenerate them. Every 'vectors' entry must decrypt to its"
            " plaintext; every 'broken' entry must be refused with its error when opened with"
            " the data key of 'data_key_of'."
        ),
        "format_version": fmt.FORMAT_VERSION,
        "vectors": vectors,
        "broken": cases,
    }
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
