"""The audit log when it is damaged, repaired, archived and upgraded (docs/kms.md §8).

What must hold: a damaged log is always named (the record and what is wrong), never an
internal error; a log that cannot take a record refuses every audited call with a message
that says how to recover, except the VerifyAudit that reports it; ``repair_audit`` moves
the damage aside into a quarantine archive and the log takes records again; archiving
moves the oldest records into a file that verifies with the store's key and chains to
the next archive and to the log's checkpoint, loses nothing if it is interrupted, and
can be run again; stores of schema 1 are upgraded when opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from envfs.errors import (
    AccessDeniedException,
    AuditLogDamagedError,
    AuditVerificationError,
    StoreError,
    UsageError,
    ValidationException,
)
from envfs.identity import Caller
from envfs.kms import archive, audit, journal
from envfs.kms.service import KeyService
from envfs.kms.store import DB_NAME, SCHEMA_VERSION, KeyStore
from tests.unit.test_store import raw_db

REGION = "local-1"
ROOT = Caller.from_ids(0, 0)
STRANGER = Caller(61003, 61003, frozenset({61003}))
START = 1_700_000_000.0


@pytest.fixture
def store_dir(template: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "kms" / REGION
    shutil.copytree(template, directory)
    return directory


@pytest.fixture
def clock() -> list[float]:
    return [START]


@pytest.fixture
def service(store_dir: Path, clock: list[float]) -> Iterator[KeyService]:
    """A service over a store with five records: CreateKey, then four Encrypts."""
    svc = KeyService(KeyStore.open(store_dir, REGION), clock=lambda: clock[0])
    key_id = svc.handle(ROOT, "CreateKey", {})["KeyMetadata"]["KeyId"]
    for n in range(4):
        clock[0] += 60
        svc.handle(ROOT, "Encrypt", {"KeyId": key_id, "Plaintext": b"x", "AuditNote": f"n{n}"})
    yield svc
    svc.close()


def key_id_of(service: KeyService) -> str:
    return service.store.list_key_ids(None, 1)[0]  # (not a call: no audit record)


def encrypt(service: KeyService) -> dict[str, Any]:
    return service.handle(ROOT, "Encrypt", {"KeyId": key_id_of(service), "Plaintext": b"y"})


def operations(store: KeyStore) -> list[str]:
    return [r.get("operation", "?") for r in store.audit_records(0, 10_000)]


def verify(service: KeyService) -> dict[str, Any]:
    return service.handle(ROOT, "VerifyAudit", {})


# --- a damaged log is named --------------------------------------------------------------


def plant_forged_row(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute(
        "INSERT INTO audit VALUES (?, ?, ?)",
        (seq, json.dumps({"operation": "Forged", "seq": seq}), os.urandom(32)),
    )


def head_value(conn: sqlite3.Connection) -> bytes:
    return bytes(conn.execute("SELECT value FROM meta WHERE name='audit_head'").fetchone()[0])


DAMAGE: dict[str, tuple[Callable[[sqlite3.Connection], None], str, int | None]] = {
    "forged row after the head": (
        lambda c: plant_forged_row(c, 8),
        "record 8 follows the audit head (record 7) and was not written by this key service"
        " (its MAC does not verify)",
        8,
    ),
    "row out of sequence after the head": (
        lambda c: plant_forged_row(c, 11),
        "record 11 follows the audit head (record 7) out of sequence",
        11,
    ),
    "head deleted": (
        lambda c: c.execute("DELETE FROM meta WHERE name='audit_head'"),
        "the audit head is missing",
        None,
    ),
    "head altered": (
        lambda c: c.execute(
            "UPDATE meta SET value=? WHERE name='audit_head'", (head_value(c)[:-1] + b"\0",)
        ),
        "the audit head was altered",
        None,
    ),
    "head as text": (
        lambda c: c.execute("UPDATE meta SET value='nonsense' WHERE name='audit_head'"),
        "the audit head was altered",
        None,
    ),
    "head of an earlier record": (
        # A real head of record 5 (the attacker kept a copy): records 6 and 7 verify after it.
        lambda c: c.execute(
            "UPDATE meta SET value=(SELECT value FROM saved) WHERE name='audit_head'"
        ),
        "records 6 to 7 follow the audit head (record 5): they verify, but the head was not"
        " moved to them",
        6,
    ),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_log_is_named_and_refuses_audited_calls(
    service: KeyService, store_dir: Path, name: str
) -> None:
    damage, problem, seq = DAMAGE[name]
    with raw_db(store_dir) as conn:
        conn.execute("CREATE TABLE saved AS SELECT value FROM meta WHERE name='audit_head'")
    encrypt(service)
    encrypt(service)  # records 6 and 7
    with raw_db(store_dir) as conn:
        damage(conn)
        conn.execute("DROP TABLE saved")

    # VerifyAudit answers (its own record is left out: it is the call that reports it).
    answer = verify(service)
    assert answer["Valid"] is False
    assert answer["Problem"] == problem
    assert answer["DamagedRecord"] == seq
    assert answer["Repairable"] is True
    # Every other audited call fails, saying what is wrong and how to recover.
    for call in (
        lambda: encrypt(service),
        lambda: service.handle(ROOT, "ListAuditRecords", {}),
        lambda: service.handle(ROOT, "DescribeKey", {}),  # refused by validation: audited too
    ):
        with pytest.raises(AuditLogDamagedError) as caught:
            call()
        assert caught.value.message.startswith(f"the audit log is damaged: {problem}; ")
        assert caught.value.exit_code == 35
    # A fresh opener sees the same, and is not kept from opening the store.
    other = KeyStore.open(store_dir, REGION)
    try:
        assert other.verify_audit()[1] == problem
    finally:
        other.close()


def test_the_reported_bug_verify_and_calls_after_a_forged_row(
    service: KeyService, store_dir: Path
) -> None:
    """Issue 9 §4.3: an extra row with a forged MAC at head+1 made --verify and every
    audited call fail with 'UNIQUE constraint failed' (exit 1)."""
    with raw_db(store_dir) as conn:
        plant_forged_row(conn, 6)
    assert verify(service)["Problem"].startswith("record 6 follows the audit head (record 5)")
    with pytest.raises(AuditLogDamagedError, match=r"^the audit log is damaged: record 6 "):
        encrypt(service)
    # Nothing was added: the forged row and the chain are as they were.
    with raw_db(store_dir) as conn:
        assert conn.execute("SELECT max(seq), count(*) FROM audit").fetchone() == (6, 6)


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("UPDATE audit SET record=x'ff00fe' WHERE seq=3", "record 3 was altered"),
        ("UPDATE audit SET record=42 WHERE seq=3", "record 3 was altered"),
        ("UPDATE audit SET mac='text' WHERE seq=3", "record 3 was altered"),
        ("UPDATE audit SET mac=x'00' WHERE seq=3", "record 3 was altered"),
        ("DELETE FROM audit WHERE seq=3", "record 3 is missing"),
        ("DELETE FROM audit WHERE seq>=4", "records after 3 were removed (the log had 5)"),
    ],
)
def test_damage_before_the_head_is_named_and_calls_go_on(
    service: KeyService, store_dir: Path, sql: str, problem: str
) -> None:
    """Damage inside the chain is evidence: verify names it, the log still takes records
    (they chain from the head), listing still works, and repair leaves it alone."""
    with raw_db(store_dir) as conn:
        conn.execute(sql)
    answer = verify(service)
    assert (answer["Valid"], answer["Problem"], answer["Repairable"]) == (False, problem, False)
    assert answer["DamagedRecord"] in (3, 4)
    encrypt(service)
    records = service.handle(ROOT, "ListAuditRecords", {})["Records"]
    assert all("seq" in r for r in records)
    assert [r["seq"] for r in records if r.get("corrupt")] == ([3] if "record=" in sql else [])
    repaired = service.repair_audit(ROOT, store_dir.parent / "q.jsonl")
    assert repaired["Problem"] is None and repaired["Archive"] is None
    # (records removed at the end: once a record follows, the gap is inside the chain)
    assert repaired["Remaining"] == problem.replace(
        "records after 3 were removed (the log had 5)", "record 4 is missing"
    )
    assert not (store_dir.parent / "q.jsonl").exists()


def test_damage_that_stops_the_service_is_named_before_damage_inside_the_chain(
    service: KeyService, store_dir: Path
) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("UPDATE audit SET mac=? WHERE seq=2", (os.urandom(32),))
        plant_forged_row(conn, 6)
    answer = verify(service)  # answered, not refused: the log cannot take its record
    assert answer["Problem"].startswith("record 6 follows the audit head (record 5)")
    assert answer["Repairable"] is True
    repaired = service.repair_audit(ROOT, store_dir.parent / "q.jsonl")
    assert (repaired["Moved"], repaired["Remaining"]) == (1, "record 2 was altered")
    encrypt(service)


def test_a_checkpoint_that_is_missing_altered_or_a_head_is_named(
    service: KeyService, store_dir: Path
) -> None:
    with raw_db(store_dir) as conn:
        saved = conn.execute("SELECT value FROM meta WHERE name='audit_checkpoint'").fetchone()
        conn.execute("DELETE FROM meta WHERE name='audit_checkpoint'")
    assert verify(service)["Problem"] == "the audit checkpoint is missing"
    encrypt(service)  # the head is enough to append
    with raw_db(store_dir) as conn:
        # A head is a valid anchor of the same key, but not a checkpoint (another label).
        conn.execute(
            "INSERT INTO meta VALUES ('audit_checkpoint', (SELECT value FROM meta WHERE"
            " name='audit_head'))"
        )
    assert verify(service)["Problem"] == "the audit checkpoint was altered"
    with raw_db(store_dir) as conn:
        conn.execute("UPDATE meta SET value=? WHERE name='audit_checkpoint'", saved)
    assert verify(service)["Valid"] is True
    with raw_db(store_dir) as conn:
        conn.execute("UPDATE meta SET value=x'00' WHERE name='audit_checkpoint'")
    with pytest.raises(
        AuditVerificationError,
        match=r"^audit log verification failed: the audit checkpoint was altered; --repair"
        r" cannot mend this$",
    ):
        service.repair_audit(ROOT, store_dir.parent / "q.jsonl")


# --- repair --------------------------------------------------------------------------------


def test_repair_moves_forged_rows_aside_and_the_log_goes_on(
    service: KeyService, store_dir: Path
) -> None:
    quarantine = store_dir.parent / "quarantine.jsonl"
    with raw_db(store_dir) as conn:
        plant_forged_row(conn, 6)
        plant_forged_row(conn, 9)
        conn.execute("INSERT INTO audit VALUES (7, x'c3', 'not a mac')")
    answer = service.repair_audit(ROOT, quarantine)
    assert answer["Problem"].startswith("record 6 follows the audit head (record 5)")
    assert (answer["Head"], answer["Moved"], answer["Archive"]) == (5, 3, str(quarantine))
    assert answer["Sha256"] == hashlib.sha256(quarantine.read_bytes()).hexdigest()
    assert answer["Valid"] is True and answer["Records"] == 6
    assert (quarantine.stat().st_mode & 0o777) == 0o600
    # The repair is the sixth record and says what it did.
    (repair,) = [r for r in service.store.audit_records(0, 100) if r["operation"] == "RepairAudit"]
    assert repair["seq"] == 6 and repair["action"] == "envfs:RepairAudit"
    assert repair["repair"]["problem"] == answer["Problem"]
    assert repair["repair"]["moved"] == {
        "file": str(quarantine),
        "first": 6,
        "last": 9,
        "records": 3,
        "sha256": answer["Sha256"],
    }
    encrypt(service)
    assert verify(service)["Valid"] is True
    # The quarantine archive keeps the rows as found, starting at the head it left.
    lines = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert lines[0]["kind"] == "quarantined" and lines[0]["start"]["seq"] == 5
    assert [(line.get("seq"), "record_hex" in line) for line in lines[1:-1]] == [
        (6, False),
        (7, True),
        (9, False),
    ]
    assert lines[-1] == {"end": None, "records": 3}
    checked = service.verify_audit_archives(ROOT, [quarantine])
    assert checked["Valid"] is True
    assert checked["Archives"][0]["Unlinked"] == [6, 7, 9]


def test_repair_moves_an_old_head_forward_over_records_that_verify(
    service: KeyService, store_dir: Path
) -> None:
    with raw_db(store_dir) as conn:
        old_head = head_value(conn)
    encrypt(service)
    encrypt(service)
    with raw_db(store_dir) as conn:
        conn.execute("UPDATE meta SET value=? WHERE name='audit_head'", (old_head,))
        plant_forged_row(conn, 8)
    answer = service.repair_audit(ROOT, store_dir.parent / "q.jsonl")
    assert answer["Head"] == 7 and answer["Moved"] == 1  # 6 and 7 kept, 8 moved
    assert operations(service.store)[5:] == ["Encrypt", "Encrypt", "RepairAudit"]
    assert verify(service)["Valid"] is True


def test_repair_rebuilds_a_missing_head_at_the_end_of_what_verifies(
    service: KeyService, store_dir: Path
) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("DELETE FROM meta WHERE name='audit_head'")
        plant_forged_row(conn, 6)
    answer = service.repair_audit(ROOT, store_dir.parent / "q.jsonl")
    assert (answer["Problem"], answer["Head"], answer["Moved"]) == (
        "the audit head is missing",
        5,
        1,
    )
    assert verify(service)["Valid"] is True


def test_repair_of_an_intact_log_does_nothing_but_say_so(
    service: KeyService, store_dir: Path
) -> None:
    answer = service.repair_audit(ROOT, store_dir.parent / "q.jsonl")
    assert answer["Problem"] is None and answer["Valid"] is True
    assert not (store_dir.parent / "q.jsonl").exists()
    assert service.store.audit_records(5, 1)[0]["repair"] is None


def test_journals_wait_for_the_repair(service: KeyService, store_dir: Path) -> None:
    """A dead mount's journal cannot join a damaged chain: it stays (nothing lost) and the
    store still opens; the repair adds it."""
    batched = KeyService(KeyStore.open(store_dir, REGION), batch_audit=True)
    params = {"KeyId": key_id_of(service), "KeySpec": "AES_256", "AuditNote": "journaled"}
    batched.handle(ROOT, "GenerateDataKey", params)
    assert batched.store._journal is not None
    batched.store._journal.close()  # as if the mount was killed
    batched.store._journal, batched.store._pending = None, []
    batched.store._conn.close()
    with raw_db(store_dir) as conn:
        plant_forged_row(conn, 6)
    other = KeyStore.open(store_dir, REGION)  # opens, keeps the journal
    other.close()
    assert len(list(store_dir.glob("audit-journal-*.log"))) == 1
    service.repair_audit(ROOT, store_dir.parent / "q.jsonl")
    assert list(store_dir.glob("audit-journal-*")) == []
    notes = [r.get("request", {}).get("AuditNote") for r in service.store.audit_records(0, 99)]
    assert "journaled" in notes
    assert verify(service)["Valid"] is True


def test_only_the_account_may_repair_or_archive_and_refusals_are_audited(
    service: KeyService, store_dir: Path
) -> None:
    with pytest.raises(AccessDeniedException, match=r"perform envfs:RepairAudit: only root"):
        service.repair_audit(STRANGER, store_dir.parent / "q.jsonl")
    with pytest.raises(AccessDeniedException, match=r"envfs:ArchiveAuditRecords"):
        service.archive_audit_records(STRANGER, store_dir.parent / "a.jsonl", keep=0)
    with pytest.raises(AccessDeniedException, match=r"envfs:VerifyAuditArchives"):
        service.verify_audit_archives(STRANGER, [])
    records = service.store.audit_records(5, 10)
    assert [(r["operation"], r["outcome"]) for r in records] == [
        ("RepairAudit", "AccessDeniedException"),
        ("ArchiveAuditRecords", "AccessDeniedException"),
        ("VerifyAuditArchives", "AccessDeniedException"),
    ]
    assert not (store_dir.parent / "a.jsonl").exists()


# --- archiving -----------------------------------------------------------------------------


def test_archiving_moves_the_oldest_records_to_a_file_that_verifies(
    service: KeyService, store_dir: Path
) -> None:
    first = store_dir.parent / "first.jsonl"
    answer = service.archive_audit_records(ROOT, first, keep=2)
    assert (answer["FirstRecord"], answer["LastRecord"], answer["Records"]) == (1, 3, 3)
    assert (answer["Checkpoint"], answer["Seq"]) == (3, 6)
    assert answer["Sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    store = service.store
    assert [r["seq"] for r in store.audit_records(0, 99)] == [4, 5, 6]
    assert verify(service) == {
        "Valid": True,
        "Records": 3,  # 4, 5 and 6 (the VerifyAudit's own record comes after)
        "Checkpoint": 3,
        "Problem": None,
        "DamagedRecord": None,
        "Repairable": False,
    }
    archived = store.audit_records(0, 99)[2]
    assert archived["operation"] == "ArchiveAuditRecords"
    assert archived["request"] == {"Archive": str(first), "Keep": 2}
    assert archived["archive"] == {
        "file": str(first),
        "first": 1,
        "last": 3,
        "records": 3,
        "sha256": answer["Sha256"],
    }
    # The archive's lines are the records as they were stored, MACs included.
    lines = [json.loads(line) for line in first.read_text().splitlines()]
    assert [json.loads(line["record"])["operation"] for line in lines[1:-1]] == [
        "CreateKey",
        "Encrypt",
        "Encrypt",
    ]
    assert lines[0]["start"]["seq"] == 0 and lines[-1]["end"]["seq"] == 3

    second = store_dir.parent / "second.jsonl"
    clock_now = json.loads(lines[-2]["record"])["time"]
    answer = service.archive_audit_records(ROOT, second, before=str(clock_now + 1e9))
    assert (answer["FirstRecord"], answer["LastRecord"]) == (4, 7)  # 7: the VerifyAudit
    checked = service.verify_audit_archives(ROOT, [second, first])
    assert checked["Valid"] is True and checked["Problem"] is None
    assert [(a["FirstRecord"], a["LastRecord"]) for a in checked["Archives"]] == [(4, 7), (1, 3)]
    assert checked["Notes"] == ["the log goes on from record 8"]
    assert service.verify_audit_archives(ROOT, [second])["Notes"] == [
        "records 1 to 3 are in no archive given",
        "the log goes on from record 8",
    ]
    assert verify(service)["Valid"] is True


def test_before_archives_only_the_run_of_older_records(
    service: KeyService, store_dir: Path, clock: list[float]
) -> None:
    # Records 1..5 at START, +60, +120, +180, +240 (the fixture's clock).
    answer = service.archive_audit_records(
        ROOT, store_dir.parent / "a.jsonl", before=str(START + 150)
    )
    assert (answer["FirstRecord"], answer["LastRecord"]) == (1, 3)
    nothing = service.archive_audit_records(
        ROOT, store_dir.parent / "b.jsonl", before="2000-01-01T00:00:00"
    )
    assert nothing["Archive"] is None and nothing["Records"] == 0
    assert not (store_dir.parent / "b.jsonl").exists()
    assert service.store.audit_records(0, 99)[-1]["archive"] is None
    with pytest.raises(ValidationException, match=r"^Since 'yesterday' is neither"):
        service.archive_audit_records(ROOT, store_dir.parent / "c.jsonl", before="yesterday")
    with pytest.raises(ValidationException, match=r"^give exactly one of Before and Keep$"):
        service.archive_audit_records(ROOT, store_dir.parent / "c.jsonl")
    with pytest.raises(ValidationException, match=r"^Keep must be 0 or more, got -1$"):
        service.archive_audit_records(ROOT, store_dir.parent / "c.jsonl", keep=-1)


def test_keep_zero_archives_everything_and_the_log_starts_again(
    service: KeyService, store_dir: Path
) -> None:
    service.archive_audit_records(ROOT, store_dir.parent / "all.jsonl", keep=0)
    assert [r["operation"] for r in service.store.audit_records(0, 9)] == ["ArchiveAuditRecords"]
    assert service.store.verify_audit() == (1, None)


def test_archived_records_leave_the_database_file(service: KeyService, store_dir: Path) -> None:
    marker = "n2"  # an AuditNote of the fixture's records
    service.archive_audit_records(ROOT, store_dir.parent / "a.jsonl", keep=0)
    data = (store_dir / DB_NAME).read_bytes()
    wal = store_dir / (DB_NAME + "-wal")
    data += wal.read_bytes() if wal.exists() else b""
    assert f'"AuditNote":"{marker}"'.encode() not in data
    assert marker in (store_dir.parent / "a.jsonl").read_text()


def test_a_log_that_does_not_verify_is_not_archived(service: KeyService, store_dir: Path) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("UPDATE audit SET mac=? WHERE seq=2", (os.urandom(32),))
    with pytest.raises(
        AuditVerificationError,
        match=r"^audit log verification failed: record 2 was altered; nothing was archived$",
    ):
        service.archive_audit_records(ROOT, store_dir.parent / "a.jsonl", keep=0)
    assert not (store_dir.parent / "a.jsonl").exists()
    assert len(service.store.audit_records(0, 99)) == 5


def test_an_existing_file_is_never_replaced_unless_an_unfinished_archive(
    service: KeyService, store_dir: Path
) -> None:
    taken = store_dir.parent / "taken.txt"
    taken.write_text("someone's notes\n")
    with pytest.raises(UsageError, match=r"exists and is not an unfinished archive"):
        service.archive_audit_records(ROOT, taken, keep=0)
    assert taken.read_text() == "someone's notes\n"
    done = store_dir.parent / "done.jsonl"
    service.archive_audit_records(ROOT, done, keep=3)
    kept = done.read_bytes()
    with pytest.raises(UsageError, match=r"it may be the only copy of archived records"):
        service.archive_audit_records(ROOT, done, keep=0)
    assert done.read_bytes() == kept
    with pytest.raises(UsageError, match=r"^cannot write archive '.*': No such file"):
        service.archive_audit_records(ROOT, store_dir.parent / "no" / "dir.jsonl", keep=0)
    assert verify(service)["Valid"] is True


def test_an_archiving_interrupted_before_its_commit_loses_nothing_and_runs_again(
    service: KeyService, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = store_dir.parent / "a.jsonl"

    def crash(self: audit.AuditLog, end: audit.Anchor) -> None:
        raise KeyboardInterrupt  # after the archive is in place, before anything is deleted

    monkeypatch.setattr(audit.AuditLog, "cut", crash)
    with pytest.raises(KeyboardInterrupt):
        service.archive_audit_records(ROOT, target, keep=1)
    monkeypatch.undo()
    assert target.exists() and len(service.store.audit_records(0, 99)) == 5
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")] == []
    answer = service.archive_audit_records(ROOT, target, keep=1)  # the same file: replaced
    assert (answer["FirstRecord"], answer["LastRecord"]) == (1, 4)
    assert service.verify_audit_archives(ROOT, [target])["Valid"] is True


_CRASH_CHILD = """
import os, sys, time
from pathlib import Path
from envfs.kms import archive
from envfs.identity import Caller
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

