"""The on-disk file format: sizes, header, blocks, tampering, golden vectors (docs/format.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from envfs.crypto import Aead, hkdf, hmac_sha256
from envfs.errors import EnvfsError, IntegrityError
from envfs.files import fileformat as fmt
from envfs.files.fileformat import (
    BLOCK_OVERHEAD,
    HEADER_SIZE,
    FileHeader,
    FileKeys,
    HeaderOverflowError,
    NotEnvfsFileError,
    UnsupportedFormatError,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "format-v1.json"
ARN = "arn:envfs:kms:local-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
WRAPPED = bytes(range(100))
KIB = 1024


def make_file(
    plaintext: bytes, block_shift: int = 12, data_key: bytes | None = None
) -> tuple[bytes, bytes, FileHeader]:
    """A whole backing file; returns (backing, data key, header)."""
    data_key = os.urandom(32) if data_key is None else data_key
    header = FileHeader.new(ARN, WRAPPED, block_shift)
    keys = FileKeys.derive(data_key, header.file_id)
    return fmt.encrypt_file(header, keys, plaintext), data_key, header


def open_file(backing: bytes, data_key: bytes) -> bytes:
    """What the filesystem does: parse, derive keys from the (unwrapped) data key for the
    header's version, verify."""
    header = FileHeader.parse(backing)
    return fmt.decrypt_file(backing, FileKeys.derive(data_key, header.file_id, header.version))


def stride(block_shift: int) -> int:
    return (1 << block_shift) + BLOCK_OVERHEAD


# --- sizes ---------------------------------------------------------------------------------


def test_constants() -> None:
    assert (HEADER_SIZE, BLOCK_OVERHEAD, fmt.MIN_BACKING_SIZE) == (512, 28, 540)
    assert fmt.MAX_VARIABLE_SIZE == 443
    assert fmt.DEFAULT_BLOCK_SHIFT == 14
    assert (fmt.MIN_BLOCK_SHIFT, fmt.MAX_BLOCK_SHIFT) == (12, 20)
    assert fmt.MAGIC == b"\x89envfs\r\n"


@pytest.mark.parametrize(
    ("plaintext", "backing"),
    [
        (0, 540),
        (1, 541),
        (13, 553),
        (16383, 16923),
        (16384, 16952),
        (16385, 16953),
        (131072, 131836),
        (1 << 20, 1050908),
        (10**9, 1001709520),
    ],
)
def test_worked_sizes(plaintext: int, backing: int) -> None:
    assert fmt.backing_size(plaintext, 14) == backing
    assert fmt.plaintext_size(backing, 14) == plaintext


def test_worked_sizes_table_of_the_spec_is_right() -> None:
    spec = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text()
    rows = re.findall(r"^\| ([\d ]+?)(?: \(.*?\))? \| [^|]* \| ([\d ]+) \|", spec, re.M)
    assert len(rows) >= 8
    for plaintext, backing in rows:
        p, b = int(plaintext.replace(" ", "")), int(backing.replace(" ", ""))
        assert fmt.backing_size(p, 14) == b, (p, b)


