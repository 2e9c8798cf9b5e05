"""``KeyProvider``: what the filesystem needs from a key service, and who it asks for.

The filesystem makes and unwraps data keys *for the user who opens a file*; every call
is therefore made on behalf of a :class:`~envfs.kms.model.Caller`, and every call is one
access decision in the key service's policy and audit log.

``ServiceKeyProvider`` calls an in-process :class:`~envfs.kms.service.KeyService` (the
embedded store). A daemon-backed provider comes with the systemd work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from envfs.errors import InvalidCiphertextException
from envfs.kms.blob import parse_blob
from envfs.kms.model import Caller, EncryptionContext
from envfs.kms.service import KeyService


@dataclass(frozen=True)
class DataKey:
    """A fresh data key: its plaintext (never stored) and its wrapped copy."""

    plaintext: bytes
    wrapped: bytes
    key_arn: str

    def __repr__(self) -> str:
        return f"DataKey(key_arn={self.key_arn!r}, wrapped=<{len(self.wrapped)} bytes>)"


def wrapped_key_id(wrapped: bytes) -> str | None:
    """The id of the master key a wrapped key (ciphertext blob) names, without decrypting;
    None if it is not a blob this envfs reads."""
    try:
        return parse_blob(wrapped).key_id
    except InvalidCiphertextException:
        return None


class KeyProvider(Protocol):
    """The key-service calls the filesystem makes."""

    @property
    def region(self) -> str: ...

    def generate_data_key(
        self, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> DataKey:
        """GenerateDataKey (AES_256) under ``key_id`` for ``caller``."""
        ...

    def decrypt(
        self, wrapped: bytes, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> bytes:
        """Decrypt a wrapped data key for ``caller``; the blob must be under ``key_id``."""
        ...

    def describe_key(self, key_id: str, caller: Caller) -> str:
        """The ARN of ``key_id`` (an alias is resolved), as ``caller`` may see it."""
        ...


class ServiceKeyProvider:
    """A :class:`KeyProvider` over an in-process key service (the embedded store)."""

    def __init__(self, service: KeyService) -> None:
        self.service = service

    @property
    def region(self) -> str:
        return self.service.region

    def generate_data_key(
        self, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> DataKey:
        out = self.service.handle(
            caller,
            "GenerateDataKey",
            {
                "KeyId": key_id,
                "KeySpec": "AES_256",
                "EncryptionContext": context,
                "AuditNote": note,
            },
        )
        return DataKey(out["Plaintext"], out["CiphertextBlob"], out["KeyId"])

    def decrypt(
        self, wrapped: bytes, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> bytes:
        out = self.service.handle(
            caller,
            "Decrypt",
            {
                "CiphertextBlob": wrapped,
                "KeyId": key_id,
                "EncryptionContext": context,
                "AuditNote": note,
            },
        )
        plaintext: bytes = out["Plaintext"]
        return plaintext

    def describe_key(self, key_id: str, caller: Caller) -> str:
        out = self.service.handle(caller, "DescribeKey", {"KeyId": key_id})
        arn: str = out["KeyMetadata"]["Arn"]
        return arn
