"""File format version 2 (docs/format.md, *Version 2*): the header MAC over the fixed fields
only, keys and blocks by version, rewrap without any key, and the golden vectors."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from envfs.crypto import Aead, hkdf, hmac_sha256
from envfs.errors import EnvfsError, IntegrityError
from envfs.files import fileformat as fmt
from envfs.files.fileformat import (
    HEADER_SIZE,
    MAC_OFFSET,
    FileHeader,
    FileKeys,
    HeaderOverflowError,
    NotEnvfsFileError,
    NotRewrappableError,
    UnsupportedFormatError,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
ARN = "arn:envfs:kms:local-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_ARN = "arn:envfs:kms:local-1:111122223333:key/5678efab-56ef-78ab-90cd-5678901234ef"
WRAPPED = bytes(range(100))
FILE_ID = bytes(range(16))
DATA_KEY = bytes(range(32, 64))


def v2_header(**fields: Any) -> FileHeader:
    values: dict[str, Any] = {"file_id": FILE_ID, "block_shift": 14, "key_arn": ARN}
    return FileHeader(**(values | {"wrapped_key": WRAPPED, "version": 2} | fields))


def v2_keys(data_key: bytes = DATA_KEY, file_id: bytes = FILE_ID) -> FileKeys:
    return FileKeys.derive(data_key, file_id, 2)


def make_file(plaintext: bytes, version: int = 2, **fields: Any) -> tuple[bytes, bytes]:
    """A whole backing file of ``version``; returns (backing, data key)."""
    data_key = os.urandom(32)
    header = FileHeader.new(ARN, WRAPPED, 12, version=version)
    header = dataclasses.replace(header, **fields)
    keys = FileKeys.derive(data_key, header.file_id, version)
    return fmt.encrypt_file(header, keys, plaintext), data_key


def open_file(backing: bytes, data_key: bytes) -> bytes:
    """As the filesystem reads: parse, keys of the header's version, verify, decrypt."""
    header = FileHeader.parse(backing)
    return fmt.decrypt_file(backing, FileKeys.derive(data_key, header.file_id, header.version))


def flipped(raw: bytes, offset: int, mask: int = 0x01) -> bytes:
    return raw[:offset] + bytes([raw[offset] ^ mask]) + raw[offset + 1 :]


# --- the header ------------------------------------------------------------------------------


def test_v2_header_layout_is_version_1_s_with_a_mac_over_the_fixed_fields() -> None:
    header = v2_header()
    keys = v2_keys()
    raw = header.encode(keys)
    assert len(raw) == HEADER_SIZE
    assert raw[:8] == b"\x89envfs\r\n"
    assert raw[8:16] == b"\x00\x02\x00\x01\x00\x00\x00\x00"
    assert raw[16:32] == FILE_ID
    assert raw[32] == 14
    assert raw[33:35] == len(ARN).to_bytes(2, "big")
    assert raw[35 : 35 + len(ARN)] == ARN.encode()
    at = 35 + len(ARN)
    assert raw[at : at + 2] == b"\x00\x64"
    assert raw[at + 2 : at + 102] == WRAPPED
    assert raw[at + 102 : MAC_OFFSET] == bytes(MAC_OFFSET - at - 102)
    header_key = hkdf(DATA_KEY, b"envfs v2 header", salt=FILE_ID)
    assert raw[MAC_OFFSET:] == hmac_sha256(header_key, raw[:33])
    assert fmt.V2_MAC_COVERS == 33
    # Version 1's body is the same but for the version field; its MAC covers 0..479.
    v1 = dataclasses.replace(header, version=1).encode(FileKeys.derive(DATA_KEY, FILE_ID))
    assert v1[:8] + v1[10:MAC_OFFSET] == raw[:8] + raw[10:MAC_OFFSET]
    v1_key = hkdf(DATA_KEY, b"envfs v1 header", salt=FILE_ID)
    assert v1[MAC_OFFSET:] == hmac_sha256(v1_key, v1[:MAC_OFFSET])


def test_v2_header_parses_verifies_and_round_trips() -> None:
    header = v2_header(flags=fmt.FLAG_SPARSE, block_shift=20)
    raw = header.encode(v2_keys())
    parsed = FileHeader.parse(raw + b"blocks are ignored")
    assert parsed == header
    assert (parsed.version, parsed.sparse, parsed.block_size) == (2, True, 1 << 20)
    parsed.verify(raw, v2_keys())
    assert FileHeader.parse_verified(raw, v2_keys()) == header