@pytest.mark.parametrize("shift", range(12, 21))
def test_size_math_round_trips_and_is_monotonic(shift: int) -> None:
    size = 1 << shift
    sizes = {0, 1, 2, 27, 28, 29}
    for k in range(5):
        sizes |= {k * size + d for d in (-2, -1, 0, 1, 2) if k * size + d >= 0}
    sizes |= {random.Random(shift).randrange(1 << 40) for _ in range(200)}
    for p in sorted(sizes):
        b = fmt.backing_size(p, shift)
        assert b == HEADER_SIZE + p + BLOCK_OVERHEAD * (p // size + 1)
        assert fmt.plaintext_size(b, shift) == p
        assert fmt.backing_size(p + 1, shift) > b
        assert fmt.block_count(p, shift) == p // size + 1


def test_every_backing_size_is_valid_or_refused() -> None:
    shift = 12
    limit = fmt.backing_size(3 * 4096 + 100, shift)
    valid = {fmt.backing_size(p, shift): p for p in range(3 * 4096 + 101)}
    for b in range(limit + 1):
        if b in valid:
            assert fmt.plaintext_size(b, shift) == valid[b]
        else:
            with pytest.raises(IntegrityError, match=r"^impossible backing size \d+ for 4096"):
                fmt.plaintext_size(b, shift)


@pytest.mark.parametrize("backing", [0, 27, 511, 512, 539, 512 + 16412, 512 + 16412 + 27])
def test_impossible_sizes_are_refused(backing: int) -> None:
    with pytest.raises(
        IntegrityError,
        match=rf"^impossible backing size {backing} for 16384-byte blocks"
        r" \(truncated or corrupt\)$",
    ):
        fmt.plaintext_size(backing, 14)


def test_block_span_covers_the_range_in_one_backing_read() -> None:
    rng = random.Random(1)
    for shift in (12, 14, 20):
        size = 1 << shift
        for _ in range(2000):
            offset = rng.randrange(8 * size)
            length = rng.choice([0, 1, size, 128 * KIB, KIB * KIB, rng.randrange(4 * size)])
            span = fmt.block_span(offset, length, shift)
            assert span.skip == offset - span.first_block * size
            assert 0 <= span.skip < size
            assert span.backing_offset == fmt.block_offset(span.first_block, shift)
            assert span.backing_length == span.block_count * stride(shift)
            if length:
                assert span.first_block * size <= offset
                assert (span.first_block + span.block_count) * size >= offset + length
                assert (span.first_block + span.block_count - 1) * size < offset + length
            else:
                assert span.block_count == 0


def test_block_span_of_aligned_requests() -> None:
    # A 128 KiB read and a 1 MiB write, aligned, with 16 KiB blocks.
    assert fmt.block_span(128 * KIB, 128 * KIB, 14) == (8, 8, 512 + 8 * 16412, 8 * 16412, 0)
    assert fmt.block_span(0, KIB * KIB, 14) == (0, 64, 512, 64 * 16412, 0)
    assert fmt.block_span(100, 1, 14) == (0, 1, 512, 16412, 100)


def test_reads_through_block_span_match_the_plaintext() -> None:
    shift = 12
    plaintext = os.urandom(5 * 4096 + 333)
    backing, data_key, header = make_file(plaintext, shift)
    keys = FileKeys.derive(data_key, header.file_id)
    rng = random.Random(2)
    for _ in range(300):
        offset = rng.randrange(len(plaintext) + 10)
        length = rng.randrange(3 * 4096)
        span = fmt.block_span(offset, length, shift)
        chunk = backing[span.backing_offset : span.backing_offset + span.backing_length]
        plain = fmt.decrypt_blocks(keys, header.file_id, span.first_block, chunk, shift)
        assert plain[span.skip : span.skip + length] == plaintext[offset : offset + length]


def test_size_functions_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"^block shift must be 12\.\.20, got 11$"):
        fmt.backing_size(0, 11)
    with pytest.raises(ValueError, match=r"^sizes and offsets must not be negative, got -1$"):
        fmt.backing_size(-1, 14)
    with pytest.raises(ValueError, match=r"^sizes and offsets must not be negative, got -1$"):
        fmt.block_span(-1, 1, 14)
    with pytest.raises(ValueError, match=r"^block index must be 0\.\.2\*\*64-1, got -1$"):
        fmt.block_offset(-1, 14)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [12, 14])
def test_round_trip_at_many_sizes(shift: int) -> None:
    size = 1 << shift
    for n in [0, 1, 2, 100, size - 1, size, size + 1, 2 * size, 3 * size + 7, 8 * size]:
        plaintext = os.urandom(n)
        backing, data_key, _ = make_file(plaintext, shift)
        assert len(backing) == fmt.backing_size(n, shift)
        assert fmt.plaintext_size(len(backing), shift) == n
        assert open_file(backing, data_key) == plaintext


def test_empty_file_is_header_and_one_empty_block() -> None:
    backing, data_key, header = make_file(b"", 14)
    assert len(backing) == HEADER_SIZE + BLOCK_OVERHEAD
    keys = FileKeys.derive(data_key, header.file_id)
    assert fmt.decrypt_block(keys, header.file_id, 0, backing[HEADER_SIZE:], 14) == b""


