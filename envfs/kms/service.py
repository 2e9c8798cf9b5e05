"""``KeyService``: every key-service operation, performed for a given caller.

Each call is one store transaction: the operation runs inside a savepoint (undone if it
fails), then its audit record is appended and the transaction commits durably, so a
call that returned is never lost and a failed call leaves only its audit record.

Order of checks, as AWS does it: request shape, key lookup (NotFoundException), key
policy (AccessDeniedException), key state (DisabledException, KMSInvalidStateException),
then the work itself.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envfs import crypto
from envfs.errors import (
    AccessDeniedException,
    AlreadyExistsException,
    DisabledException,
    IncorrectKeyException,
    InvalidCiphertextException,
    InvalidMarkerException,
    KMSError,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from envfs.kms import blob
from envfs.kms.model import (
    KEY_USAGE,
    ORIGIN,
    SYMMETRIC_DEFAULT,
    Caller,
    EncryptionContext,
    KeyState,
    alias_arn,
    key_arn,
    new_key_id,
    parse_key_ref,
    validate_alias_name,
    validate_context,
)
from envfs.kms.operations import OPERATIONS, Operation, ParamType, validate_request
from envfs.kms.policy import KeyPolicy, RequestContext, default_policy
from envfs.kms.store import KeyRecord, KeyStore

DAY = 86400.0
MAX_PLAINTEXT = 4096
MAX_DESCRIPTION = 8192
MAX_TAGS = 50
MAX_ON_DEMAND_ROTATIONS = 10
DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}
MANAGEMENT_BLOCKED_WHEN_PENDING = "is pending deletion"


@dataclass
class _Call:
    """One call in progress: who, when, and what its audit record will say."""

    caller: Caller
    now: float
    operation: str
    action: str | None = None
    key_arn: str | None = None
    destination_key_arn: str | None = None
    context: EncryptionContext | None = None
    request: dict[str, Any] = field(default_factory=dict)

    def record(self, error: KMSError | None) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "time": self.now,
            "caller": {
                "uid": self.caller.uid,
                "user": self.caller.user_name,
                "gid": self.caller.gid,
            },
            "operation": self.operation,
            "action": self.action,
            "key_arn": self.key_arn,
            "outcome": "Success" if error is None else error.aws_name,
        }
        if self.caller.via is not None:
            rec["via"] = self.caller.via
        if self.destination_key_arn is not None:
            rec["destination_key_arn"] = self.destination_key_arn
        if self.context is not None:
            rec["encryption_context"] = self.context
        if self.request:
            rec["request"] = self.request
        if error is not None:
            rec["message"] = error.message
        return rec


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _safe_request(op: Operation, req: Mapping[str, Any]) -> dict[str, Any]:
    """The request as the audit log may keep it: no blobs, contexts apart, long text hashed."""
    out: dict[str, Any] = {}
    for param in op.params:
        if param.name not in req or param.type in (ParamType.BLOB, ParamType.CONTEXT):
            continue
        value = req[param.name]
        if param.name == "Policy":
            value = "sha256:" + crypto.sha256(value.encode()).hex()
        elif isinstance(value, str) and len(value) > 256:
            value = value[:256] + "..."
        out[param.name] = value
    return out


def _encode_marker(kind: str, value: str) -> str:
    """An opaque pagination marker; ``kind`` keeps one listing's markers out of another."""
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode()


def _decode_marker(kind: str, marker: str | None) -> str | None:
    if marker is None:
        return None
    try:
        text = base64.b64decode(marker.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):
        text = ""
    if not text.startswith(kind + ":"):
        raise InvalidMarkerException(f"marker {marker!r} is not valid")
    return text[len(kind) + 1 :]


def _limit(req: Mapping[str, Any]) -> int:
    limit = int(req.get("Limit", 100))
    if not 1 <= limit <= 1000:
        raise ValidationException(f"Limit must be between 1 and 1000, got {limit}")
    return limit