def test_the_default_version_is_1_and_version_1_is_unchanged() -> None:
    header = FileHeader(FILE_ID, 14, ARN, WRAPPED)
    keys = FileKeys.derive(DATA_KEY, FILE_ID)
    assert (header.version, keys.version, fmt.FORMAT_VERSION) == (1, 1, 1)
    assert FileHeader.new(ARN, WRAPPED).version == 1
    assert FileHeader.new(ARN, WRAPPED, version=2).version == 2
    assert keys.header_key == hkdf(DATA_KEY, b"envfs v1 header", salt=FILE_ID)
    assert keys.header_key == FileKeys.derive(DATA_KEY, FILE_ID, 1).header_key


def outcome(raw: bytes) -> str:
    """What reading a changed v2 header of ``v2_header()`` gives, with the right data key."""
    try:
        header = FileHeader.parse(raw)
    except IntegrityError:  # bad magic, unknown field, malformed variable part
        return "refused by the parser"
    try:
        header.verify(raw, FileKeys.derive(DATA_KEY, header.file_id, 2))
    except IntegrityError:
        return "refused by the mac"
    if (header.key_arn, header.wrapped_key) != (ARN, WRAPPED):
        return "another key arn or wrapped key"
    return "unchanged" if header == v2_header() else "?"


@pytest.mark.parametrize("bit", [0x01, 0x10, 0x80])
def test_which_header_bytes_the_v2_mac_covers(bit: int) -> None:
    """The MAC covers the fixed fields (bytes 0..32) and is itself checked; an edit of bytes
    33..479 is refused by the parser (padding, length fields) or reads as another key ARN or
    wrapped key, which the key service then checks: the encoding is canonical, so no edit
    there goes unnoticed and none changes anything else."""
    raw = v2_header().encode(v2_keys())
    assert outcome(raw) == "unchanged"
    at = 35 + len(ARN)
    seen = {}
    for offset in range(HEADER_SIZE):
        got = seen[offset] = outcome(flipped(raw, offset, bit))
        if 16 <= offset < 32 or offset >= MAC_OFFSET:  # file id, MAC
            assert got == "refused by the mac", offset
        elif offset < 33:  # magic, version, suite, flags, block shift: refused or MAC'd
            assert got in ("refused by the parser", "refused by the mac"), offset
        elif offset in (33, 34):  # the key ARN's length: the wrapped key's field moves
            assert got == "refused by the parser", offset
        elif offset < at:  # the key ARN (refused if no longer UTF-8)
            assert got in ("refused by the parser", "another key arn or wrapped key"), offset
        elif at + 2 <= offset < at + 2 + len(WRAPPED):
            assert got == "another key arn or wrapped key", offset
        elif offset >= at + 2 + len(WRAPPED):  # the padding
            assert got == "refused by the parser", offset
        else:  # the wrapped key's length: longer takes in padding (zeros), shorter gives it
            assert got in ("refused by the parser", "another key arn or wrapped key"), offset
    if bit == 0x01:  # block shift 14 -> 15 parses, and is MAC'd
        assert seen[32] == "refused by the mac"
    assert outcome(flipped(raw, 15, fmt.FLAG_SPARSE)) == "refused by the mac"


def test_verify_still_requires_exactly_this_header() -> None:
    raw = v2_header().encode(v2_keys())
    other = v2_header(wrapped_key=b"\x02" * 100)
    with pytest.raises(IntegrityError, match=r"^header authentication failed$"):
        other.verify(raw, v2_keys())
    with pytest.raises(IntegrityError, match=r"^header authentication failed$"):
        v2_header().verify(raw[:511], v2_keys())
    with pytest.raises(IntegrityError, match=r"^header authentication failed$"):
        v2_header().verify(raw, v2_keys(os.urandom(32)))


def test_keys_of_one_version_with_a_header_of_the_other_are_an_error() -> None:
    v1_keys = FileKeys.derive(DATA_KEY, FILE_ID, 1)
    v1_header = v2_header(version=1)
    message = r"^keys of format version {} used with a version {} header$"
    with pytest.raises(ValueError, match=message.format(1, 2)):
        v2_header().encode(v1_keys)
    with pytest.raises(ValueError, match=message.format(2, 1)):
        v1_header.encode(v2_keys())
    with pytest.raises(ValueError, match=message.format(1, 2)):
        v2_header().verify(v2_header().encode(v2_keys()), v1_keys)
    with pytest.raises(ValueError, match=message.format(2, 1)):
        v1_header.verify(v1_header.encode(v1_keys), v2_keys())
    with pytest.raises(ValueError, match=message.format(2, 1)):
        fmt.encrypt_file(v1_header, v2_keys(), b"x")
    with pytest.raises(ValueError, match=message.format(1, 2)):
        fmt.decrypt_file(fmt.encrypt_file(v2_header(), v2_keys(), b"x"), v1_keys)


