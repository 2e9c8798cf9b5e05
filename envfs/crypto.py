"""The only importer of ``cryptography.hazmat``: the primitives envfs is allowed to use.

- AEAD: AES-256-GCM (or AES-128-GCM for 16-byte keys) with a fresh random 96-bit nonce
  for every seal. Sealed output is ``nonce (12) || ciphertext || tag (16)``.
- Deterministic AEAD: AES-SIV (RFC 5297) with a 64-byte key (AES-256), for what must encrypt
  the same way every time so that it can be looked up (file names). It reveals only
  whether two plaintexts with the same associated data are equal. Output is
  ``synthetic IV (16) || ciphertext``.
- HKDF-SHA256 to derive sub-keys, scrypt for passphrases, HMAC-SHA256 for chains.
- Randomness only from ``os.urandom`` / ``secrets``.

Failures to authenticate raise :class:`envfs.errors.IntegrityError`, which never says
which check failed (same stance as pyca's ``InvalidTag``).
"""

from __future__ import annotations

import hmac as _hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _chmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from envfs.errors import IntegrityError

Buffer = bytes | bytearray | memoryview

NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE
KEY_SIZE = 32
SIV_KEY_SIZE = 64
SIV_OVERHEAD = 16

# scrypt cost for passphrase-derived root keys: 2**17 * 8 * 128 B = 128 MiB, ~0.3 s here.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1


def random_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the kernel's CSPRNG."""
    return os.urandom(n)


class Aead:
    """AES-GCM under one key, sealing with a fresh random nonce every time.

    Holding the object avoids re-expanding the key schedule on hot paths (file blocks).
    """

    __slots__ = ("_aesgcm",)

    def __init__(self, key: bytes) -> None:
        if len(key) not in (16, 32):
            raise ValueError("AES-GCM key must be 16 or 32 bytes")
        self._aesgcm = AESGCM(key)

    def seal(self, plaintext: Buffer, aad: Buffer) -> bytes:
        """Encrypt and authenticate; returns ``nonce || ciphertext || tag``."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aesgcm.encrypt(nonce, plaintext, aad)

    def open(self, sealed: Buffer, aad: Buffer) -> bytes:
        """Verify and decrypt ``nonce || ciphertext || tag``.

        Raises:
            IntegrityError: the data, the AAD or the key do not match.
        """
        view = memoryview(sealed)
        if len(view) < SEAL_OVERHEAD:
            raise IntegrityError("authentication failed")
        try:
            return self._aesgcm.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None


class Siv:
    """AES-SIV under one 64-byte key: the same plaintext and associated data always give
    the same output."""

    __slots__ = ("_siv",)

    def __init__(self, key: bytes) -> None:
        if len(key) != SIV_KEY_SIZE:
            raise ValueError("AES-SIV key must be 64 bytes")
        self._siv = AESSIV(key)

    def seal(self, plaintext: bytes, associated: list[bytes]) -> bytes:
        """Encrypt and authenticate; returns ``synthetic IV || ciphertext``."""
        return self._siv.encrypt(plaintext, associated)

    def open(self, sealed: bytes, associated: list[bytes]) -> bytes:
        """Verify and decrypt.

        Raises:
            IntegrityError: the data, the associated data or the key do not match.
        """
        if len(sealed) < SIV_OVERHEAD:
            raise IntegrityError("authentication failed")
        try:
            return self._siv.decrypt(sealed, associated)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """One-shot :meth:`Aead.seal`."""
    return Aead(key).seal(plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """One-shot :meth:`Aead.open`."""
    return Aead(key).open(sealed, aad)


def hkdf(key: bytes, info: bytes, length: int = KEY_SIZE, salt: bytes | None = None) -> bytes:
    """Derive ``length`` bytes from ``key`` with HKDF-SHA256, separated by ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def scrypt(
    passphrase: bytes,
    salt: bytes,
    n: int = SCRYPT_N,
    r: int = SCRYPT_R,
    p: int = SCRYPT_P,
    length: int = KEY_SIZE,
) -> bytes:
    """Derive a key from a passphrase with scrypt."""
    return Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(passphrase)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under ``key``."""
    mac = _chmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def sha256(data: bytes) -> bytes:
    """SHA-256 digest of ``data``."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare two MACs without leaking where they differ."""
    return _hmac.compare_digest(a, b)
