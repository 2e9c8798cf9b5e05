"""Key-service vocabulary: key states, ids, ARNs, aliases, encryption contexts.

Callers are :class:`envfs.identity.Caller`, shared with the file side.

Identifiers
    key id      ``1234abcd-12ab-34cd-56ef-1234567890ab`` (a random UUID, lowercase)
    access key  ``EKIA`` + 16 base32 characters (``EKIAJ5QW2LBVXZ3HK4MA``); its secret is
                40 characters of base64
    key ARN     ``arn:envfs:kms:<region>:<account>:key/<key id>``
    alias name  ``alias/<name>``, name of ``[A-Za-z0-9/_-]``, at most 256 characters in all
    alias ARN   ``arn:envfs:kms:<region>:<account>:alias/<name>``

Canonical encryption context (bound as AAD, so it must be injective)::

    u32 count || for each pair sorted by the key's UTF-8 bytes:
        u32 len(key) || key (UTF-8) || u32 len(value) || value (UTF-8)

All integers are big-endian. ``{"a": "bc"}`` and ``{"ab": "c"}`` encode differently
because every string carries its own length.
"""

from __future__ import annotations

import base64
import enum
import re
import struct
import uuid
from dataclasses import dataclass

from envfs import arn
from envfs.arn import Arn
from envfs.errors import (
    InvalidAliasNameException,
    InvalidArnException,
    NotFoundException,
    ValidationException,
)

ARN_PARTITION = "envfs"
DEFAULT_REGION = "local-1"
# The Unix group whose members may create keys in a new store (``envfs kms init``).
DEFAULT_KEY_CREATORS_GROUP = "envfs-kms"
KEY_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ALIAS_RE = re.compile(r"^alias/[A-Za-z0-9/_-]+$")
ALIAS_MAX = 256
# AWS's constraint on an AliasName parameter (its API model's pattern and length): a name
# outside it is a malformed request (ValidationException) before it is judged as an alias.
ALIAS_NAME_PARAM_RE = re.compile(r"^[a-zA-Z0-9:/_-]{1,256}$")
RESERVED_ALIAS_PREFIX = "alias/aws/"
MAX_CONTEXT_BYTES = 8192

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
KEY_USAGE = "ENCRYPT_DECRYPT"
ORIGIN = "ENVFS_KMS"
# AWS's name for the same origin (the service makes the key material), taken by CreateKey
# so that requests written for AWS work; a key's metadata says ORIGIN.
AWS_ORIGIN = "AWS_KMS"


class KeyState(enum.StrEnum):
    """The states a master key can be in (the subset of AWS's that envfs has)."""

    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PENDING_DELETION = "PendingDeletion"


class AccessKeyStatus(enum.StrEnum):
    """An access key's status (IAM's): only Active keys authenticate."""

    ACTIVE = "Active"
    INACTIVE = "Inactive"


# Access key ids: "EKIA" and 16 characters of base32 (80 random bits); 20 characters in
# all, AWS's shape with envfs's own prefix. Secrets: 40 characters of base64 (240 bits).
ACCESS_KEY_ID_PREFIX = "EKIA"
ACCESS_KEY_ID_RE = re.compile(r"^EKIA[A-Z2-7]{16}$")
ACCESS_KEY_SECRET_CHARS = 40
MAX_ACCESS_KEYS_PER_USER = 2  # as IAM


def new_access_key_id(random_bytes: bytes) -> str:
    """An access key id made of 10 random bytes."""
    if len(random_bytes) != 10:
        raise ValueError("an access key id takes 10 random bytes")
    return ACCESS_KEY_ID_PREFIX + base64.b32encode(random_bytes).decode()


def new_access_key_secret(random_bytes: bytes) -> str:
    """A secret access key made of 30 random bytes: 40 characters of standard base64."""
    if len(random_bytes) != 30:
        raise ValueError("an access key secret takes 30 random bytes")
    return base64.b64encode(random_bytes).decode()


def new_key_id() -> str:
    """A fresh random key id."""
    return str(uuid.uuid4())


def key_arn(region: str, account: str, key_id: str) -> str:
    return f"arn:{ARN_PARTITION}:kms:{region}:{account}:key/{key_id}"


def alias_arn(region: str, account: str, alias_name: str) -> str:
    return f"arn:{ARN_PARTITION}:kms:{region}:{account}:{alias_name}"


def parse_arn(text: str) -> Arn:
    """Split an envfs KMS ARN (:func:`envfs.arn.parse_arn`, of this service's partition only).

    Raises:
        InvalidArnException: not of the form ``arn:envfs:kms:REGION:ACCOUNT:RESOURCE``.
    """
    parts = text.split(":", 5)
    if len(parts) == 6 and parts[0] == "arn" and parts[2] == "kms" and parts[1] != ARN_PARTITION:
        raise InvalidArnException(f"ARN {text!r} is not of partition {ARN_PARTITION!r}")
    return arn.parse_arn(text)


