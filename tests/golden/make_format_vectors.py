"""Generate tests/golden/format-v1.json once; the tests only ever read it.

Block nonces are random, so running this again gives different (equally valid) bytes: the
committed JSON is the reference that every later envfs must keep reading. Regenerating a
released version's vectors defeats their purpose, so the script refuses to overwrite.

    .venv/bin/python tests/golden/make_format_vectors.py [--output PATH] [--force]

Inputs are fixed (derived from labels with SHA-256), so the header bytes, derived keys and
MACs are reproducible; only the block nonces and ciphertexts are not.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any

from envfs.crypto import hkdf, sha256
from envfs.files import fileformat as fmt

KEY_ARN = "arn:envfs:kms:local-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
HERE = Path(__file__).resolve().parent


def label_bytes(label: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += sha256(f"envfs golden {label} {counter}".encode())
        counter += 1
    return out[:size]


def pattern(size: int) -> bytes:
    return bytes((i * 31 + 7) % 251 for i in range(size))


def make_vector(
    name: str,
    plaintext: bytes,
    block_shift: int,
    key_arn: str = KEY_ARN,
    wrapped_size: int = 120,
) -> dict[str, Any]:
    data_key = label_bytes(f"{name} data key", 32)
    file_id = label_bytes(f"{name} file id", 16)
    # Stands in for the key service's ciphertext blob: opaque to the format.
    wrapped_key = b"\x01" + label_bytes(f"{name} wrapped key", wrapped_size - 1)
    header = fmt.FileHeader(file_id, block_shift, key_arn, wrapped_key)
    keys = fmt.FileKeys.derive(data_key, file_id)
    backing = fmt.encrypt_file(header, keys, plaintext)
    assert fmt.decrypt_file(backing, keys) == plaintext
    return {
        "name": name,
        "block_shift": block_shift,
        "key_arn": key_arn,
        "wrapped_key": wrapped_key.hex(),
        "file_id": file_id.hex(),
        "data_key": data_key.hex(),
        "header_key": hkdf(data_key, fmt.HEADER_INFO, salt=file_id).hex(),
        "content_key": hkdf(data_key, fmt.CONTENT_INFO, salt=file_id).hex(),
        "plaintext": plaintext.hex(),
        "plaintext_size": len(plaintext),
        "backing_size": len(backing),
        "backing": backing.hex(),
    }


def broken(name: str, backing: bytes, key_of: str, error: str, match: str) -> dict[str, Any]:
    return {
        "name": name,
        "backing": backing.hex(),
        "data_key_of": key_of,
        "error": error,
        "match": match,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "format-v1.json")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args()
    if args.output.exists() and not args.force:
        print(f"make_format_vectors: error: {args.output} exists; golden vectors are made once")
        return 1

    max_arn = "arn:envfs:kms:local-1:111122223333:alias/" + "a" * 280
    vectors = [
        make_vector("empty", b"", 14),
        make_vector("one-byte", b"x", 14),
        make_vector("text", b"hello, envfs\n", 12),
        make_vector("one-whole-block", pattern(4096), 12),
        make_vector("two-blocks-and-a-bit", pattern(2 * 4096 + 5), 12),
        make_vector(
            "largest-fields",
            pattern(100),
            20,
            key_arn=max_arn,
            wrapped_size=fmt.MAX_VARIABLE_SIZE - len(max_arn),
        ),
    ]
    by_name = {v["name"]: bytes.fromhex(v["backing"]) for v in vectors}
    base = by_name["two-blocks-and-a-bit"]
    stride = 4096 + fmt.BLOCK_OVERHEAD
    h = fmt.HEADER_SIZE
    empty = by_name["empty"]

    def patched(raw: bytes, offset: int, value: bytes) -> bytes:
        return raw[:offset] + value + raw[offset + len(value) :]

    cases = [
        broken(
            "truncated-at-block-boundary",
            base[: h + 2 * stride],
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^impossible backing size 8760 for 4096-byte blocks \(truncated or corrupt\)$",
        ),
        broken(
            "truncated-mid-block",
            base[:-1],
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^block 2 failed authentication$",
        ),
        broken(
            "blocks-swapped",
            base[:h]
            + base[h + stride : h + 2 * stride]
            + base[h : h + stride]
            + base[h + 2 * stride :],
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^block 0 failed authentication$",
        ),
        broken(
            "flipped-ciphertext-byte",
            patched(base, h + stride + 100, bytes([base[h + stride + 100] ^ 0x01])),
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^block 1 failed authentication$",
        ),
        broken(
            "flipped-header-mac-byte",
            patched(empty, fmt.MAC_OFFSET, bytes([empty[fmt.MAC_OFFSET] ^ 0x80])),
            "empty",
            "IntegrityError",
            r"^header authentication failed$",
        ),
        broken(
            "header-of-another-file",
            by_name["one-whole-block"][:h] + base[h:],
            "one-whole-block",
            "IntegrityError",
            r"^block 0 failed authentication$",
        ),
        broken(
            "header-only",
            empty[:h],
            "empty",
            "IntegrityError",
            r"^impossible backing size 512 for 16384-byte blocks \(truncated or corrupt\)$",
        ),
        broken(
            "version-2",
            patched(empty, 8, struct.pack(">H", 2)),
            "empty",
            "UnsupportedFormatError",
            r"^unsupported format version 2 \(this envfs reads version 1\)$",
        ),
        broken(
            "unknown-flag",
            patched(empty, 12, struct.pack(">I", 1)),
            "empty",
            "UnsupportedFormatError",
            r"^unsupported header flags 0x00000001 \(version 1 defines 0x00000002\)$",
        ),
        broken(
            "bad-magic",
            patched(empty, 0, b"gocrypt"),
            "empty",
            "NotEnvfsFileError",
            r"^not an envfs file \(bad magic\)$",
        ),
    ]
    document = {
        "description": (
            "envfs file format version 1 golden vectors (docs/format.md). Made once by"
            " tests/golden/make_format_vectors.py; tests read them, never regenerate them."
            " Every 'vectors' entry must decrypt to its plaintext; every 'broken' entry must be"
            " refused with its error when opened with the data key of 'data_key_of'."
        ),
        "format_version": fmt.FORMAT_VERSION,
        "header_size": fmt.HEADER_SIZE,
        "vectors": vectors,
        "broken": cases,
    }
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
