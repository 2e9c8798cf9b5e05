"""``KeyProvider``: what the file side needs from a key service, and the only part of one
it imports.

The file side makes and unwraps data keys *for the user who opens a file*; every call is
therefore made on behalf of a :class:`~envfs.identity.Caller`, and every call is one access
decision in the key service's policy and audit log. Which key service answers (the embedded
store, an envfs key-service daemon, AWS KMS or another envfs over HTTPS) is chosen once, at the top
(:mod:`envfs.keys.choice`); nothing below asks which one it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from envfs.identity import Caller

# A KMS encryption context: bound to a wrapped data key, needed again to unwrap it.
EncryptionContext = dict[str, str]


@dataclass(frozen=True)
class DataKey:
    """A fresh data key: its plaintext (never stored) and its wrapped copy."""

    plaintext: bytes
    wrapped: bytes
    key_arn: str

    def __repr__(self) -> str:
        return f"DataKey(key_arn={self.key_arn!r}, wrapped=<{len(self.wrapped)} bytes>)"


@dataclass(frozen=True)
class WrappedKey:
    """What a wrapped data key says of itself, read without decrypting it (not
    authenticated: good for refusing early and for reports, never for trusting)."""

    key_id: str  # the master key's id (the last part of its ARN)
    key_version: int | None  # the master key's version, if the format says


class KeyProvider(Protocol):
    """The key-service calls the file side makes."""

    @property
    def region(self) -> str:
        """The region whose keys this provider serves."""
        ...

    @property
    def batches_audit(self) -> bool:
        """True if audit records wait in a batch until :meth:`flush_audit` (the mount then
        calls it periodically)."""
        ...

    @property
    def reads_wrapped(self) -> bool:
        """True if :meth:`read_wrapped` reads this service's wrapped keys (envfs's blobs);
        False where their format is not documented (AWS KMS): it then always answers None,
        and only Decrypt, which requires the key a header names, checks which key a wrapped
        key is under."""
        ...

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

    def read_wrapped(self, wrapped: bytes) -> WrappedKey | None:
        """What ``wrapped`` says of its master key without decrypting it; None if it is not
        in this provider's format."""
        ...

    def flush_audit(self) -> None:
        """Put batched audit records where they belong if they are due."""
        ...
