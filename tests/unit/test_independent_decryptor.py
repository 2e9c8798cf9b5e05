"""An independent decryptor, written from docs/format.md and docs/kms.md alone.

Nothing of envfs is imported here: only ``cryptography``, ``sqlite3`` and the standard
library, following the documents step by step. It must read every file of the golden
volume (its key store included) to the expected plaintext, and refuse every file of the
golden broken volume, for the reason the volume says. If this test needs a fact the docs
do not give, the docs are incomplete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import struct
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


class Refused(Exception):
    """The decryptor refuses a file (the message says why, coarsely)."""


def hkdf(key: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


# --- kms.md: the store (§7) and the blobs (§6) ------------------------------------------------


def canonical(context: dict[str, str]) -> bytes:
    out = u32(len(context))
    for key in sorted(context, key=lambda k: k.encode()):
        k, v = key.encode(), context[key].encode()
        out += u32(len(k)) + k + u32(len(v)) + v
    return out


class Store:
    """A region's key store, read the documented way."""

    def __init__(self, directory: Path, region: str) -> None:
        self.region = region
        self.root_key = base64.b64decode((directory / "root.key").read_bytes())
        self.db = sqlite3.connect(f"file:{directory / 'keys.db'}?mode=ro", uri=True)

    def material(self, key_id: str, version: int) -> bytes:
        row = self.db.execute(
            "SELECT material FROM key_versions WHERE key_id=? AND version=?", (key_id, version)
        ).fetchone()
        if row is None:
            raise Refused("no such key version")
        sealed = row[0]
        region = self.region.encode()
        aad = b"envfs-kms v1 material" + u32(len(region)) + region
        aad += u32(len(key_id.encode())) + key_id.encode() + u32(version)
        seal_key = hkdf(self.root_key, b"envfs-kms v1 material seal")
        return AESGCM(seal_key).decrypt(sealed[:12], sealed[12:], aad)

    def decrypt(self, blob: bytes, key_arn: str, context: dict[str, str]) -> bytes:
        if len(blob) < 65 or blob[0] != 1:
            raise Refused("the ciphertext blob is not valid")
        raw_id = blob[1:17].hex()
        key_id = f"{raw_id[:8]}-{raw_id[8:12]}-{raw_id[12:16]}-{raw_id[16:20]}-{raw_id[20:]}"
        if not key_arn.endswith(f":key/{key_id}"):
            raise Refused("the blob is under another key than the header names")
        (version,) = struct.unpack(">I", blob[17:21])
        blob_key = hkdf(self.material(key_id, version), b"envfs-kms v1 blob", salt=blob[21:37])
        region = self.region.encode()
        aad = b"envfs-kms v1 blob" + u32(len(region)) + region + blob[:37] + canonical(context)
        try:
            return AESGCM(blob_key).decrypt(blob[37:49], blob[49:], aad)
        except InvalidTag:
            raise Refused("its data key does not unwrap") from None


# --- format.md ----------------------------------------------------------------------------


def read_file(raw: bytes, volume: dict[str, object], store: Store) -> bytes:
    """The plaintext of one backing file, every check of format.md made."""
    if raw[:8] != b"\x89envfs\r\n":
        raise Refused("not an envfs file")
    version, suite, flags = struct.unpack(">HHI", raw[8:16])
    if version != 1 or suite != 1 or flags & ~0x2:
        raise Refused("unsupported format")
    if len(raw) < 512:
        raise Refused("truncated header")
    file_id, shift = raw[16:32], raw[32]
    if not 12 <= shift <= 20:
        raise Refused("unsupported format")
    (arn_len,) = struct.unpack(">H", raw[33:35])
    key_arn = raw[35 : 35 + arn_len].decode()
    (wrapped_len,) = struct.unpack(">H", raw[35 + arn_len : 37 + arn_len])
    wrapped = raw[37 + arn_len : 37 + arn_len + wrapped_len]
    accepted = [volume["key_arn"], *volume.get("previous_key_arns", [])]  # type: ignore[list-item]
    if key_arn not in accepted:
        raise Refused("which the volume does not accept")
    context = {"envfs:volume": str(volume["volume_id"]), "envfs:file": file_id.hex()}
    data_key = store.decrypt(wrapped, key_arn, context)
    header_key = hkdf(data_key, b"envfs v1 header", salt=file_id)
    content_key = AESGCM(hkdf(data_key, b"envfs v1 content", salt=file_id))
    mac = hmac.HMAC(header_key, hashes.SHA256())
    mac.update(raw[:480])
    try:
        mac.verify(raw[480:512])
    except Exception:
        raise Refused("header authentication failed") from None
    block, stride = 1 << shift, (1 << shift) + 28
    whole, rest = divmod(len(raw) - 512, stride)
    if len(raw) < 540 or rest < 28:
        raise Refused("impossible backing size")
    size = whole * block + rest - 28
    out = b""
    for index in range(size // block + 1):  # the final block too, even when empty
        sealed = raw[512 + index * stride : 512 + (index + 1) * stride]
        aad = b"envfs" + struct.pack(">H", 1) + file_id + struct.pack(">Q", index)
        try:
            out += content_key.decrypt(sealed[:12], sealed[12:], aad)
        except InvalidTag:
            if flags & 0x2 and len(sealed) == stride and not any(sealed):
                out += bytes(block)  # a hole
                continue
            raise Refused(f"block {index} failed authentication") from None
    assert len(out) == size
    return out


def open_volume(folder: Path) -> tuple[dict[str, object], Store, dict[str, object]]:
    expected = json.loads((folder / "expected.json").read_text())
    volume = json.loads((folder / "backing" / ".envfs-volume.json").read_text())
    store = Store(folder / "kms" / str(volume["region"]), str(volume["region"]))
    return volume, store, expected


def test_the_golden_volume_reads_from_the_documents_alone() -> None:
    volume, store, expected = open_volume(GOLDEN / "volume-v1")
    files = expected["files"]
    assert isinstance(files, dict) and len(files) >= 7
    for rel, want in files.items():
        plain = read_file((GOLDEN / "volume-v1" / "backing" / rel).read_bytes(), volume, store)
        assert (len(plain), hashlib.sha256(plain).hexdigest()) == (want["size"], want["sha256"])


def test_the_golden_broken_volume_is_refused_from_the_documents_alone() -> None:
    volume, store, expected = open_volume(GOLDEN / "broken-v1")
    good, broken = expected["good"], expected["broken"]
    assert isinstance(good, dict) and isinstance(broken, dict)
    for rel, want in good.items():
        plain = read_file((GOLDEN / "broken-v1" / "backing" / rel).read_bytes(), volume, store)
        assert hashlib.sha256(plain).hexdigest() == want["sha256"]
    for rel, want in broken.items():
        with pytest.raises(Refused) as info:
            read_file((GOLDEN / "broken-v1" / "backing" / rel).read_bytes(), volume, store)
        assert want["warning"] in str(info.value), rel
