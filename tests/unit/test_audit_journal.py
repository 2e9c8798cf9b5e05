"""Batched audit records: the journal, adding batches to the chain, recovery after a crash.

A service made with ``batch_audit`` (the mount's embedded service) writes the records of
calls that only read the store to its journal and adds them to the chain in batches. What
must hold: every record is in the chain exactly once, in call order, after a flush, a
transaction, a close or a crash (recovered by the next opener); a journal of a live
process is never taken; changes by other connections still apply at the next call.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from envfs.errors import StoreError
from envfs.files import mount as envfs_mount
from envfs.identity import Caller
from envfs.kms import auditbatch, journal
from envfs.kms import store as store_module
from envfs.kms.audit import EncodedRecord
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

REGION = "local-1"
ROOT = Caller.from_ids(0, 0)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store with one key (copied for each test)."""
    directory = tmp_path_factory.mktemp("template") / REGION
    KeyStore.init(directory, REGION).close()
    service = KeyService(KeyStore.open(directory, REGION))
    key_id = service.handle(ROOT, "CreateKey", {})["KeyMetadata"]["KeyId"]
    service.close()
    return directory, key_id


@pytest.fixture
def store_dir(template: tuple[Path, str], tmp_path: Path) -> Path:
    directory = tmp_path / "kms" / REGION
    shutil.copytree(template[0], directory)
    return directory


@pytest.fixture
def key_id(template: tuple[Path, str]) -> str:
    return template[1]


@pytest.fixture
def batched(store_dir: Path) -> Iterator[KeyService]:
    service = KeyService(KeyStore.open(store_dir, REGION), batch_audit=True)
    yield service
    service.close()


def records(store_dir: Path) -> list[dict[str, Any]]:
    """The chain as a fresh opener sees it (after verifying it)."""
    store = KeyStore.open(store_dir, REGION)
    try:
        count, problem = store.verify_audit()
        assert problem is None
        found = store.audit_records(0, 1_000_000)
        assert len(found) == count
        return found
    finally:
        store.close()


def notes(found: list[dict[str, Any]]) -> list[str]:
    return [r["request"]["AuditNote"] for r in found if "AuditNote" in r.get("request", {})]


def generate(service: KeyService, key_id: str, note: str) -> dict[str, Any]:
    params = {"KeyId": key_id, "KeySpec": "AES_256", "AuditNote": note}
    return service.handle(ROOT, "GenerateDataKey", params)


def journal_files(store_dir: Path) -> list[Path]:
    return sorted(store_dir.glob("audit-journal-*"))


def journal_rows(store_dir: Path) -> list[str]:
    store = KeyStore.open(store_dir, REGION)
    try:
        rows = store._conn.execute("SELECT name FROM meta WHERE name LIKE 'audit_journal:%'")
        return [name for (name,) in rows.fetchall()]
    finally:
        store.close()


# --- in the chain, once, in order ----------------------------------------------------------


