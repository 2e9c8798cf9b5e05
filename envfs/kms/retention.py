"""Retention and repair of a store's audit log: archiving old records to a file and
deleting them, moving the damage that keeps the log from taking records aside, and
checking archives (``docs/kms.md`` §8.2-§8.4).

Each is one durable transaction of the store (``BEGIN IMMEDIATE``, ``synchronous=FULL``)
in which the archive file is written, fsynced and renamed into place before anything is
deleted: a crash before the commit leaves the records in the log and in the file, and the
same command run again replaces that file (:meth:`AuditRetention._may_write_archive`).
Mixed into :class:`envfs.kms.store.KeyStore`, whose transactions and chain it uses.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from envfs.errors import AuditVerificationError, UsageError
from envfs.kms import archive
from envfs.kms.audit import (
    CHECKPOINT_LABEL,
    HEAD_LABEL,
    Anchor,
    AuditLog,
    DamagedChain,
    EncodedRecord,
)


class AuditRetention:
    """The audit log's archiving and repair, for :class:`envfs.kms.store.KeyStore`."""

    audit: AuditLog
    region: str
    account: str
    _audit_key: bytes

    # Provided by KeyStore.
    def transaction(self, *, durable: bool = True) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _chain(self, records: list[EncodedRecord]) -> int:
        raise NotImplementedError

    def checkpoint(self) -> None:
        raise NotImplementedError

    def _recover_journals_if_possible(self) -> None:
        raise NotImplementedError

    def archive_audit(
        self,
        path: Path,
        record: dict[str, Any],
        *,
        keep: int | None = None,
        before: float | None = None,
    ) -> dict[str, Any]:
        """Move the oldest records to the archive ``path`` and delete them from the log:
        those before the newest ``keep``, or the run of records older than ``before``
        (``docs/kms.md`` §8.2). One durable transaction: the archive is written, fsynced
        and renamed into place, the records deleted, the checkpoint moved to the last of
        them and ``record`` (the call's, with an ``archive`` member added) appended. A
        crash before the commit leaves the records in the log and in the archive; run
        again, the same ``path`` is replaced.

        Raises:
            AuditVerificationError: the log does not verify (nothing is archived).
            UsageError: ``path`` cannot be written, or holds something other than an
                unfinished archive of this log.
        """
        path = Path(path).absolute()
        answer: dict[str, Any] = {"Archive": None, "FirstRecord": None, "LastRecord": None}
        with self.transaction():
            problem = self.audit.verify().problem
            if problem is not None:
                raise AuditVerificationError(
                    f"audit log verification failed: {problem.text}; nothing was archived"
                )
            start, head = self.audit.checkpoint(), self.audit.head()
            if keep is not None:
                last = max(start.seq, head.seq - keep)
            else:
                assert before is not None
                last = self.audit.last_before(start, head.seq, before)
            record["archive"] = None
            if last > start.seq:
                end = Anchor(last, self.audit.mac_of(last))
                self._may_write_archive(path, archive.PRUNED, start)
                written = archive.write(
                    path,
                    self._archive_header(archive.PRUNED, CHECKPOINT_LABEL, start, record),
                    self.audit.rows(start.seq + 1, last),
                    archive.anchor_json(self._audit_key, CHECKPOINT_LABEL, end),
                )
                self.audit.cut(end)
                answer = {"Archive": str(path), "FirstRecord": start.seq + 1, "LastRecord": last}
                record["archive"] = _archive_member(written, start.seq + 1, last)
                answer["Sha256"] = written.sha256
            answer["Records"] = last - start.seq
            answer["Checkpoint"] = last
            answer["Seq"] = self._chain([EncodedRecord(record)])
        if last > start.seq:
            self.checkpoint()  # the archived records leave the WAL too
        return answer

    def repair_audit(self, path: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Mend a log that cannot take records (``docs/kms.md`` §8.3): rows after the
        audit head that do not continue the chain, and rows the checkpoint says were
        archived, move to the quarantine archive ``path``; records that continue the chain
        are kept and the head moved to the last of them (a missing or altered head is
        rebuilt at the end of the records that verify). One durable transaction, which
        also appends ``record`` (the call's, with a ``repair`` member). Damage before
        the head (an altered or missing record) is evidence and stays.

        Raises:
            AuditVerificationError: the checkpoint is missing or altered.
            UsageError: ``path`` cannot be written, or holds something other than an
                unfinished quarantine archive of this log.
        """
        path = Path(path).absolute()
        with self.transaction():
            try:
                head, stray, problem = self.audit.repair_plan()
            except DamagedChain as exc:
                raise AuditVerificationError(
                    f"audit log verification failed: {exc.problem.text}; --repair cannot mend this"
                ) from None
            answer: dict[str, Any] = {"Problem": None, "Head": head.seq, "Archive": None}
            record["repair"] = None
            if problem is not None:
                moved = None
                if stray:
                    self._may_write_archive(path, archive.QUARANTINED, head)
                    rows = (row for row in map(self.audit.row, stray) if row is not None)
                    header = self._archive_header(archive.QUARANTINED, HEAD_LABEL, head, record)
                    written = archive.write(path, header, rows, None)
                    moved = _archive_member(written, stray[0], stray[-1])
                    answer.update(Archive=str(path), Moved=len(stray), Sha256=written.sha256)
                self.audit.apply_repair(head, stray)
                record["repair"] = {"problem": problem.text, "head": head.seq, "moved": moved}
                answer["Problem"] = problem.text
            answer["Seq"] = self._chain([EncodedRecord(record)])
        self._recover_journals_if_possible()
        return answer

    def verify_audit_archives(
        self, paths: list[Path], record: dict[str, Any]
    ) -> tuple[list[archive.Report], Anchor | None]:
        """Check archives against this store's audit key, and the log's checkpoint they
        lead to (None if it is damaged); ``record`` (the call's) is appended."""
        reports = [archive.verify(Path(path), self._audit_key) for path in paths]
        with self.transaction(durable=False):
            try:
                checkpoint: Anchor | None = self.audit.checkpoint()
            except DamagedChain:
                checkpoint = None
            self._chain([EncodedRecord(record)])
        return reports, checkpoint

    def _archive_header(
        self, kind: str, label: bytes, start: Anchor, record: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "kind": kind,
            "region": self.region,
            "account": self.account,
            "created": record.get("time"),
            "start": archive.anchor_json(self._audit_key, label, start),
        }

    def _may_write_archive(self, path: Path, kind: str, start: Anchor) -> None:
        """Refuse to replace anything but an archive of the same kind that starts where
        this one will: one whose archiving never committed (a crash, then a rerun)."""
        if not os.path.lexists(path):
            return
        try:
            report: archive.Report | None = archive.verify(path, self._audit_key)
        except UsageError:
            report = None
        if report is None or report.problem or report.kind != kind or report.start != start:
            raise UsageError(
                f"{str(path)!r} exists and is not an unfinished archive of this audit log;"
                " choose another file (it may be the only copy of archived records)"
            )


def _archive_member(written: archive.Written, first: int, last: int) -> dict[str, Any]:
    """The ``archive`` (or ``repair.moved``) member of the record of an archiving."""
    return {
        "file": str(written.path),
        "first": first,
        "last": last,
        "records": written.records,
        "sha256": written.sha256,
    }
