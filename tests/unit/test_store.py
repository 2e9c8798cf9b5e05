"""The key store: creation, root keys, permissions, regions, sealed material, transactions,
the audit chain, crash safety and the destruction of deleted key material."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from envfs import crypto
from envfs.errors import (
    KMSInvalidStateException,
    NotFoundException,
    RootKeyError,
    StoreCorruptError,
    StoreError,
    StorePermissionError,
    TagException,
    ValidationException,
)
from envfs.identity import Caller
from envfs.kms.model import KeyState
from envfs.kms.paths import region_store_dir
from envfs.kms.policy import KeyPolicy
from envfs.kms.rootkey import CREDENTIAL_NAME, ROOT_KEY_NAME
from envfs.kms.service import DAY, KeyService
from envfs.kms.store import (
    DB_NAME,
    SCHEMA_VERSION,
    KeyRecord,
    KeyStore,
)

REGION = "local-1"
START = 1_700_000_000.0
# uid 0 holds the account-level right to create keys whoever runs the tests.
ROOT = Caller.from_ids(0, 0)


# --- helpers -------------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def raw_db(directory: Path) -> Iterator[sqlite3.Connection]:
    """A plain SQLite connection to the store's database, in autocommit mode."""
    conn = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def on_disk(directory: Path) -> bytes:
    """Every byte of the database and its write-ahead log."""
    data = (directory / DB_NAME).read_bytes()
    wal = directory / (DB_NAME + "-wal")
    if wal.exists():
        data += wal.read_bytes()
    return data


def create_key(service: KeyService, **params: Any) -> str:
    key_id: str = service.handle(ROOT, "CreateKey", params)["KeyMetadata"]["KeyId"]
    return key_id


def key_record(key_id: str) -> KeyRecord:
    return KeyRecord(
        key_id=key_id,
        created=START,
        description="",
        state=KeyState.ENABLED,
        deletion_date=None,
        pending_window_days=None,
        rotation_period_days=None,
        next_rotation=None,
        policy="{}",
    )


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "kms" / REGION


@pytest.fixture
def store(template: Path, store_dir: Path) -> Iterator[KeyStore]:
    shutil.copytree(template, store_dir)
    s = KeyStore.open(store_dir, REGION)
    yield s
    s.close()


@pytest.fixture
def clock() -> list[float]:
    return [START]


@pytest.fixture
def service(store: KeyStore, clock: list[float]) -> KeyService:
    return KeyService(store, clock=lambda: clock[0])


