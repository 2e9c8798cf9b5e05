"""The core of the key service: one call's life (validate, run, audit, commit), key
lookup, policy and state checks, and the sealing helpers every operation shares.

Each call is one store transaction: the operation runs, its audit record is appended
and the transaction commits durably, so a call that returned is never lost. A failed
call leaves only its audit record, and costs little: the transaction of an operation
that may change a key is rolled back (nothing was synced) and the record committed on
its own without a sync, and the record is bounded in size (large fields are replaced by
their size and SHA-256, ``_bounded_failure``). A service made with ``batch_audit`` runs
the calls that only read the store (the ones a filesystem makes per open and create)
without a transaction: their records go to the store's journal and join the chain in
batches.

Order of checks, as AWS does it: request shape, key lookup (NotFoundException), key
policy (AccessDeniedException), key state (DisabledException, KMSInvalidStateException),
then the work itself.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from envfs import crypto
from envfs.errors import (
    AccessDeniedException,
    DisabledException,
    IncorrectKeyException,
    InvalidCiphertextException,
    InvalidMarkerException,
    KMSError,
    KMSInvalidStateException,
    MalformedPolicyDocumentException,
    NotFoundException,
    TagException,
    ThrottlingException,
    ValidationException,
)
from envfs.identity import Caller
from envfs.kms import blob
from envfs.kms.model import (
    KEY_USAGE,
    ORIGIN,
    SYMMETRIC_DEFAULT,
    EncryptionContext,
    KeyState,
    key_arn,
    parse_key_ref,
)
from envfs.kms.operations import OPERATIONS, Operation, ParamType, validate_request
from envfs.kms.policy import KeyPolicy, RequestContext
from envfs.kms.store import KeyRecord, KeyStore

DAY = 86400.0
# Calls whose audit records a service made with ``batch_audit`` writes to its journal and
# adds to the chain in batches (KeyStore.append_audit_batched): the calls a filesystem
# makes per open and create, which only read the store.
BATCHED_OPERATIONS = frozenset(
    {
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateRandom",
        "DescribeKey",
    }
)
# Calls that change no key: their transaction adds only the audit record, committed with
# synchronous=NORMAL (safe against a crash of the service; the last records of such calls
# may be lost on power loss). Key changes are committed with FULL. About 2x faster per call.
AUDIT_ONLY_OPERATIONS = BATCHED_OPERATIONS | {
    "ListKeys",
    "ListAliases",
    "ListResourceTags",
    "GetKeyRotationStatus",
    "ListKeyRotations",
    "GetKeyPolicy",
    "ListKeyPolicies",
    "ListAuditRecords",
    "VerifyAudit",
    "ListAccessKeys",
}
SWEEP_INTERVAL = 1.0  # seconds between checks for due rotations and deletions in handle()
MAX_PLAINTEXT = 4096
MAX_DESCRIPTION = 8192
MAX_TAGS = 50
MAX_ON_DEMAND_ROTATIONS = 10
DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}
# A failed call's audit record: at most FAILED_RECORD_CHARS characters of JSON as stored
# (seq included), however large its request. See _bounded_failure and docs/kms.md §8.
FAILED_RECORD_CHARS = 4096
FAILED_CONTEXT_CHARS = 1024  # a larger context is kept as its size and digest
FAILED_MESSAGE_CHARS = 1024  # a longer message is cut
_SEQ_ROOM = 32  # '"seq":<u64>,' in the stored text
_AUDIT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # as audit.py stores


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
    access_key_id: str | None = None  # the access key a call created or named

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
            rec["via"] = {"service": self.caller.via, "uid": self.caller.via_uid}
        if self.caller.access_key_id is not None:
            rec["signed_with"] = {
                "access_key_id": self.caller.access_key_id,
                "source": self.caller.source,
            }
        if self.destination_key_arn is not None:
            rec["destination_key_arn"] = self.destination_key_arn
        if self.access_key_id is not None:
            rec["access_key_id"] = self.access_key_id
        if self.context is not None:
            rec["encryption_context"] = self.context
        if self.request:
            rec["request"] = self.request
        if error is not None:
            rec["message"] = error.message
            _bounded_failure(rec)
        return rec


def _bounded_failure(rec: dict[str, Any]) -> None:
    """Bound a failed call's record: anyone may make a call fail, with up to a MiB of
    request, and every failed call is recorded.

    The message is cut to FAILED_MESSAGE_CHARS characters (ending in ``...``); an
    encryption context whose JSON exceeds FAILED_CONTEXT_CHARS, and then, while the record
    exceeds FAILED_RECORD_CHARS, the request and the message, are moved to ``omitted`` as
    ``{"chars": N, "sha256": hex}`` of their canonical JSON text (keys sorted, no spaces,
    ASCII), so that a reader holding the value can still match it.
    """
    message = rec["message"]
    if len(message) > FAILED_MESSAGE_CHARS:
        rec["message"] = message[:FAILED_MESSAGE_CHARS] + "..."
    omitted: dict[str, Any] = {}
    context = rec.get("encryption_context")
    if context is not None and len(_AUDIT_JSON.encode(context)) > FAILED_CONTEXT_CHARS:
        omitted["encryption_context"] = _digest(rec.pop("encryption_context"))
    for name in ("request", "message"):
        size = len(_AUDIT_JSON.encode({**rec, "omitted": omitted})) + _SEQ_ROOM
        if size <= FAILED_RECORD_CHARS:
            break
        if name in rec:
            omitted[name] = _digest(rec.pop(name))
    if omitted:
        rec["omitted"] = omitted


def _digest(value: object) -> dict[str, Any]:
    text = _AUDIT_JSON.encode(value)
    return {"chars": len(text), "sha256": crypto.sha256(text.encode()).hex()}


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


OperationHandler = Callable[[Any, _Call, dict[str, Any]], dict[str, Any]]
"""An operation's method, unbound: ``handler(service, call, request) -> response``."""


