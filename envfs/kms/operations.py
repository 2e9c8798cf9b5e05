"""The key service's operations: names, parameters and the policy action each one needs.

One table serves the service (request validation), the daemon (which names exist) and
the CLI (one subcommand per operation, one ``--flag`` per parameter, as aws-cli does).
Parameter names and shapes are AWS KMS's; two envfs additions to CreateKey
(``KeyAdministrators``, ``KeyUsers``) write the origin document's default policy.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envfs.errors import InvalidRequestException, ValidationException

MAX_STRING = 32768  # the longest string parameter (a key policy's AWS limit)


class ParamType(enum.Enum):
    STRING = "string"
    BLOB = "blob"  # bytes
    INTEGER = "integer"
    BOOLEAN = "boolean"
    CONTEXT = "context"  # map of string to string
    TAGS = "tags"  # list of {"TagKey": str, "TagValue": str}
    STRING_LIST = "string-list"


@dataclass(frozen=True)
class Param:
    name: str
    type: ParamType
    required: bool = False
    help: str = ""
    aliases: tuple[str, ...] = ()  # more CLI flags for it (``--user`` for ``--user-name``)

    @property
    def flag(self) -> str:
        """The aws-cli flag: ``KeyId`` -> ``--key-id``."""
        return "--" + re.sub(r"(?<!^)(?=[A-Z])", "-", self.name).lower()


@dataclass(frozen=True)
class Operation:
    name: str  # AWS operation name, e.g. "GenerateDataKey"
    action: str | None  # policy action, e.g. "kms:GenerateDataKey"; None: account-level
    params: tuple[Param, ...]
    help: str

    @property
    def verb(self) -> str:
        """The CLI verb: ``GenerateDataKey`` -> ``generate-data-key``."""
        return re.sub(r"(?<!^)(?=[A-Z])", "-", self.name).lower()


S, B, INT, BOOL, CTX, TAGS, LIST = (
    ParamType.STRING,
    ParamType.BLOB,
    ParamType.INTEGER,
    ParamType.BOOLEAN,
    ParamType.CONTEXT,
    ParamType.TAGS,
    ParamType.STRING_LIST,
)

_KEY_ID = Param("KeyId", S, True, "key id, key ARN, alias name (alias/NAME) or alias ARN")
_LIMIT = Param("Limit", INT, help="at most this many items (1-1000, default 100)")
_MARKER = Param("Marker", S, help="NextMarker of the previous page")
_CONTEXT = Param("EncryptionContext", CTX, help="k=v,k2=v2 or JSON; bound to the ciphertext")
_ALGORITHM = Param("EncryptionAlgorithm", S, help="SYMMETRIC_DEFAULT (the only one)")
_KEY_SPEC = Param("KeySpec", S, help="AES_256 or AES_128")
_NUMBER_OF_BYTES = Param("NumberOfBytes", INT, help="data key length, 1-1024")
_NOTE = Param(
    "AuditNote", S, help="envfs: text kept in the audit record (e.g. a file's path), not bound"
)
_USER_NAME = Param(
    "UserName",
    S,
    help="the Unix user (name or uid) the key belongs to (default: you)",
    aliases=("--user",),
)
_ACCESS_KEY_ID = Param("AccessKeyId", S, True, "the access key's id (EKIA...)")
_BYPASS = Param(
    "BypassPolicyLockoutSafetyCheck", BOOL, help="skip the check that you keep PutKeyPolicy"
)

OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation(
            "CreateKey",
            None,
            (
                Param("Description", S, help="free text, up to 8192 characters"),
                Param("Tags", TAGS, help="TagKey=k,TagValue=v ... or JSON"),
                Param("Policy", S, help="key policy JSON (see docs/kms.md)"),
                Param("KeyAdministrators", LIST, help="user:NAME,group:NAME,uid:N,gid:N"),
                Param("KeyUsers", LIST, help="user:NAME,group:NAME,uid:N,gid:N"),
                Param("KeyUsage", S, help="ENCRYPT_DECRYPT (the only one)"),
                Param("KeySpec", S, help="SYMMETRIC_DEFAULT (the only one)"),
                Param("Origin", S, help="ENVFS_KMS (the only one; AWS_KMS, its AWS name, too)"),
                Param("MultiRegion", BOOL, help="false only: envfs keys are single-region"),
                _BYPASS,
            ),
            "create a master key",
        ),
        Operation("DescribeKey", "kms:DescribeKey", (_KEY_ID,), "show a key's metadata"),
        Operation("ListKeys", None, (_LIMIT, _MARKER), "list the keys of the region"),
        Operation("EnableKey", "kms:EnableKey", (_KEY_ID,), "enable a disabled key"),
        Operation("DisableKey", "kms:DisableKey", (_KEY_ID,), "disable a key"),
        Operation(
            "ScheduleKeyDeletion",
            "kms:ScheduleKeyDeletion",
            (_KEY_ID, Param("PendingWindowInDays", INT, help="7-30, default 30")),
            "destroy a key after a waiting period",
        ),
        Operation(
            "CancelKeyDeletion",
            "kms:CancelKeyDeletion",
            (_KEY_ID,),
            "cancel a scheduled deletion (the key returns Disabled)",
        ),
        Operation(
            "UpdateKeyDescription",
            "kms:UpdateKeyDescription",
            (_KEY_ID, Param("Description", S, True, "new description")),
            "change a key's description",
        ),
        Operation(
            "CreateAlias",
            "kms:CreateAlias",
            (
                Param("AliasName", S, True, "alias/NAME"),
                Param("TargetKeyId", S, True, "key id or key ARN"),
            ),
            "give a key a friendly name",
        ),
        Operation(
            "UpdateAlias",
            "kms:UpdateAlias",
            (
                Param("AliasName", S, True, "alias/NAME"),
                Param("TargetKeyId", S, True, "key id or key ARN"),
            ),
            "point an alias at another key",
        ),
        Operation(
            "DeleteAlias",
            "kms:DeleteAlias",
            (Param("AliasName", S, True, "alias/NAME"),),
            "delete an alias",
        ),
        Operation(
            "ListAliases",
            None,
            (Param("KeyId", S, help="only aliases of this key"), _LIMIT, _MARKER),
            "list aliases",
        ),
        Operation(
            "TagResource",
            "kms:TagResource",
            (_KEY_ID, Param("Tags", TAGS, True, "TagKey=k,TagValue=v ... or JSON")),
            "add or overwrite tags",
        ),
        Operation(
            "UntagResource",
            "kms:UntagResource",
            (_KEY_ID, Param("TagKeys", LIST, True, "tag keys to remove")),
            "remove tags",
        ),
        Operation(
            "ListResourceTags",
            "kms:ListResourceTags",
            (_KEY_ID, _LIMIT, _MARKER),
            "list a key's tags",
        ),
        Operation(
            "Encrypt",
            "kms:Encrypt",
            (_KEY_ID, Param("Plaintext", B, True, "1-4096 bytes"), _CONTEXT, _ALGORITHM, _NOTE),
            "encrypt up to 4096 bytes under a master key",
        ),
        Operation(
            "Decrypt",
            "kms:Decrypt",
            (
                Param("CiphertextBlob", B, True, "a blob from Encrypt or GenerateDataKey"),
                _CONTEXT,
                Param("KeyId", S, help="the key the blob must be under"),
                _ALGORITHM,
                _NOTE,
            ),
            "decrypt a ciphertext blob",
        ),
        Operation(
            "ReEncrypt",
            None,  # kms:ReEncryptFrom on the source key and kms:ReEncryptTo on the destination
            (
                Param("CiphertextBlob", B, True, "the blob to re-encrypt"),
                Param("SourceEncryptionContext", CTX),
                Param("SourceKeyId", S, help="the key the blob must be under"),
                Param("DestinationKeyId", S, True, "the key to re-encrypt under"),
                Param("DestinationEncryptionContext", CTX),
                Param("SourceEncryptionAlgorithm", S),
                Param("DestinationEncryptionAlgorithm", S),
                _NOTE,
            ),
            "decrypt and encrypt again inside the service; the plaintext never leaves it",
        ),
        Operation(
            "GenerateDataKey",
            "kms:GenerateDataKey",
            (_KEY_ID, _CONTEXT, _KEY_SPEC, _NUMBER_OF_BYTES, _NOTE),
            "make a data key: plaintext and a copy encrypted under the master key",
        ),
        Operation(
            "GenerateDataKeyWithoutPlaintext",
            "kms:GenerateDataKeyWithoutPlaintext",
            (_KEY_ID, _CONTEXT, _KEY_SPEC, _NUMBER_OF_BYTES, _NOTE),
            "make a data key, returning only its encrypted copy",
        ),
        Operation(
            "GenerateRandom",
            None,
            (Param("NumberOfBytes", INT, True, "1-1024"),),
            "random bytes from the service",
        ),
        Operation(
            "EnableKeyRotation",
            "kms:EnableKeyRotation",
            (_KEY_ID, Param("RotationPeriodInDays", INT, help="90-2560, default 365")),
            "rotate the key automatically",
        ),
        Operation(
            "DisableKeyRotation",
            "kms:DisableKeyRotation",
            (_KEY_ID,),
            "stop automatic rotation",
        ),
        Operation(
            "GetKeyRotationStatus",
            "kms:GetKeyRotationStatus",
            (_KEY_ID,),
            "show whether and when the key rotates",
        ),
        Operation(
            "RotateKeyOnDemand",
            "kms:RotateKeyOnDemand",
            (_KEY_ID,),
            "add a new key version now",
        ),
        Operation(
            "ListKeyRotations",
            "kms:ListKeyRotations",
            (_KEY_ID, _LIMIT, _MARKER),
            "list the key's rotations",
        ),
        Operation(
            "GetKeyPolicy",
            "kms:GetKeyPolicy",
            (_KEY_ID, Param("PolicyName", S, help="default (the only one)")),
            "show the key policy",
        ),
        Operation(
            "ListKeyPolicies",
            "kms:ListKeyPolicies",
            (_KEY_ID, _LIMIT, _MARKER),
            "list the names of the key's policies (always: default)",
        ),
        Operation(
            "PutKeyPolicy",
            "kms:PutKeyPolicy",
            (
                _KEY_ID,
                Param("Policy", S, True, "key policy JSON (see docs/kms.md)"),
                Param("PolicyName", S, help="default (the only one)"),
                _BYPASS,
            ),
            "replace the key policy",
        ),
        # envfs's own: reading and verifying the audit log (root and the key creators group).
        Operation(
            "ListAuditRecords",
            None,
            (
                Param("KeyId", S, help="only records about this key"),
                Param("Since", S, help="ISO 8601 time or seconds since the epoch"),
                _LIMIT,
                _MARKER,
            ),
            "list audit records",
        ),
        Operation("VerifyAudit", None, (), "verify the audit log's hash chain"),
        # envfs's own, in IAM's shapes: access keys of Unix users (for the HTTP endpoint).
        # Root and the key creators group manage anyone's; a user manages their own.
        Operation(
            "CreateAccessKey",
            None,
            (_USER_NAME,),
            "create an access key for a Unix user; its secret is shown this once",
        ),
        Operation(
            "ListAccessKeys",
            None,
            (
                Param(
                    "UserName",
                    S,
                    help="only this user's keys: a user name or uid (default: yours; root"
                    " and the key creators group: everyone's)",
                    aliases=("--user",),
                ),
            ),
            "list access keys (never their secrets)",
        ),
        Operation(
            "UpdateAccessKey",
            None,
            (_ACCESS_KEY_ID, Param("Status", S, True, "Active or Inactive")),
            "activate or deactivate an access key",
        ),
        Operation("DeleteAccessKey", None, (_ACCESS_KEY_ID,), "delete an access key for good"),
    )
}


# Each operation's parameters by name, for validate_request.
_PARAMS_BY_NAME = {name: {p.name: p for p in op.params} for name, op in OPERATIONS.items()}

_TYPE_CHECKS: dict[ParamType, type | tuple[type, ...]] = {
    S: str,
    B: (bytes, bytearray),
    INT: int,
    BOOL: bool,
    CTX: dict,
    TAGS: list,
    LIST: list,
}


def validate_request(
    operation: str, request: Mapping[str, Any]
) -> tuple[Operation, dict[str, Any]]:
    """Check a request's shape against the operation's parameters.

    Returns the operation and a plain dict of the request with ``None`` values dropped.

    Raises:
        InvalidRequestException: the operation does not exist.
        ValidationException: an unknown or missing parameter, or one of the wrong type.
    """
    op = OPERATIONS.get(operation)
    if op is None:
        raise InvalidRequestException(f"unknown operation {operation!r}")
    if not isinstance(request, Mapping):
        raise ValidationException(f"{operation}: the request must be a map of parameters")
    known = _PARAMS_BY_NAME[op.name]
    clean: dict[str, Any] = {}
    for name, value in request.items():
        param = known.get(name)
        if param is None:
            raise ValidationException(f"{operation}: unknown parameter {name!r}")
        if value is None:
            continue
        expected = _TYPE_CHECKS[param.type]
        # bool is an int in Python; an integer parameter must not accept True.
        bad_bool = param.type is INT and isinstance(value, bool)
        if not isinstance(value, expected) or bad_bool:
            raise ValidationException(
                f"{operation}: parameter {name!r} must be of type {param.type.value}"
            )
        if (
            isinstance(value, list)
            and param.type is LIST
            and not all(isinstance(v, str) for v in value)
        ):
            raise ValidationException(f"{operation}: parameter {name!r} must be a list of strings")
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ValidationException(
                f"{operation}: parameter {name!r} is longer than {MAX_STRING} characters"
            )
        if isinstance(value, bytearray):
            value = bytes(value)
        clean[name] = value
    for param in op.params:
        if param.required and param.name not in clean:
            raise ValidationException(f"{operation}: missing required parameter {param.name!r}")
    return op, clean