@pytest.mark.parametrize("version", [0, 3, 256])
def test_only_versions_1_and_2_are_made(version: int) -> None:
    message = rf"^format version must be 1 or 2, got {version}$"
    with pytest.raises(ValueError, match=message):
        v2_header(version=version)
    with pytest.raises(ValueError, match=message):
        FileHeader.new(ARN, WRAPPED, version=version)
    with pytest.raises(ValueError, match=message):
        FileKeys.derive(DATA_KEY, FILE_ID, version)
    with pytest.raises(ValueError, match=message):
        FileKeys(bytes(32), Aead(bytes(32)), version)


def fixed_v2(**fields: int) -> bytes:
    """A v2 header's bytes with some fixed fields replaced (MAC not recomputed)."""
    raw = v2_header().encode(v2_keys())
    values = {"version": 2, "suite": 1, "flags": 0, "shift": 14} | fields
    packed = struct.pack(">HHI", values["version"], values["suite"], values["flags"])
    return raw[:8] + packed + raw[16:32] + bytes([values["shift"]]) + raw[33:]


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        (
            {"version": 3},
            UnsupportedFormatError,
            r"^unsupported format version 3 \(this envfs reads versions 1 and 2\)$",
        ),
        (
            {"suite": 2},
            UnsupportedFormatError,
            r"^unsupported cipher suite 2 \(this envfs knows suite 1\)$",
        ),
        (
            {"flags": 1},
            UnsupportedFormatError,
            r"^unsupported header flags 0x00000001 \(version 2 defines 0x00000002\)$",
        ),
        (
            {"shift": 11},
            UnsupportedFormatError,
            r"^unsupported block size 2\*\*11 \(version 2 allows 2\*\*12 to 2\*\*20\)$",
        ),
    ],
)
def test_the_parser_refuses_unknown_fields_of_v2_headers(
    fields: dict[str, int], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        FileHeader.parse(fixed_v2(**fields))


def test_a_short_v2_header_is_truncated_and_an_unknown_version_is_refused_first() -> None:
    raw = v2_header().encode(v2_keys())
    with pytest.raises(IntegrityError, match=r"^truncated header: 511 of 512 bytes$"):
        FileHeader.parse(raw[:511])
    with pytest.raises(UnsupportedFormatError, match=r"^unsupported format version 3 "):
        FileHeader.parse(fmt.MAGIC + b"\x00\x03")
    with pytest.raises(NotEnvfsFileError, match=r"^not an envfs file \(bad magic\)$"):
        FileHeader.parse(b"\x88" + raw[1:])


def test_v2_padding_and_length_fields_are_checked_although_not_under_the_mac() -> None:
    raw = v2_header().encode(v2_keys())
    at = 35 + len(ARN)
    cases = {
        r"^malformed header: nonzero padding$": raw[: MAC_OFFSET - 1] + b"\x01" + raw[MAC_OFFSET:],
        r"^malformed header: key arn length 0 does not fit$": raw[:33] + b"\0\0" + raw[35:],
        r"^malformed header: key arn length 444 does not fit$": raw[:33] + b"\x01\xbc" + raw[35:],
        r"^malformed header: wrapped key length 0 does not fit$": (
            raw[:at] + b"\0\0" + raw[at + 2 :]
        ),
        r"^malformed header: key arn is not utf-8$": raw[:35] + b"\xff" + raw[36:],
    }
    for message, bad in cases.items():
        with pytest.raises(IntegrityError, match=message):
            FileHeader.parse(bad)


# --- keys and blocks ----------------------------------------------------------------------


def test_v2_keys_use_v2_labels_and_blocks_carry_version_2() -> None:
    keys = v2_keys()
    assert keys.version == 2
    assert keys.header_key == hkdf(DATA_KEY, b"envfs v2 header", salt=FILE_ID)
    v1 = FileKeys.derive(DATA_KEY, FILE_ID, 1)
    assert keys.header_key != v1.header_key
    content_key = hkdf(DATA_KEY, b"envfs v2 content", salt=FILE_ID)
    sealed = fmt.encrypt_block(keys, FILE_ID, 3, b"block three", 12)
    aad = b"envfs\x00\x02" + FILE_ID + (3).to_bytes(8, "big")
    assert Aead(content_key).open(sealed, aad) == b"block three"
    with pytest.raises(IntegrityError):  # the same key with version 1 in the AAD
        Aead(content_key).open(sealed, b"envfs\x00\x01" + aad[7:])
    assert fmt.decrypt_block(keys, FILE_ID, 3, sealed, 12) == b"block three"
    batch = fmt.encrypt_blocks(keys, FILE_ID, 3, b"x" * 5000, 12, final=True)
    assert Aead(content_key).open(batch[:4124], aad) == b"x" * 4096
    assert repr(keys) == "FileKeys(<redacted>)"


def test_blocks_of_one_version_never_open_in_the_other() -> None:
    v1, v2 = FileKeys.derive(DATA_KEY, FILE_ID, 1), v2_keys()
    for sealer, opener in [(v1, v2), (v2, v1)]:
        run = fmt.encrypt_blocks(sealer, FILE_ID, 0, b"y" * 9000, 12, final=True)
        with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
            fmt.decrypt_blocks(opener, FILE_ID, 0, run, 12)
        with pytest.raises(IntegrityError, match=r"^block 2 failed authentication$"):
            fmt.decrypt_block(opener, FILE_ID, 2, run[2 * 4124 :], 12)
    # The AAD's version alone (same content key) separates them too.
    crossed = FileKeys(v2.header_key, v2.content, 1)
    run = fmt.encrypt_blocks(crossed, FILE_ID, 0, b"z" * 10, 12, final=True)
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        fmt.decrypt_blocks(v2, FILE_ID, 0, run, 12)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 17])
def test_v2_files_round_trip(size: int) -> None:
    plaintext = os.urandom(size)
    backing, data_key = make_file(plaintext)
    assert backing[8:10] == b"\x00\x02"
    assert len(backing) == fmt.backing_size(size, 12)
    assert open_file(backing, data_key) == plaintext


