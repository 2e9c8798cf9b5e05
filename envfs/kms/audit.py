"""The audit log: every key-service call, in a MAC chain that shows edits and removals.

Records live in the store's ``audit`` table (``seq``, JSON ``record``, ``mac``), written in
the same transaction as the change they describe. Two ``meta`` rows anchor the chain::

    mac_n = HMAC-SHA256(audit key, mac_(n-1) || u64 n || record_n)
    anchor(label, n, mac) = u64 n || mac || HMAC-SHA256(audit key, label || u64 n || mac)
    meta "audit_head"       = anchor("head", n, mac_n)        n: the last record
    meta "audit_checkpoint" = anchor("checkpoint", c, mac_c)  c: the last archived record

With nothing archived the checkpoint is ``c = 0, mac_0 = 32 zero bytes``; the records in
the table are ``c+1 .. n``. Both anchors are written at init (n = c = 0), so an emptied
log, a removed record at the start, in the middle or at the end, and an edited record
are all detected by :meth:`AuditLog.verify`; the labels keep a head from passing for a
checkpoint. Archiving (:meth:`AuditLog.cut`) deletes records ``c+1 .. e`` and moves the
checkpoint to ``e``, in the transaction that appends the record of the archiving. The
audit key is derived from the root key: whoever holds the root key can rewrite the log
(see the threat model in ``docs/kms.md``).

A log that cannot take a record (the head is missing or altered, or rows sit after it) is
*damaged*: :meth:`AuditLog.extend` raises :class:`DamagedChain` with the problem, and
:meth:`AuditLog.repair_plan` and :meth:`AuditLog.apply_repair` move the damage aside.
Nothing here fails on a damaged row: rows are read as bytes (``CAST(... AS BLOB)``),
whatever SQLite type was planted there, and judged by their MACs.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from envfs import crypto

# Records as stored: keys sorted, no spaces (one encoder, made once).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_U64 = struct.Struct(">Q")
ZERO_MAC = bytes(32)
MAC_SIZE = 32
ANCHOR_SIZE = 8 + MAC_SIZE + MAC_SIZE  # 72
HEAD_LABEL = b"head"
CHECKPOINT_LABEL = b"checkpoint"
HEAD_ROW = "audit_head"
CHECKPOINT_ROW = "audit_checkpoint"
_ROWS = "SELECT seq, CAST(record AS BLOB), CAST(mac AS BLOB) FROM audit"


def chain_mac(key: bytes, prev: bytes, seq: int, record: bytes) -> bytes:
    """``mac_n`` of record ``seq`` (its stored UTF-8 text) after ``prev`` (``mac_(n-1)``)."""
    return crypto.hmac_sha256(key, prev + _U64.pack(seq) + record)


def anchor_tag(key: bytes, label: bytes, seq: int, mac: bytes) -> bytes:
    return crypto.hmac_sha256(key, label + _U64.pack(seq) + mac)


def encode_anchor(key: bytes, label: bytes, seq: int, mac: bytes) -> bytes:
    """The 72 bytes of a head or checkpoint row: ``u64 seq || mac || tag``."""
    return _U64.pack(seq) + mac + anchor_tag(key, label, seq, mac)


@dataclass(frozen=True)
class Anchor:
    """A place in the chain: record ``seq`` and its ``mac`` (seq 0: before the first)."""

    seq: int
    mac: bytes


def decode_anchor(key: bytes, label: bytes, raw: object) -> Anchor | None:
    """The anchor of a head or checkpoint row, or None if it is malformed or its tag
    does not verify under ``key`` with ``label``."""
    if not isinstance(raw, bytes) or len(raw) != ANCHOR_SIZE:
        return None
    (seq,) = _U64.unpack_from(raw)
    mac = raw[8:40]
    if not crypto.constant_time_equal(anchor_tag(key, label, seq, mac), raw[40:]):
        return None
    return Anchor(seq, mac)


@dataclass(frozen=True)
class Problem:
    """What is wrong with the log, in words (``docs/kms.md`` §8 lists them all).

    ``seq`` is the record to blame, when there is one. ``blocking``: the log cannot take
    another record until it is repaired. ``repairable``: :meth:`AuditLog.repair_plan`
    moves the damage aside (every blocking problem is).
    """

    text: str
    seq: int | None = None
    blocking: bool = False
    repairable: bool = False

    def __post_init__(self) -> None:
        if self.blocking:
            object.__setattr__(self, "repairable", True)


@dataclass(frozen=True)
class Verification:
    """The result of :meth:`AuditLog.verify`: ``records`` verified from the checkpoint on."""

    records: int
    checkpoint: int
    problem: Problem | None


class DamagedChain(Exception):
    """The log cannot take a record (see :class:`Problem`); the store turns it into
    ``AuditLogDamagedError``."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.text)
        self.problem = problem


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


