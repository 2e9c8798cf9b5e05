"""Ciphertext blobs: what Encrypt and GenerateDataKey return, self-describing and versioned.

Layout of a version-1 blob (integers big-endian)::

    offset  size  field
    0       1     format version = 0x01
    1       16    key id (the UUID's 16 bytes)
    17      4     key version (uint32, 1 = the key's first material)
    21      16    salt (random)
    37      12    nonce (random)
    49      n     ciphertext (n = plaintext length)
    49+n    16    GCM tag

The blob key is HKDF-SHA256(key material, salt, info "envfs-kms v1 blob"): a fresh key per
blob, so random nonces never meet the birthday bound of one key. The additional
authenticated data is::

    "envfs-kms v1 blob" || u32 len(region) || region || blob[0:37] || canonical(context)

so a blob moved to another region, re-labelled with another key or version, or presented
with another encryption context fails to authenticate.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from envfs import crypto
from envfs.errors import IntegrityError, InvalidCiphertextException
from envfs.kms.model import EncryptionContext, encode_context

BLOB_VERSION = 1
_HEAD = struct.Struct(">B16sI16s")
HEAD_SIZE = _HEAD.size  # 37
OVERHEAD = HEAD_SIZE + crypto.SEAL_OVERHEAD  # 65
_INFO = b"envfs-kms v1 blob"


@dataclass(frozen=True)
class BlobHeader:
    key_id: str
    key_version: int
    salt: bytes

    def encode(self) -> bytes:
        return _HEAD.pack(BLOB_VERSION, _uuid_bytes(self.key_id), self.key_version, self.salt)


def _uuid_bytes(key_id: str) -> bytes:
    """A key id's 16 bytes (as ``uuid.UUID(key_id).bytes`` for the canonical form)."""
    raw = bytes.fromhex(key_id.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a key id: {key_id!r}")
    return raw


def _uuid_text(raw: bytes) -> str:
    """The canonical text of a key id (as ``str(uuid.UUID(bytes=raw))``)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_blob(blob: bytes) -> BlobHeader:
    """Read a blob's header without decrypting anything.

    Raises:
        InvalidCiphertextException: too short or of an unknown format version.
    """
    if len(blob) < OVERHEAD or blob[0] != BLOB_VERSION:
        raise InvalidCiphertextException("the ciphertext blob is not valid")
    _, key_bytes, key_version, salt = _HEAD.unpack_from(blob)
    if key_version < 1:
        raise InvalidCiphertextException("the ciphertext blob is not valid")
    return BlobHeader(_uuid_text(key_bytes), key_version, salt)


def _aad(region: str, head: bytes, context: EncryptionContext) -> bytes:
    region_bytes = region.encode()
    return (
        _INFO + struct.pack(">I", len(region_bytes)) + region_bytes + head + encode_context(context)
    )


def seal_blob(
    material: bytes,
    region: str,
    key_id: str,
    key_version: int,
    plaintext: bytes,
    context: EncryptionContext,
) -> bytes:
    """Encrypt ``plaintext`` under one version of a master key."""
    header = BlobHeader(key_id, key_version, crypto.random_bytes(16))
    head = header.encode()
    blob_key = crypto.hkdf(material, _INFO, salt=header.salt)
    return head + crypto.seal(blob_key, plaintext, _aad(region, head, context))


def open_blob(
    material: bytes, region: str, header: BlobHeader, blob: bytes, context: EncryptionContext
) -> bytes:
    """Decrypt a blob whose header was parsed with :func:`parse_blob`.

    Raises:
        InvalidCiphertextException: tampered blob, wrong context, region or material.
    """
    blob_key = crypto.hkdf(material, _INFO, salt=header.salt)
    try:
        return crypto.open_sealed(
            blob_key, blob[HEAD_SIZE:], _aad(region, blob[:HEAD_SIZE], context)
        )
    except IntegrityError:
        raise InvalidCiphertextException("the ciphertext blob is not valid") from None
