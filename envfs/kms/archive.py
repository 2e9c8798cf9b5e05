"""Audit archives: records taken out of a store's chain, in a file that proves where they
belonged.

An archive is UTF-8 text, one JSON object per line (keys sorted, no spaces, ``\\n`` after
each), written whole to a temporary file, fsynced and renamed into place::

    {"account":"…","archive":"envfs-kms audit","created":T,"kind":"pruned","region":"…",
     "start":{"label":"checkpoint","mac":"<hex>","seq":C,"tag":"<hex>"},"version":1}
    {"mac":"<hex>","record":"<the record's text, as stored>","seq":C+1}
    …
    {"end":{"label":"checkpoint","mac":"<hex>","seq":E,"tag":"<hex>"},"records":E-C}

``start`` and ``end`` are anchors of the chain (``envfs.kms.audit``): a sequence number,
the chain MAC of that record and ``tag = HMAC-SHA256(audit key, label || u64 seq || mac)``.
A **pruned** archive holds records ``C+1 .. E``: it starts at the store's checkpoint before
the archiving and ends at the checkpoint after it, so archives made one after another
chain to each other (each starts where the previous one ended) and the last one ends
where the store's log now starts. Verifying one needs the store's audit key: it proves
the records are this store's, unaltered and complete.

A **quarantined** archive holds rows that ``envfs kms audit --repair`` moved out of the
log (rows after the audit head that do not continue the chain): its ``start`` is the head
the repair wrote (label ``head``), each row is kept as found (``record_hex`` instead of
``record`` when its text is not UTF-8) and its trailer's ``end`` is null.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envfs import crypto
from envfs.errors import UsageError
from envfs.kms.audit import (
    CHECKPOINT_LABEL,
    HEAD_LABEL,
    MAC_SIZE,
    Anchor,
    Row,
    anchor_tag,
    chain_mac,
)

FORMAT = "envfs-kms audit"
VERSION = 1
PRUNED = "pruned"
QUARANTINED = "quarantined"
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_LABELS = {"checkpoint": CHECKPOINT_LABEL, "head": HEAD_LABEL}


def anchor_json(key: bytes, label: bytes, anchor: Anchor) -> dict[str, Any]:
    """An anchor as an archive writes it (``start``, ``end``)."""
    return {
        "label": label.decode(),
        "seq": anchor.seq,
        "mac": anchor.mac.hex(),
        "tag": anchor_tag(key, label, anchor.seq, anchor.mac).hex(),
    }


def _row_json(row: Row) -> dict[str, Any]:
    seq, text, mac = row
    out: dict[str, Any] = {"seq": seq, "mac": mac.hex()}
    try:
        out["record"] = text.decode()
    except UnicodeDecodeError:
        out["record_hex"] = text.hex()
    return out


@dataclass(frozen=True)
class Written:
    path: Path
    records: int
    sha256: str


def write(path: Path, header: dict[str, Any], rows: Iterable[Row], end: Any) -> Written:
    """Write an archive at ``path`` atomically (temporary file, fsync, rename, fsync of
    the directory), replacing what is there: the caller decides whether it may.

    Raises:
        UsageError: it cannot be written (missing directory, no permission, disk full).
    """
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    digest = hashlib.sha256()
    count = 0
    try:
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
    except OSError as exc:
        raise UsageError(f"cannot write archive {str(path)!r}: {exc.strerror}") from None
    try:
        with open(fd, "wb") as f:

            def put(line: dict[str, Any]) -> None:
                data = _ENCODER.encode(line).encode() + b"\n"
                digest.update(data)
                f.write(data)

            put({"archive": FORMAT, "version": VERSION, **header})
            for row in rows:
                put(_row_json(row))
                count += 1
            put({"end": end, "records": count})
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise UsageError(f"cannot write archive {str(path)!r}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return Written(path, count, digest.hexdigest())


def fsync_dir(path: Path) -> None:
    """Make a rename or creation in the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading and verifying -----------------------------------------------------------------


@dataclass
class Report:
    """What :func:`verify` found in one archive."""

    path: Path
    kind: str | None = None
    start: Anchor | None = None
    end: Anchor | None = None
    records: int = 0
    first: int | None = None
    last: int | None = None
    problem: str | None = None
    # quarantined: the rows that continue the chain from the start (the rest do not)
    linked: list[int] = field(default_factory=list)
    unlinked: list[int] = field(default_factory=list)

    def fail(self, text: str) -> Report:
        self.problem = text
        return self


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                yield number, None  # a cut line
                return
            try:
                yield number, json.loads(raw)
            except ValueError:
                yield number, None


def _anchor(key: bytes, value: object, label: bytes) -> Anchor | None:
    """An anchor of an archive line whose tag verifies under ``key``, or None."""
    if not isinstance(value, dict) or value.get("label") != label.decode():
        return None
    try:
        seq, mac, tag = value["seq"], bytes.fromhex(value["mac"]), bytes.fromhex(value["tag"])
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(seq, int) or seq < 0 or len(mac) != MAC_SIZE:
        return None
    if not crypto.constant_time_equal(anchor_tag(key, label, seq, mac), tag):
        return None
    return Anchor(seq, mac)


