"""Cryptographic operations: Encrypt, Decrypt, ReEncrypt, data keys, random bytes.

The plaintext of a ReEncrypt never leaves the service; data keys are random bytes from
the kernel, returned once and sealed under the newest version of the master key.
"""

from __future__ import annotations

from typing import Any

from envfs import crypto
from envfs.errors import (
    ValidationException,
)
from envfs.kms.core import (
    DATA_KEY_SPECS,
    MAX_PLAINTEXT,
    ServiceCore,
    _Call,
)
from envfs.kms.model import (
    SYMMETRIC_DEFAULT,
    validate_context,
)


class CryptoOps(ServiceCore):
    def _op_encrypt(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        context = call.context = validate_context(req.get("EncryptionContext"))
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:Encrypt", key, context)
        self._require_usable(key)
        self._check_algorithm(req, "EncryptionAlgorithm")
        plaintext: bytes = req["Plaintext"]
        if not 1 <= len(plaintext) <= MAX_PLAINTEXT:
            raise ValidationException(
                f"Plaintext must be 1 to {MAX_PLAINTEXT} bytes, got {len(plaintext)}"
            )
        return {
            "CiphertextBlob": self._seal(key, plaintext, context),
            "KeyId": self._arn(key.key_id),
            "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }

    def _op_decrypt(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        context = call.context = validate_context(req.get("EncryptionContext"))
        self._check_algorithm(req, "EncryptionAlgorithm")
        key, plaintext = self._open_blob(
            call, req["CiphertextBlob"], context, req.get("KeyId"), "kms:Decrypt"
        )
        return {
            "Plaintext": plaintext,
            "KeyId": self._arn(key.key_id),
            "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }

    def _op_re_encrypt(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        call.action = "kms:ReEncrypt*"
        source_context = call.context = validate_context(req.get("SourceEncryptionContext"))
        dest_context = validate_context(req.get("DestinationEncryptionContext"))
        self._check_algorithm(req, "SourceEncryptionAlgorithm", "DestinationEncryptionAlgorithm")
        source, plaintext = self._open_blob(
            call, req["CiphertextBlob"], source_context, req.get("SourceKeyId"),
            "kms:ReEncryptFrom",
        )  # fmt: skip
        dest_call = _Call(call.caller, call.now, call.operation)
        dest = self._key(dest_call, req["DestinationKeyId"])
        call.destination_key_arn = self._arn(dest.key_id)
        self._authorize(call, "kms:ReEncryptTo", dest, dest_context)
        self._require_usable(dest)
        return {
            "CiphertextBlob": self._seal(dest, plaintext, dest_context),
            "SourceKeyId": self._arn(source.key_id),
            "KeyId": self._arn(dest.key_id),
            "SourceEncryptionAlgorithm": SYMMETRIC_DEFAULT,
            "DestinationEncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }

    def _data_key(self, call: _Call, req: dict[str, Any], action: str) -> tuple[str, bytes, bytes]:
        context = call.context = validate_context(req.get("EncryptionContext"))
        key = self._key(call, req["KeyId"])
        self._authorize(call, action, key, context)
        self._require_usable(key)
        spec, size = req.get("KeySpec"), req.get("NumberOfBytes")
        if (spec is None) == (size is None):
            raise ValidationException("give exactly one of KeySpec and NumberOfBytes")
        if spec is not None:
            if spec not in DATA_KEY_SPECS:
                raise ValidationException(f"KeySpec {spec!r} is not one of AES_256, AES_128")
            size = DATA_KEY_SPECS[spec]
        assert size is not None
        if not 1 <= size <= 1024:
            raise ValidationException(f"NumberOfBytes must be between 1 and 1024, got {size}")
        plaintext = crypto.random_bytes(size)
        return self._arn(key.key_id), plaintext, self._seal(key, plaintext, context)

    def _op_generate_data_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        arn, plaintext, sealed = self._data_key(call, req, "kms:GenerateDataKey")
        return {"CiphertextBlob": sealed, "Plaintext": plaintext, "KeyId": arn}

    def _op_generate_data_key_without_plaintext(
        self, call: _Call, req: dict[str, Any]
    ) -> dict[str, Any]:
        arn, _, sealed = self._data_key(call, req, "kms:GenerateDataKeyWithoutPlaintext")
        return {"CiphertextBlob": sealed, "KeyId": arn}

    def _op_generate_random(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        call.action = "kms:GenerateRandom"
        size = req["NumberOfBytes"]
        if not 1 <= size <= 1024:
            raise ValidationException(f"NumberOfBytes must be between 1 and 1024, got {size}")
        return {"Plaintext": crypto.random_bytes(size)}