def _parse_since(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValidationException(
            f"Since {text!r} is neither an ISO 8601 time nor seconds since the epoch"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


class KeyService:
    """The key service of one region, over one :class:`KeyStore`.

    Args:
        store: the region's open key store.
        clock: returns the time in seconds since the epoch; injectable for tests.
    """

    def __init__(self, store: KeyStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.region = store.region
        self.account = store.account
        self._clock = clock
        self._policies: dict[str, KeyPolicy] = {}
        self._materials: dict[tuple[str, int], bytes] = {}
        self._handlers: dict[str, Callable[[_Call, dict[str, Any]], dict[str, Any]]] = {
            name: getattr(self, "_op_" + _snake(name)) for name in OPERATIONS
        }

    def close(self) -> None:
        self._materials.clear()
        self.store.close()

    # --- entry points ------------------------------------------------------------------

    def handle(self, caller: Caller, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Perform one operation for ``caller``; AWS request and response shapes.

        Raises:
            KMSError: the AWS-named error of the call (the call is audited either way).
        """
        call = _Call(caller, self._clock(), str(operation)[:64])
        try:
            op, req = validate_request(operation, params)
            call.action = op.action
            call.request = _safe_request(op, req)
        except KMSError as exc:
            with self.store.transaction():
                self.store.append_audit(call.record(exc))
            raise
        error: KMSError | None = None
        result: dict[str, Any] = {}
        with self.store.transaction():
            try:
                with self.store.savepoint():
                    result = self._handlers[op.name](call, req)
            except KMSError as exc:
                error = exc
            self.store.append_audit(call.record(error))
        if error is not None:
            raise error
        return result

    def run_due_tasks(self) -> None:
        """Carry out due automatic rotations and deletions (at start and on a timer)."""
        now = self._clock()
        destroyed = False
        for key_id in self.store.due_key_ids(now):
            with self.store.transaction():
                key = self.store.get_key(key_id)
                if key is not None and self._apply_due(key, now) is None:
                    destroyed = True
        if destroyed:
            self.store.checkpoint()

    # --- keys, policy, state -----------------------------------------------------------

    def _arn(self, key_id: str) -> str:
        return key_arn(self.region, self.account, key_id)

    def _system_record(self, operation: str, key_id: str, now: float) -> None:
        self.store.append_audit(
            {
                "time": now,
                "caller": {"uid": None, "user": "envfs-kms", "gid": None},
                "operation": operation,
                "action": None,
                "key_arn": self._arn(key_id),
                "outcome": "Success",
            }
        )

    def _apply_due(self, key: KeyRecord, now: float) -> KeyRecord | None:
        """Destroy or rotate ``key`` if that is due; None if it no longer exists."""
        if (
            key.state is KeyState.PENDING_DELETION
            and key.deletion_date is not None
            and key.deletion_date <= now
        ):
            self.store.destroy_key(key.key_id)
            self._materials = {k: v for k, v in self._materials.items() if k[0] != key.key_id}
            self._system_record("DeleteKey", key.key_id, now)
            return None
        if (
            key.state is KeyState.ENABLED
            and key.next_rotation is not None
            and key.next_rotation <= now
            and key.rotation_period_days is not None
        ):
            self._add_version(key.key_id, now, "AUTOMATIC")
            period = key.rotation_period_days * DAY
            key.next_rotation += period
            if key.next_rotation <= now:
                key.next_rotation = now + period
            self.store.update_key(key)
            self._system_record("RotateKey", key.key_id, now)
        return key

    def _add_version(self, key_id: str, now: float, rotation_type: str | None) -> int:
        versions = self.store.versions(key_id)
        version = versions[-1].version + 1 if versions else 1
        self.store.add_version(
            key_id, version, crypto.random_bytes(crypto.KEY_SIZE), now, rotation_type
        )
        return version

    def _not_found(self, text: str) -> NotFoundException:
        return NotFoundException(f"key {text!r} does not exist in region {self.region!r}")

    def _load(self, call: _Call, key_id: str, shown_as: str) -> KeyRecord:
        key = self.store.get_key(key_id)
        if key is not None:
            key = self._apply_due(key, call.now)
        if key is None:
            raise self._not_found(shown_as)
        return key

    def _key(self, call: _Call, text: str, *, allow_alias: bool = True) -> KeyRecord:
        """Resolve a KeyId parameter to a key (recording its ARN for the audit)."""
        ref = parse_key_ref(text, self.region, self.account)
        if ref.alias_name is not None:
            if not allow_alias:
                raise ValidationException(f"{text!r} is an alias; give a key id or key ARN")
            alias = self.store.get_alias(ref.alias_name)
            if alias is None:
                raise NotFoundException(
                    f"alias {alias_arn(self.region, self.account, ref.alias_name)!r} is not found"
                )
            key_id = alias[0]
        else:
            assert ref.key_id is not None
            key_id = ref.key_id
        key = self._load(call, key_id, text)
        if call.key_arn is None:
            call.key_arn = self._arn(key.key_id)
        return key

    def _policy(self, text: str) -> KeyPolicy:
        """A stored policy, parsed once. Principal names are not looked up again: a user
        deleted since the policy was written simply matches nobody."""
        policy = self._policies.get(text)
        if policy is None:
            policy = KeyPolicy.parse(text, check_names=False)
            if len(self._policies) > 256:
                self._policies.clear()
            self._policies[text] = policy
        return policy

    def _allowed(
        self, caller: Caller, action: str, key: KeyRecord, context: EncryptionContext | None
    ) -> bool:
        try:
            policy = self._policy(key.policy)
        except MalformedPolicyDocumentException:
            return False  # a stored policy that no longer parses allows nothing
        request = RequestContext(
            action=action,
            caller=caller,
            resource_arn=self._arn(key.key_id),
            account=self.account,
            encryption_context=context,
            via_service=caller.via,
        )
        return policy.allows(request)

    def _authorize(
        self,
        call: _Call,
        action: str,
        key: KeyRecord,
        context: EncryptionContext | None = None,
    ) -> None:
        if not self._allowed(call.caller, action, key, context):
            raise AccessDeniedException(
                f"user {call.caller.describe()} is not authorized to perform {action} on key"
                f" {self._arn(key.key_id)!r}: no key policy statement allows it"
            )

    def _account_right(self, caller: Caller) -> bool:
        """Root and members of the key creators group hold the account-level rights."""
        if caller.uid == 0:
            return True
        group = self.store.key_creators_group
        wanted = group if group.startswith("gid:") else f"group:{group}"
        return wanted in caller.principals()

    def _require_account_right(self, call: _Call, action: str) -> None:
        if not self._account_right(call.caller):
            raise AccessDeniedException(
                f"user {call.caller.describe()} is not authorized to perform {action}: only root"
                f" and members of group {self.store.key_creators_group!r} may"
            )

    def _require_usable(self, key: KeyRecord) -> None:
        """Cryptographic operations need an Enabled key."""
        if key.state is KeyState.DISABLED:
            raise DisabledException(f"key {self._arn(key.key_id)!r} is disabled")
        self._require_not_pending(key)

    def _require_not_pending(self, key: KeyRecord) -> None:
        if key.state is KeyState.PENDING_DELETION:
            raise KMSInvalidStateException(f"key {self._arn(key.key_id)!r} is pending deletion")

    def _material(self, key_id: str, version: int) -> bytes | None:
        material = self._materials.get((key_id, version))
        if material is None:
            material = self.store.get_material(key_id, version)
            if material is not None:
                self._materials[(key_id, version)] = material
        return material

    def _current_version(self, key_id: str) -> int:
        return self.store.versions(key_id)[-1].version

    def _seal(self, key: KeyRecord, plaintext: bytes, context: EncryptionContext) -> bytes:
        version = self._current_version(key.key_id)
        material = self._material(key.key_id, version)
        assert material is not None
        return blob.seal_blob(material, self.region, key.key_id, version, plaintext, context)

    def _open_blob(
        self,
        call: _Call,
        ciphertext: bytes,
        context: EncryptionContext,
        expected_key: str | None,
        action: str,
    ) -> tuple[KeyRecord, bytes]:
        """Authorize and decrypt a blob: the shared half of Decrypt and ReEncrypt."""
        header = blob.parse_blob(ciphertext)
        key = self._load(call, header.key_id, self._arn(header.key_id))
        call.key_arn = self._arn(key.key_id)
        if expected_key is not None:
            wanted = self._key(_Call(call.caller, call.now, call.operation), expected_key)
            if wanted.key_id != key.key_id:
                raise IncorrectKeyException(
                    f"the ciphertext was encrypted under key {self._arn(key.key_id)!r},"
                    f" not under {expected_key!r}"
                )
        self._authorize(call, action, key, context)
        self._require_usable(key)
        material = self._material(key.key_id, header.key_version)
        if material is None:
            raise InvalidCiphertextException("the ciphertext blob is not valid")
        return key, blob.open_blob(material, self.region, header, ciphertext, context)

    def _metadata(self, key: KeyRecord) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "AWSAccountId": self.account,
            "KeyId": key.key_id,
            "Arn": self._arn(key.key_id),
            "CreationDate": key.created,
            "Enabled": key.state is KeyState.ENABLED,
            "Description": key.description,
            "KeyUsage": KEY_USAGE,
            "KeyState": key.state.value,
            "Origin": ORIGIN,
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": SYMMETRIC_DEFAULT,
            "KeySpec": SYMMETRIC_DEFAULT,
            "EncryptionAlgorithms": [SYMMETRIC_DEFAULT],
            "MultiRegion": False,
        }
        if key.state is KeyState.PENDING_DELETION:
            meta["DeletionDate"] = key.deletion_date
            meta["PendingDeletionWindowInDays"] = key.pending_window_days
        return meta

    def _check_tags(self, tags: list[Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for tag in tags:
            if (
                not isinstance(tag, dict)
                or set(tag) - {"TagKey", "TagValue"}
                or not isinstance(tag.get("TagKey"), str)
                or not isinstance(tag.get("TagValue", ""), str)
            ):
                raise TagException("each tag must be {'TagKey': str, 'TagValue': str}")
            tag_key, tag_value = tag["TagKey"], tag.get("TagValue", "")
            if not 1 <= len(tag_key) <= 128 or len(tag_value) > 256:
                raise TagException(
                    f"tag {tag_key!r}: keys must be 1-128 characters, values at most 256"
                )
            if tag_key.lower().startswith("aws:"):
                raise TagException(f"tag key {tag_key!r} uses the reserved prefix 'aws:'")
            if tag_key in out:
                raise TagException(f"tag key {tag_key!r} is given twice")
            out[tag_key] = tag_value
        return out

    @staticmethod
    def _check_algorithm(req: Mapping[str, Any], *names: str) -> None:
        for name in names:
            value = req.get(name, SYMMETRIC_DEFAULT)
            if value != SYMMETRIC_DEFAULT:
                raise ValidationException(
                    f"{name} {value!r} is not supported: only {SYMMETRIC_DEFAULT!r}"
                )

    def _creator_principal(self, caller: Caller) -> str:
        return f"user:{caller.user_name}" if caller.user_name else f"uid:{caller.uid}"

    def _check_lockout(self, call: _Call, policy: KeyPolicy, bypass: bool) -> None:
        if bypass:
            return
        if not policy.names_principal_for("kms:PutKeyPolicy", call.caller):
            raise MalformedPolicyDocumentException(
                "the new key policy will not allow you to update the key policy in the future"
                " (set BypassPolicyLockoutSafetyCheck to do this anyway)"
            )

    def _visible(self, caller: Caller, key: KeyRecord) -> bool:
        return self._account_right(caller) or self._allowed(caller, "kms:DescribeKey", key, None)

    # --- key management ----------------------------------------------------------------

    def _op_create_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        call.action = "kms:CreateKey"
        self._require_account_right(call, "kms:CreateKey")
        for name, allowed in (("KeyUsage", KEY_USAGE), ("KeySpec", SYMMETRIC_DEFAULT)):
            if req.get(name, allowed) != allowed:
                raise ValidationException(
                    f"{name} {req[name]!r} is not supported: only {allowed!r}"
                )
        if req.get("Origin", ORIGIN) != ORIGIN:
            raise UnsupportedOperationException(
                f"Origin {req['Origin']!r} is not supported: only {ORIGIN!r}"
            )
        description = req.get("Description", "")
        if len(description) > MAX_DESCRIPTION:
            raise ValidationException(f"Description is longer than {MAX_DESCRIPTION} characters")
        tags = self._check_tags(req.get("Tags", []))
        if len(tags) > MAX_TAGS:
            raise TagException(f"a key can have at most {MAX_TAGS} tags")
        admins = req.get("KeyAdministrators")
        users = req.get("KeyUsers")
        if "Policy" in req:
            if admins is not None or users is not None:
                raise ValidationException(
                    "give either Policy or KeyAdministrators/KeyUsers, not both"
                )
            policy_text: str = req["Policy"]
            self._check_lockout(
                call, KeyPolicy.parse(policy_text), req.get("BypassPolicyLockoutSafetyCheck", False)
            )
        else:
            creator = self._creator_principal(call.caller)
            policy_text = default_policy(admins or [creator], users or [creator])
        key = KeyRecord(
            key_id=new_key_id(),
            created=call.now,
            description=description,
            state=KeyState.ENABLED,
            deletion_date=None,
            pending_window_days=None,
            rotation_period_days=None,
            next_rotation=None,
            policy=policy_text,
        )
        self.store.insert_key(key)
        self._add_version(key.key_id, call.now, None)
        for tag_key, tag_value in tags.items():
            self.store.set_tag(key.key_id, tag_key, tag_value)
        call.key_arn = self._arn(key.key_id)
        return {"KeyMetadata": self._metadata(key)}

    def _op_describe_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:DescribeKey", key)
        return {"KeyMetadata": self._metadata(key)}

    def _op_list_keys(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        call.action = "kms:ListKeys"
        limit = _limit(req)
        after = _decode_marker("keys", req.get("Marker"))
        keys: list[dict[str, str]] = []
        truncated = False
        while True:
            batch = self.store.list_key_ids(after, 200)
            for key_id in batch:
                after = key_id
                key = self.store.get_key(key_id)
                if key is None or not self._visible(call.caller, key):
                    continue
                if len(keys) == limit:
                    truncated = True
                    break
                keys.append({"KeyId": key_id, "KeyArn": self._arn(key_id)})
            if truncated or len(batch) < 200:
                break
        result: dict[str, Any] = {"Keys": keys, "Truncated": truncated}
        if truncated:
            result["NextMarker"] = _encode_marker("keys", keys[-1]["KeyId"])
        return result

    def _set_state(self, call: _Call, req: dict[str, Any], action: str, state: KeyState) -> None:
        key = self._key(call, req["KeyId"])
        self._authorize(call, action, key)
        self._require_not_pending(key)
        key.state = state
        self.store.update_key(key)

    def _op_enable_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._set_state(call, req, "kms:EnableKey", KeyState.ENABLED)
        return {}

    def _op_disable_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._set_state(call, req, "kms:DisableKey", KeyState.DISABLED)
        return {}

    def _op_schedule_key_deletion(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:ScheduleKeyDeletion", key)
        days = req.get("PendingWindowInDays", 30)
        if not 7 <= days <= 30:
            raise ValidationException(f"PendingWindowInDays must be between 7 and 30, got {days}")
        self._require_not_pending(key)
        key.state = KeyState.PENDING_DELETION
        key.deletion_date = call.now + days * DAY
        key.pending_window_days = days
        self.store.update_key(key)
        return {
            "KeyId": self._arn(key.key_id),
            "DeletionDate": key.deletion_date,
            "KeyState": key.state.value,
            "PendingWindowInDays": days,
        }

    def _op_cancel_key_deletion(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:CancelKeyDeletion", key)
        if key.state is not KeyState.PENDING_DELETION:
            raise KMSInvalidStateException(f"key {self._arn(key.key_id)!r} is not pending deletion")
        key.state = KeyState.DISABLED
        key.deletion_date = None
        key.pending_window_days = None
        self.store.update_key(key)
        return {"KeyId": self._arn(key.key_id)}

    def _op_update_key_description(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:UpdateKeyDescription", key)
        if len(req["Description"]) > MAX_DESCRIPTION:
            raise ValidationException(f"Description is longer than {MAX_DESCRIPTION} characters")
        self._require_not_pending(key)
        key.description = req["Description"]
        self.store.update_key(key)
        return {}

    # --- aliases and tags --------------------------------------------------------------

    def _op_create_alias(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        name = validate_alias_name(req["AliasName"])
        key = self._key(call, req["TargetKeyId"], allow_alias=False)
        self._authorize(call, "kms:CreateAlias", key)
        self._require_not_pending(key)
        if self.store.get_alias(name) is not None:
            raise AlreadyExistsException(
                f"alias {alias_arn(self.region, self.account, name)!r} already exists"
            )
        self.store.put_alias(name, key.key_id, call.now)
        return {}

    def _existing_alias(self, call: _Call, name: str) -> KeyRecord:
        validate_alias_name(name)
        alias = self.store.get_alias(name)
        if alias is None:
            raise NotFoundException(
                f"alias {alias_arn(self.region, self.account, name)!r} is not found"
            )
        return self._load(call, alias[0], name)

    def _op_update_alias(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        old = self._existing_alias(call, req["AliasName"])
        new = self._key(call, req["TargetKeyId"], allow_alias=False)
        call.key_arn = self._arn(old.key_id)
        call.destination_key_arn = self._arn(new.key_id)
        self._authorize(call, "kms:UpdateAlias", old)
        self._authorize(call, "kms:UpdateAlias", new)
        self._require_not_pending(new)
        self.store.put_alias(req["AliasName"], new.key_id, call.now)
        return {}

    def _op_delete_alias(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._existing_alias(call, req["AliasName"])
        call.key_arn = self._arn(key.key_id)
        self._authorize(call, "kms:DeleteAlias", key)
        self.store.delete_alias(req["AliasName"])
        return {}

    def _op_list_aliases(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        call.action = "kms:ListAliases"
        limit = _limit(req)
        after = _decode_marker("aliases", req.get("Marker"))
        key_id = None
        if "KeyId" in req:
            key = self._key(call, req["KeyId"])
            if not self._visible(call.caller, key):
                self._authorize(call, "kms:ListAliases", key)
            key_id = key.key_id
        aliases: list[dict[str, Any]] = []
        truncated = False
        while True:
            batch = self.store.list_aliases(key_id, after, 200)
            for name, target, created, updated in batch:
                after = name
                target_key = self.store.get_key(target)
                if target_key is None or not self._visible(call.caller, target_key):
                    continue
                if len(aliases) == limit:
                    truncated = True
                    break
                aliases.append(
                    {
                        "AliasName": name,
                        "AliasArn": alias_arn(self.region, self.account, name),
                        "TargetKeyId": target,
                        "CreationDate": created,
                        "LastUpdatedDate": updated,
                    }
                )
            if truncated or len(batch) < 200:
                break
        result: dict[str, Any] = {"Aliases": aliases, "Truncated": truncated}
        if truncated:
            result["NextMarker"] = _encode_marker("aliases", aliases[-1]["AliasName"])
        return result

    def _op_tag_resource(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:TagResource", key)
        self._require_not_pending(key)
        tags = self._check_tags(req["Tags"])
        if len(self.store.tags(key.key_id) | tags) > MAX_TAGS:
            raise LimitExceededException(f"a key can have at most {MAX_TAGS} tags")
        for tag_key, tag_value in tags.items():
            self.store.set_tag(key.key_id, tag_key, tag_value)
        return {}

    def _op_untag_resource(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:UntagResource", key)
        self._require_not_pending(key)
        for tag_key in req["TagKeys"]:
            self.store.remove_tag(key.key_id, tag_key)
        return {}

    def _op_list_resource_tags(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:ListResourceTags", key)
        limit = _limit(req)
        after = _decode_marker("tags", req.get("Marker")) or ""
        items = [(k, v) for k, v in self.store.tags(key.key_id).items() if k > after]
        page = items[:limit]
        result: dict[str, Any] = {
            "Tags": [{"TagKey": k, "TagValue": v} for k, v in page],
            "Truncated": len(items) > limit,
        }
        if len(items) > limit:
            result["NextMarker"] = _encode_marker("tags", page[-1][0])
        return result

    # --- cryptographic operations ------------------------------------------------------

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

    # --- rotation ----------------------------------------------------------------------

    def _rotatable(self, call: _Call, req: dict[str, Any], action: str) -> KeyRecord:
        key = self._key(call, req["KeyId"])
        self._authorize(call, action, key)
        self._require_usable(key)
        return key

    def _op_enable_key_rotation(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._rotatable(call, req, "kms:EnableKeyRotation")
        days = req.get("RotationPeriodInDays", 365)
        if not 90 <= days <= 2560:
            raise ValidationException(
                f"RotationPeriodInDays must be between 90 and 2560, got {days}"
            )
        if key.rotation_period_days is None:
            key.next_rotation = call.now + days * DAY
        else:
            last = self.store.versions(key.key_id)[-1].created
            key.next_rotation = last + days * DAY
        key.rotation_period_days = days
        self.store.update_key(key)
        return {}

    def _op_disable_key_rotation(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._rotatable(call, req, "kms:DisableKeyRotation")
        key.rotation_period_days = None
        key.next_rotation = None
        self.store.update_key(key)
        return {}

    def _op_get_key_rotation_status(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:GetKeyRotationStatus", key)
        result: dict[str, Any] = {
            "KeyId": self._arn(key.key_id),
            "KeyRotationEnabled": key.rotation_period_days is not None,
        }
        if key.rotation_period_days is not None:
            result["RotationPeriodInDays"] = key.rotation_period_days
            result["NextRotationDate"] = key.next_rotation
        on_demand = [v for v in self.store.versions(key.key_id) if v.rotation_type == "ON_DEMAND"]
        if on_demand:
            result["OnDemandRotationStartDate"] = on_demand[-1].created
        return result

    def _op_rotate_key_on_demand(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._rotatable(call, req, "kms:RotateKeyOnDemand")
        on_demand = [v for v in self.store.versions(key.key_id) if v.rotation_type == "ON_DEMAND"]
        if len(on_demand) >= MAX_ON_DEMAND_ROTATIONS:
            raise LimitExceededException(
                f"key {self._arn(key.key_id)!r} was already rotated on demand"
                f" {MAX_ON_DEMAND_ROTATIONS} times, the most allowed"
            )
        self._add_version(key.key_id, call.now, "ON_DEMAND")
        return {"KeyId": self._arn(key.key_id)}

    def _op_list_key_rotations(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:ListKeyRotations", key)
        limit = _limit(req)
        marker = _decode_marker("rotations", req.get("Marker"))
        try:
            after = int(marker) if marker is not None else 1
        except ValueError:
            raise InvalidMarkerException(f"marker {req['Marker']!r} is not valid") from None
        rotations = [v for v in self.store.versions(key.key_id) if v.version > after]
        page = rotations[:limit]
        result: dict[str, Any] = {
            "Rotations": [
                {
                    "KeyId": self._arn(key.key_id),
                    "RotationDate": v.created,
                    "RotationType": v.rotation_type,
                }
                for v in page
            ],
            "Truncated": len(rotations) > limit,
        }
        if len(rotations) > limit:
            result["NextMarker"] = _encode_marker("rotations", str(page[-1].version))
        return result

    # --- policy ------------------------------------------------------------------------

    @staticmethod
    def _policy_name(req: Mapping[str, Any]) -> None:
        name = req.get("PolicyName", "default")
        if name != "default":
            raise NotFoundException(f"policy {name!r} does not exist: keys have only 'default'")

    def _op_get_key_policy(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:GetKeyPolicy", key)
        self._policy_name(req)
        return {"Policy": key.policy, "PolicyName": "default"}

    def _op_put_key_policy(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:PutKeyPolicy", key)
        self._policy_name(req)
        policy = KeyPolicy.parse(req["Policy"])
        self._check_lockout(call, policy, req.get("BypassPolicyLockoutSafetyCheck", False))
        self._require_not_pending(key)
        key.policy = req["Policy"]
        self.store.update_key(key)
        return {}

    # --- audit -------------------------------------------------------------------------

    def _op_list_audit_records(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._require_account_right(call, "envfs:ListAuditRecords")
        limit = _limit(req)
        marker = _decode_marker("audit", req.get("Marker"))
        try:
            after = int(marker) if marker is not None else 0
        except ValueError:
            raise InvalidMarkerException(f"marker {req['Marker']!r} is not valid") from None
        since = _parse_since(req["Since"]) if "Since" in req else None
        wanted: str | None = None
        if "KeyId" in req:
            try:
                wanted = self._arn(self._key(_Call(call.caller, call.now, ""), req["KeyId"]).key_id)
            except NotFoundException:
                ref = parse_key_ref(req["KeyId"], self.region, self.account)
                if ref.key_id is None:
                    raise
                wanted = self._arn(ref.key_id)  # a deleted key's records stay readable
        records: list[dict[str, Any]] = []
        truncated = False
        while True:
            batch = self.store.audit_records(after, 500)
            for rec in batch:
                after = int(rec.get("seq", after))
                if since is not None and float(rec.get("time", 0)) < since:
                    continue
                if wanted is not None and wanted not in (
                    rec.get("key_arn"),
                    rec.get("destination_key_arn"),
                ):
                    continue
                if len(records) == limit:
                    truncated = True
                    break
                records.append(rec)
            if truncated or len(batch) < 500:
                break
        result: dict[str, Any] = {"Records": records, "Truncated": truncated}
        if truncated:
            result["NextMarker"] = _encode_marker("audit", str(records[-1]["seq"]))
        return result

    def _op_verify_audit(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._require_account_right(call, "envfs:VerifyAudit")
        count, problem = self.store.verify_audit()
        return {"Valid": problem is None, "Records": count, "Problem": problem}