@dataclass(frozen=True)
class KeyRef:
    """What a ``KeyId`` parameter named, before it is looked up.

    Exactly one of ``key_id`` and ``alias_name`` is set.
    """

    key_id: str | None = None
    alias_name: str | None = None


def parse_key_ref(text: str, region: str, account: str) -> KeyRef:
    """Parse a ``KeyId`` parameter: key id, key ARN, alias name or alias ARN.

    An ARN of another region or account names nothing here, as in AWS.

    Raises:
        NotFoundException: a well-formed reference to another region or account, or a
            malformed key id (AWS answers those with NotFound too).
        InvalidArnException: a malformed ARN.
    """
    if not isinstance(text, str) or not text:
        raise ValidationException("KeyId must be a non-empty string")
    if len(text) > 2048:
        raise ValidationException("KeyId is longer than 2048 characters")
    if text.startswith("arn:"):
        arn = parse_arn(text)
        if arn.region != region or arn.account != account:
            raise NotFoundException(f"key {text!r} does not exist in region {region!r}")
        if arn.resource.startswith("alias/"):
            return KeyRef(alias_name=validate_alias_name(arn.resource))
        key_id = arn.resource[len("key/") :]
        if not KEY_ID_RE.fullmatch(key_id):
            raise NotFoundException(f"key {text!r} does not exist in region {region!r}")
        return KeyRef(key_id=key_id)
    if text.startswith("alias/"):
        return KeyRef(alias_name=validate_alias_name(text))
    if not KEY_ID_RE.fullmatch(text):
        raise NotFoundException(f"key {text!r} is not a key id, key ARN, alias or alias ARN")
    return KeyRef(key_id=text)


def validate_alias_name(name: str) -> str:
    """Return ``name`` if it is a valid alias name for a customer key.

    Raises:
        InvalidAliasNameException: it is not.
    """
    if not isinstance(name, str) or not ALIAS_RE.fullmatch(name) or len(name) > ALIAS_MAX:
        raise InvalidAliasNameException(
            f"alias {name!r} is not valid: expected 'alias/' followed by letters, digits,"
            " '/', '_' or '-' (at most 256 characters in all)"
        )
    if name.startswith(RESERVED_ALIAS_PREFIX) or name == "alias/aws":
        raise InvalidAliasNameException(f"alias {name!r} uses the reserved prefix 'alias/aws/'")
    return name


def validate_alias_name_param(name: str) -> str:
    """Return an ``AliasName`` parameter (CreateAlias, UpdateAlias, DeleteAlias) if valid.

    As AWS: a name outside the parameter's pattern ``^[a-zA-Z0-9:/_-]+$`` or longer than
    256 characters fails the request's validation; one inside it that is no alias of a
    customer key (no ``alias/`` prefix, a ``:``, the reserved ``alias/aws/``) is an invalid
    alias name.

    Raises:
        ValidationException: outside the parameter's pattern or length.
        InvalidAliasNameException: not a valid alias name for a customer key.
    """
    if not isinstance(name, str) or not ALIAS_NAME_PARAM_RE.fullmatch(name):
        raise ValidationException(
            f"AliasName {name!r} is not valid: expected 1 to {ALIAS_MAX} of the characters"
            " A-Z, a-z, 0-9, ':', '/', '_' and '-'"
        )
    return validate_alias_name(name)


# --- encryption context ------------------------------------------------------------------

EncryptionContext = dict[str, str]


def validate_context(context: object) -> EncryptionContext:
    """Check an ``EncryptionContext`` parameter and return it as a plain dict.

    Raises:
        ValidationException: not a mapping of non-empty strings to strings, or too large.
    """
    if context is None:
        return {}
    if not isinstance(context, dict):
        raise ValidationException("EncryptionContext must be a map of strings to strings")
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValidationException("EncryptionContext must be a map of strings to strings")
        if not key:
            raise ValidationException("EncryptionContext keys must not be empty")
    if len(encode_context(context)) > MAX_CONTEXT_BYTES:
        raise ValidationException(
            f"EncryptionContext is larger than {MAX_CONTEXT_BYTES} bytes when encoded"
        )
    return dict(context)


# Recent encodings: a call encodes its context twice (size check, then AAD).
_encoded: dict[tuple[tuple[str, str], ...], bytes] = {}


def encode_context(context: EncryptionContext) -> bytes:
    """The canonical, length-prefixed encoding of an encryption context (of strings)."""
    memo_key = tuple(context.items())
    encoded = _encoded.get(memo_key)
    if encoded is None:
        items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
        out = [struct.pack(">I", len(items))]
        for key, value in items:
            out.append(struct.pack(">I", len(key)))
            out.append(key)
            out.append(struct.pack(">I", len(value)))
            out.append(value)
        encoded = b"".join(out)
        if len(_encoded) >= 64:
            _encoded.clear()
        _encoded[memo_key] = encoded
    return encoded
