"""The audit log: every key-service call, in a MAC chain that shows edits and removals.

Records live in the store's ``audit`` table (``seq``, JSON ``record``, ``mac``), written in
the same transaction as the change they describe::

    mac_n = HMAC-SHA256(audit key, mac_(n-1) || u64 n || record_n),  mac_0 = 32 zero bytes
    meta "audit_head" = u64 n || mac_n || HMAC-SHA256(audit key, "head" || u64 n || mac_n)

The head is written at init too (n = 0), so an emptied log, a removed record at the end,
in the middle or at the start, and an edited record are all detected by :meth:`verify`.
The audit key is derived from the root key: whoever holds the root key can rewrite the
log (see the threat model in ``docs/kms.md``).
"""

from __future__ import annotations

import json
import sqlite3
import struct
from typing import Any

from envfs import crypto

# Records as stored: keys sorted, no spaces (one encoder, made once).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


class EncodedRecord:
    """A record's canonical JSON text in two halves: the members whose keys sort before
    ``"seq"`` and those after (each without braces). A record is encoded once: its text
    without ``seq`` goes to the journal (:attr:`text`), its text with ``seq`` to the chain
    (:meth:`with_seq`), exactly as ``_ENCODER.encode({"seq": seq, **record})`` would give.
    """

    __slots__ = ("after", "before")

    def __init__(self, record: dict[str, Any]) -> None:
        before = {k: v for k, v in record.items() if k < "seq"}
        after = {k: v for k, v in record.items() if k > "seq"}
        if len(before) + len(after) != len(record):
            raise ValueError("an audit record has no 'seq' of its own")
        self.before = _ENCODER.encode(before)[1:-1]
        self.after = _ENCODER.encode(after)[1:-1]

    @property
    def text(self) -> str:
        """The canonical JSON text of the record (without ``seq``)."""
        return "{" + ",".join(part for part in (self.before, self.after) if part) + "}"

    def with_seq(self, seq: int) -> str:
        """The canonical JSON text of the record with ``seq``, as stored in the chain."""
        parts = (self.before, f'"seq":{seq}', self.after)
        return "{" + ",".join(part for part in parts if part) + "}"


class AuditLog:
    """The audit chain of one store; writes happen inside the store's transactions."""

    def __init__(self, conn: sqlite3.Connection, key: bytes) -> None:
        self._conn = conn
        self._key = key
        # The head as this connection last wrote it; the store forgets it whenever another
        # connection may have appended (see KeyStore.transaction) and on rollback.
        self._known_head: tuple[int, bytes] | None = None

    def forget_head(self) -> None:
        self._known_head = None

    def _mac(self, prev: bytes, seq: int, record: bytes) -> bytes:
        return crypto.hmac_sha256(self._key, prev + struct.pack(">Q", seq) + record)

    def _head_mac(self, seq: int, mac: bytes) -> bytes:
        return crypto.hmac_sha256(self._key, b"head" + struct.pack(">Q", seq) + mac)

    def _head(self) -> tuple[int, bytes]:
        if self._known_head is not None and self._conn.in_transaction:
            return self._known_head
        row = self._conn.execute("SELECT value FROM meta WHERE name='audit_head'").fetchone()
        if row is None:
            return 0, bytes(32)
        raw = bytes(row[0])
        return struct.unpack(">Q", raw[:8])[0], raw[8:40]

    def append(self, record: dict[str, Any]) -> int:
        """Append one record to the chain (inside the caller's transaction)."""
        return self.extend([EncodedRecord(record)])

    def extend(self, records: list[EncodedRecord]) -> int:
        """Append records to the chain in order, the head written once (inside the caller's
        transaction); the last record's sequence number."""
        seq, mac = self._head()
        rows = []
        for record in records:
            seq += 1
            body = record.with_seq(seq)
            mac = self._mac(mac, seq, body.encode())
            rows.append((seq, body, mac))
        if rows:
            self._conn.executemany("INSERT INTO audit VALUES (?, ?, ?)", rows)
            self.write_head(seq, mac)
        return seq

    def write_head(self, seq: int, mac: bytes) -> None:
        head = struct.pack(">Q", seq) + mac + self._head_mac(seq, mac)
        self._conn.execute(
            "INSERT INTO meta VALUES ('audit_head', ?) ON CONFLICT(name) DO UPDATE"
            " SET value=excluded.value",
            (head,),
        )
        self._known_head = (seq, mac)

    def records(self, after_seq: int, limit: int) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT record FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        out = []
        for (text,) in rows:
            try:
                out.append(json.loads(text))
            except ValueError:
                out.append({"corrupt": True})
        return out

    def verify(self) -> tuple[int, str | None]:
        """Walk the chain: ``(records, None)`` if intact, else ``(checked, problem)``."""
        prev = bytes(32)
        expected = 1
        for seq, text, mac in self._conn.execute("SELECT seq, record, mac FROM audit ORDER BY seq"):
            if seq != expected:
                return expected - 1, f"record {expected} is missing"
            if not crypto.constant_time_equal(self._mac(prev, seq, text.encode()), bytes(mac)):
                return expected - 1, f"record {seq} was altered"
            prev = bytes(mac)
            expected += 1
        count = expected - 1
        row = self._conn.execute("SELECT value FROM meta WHERE name='audit_head'").fetchone()
        if row is None:
            return count, "the audit head is missing"
        raw = bytes(row[0])
        head_seq = struct.unpack(">Q", raw[:8])[0]
        if not crypto.constant_time_equal(self._head_mac(head_seq, raw[8:40]), raw[40:72]):
            return count, "the audit head was altered"
        if head_seq != count or not crypto.constant_time_equal(raw[8:40], prev):
            return count, f"records after {count} were removed (the log had {head_seq})"
        return count, None