def test_encrypt_blocks_final_rule() -> None:
    file_id = os.urandom(16)
    keys = FileKeys.derive(os.urandom(32), file_id)
    whole = os.urandom(2 * 4096)
    assert fmt.encrypt_blocks(keys, file_id, 3, b"", 12, final=False) == b""
    assert len(fmt.encrypt_blocks(keys, file_id, 3, b"", 12, final=True)) == 28
    assert len(fmt.encrypt_blocks(keys, file_id, 3, whole, 12, final=False)) == 2 * 4124
    run = fmt.encrypt_blocks(keys, file_id, 3, whole, 12, final=True)
    assert len(run) == 2 * 4124 + 28
    assert fmt.decrypt_blocks(keys, file_id, 3, run, 12) == whole
    assert fmt.decrypt_block(keys, file_id, 5, run[2 * 4124 :], 12) == b""
    with pytest.raises(
        ValueError,
        match=r"^only the final block may be short: 8193 bytes is not whole 4096-byte blocks$",
    ):
        fmt.encrypt_blocks(keys, file_id, 0, whole + b"x", 12, final=False)


def test_single_block_helpers_match_the_batch_ones() -> None:
    file_id = os.urandom(16)
    keys = FileKeys.derive(os.urandom(32), file_id)
    plaintext = os.urandom(3 * 4096 + 10)
    run = fmt.encrypt_blocks(keys, file_id, 7, plaintext, 12, final=True)
    for i in range(4):
        sealed = run[i * 4124 : (i + 1) * 4124]
        assert fmt.decrypt_block(keys, file_id, 7 + i, sealed, 12) == plaintext[i * 4096 :][:4096]
    one = fmt.encrypt_block(keys, file_id, 9, b"abc", 12)
    assert len(one) == 3 + BLOCK_OVERHEAD
    assert fmt.decrypt_blocks(keys, file_id, 9, one, 12) == b"abc"
    with pytest.raises(ValueError, match=r"^a block holds at most 4096 bytes, got 4097$"):
        fmt.encrypt_block(keys, file_id, 0, bytes(4097), 12)
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        fmt.decrypt_block(keys, file_id, 0, bytes(4125), 12)
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        fmt.decrypt_block(keys, file_id, 0, bytes(27), 12)


def test_rewriting_middle_blocks_in_place() -> None:
    # What vfs.py does for a write inside the file: re-seal whole blocks, pwrite them once.
    shift = 12
    plaintext = bytearray(os.urandom(6 * 4096 + 50))
    backing, data_key, header = make_file(bytes(plaintext), shift)
    keys = FileKeys.derive(data_key, header.file_id)
    span = fmt.block_span(4096 + 10, 2 * 4096, shift)
    old = fmt.decrypt_blocks(
        keys,
        header.file_id,
        span.first_block,
        backing[span.backing_offset : span.backing_offset + span.backing_length],
        shift,
    )
    new = bytearray(old)
    new[span.skip : span.skip + 2 * 4096] = b"\xaa" * (2 * 4096)
    sealed = fmt.encrypt_blocks(keys, header.file_id, span.first_block, new, shift, final=False)
    assert len(sealed) == span.backing_length
    at = span.backing_offset
    patched = backing[:at] + sealed + backing[at + len(sealed) :]
    plaintext[4096 + 10 : 3 * 4096 + 10] = b"\xaa" * (2 * 4096)
    assert open_file(patched, data_key) == plaintext


def test_batch_helpers_accept_buffers() -> None:
    file_id = os.urandom(16)
    keys = FileKeys.derive(os.urandom(32), file_id)
    plaintext = bytearray(os.urandom(5000))
    run = fmt.encrypt_blocks(keys, file_id, 0, memoryview(plaintext), 12, final=True)
    assert fmt.decrypt_blocks(keys, file_id, 0, bytearray(run), 12) == plaintext
    assert fmt.decrypt_blocks(keys, file_id, 1, memoryview(run)[4124:], 12) == plaintext[4096:]