@pytest.fixture
def fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make scrypt cheap (the real cost is about a second here); record the n asked for."""
    real = crypto.scrypt
    asked: list[int] = []

    def cheap(passphrase: bytes, salt: bytes, n: int = crypto.SCRYPT_N, **kw: Any) -> bytes:
        asked.append(n)
        return real(passphrase, salt, n=2**10, **kw)

    monkeypatch.setattr(crypto, "scrypt", cheap)
    return asked


def opened(directory: Path, **kwargs: Any) -> None:
    """Open the store in ``directory`` (region REGION) and close it again."""
    KeyStore.open(directory, REGION, **kwargs).close()


# --- init ----------------------------------------------------------------------------------


def test_init_makes_a_private_directory_database_and_root_key(store_dir: Path) -> None:
    old_umask = os.umask(0o022)  # init must not rely on the caller's umask
    try:
        KeyStore.init(store_dir, REGION).close()
    finally:
        os.umask(old_umask)
    assert mode_of(store_dir) == 0o700
    assert mode_of(store_dir / DB_NAME) == 0o600
    assert mode_of(store_dir / ROOT_KEY_NAME) == 0o600
    text = (store_dir / ROOT_KEY_NAME).read_bytes()
    assert text.endswith(b"\n")
    assert len(base64.b64decode(text.strip(), validate=True)) == 32
    assert sorted(p.name for p in store_dir.iterdir()) == [DB_NAME, ROOT_KEY_NAME]


def test_init_records_region_and_schema(store: KeyStore, store_dir: Path) -> None:
    assert store.region == REGION
    assert re.fullmatch(r"[0-9]{12}", store.account)
    with raw_db(store_dir) as conn:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    assert meta["region"] == REGION
    assert int(meta["schema"]) == SCHEMA_VERSION
    assert meta["root_kind"] == "file"


def test_init_twice_is_refused(store_dir: Path) -> None:
    KeyStore.init(store_dir, REGION).close()
    before = (store_dir / ROOT_KEY_NAME).read_bytes()
    with pytest.raises(
        StoreError, match=rf"^a key store already exists at {re.escape(repr(str(store_dir)))}$"
    ):
        KeyStore.init(store_dir, REGION)
    assert (store_dir / ROOT_KEY_NAME).read_bytes() == before
    opened(store_dir)


def test_init_beside_a_stray_root_key_is_refused(store_dir: Path) -> None:
    store_dir.mkdir(mode=0o700, parents=True)
    (store_dir / ROOT_KEY_NAME).write_bytes(b"precious\n")
    with pytest.raises(StoreError, match="exists without a key store beside it"):
        KeyStore.init(store_dir, REGION)
    assert (store_dir / ROOT_KEY_NAME).read_bytes() == b"precious\n"


def test_init_in_a_group_readable_directory_is_refused(store_dir: Path) -> None:
    store_dir.mkdir(parents=True)
    store_dir.chmod(0o750)
    with pytest.raises(StorePermissionError, match=r"has mode 0750"):
        KeyStore.init(store_dir, REGION)
    assert not (store_dir / DB_NAME).exists()


@pytest.mark.parametrize("name", ["a#b", "c?d", "e%41f", "g h"])
def test_store_under_a_path_with_uri_characters(tmp_path: Path, name: str) -> None:
    directory = tmp_path / name / REGION
    KeyStore.init(directory, REGION).close()
    opened(directory)
    assert not KeyStore.needs_passphrase(directory)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no stray file beside it


def test_store_at_a_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    KeyStore.init(Path(REGION), REGION).close()
    opened(Path(REGION))


# --- root keys -----------------------------------------------------------------------------


def test_passphrase_store_has_no_root_key_file(store_dir: Path, fast_scrypt: list[int]) -> None:
    KeyStore.init(store_dir, REGION, passphrase=b"correct horse").close()
    assert not (store_dir / ROOT_KEY_NAME).exists()
    assert KeyStore.needs_passphrase(store_dir)
    opened(store_dir, passphrase=b"correct horse")
    # open derives with the cost recorded in the store, which is the real one
    assert fast_scrypt[-1] == crypto.SCRYPT_N


def test_passphrase_store_opened_without_passphrase(
    store_dir: Path, fast_scrypt: list[int]
) -> None:
    KeyStore.init(store_dir, REGION, passphrase=b"correct horse").close()
    with pytest.raises(
        RootKeyError,
        match=rf"^the key store at {re.escape(repr(str(store_dir)))} is protected by a"
        r" passphrase; give it with --passphrase-file or ENVFS_KMS_PASSPHRASE_FILE$",
    ):
        opened(store_dir)


def test_wrong_passphrase(store_dir: Path, fast_scrypt: list[int]) -> None:
    KeyStore.init(store_dir, REGION, passphrase=b"correct horse").close()
    with pytest.raises(
        RootKeyError,
        match=r"^the root key given does not open the key store"
        rf" {re.escape(repr(str(store_dir)))}$",
    ):
        opened(store_dir, passphrase=b"correct horse ")


def test_empty_passphrase_is_refused(store_dir: Path, fast_scrypt: list[int]) -> None:
    with pytest.raises(RootKeyError, match=r"^the passphrase must not be empty$"):
        KeyStore.init(store_dir, REGION, passphrase=b"")
    assert not (store_dir / DB_NAME).exists()


def test_file_store_does_not_need_a_passphrase(store: KeyStore, store_dir: Path) -> None:
    assert not KeyStore.needs_passphrase(store_dir)


def test_wrong_root_key_file(store: KeyStore, store_dir: Path) -> None:
    key_path = store_dir / ROOT_KEY_NAME
    key_path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    with pytest.raises(RootKeyError, match=r"^the root key given does not open the key store"):
        opened(store_dir)


def test_root_key_of_another_store_given_explicitly(tmp_path: Path, store: KeyStore) -> None:
    other = tmp_path / "other" / REGION
    KeyStore.init(other, REGION).close()
    with pytest.raises(RootKeyError, match=r"does not open the key store"):
        opened(store.directory, root_key_file=other / ROOT_KEY_NAME)


def test_explicit_root_key_file(tmp_path: Path, store: KeyStore, store_dir: Path) -> None:
    elsewhere = tmp_path / "root.key"
    shutil.move(store_dir / ROOT_KEY_NAME, elsewhere)
    with pytest.raises(RootKeyError, match=r"root.key' is\s+missing"):
        opened(store_dir)
    opened(store_dir, root_key_file=elsewhere)


def test_raw_32_byte_root_key_file_is_accepted(store: KeyStore, store_dir: Path) -> None:
    key_path = store_dir / ROOT_KEY_NAME
    key_path.write_bytes(base64.b64decode(key_path.read_bytes()))
    opened(store_dir)


@pytest.mark.parametrize(
    "content",
    [b"", b"not base64 at all!\n", base64.b64encode(bytes(31)) + b"\n", bytes(33)],
    ids=["empty", "garbage", "31-bytes", "raw-33-bytes"],
)
def test_malformed_root_key_file(store: KeyStore, store_dir: Path, content: bytes) -> None:
    key_path = store_dir / ROOT_KEY_NAME
    key_path.write_bytes(content)
    with pytest.raises(
        RootKeyError,
        match=rf"^root key {re.escape(repr(str(key_path)))} is malformed: expected 32 bytes,"
        r" raw or base64$",
    ):
        opened(store_dir)


def test_root_key_from_systemd_credential(
    tmp_path: Path, store: KeyStore, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    shutil.move(store_dir / ROOT_KEY_NAME, creds / CREDENTIAL_NAME)
    with pytest.raises(RootKeyError, match=r"no systemd credential 'root-key' was given"):
        opened(store_dir)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    opened(store_dir)


def test_systemd_credential_comes_before_the_root_key_file(
    tmp_path: Path, store: KeyStore, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / CREDENTIAL_NAME).write_bytes(base64.b64encode(os.urandom(32)))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(RootKeyError, match=r"does not open the key store"):
        opened(store_dir)


# --- permissions ---------------------------------------------------------------------------


def test_group_readable_store_directory_is_refused(store: KeyStore, store_dir: Path) -> None:
    store_dir.chmod(0o750)
    with pytest.raises(
        StorePermissionError,
        match=rf"^key store directory {re.escape(repr(str(store_dir)))} has mode 0750: group and"
        r" others must have no access \(chmod 700\)$",
    ):
        opened(store_dir)


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("", 0o705),
        ("", 0o710),
        (DB_NAME, 0o640),
        (DB_NAME, 0o604),
        (ROOT_KEY_NAME, 0o644),
        (ROOT_KEY_NAME, 0o620),
    ],
)
def test_store_open_to_group_or_others_is_refused(
    store: KeyStore, store_dir: Path, name: str, mode: int
) -> None:
    path = store_dir / name if name else store_dir
    path.chmod(mode)
    with pytest.raises(StorePermissionError, match=rf"has mode {mode:04o}: group and others"):
        opened(store_dir)
    path.chmod(0o700 if not name else 0o600)
    opened(store_dir)


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_group_readable_wal_is_refused(store: KeyStore, store_dir: Path, suffix: str) -> None:
    with store.transaction():
        store.append_audit({"note": "make the log non-empty"})
    path = store_dir / (DB_NAME + suffix)
    assert path.exists()  # the open store keeps it
    path.chmod(0o640)
    with pytest.raises(
        StorePermissionError,
        match=rf"^key store file {re.escape(repr(str(path)))} has mode 0640: group and others"
        r" must have no access \(chmod 600\)$",
    ):
        opened(store_dir)


def test_explicit_root_key_file_readable_by_others(
    tmp_path: Path, store: KeyStore, store_dir: Path
) -> None:
    elsewhere = tmp_path / "root.key"
    shutil.move(store_dir / ROOT_KEY_NAME, elsewhere)
    elsewhere.chmod(0o644)
    with pytest.raises(
        StorePermissionError,
        match=rf"^root key file {re.escape(repr(str(elsewhere)))} has mode 0644: group and others"
        r" must have no access \(chmod 600\)$",
    ):
        opened(store_dir, root_key_file=elsewhere)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_store_file_owned_by_another_user_is_refused(store: KeyStore, store_dir: Path) -> None:
    os.chown(store_dir / DB_NAME, 4242, -1)
    with pytest.raises(StorePermissionError, match=r"is owned by uid 4242, not by uid 0$"):
        opened(store_dir)


# --- regions -------------------------------------------------------------------------------


def test_open_with_another_region(store: KeyStore, tmp_path: Path) -> None:
    moved = tmp_path / "kms" / "eu-west-1"
    store.close()
    shutil.copytree(store.directory, moved)
    with pytest.raises(StoreError) as excinfo:
        KeyStore.open(moved, "eu-west-1")
    assert excinfo.type is StoreError
    assert excinfo.value.message == (
        f"the key store at {str(moved)!r} serves region 'local-1', not 'eu-west-1'"
    )


@pytest.mark.parametrize(
    "region",
    [
        "",
        "Local-1",
        "local_1",
        "local 1",
        "-local",
        "local-",
        "local--1",
        "1local",
        "../local",
        "local/1",
        "a" * 64,
        "local-1\n",
    ],
)
def test_invalid_region_names(tmp_path: Path, region: str) -> None:
    with pytest.raises(ValidationException, match=r"^region .* is not valid: expected lowercase"):
        KeyStore.init(tmp_path / "store", region)
    with pytest.raises(ValidationException):
        KeyStore.open(tmp_path / "store", region)
    with pytest.raises(ValidationException):
        region_store_dir(tmp_path, region)
    assert not (tmp_path / "store").exists()


def test_longest_region_name_is_valid(tmp_path: Path) -> None:
    KeyStore.init(tmp_path / "store", "a" * 63).close()


# --- sealed key material -------------------------------------------------------------------


def test_database_never_holds_raw_material(
    service: KeyService, store: KeyStore, store_dir: Path
) -> None:
    key_id = create_key(service)
    service.handle(ROOT, "RotateKeyOnDemand", {"KeyId": key_id})
    materials = [store.get_material(key_id, v) for v in (1, 2)]
    with raw_db(store_dir) as conn:
        sealed = [bytes(r[0]) for r in conn.execute("SELECT material FROM key_versions")]
    # the search works: what is stored is found
    assert len(sealed) == 2 and all(s in on_disk(store_dir) for s in sealed)
    for material in materials:
        assert material is not None and len(material) == 32
        assert material not in on_disk(store_dir)
        assert base64.b64encode(material) not in on_disk(store_dir)
    store.checkpoint()
    for material in materials:
        assert material is not None and material not in on_disk(store_dir)


def test_material_moved_to_another_key_does_not_open(
    service: KeyService, store: KeyStore, store_dir: Path
) -> None:
    key_a, key_b = create_key(service), create_key(service)
    with raw_db(store_dir) as conn:
        conn.execute(
            "UPDATE key_versions SET material=(SELECT material FROM key_versions"
            " WHERE key_id=? AND version=1) WHERE key_id=? AND version=1",
            (key_a, key_b),
        )
    with pytest.raises(
        StoreCorruptError, match=rf"^sealed material of key '{key_b}' version 1 does not verify$"
    ):
        store.get_material(key_b, 1)
    assert store.get_material(key_a, 1) is not None
    # A fresh service (nothing cached) refuses to encrypt under the moved material.
    fresh = KeyService(store)
    with pytest.raises(StoreCorruptError):
        fresh.handle(ROOT, "Encrypt", {"KeyId": key_b, "Plaintext": b"secret"})


def test_material_moved_to_another_version_does_not_open(
    service: KeyService, store: KeyStore, store_dir: Path
) -> None:
    key_id = create_key(service)
    service.handle(ROOT, "RotateKeyOnDemand", {"KeyId": key_id})
    with raw_db(store_dir) as conn:
        conn.execute(
            "UPDATE key_versions SET material=(SELECT material FROM key_versions"
            " WHERE key_id=? AND version=1) WHERE key_id=? AND version=2",
            (key_id, key_id),
        )
    with pytest.raises(StoreCorruptError, match=r"version 2 does not verify$"):
        store.get_material(key_id, 2)


def test_material_of_a_missing_version_is_none(service: KeyService, store: KeyStore) -> None:
    key_id = create_key(service)
    assert store.get_material(key_id, 2) is None


# --- transactions --------------------------------------------------------------------------


def test_transaction_commits(store: KeyStore, store_dir: Path) -> None:
    with store.transaction():
        store.insert_key(key_record("11111111-1111-4111-8111-111111111111"))
    with raw_db(store_dir) as conn:
        assert conn.execute("SELECT count(*) FROM keys").fetchone() == (1,)


def test_failing_transaction_rolls_back(store: KeyStore, store_dir: Path) -> None:
    key_id = "11111111-1111-4111-8111-111111111111"
    with pytest.raises(RuntimeError, match=r"^boom$"), store.transaction():
        store.insert_key(key_record(key_id))
        store.add_version(key_id, 1, os.urandom(32), START, None)
        assert store.get_key(key_id) is not None
        raise RuntimeError("boom")
    assert store.get_key(key_id) is None
    assert store.versions(key_id) == []
    with raw_db(store_dir) as conn:
        assert conn.execute("SELECT count(*) FROM key_versions").fetchone() == (0,)
    with store.transaction():  # the connection is usable again
        store.insert_key(key_record(key_id))
    assert store.get_key(key_id) is not None


def test_savepoint_undoes_only_its_own_work(store: KeyStore) -> None:
    outer, inner = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    with store.transaction():
        store.insert_key(key_record(outer))
        with pytest.raises(RuntimeError), store.savepoint():
            store.insert_key(key_record(inner))
            raise RuntimeError("inner fails")
        assert store.get_key(inner) is None
        assert store.get_key(outer) is not None
    assert store.get_key(outer) is not None
    assert store.get_key(inner) is None


def test_nested_savepoints(store: KeyStore) -> None:
    ids = [f"{n}{n}{n}{n}{n}{n}{n}{n}-1111-4111-8111-111111111111" for n in range(1, 4)]
    with store.transaction(), store.savepoint():
        store.insert_key(key_record(ids[0]))
        with pytest.raises(RuntimeError), store.savepoint():
            store.insert_key(key_record(ids[1]))
            with store.savepoint():
                store.insert_key(key_record(ids[2]))
            raise RuntimeError("middle fails")
    assert [store.get_key(i) is not None for i in ids] == [True, False, False]


def test_savepoint_inside_failed_transaction_is_rolled_back_too(store: KeyStore) -> None:
    key_id = "11111111-1111-4111-8111-111111111111"
    with pytest.raises(RuntimeError), store.transaction():
        with store.savepoint():
            store.insert_key(key_record(key_id))
        raise RuntimeError("after the savepoint")
    assert store.get_key(key_id) is None


def test_failed_call_leaves_no_half_made_key(
    service: KeyService, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateKey failing after the key row was written: the key is undone, the call audited."""

    def refuse(*args: object) -> None:
        raise TagException("refused for the test")

    monkeypatch.setattr(store, "set_tag", refuse)
    with pytest.raises(TagException, match=r"^refused for the test$"):
        create_key(service, Tags=[{"TagKey": "a", "TagValue": "b"}])
    assert store.list_key_ids(None, 10) == []
    (record,) = store.audit_records(0, 10)
    assert record["operation"] == "CreateKey"
    assert record["outcome"] == "TagException"
    assert store.verify_audit() == (1, None)


