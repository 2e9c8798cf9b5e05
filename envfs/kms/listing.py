"""Listing operations (keys, aliases, tags, rotations) and the audit log's read side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from envfs.errors import (
    InvalidMarkerException,
    NotFoundException,
)
from envfs.kms.core import (
    ServiceCore,
    _Call,
    _decode_marker,
    _encode_marker,
    _limit,
    _parse_since,
)
from envfs.kms.model import (
    alias_arn,
    parse_key_ref,
)

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
            if since is not None and float(rec.get("time", 0)) < since:
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
        count, problem = self.store.verify_audit()
        return {"Valid": problem is None, "Records": count, "Problem": problem}