def test_nonces_are_fresh_on_every_write() -> None:
    file_id = os.urandom(16)
    keys = FileKeys.derive(os.urandom(32), file_id)
    a = fmt.encrypt_block(keys, file_id, 0, b"same block", 12)
    b = fmt.encrypt_block(keys, file_id, 0, b"same block", 12)
    assert a[:12] != b[:12]
    assert a[12:] != b[12:]
    run = fmt.encrypt_blocks(keys, file_id, 0, bytes(4 * 4096), 12, final=True)
    nonces = {run[i * 4124 : i * 4124 + 12] for i in range(5)}
    assert len(nonces) == 5
    assert FileHeader.new(ARN, WRAPPED).file_id != FileHeader.new(ARN, WRAPPED).file_id


# --- tampering -------------------------------------------------------------------------------


def test_every_flipped_byte_is_detected() -> None:
    plaintext = os.urandom(4096 + 50)
    backing, data_key, _ = make_file(plaintext, 12)
    assert open_file(backing, data_key) == plaintext
    raw = bytearray(backing)
    for i in range(len(raw)):
        raw[i] ^= 0x01
        with pytest.raises(IntegrityError):
            open_file(bytes(raw), data_key)
        raw[i] ^= 0x01


def test_swapped_blocks_are_detected() -> None:
    backing, data_key, _ = make_file(os.urandom(3 * 4096 + 5), 12)
    s = stride(12)
    blocks = [backing[HEADER_SIZE + i * s : HEADER_SIZE + (i + 1) * s] for i in range(4)]
    swapped = backing[:HEADER_SIZE] + blocks[1] + blocks[0] + blocks[2] + blocks[3]
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        open_file(swapped, data_key)
    swapped = backing[:HEADER_SIZE] + blocks[0] + blocks[2] + blocks[1] + blocks[3]
    with pytest.raises(IntegrityError, match=r"^block 1 failed authentication$"):
        open_file(swapped, data_key)


def test_block_of_another_file_is_detected() -> None:
    plaintext = os.urandom(2 * 4096 + 5)
    data_key = os.urandom(32)
    # Same data key, other file id (so other derived keys).
    mine, _, _ = make_file(plaintext, 12, data_key)
    other, _, _ = make_file(plaintext, 12, data_key)
    s = stride(12)
    spliced = mine[: HEADER_SIZE + s] + other[HEADER_SIZE + s : HEADER_SIZE + 2 * s] + mine[-33:]
    with pytest.raises(IntegrityError, match=r"^block 1 failed authentication$"):
        open_file(spliced, data_key)
    # Another data key altogether.
    third, _, _ = make_file(plaintext, 12)
    spliced = mine[:HEADER_SIZE] + third[HEADER_SIZE : HEADER_SIZE + s] + mine[HEADER_SIZE + s :]
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        open_file(spliced, data_key)


def test_aad_binds_the_file_id_even_under_the_same_content_key() -> None:
    file_id, other_id = os.urandom(16), os.urandom(16)
    keys = FileKeys.derive(os.urandom(32), file_id)
    sealed = fmt.encrypt_block(keys, file_id, 0, b"secret", 12)
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        fmt.decrypt_block(keys, other_id, 0, sealed, 12)
    with pytest.raises(IntegrityError, match=r"^block 1 failed authentication$"):
        fmt.decrypt_block(keys, file_id, 1, sealed, 12)


def test_header_swapped_between_files_is_detected() -> None:
    a, key_a, _ = make_file(os.urandom(5000), 12)
    b, key_b, _ = make_file(os.urandom(5000), 12)
    chimera = a[:HEADER_SIZE] + b[HEADER_SIZE:]
    # The key service unwraps a's data key for a's header: b's blocks do not open under it.
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        open_file(chimera, key_a)
    # And b's data key does not authenticate a's header.
    with pytest.raises(IntegrityError, match=r"^header authentication failed$"):
        open_file(chimera, key_b)


