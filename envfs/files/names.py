"""Encrypted names of format version 2: names, directory ids, long names, symlink targets.

Specified in ``docs/format.md``, *Version 2: encrypted names*; used by :mod:`.dirnames`.

- A volume's name keys come from its authentication data key (the ``auth_key`` of the
  volume file, unwrapped by the key service) with HKDF-SHA256, salted with the volume id.
- Every backing directory has a random 16-byte id, kept in its ``.envfs-dir`` file (MAC'd
  with the volume id). A name is encrypted with AES-SIV, the directory id as associated
  data, after padding to a multiple of 32 bytes; deterministic, so a lookup needs no
  listing, and bound to its directory, so an entry moved elsewhere does not decrypt.
- The encoded name (base64url, no padding) is the backing name when it fits 255 bytes;
  longer ones are stored as ``.envfs-L`` + the base64url SHA-256 of the encoded name, with
  the encoded name in a name file beside it.
- Symlink targets are AES-GCM sealed (random nonce) under the metadata key; so are ``user.``
  xattr values, bound to their encrypted name, which is deterministic as file names are.

Everything is pure and synchronous: bytes in, bytes out; a failure to authenticate is an
``IntegrityError``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import struct
import uuid
from dataclasses import dataclass

from envfs import crypto
from envfs.errors import IntegrityError

NAME_MAX = 255  # bytes, in the plaintext view and in the backing folder
PAD = 32
# Padded names up to this many bytes give encoded names that fit a backing name:
# ceil(4 * (160 + 16) / 3) = 235 <= 255, while 192 would give 278.
SHORT_PADDED_MAX = 160

DIR_FILE = b".envfs-dir"
LONG_PREFIX = b".envfs-L"
LONG_NAME_SUFFIX = b".name"
DIR_MAGIC = b"envfsDIR"
DIR_VERSION = 2
DIR_ID_SIZE = 16
_DIR_HEAD = struct.Struct(">8sH16s")
DIR_FILE_SIZE = _DIR_HEAD.size + 32

_NAME_AD = b"envfs v2 name"
_TARGET_AD = b"envfs v2 symlink"
_XATTR_AD = b"envfs v2 xattr"
XATTR_PREFIX = b"user.envfs.x."
_NAME_KEY_INFO = b"envfs v2 names"
_DIR_MAC_INFO = b"envfs v2 directory ids"
_META_INFO = b"envfs v2 metadata"


@dataclass(frozen=True)
class NameKeys:
    """The secrets of a volume's names (never stored; see ``derive``)."""

    name_key: bytes  # AES-SIV, 64 bytes
    dir_mac_key: bytes  # HMAC-SHA256, 32 bytes
    meta_key: bytes  # AES-256-GCM, 32 bytes

    @classmethod
    def derive(cls, volume_secret: bytes, volume_id: str) -> NameKeys:
        """The keys of the volume ``volume_id`` (a UUID string) whose authentication data
        key is ``volume_secret``."""
        salt = uuid.UUID(volume_id).bytes
        return cls(
            crypto.hkdf(volume_secret, _NAME_KEY_INFO, crypto.SIV_KEY_SIZE, salt=salt),
            crypto.hkdf(volume_secret, _DIR_MAC_INFO, salt=salt),
            crypto.hkdf(volume_secret, _META_INFO, salt=salt),
        )

    def __repr__(self) -> str:
        return "NameKeys(<secret>)"


# --- padding ---------------------------------------------------------------------------


def pad(data: bytes) -> bytes:
    """``data`` and 1 to 32 bytes each holding their count, to a multiple of 32 bytes."""
    count = PAD - len(data) % PAD
    return data + bytes([count]) * count


def unpad(padded: bytes) -> bytes:
    """Undo :func:`pad`.

    Raises:
        IntegrityError: the padding is not one :func:`pad` writes.
    """
    count = padded[-1] if padded else 0
    if not padded or len(padded) % PAD or not 1 <= count <= PAD:
        raise IntegrityError("bad name padding")
    if padded[-count:] != bytes([count]) * count:
        raise IntegrityError("bad name padding")
    return padded[:-count]


def _encode(sealed: bytes) -> bytes:
    return base64.urlsafe_b64encode(sealed).rstrip(b"=")


def _decode(encoded: bytes, what: str) -> bytes:
    """Undo :func:`_encode`, accepting only the one encoding it writes.

    Raises:
        IntegrityError: not base64url without padding, or not in its shortest form.
    """
    try:
        sealed = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise IntegrityError(f"not an encrypted {what}") from None
    if _encode(sealed) != encoded:
        raise IntegrityError(f"not an encrypted {what}")
    return sealed


# --- names -----------------------------------------------------------------------------


def check_name(name: bytes) -> None:
    """Raise the errno-carrying error a bad plaintext name gets on ext4.

    Raises:
        OSError: EINVAL (empty, ``.``, ``..``, a ``/`` or NUL); ENAMETOOLONG (over 255 bytes).
    """
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "invalid name")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "file name too long")


def encrypt_name(siv: crypto.Siv, dir_id: bytes, name: bytes) -> bytes:
    """The encoded (base64url, ASCII) encryption of ``name`` in the directory ``dir_id``."""
    check_name(name)
    return _encode(siv.seal(pad(name), [_NAME_AD, dir_id]))


