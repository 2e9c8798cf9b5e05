"""Key-service vocabulary: key states, ids, ARNs, aliases, callers, encryption contexts.

Identifiers
    key id      ``1234abcd-12ab-34cd-56ef-1234567890ab`` (a random UUID, lowercase)
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

import contextlib
import enum
import grp
import os
import pwd
import re
import struct
import uuid
from dataclasses import dataclass, field

from envfs.errors import (
    InvalidAliasNameException,
    InvalidArnException,
    NotFoundException,
    ValidationException,
)

ARN_PARTITION = "envfs"
DEFAULT_REGION = "local-1"
REGION_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
ACCOUNT_RE = re.compile(r"^[0-9]{12}$")
KEY_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ALIAS_RE = re.compile(r"^alias/[A-Za-z0-9/_-]+$")
ALIAS_MAX = 256
RESERVED_ALIAS_PREFIX = "alias/aws/"
MAX_CONTEXT_BYTES = 8192

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
KEY_USAGE = "ENCRYPT_DECRYPT"
ORIGIN = "ENVFS_KMS"


class KeyState(enum.StrEnum):
    """The states a master key can be in (the subset of AWS's that envfs has)."""

    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PENDING_DELETION = "PendingDeletion"


def validate_region(region: str) -> str:
    """Return ``region`` if it is a well-formed region name.

    Raises:
        ValidationException: it is not.
    """
    if not (1 <= len(region) <= 63) or not REGION_RE.fullmatch(region):
        raise ValidationException(
            f"region {region!r} is not valid: expected lowercase letters, digits and dashes,"
            " like 'local-1' or 'eu-west-1'"
        )
    return region


def new_key_id() -> str:
    """A fresh random key id."""
    return str(uuid.uuid4())


def key_arn(region: str, account: str, key_id: str) -> str:
    return f"arn:{ARN_PARTITION}:kms:{region}:{account}:key/{key_id}"


def alias_arn(region: str, account: str, alias_name: str) -> str:
    return f"arn:{ARN_PARTITION}:kms:{region}:{account}:{alias_name}"


@dataclass(frozen=True)
class Arn:
    region: str
    account: str
    resource: str  # "key/<id>" or "alias/<name>"


def parse_arn(text: str) -> Arn:
    """Split an envfs KMS ARN.

    Raises:
        InvalidArnException: not of the form ``arn:envfs:kms:REGION:ACCOUNT:RESOURCE``.
    """
    parts = text.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "kms":
        raise InvalidArnException(f"ARN {text!r} is not a KMS ARN")
    if parts[1] != ARN_PARTITION:
        raise InvalidArnException(f"ARN {text!r} is not of partition {ARN_PARTITION!r}")
    region, account, resource = parts[3], parts[4], parts[5]
    if not REGION_RE.fullmatch(region) or not ACCOUNT_RE.fullmatch(account):
        raise InvalidArnException(f"ARN {text!r} has a malformed region or account")
    if not (resource.startswith("key/") or resource.startswith("alias/")):
        raise InvalidArnException(f"ARN {text!r} names neither a key nor an alias")
    return Arn(region, account, resource)


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


# --- callers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who is calling: a Unix identity as the kernel reported it.

    ``groups`` holds every group id the caller is counted in (primary included).
    ``via`` names the trusted service acting on the caller's behalf, if any, and
    ``via_uid`` is that service's own uid.
    """

    uid: int
    gid: int
    groups: frozenset[int] = field(default_factory=frozenset)
    user_name: str | None = None
    group_names: frozenset[str] = field(default_factory=frozenset)
    via: str | None = None
    via_uid: int | None = None

    @classmethod
    def from_ids(
        cls,
        uid: int,
        gid: int,
        extra_groups: frozenset[int] = frozenset(),
        via: str | None = None,
        via_uid: int | None = None,
    ) -> Caller:
        """Build a caller from kernel ids, adding the user's groups from the group database.

        The groups are the union of the process's own (``extra_groups``, e.g. from
        ``SO_PEERGROUPS``) and the user's memberships (``getgrouplist``): key policies name
        users and their groups, not a process's momentary group set.
        """
        user_name: str | None
        try:
            user_name = pwd.getpwuid(uid).pw_name
        except KeyError:
            user_name = None
        gids = {gid, *extra_groups}
        if user_name is not None:
            with contextlib.suppress(OSError):
                gids.update(os.getgrouplist(user_name, gid))
        names = set()
        for g in gids:
            try:
                names.add(grp.getgrgid(g).gr_name)
            except KeyError:
                continue
        return cls(uid, gid, frozenset(gids), user_name, frozenset(names), via, via_uid)

    @classmethod
    def current(cls) -> Caller:
        """The calling process's own identity (for the embedded key store)."""
        return cls.from_ids(os.geteuid(), os.getegid(), frozenset(os.getgroups()))

    def principals(self) -> frozenset[str]:
        """Every principal string this caller matches in a key policy."""
        known: frozenset[str] | None = self.__dict__.get("_principals")
        if known is None:
            names = {f"uid:{self.uid}", f"gid:{self.gid}", *(f"gid:{g}" for g in self.groups)}
            if self.user_name is not None:
                names.add(f"user:{self.user_name}")
            names.update(f"group:{n}" for n in self.group_names)
            known = frozenset(names)
            object.__setattr__(self, "_principals", known)  # frozen: derived, never changes
        return known

    def describe(self) -> str:
        """``name(uid)`` for messages and the audit log."""
        return f"{self.user_name}({self.uid})" if self.user_name else f"uid {self.uid}"
