"""``KeyProvider``: what the filesystem needs from a key service, and who it asks for.

The filesystem makes and unwraps data keys *for the user who opens a file*; every call
is therefore made on behalf of a :class:`~envfs.kms.model.Caller`, and every call is one
access decision in the key service's policy and audit log.

``ServiceKeyProvider`` calls an in-process :class:`~envfs.kms.service.KeyService` (the
embedded store). ``ClientKeyProvider`` calls a key-service daemon on behalf of the user,
which the daemon accepts only from a process it trusts for that (``envfs kms serve
--trust-on-behalf-of``); when the daemon cannot be reached it fails fast for a while
(exponential backoff) and recovers by itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from envfs.errors import (
    DependencyTimeoutException,
    InvalidCiphertextException,
    KMSUnavailableException,
)
from envfs.kms.blob import parse_blob
from envfs.kms.client import KMSClient
from envfs.kms.model import Caller, EncryptionContext
from envfs.kms.service import KeyService

log = logging.getLogger(__name__)


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


def wrapped_key_version(wrapped: bytes) -> int | None:
    """The version of the master key a wrapped key (ciphertext blob) was made with, without
    decrypting; None if it is not a blob this envfs reads."""
    try:
        return parse_blob(wrapped).key_version
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


class _KeyServiceCalls:
    """The KeyProvider calls, as key-service requests; subclasses say how to send them."""

    def _call(self, operation: str, params: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        raise NotImplementedError

    def generate_data_key(
        self, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> DataKey:
        params = {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context}
        out = self._call("GenerateDataKey", {**params, "AuditNote": note}, caller)
        return DataKey(out["Plaintext"], out["CiphertextBlob"], out["KeyId"])

    def decrypt(
        self, wrapped: bytes, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> bytes:
        params = {"CiphertextBlob": wrapped, "KeyId": key_id, "EncryptionContext": context}
        out = self._call("Decrypt", {**params, "AuditNote": note}, caller)
        plaintext: bytes = out["Plaintext"]
        return plaintext

    def describe_key(self, key_id: str, caller: Caller) -> str:
        out = self._call("DescribeKey", {"KeyId": key_id}, caller)
        arn: str = out["KeyMetadata"]["Arn"]
        return arn


class ServiceKeyProvider(_KeyServiceCalls):
    """A :class:`KeyProvider` over an in-process key service (the embedded store)."""

    def __init__(self, service: KeyService) -> None:
        self.service = service

    @property
    def region(self) -> str:
        return self.service.region

    def _call(self, operation: str, params: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        return self.service.handle(caller, operation, params)

    def flush_audit(self) -> None:
        """Add the service's batched audit records to the chain if they are due."""
        self.service.flush_audit()


class ClientKeyProvider(_KeyServiceCalls):
    """A :class:`KeyProvider` over a key-service daemon, calling on behalf of each user.

    After the daemon could not be reached, calls fail at once (KMSUnavailableException)
    until a backoff delay has passed: 0.1 s, doubling up to ``max_backoff``. The first call
    after that tries again; success resets the delay.
    """

    def __init__(self, client: KMSClient, region: str, *, max_backoff: float = 5.0) -> None:
        self.client = client
        self._region = region
        self._max_backoff = max_backoff
        self._backoff = 0.0
        self._retry_at = 0.0

    @property
    def region(self) -> str:
        return self._region

    def _call(self, operation: str, params: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        now = time.monotonic()
        if now < self._retry_at:
            raise KMSUnavailableException(
                f"the key service at '{self.client.socket_path}' is unavailable (next try in"
                f" {self._retry_at - now:.1f} s)"
            )
        try:
            out = self.client.call(operation, params, on_behalf_of=(caller.uid, caller.gid))
        except (KMSUnavailableException, DependencyTimeoutException) as exc:
            self._backoff = min(self._max_backoff, max(0.1, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            log.warning("key service unavailable: %s (retrying in %.1f s)", exc, self._backoff)
            raise
        if self._backoff:
            log.info("key service at '%s' reachable again", self.client.socket_path)
            self._backoff = 0.0
        return out
