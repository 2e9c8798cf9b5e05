"""Batched audit records of a key store: a process's journal, and the journals of
processes that are gone (``docs/kms.md`` §8, "Batched records").

A call that changed no key may leave its audit record in this process's journal
(:mod:`envfs.kms.journal`) instead of committing a transaction of its own. The records
join the chain many at a time: when :data:`BATCH_RECORDS` wait, when the oldest has
waited :data:`BATCH_SECONDS`, before any other transaction of the store, and when it is
closed. The journal's meta row ``audit_journal:<file name>`` says how many of its bytes
are in the chain, and is written in the transaction that adds them, so that a record
joins the chain once. Whoever opens the store adds the journals of processes that are
gone (:meth:`AuditBatching.recover_journals`).

Mixed into :class:`envfs.kms.store.KeyStore`, whose transactions and chain it uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from envfs.errors import AuditLogDamagedError
from envfs.kms import journal
from envfs.kms.audit import EncodedRecord

logger = logging.getLogger(__name__)

# Batched audit records (see append_audit_batched) are added to the chain when this many
# wait, when the oldest has waited this long (at the next call or flush_audit), and
# before any transaction. A journal that grew past JOURNAL_BYTES is replaced after that.
BATCH_RECORDS = 256
BATCH_SECONDS = 0.1
JOURNAL_BYTES = 1 << 20


class AuditBatching:
    """Batched audit records and journal recovery, for :class:`envfs.kms.store.KeyStore`."""

    directory: Path
    _conn: sqlite3.Connection
    _journal_key: bytes
    # Batched audit records: written to this process's journal, not yet in the chain.
    _journal: journal.Journal | None
    _pending: list[EncodedRecord]
    _pending_since: float
    _stale_journal_rows: list[str]

    # Provided by KeyStore.
    def transaction(self, *, durable: bool = True) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _chain(self, records: list[EncodedRecord]) -> int:
        raise NotImplementedError

    def _init_audit_batch(self) -> None:
        """No record waits yet, and no journal is made before the first one."""
        self._journal = None
        self._pending = []
        self._pending_since = 0.0
        self._stale_journal_rows = []

    def append_audit_batched(self, record: dict[str, Any]) -> None:
        """Record a call that changed no key: written to this process's journal now (it
        survives a crash of the process, as a ``synchronous=NORMAL`` commit does), added
        to the chain with others later (:meth:`flush_audit`, any transaction, close).
        Where the journal cannot be written, the record is added to the chain at once.
        """
        encoded = EncodedRecord(record)
        if self._journal is None:
            try:
                self._journal = journal.Journal(self.directory, self._journal_key)
            except OSError:
                with self.transaction(durable=False):
                    self._chain([encoded])
                return
        try:
            self._journal.append(encoded.text)
        except OSError:
            # A partial record may end the journal now: put what it holds in the chain,
            # with this record, and start a new journal next time.
            self._pending.append(encoded)
            self.flush_audit()
            self._retire_journal()
            return
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(encoded)

    def audit_due(self) -> bool:
        """Whether the batched records should be added to the chain now."""
        return bool(self._pending) and (
            len(self._pending) >= BATCH_RECORDS
            or time.monotonic() - self._pending_since >= BATCH_SECONDS
        )

    def flush_audit(self) -> None:
        """Add the batched records to the chain now (one transaction).

        Raises:
            StoreError and the like: they stay in the journal (and batched) then.
        """
        if self._pending or self._stale_journal_rows:
            with self.transaction(durable=False):
                pass  # every transaction adds the batch first

    def _add_batch(self) -> bool:
        """Inside a transaction: the batched records go into the chain, and the journal's
        row says they are there (so that nobody adds them again after a crash)."""
        if self._stale_journal_rows:
            self._conn.executemany(
                "DELETE FROM meta WHERE name=?", [(row,) for row in self._stale_journal_rows]
            )
        if not self._pending:
            return bool(self._stale_journal_rows)
        assert self._journal is not None
        self._chain(self._pending)
        self._set_journal_row(journal.meta_name(self._journal.path), self._journal.size)
        return True

    def _set_journal_row(self, row: str, covered: int) -> None:
        """Inside a transaction: ``covered`` bytes of the journal of ``row`` are in the chain."""
        self._conn.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
            (row, covered),
        )

    def _batch_added(self) -> None:
        """After the commit that added the batch."""
        self._pending.clear()
        self._stale_journal_rows.clear()
        if self._journal is not None and self._journal.size >= JOURNAL_BYTES:
            self._retire_journal()  # everything in it is in the chain: start a new one

    def _retire_journal(self) -> None:
        """Delete this process's journal, all of it being in the chain. Its row goes with
        the next transaction (or the next opener's clean-up, after a crash): deleting it
        before the file would let a crash in between add the journal again."""
        assert self._journal is not None and not self._pending
        self._journal.remove()
        self._stale_journal_rows.append(journal.meta_name(self._journal.path))
        self._journal = None

    def recover_journals(self) -> None:
        """Add the records of journals left by processes that are gone to the chain, and
        delete those journals and the rows of journals that no longer exist.

        A journal with a whole record that does not verify (altered, or not written with
        this store's key) gives its records up to that one and is kept aside as
        ``<name>.damaged``, with a warning; a record cut short at the end (lost power) is
        ignored, as documented.

        Raises:
            AuditLogDamagedError: the log cannot take the records (they stay on disk).
        """
        with journal.orphaned(self.directory) as found:
            for path, data in found:
                row = journal.meta_name(path)
                value = self._conn.execute("SELECT value FROM meta WHERE name=?", (row,))
                stored = value.fetchone()
                done = _covered(row, stored[0]) if stored is not None else 0
                records, end = journal.read_records(self._journal_key, path.name, data, done)
                with self.transaction():
                    self._chain([EncodedRecord(record) for record in records])
                    self._set_journal_row(row, max(end, done))
                # Still locked: nobody else adds it again.
                if journal.damaged_at(data, end):
                    _keep_aside(path, end, len(data))
                else:
                    path.unlink(missing_ok=True)
        rows = self._conn.execute(
            "SELECT name FROM meta WHERE name LIKE 'audit_journal:%'"
        ).fetchall()
        stale = [
            name
            for (name,) in rows
            if not (self.directory / name.removeprefix("audit_journal:")).exists()
        ]
        if stale:
            self._stale_journal_rows.extend(stale)
            self.flush_audit()

    def _recover_journals_if_possible(self) -> None:
        """Recover the journals of processes that are gone, unless the audit log is
        damaged: they then stay on disk until it is repaired (nothing is lost)."""
        try:
            self.recover_journals()
        except AuditLogDamagedError as exc:
            logger.warning("audit journals are kept until the audit log is repaired: %s", exc)


def _covered(row: str, value: object) -> int:
    """The byte count of a journal's meta row; a row that holds none is read as 0 (the
    whole journal is added: a record twice rather than none)."""
    if isinstance(value, int) and value >= 0:
        return value
    logger.warning("meta row %r holds %r, not a byte count: reading its journal whole", row, value)
    return 0


def _keep_aside(path: Path, end: int, size: int) -> None:
    """Keep a journal whose record at ``end`` does not verify as ``<name>.damaged``."""
    damaged = path.with_name(path.name + ".damaged")
    logger.warning(
        "audit journal %s: bytes %d to %d hold a record that does not verify (altered, or not"
        " written with this store's root key); the records before it are in the chain, and"
        " the journal is kept as %s",
        path,
        end,
        size,
        damaged,
    )
    try:
        os.rename(path, damaged)
    except OSError:
        path.unlink(missing_ok=True)