def test_truncation_anywhere_is_detected() -> None:
    plaintext = os.urandom(3 * 4096 + 100)
    backing, data_key, _ = make_file(plaintext, 12)
    boundaries = [HEADER_SIZE + i * stride(12) for i in range(4)]
    # Every cut near the header's end and each block boundary, every 7th byte elsewhere.
    near = {b + d for b in [0, *boundaries, len(backing)] for d in range(-40, 41)}
    for cut in range(len(backing)):
        if cut in near or cut % 7 == 0:
            with pytest.raises(IntegrityError):
                open_file(backing[:cut], data_key)
    for cut in boundaries:
        with pytest.raises(IntegrityError, match=r"^impossible backing size"):
            open_file(backing[:cut], data_key)


def test_appended_bytes_are_detected() -> None:
    for plaintext in (b"", b"abc", os.urandom(4096)):
        backing, data_key, _ = make_file(plaintext, 12)
        for extra in (b"\0", bytes(28), os.urandom(100), os.urandom(4124)):
            with pytest.raises(IntegrityError):
                open_file(backing + extra, data_key)


# --- header ----------------------------------------------------------------------------------


def fixed_header(**fields: Any) -> bytes:
    """An empty file's backing with some fixed header fields replaced (MAC not recomputed)."""
    backing, _, _ = make_file(b"", 14)
    values = {"version": 1, "suite": 1, "flags": 0, "shift": 14} | fields
    packed = (
        struct.pack(">HHI", values["version"], values["suite"], values["flags"])
        + backing[16:32]
        + bytes([values["shift"]])
    )
    return backing[:8] + packed + backing[33:]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"version": 3}, r"^unsupported format version 3 \(this envfs reads versions 1 and 2\)$"),
        ({"version": 0}, r"^unsupported format version 0 \(this envfs reads versions 1 and 2\)$"),
        ({"version": 65535}, r"^unsupported format version 65535 "),
        ({"suite": 2}, r"^unsupported cipher suite 2 \(this envfs knows suite 1\)$"),
        ({"suite": 0}, r"^unsupported cipher suite 0 "),
        ({"flags": 1}, r"^unsupported header flags 0x00000001 \(version 1 defines 0x00000002\)$"),
        ({"flags": 1 << 31}, r"^unsupported header flags 0x80000000 "),
        (
            {"shift": 11},
            r"^unsupported block size 2\*\*11 \(version 1 allows 2\*\*12 to 2\*\*20\)$",
        ),
        ({"shift": 21}, r"^unsupported block size 2\*\*21 "),
        ({"shift": 0}, r"^unsupported block size 2\*\*0 "),
    ],
)
def test_unknown_versions_suites_flags_and_block_sizes_are_refused(
    fields: dict[str, int], message: str
) -> None:
    with pytest.raises(UnsupportedFormatError, match=message):
        FileHeader.parse(fixed_header(**fields))


def test_unsupported_version_is_refused_before_the_length_check() -> None:
    short_v3 = fmt.MAGIC + struct.pack(">H", 3) + bytes(10)
    with pytest.raises(UnsupportedFormatError, match=r"^unsupported format version 3 "):
        FileHeader.parse(short_v3)


@pytest.mark.parametrize("raw", [b"", b"\x89env", b"\x89envfs\r\r" + bytes(600), bytes(540)])
def test_not_an_envfs_file(raw: bytes) -> None:
    with pytest.raises(NotEnvfsFileError, match=r"^not an envfs file \(bad magic\)$"):
        FileHeader.parse(raw)


def test_truncated_header() -> None:
    backing, _, _ = make_file(b"", 14)
    with pytest.raises(IntegrityError, match=r"^truncated header: 511 of 512 bytes$"):
        FileHeader.parse(backing[:511])