def test_unexpected_error_in_a_call_rolls_everything_back(
    service: KeyService, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "set_tag", crash)
    with pytest.raises(RuntimeError):
        create_key(service, Tags=[{"TagKey": "a", "TagValue": "b"}])
    assert store.list_key_ids(None, 10) == []
    assert store.verify_audit() == (0, None)


# --- rows read again within a connection --------------------------------------------------


def test_a_change_by_another_connection_is_seen_at_once(
    service: KeyService, store: KeyStore, store_dir: Path, clock: list[float]
) -> None:
    """The store reuses rows it has read; a commit by another process (the CLI beside a
    mount) must still take effect on this connection's very next call."""
    key_id = create_key(service)
    generate = {"KeyId": key_id, "KeySpec": "AES_256"}
    service.handle(ROOT, "GenerateDataKey", generate)  # the key's row is now remembered
    other = KeyStore.open(store_dir, REGION)
    try:
        KeyService(other, clock=lambda: clock[0]).handle(ROOT, "DisableKey", {"KeyId": key_id})
    finally:
        other.close()
    with pytest.raises(Exception, match="is disabled"):
        service.handle(ROOT, "GenerateDataKey", generate)


def test_a_rolled_back_change_is_not_remembered(store: KeyStore) -> None:
    key_id = "11111111-1111-4111-8111-111111111111"
    with store.transaction():
        store.insert_key(key_record(key_id))
    with pytest.raises(RuntimeError), store.transaction():
        key = store.get_key(key_id)
        assert key is not None
        key.description = "changed"
        store.update_key(key)
        assert store.get_key(key_id).description == "changed"  # type: ignore[union-attr]
        raise RuntimeError("undo")
    with store.transaction():
        assert store.get_key(key_id).description == ""  # type: ignore[union-attr]