Row = tuple[int, bytes, bytes]  # seq, record text (UTF-8 bytes), mac


def _before_checkpoint(seq: int, checkpoint: Anchor) -> Problem:
    return Problem(
        f"record {seq} is in the log, but the checkpoint says records up to"
        f" {checkpoint.seq} were archived",
        seq,
        repairable=True,
    )


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

    # --- anchors -----------------------------------------------------------------------

    def _anchor_rows(self) -> dict[str, object]:
        rows = self._conn.execute(
            "SELECT name, value FROM meta WHERE name IN (?, ?)", (HEAD_ROW, CHECKPOINT_ROW)
        )
        return dict(rows.fetchall())

    def _anchors(self) -> tuple[Anchor | None, Problem | None, Anchor | None, Problem | None]:
        """The head and the checkpoint, each with the problem that keeps it from use."""
        rows = self._anchor_rows()
        head = decode_anchor(self._key, HEAD_LABEL, rows.get(HEAD_ROW))
        checkpoint = decode_anchor(self._key, CHECKPOINT_LABEL, rows.get(CHECKPOINT_ROW))
        head_problem = checkpoint_problem = None
        if checkpoint is None:
            state = "is missing" if CHECKPOINT_ROW not in rows else "was altered"
            checkpoint_problem = Problem(f"the audit checkpoint {state}")
        if head is None:
            state = "is missing" if HEAD_ROW not in rows else "was altered"
            head_problem = Problem(f"the audit head {state}", blocking=True)
        elif checkpoint is not None and head.seq < checkpoint.seq:
            head_problem = Problem(
                f"the audit head (record {head.seq}) is older than the checkpoint (record"
                f" {checkpoint.seq})",
                blocking=True,
            )
            head = None
        return head, head_problem, checkpoint, checkpoint_problem

    def checkpoint(self) -> Anchor:
        """The authenticated checkpoint (records up to it are archived).

        Raises:
            DamagedChain: it is missing or altered.
        """
        _, _, checkpoint, problem = self._anchors()
        if checkpoint is None:
            assert problem is not None
            raise DamagedChain(problem)
        return checkpoint

    def _head(self) -> tuple[int, bytes]:
        if self._known_head is not None and self._conn.in_transaction:
            return self._known_head
        head, problem, _, _ = self._anchors()
        if head is None:
            assert problem is not None
            raise DamagedChain(problem)
        after = self._conn.execute("SELECT seq FROM audit WHERE seq > ? LIMIT 1", (head.seq,))
        if after.fetchone() is not None:
            raise DamagedChain(
                self._head_problem(head) or Problem("rows follow the head", None, True)
            )
        return head.seq, head.mac

    def write_head(self, seq: int, mac: bytes) -> None:
        self._write_anchor(HEAD_ROW, HEAD_LABEL, seq, mac)
        self._known_head = (seq, mac)

    def write_checkpoint(self, seq: int, mac: bytes) -> None:
        self._write_anchor(CHECKPOINT_ROW, CHECKPOINT_LABEL, seq, mac)

    def _write_anchor(self, row: str, label: bytes, seq: int, mac: bytes) -> None:
        self._conn.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
            (row, encode_anchor(self._key, label, seq, mac)),
        )

    # --- appending ---------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> int:
        """Append one record to the chain (inside the caller's transaction)."""
        return self.extend([EncodedRecord(record)])

    def extend(self, records: list[EncodedRecord]) -> int:
        """Append records to the chain in order, the head written once (inside the caller's
        transaction); the last record's sequence number.

        Raises:
            DamagedChain: the log cannot take a record (nothing was written then).
        """
        seq, mac = self._head()
        rows = []
        for record in records:
            seq += 1
            body = record.with_seq(seq)
            mac = chain_mac(self._key, mac, seq, body.encode())
            rows.append((seq, body, mac))
        if rows:
            self._conn.execute("SAVEPOINT audit_extend")
            try:
                self._conn.executemany("INSERT INTO audit VALUES (?, ?, ?)", rows)
            except sqlite3.IntegrityError:
                # A row already sits where the next record goes: not ours to overwrite.
                self._conn.execute("ROLLBACK TO audit_extend")
                self._conn.execute("RELEASE audit_extend")
                self.forget_head()
                problem = self.blocking_problem() or Problem(
                    f"record {rows[0][0]} already exists after the audit head", rows[0][0], True
                )
                raise DamagedChain(problem) from None
            self._conn.execute("RELEASE audit_extend")
            self.write_head(seq, mac)
        return seq

    # --- reading -----------------------------------------------------------------------

    def _rows(self, where: str = "", args: tuple[int, ...] = (), limit: str = "") -> Iterator[Row]:
        for seq, text, mac in self._conn.execute(f"{_ROWS} {where} ORDER BY seq {limit}", args):
            yield seq, bytes(text or b""), bytes(mac or b"")

    def _links(self, prev: bytes, seq: int, text: bytes, mac: bytes) -> bool:
        """Whether the row ``seq`` continues the chain after ``prev``."""
        return len(mac) == MAC_SIZE and crypto.constant_time_equal(
            chain_mac(self._key, prev, seq, text), mac
        )

    def records(self, after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Records after ``after_seq`` as JSON objects; a row that is not one (damaged)
        is ``{"seq": N, "corrupt": true}``."""
        out = []
        for seq, text, _ in self._rows("WHERE seq > ?", (after_seq, limit), "LIMIT ?"):
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if not isinstance(record, dict) or record.get("seq") != seq:
                record = {"seq": seq, "corrupt": True}
            out.append(record)
        return out

    def rows(self, first: int, last: int) -> Iterator[Row]:
        """The rows ``first .. last`` as stored."""
        return self._rows("WHERE seq BETWEEN ? AND ?", (first, last))

    # --- verifying ---------------------------------------------------------------------

    def _after(self, anchor: Anchor) -> tuple[Anchor, Problem | None]:
        """Walk the rows after ``anchor`` as far as they continue the chain: where that
        run ends, and what is wrong with the row after it (None: nothing follows)."""
        end = anchor
        for seq, text, mac in self._rows("WHERE seq > ?", (anchor.seq,)):
            if seq != end.seq + 1:
                what = "out of sequence"
            elif not self._links(end.mac, seq, text, mac):
                what = "and was not written by this key service (its MAC does not verify)"
            else:
                end = Anchor(seq, mac)
                continue
            return end, Problem(
                f"record {seq} follows the audit head (record {anchor.seq}) {what}", seq, True
            )
        return end, None

    def _head_problem(self, head: Anchor) -> Problem | None:
        """What keeps the log from taking a record after the authenticated ``head``."""
        end, problem = self._after(head)
        if problem is None and end.seq > head.seq:
            problem = Problem(
                f"records {head.seq + 1} to {end.seq} follow the audit head (record"
                f" {head.seq}): they verify, but the head was not moved to them",
                head.seq + 1,
                True,
            )
        return problem

    def blocking_problem(self) -> Problem | None:
        """Why the log cannot take a record, or None; cheap (only rows after the head)."""
        head, problem, _, _ = self._anchors()
        if head is None:
            return problem
        return self._head_problem(head)

    def verify(self) -> Verification:
        """Walk the chain from the checkpoint and check both anchors. The problem named
        is the first found, except that one keeping the log from taking records comes
        before damage inside the chain (it is what stops the service)."""
        found = self._verify()
        if found.problem is not None and not found.problem.blocking:
            blocking = self.blocking_problem()
            if blocking is not None:
                return Verification(found.records, found.checkpoint, blocking)
        return found

    def _verify(self) -> Verification:
        head, head_problem, checkpoint, checkpoint_problem = self._anchors()
        if checkpoint is None:
            return Verification(0, 0, checkpoint_problem)
        prev, expected = checkpoint.mac, checkpoint.seq + 1
        where, args = ("WHERE seq <= ?", (head.seq,)) if head is not None else ("", ())
        for seq, text, mac in self._rows(where, args):
            problem = None
            if seq <= checkpoint.seq:
                problem = _before_checkpoint(seq, checkpoint)
            elif seq != expected:
                problem = Problem(f"record {expected} is missing", expected)
            elif not self._links(prev, seq, text, mac):
                problem = Problem(f"record {seq} was altered", seq)
            if problem is not None:
                return Verification(expected - 1 - checkpoint.seq, checkpoint.seq, problem)
            prev, expected = mac, expected + 1
        count = expected - 1 - checkpoint.seq
        if head is None:
            return Verification(count, checkpoint.seq, head_problem)
        if expected - 1 < head.seq:
            problem = Problem(
                f"records after {expected - 1} were removed (the log had {head.seq})", expected
            )
        elif not crypto.constant_time_equal(prev, head.mac):
            problem = Problem(f"the audit head does not match record {head.seq}", head.seq)
        else:
            problem = self._head_problem(head)
        return Verification(count, checkpoint.seq, problem)

    # --- archiving and repair ----------------------------------------------------------

    def last_before(self, checkpoint: Anchor, head_seq: int, before: float) -> int:
        """The last record of the longest run after the checkpoint whose records are all
        older than ``before`` (their ``time``); the checkpoint's seq if there is none."""
        last = checkpoint.seq
        for seq, text, _ in self._rows("WHERE seq > ? AND seq <= ?", (checkpoint.seq, head_seq)):
            try:
                when = json.loads(text).get("time")
            except (ValueError, AttributeError):
                when = None
            if not isinstance(when, int | float) or when >= before:
                break
            last = seq
        return last

    def head(self) -> Anchor:
        """The authenticated head.

        Raises:
            DamagedChain: it is missing, altered or older than the checkpoint.
        """
        seq, mac = self._head()
        return Anchor(seq, mac)

    def cut(self, end: Anchor) -> None:
        """Delete the records up to ``end`` (archived) and move the checkpoint to it."""
        self._conn.execute("DELETE FROM audit WHERE seq <= ?", (end.seq,))
        self.write_checkpoint(end.seq, end.mac)

    def repair_plan(self) -> tuple[Anchor, list[int], Problem | None]:
        """What a repair does: the new head, the rows it moves aside (in order),
        and the problem it mends (None: nothing to do).

        The anchor is the authenticated head, or if that is missing, altered or older
        than the checkpoint, the end of the run of records that verify from the
        checkpoint. Records that continue the chain after the anchor are kept (the head
        moves to the last of them); every row after those, and every row at or before the
        checkpoint, is moved aside. Records between the checkpoint and the anchor are
        never touched: damage there stays for :meth:`verify` to report.

        Raises:
            DamagedChain: the checkpoint is missing or altered (nothing to anchor on).
        """
        head, head_problem, checkpoint, checkpoint_problem = self._anchors()
        if checkpoint is None:
            assert checkpoint_problem is not None
            raise DamagedChain(checkpoint_problem)
        problem = head_problem
        anchor = head if head is not None else checkpoint
        end, after = self._after(anchor)
        if problem is None:
            problem = after or self._head_problem(anchor)
        found = self._conn.execute(
            "SELECT seq FROM audit WHERE seq > ? OR seq <= ? ORDER BY seq",
            (end.seq, checkpoint.seq),
        )
        stray = [seq for (seq,) in found]
        if problem is None and stray:
            problem = _before_checkpoint(stray[0], checkpoint)
        return end, stray, problem

    def apply_repair(self, head: Anchor, stray: list[int]) -> None:
        """Delete the ``stray`` rows (moved aside) and write ``head``."""
        self._conn.executemany("DELETE FROM audit WHERE seq=?", [(seq,) for seq in stray])
        self.write_head(head.seq, head.mac)

    def row(self, seq: int) -> Row | None:
        for found in self._rows("WHERE seq=?", (seq,)):
            return found
        return None

    def mac_of(self, seq: int) -> bytes:
        found = self.row(seq)
        return found[2] if found is not None else b""