def test_malformed_variable_fields_are_refused() -> None:
    backing, _, _ = make_file(b"", 14)
    arn_len = len(ARN)

    def with_bytes(offset: int, value: bytes) -> bytes:
        return backing[:offset] + value + backing[offset + len(value) :]

    cases = {
        r"^malformed header: key arn length 0 does not fit$": with_bytes(33, b"\0\0"),
        r"^malformed header: key arn length 444 does not fit$": with_bytes(33, b"\x01\xbc"),
        r"^malformed header: wrapped key length 0 does not fit$": with_bytes(35 + arn_len, b"\0\0"),
        rf"^malformed header: wrapped key length {443 - arn_len + 1} does not fit$": with_bytes(
            35 + arn_len, struct.pack(">H", 443 - arn_len + 1)
        ),
        r"^malformed header: nonzero padding$": with_bytes(479, b"\x01"),
        r"^malformed header: key arn is not utf-8$": with_bytes(35, b"\xff"),
    }
    for message, raw in cases.items():
        with pytest.raises(IntegrityError, match=message):
            FileHeader.parse(raw)
    # The largest wrapped key that fits is accepted.
    biggest = with_bytes(35 + arn_len, struct.pack(">H", 443 - arn_len))
    assert len(FileHeader.parse(biggest).wrapped_key) == 443 - arn_len


def test_header_layout_is_as_documented() -> None:
    data_key = bytes(range(32))
    header = FileHeader(bytes(range(16)), 14, ARN, WRAPPED)
    keys = FileKeys.derive(data_key, header.file_id)
    raw = header.encode(keys)
    assert len(raw) == HEADER_SIZE
    assert raw[:8] == b"\x89envfs\r\n"
    assert raw[8:16] == b"\x00\x01\x00\x01\x00\x00\x00\x00"
    assert raw[16:32] == bytes(range(16))
    assert raw[32] == 14
    assert raw[33:35] == len(ARN).to_bytes(2, "big")
    assert raw[35 : 35 + len(ARN)] == ARN.encode()
    at = 35 + len(ARN)
    assert raw[at : at + 2] == b"\x00\x64"
    assert raw[at + 2 : at + 102] == WRAPPED
    assert raw[at + 102 : 480] == bytes(480 - at - 102)
    header_key = hkdf(data_key, b"envfs v1 header", salt=bytes(range(16)))
    assert raw[480:] == hmac_sha256(header_key, raw[:480])
    assert header.encode(keys) == raw  # deterministic


def test_parse_and_verify_round_trip() -> None:
    header = FileHeader.new(ARN, WRAPPED, 16)
    keys = FileKeys.derive(os.urandom(32), header.file_id)
    raw = header.encode(keys)
    parsed = FileHeader.parse(raw + b"first block bytes are ignored")
    assert parsed == header
    assert parsed.block_size == 65536
    parsed.verify(raw, keys)
    assert FileHeader.parse_verified(raw, keys) == header


def test_verify_refuses_wrong_keys_and_other_bytes() -> None:
    header = FileHeader.new(ARN, WRAPPED)
    keys = FileKeys.derive(os.urandom(32), header.file_id)
    raw = header.encode(keys)
    wrong = FileKeys.derive(os.urandom(32), header.file_id)
    other = FileHeader.new(ARN, WRAPPED)
    for raw_, header_, keys_ in [
        (raw, header, wrong),
        (raw, other, keys),
        (raw[:511], header, keys),
        (other.encode(keys), header, keys),
    ]:
        with pytest.raises(IntegrityError, match=r"^header authentication failed$"):
            header_.verify(raw_, keys_)


def test_rewrap_keeps_the_content() -> None:
    plaintext = os.urandom(5000)
    backing, data_key, header = make_file(plaintext, 12)
    keys = FileKeys.derive(data_key, header.file_id)
    rewrapped = dataclasses.replace(header, key_arn=ARN + "-2", wrapped_key=b"\x02" * 150)
    new_backing = rewrapped.encode(keys) + backing[HEADER_SIZE:]
    assert FileHeader.parse(new_backing).wrapped_key == b"\x02" * 150
    assert open_file(new_backing, data_key) == plaintext