def test_v2_sparse_files_read_holes_as_zeros() -> None:
    data_key = os.urandom(32)
    header = FileHeader.new(ARN, WRAPPED, 12, version=2)
    header = dataclasses.replace(header, flags=fmt.FLAG_SPARSE)
    keys = FileKeys.derive(data_key, header.file_id, 2)
    tail = fmt.encrypt_blocks(keys, header.file_id, 1, b"end", 12, final=True)
    backing = header.encode(keys) + bytes(4096 + 28) + tail
    assert open_file(backing, data_key) == bytes(4096) + b"end"
    unflagged = dataclasses.replace(header, flags=0).encode(keys) + backing[HEADER_SIZE:]
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        open_file(unflagged, data_key)


def test_every_flipped_byte_of_a_v2_file_is_caught_or_changes_the_arn_or_wrapped_key() -> None:
    """A change that reads as another key ARN or wrapped key is left to the volume file and
    the key service (which then refuse it); every other change the format catches."""
    plaintext = os.urandom(5000)
    backing, data_key = make_file(plaintext)
    old = FileHeader.parse(backing)
    left_to_the_key_service = set()
    for offset in range(len(backing)):
        changed = flipped(backing, offset)
        try:
            read = open_file(changed, data_key)
        except IntegrityError:
            continue
        assert read == plaintext
        assert 33 <= offset < MAC_OFFSET
        header = FileHeader.parse(changed)
        assert (header.key_arn, header.wrapped_key) != (old.key_arn, old.wrapped_key)
        left_to_the_key_service.add(offset)
    at = 35 + len(ARN)
    assert set(range(35, at)) | set(range(at + 2, at + 2 + len(WRAPPED))) <= (
        left_to_the_key_service
    )
    assert left_to_the_key_service <= set(range(35, at + 2 + len(WRAPPED)))


def test_a_header_of_another_v2_file_over_these_blocks_is_caught() -> None:
    first, first_key = make_file(b"first file " * 500)
    second, _ = make_file(b"second file " * 500)
    swapped = first[:HEADER_SIZE] + second[HEADER_SIZE:]
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        open_file(swapped, first_key)
    # The final block alone (what is checked before anything is served) is enough.
    header = FileHeader.parse(swapped)
    keys = FileKeys.derive(first_key, header.file_id, 2)
    last = len(b"second file " * 500) >> 12
    with pytest.raises(IntegrityError, match=rf"^block {last} failed authentication$"):
        fmt.decrypt_block(keys, header.file_id, last, swapped[fmt.block_offset(last, 12) :], 12)