def _row(line: dict[str, Any]) -> Row | None:
    try:
        seq = line["seq"]
        mac = bytes.fromhex(line["mac"])
        text = line["record"].encode() if "record" in line else bytes.fromhex(line["record_hex"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not isinstance(seq, int) or set(line) - {"seq", "mac", "record", "record_hex"}:
        return None
    return seq, text, mac


def verify(path: Path, key: bytes) -> Report:
    """Check an archive against the audit key of a store (never raises for its contents).

    Raises:
        UsageError: it cannot be read.
    """
    report = Report(path)
    try:
        return _verify(report, _lines(path), key)
    except OSError as exc:
        raise UsageError(f"cannot read archive {str(path)!r}: {exc.strerror}") from None


def _verify(report: Report, lines: Iterator[tuple[int, Any]], key: bytes) -> Report:
    number, header = next(lines, (0, None))
    if (
        not isinstance(header, dict)
        or header.get("archive") != FORMAT
        or header.get("kind") not in (PRUNED, QUARANTINED)
    ):
        return report.fail("not an envfs-kms audit archive")
    if header.get("version") != VERSION:
        return report.fail(
            f"archive version {header.get('version')!r} (this envfs reads version {VERSION})"
        )
    report.kind = header["kind"]
    label = CHECKPOINT_LABEL if report.kind == PRUNED else HEAD_LABEL
    start = _anchor(key, header.get("start"), label)
    if start is None:
        return report.fail(
            "its start does not verify under this store's audit key (it belongs to another"
            " store, or was altered)"
        )
    report.start = start
    prev = start
    for number, line in lines:
        if not isinstance(line, dict):
            return report.fail(f"line {number} is not a JSON object (cut or altered)")
        if "end" in line:
            return _verify_end(report, line, prev, key, next(lines, None))
        row = _row(line)
        if row is None:
            return report.fail(f"line {number} is not an archived record")
        seq, text, mac = row
        report.records += 1
        report.first = seq if report.first is None else report.first
        report.last = seq
        links = seq == prev.seq + 1 and crypto.constant_time_equal(
            chain_mac(key, prev.mac, seq, text), mac
        )
        if report.kind == QUARANTINED:
            (report.linked if links else report.unlinked).append(seq)
            prev = Anchor(seq, mac) if links else Anchor(-1, b"")
            continue
        if seq != prev.seq + 1:
            return report.fail(f"record {prev.seq + 1} is missing")
        if not links:
            return report.fail(f"record {seq} was altered")
        prev = Anchor(seq, mac)
    return report.fail(f"it is incomplete: it ends after line {number}, without its trailer")


def _verify_end(
    report: Report, line: dict[str, Any], prev: Anchor, key: bytes, after: object
) -> Report:
    if after is not None:
        return report.fail("it goes on after its trailer")
    if line.get("records") != report.records or set(line) != {"end", "records"}:
        return report.fail(f"its trailer does not count its {report.records} records")
    if report.kind == QUARANTINED:
        return report if line["end"] is None else report.fail("its trailer names an end")
    end = _anchor(key, line["end"], CHECKPOINT_LABEL)
    if end is None:
        return report.fail("its end does not verify under this store's audit key (altered)")
    if end.seq != prev.seq or not crypto.constant_time_equal(end.mac, prev.mac):
        return report.fail(f"its end (record {end.seq}) is not its last record ({prev.seq})")
    report.end = end
    return report


def continuity(reports: list[Report], checkpoint: Anchor | None) -> tuple[str | None, list[str]]:
    """How verified pruned archives fit together and with the log whose checkpoint is
    ``checkpoint``: a problem (two of them, or one and the log, meet at a record with
    different MACs: they are not one chain) or None, and notes (gaps, overlaps)."""
    pruned = sorted(
        (r for r in reports if r.problem is None and r.kind == PRUNED),
        key=lambda r: (r.start.seq if r.start else 0, r.end.seq if r.end else 0),
    )
    notes: list[str] = []
    reached = Anchor(0, bytes(MAC_SIZE))
    for report in pruned:
        assert report.start is not None and report.end is not None
        start, end = report.start, report.end
        if start.seq == reached.seq and not crypto.constant_time_equal(start.mac, reached.mac):
            return f"{str(report.path)!r} does not continue the chain at record {start.seq}", notes
        if start.seq > reached.seq:
            notes.append(f"records {reached.seq + 1} to {start.seq} are in no archive given")
        elif start.seq < reached.seq:
            notes.append(f"{str(report.path)!r} repeats records up to {min(end.seq, reached.seq)}")
        if end.seq > reached.seq:
            reached = end
    if checkpoint is None or not pruned:
        return None, notes
    if reached.seq == checkpoint.seq:
        if not crypto.constant_time_equal(reached.mac, checkpoint.mac):
            return f"the archives end at record {reached.seq}, but not where the log starts", notes
        notes.append(f"the log goes on from record {checkpoint.seq + 1}")
    elif reached.seq < checkpoint.seq:
        notes.append(
            f"records {reached.seq + 1} to {checkpoint.seq} are archived in no archive given"
        )
    else:
        notes.append(
            f"the archives go past the log's checkpoint (record {checkpoint.seq}): an"
            f" archiving that did not complete; records {checkpoint.seq + 1} to"
            f" {reached.seq} are still in the log"
        )
    return None, notes