def test_header_fields_that_do_not_fit_are_refused() -> None:
    arn = "a" * 300
    assert FileHeader.new(arn, bytes(143)).encode(FileKeys.derive(bytes(32), bytes(16)))
    with pytest.raises(
        HeaderOverflowError,
        match=r"^key arn \(300 bytes\) and wrapped key \(144 bytes\) do not fit in the file"
        r" header: at most 443 bytes together$",
    ):
        FileHeader.new(arn, bytes(144))
    assert issubclass(HeaderOverflowError, EnvfsError)
    with pytest.raises(ValueError, match=r"^key arn and wrapped key must not be empty$"):
        FileHeader.new("", WRAPPED)
    with pytest.raises(ValueError, match=r"^key arn and wrapped key must not be empty$"):
        FileHeader.new(ARN, b"")
    with pytest.raises(ValueError, match=r"^block shift must be 12\.\.20, got 21$"):
        FileHeader.new(ARN, WRAPPED, 21)
    with pytest.raises(ValueError, match=r"^file id must be 16 bytes, got 15$"):
        FileHeader(bytes(15), 14, ARN, WRAPPED)


def test_file_keys() -> None:
    data_key, file_id = os.urandom(32), os.urandom(16)
    keys = FileKeys.derive(data_key, file_id)
    assert keys.header_key == hkdf(data_key, b"envfs v1 header", salt=file_id)
    content_key = hkdf(data_key, b"envfs v1 content", salt=file_id)
    assert content_key not in (keys.header_key, data_key)
    sealed = fmt.encrypt_block(keys, file_id, 0, b"x", 12)
    aad = b"envfs\x00\x01" + file_id + bytes(8)
    assert Aead(content_key).open(sealed, aad) == b"x"
    assert repr(keys) == "FileKeys(<redacted>)"
    with pytest.raises(ValueError, match=r"^data key must be 32 bytes, got 16$"):
        FileKeys.derive(bytes(16), file_id)
    with pytest.raises(ValueError, match=r"^file id must be 16 bytes, got 0$"):
        FileKeys.derive(data_key, b"")


def test_error_messages_hold_no_plaintext_or_keys() -> None:
    plaintext = b"top secret payload" * 300
    backing, data_key, _ = make_file(plaintext, 12)
    raw = bytearray(backing)
    raw[HEADER_SIZE + 20] ^= 1
    with pytest.raises(IntegrityError) as info:
        open_file(bytes(raw), data_key)
    message = str(info.value)
    assert "secret" not in message
    assert data_key.hex() not in message


# --- golden vectors --------------------------------------------------------------------------


def golden() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(GOLDEN.read_text())
    return document


def test_golden_vectors_still_decrypt() -> None:
    document = golden()
    assert document["format_version"] == 1
    assert document["header_size"] == HEADER_SIZE
    assert len(document["vectors"]) >= 6
    for vector in document["vectors"]:
        backing = bytes.fromhex(vector["backing"])
        data_key = bytes.fromhex(vector["data_key"])
        file_id = bytes.fromhex(vector["file_id"])
        plaintext = bytes.fromhex(vector["plaintext"])
        shift = vector["block_shift"]
        header = FileHeader.parse(backing)
        assert header == FileHeader(
            file_id, shift, vector["key_arn"], bytes.fromhex(vector["wrapped_key"])
        )
        keys = FileKeys.derive(data_key, file_id)
        assert keys.header_key.hex() == vector["header_key"]
        header.verify(backing, keys)
        assert header.encode(keys) == backing[:HEADER_SIZE]
        assert len(backing) == vector["backing_size"] == fmt.backing_size(len(plaintext), shift)
        assert fmt.plaintext_size(len(backing), shift) == vector["plaintext_size"]
        assert fmt.decrypt_file(backing, keys) == plaintext
        # Independently of format.py: block 0 under the content key and the documented AAD.
        first = backing[HEADER_SIZE : HEADER_SIZE + (1 << shift) + 28]
        aad = b"envfs" + b"\x00\x01" + file_id + (0).to_bytes(8, "big")
        content = Aead(bytes.fromhex(vector["content_key"]))
        assert content.open(first, aad) == plaintext[: 1 << shift]