class ServiceCore:
    """Shared machinery of :class:`envfs.kms.service.KeyService`; see that class."""

    # Each operation's method, by AWS name: the table in KeyService.
    HANDLERS: ClassVar[Mapping[str, OperationHandler]]

    def __init__(
        self,
        store: KeyStore,
        *,
        clock: Callable[[], float] = time.time,
        batch_audit: bool = False,
    ) -> None:
        """Args:
        store: the region's open key store.
        clock: returns the time in seconds since the epoch; injectable for tests.
        batch_audit: the audit records of the calls in ``BATCHED_OPERATIONS`` go to a
            journal first and into the chain in batches (``docs/kms.md`` §8): such a
            call costs no transaction. Only for one long-running process that calls
            :meth:`flush_audit` now and then (the mount); a record is in the chain within
            ``auditbatch.BATCH_SECONDS`` of its call once ``flush_audit`` runs that often.
        """
        self.store = store
        self._batch_audit = batch_audit
        self.region = store.region
        self.account = store.account
        self._clock = clock
        self._policies: dict[str, KeyPolicy] = {}
        self._materials: dict[tuple[str, int], bytes] = {}
        self._next_sweep = 0.0

    def close(self) -> None:
        self._materials.clear()
        self.store.close()

    def flush_audit(self) -> None:
        """Add batched audit records to the chain if they are due (see ``batch_audit``).

        Raises:
            StoreError and the like: the records stay in the journal, for a later try.
        """
        if self.store.audit_due():
            self.store.flush_audit()

    def handle(self, caller: Caller, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Perform one operation for ``caller``; AWS request and response shapes.

        Raises:
            KMSError: the AWS-named error of the call (the call is audited either way).
        """
        call = _Call(caller, self._clock(), str(operation)[:64])
        if call.now >= self._next_sweep:
            # Due deletions and rotations happen before the call, in their own
            # transactions: inside the call's transaction a failing call would undo them.
            self.run_due_tasks()
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
        if self._batch_audit and op.name in BATCHED_OPERATIONS:
            self.flush_audit()
            with self.store.reading():
                try:
                    result = self.HANDLERS[op.name](self, call, req)
                except KMSError as exc:
                    error = exc
            self.store.append_audit_batched(call.record(error))
            if error is not None:
                raise error
            return result
        if op.name in AUDIT_ONLY_OPERATIONS:
            # A call that changes no key: its record is all it writes, failed or not.
            with self.store.transaction(durable=False):
                try:
                    result = self.HANDLERS[op.name](self, call, req)
                except KMSError as exc:
                    error = exc
                self.store.append_audit(call.record(error))
        else:
            try:
                with self.store.transaction():
                    result = self.HANDLERS[op.name](self, call, req)
                    self.store.append_audit(call.record(None))
            except KMSError as exc:
                # Rolled back, nothing synced: the failed call changed nothing, so its
                # record needs no sync either (a denied PutKeyPolicy costs no fsync).
                error = exc
                with self.store.transaction(durable=False):
                    self.store.append_audit(call.record(error))
        if error is not None:
            raise error
        return result

    def record_refusal(self, caller: Caller, operation: str, error: KMSError) -> None:
        """Audit a call refused before it reached an operation (by the daemon's trust rules)."""
        call = _Call(caller, self._clock(), str(operation)[:64])
        call.action = OPERATIONS[operation].action if operation in OPERATIONS else None
        with self.store.transaction():
            self.store.append_audit(call.record(error))

    def record_throttled(
        self, caller: Caller, calls: int, connections: int, first: float, last: float
    ) -> None:
        """Audit, in one record, what the daemon refused ``caller``'s uid for its limits
        (``docs/kms.md`` §9): refused calls cost no record of their own."""
        call = _Call(caller, self._clock(), "ThrottleSummary")
        refusal = ThrottlingException(
            f"{calls} calls and {connections} connections of uid {caller.uid} were refused"
            " for exceeding its limits"
        )
        record = call.record(refusal)
        record["throttled"] = {
            "calls": calls,
            "connections": connections,
            "first": first,
            "last": last,
        }
        with self.store.transaction(durable=False):
            self.store.append_audit(record)

    def run_due_tasks(self) -> None:
        """Carry out due automatic rotations and deletions (at start and on a timer)."""
        now = self._clock()
        self._next_sweep = now + SWEEP_INTERVAL
        destroyed = False
        for key_id in self.store.due_key_ids(now):
            with self.store.transaction():
                key = self.store.get_key(key_id)
                if key is not None and self._apply_due(key, now) is None:
                    destroyed = True
        if destroyed:
            self.store.checkpoint()

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
        """A key by id; one whose deletion is due is gone already (the sweep destroys it)."""
        key = self.store.get_key(key_id)
        if key is None or (
            key.state is KeyState.PENDING_DELETION
            and key.deletion_date is not None
            and key.deletion_date <= call.now
        ):
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
                raise NotFoundException(f"alias {text!r} is not found in region {self.region!r}")
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

    def _check_lockout(self, call: _Call, policy: KeyPolicy, key_id: str, bypass: bool) -> None:
        """AWS's lockout safety check: the new policy must let the caller put a policy again."""
        if bypass:
            return
        arn = self._arn(key_id)
        if not policy.names_principal_for("kms:PutKeyPolicy", call.caller, resource_arn=arn):
            raise MalformedPolicyDocumentException(
                "the new key policy will not allow you to update the key policy in the future"
                " (set BypassPolicyLockoutSafetyCheck to do this anyway)"
            )

    def _visible(self, caller: Caller, key: KeyRecord) -> bool:
        return self._account_right(caller) or self._allowed(caller, "kms:DescribeKey", key, None)