# --- rewrap --------------------------------------------------------------------------------


def test_rewrap_header_replaces_arn_and_wrapped_key_and_keeps_the_mac() -> None:
    plaintext = os.urandom(9000)
    backing, data_key = make_file(plaintext)
    new_wrapped = b"\x07" * 150
    raw = fmt.rewrap_header(backing, OTHER_ARN, new_wrapped)
    assert len(raw) == HEADER_SIZE
    assert raw[MAC_OFFSET:] == backing[MAC_OFFSET:HEADER_SIZE]
    assert raw[:33] == backing[:33]
    header = FileHeader.parse(raw)
    old = FileHeader.parse(backing)
    assert header == dataclasses.replace(old, key_arn=OTHER_ARN, wrapped_key=new_wrapped)
    assert open_file(raw + backing[HEADER_SIZE:], data_key) == plaintext
    header.verify(raw, FileKeys.derive(data_key, header.file_id, 2))
    # And back again: the original bytes exactly.
    assert fmt.rewrap_header(raw, ARN, WRAPPED) == backing[:HEADER_SIZE]
    assert fmt.rewrap_header(bytearray(raw), ARN, WRAPPED) == backing[:HEADER_SIZE]


def test_rewrap_header_fills_the_header_exactly_and_refuses_what_does_not_fit() -> None:
    backing, data_key = make_file(b"abc")
    biggest = bytes(fmt.MAX_VARIABLE_SIZE - len(OTHER_ARN))
    raw = fmt.rewrap_header(backing, OTHER_ARN, b"\x01" + biggest[1:])
    assert open_file(raw + backing[HEADER_SIZE:], data_key) == b"abc"
    with pytest.raises(
        HeaderOverflowError,
        match=rf"^key arn \({len(OTHER_ARN)} bytes\) and wrapped key \({len(biggest) + 1} bytes\)"
        r" do not fit in the file header: at most 443 bytes together$",
    ):
        fmt.rewrap_header(backing, OTHER_ARN, biggest + b"\x01")
    with pytest.raises(ValueError, match=r"^key arn and wrapped key must not be empty$"):
        fmt.rewrap_header(backing, OTHER_ARN, b"")
    with pytest.raises(ValueError, match=r"^key arn and wrapped key must not be empty$"):
        fmt.rewrap_header(backing, "", WRAPPED)


def test_rewrap_header_refuses_version_1() -> None:
    backing, _ = make_file(b"abc", version=1)
    with pytest.raises(
        NotRewrappableError,
        match=r"^a version 1 header's wrapped key cannot be replaced without its data key$",
    ):
        fmt.rewrap_header(backing, OTHER_ARN, WRAPPED)
    assert issubclass(NotRewrappableError, EnvfsError)


def test_rewrap_header_refuses_malformed_headers() -> None:
    backing, _ = make_file(b"abc")
    with pytest.raises(IntegrityError, match=r"^malformed header: nonzero padding$"):
        fmt.rewrap_header(backing[: MAC_OFFSET - 1] + b"\x01" + backing[MAC_OFFSET:], ARN, WRAPPED)
    with pytest.raises(IntegrityError, match=r"^truncated header: 500 of 512 bytes$"):
        fmt.rewrap_header(backing[:500], ARN, WRAPPED)
    with pytest.raises(NotEnvfsFileError):
        fmt.rewrap_header(bytes(512), ARN, WRAPPED)


def test_a_rewrapped_header_does_not_repair_a_bad_mac() -> None:
    backing, data_key = make_file(b"abc")
    bad = flipped(backing, MAC_OFFSET)
    raw = fmt.rewrap_header(bad, OTHER_ARN, WRAPPED)
    with pytest.raises(IntegrityError, match=r"^header authentication failed$"):
        open_file(raw + backing[HEADER_SIZE:], data_key)


# --- golden vectors --------------------------------------------------------------------------


def golden() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((GOLDEN / "format-v2.json").read_text())
    return document