def test_batched_records_wait_in_the_journal_until_flushed(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    for n in range(3):
        generate(batched, key_id, f"n{n}")
    assert notes(records(store_dir)) == []  # not in the chain yet...
    [path] = journal_files(store_dir)
    found, _ = journal.read_records(batched.store._journal_key, path.name, path.read_bytes())
    assert [r["request"]["AuditNote"] for r in found] == ["n0", "n1", "n2"]  # ...but on disk
    batched.store.flush_audit()
    assert notes(records(store_dir)) == ["n0", "n1", "n2"]


def test_a_batched_record_is_the_record_an_unbatched_call_makes(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    generate(batched, key_id, "batched")
    batched.store.flush_audit()
    plain = KeyService(KeyStore.open(store_dir, REGION))
    generate(plain, key_id, "plain")
    plain.close()
    one, two = records(store_dir)[-2:]
    for record in (one, two):
        record.pop("seq"), record.pop("time"), record["request"].pop("AuditNote")
    assert one == two


def test_a_transaction_adds_the_batch_first(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    generate(batched, key_id, "before")
    batched.handle(
        ROOT, "TagResource", {"KeyId": key_id, "Tags": [{"TagKey": "a", "TagValue": "b"}]}
    )
    generate(batched, key_id, "after")
    batched.store.flush_audit()
    ops = [(r["operation"], r.get("request", {}).get("AuditNote")) for r in records(store_dir)]
    assert ops[-3:] == [
        ("GenerateDataKey", "before"),
        ("TagResource", None),
        ("GenerateDataKey", "after"),
    ]


def test_the_service_lists_its_own_batched_records(batched: KeyService, key_id: str) -> None:
    generate(batched, key_id, "mine")
    listed = batched.handle(ROOT, "ListAuditRecords", {})["Records"]
    assert "mine" in notes(listed)


def test_due_batches_are_added_at_the_next_call(
    batched: KeyService, store_dir: Path, key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auditbatch, "BATCH_RECORDS", 3)
    for n in range(4):
        generate(batched, key_id, f"n{n}")
    assert notes(records(store_dir)) == ["n0", "n1", "n2"]  # added before the fourth call
    now = [1000.0]
    monkeypatch.setattr(auditbatch.time, "monotonic", lambda: now[0])
    generate(batched, key_id, "n4")  # pending: n3, n4 (n3's clock was the real one)
    batched.store.flush_audit()
    generate(batched, key_id, "n5")
    batched.flush_audit()  # not due yet: the mount's timer finds nothing to do
    assert notes(records(store_dir))[-1] == "n4"
    now[0] += auditbatch.BATCH_SECONDS
    batched.flush_audit()  # due now
    assert notes(records(store_dir))[-1] == "n5"


def test_close_adds_the_batch_and_removes_the_journal(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    generate(batched, key_id, "last")
    batched.close()
    assert notes(records(store_dir)) == ["last"]
    assert journal_files(store_dir) == []
    assert journal_rows(store_dir) == []


def test_a_full_journal_is_replaced(
    batched: KeyService, store_dir: Path, key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auditbatch, "JOURNAL_BYTES", 1)
    generate(batched, key_id, "a")
    [first] = journal_files(store_dir)
    batched.store.flush_audit()
    assert journal_files(store_dir) == []
    generate(batched, key_id, "b")
    assert journal_files(store_dir) != [first]
    batched.store.flush_audit()
    assert notes(records(store_dir)) == ["a", "b"]
    assert journal_files(store_dir) == []  # "b"'s journal was full too
    assert journal_rows(store_dir) == []


def test_a_failed_transaction_keeps_the_batch(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    generate(batched, key_id, "kept")
    with pytest.raises(RuntimeError), batched.store.transaction():
        raise RuntimeError("undone")
    batched.store.flush_audit()
    assert notes(records(store_dir)) == ["kept"]


def test_a_change_by_another_connection_applies_at_the_next_batched_call(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    generate(batched, key_id, "ok")  # the key's row is remembered now
    other = KeyService(KeyStore.open(store_dir, REGION))
    other.handle(ROOT, "DisableKey", {"KeyId": key_id})
    other.close()
    with pytest.raises(Exception, match="is disabled"):
        generate(batched, key_id, "refused")
    batched.store.flush_audit()
    outcomes = [r["outcome"] for r in records(store_dir) if r["operation"] == "GenerateDataKey"]
    assert outcomes == ["Success", "DisabledException"]


def test_a_journal_that_cannot_be_written_puts_the_record_in_the_chain_at_once(
    batched: KeyService, store_dir: Path, key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate(batched, key_id, "a")

    def broken(self: journal.Journal, record: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal.Journal, "append", broken)
    generate(batched, key_id, "b")
    assert notes(records(store_dir)) == ["a", "b"]
    assert journal_files(store_dir) == []


def test_no_journal_at_all_puts_each_record_in_the_chain_at_once(
    batched: KeyService, store_dir: Path, key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(directory: Path, key: bytes) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(journal, "Journal", refused)
    generate(batched, key_id, "a")
    assert notes(records(store_dir)) == ["a"]


# --- recovery --------------------------------------------------------------------------------


def crash(service: KeyService) -> None:
    """What a SIGKILL leaves: the journal and the database, nothing flushed."""
    store = service.store
    assert store._journal is not None
    store._journal.close()
    store._conn.close()
    store._journal, store._pending = None, []  # (so that the fixture's close does nothing)


def test_the_next_opener_adds_a_dead_process_s_journal(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    generate(batched, key_id, "a")
    batched.store.flush_audit()  # "a" in the chain, the row says so
    generate(batched, key_id, "b")
    generate(batched, key_id, "c")
    crash(batched)
    assert notes(records(store_dir)) == ["a", "b", "c"]  # the opener added b and c only
    assert journal_files(store_dir) == []
    assert journal_rows(store_dir) == []
    assert notes(records(store_dir)) == ["a", "b", "c"]  # and nobody adds them again


def test_a_live_process_s_journal_is_left_alone(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    generate(batched, key_id, "a")
    assert notes(records(store_dir)) == []  # another opener did not take it
    assert len(journal_files(store_dir)) == 1
    batched.store.flush_audit()
    assert notes(records(store_dir)) == ["a"]


def test_a_torn_record_at_the_end_is_ignored(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    generate(batched, key_id, "a")
    generate(batched, key_id, "b")
    [path] = journal_files(store_dir)
    crash(batched)
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # "b" cut short (power lost in the middle of the write)
    assert notes(records(store_dir)) == ["a"]


KEY = bytes(range(32))


def test_a_damaged_record_ends_what_is_read(tmp_path: Path) -> None:
    j = journal.Journal(tmp_path, KEY)
    for n in range(3):
        j.append(json.dumps({"n": n}))
    j.close()
    data = bytearray(j.path.read_bytes())
    found, end = journal.read_records(KEY, j.path.name, bytes(data))
    assert [r["n"] for r in found] == [0, 1, 2] and end == len(data)
    second = len(data) // 3 + 6
    data[second] ^= 1  # a flipped bit in the second record: its tag fails
    found, end = journal.read_records(KEY, j.path.name, bytes(data))
    assert [r["n"] for r in found] == [0] and end == len(data) // 3


def test_records_without_the_key_or_out_of_place_are_refused(tmp_path: Path) -> None:
    """Whoever can write the store's directory but lacks its root key cannot put records
    into the chain through a journal: not made up, not copied, not moved."""
    j = journal.Journal(tmp_path, KEY)
    j.append(json.dumps({"n": 0}))
    j.append(json.dumps({"n": 1}))
    j.close()
    data = j.path.read_bytes()
    half = len(data) // 2
    assert journal.read_records(bytes(32), j.path.name, data)[0] == []  # another key
    assert journal.read_records(KEY, "audit-journal-other.log", data)[0] == []  # renamed
    assert journal.read_records(KEY, j.path.name, data[half:])[0] == []  # moved up
    copied, _ = journal.read_records(KEY, j.path.name, data + data[:half])
    assert [r["n"] for r in copied] == [0, 1]  # a copy of a record at the end: refused
    assert [r["n"] for r in journal.read_records(KEY, j.path.name, data, half)[0]] == [1]


def test_a_forged_journal_adds_nothing_to_the_chain(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = journal.Journal(store_dir, bytes(32))  # not the store's key
    fake.append(json.dumps({"operation": "Decrypt", "time": 1.0}))
    fake.close()
    assert [r["operation"] for r in records(store_dir)] == ["CreateKey"]  # the template's
    # Kept aside as evidence, under a name no opener reads again, with a warning.
    assert journal_files(store_dir) == [fake.path.with_name(fake.path.name + ".damaged")]
    assert "does not verify" in caplog.text and fake.path.name in caplog.text
    assert journal_rows(store_dir) == []
    assert [r["operation"] for r in records(store_dir)] == ["CreateKey"]


def test_a_crash_after_adding_and_before_deleting_adds_nothing_twice(
    batched: KeyService, store_dir: Path, key_id: str
) -> None:
    generate(batched, key_id, "a")
    [path] = journal_files(store_dir)
    kept = path.read_bytes()
    crash(batched)
    assert notes(records(store_dir)) == ["a"]  # recovered; the file is deleted
    # As if that opener had died after its commit, before deleting the file: the row
    # still says the whole file is in the chain.
    path.write_bytes(kept)
    os.chmod(path, 0o600)
    with _raw(store_dir) as conn:
        conn.execute("INSERT INTO meta VALUES (?, ?)", (journal.meta_name(path), len(kept)))
    assert notes(records(store_dir)) == ["a"]
    assert journal_files(store_dir) == []


def test_rows_of_journals_that_are_gone_are_removed(store_dir: Path) -> None:
    with _raw(store_dir) as conn:
        conn.execute("INSERT INTO meta VALUES ('audit_journal:audit-journal-00.log', 5)")
    assert journal_rows(store_dir) == []


def test_a_leftover_temporary_journal_is_removed(store_dir: Path) -> None:
    leftover = store_dir / ".audit-journal-00.tmp"
    leftover.write_bytes(b"")
    KeyStore.open(store_dir, REGION).close()
    assert not leftover.exists()


@contextlib.contextmanager
def _raw(store_dir: Path) -> Iterator[sqlite3.Connection]:
    """A plain SQLite connection to the store's database, committed on exit."""
    conn = sqlite3.connect(store_dir / store_module.DB_NAME)
    try:
        yield conn
        conn.commit()
    finally:
        conn.close()


_CRASH_CHILD = """
import sys
from pathlib import Path
from envfs.identity import Caller
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

service = KeyService(KeyStore.open(Path(sys.argv[1]), sys.argv[2]), batch_audit=True)
caller = Caller.from_ids(0, 0)
for i in range(1_000_000):
    params = {"KeyId": sys.argv[3], "KeySpec": "AES_256", "AuditNote": f"n{i}"}
    service.handle(caller, "GenerateDataKey", params)
    print(i, flush=True)
    service.flush_audit()
"""


def test_sigkill_loses_no_acknowledged_record(store_dir: Path, key_id: str) -> None:
    """A process that acknowledged a call (printed its number) and is killed: the next
    opener finds the call's record in the chain."""
    with subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, str(store_dir), REGION, key_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        watchdog = threading.Timer(30.0, proc.kill)
        watchdog.start()
        try:
            for _ in range(300):  # well past a batch or two
                line = proc.stdout.readline()
                assert line.endswith("\n"), proc.stderr.read()
            proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read()
            proc.wait()
        finally:
            watchdog.cancel()
    complete = rest[: rest.rfind("\n") + 1]  # a line cut short acknowledges nothing
    acknowledged = int(line) + 1 + len(complete.splitlines())
    found = notes(records(store_dir))
    assert found[:acknowledged] == [f"n{i}" for i in range(acknowledged)]
    assert len(found) == len(set(found))
    assert journal_files(store_dir) == []


# --- the mount's flush task ----------------------------------------------------------------


class FlakyProvider:
    """A provider whose flushes fail twice (SQLite busy, then a store error)."""

    def __init__(self) -> None:
        self.calls = 0

    def flush_audit(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise sqlite3.OperationalError("database is locked")
        if self.calls == 2:
            raise StoreError("the disk is full")


def test_the_mount_s_flush_task_outlives_failures(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing background task would end the whole mount: a flush that fails is logged
    and tried again."""
    monkeypatch.setattr(envfs_mount, "AUDIT_FLUSH_INTERVAL", 0.001)
    provider = FlakyProvider()

    async def run() -> None:
        with trio.move_on_after(0.3):
            await envfs_mount._flush_audit(provider)  # type: ignore[arg-type]

    trio.run(run)
    assert provider.calls >= 3
    assert "database is locked" in caplog.text
    assert "the disk is full" in caplog.text


# --- records encoded once ------------------------------------------------------------------


CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"time": 1.5},
        {"action": "kms:Decrypt", "time": 1.0},
        {"zeta": 1, "alpha": 2},
        {
            "time": 1700000000.25,
            "caller": {"uid": 1, "user": "a", "gid": 1},
            "operation": "Decrypt",
            "action": "kms:Decrypt",
            "key_arn": "arn:x",
            "outcome": "AccessDeniedException",
            "encryption_context": {"time": "x", "seq": "y", "\u00e9": "z"},
            "request": {"AuditNote": '/a,"time":1}'},
            "message": "no",
            "via": {"service": "s", "uid": 0},
        },
    ],
)
def test_an_encoded_record_is_the_canonical_text(record: dict[str, Any]) -> None:
    encoded = EncodedRecord(record)
    assert encoded.text == CANONICAL.encode(record)
    assert encoded.with_seq(42) == CANONICAL.encode({"seq": 42, **record})
    assert json.loads(encoded.text) == record


def test_a_record_cannot_bring_its_own_seq(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EncodedRecord({"seq": 1, "time": 2.0})
    j = journal.Journal(tmp_path, KEY)
    for text in ('{"n":1}', '{"seq":9,"n":2}', '{"n":3}'):
        j.append(text)
    j.close()
    assert journal.read_records(KEY, j.path.name, j.path.read_bytes())[0] == [{"n": 1}]