write = archive.write
def write_then_hang(*args, **kwargs):
    written = write(*args, **kwargs)
    print("written", flush=True)
    time.sleep(60)
    return written
archive.write = write_then_hang
service = KeyService(KeyStore.open(Path(sys.argv[1]), "local-1"))
service.archive_audit_records(Caller.from_ids(0, 0), Path(sys.argv[2]), keep=0)
"""


def test_sigkill_between_the_archive_and_the_commit(service: KeyService, store_dir: Path) -> None:
    service.close()
    target = store_dir.parent / "a.jsonl"
    with subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, str(store_dir), str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        watchdog = threading.Timer(30.0, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout.readline() == "written\n", proc.stderr.read()
            proc.kill()
            proc.wait()
        finally:
            watchdog.cancel()
    store = KeyStore.open(store_dir, REGION)
    try:
        assert store.verify_audit() == (5, None)  # every record still in the log
        assert archive.verify(target, store._audit_key).records == 5  # and in the archive
        again = KeyService(store).archive_audit_records(ROOT, target, keep=0)
        assert again["LastRecord"] == 5
        assert store.verify_audit() == (1, None)
    finally:
        store.close()


# --- archives that do not verify ----------------------------------------------------------


@pytest.fixture
def archived(service: KeyService, store_dir: Path) -> Path:
    path = store_dir.parent / "a.jsonl"
    service.archive_audit_records(ROOT, path, keep=1)
    return path


def edit_lines(path: Path, edit: Callable[[list[str]], list[str]]) -> Path:
    out = path.with_name("edited.jsonl")
    out.write_text("".join(line + "\n" for line in edit(path.read_text().splitlines())))
    return out


def _replace_record(lines: list[str], index: int, old: str, new: str) -> list[str]:
    lines[index] = lines[index].replace(old, new)
    return lines


BROKEN_ARCHIVES: dict[str, tuple[Callable[[list[str]], list[str]], str]] = {
    "altered record": (
        lambda lines: _replace_record(lines, 2, "Encrypt", "Decrypt"),
        "record 2 was altered",
    ),
    "removed record": (lambda lines: lines[:2] + lines[3:], "record 2 is missing"),
    "cut at the end": (
        lambda lines: lines[:-1],
        "it is incomplete: it ends after line 5, without its trailer",
    ),
    "records after the trailer": (lambda lines: lines + lines[1:2], "it goes on after its trailer"),
    "trailer miscounts": (
        lambda lines: [*lines[:-1], lines[-1].replace('"records":4', '"records":3')],
        "its trailer does not count its 4 records",
    ),
    "end moved back": (
        lambda lines: [*lines[:-2], lines[-1].replace('"records":4', '"records":3')],
        "its end (record 4) is not its last record (3)",
    ),
    "not an archive": (lambda lines: ["{}"], "not an envfs-kms audit archive"),
    "other version": (
        lambda lines: [lines[0].replace('"version":1', '"version":2'), *lines[1:]],
        "archive version 2 (this envfs reads version 1)",
    ),
    "start of another store": (
        lambda lines: (
            [lines[0].replace(json.loads(lines[0])["start"]["tag"], "00" * 32), *lines[1:]]
        ),
        "its start does not verify under this store's audit key (it belongs to another"
        " store, or was altered)",
    ),
}


@pytest.mark.parametrize("name", list(BROKEN_ARCHIVES))
def test_a_broken_archive_is_named(service: KeyService, archived: Path, name: str) -> None:
    edit, problem = BROKEN_ARCHIVES[name]
    answer = service.verify_audit_archives(ROOT, [edit_lines(archived, edit)])
    assert answer["Valid"] is False
    assert answer["Archives"][0]["Problem"] == problem


def test_an_archive_of_another_store_does_not_verify(archived: Path, tmp_path: Path) -> None:
    other = KeyService(KeyStore.init(tmp_path / "other" / REGION, REGION))
    try:
        answer = other.verify_audit_archives(ROOT, [archived])
    finally:
        other.close()
    assert answer["Valid"] is False
    assert answer["Archives"][0]["Problem"].startswith("its start does not verify")


def test_verifying_a_missing_archive_is_a_usage_error(service: KeyService, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^cannot read archive '.*nothing.jsonl': No such file"):
        service.verify_audit_archives(ROOT, [tmp_path / "nothing.jsonl"])


def test_a_rolled_back_checkpoint_is_detected(
    service: KeyService, archived: Path, store_dir: Path
) -> None:
    """The archive carries the checkpoint the log had before (signed): putting it back to
    hide that records were archived shows."""
    start = json.loads(archived.read_text().splitlines()[0])["start"]
    raw = struct.pack(">Q", start["seq"]) + bytes.fromhex(start["mac"] + start["tag"])
    with raw_db(store_dir) as conn:
        conn.execute("UPDATE meta SET value=? WHERE name='audit_checkpoint'", (raw,))
    assert verify(service)["Problem"] == "record 1 is missing"


def test_records_deleted_after_the_checkpoint_are_detected(
    service: KeyService, archived: Path, store_dir: Path
) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("DELETE FROM audit WHERE seq=5")
    assert verify(service)["Problem"] == "record 5 is missing"


def test_a_record_put_back_before_the_checkpoint_is_named_and_repaired(
    service: KeyService, archived: Path, store_dir: Path
) -> None:
    line = json.loads(archived.read_text().splitlines()[1])
    with raw_db(store_dir) as conn:
        conn.execute(
            "INSERT INTO audit VALUES (?, ?, ?)",
            (line["seq"], line["record"], bytes.fromhex(line["mac"])),
        )
    answer = verify(service)
    assert answer["Problem"] == (
        "record 1 is in the log, but the checkpoint says records up to 4 were archived"
    )
    assert (answer["Repairable"], answer["DamagedRecord"]) == (True, 1)
    encrypt(service)  # not blocking
    repaired = service.repair_audit(ROOT, archived.with_name("q.jsonl"))
    assert repaired["Moved"] == 1 and repaired["Valid"] is True


# --- schema upgrade ------------------------------------------------------------------------


def make_schema_1(directory: Path) -> None:
    """A store as envfs wrote it before the checkpoint: schema 1, no checkpoint row (and
    no access keys table, which came with schema 3)."""
    with raw_db(directory) as conn:
        conn.execute("DROP TABLE access_keys")
        conn.execute("DELETE FROM meta WHERE name='audit_checkpoint'")
        conn.execute("UPDATE meta SET value=1 WHERE name='schema'")


def test_a_schema_1_store_is_upgraded_when_opened(service: KeyService, store_dir: Path) -> None:
    service.close()
    make_schema_1(store_dir)
    store = KeyStore.open(store_dir, REGION)
    try:
        assert store.schema == SCHEMA_VERSION == 3
        assert store.verify_audit() == (5, None)
    finally:
        store.close()
    with raw_db(store_dir) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone() == (3,)


GOLDEN_STORE = Path(__file__).resolve().parents[1] / "golden" / "volume-v1" / "kms" / REGION


def test_the_golden_schema_1_store_is_upgraded_and_its_log_verifies(tmp_path: Path) -> None:
    copy = tmp_path / REGION
    shutil.copytree(GOLDEN_STORE, copy)
    copy.chmod(0o700)
    for path in copy.iterdir():
        path.chmod(0o600)
    with raw_db(copy) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone() == (1,)
    store = KeyStore.open(copy, REGION)
    try:
        assert store.verify_audit() == (11, None)
        service = KeyService(store)
        service.archive_audit_records(ROOT, tmp_path / "golden.jsonl", keep=0)
        assert store.verify_audit() == (1, None)
        assert service.verify_audit_archives(ROOT, [tmp_path / "golden.jsonl"])["Valid"]
    finally:
        store.close()


@pytest.mark.parametrize(("value", "shown"), [(4, "4"), ("'two'", "'two'"), (0, "0")])
def test_a_store_of_an_unknown_schema_is_refused(
    store_dir: Path, value: object, shown: str
) -> None:
    with raw_db(store_dir) as conn:
        conn.execute(f"UPDATE meta SET value={value} WHERE name='schema'")
    with pytest.raises(
        StoreError, match=rf"has schema version {shown}, this envfs reads versions 1 to 3$"
    ):
        KeyStore.open(store_dir, REGION)


# --- journal recovery against planted files and rows --------------------------------------


def test_a_fifo_or_directory_named_like_a_journal_does_not_stop_the_store(
    store_dir: Path,
) -> None:
    os.mkfifo(store_dir / f"{journal.PREFIX}00{journal.SUFFIX}", 0o600)
    (store_dir / f"{journal.PREFIX}01{journal.SUFFIX}").mkdir()
    # In a child with a deadline: opening the FIFO for reading must not wait for a writer.
    child = subprocess.run(
        [sys.executable, "-c", _OPEN_CHILD, str(store_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert child.stderr.count("is not a regular file, so not an audit journal") == 2


_OPEN_CHILD = """
import sys
from pathlib import Path
from envfs.kms.store import KeyStore
KeyStore.open(Path(sys.argv[1]), "local-1").close()
"""


def test_a_journal_row_that_holds_no_byte_count_reads_its_journal_whole(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    svc = KeyService(KeyStore.open(store_dir, REGION), batch_audit=True)
    svc.handle(ROOT, "GenerateRandom", {"NumberOfBytes": 8})
    store = svc.store
    assert store._journal is not None
    path = store._journal.path
    store._journal.close()
    store._journal, store._pending = None, []
    store._conn.close()
    with raw_db(store_dir) as conn:
        conn.execute("INSERT INTO meta VALUES (?, 'garbage')", (journal.meta_name(path),))
    reopened = KeyStore.open(store_dir, REGION)
    try:
        assert [r["operation"] for r in reopened.audit_records(0, 9)] == ["GenerateRandom"]
        assert reopened.verify_audit() == (1, None)
    finally:
        reopened.close()
    assert "holds 'garbage', not a byte count" in caplog.text
