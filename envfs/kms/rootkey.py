"""Where a key store's root key comes from: a file, a systemd credential or a passphrase.

The root key (32 bytes) seals everything in a store and never enters its database
(``docs/kms.md`` §2, §7). When a store is opened it is taken from, in order:

1. a root key file given to :meth:`KeyStore.open` (``root_key_file``; library only);
2. the systemd credential ``$CREDENTIALS_DIRECTORY/root-key`` (:data:`CREDENTIAL_NAME`);
3. for a store made with a passphrase: the passphrase, through scrypt with the salt and
   cost kept in the store's meta rows;
4. the store's own ``root.key`` (:data:`ROOT_KEY_NAME`).

A root key file holds the 32 bytes raw, or as base64 text (``init`` writes base64 and a
newline). Which source a store uses is its ``root_kind`` meta row: ``file`` or
``passphrase``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envfs import crypto
from envfs.errors import RootKeyError, StoreCorruptError
from envfs.kms.paths import check_private

ROOT_KEY_NAME = "root.key"
CREDENTIAL_NAME = "root-key"

MetaReader = Callable[[str], bytes | None]
"""``read_meta(name)``: a store's meta row as bytes, or None if it has none."""


def new_root_key(passphrase: bytes | None) -> tuple[bytes, dict[str, Any]]:
    """A new store's root key, and the meta rows that say where it will come from.

    Without a passphrase the key is random (to be written to ``root.key``); with one it is
    derived by scrypt, with a random salt kept in the rows.

    Raises:
        RootKeyError: the passphrase is empty.
    """
    if passphrase is None:
        return crypto.random_bytes(crypto.KEY_SIZE), {"root_kind": "file"}
    if not passphrase:
        raise RootKeyError("the passphrase must not be empty")
    salt = crypto.random_bytes(16)
    meta = {"root_kind": "passphrase", "scrypt_salt": salt, "scrypt_n": crypto.SCRYPT_N}
    return crypto.scrypt(passphrase, salt), meta


def encode_root_key(root_key: bytes) -> bytes:
    """A root key file's text as ``init`` writes it: base64 and a newline."""
    return base64.b64encode(root_key) + b"\n"


def load_root_key(
    directory: Path,
    read_meta: MetaReader,
    passphrase: bytes | None,
    root_key_file: Path | None,
) -> bytes:
    """The root key of the store in ``directory``, from the first source that has it.

    Raises:
        RootKeyError: no source has it, a passphrase store was given no passphrase, or a
            root key file cannot be read or is malformed.
        StorePermissionError: ``root_key_file`` is open to group or others.
        StoreCorruptError: a passphrase store lacks its scrypt salt.
    """
    if root_key_file is not None:
        check_private(Path(root_key_file), "root key file")
        return _read_root_key_file(Path(root_key_file))
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return _read_root_key_file(Path(creds) / CREDENTIAL_NAME)
    if read_meta("root_kind") == b"passphrase":
        if passphrase is None:
            raise RootKeyError(
                f"the key store at {str(directory)!r} is protected by a passphrase;"
                " give it with --passphrase-file or ENVFS_KMS_PASSPHRASE_FILE"
            )
        salt = read_meta("scrypt_salt")
        n_raw = read_meta("scrypt_n")
        if salt is None or n_raw is None:
            raise StoreCorruptError(f"key store {str(directory)!r} lacks its scrypt salt")
        return crypto.scrypt(passphrase, salt, n=int(n_raw))
    key_path = directory / ROOT_KEY_NAME
    if not key_path.exists():
        raise RootKeyError(
            f"no root key for the key store at {str(directory)!r}: {str(key_path)!r} is"
            f" missing and no systemd credential {CREDENTIAL_NAME!r} was given"
        )
    return _read_root_key_file(key_path)


def _read_root_key_file(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RootKeyError(f"cannot read root key {str(path)!r}: {exc.strerror}") from None
    return _decode_root_key(raw, str(path))


def _decode_root_key(raw: bytes, source: str) -> bytes:
    """A root key file holds 32 bytes, base64-encoded (as written by init) or raw."""
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) == crypto.KEY_SIZE:
        return key
    if len(raw) == crypto.KEY_SIZE:
        return raw
    raise RootKeyError(f"root key {source!r} is malformed: expected 32 bytes, raw or base64")