def test_a_returned_row_is_a_copy(store: KeyStore) -> None:
    key_id = "11111111-1111-4111-8111-111111111111"
    with store.transaction():
        store.insert_key(key_record(key_id))
        key = store.get_key(key_id)
        assert key is not None
        key.state = KeyState.DISABLED  # changed but never written back
        assert store.get_key(key_id).state is KeyState.ENABLED  # type: ignore[union-attr]


def test_two_connections_appending_keep_one_chain(
    service: KeyService, store: KeyStore, store_dir: Path, clock: list[float]
) -> None:
    """Each connection remembers the audit head it wrote; an append by the other must
    make it read the head again, or the chain would fork."""
    key_id = create_key(service)
    other = KeyStore.open(store_dir, REGION)
    try:
        other_service = KeyService(other, clock=lambda: clock[0])
        generate = {"KeyId": key_id, "KeySpec": "AES_256"}
        for _ in range(3):
            service.handle(ROOT, "GenerateDataKey", generate)
            other_service.handle(ROOT, "GenerateDataKey", generate)
    finally:
        other.close()
    assert store.verify_audit() == (7, None)


# --- audit chain ---------------------------------------------------------------------------


@pytest.fixture
def audited(store: KeyStore) -> KeyStore:
    """A store with five audit records."""
    for n in range(1, 6):
        with store.transaction():
            assert store.append_audit({"n": n, "action": "kms:Test"}) == n
    return store