def test_golden_broken_files_are_refused() -> None:
    document = golden()
    keys_by_name = {v["name"]: bytes.fromhex(v["data_key"]) for v in document["vectors"]}
    errors = {
        "IntegrityError": IntegrityError,
        "UnsupportedFormatError": UnsupportedFormatError,
        "NotEnvfsFileError": NotEnvfsFileError,
    }
    assert len(document["broken"]) >= 10
    for case in document["broken"]:
        backing = bytes.fromhex(case["backing"])
        error, match = errors[case["error"]], case["match"]
        if case["name"] == "version-2":
            # Made when version 1 was the only one: an empty version 1 file with its version
            # field set to 2. Version 2 exists now, so it is refused by the version 2 header
            # MAC (the stored MAC is version 1's, under other keys) instead.
            assert match == r"^unsupported format version 2 \(this envfs reads version 1\)$"
            error, match = IntegrityError, r"^header authentication failed$"
        with pytest.raises(error, match=match):
            open_file(backing, keys_by_name[case["data_key_of"]])


# --- the sparse flag and holes -------------------------------------------------------------


def test_the_sparse_flag_is_authenticated_and_round_trips() -> None:
    keys = FileKeys.derive(bytes(32), bytes(16))
    header = FileHeader(bytes(16), 12, ARN, WRAPPED, flags=fmt.FLAG_SPARSE)
    raw = header.encode(keys)
    assert raw[12:16] == b"\0\0\0\x02"
    parsed = FileHeader.parse_verified(raw, keys)
    assert parsed == header and parsed.sparse
    plain = FileHeader(bytes(16), 12, ARN, WRAPPED)
    assert not plain.sparse
    # Setting or clearing the flag without the key breaks the MAC.
    forged = raw[:15] + b"\0" + raw[16:]
    with pytest.raises(IntegrityError, match=r"^header authentication failed$"):
        FileHeader.parse_verified(forged, keys)
    with pytest.raises(ValueError, match=r"^unknown header flags 0x00000001$"):
        FileHeader(bytes(16), 12, ARN, WRAPPED, flags=1)


def test_holes_read_as_zeros_only_in_a_sparse_file() -> None:
    shift, block = 12, 1 << 12
    keys = FileKeys.derive(bytes(32), bytes(16))
    sealed = fmt.encrypt_blocks(keys, bytes(16), 0, b"a" * (2 * block + 5), shift, final=True)
    stride = block + 28
    holey = bytes(stride) + sealed[stride:]  # block 0 zeroed: a hole
    assert fmt.decrypt_blocks(keys, bytes(16), 0, holey, shift, holes=True) == (
        bytes(block) + b"a" * (block + 5)
    )
    assert fmt.decrypt_block(keys, bytes(16), 0, bytes(stride), shift, holes=True) == bytes(block)
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        fmt.decrypt_blocks(keys, bytes(16), 0, holey, shift)
    # Not holes: a short run of zeros (a final block), or a whole block with one byte set.
    with pytest.raises(IntegrityError, match=r"^block 2 failed authentication$"):
        fmt.decrypt_blocks(keys, bytes(16), 2, bytes(33), shift, holes=True)
    almost = bytearray(stride)
    almost[-1] = 1
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        fmt.decrypt_block(keys, bytes(16), 0, bytes(almost), shift, holes=True)


def test_golden_sparse_vectors_and_forged_ends() -> None:
    document = json.loads((GOLDEN.parent / "format-v1-sparse.json").read_text())
    assert document["format_version"] == 1
    keys_by_name = {}
    for vector in document["vectors"]:
        backing = bytes.fromhex(vector["backing"])
        data_key = bytes.fromhex(vector["data_key"])
        keys_by_name[vector["name"]] = data_key
        header = FileHeader.parse(backing)
        assert header.flags == vector["flags"]
        assert header.file_id.hex() == vector["file_id"]
        assert fmt.plaintext_size(len(backing), header.block_shift) == vector["plaintext_size"]
        assert open_file(backing, data_key) == bytes.fromhex(vector["plaintext"])
    holey = [v for v in document["vectors"] if v["flags"] & fmt.FLAG_SPARSE]
    assert len(holey) >= 2
    assert len(document["broken"]) >= 8
    for case in document["broken"]:
        with pytest.raises(IntegrityError, match=case["match"]):
            open_file(bytes.fromhex(case["backing"]), keys_by_name[case["data_key_of"]])
