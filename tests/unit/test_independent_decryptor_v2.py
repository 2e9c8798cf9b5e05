"""An independent reader of format version 2, written from docs/format.md alone.

Nothing of envfs is imported here: only ``cryptography``, ``hashlib``, ``hmac`` and the
standard library, following *Version 2* (and the version 1 sections it refers to) step by
step. It must read every valid and rewrapped file of ``tests/golden/format-v2.json`` to its
plaintext, given the data key (unwrapping it is the key service's business, not the
format's), and refuse every broken one for the reason the vectors give. If this test needs a
fact the document does not give, the document is incomplete.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VECTORS = Path(__file__).resolve().parents[1] / "golden" / "format-v2.json"


class Refused(Exception):
    """The reader refuses a file (the message says why, coarsely)."""


def hkdf(key: bytes, info: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def parse(raw: bytes) -> dict[str, Any]:
    """The header's fields, every structural check made (nothing authenticated yet)."""
    if raw[:8] != b"\x89envfs\r\n":
        raise Refused("not an envfs file (bad magic)")
    (version,) = struct.unpack(">H", raw[8:10])
    if version not in (1, 2):
        raise Refused(f"unsupported format version {version}")
    if len(raw) < 512:
        raise Refused("truncated header")
    suite, flags = struct.unpack(">HI", raw[10:16])
    shift = raw[32]
    if suite != 1:
        raise Refused(f"unsupported cipher suite {suite}")
    if flags & ~0x2:
        raise Refused(f"unsupported header flags 0x{flags:08x}")
    if not 12 <= shift <= 20:
        raise Refused(f"unsupported block size 2**{shift}")
    (arn_len,) = struct.unpack(">H", raw[33:35])
    if arn_len == 0 or 35 + arn_len > 478:  # room for the wrapped key's length field
        raise Refused("malformed header: key arn length")
    at = 35 + arn_len
    (wrapped_len,) = struct.unpack(">H", raw[at : at + 2])
    if wrapped_len == 0 or at + 2 + wrapped_len > 480:
        raise Refused("malformed header: wrapped key length")
    if any(raw[at + 2 + wrapped_len : 480]):
        raise Refused("malformed header: nonzero padding")
    try:
        key_arn = raw[35:at].decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("malformed header: key arn is not utf-8") from None
    return {
        "version": version,
        "flags": flags,
        "file_id": raw[16:32],
        "shift": shift,
        "key_arn": key_arn,
        "wrapped_key": raw[at + 2 : at + 2 + wrapped_len],
    }


def read_v2(raw: bytes, data_key: bytes) -> bytes:
    """The plaintext of a version 2 backing file whose (unwrapped) data key is given."""
    header = parse(raw)
    if header["version"] != 2:
        raise Refused("not version 2")  # a version 2 volume's reader refuses version 1
    file_id, shift = header["file_id"], header["shift"]
    header_key = hkdf(data_key, b"envfs v2 header", salt=file_id)
    content = AESGCM(hkdf(data_key, b"envfs v2 content", salt=file_id))
    mac = hmac.new(header_key, raw[0:33], hashlib.sha256).digest()
    if not hmac.compare_digest(mac, raw[480:512]):
        raise Refused("header authentication failed")
    block, stride = 1 << shift, (1 << shift) + 28
    whole, rest = divmod(len(raw) - 512, stride)
    if len(raw) < 540 or rest < 28:
        raise Refused(f"impossible backing size {len(raw)} for {block}-byte blocks")
    size = whole * block + rest - 28
    out = []
    for index in range(size // block + 1):  # the final block too, even when empty
        sealed = raw[512 + index * stride : 512 + (index + 1) * stride]
        aad = b"envfs" + struct.pack(">H", 2) + file_id + struct.pack(">Q", index)
        try:
            out.append(content.decrypt(sealed[:12], sealed[12:], aad))
        except InvalidTag:
            if header["flags"] & 0x2 and len(sealed) == stride and not any(sealed):
                out.append(bytes(block))  # a hole
                continue
            raise Refused(f"block {index} failed authentication") from None
    plaintext = b"".join(out)
    assert len(plaintext) == size
    return plaintext


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(VECTORS.read_text())
    return loaded


def test_the_v2_vectors_read_from_the_document_alone() -> None:
    doc = document()
    assert len(doc["vectors"]) >= 7
    for vector in doc["vectors"]:
        raw = bytes.fromhex(vector["backing"])
        data_key, file_id = bytes.fromhex(vector["data_key"]), bytes.fromhex(vector["file_id"])
        assert hkdf(data_key, b"envfs v2 header", file_id).hex() == vector["header_key"]
        assert hkdf(data_key, b"envfs v2 content", file_id).hex() == vector["content_key"]
        header = parse(raw)
        assert (header["key_arn"], header["wrapped_key"].hex()) == (
            vector["key_arn"],
            vector["wrapped_key"],
        )
        assert (header["flags"], header["shift"]) == (vector["flags"], vector["block_shift"])
        assert read_v2(raw, data_key).hex() == vector["plaintext"], vector["name"]


def test_rewrapped_v2_headers_read_from_the_document_alone() -> None:
    doc = document()
    by_name = {v["name"]: v for v in doc["vectors"]}
    for case in doc["rewrapped"]:
        original = by_name[case["of"]]
        raw = bytes.fromhex(case["backing"])
        old = bytes.fromhex(original["backing"])
        assert raw[:33] == old[:33] and raw[480:] == old[480:]  # only bytes 33..479 differ
        assert parse(raw)["wrapped_key"].hex() == case["wrapped_key"]
        plaintext = read_v2(raw, bytes.fromhex(original["data_key"]))
        assert plaintext.hex() == original["plaintext"]
    for case in doc["unwrap_refuses"]:  # the format alone accepts these
        own = by_name[case["data_key_of"]]
        plaintext = read_v2(bytes.fromhex(case["backing"]), bytes.fromhex(own["data_key"]))
        assert plaintext.hex() == by_name[case["plaintext_of"]]["plaintext"]


def test_broken_v2_files_are_refused_from_the_document_alone() -> None:
    doc = document()
    keys = {v["name"]: bytes.fromhex(v["data_key"]) for v in doc["vectors"]}
    assert len(doc["broken"]) >= 15
    for case in doc["broken"]:
        with pytest.raises(Refused) as info:
            read_v2(bytes.fromhex(case["backing"]), keys[case["data_key_of"]])
        reason = str(info.value)
        if case["name"] == "v1-header-over-v2-blocks":
            assert reason == "not version 2"
            continue
        # The reasons envfs gives, as coarse as the document's: the same check failed.
        expected = re.sub(r"\\", "", case["match"].lstrip("^").rstrip("$"))
        words = 4 if expected.startswith("unsupported") else 5
        assert reason.split()[:words] == expected.split()[:words], case["name"]