def test_intact_chain_verifies(audited: KeyStore) -> None:
    assert audited.verify_audit() == (5, None)
    assert [r["n"] for r in audited.audit_records(0, 100)] == [1, 2, 3, 4, 5]
    assert [r["seq"] for r in audited.audit_records(2, 2)] == [3, 4]


def test_empty_chain_verifies(store: KeyStore) -> None:
    assert store.verify_audit() == (0, None)


def test_chain_survives_reopening(audited: KeyStore, store_dir: Path) -> None:
    audited.close()
    store = KeyStore.open(store_dir, REGION)
    try:
        with store.transaction():
            store.append_audit({"n": 6})
        assert store.verify_audit() == (6, None)
    finally:
        store.close()


@pytest.mark.parametrize("seq", [1, 3, 5])
def test_edited_record_is_detected(audited: KeyStore, store_dir: Path, seq: int) -> None:
    with raw_db(store_dir) as conn:
        conn.execute(
            "UPDATE audit SET record=replace(record, '\"kms:Test\"', '\"kms:Other\"') WHERE seq=?",
            (seq,),
        )
    assert audited.verify_audit() == (seq - 1, f"record {seq} was altered")


def test_edited_mac_is_detected(audited: KeyStore, store_dir: Path) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("UPDATE audit SET mac=? WHERE seq=2", (os.urandom(32),))
    assert audited.verify_audit() == (1, "record 2 was altered")