def test_golden_v2_vectors_decrypt() -> None:
    document = golden()
    assert (document["format_version"], document["header_size"]) == (2, HEADER_SIZE)
    assert document["mac_covers"] == [0, 33]
    assert len(document["vectors"]) >= 7
    assert {v["block_shift"] for v in document["vectors"]} >= {12, 14, 20}
    assert any(v["flags"] & fmt.FLAG_SPARSE for v in document["vectors"])
    for vector in document["vectors"]:
        backing = bytes.fromhex(vector["backing"])
        data_key = bytes.fromhex(vector["data_key"])
        file_id = bytes.fromhex(vector["file_id"])
        plaintext = bytes.fromhex(vector["plaintext"])
        shift = vector["block_shift"]
        header = FileHeader.parse(backing)
        wrapped = bytes.fromhex(vector["wrapped_key"])
        expected = FileHeader(
            file_id, shift, vector["key_arn"], wrapped, vector["flags"], version=2
        )
        assert header == expected
        keys = FileKeys.derive(data_key, file_id, 2)
        assert keys.header_key.hex() == vector["header_key"]
        header.verify(backing, keys)
        assert header.encode(keys) == backing[:HEADER_SIZE]
        assert backing[MAC_OFFSET:HEADER_SIZE].hex() == vector["header_mac"]
        assert len(backing) == vector["backing_size"] == fmt.backing_size(len(plaintext), shift)
        assert fmt.plaintext_size(len(backing), shift) == vector["plaintext_size"]
        assert fmt.decrypt_file(backing, keys) == plaintext
        final = len(plaintext) >> shift  # the final block, with the documented key and AAD
        aad = b"envfs\x00\x02" + file_id + final.to_bytes(8, "big")
        content = Aead(bytes.fromhex(vector["content_key"]))
        assert (
            content.open(backing[fmt.block_offset(final, shift) :], aad)
            == (plaintext[final << shift :])
        )


def test_golden_v2_rewrapped_headers_read_as_before() -> None:
    document = golden()
    by_name = {v["name"]: v for v in document["vectors"]}
    assert len(document["rewrapped"]) >= 2
    for case in document["rewrapped"]:
        original = by_name[case["of"]]
        old = bytes.fromhex(original["backing"])
        backing = bytes.fromhex(case["backing"])
        arn, wrapped = case["key_arn"], bytes.fromhex(case["wrapped_key"])
        assert fmt.rewrap_header(old, arn, wrapped) == backing[:HEADER_SIZE]
        assert backing[MAC_OFFSET:] == old[MAC_OFFSET:]
        header = FileHeader.parse(backing)
        assert (header.key_arn, header.wrapped_key) == (arn, wrapped)
        assert (header.key_arn, header.wrapped_key) != (
            original["key_arn"],
            bytes.fromhex(original["wrapped_key"]),
        )
        data_key = bytes.fromhex(original["data_key"])
        assert open_file(backing, data_key) == bytes.fromhex(original["plaintext"])


def test_golden_v2_broken_files_are_refused() -> None:
    document = golden()
    keys_by_name = {v["name"]: bytes.fromhex(v["data_key"]) for v in document["vectors"]}
    errors = {
        "IntegrityError": IntegrityError,
        "UnsupportedFormatError": UnsupportedFormatError,
        "NotEnvfsFileError": NotEnvfsFileError,
    }
    names = {case["name"] for case in document["broken"]}
    assert names >= {
        "mac-byte-flipped",
        "sparse-flag-set",
        "nonzero-padding",
        "v1-labels-in-a-v2-header",
        "v2-header-over-v1-blocks",
        "v1-header-over-v2-blocks",
        "header-of-another-file",
        "version-3",
    }
    for case in document["broken"]:
        with pytest.raises(errors[case["error"]], match=case["match"]):
            open_file(bytes.fromhex(case["backing"]), keys_by_name[case["data_key_of"]])


def test_golden_v2_headers_the_format_accepts_and_the_key_service_refuses() -> None:
    """The format alone accepts them (their refusal is the key service's: see test_vfs_v2)."""
    document = golden()
    by_name = {v["name"]: v for v in document["vectors"]}
    assert {c["name"] for c in document["unwrap_refuses"]} == {
        "wrapped-key-of-another-file",
        "key-arn-edited",
    }
    for case in document["unwrap_refuses"]:
        backing = bytes.fromhex(case["backing"])
        own = by_name[case["data_key_of"]]
        assert case["refused_by"] == "unwrap"
        header = FileHeader.parse(backing)
        assert header.file_id.hex() == own["file_id"]
        assert (header.key_arn, header.wrapped_key.hex()) != (own["key_arn"], own["wrapped_key"])
        plaintext = bytes.fromhex(by_name[case["plaintext_of"]]["plaintext"])
        assert open_file(backing, bytes.fromhex(own["data_key"])) == plaintext
