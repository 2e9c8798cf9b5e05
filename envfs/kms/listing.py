"""Listing operations (keys, aliases, tags, rotations) and the audit log: reading and
verifying it (operations), archiving and repairing it (calls of the store's owner, not
daemon operations: they write and read files in the caller's process)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from envfs.errors import (
    InvalidMarkerException,
    KMSError,
    NotFoundException,
    ValidationException,
)
from envfs.identity import Caller
from envfs.kms import archive
from envfs.kms.core import (
    ServiceCore,
    _Call,
    _decode_marker,
    _encode_marker,
    _limit,
    _parse_since,
)
from envfs.kms.model import alias_arn, parse_key_ref

_BATCH = 256
Row = TypeVar("Row")


def _paginate(
    req: dict[str, Any],
    kind: str,
    field: str,
    fetch: Callable[[str | None, int], Sequence[Row]],
    cursor: Callable[[Row], str],
    render: Callable[[Row], dict[str, Any] | None],
) -> dict[str, Any]:
    """One page of a listing, AWS style (``Limit``, ``Marker``, ``Truncated``, ``NextMarker``).

    ``fetch(after, n)`` returns up to ``n`` rows after the cursor ``after``; ``render`` turns
    a row into an item, or None to leave it out (rows the caller may not see).
    """
    limit = _limit(req)
    after = _decode_marker(kind, req.get("Marker"))
    items: list[dict[str, Any]] = []
    while True:
        batch = fetch(after, _BATCH)
        for row in batch:
            item = render(row)
            if item is not None:
                if len(items) == limit:
                    assert after is not None
                    return {
                        field: items,
                        "Truncated": True,
                        "NextMarker": _encode_marker(kind, after),
                    }
                items.append(item)
            after = cursor(row)
        if len(batch) < _BATCH:
            return {field: items, "Truncated": False}


def _int_cursor(after: str | None, default: int) -> int:
    try:
        return int(after) if after is not None else default
    except ValueError:
        raise InvalidMarkerException("the marker is not valid") from None


class ListingOps(ServiceCore):
    def _op_list_keys(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        call.action = "kms:ListKeys"

        def render(key_id: str) -> dict[str, Any] | None:
            key = self.store.get_key(key_id)
            if key is None or not self._visible(call.caller, key):
                return None
            return {"KeyId": key_id, "KeyArn": self._arn(key_id)}

        return _paginate(req, "keys", "Keys", self.store.list_key_ids, str, render)

    def _op_list_aliases(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        call.action = "kms:ListAliases"
        key_id = None
        if "KeyId" in req:
            key = self._key(call, req["KeyId"])
            if not self._visible(call.caller, key):
                self._authorize(call, "kms:ListAliases", key)
            key_id = key.key_id

        def render(row: tuple[str, str, float, float]) -> dict[str, Any] | None:
            name, target, created, updated = row
            target_key = self.store.get_key(target)
            if target_key is None or not self._visible(call.caller, target_key):
                return None
            return {
                "AliasName": name,
                "AliasArn": alias_arn(self.region, self.account, name),
                "TargetKeyId": target,
                "CreationDate": created,
                "LastUpdatedDate": updated,
            }

        return _paginate(
            req,
            "aliases",
            "Aliases",
            lambda after, n: self.store.list_aliases(key_id, after, n),
            lambda row: row[0],
            render,
        )

    def _op_list_resource_tags(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:ListResourceTags", key)
        tags = sorted(self.store.tags(key.key_id).items())
        return _paginate(
            req,
            "tags",
            "Tags",
            lambda after, n: [t for t in tags if t[0] > (after or "")][:n],
            lambda tag: tag[0],
            lambda tag: {"TagKey": tag[0], "TagValue": tag[1]},
        )

    def _op_list_key_rotations(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:ListKeyRotations", key)
        versions = self.store.versions(key.key_id)
        arn = self._arn(key.key_id)
        return _paginate(
            req,
            "rotations",
            "Rotations",
            lambda after, n: [v for v in versions if v.version > _int_cursor(after, 1)][:n],
            lambda v: str(v.version),
            lambda v: {"KeyId": arn, "RotationDate": v.created, "RotationType": v.rotation_type},
        )

    def _op_list_key_policies(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:ListKeyPolicies", key)
        _limit(req)  # checked as for any listing; one name fits every page
        after = _decode_marker("policies", req.get("Marker"))
        # A key has one policy, named default, as in AWS.
        return {"PolicyNames": [] if after else ["default"], "Truncated": False}

    def _op_list_audit_records(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._require_account_right(call, "envfs:ListAuditRecords")
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

        def render(rec: dict[str, Any]) -> dict[str, Any] | None:
            when = rec.get("time")
            if since is not None and (not isinstance(when, int | float) or when < since):
                return None
            if wanted is not None and wanted not in (
                rec.get("key_arn"),
                rec.get("destination_key_arn"),
            ):
                return None
            return rec

        return _paginate(
            req,
            "audit",
            "Records",
            lambda after, n: self.store.audit_records(_int_cursor(after, 0), n),
            lambda rec: str(rec["seq"]),
            render,
        )

    def _op_verify_audit(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._require_account_right(call, "envfs:VerifyAudit")
        verification = self.store.audit_verification()
        problem = verification.problem
        return {
            "Valid": problem is None,
            "Records": verification.records,
            "Checkpoint": verification.checkpoint,
            "Problem": problem.text if problem is not None else None,
            "DamagedRecord": problem.seq if problem is not None else None,
            "Repairable": problem is not None and problem.repairable,
        }

    # --- the store owner's calls: archive, repair, verify archives ----------------------

    def _owner_call(
        self, caller: Caller, operation: str, request: dict[str, Any], check: Callable[[], None]
    ) -> _Call:
        """A call of the audit log's owner, audited like an operation: ``check`` (the
        request's values), then the account-level right; a refusal is audited and raised."""
        call = _Call(caller, self._clock(), operation, f"envfs:{operation}", request=request)
        try:
            check()
            self._require_account_right(call, call.action or operation)
        except KMSError as exc:
            with self.store.transaction():
                self.store.append_audit(call.record(exc))
            raise
        return call

    def archive_audit_records(
        self, caller: Caller, path: Path, *, before: str | None = None, keep: int | None = None
    ) -> dict[str, Any]:
        """Archive the oldest audit records to ``path`` and delete them from the log
        (``KeyStore.archive_audit``): those before the newest ``keep``, or those older
        than ``before`` (ISO 8601 or seconds since the epoch). Root or the key creators
        group only; audited as ``ArchiveAuditRecords``.

        Raises:
            ValidationException, AccessDeniedException: audited and raised.
            AuditVerificationError: the log does not verify; UsageError: see the store.
        """
        request: dict[str, Any] = {"Archive": str(Path(path).absolute())}
        request.update({"Before": before} if before is not None else {"Keep": keep})
        when: list[float] = []

        def check() -> None:
            if (before is None) == (keep is None):
                raise ValidationException("give exactly one of Before and Keep")
            if keep is not None and keep < 0:
                raise ValidationException(f"Keep must be 0 or more, got {keep}")
            if before is not None:
                when.append(_parse_since(before))

        call = self._owner_call(caller, "ArchiveAuditRecords", request, check)
        return self.store.archive_audit(
            Path(path), call.record(None), keep=keep, before=when[0] if when else None
        )

    def repair_audit(self, caller: Caller, path: Path) -> dict[str, Any]:
        """Move the damage that keeps the log from taking records into the quarantine
        archive ``path`` (``KeyStore.repair_audit``), and verify the log again. Root or
        the key creators group only; audited as ``RepairAudit``."""
        request = {"Archive": str(Path(path).absolute())}
        call = self._owner_call(caller, "RepairAudit", request, lambda: None)
        answer = self.store.repair_audit(Path(path), call.record(None))
        verification = self.store.audit.verify()
        problem = verification.problem
        answer.update(
            Valid=problem is None,
            Remaining=problem.text if problem is not None else None,
            Records=verification.records,
            Checkpoint=verification.checkpoint,
        )
        return answer

    def verify_audit_archives(self, caller: Caller, paths: Sequence[Path]) -> dict[str, Any]:
        """Check archives with this store's audit key, and how they chain to each other and
        to the log's checkpoint. Root or the key creators group only; audited as
        ``VerifyAuditArchives``."""
        request = {"Archives": [str(Path(path).absolute()) for path in paths]}
        call = self._owner_call(caller, "VerifyAuditArchives", request, lambda: None)
        reports, checkpoint = self.store.verify_audit_archives(list(paths), call.record(None))
        problem, notes = archive.continuity(reports, checkpoint)
        return {
            "Valid": problem is None and all(r.problem is None for r in reports),
            "Archives": [
                {
                    "File": str(r.path),
                    "Kind": r.kind,
                    "Start": r.start.seq if r.start is not None else None,
                    "FirstRecord": r.first,
                    "LastRecord": r.last,
                    "Records": r.records,
                    "Problem": r.problem,
                    "Linked": r.linked,
                    "Unlinked": r.unlinked,
                }
                for r in reports
            ],
            "Checkpoint": checkpoint.seq if checkpoint is not None else None,
            "Problem": problem,
            "Notes": notes,
        }