def test_deleted_middle_record_is_detected(audited: KeyStore, store_dir: Path) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("DELETE FROM audit WHERE seq=3")
    assert audited.verify_audit() == (2, "record 3 is missing")


def test_deleted_first_record_is_detected(audited: KeyStore, store_dir: Path) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("DELETE FROM audit WHERE seq=1")
    assert audited.verify_audit() == (0, "record 1 is missing")


def test_renumbered_records_are_detected(audited: KeyStore, store_dir: Path) -> None:
    """Closing the gap after a deletion does not help: each MAC binds its number."""
    with raw_db(store_dir) as conn:
        conn.execute("DELETE FROM audit WHERE seq=3")
        conn.execute("UPDATE audit SET seq=seq-1 WHERE seq>3")
    assert audited.verify_audit() == (2, "record 3 was altered")


def test_deleted_last_record_is_detected(audited: KeyStore, store_dir: Path) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("DELETE FROM audit WHERE seq=5")
    assert audited.verify_audit() == (4, "records after 4 were removed (the log had 5)")


def test_deleted_records_with_head_intact_is_detected(audited: KeyStore, store_dir: Path) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("DELETE FROM audit")
    assert audited.verify_audit() == (0, "records after 0 were removed (the log had 5)")


def test_forged_head_is_detected(audited: KeyStore, store_dir: Path) -> None:
    """Remove the last record and point the head at record 4 without the audit key."""
    with raw_db(store_dir) as conn:
        (mac4,) = conn.execute("SELECT mac FROM audit WHERE seq=4").fetchone()
        (head,) = conn.execute("SELECT value FROM meta WHERE name='audit_head'").fetchone()
        conn.execute("DELETE FROM audit WHERE seq=5")
        forged = struct.pack(">Q", 4) + bytes(mac4) + bytes(head)[40:]  # the old head MAC
        conn.execute("UPDATE meta SET value=? WHERE name='audit_head'", (forged,))
    assert audited.verify_audit() == (4, "the audit head was altered")