def decrypt_name(siv: crypto.Siv, dir_id: bytes, encoded: bytes) -> bytes:
    """The plaintext name that :func:`encrypt_name` encoded as ``encoded`` in ``dir_id``.

    Raises:
        IntegrityError: not an encoded name of this directory (another directory's, edited,
            or not envfs's at all).
    """
    name = unpad(siv.open(_decode(encoded, "name"), [_NAME_AD, dir_id]))
    try:
        check_name(name)
    except OSError:
        raise IntegrityError("not a valid name") from None
    return name


def backing_name(encoded: bytes) -> bytes:
    """The backing folder's name for an encoded name: itself if it fits, else its long
    form (whose name file then holds ``encoded``)."""
    if len(encoded) <= NAME_MAX:
        return encoded
    digest = crypto.sha256(encoded)
    return LONG_PREFIX + _encode(digest)


def is_long(backing: bytes) -> bool:
    """Whether a backing name is a long name's entry (not its name file)."""
    return (
        backing.startswith(LONG_PREFIX)
        and not backing.endswith(LONG_NAME_SUFFIX)
        and len(backing) == len(LONG_PREFIX) + 43
    )


def name_file(backing: bytes) -> bytes:
    """The name file of a long name's entry."""
    return backing + LONG_NAME_SUFFIX


def check_long(backing: bytes, encoded: bytes) -> None:
    """Check that a name file's content is the encoded name of the entry ``backing``.

    Raises:
        IntegrityError: it is not (a swapped or edited name file).
    """
    if len(encoded) <= NAME_MAX or backing_name(encoded) != backing:
        raise IntegrityError("the long name's name file does not belong to it")


# --- directory ids ---------------------------------------------------------------------


def new_dir_id() -> bytes:
    return crypto.random_bytes(DIR_ID_SIZE)


def encode_dir_file(keys: NameKeys, dir_id: bytes, volume_id: str) -> bytes:
    """The content of a directory's ``.envfs-dir`` file."""
    head = _DIR_HEAD.pack(DIR_MAGIC, DIR_VERSION, dir_id)
    return head + crypto.hmac_sha256(keys.dir_mac_key, head + volume_id.encode())


def parse_dir_file(keys: NameKeys, data: bytes, volume_id: str) -> bytes:
    """The directory id a ``.envfs-dir`` file holds.

    Raises:
        IntegrityError: not a directory id file of this volume, or altered.
    """
    if len(data) != DIR_FILE_SIZE:
        raise IntegrityError("malformed directory id file")
    head, mac = data[: _DIR_HEAD.size], data[_DIR_HEAD.size :]
    magic, version, dir_id = _DIR_HEAD.unpack(head)
    if magic != DIR_MAGIC or version != DIR_VERSION:
        raise IntegrityError("malformed directory id file")
    expected = crypto.hmac_sha256(keys.dir_mac_key, head + volume_id.encode())
    if not crypto.constant_time_equal(mac, expected):
        raise IntegrityError("the directory id file is not authentic")
    return bytes(dir_id)


# --- symlink targets -------------------------------------------------------------------


def encrypt_target(meta: crypto.Aead, target: bytes) -> bytes:
    """The backing symlink target (base64url) of the plaintext ``target``."""
    if not target or b"\0" in target:
        raise OSError(errno.EINVAL, "invalid symlink target")
    return _encode(meta.seal(pad(target), _TARGET_AD))


def decrypt_target(meta: crypto.Aead, encoded: bytes) -> bytes:
    """The plaintext target of a backing symlink.

    Raises:
        IntegrityError: not a target :func:`encrypt_target` wrote with this key.
    """
    return unpad(meta.open(_decode(encoded, "symlink target"), _TARGET_AD))


# --- xattrs ------------------------------------------------------------------------------


def encrypt_xattr_name(siv: crypto.Siv, name: bytes) -> bytes:
    """The backing xattr name of the plaintext view's ``user.NAME``.

    Raises:
        OSError: EINVAL (not a ``user.`` name); ERANGE (longer than 164 bytes, whose
            encryption would pass the backing folder's 255).
    """
    if not name.startswith(b"user.") or len(name) == len(b"user.") or b"\0" in name:
        raise OSError(errno.EINVAL, "invalid xattr name")
    sealed = siv.seal(pad(name[len(b"user.") :]), [_XATTR_AD, b""])
    backing = XATTR_PREFIX + _encode(sealed)
    if len(backing) > NAME_MAX:  # names of up to 164 bytes fit
        raise OSError(errno.ERANGE, "xattr name too long once encrypted")
    return backing


def decrypt_xattr_name(siv: crypto.Siv, backing: bytes) -> bytes:
    """The plaintext view's name of a backing xattr :func:`encrypt_xattr_name` wrote.

    Raises:
        IntegrityError: not one of envfs's encrypted xattr names, or altered.
    """
    if not backing.startswith(XATTR_PREFIX):
        raise IntegrityError("not an encrypted xattr name")
    sealed = _decode(backing[len(XATTR_PREFIX) :], "xattr name")
    return b"user." + unpad(siv.open(sealed, [_XATTR_AD, b""]))


def encrypt_xattr_value(meta: crypto.Aead, backing_name: bytes, value: bytes) -> bytes:
    """A value sealed for the backing xattr ``backing_name`` (random nonce)."""
    return meta.seal(value, backing_name)


def decrypt_xattr_value(meta: crypto.Aead, backing_name: bytes, sealed: bytes) -> bytes:
    """The plaintext of a value :func:`encrypt_xattr_value` sealed for ``backing_name``.

    Raises:
        IntegrityError: altered, or moved from another xattr name.
    """
    return meta.open(sealed, backing_name)
