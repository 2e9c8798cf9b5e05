"""``FakeKeyProvider``: a small, honest key service in memory, for tests of the file side.

It keeps the promises of :class:`envfs.keys.provider.KeyProvider` that the file side relies
on, without a store, a policy language or an audit log: the master keys of one region, each
with the uids allowed to use it; data keys wrapped under a master key with AES-GCM, the
encryption context bound as additional data, so that a wrapped key presented with another
context, as another key's or altered is refused as the real service refuses it, with the
same exceptions. Every call is recorded with its outcome, so that a test can assert which
key decisions the file side asked for, and for whom.

A wrapped data key::

    offset  size  field
         0     5  b"fake1"
         5    36  the master key's id (its UUID, as text): readable without the key
        41    60  Aead.seal(data key (32)): nonce (12) || ciphertext (32) || tag (16)
    AAD = b"fake1" || key id || each (key, value) of the context, sorted, as
          u16 len(key) || key || u16 len(value) || value   (UTF-8; lengths: no two collide)
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from envfs import crypto
from envfs.errors import (
    AccessDeniedException,
    DisabledException,
    IncorrectKeyException,
    IntegrityError,
    InvalidCiphertextException,
    KMSError,
    NotFoundException,
)
from envfs.identity import Caller
from envfs.keys.provider import DataKey, EncryptionContext, WrappedKey

T = TypeVar("T")
ACCOUNT = "111122223333"
MAGIC = b"fake1"
_KEY_ID_SIZE = 36
WRAPPED_SIZE = len(MAGIC) + _KEY_ID_SIZE + crypto.SEAL_OVERHEAD + crypto.KEY_SIZE

# Callers as the kernel would name them: root, a user the volume's key allows, and a user
# with no right to it (any Unix permission notwithstanding).
ROOT = Caller(0, 0, frozenset({0}), "root", frozenset({"root"}))
KEY_USER = Caller(61002, 61002, frozenset({61002}))
STRANGER = Caller(61003, 61003, frozenset({61003}))


class Call(NamedTuple):
    """One call the file side made: ``key`` as it was named (for ``decrypt``, the key it
    required), ``outcome`` "ok" or the AWS name of the error it got."""

    operation: str
    key: str
    uid: int
    note: str
    outcome: str


@dataclass
class MasterKey:
    """A master key: ``users`` are the uids its policy allows to use it; a disabled key is
    refused to them all (DisabledException), as AWS refuses it."""

    key_id: str
    material: bytes
    users: set[int] = field(default_factory=set)
    enabled: bool = True


def _aad(key_id: str, context: EncryptionContext) -> bytes:
    parts = [MAGIC, key_id.encode()]
    for name, value in sorted(context.items()):
        for text in (name.encode(), value.encode()):
            parts += [struct.pack(">H", len(text)), text]
    return b"".join(parts)


class FakeKeyProvider:
    """The master keys of ``region``; implements :class:`envfs.keys.provider.KeyProvider`."""

    def __init__(self, region: str = "local-1") -> None:
        self._region = region
        self.keys: dict[str, MasterKey] = {}
        self.calls: list[Call] = []

    # --- what a test arranges -----------------------------------------------------------

    def create_key(self, users: Iterable[int]) -> str:
        """A new master key that the uids ``users`` may use; returns its ARN."""
        key = MasterKey(str(uuid.uuid4()), crypto.random_bytes(crypto.KEY_SIZE), set(users))
        self.keys[key.key_id] = key
        return self.arn(key.key_id)

    def arn(self, key_id: str) -> str:
        return f"arn:envfs:kms:{self._region}:{ACCOUNT}:key/{key_id}"

    def key(self, key_ref: str) -> MasterKey:
        """The key named by its id or by its ARN in this region and account.

        Raises:
            NotFoundException: no such key here (an ARN of another region included).
        """
        key_id = key_ref.removeprefix(self.arn(""))
        found = self.keys.get(key_id)
        if found is None:
            raise NotFoundException(f"key {key_ref!r} does not exist in region {self._region!r}")
        return found

    def decisions(self, operation: str | None = None) -> list[tuple[str, int, str]]:
        """(operation, uid, outcome) of the calls so far, of one operation if given."""
        return [
            (c.operation, c.uid, c.outcome)
            for c in self.calls
            if operation is None or c.operation == operation
        ]

    # --- the KeyProvider protocol -------------------------------------------------------

    @property
    def region(self) -> str:
        return self._region

    @property
    def batches_audit(self) -> bool:
        return False

    def flush_audit(self) -> None:
        """Nothing is batched: every call is recorded as it is made."""

    def generate_data_key(
        self, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> DataKey:
        def generate() -> DataKey:
            key = self._usable(key_id, caller, "GenerateDataKey")
            plaintext = crypto.random_bytes(crypto.KEY_SIZE)
            sealed = crypto.Aead(key.material).seal(plaintext, _aad(key.key_id, context))
            return DataKey(plaintext, MAGIC + key.key_id.encode() + sealed, self.arn(key.key_id))

        return self._recorded("GenerateDataKey", key_id, caller, note, generate)

    def decrypt(
        self, wrapped: bytes, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> bytes:
        def unwrap() -> bytes:
            named = self.read_wrapped(wrapped)
            if named is None:
                raise InvalidCiphertextException("the ciphertext blob is not valid")
            key = self.key(named.key_id)
            if self.key(key_id) is not key:
                raise IncorrectKeyException(
                    f"the ciphertext was encrypted under key {self.arn(key.key_id)!r},"
                    f" not under {key_id!r}"
                )
            self._usable(key.key_id, caller, "Decrypt")
            sealed = wrapped[len(MAGIC) + _KEY_ID_SIZE :]
            try:
                return crypto.Aead(key.material).open(sealed, _aad(key.key_id, context))
            except IntegrityError:
                raise InvalidCiphertextException("the ciphertext blob is not valid") from None

        return self._recorded("Decrypt", key_id, caller, note, unwrap)

    def describe_key(self, key_id: str, caller: Caller) -> str:
        def describe() -> str:
            key = self.key(key_id)
            self._allowed(key, caller, "DescribeKey")
            return self.arn(key.key_id)

        return self._recorded("DescribeKey", key_id, caller, "", describe)

    @property
    def reads_wrapped(self) -> bool:
        return True

    def read_wrapped(self, wrapped: bytes) -> WrappedKey | None:
        if len(wrapped) != WRAPPED_SIZE or not wrapped.startswith(MAGIC):
            return None
        try:
            key_id = str(uuid.UUID(wrapped[len(MAGIC) : len(MAGIC) + _KEY_ID_SIZE].decode()))
        except (UnicodeDecodeError, ValueError):
            return None
        return WrappedKey(key_id, None)

    # --- decisions ----------------------------------------------------------------------

    def _allowed(self, key: MasterKey, caller: Caller, action: str) -> None:
        if caller.uid not in key.users:
            raise AccessDeniedException(
                f"user {caller.describe()} is not authorized to perform {action} on key"
                f" {self.arn(key.key_id)!r}"
            )

    def _usable(self, key_ref: str, caller: Caller, action: str) -> MasterKey:
        """In the real service's order: the key exists, the caller may use it, it is
        enabled."""
        key = self.key(key_ref)
        self._allowed(key, caller, action)
        if not key.enabled:
            raise DisabledException(f"key {self.arn(key.key_id)!r} is disabled")
        return key

    def _recorded(
        self, operation: str, key: str, caller: Caller, note: str, call: Callable[[], T]
    ) -> T:
        try:
            result = call()
        except KMSError as exc:
            self.calls.append(Call(operation, key, caller.uid, note, exc.aws_name))
            raise
        self.calls.append(Call(operation, key, caller.uid, note, "ok"))
        return result