def test_deleted_head_is_detected(audited: KeyStore, store_dir: Path) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("DELETE FROM meta WHERE name='audit_head'")
    assert audited.verify_audit() == (5, "the audit head is missing")


def test_emptied_log_without_head_is_detected(audited: KeyStore, store_dir: Path) -> None:
    with raw_db(store_dir) as conn:
        conn.execute("DELETE FROM audit")
        conn.execute("DELETE FROM meta WHERE name='audit_head'")
    assert audited.verify_audit()[1] is not None


def test_audit_never_holds_plaintext(service: KeyService, store: KeyStore) -> None:
    key_id = create_key(service)
    secret = b"the-plaintext-marker-0123456789"
    blob = service.handle(ROOT, "Encrypt", {"KeyId": key_id, "Plaintext": secret})
    out = service.handle(ROOT, "Decrypt", {"CiphertextBlob": blob["CiphertextBlob"]})
    data_key = service.handle(ROOT, "GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"})
    assert out["Plaintext"] == secret
    text = repr(store.audit_records(0, 1000))
    for forbidden in (secret, data_key["Plaintext"], blob["CiphertextBlob"]):
        assert forbidden.decode("latin-1") not in text
        assert base64.b64encode(forbidden).decode() not in text
        assert forbidden.hex() not in text
    assert store.verify_audit() == (4, None)


# --- crash safety --------------------------------------------------------------------------

_CRASH_CHILD = """
import sys
from pathlib import Path
from envfs.identity import Caller
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

store = KeyStore.open(Path(sys.argv[1]), sys.argv[2])
service = KeyService(store)
caller = Caller.from_ids(0, 0)
for i in range(1_000_000):
    tags = [{"TagKey": "n", "TagValue": str(i)}]
    created = service.handle(caller, "CreateKey", {"Description": f"crash {i}", "Tags": tags})
    key = created["KeyMetadata"]["KeyId"]
    print("key", key, flush=True)
    service.handle(caller, "CreateAlias", {"AliasName": "alias/crash-" + key, "TargetKeyId": key})
    print("alias", key, flush=True)
    service.handle(caller, "RotateKeyOnDemand", {"KeyId": key})
    print("rotated", key, flush=True)
"""


def _run_and_kill(store_dir: Path, delay: float) -> list[tuple[str, str]]:
    """Run the crash child until it acknowledged a few keys, wait ``delay``, SIGKILL it."""
    with subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, str(store_dir), REGION],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        out = proc.stdout
        watchdog = threading.Timer(30.0, proc.kill)
        watchdog.start()
        try:
            head = [out.readline() for _ in range(6)]
            assert all(line.endswith("\n") for line in head), proc.stderr.read()
            # Keep reading so that a full pipe never holds the child still between calls.
            rest: list[str] = []
            reader = threading.Thread(target=lambda: rest.append(out.read()))
            reader.start()
            time.sleep(delay)
            proc.kill()
            proc.wait()
            reader.join()
        finally:
            watchdog.cancel()
        assert proc.returncode == -9, proc.stderr.read()
    text = "".join(head + rest)
    complete = text[: text.rfind("\n") + 1]  # a line cut short by the kill acknowledges nothing
    return [(word, key) for word, key in (line.split(" ") for line in complete.splitlines())]


def _check_consistent(store_dir: Path, acknowledged: list[tuple[str, str]]) -> None:
    store = KeyStore.open(store_dir, REGION)
    try:
        for what, key_id in acknowledged:
            assert store.get_key(key_id) is not None, f"acknowledged key {key_id} is lost"
            if what == "alias":
                alias = store.get_alias(f"alias/crash-{key_id}")
                assert alias is not None and alias[0] == key_id
            if what == "rotated":
                assert len(store.versions(key_id)) == 2
        key_ids = store.list_key_ids(None, 1_000_000)
        for key_id in key_ids:
            key = store.get_key(key_id)
            assert key is not None
            KeyPolicy.parse(key.policy, check_names=False)
            versions = [v.version for v in store.versions(key_id)]
            assert versions[:1] == [1], f"key {key_id} has no version 1"
            assert versions == list(range(1, len(versions) + 1))
            for version in versions:
                assert store.get_material(key_id, version) is not None
            assert "n" in store.tags(key_id)
        count, problem = store.verify_audit()
        assert problem is None
        records = store.audit_records(0, 10_000_000)
        assert len(records) == count
        created = {
            r["key_arn"].rsplit("/", 1)[1]
            for r in records
            if r["operation"] == "CreateKey" and r["outcome"] == "Success"
        }
        assert created == set(key_ids)  # every key was audited, every audited key exists
        # and the store still takes writes after the crash
        create_key(KeyService(store), Tags=[{"TagKey": "n", "TagValue": "after"}])
    finally:
        store.close()


