"""What the two providers over envfs's own key service share: the calls as key-service
requests, and reading its ciphertext blobs (:mod:`envfs.kms.blob`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envfs.errors import InvalidCiphertextException
from envfs.identity import Caller
from envfs.keys.provider import DataKey, EncryptionContext, WrappedKey
from envfs.kms.blob import parse_blob


def read_wrapped(wrapped: bytes) -> WrappedKey | None:
    """The master key an envfs ciphertext blob names, without decrypting; None if it is not
    a blob this envfs reads."""
    try:
        header = parse_blob(wrapped)
    except InvalidCiphertextException:
        return None
    return WrappedKey(header.key_id, header.key_version)


class KeyServiceCalls:
    """The KeyProvider calls, as key-service requests; subclasses say how to send them."""

    @property
    def reads_wrapped(self) -> bool:
        return True

    def read_wrapped(self, wrapped: bytes) -> WrappedKey | None:
        return read_wrapped(wrapped)

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
