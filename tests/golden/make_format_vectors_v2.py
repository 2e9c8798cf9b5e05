"""Generate tests/golden/format-v2.json once; the tests only ever read it.

Vectors of file format version 2 (docs/format.md, *Version 2*): valid files, headers
rewrapped without any key, broken files with the error each must raise, and headers that
the format alone accepts but the key service refuses to unwrap. Like
``make_format_vectors.py`` it refuses to overwrite: block nonces are random, so running it
again gives other (equally valid) bytes, and the committed JSON is the reference.

    .venv/bin/python -m tests.golden.make_format_vectors_v2 [--output PATH] [--force]
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

from envfs.crypto import hkdf
from envfs.errors import IntegrityError
from envfs.files import fileformat as fmt
from tests.golden.make_format_vectors import HERE, KEY_ARN, broken, label_bytes, pattern

VERSION = 2
OTHER_KEY_ARN = "arn:envfs:kms:local-1:111122223333:key/5678efab-56ef-78ab-90cd-5678901234ef"


def identities(name: str, wrapped_size: int = 120) -> tuple[bytes, bytes, bytes]:
    """Reproducible data key, file id and (opaque) wrapped key of vector ``name``."""
    return (
        label_bytes(f"v2 {name} data key", 32),
        label_bytes(f"v2 {name} file id", 16),
        b"\x01" + label_bytes(f"v2 {name} wrapped key", wrapped_size - 1),
    )


def make_vector(
    name: str,
    blocks: list[bytes | None],
    final: bytes,
    block_shift: int,
    *,
    flags: int = 0,
    key_arn: str = KEY_ARN,
    wrapped_size: int = 120,
) -> dict[str, Any]:
    """A file of whole blocks (None: a hole, with FLAG_SPARSE only) and a short final block."""
    data_key, file_id, wrapped_key = identities(name, wrapped_size)
    header = fmt.FileHeader(file_id, block_shift, key_arn, wrapped_key, flags, version=VERSION)
    keys = fmt.FileKeys.derive(data_key, file_id, VERSION)
    stride = fmt.block_stride(block_shift)
    parts, plaintext = [header.encode(keys)], b""
    for index, block in enumerate(blocks):
        if block is None:
            parts.append(bytes(stride))
            plaintext += bytes(1 << block_shift)
        else:
            parts.append(fmt.encrypt_blocks(keys, file_id, index, block, block_shift, final=False))
            plaintext += block
    parts.append(fmt.encrypt_blocks(keys, file_id, len(blocks), final, block_shift, final=True))
    plaintext += final
    backing = b"".join(parts)
    assert fmt.decrypt_file(backing, keys) == plaintext
    return {
        "name": name,
        "version": VERSION,
        "block_shift": block_shift,
        "flags": flags,
        "key_arn": key_arn,
        "wrapped_key": wrapped_key.hex(),
        "file_id": file_id.hex(),
        "data_key": data_key.hex(),
        "header_key": hkdf(data_key, b"envfs v2 header", salt=file_id).hex(),
        "content_key": hkdf(data_key, b"envfs v2 content", salt=file_id).hex(),
        "header_mac": backing[fmt.MAC_OFFSET : fmt.HEADER_SIZE].hex(),
        "plaintext": plaintext.hex(),
        "plaintext_size": len(plaintext),
        "backing_size": len(backing),
        "backing": backing.hex(),
    }


def split(plaintext: bytes, block_shift: int) -> tuple[list[bytes | None], bytes]:
    """``plaintext`` as whole blocks and the final (short, maybe empty) block."""
    size = 1 << block_shift
    whole = len(plaintext) >> block_shift
    return [plaintext[i * size : (i + 1) * size] for i in range(whole)], plaintext[whole * size :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "format-v2.json")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args()
    if args.output.exists() and not args.force:
        print(f"make_format_vectors_v2: error: {args.output} exists; golden vectors are made once")
        return 1

    max_arn = "arn:envfs:kms:local-1:111122223333:alias/" + "a" * 280
    vectors = [
        make_vector("empty", *split(b"", 14), 14),
        make_vector("one-byte", *split(b"x", 14), 14),
        make_vector("text", *split(b"hello, envfs version 2\n", 12), 12),
        make_vector("one-whole-block", *split(pattern(4096), 12), 12),
        make_vector("two-blocks-and-a-bit", *split(pattern(2 * 4096 + 5), 12), 12),
        make_vector(
            "sparse-hole-in-the-middle",
            [pattern(4096), None],
            b"tail",
            12,
            flags=fmt.FLAG_SPARSE,
        ),
        make_vector(
            "largest-fields-1-mib-blocks",
            *split(pattern(100), 20),
            20,
            key_arn=max_arn,
            wrapped_size=fmt.MAX_VARIABLE_SIZE - len(max_arn),
        ),
    ]
    by_name = {v["name"]: v for v in vectors}

    def backing_of(name: str) -> bytes:
        return bytes.fromhex(by_name[name]["backing"])

    def keys_of(name: str, version: int = VERSION) -> fmt.FileKeys:
        vector = by_name[name]
        data_key, file_id = bytes.fromhex(vector["data_key"]), bytes.fromhex(vector["file_id"])
        return fmt.FileKeys.derive(data_key, file_id, version)

    def patched(raw: bytes, offset: int, value: bytes) -> bytes:
        return raw[:offset] + value + raw[offset + len(value) :]

    h = fmt.HEADER_SIZE
    stride = 4096 + fmt.BLOCK_OVERHEAD
    empty = backing_of("empty")
    text = backing_of("text")
    base = backing_of("two-blocks-and-a-bit")
    base_header = fmt.FileHeader.parse(base)
    base_plain = bytes.fromhex(by_name["two-blocks-and-a-bit"]["plaintext"])
    arn_at = 35 + len(KEY_ARN)  # the wrapped key's length field, with KEY_ARN

    # Rewrapped: new key ARN and wrapped key, the MAC and the blocks as they were.
    rewrapped = []
    for of, arn, wrapped in [
        ("text", OTHER_KEY_ARN, b"\x01" + label_bytes("v2 text rewrapped key", 149)),
        ("largest-fields-1-mib-blocks", KEY_ARN, b"\x01" + label_bytes("v2 small key", 99)),
    ]:
        old = backing_of(of)
        new = fmt.rewrap_header(old, arn, wrapped) + old[h:]
        assert new[fmt.MAC_OFFSET : h] == old[fmt.MAC_OFFSET : h]
        assert fmt.decrypt_file(new, keys_of(of)) == bytes.fromhex(by_name[of]["plaintext"])
        rewrapped.append(
            {
                "name": f"{of}-rewrapped",
                "of": of,
                "key_arn": arn,
                "wrapped_key": wrapped.hex(),
                "backing": new.hex(),
                "note": (
                    f"{of!r} with its key ARN and wrapped key replaced by rewrap_header, without"
                    " any key: the header MAC and the blocks are unchanged, and the file reads"
                    f" as {of!r} with {of!r}'s data key"
                ),
            }
        )

    # Headers made under the wrong version's keys, and blocks under the wrong version's.
    v1_keys = keys_of("two-blocks-and-a-bit", 1)
    v2_keys = keys_of("two-blocks-and-a-bit")
    # Keys of one version used as the other's (FileKeys' version picks the AAD's).
    v1_labels = fmt.FileKeys(v1_keys.header_key, v1_keys.content, VERSION)
    v1_aad = fmt.FileKeys(v2_keys.header_key, v2_keys.content, 1)
    v1_header = fmt.FileHeader(
        base_header.file_id, 12, base_header.key_arn, base_header.wrapped_key, version=1
    )

    def blocks(keys: fmt.FileKeys) -> bytes:
        return fmt.encrypt_blocks(keys, base_header.file_id, 0, base_plain, 12, final=True)

    def note(text_: str) -> dict[str, str]:
        return {"note": text_}

    cases = [
        broken(
            "mac-byte-flipped",
            patched(text, fmt.MAC_OFFSET + 7, bytes([text[fmt.MAC_OFFSET + 7] ^ 0x01])),
            "text",
            "IntegrityError",
            r"^header authentication failed$",
        )
        | note("one bit of the header MAC flipped"),
        broken(
            "sparse-flag-set",
            patched(base, 12, struct.pack(">I", fmt.FLAG_SPARSE)),
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^header authentication failed$",
        )
        | note("the flags are under the MAC: setting FLAG_SPARSE without the key is caught"),
        broken(
            "file-id-edited",
            patched(base, 16, bytes([base[16] ^ 0x80])),
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^header authentication failed$",
        )
        | note("one bit of the file id flipped (the reader derives keys from the edited id)"),
        broken(
            "block-shift-edited",
            patched(base, 32, b"\x0d"),
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^header authentication failed$",
        )
        | note("block shift 12 changed to 13: the header MAC is checked before the size"),
        broken(
            "mac-of-another-file",
            text[: fmt.MAC_OFFSET] + backing_of("one-byte")[fmt.MAC_OFFSET : h] + text[h:],
            "text",
            "IntegrityError",
            r"^header authentication failed$",
        )
        | note("the MAC of another file's header"),
        broken(
            "nonzero-padding",
            patched(text, fmt.MAC_OFFSET - 1, b"\x01"),
            "text",
            "IntegrityError",
            r"^malformed header: nonzero padding$",
        )
        | note("the MAC does not cover the padding, the parser refuses it before anything else"),
        broken(
            "wrapped-key-length-too-long",
            patched(base, arn_at, struct.pack(">H", fmt.MAX_VARIABLE_SIZE - len(KEY_ARN) + 1)),
            "two-blocks-and-a-bit",
            "IntegrityError",
            rf"^malformed header: wrapped key length {fmt.MAX_VARIABLE_SIZE - len(KEY_ARN) + 1}"
            r" does not fit$",
        )
        | note("the length fields are not under the MAC either: the parser checks them"),
        broken(
            "v1-labels-in-a-v2-header",
            base_header.encode(v1_labels) + base[h:],
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^header authentication failed$",
        )
        | note("a version 2 header (MAC over bytes 0..32) MAC'd under the 'envfs v1 header' key"),
        broken(
            "v1-file-relabelled-as-v2",
            patched(v1_header.encode(v1_keys) + blocks(v1_keys), 8, struct.pack(">H", 2)),
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^header authentication failed$",
        )
        | note("a whole valid version 1 file with its version field set to 2"),
        broken(
            "v2-header-over-v1-blocks",
            base[:h] + blocks(v1_keys),
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^block 0 failed authentication$",
        )
        | note("a valid version 2 header over the same plaintext sealed as version 1 blocks"),
        broken(
            "v1-content-key-with-v2-aad",
            base[:h] + blocks(v1_labels),
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^block 0 failed authentication$",
        )
        | note("blocks under the 'envfs v1 content' key but with version 2 in their AAD"),
        broken(
            "v2-content-key-with-v1-aad",
            base[:h] + blocks(v1_aad),
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^block 0 failed authentication$",
        )
        | note("blocks under the version 2 content key but with version 1 in their AAD"),
        broken(
            "v1-header-over-v2-blocks",
            v1_header.encode(v1_keys) + base[h:],
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^block 0 failed authentication$",
        )
        | note(
            "a valid version 1 header (same data key and file id) over version 2 blocks; in a"
            " version 2 volume it is refused before that, by the volume's format version"
        ),
        broken(
            "header-of-another-file",
            backing_of("one-whole-block")[:h] + base[h:],
            "one-whole-block",
            "IntegrityError",
            r"^block 0 failed authentication$",
        )
        | note("a whole valid header of another file of the volume over this file's blocks"),
        broken(
            "truncated-at-block-boundary",
            base[: h + 2 * stride],
            "two-blocks-and-a-bit",
            "IntegrityError",
            r"^impossible backing size 8760 for 4096-byte blocks \(truncated or corrupt\)$",
        )
        | note("cut after two whole blocks"),
        broken(
            "empty-final-block-replaced",
            empty[:h] + label_bytes("v2 forged final block", 28),
            "empty",
            "IntegrityError",
            r"^block 0 failed authentication$",
        )
        | note("the empty file's only (final) block replaced by 28 other bytes"),
        broken(
            "version-3",
            patched(empty, 8, struct.pack(">H", 3)),
            "empty",
            "UnsupportedFormatError",
            r"^unsupported format version 3 \(this envfs reads versions 1 and 2\)$",
        )
        | note("an unknown version: refused before anything else is read"),
        broken(
            "unknown-flag",
            patched(empty, 12, struct.pack(">I", 1)),
            "empty",
            "UnsupportedFormatError",
            r"^unsupported header flags 0x00000001 \(version 2 defines 0x00000002\)$",
        )
        | note("flag bit 0 is reserved"),
        broken(
            "block-shift-21",
            patched(empty, 32, b"\x15"),
            "empty",
            "UnsupportedFormatError",
            r"^unsupported block size 2\*\*21 \(version 2 allows 2\*\*12 to 2\*\*20\)$",
        )
        | note("a block size out of range"),
    ]

    # What the format alone accepts and the key service refuses (docs/format.md, Version 2).
    one_byte = fmt.FileHeader.parse(backing_of("one-byte"))
    swapped = fmt.rewrap_header(text, one_byte.key_arn, one_byte.wrapped_key) + text[h:]
    arn_edited = fmt.rewrap_header(base, OTHER_KEY_ARN, base_header.wrapped_key) + base[h:]
    unwrap_refuses = [
        {
            "name": "wrapped-key-of-another-file",
            "backing": swapped.hex(),
            "data_key_of": "text",
            "plaintext_of": "text",
            "refused_by": "unwrap",
            "note": (
                "'text' with the key ARN and wrapped key of 'one-byte'. The format alone accepts"
                " it: with 'text''s data key it reads as 'text'. A reader never has that key"
                " here: it asks the key service to unwrap the header's wrapped key, whose"
                " encryption context names 'one-byte''s file id, not this header's: the key"
                " service refuses (in a real volume; these wrapped keys are stand-ins)"
            ),
        },
        {
            "name": "key-arn-edited",
            "backing": arn_edited.hex(),
            "data_key_of": "two-blocks-and-a-bit",
            "plaintext_of": "two-blocks-and-a-bit",
            "refused_by": "unwrap",
            "note": (
                "'two-blocks-and-a-bit' with its key ARN changed and its wrapped key kept. The"
                " format alone accepts it; a reader refuses the ARN if the volume file does not"
                " accept it (no key-service call), and else the key service refuses to unwrap"
                " (the wrapped key is not under the key the ARN names)"
            ),
        },
    ]
    for case in unwrap_refuses:
        backing = bytes.fromhex(str(case["backing"]))
        keys = keys_of(str(case["data_key_of"]))
        assert fmt.decrypt_file(backing, keys) == bytes.fromhex(
            by_name[str(case["plaintext_of"])]["plaintext"]
        )

    for case in cases:  # each fails as it says
        backing = bytes.fromhex(case["backing"])
        try:
            header = fmt.FileHeader.parse(backing)
            data_key = bytes.fromhex(by_name[case["data_key_of"]]["data_key"])
            fmt.decrypt_file(backing, fmt.FileKeys.derive(data_key, header.file_id, header.version))
        except IntegrityError as exc:
            assert type(exc).__name__ == case["error"], (case["name"], exc)
            assert re.search(case["match"], exc.message), (case["name"], exc)
        else:
            raise AssertionError(f"{case['name']} was not refused")

    document = {
        "description": (
            "envfs file format version 2 golden vectors (docs/format.md, Version 2). Made once"
            " by tests/golden/make_format_vectors_v2.py; tests read them, never regenerate"
            " them. Every 'vectors' entry must decrypt to its plaintext; every 'rewrapped'"
            " entry to the plaintext of 'of' with the data key of 'of'; every 'broken' entry"
            " must be refused with its error when opened with the data key of 'data_key_of';"
            " every 'unwrap_refuses' entry is accepted by the format alone (it reads as"
            " 'plaintext_of' with the data key of 'data_key_of') and refused by the key"
            " service when the wrapped key is unwrapped. Wrapped keys are opaque stand-ins."
        ),
        "format_version": VERSION,
        "header_size": fmt.HEADER_SIZE,
        "mac_covers": [0, fmt.V2_MAC_COVERS],
        "vectors": vectors,
        "rewrapped": rewrapped,
        "broken": cases,
        "unwrap_refuses": unwrap_refuses,
    }
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