def test_crash_loses_nothing_acknowledged(store: KeyStore, store_dir: Path) -> None:
    store.close()
    seen: list[tuple[str, str]] = []
    for delay in (0.05, 0.35, 0.7):
        acknowledged = _run_and_kill(store_dir, delay)
        assert len(acknowledged) >= 6
        seen += acknowledged
        _check_consistent(store_dir, seen)


# --- destroyed key material ----------------------------------------------------------------


def test_deleted_key_material_is_destroyed(
    service: KeyService, store: KeyStore, store_dir: Path, clock: list[float]
) -> None:
    key_id = create_key(service, Tags=[{"TagKey": "t", "TagValue": "v"}])
    service.handle(ROOT, "CreateAlias", {"AliasName": "alias/doomed", "TargetKeyId": key_id})
    blob_v1 = service.handle(ROOT, "Encrypt", {"KeyId": key_id, "Plaintext": b"one"})
    service.handle(ROOT, "RotateKeyOnDemand", {"KeyId": key_id})
    blob_v2 = service.handle(ROOT, "Encrypt", {"KeyId": key_id, "Plaintext": b"two"})
    keeper = create_key(service)
    kept = service.handle(ROOT, "Encrypt", {"KeyId": keeper, "Plaintext": b"kept"})
    with raw_db(store_dir) as conn:
        sealed = [
            bytes(r[0])
            for r in conn.execute("SELECT material FROM key_versions WHERE key_id=?", (key_id,))
        ]
    assert len(sealed) == 2
    assert all(s in on_disk(store_dir) for s in sealed)

    service.handle(ROOT, "ScheduleKeyDeletion", {"KeyId": key_id, "PendingWindowInDays": 7})
    clock[0] += 7 * DAY - 1
    service.run_due_tasks()
    with pytest.raises(KMSInvalidStateException):
        service.handle(ROOT, "Decrypt", {"CiphertextBlob": blob_v1["CiphertextBlob"]})
    assert len(store.versions(key_id)) == 2

    clock[0] += 2
    service.run_due_tasks()
    with raw_db(store_dir) as conn:
        for table in ("keys", "key_versions", "aliases", "tags"):
            count = conn.execute(f"SELECT count(*) FROM {table} WHERE key_id=?", (key_id,))
            assert count.fetchone() == (0,), table
    with pytest.raises(NotFoundException):
        service.handle(ROOT, "DescribeKey", {"KeyId": key_id})
    for blob in (blob_v1, blob_v2):
        with pytest.raises(NotFoundException):
            service.handle(ROOT, "Decrypt", {"CiphertextBlob": blob["CiphertextBlob"]})
    # nor with a service that never cached the material
    with pytest.raises(NotFoundException):
        KeyService(store).handle(ROOT, "Decrypt", {"CiphertextBlob": blob_v1["CiphertextBlob"]})

    store.checkpoint()
    data = on_disk(store_dir)
    for s in sealed:
        assert s not in data
    plain = service.handle(ROOT, "Decrypt", {"CiphertextBlob": kept["CiphertextBlob"]})
    assert plain["Plaintext"] == b"kept"
    assert store.verify_audit()[1] is None
    deletions = [r for r in store.audit_records(0, 1000) if r["operation"] == "DeleteKey"]
    assert [r["key_arn"].rsplit("/", 1)[1] for r in deletions] == [key_id]


def test_cancelled_deletion_keeps_material(
    service: KeyService, store: KeyStore, clock: list[float]
) -> None:
    key_id = create_key(service)
    blob = service.handle(ROOT, "Encrypt", {"KeyId": key_id, "Plaintext": b"one"})
    service.handle(ROOT, "ScheduleKeyDeletion", {"KeyId": key_id, "PendingWindowInDays": 7})
    service.handle(ROOT, "CancelKeyDeletion", {"KeyId": key_id})
    clock[0] += 30 * DAY
    service.run_due_tasks()
    service.handle(ROOT, "EnableKey", {"KeyId": key_id})
    out = service.handle(ROOT, "Decrypt", {"CiphertextBlob": blob["CiphertextBlob"]})
    assert out["Plaintext"] == b"one"
