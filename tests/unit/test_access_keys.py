"""Access keys of Unix users: their shapes, the sealed store, the operations and who may
call them, and their audit records. Targets are real users of this system (root, nobody)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from envfs.errors import (
    AccessDeniedException,
    LimitExceededException,
    NotFoundException,
    StoreCorruptError,
    StoreError,
    ValidationException,
)
from envfs.identity import Caller
from envfs.kms.model import (
    ACCESS_KEY_ID_RE,
    AccessKeyStatus,
    new_access_key_id,
    new_access_key_secret,
)
from envfs.kms.service import KeyService
from envfs.kms.store import SCHEMA_VERSION, AccessKeyRecord, KeyStore

REGION = "local-1"
NOBODY_UID = 65534
ROOT = Caller(0, 0, frozenset({0}), "root", frozenset({"root"}))
MANAGER = Caller(61001, 61001, frozenset({61001, 61010}))  # 61010: the key creators group
NOBODY = Caller(NOBODY_UID, NOBODY_UID, frozenset({NOBODY_UID}), "nobody")
STRANGER = Caller(61003, 61003, frozenset({61003}))
NOW = 1_800_000_000.0
SECRET_RE = re.compile(r"^[A-Za-z0-9+/]{40}$")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    KeyStore.init(tmp_path / REGION, REGION, key_creators_group="gid:61010").close()
    return tmp_path / REGION


@pytest.fixture
def service(store_dir: Path) -> Iterator[KeyService]:
    svc = KeyService(KeyStore.open(store_dir, REGION), clock=lambda: NOW)
    yield svc
    svc.close()


def create(svc: KeyService, caller: Caller = ROOT, **params: Any) -> dict[str, Any]:
    access_key: dict[str, Any] = svc.handle(caller, "CreateAccessKey", params)["AccessKey"]
    return access_key


def listed(svc: KeyService, caller: Caller = ROOT, **params: Any) -> list[str]:
    answer = svc.handle(caller, "ListAccessKeys", params)
    return sorted(m["AccessKeyId"] for m in answer["AccessKeyMetadata"])


def raw(store_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(store_dir / "keys.db", isolation_level=None)


# --- shapes -----------------------------------------------------------------------------------


def test_ids_and_secrets_have_aws_shapes_with_envfs_prefix() -> None:
    assert new_access_key_id(bytes(10)) == "EKIA" + "A" * 16
    assert new_access_key_id(b"\xff" * 10) == "EKIA" + "7" * 16
    assert new_access_key_secret(bytes(30)) == "A" * 40
    assert SECRET_RE.fullmatch(new_access_key_secret(b"\xfb" * 30))
    with pytest.raises(ValueError, match=r"^an access key id takes 10 random bytes$"):
        new_access_key_id(bytes(9))


def test_create_answers_in_iam_shape_with_the_secret(service: KeyService) -> None:
    key = create(service, UserName="nobody")
    assert ACCESS_KEY_ID_RE.fullmatch(key["AccessKeyId"]) and len(key["AccessKeyId"]) == 20
    assert SECRET_RE.fullmatch(key["SecretAccessKey"])
    assert key["UserName"] == "nobody" and key["Uid"] == NOBODY_UID
    assert key["Status"] == "Active" and key["CreateDate"] == NOW
    assert create(service, UserName="nobody")["AccessKeyId"] != key["AccessKeyId"]


def test_a_uid_names_its_user(service: KeyService) -> None:
    key = create(service, UserName=str(NOBODY_UID))
    assert (key["UserName"], key["Uid"]) == ("nobody", NOBODY_UID)


def test_without_a_user_name_the_key_is_the_callers(service: KeyService) -> None:
    key = create(service, NOBODY)
    assert (key["UserName"], key["Uid"]) == ("nobody", NOBODY_UID)


def test_an_unknown_user_is_a_validation_error(service: KeyService) -> None:
    for name in ("no-such-user-envfs", "4000000000", "99999999999999999999999"):
        with pytest.raises(ValidationException, match=rf"^user '{name}' does not exist"):
            create(service, UserName=name)


# --- the secret: only through access_key_secret, only while Active ----------------------------


def test_the_secret_opens_for_active_keys_only(service: KeyService) -> None:
    key = create(service, UserName="nobody")
    kid = key["AccessKeyId"]
    assert service.store.access_key_secret(kid) == (key["SecretAccessKey"].encode(), NOBODY_UID)
    service.handle(ROOT, "UpdateAccessKey", {"AccessKeyId": kid, "Status": "Inactive"})
    assert service.store.access_key_secret(kid) is None
    service.handle(ROOT, "UpdateAccessKey", {"AccessKeyId": kid, "Status": "Active"})
    assert service.store.access_key_secret(kid) is not None
    service.handle(ROOT, "DeleteAccessKey", {"AccessKeyId": kid})
    assert service.store.access_key_secret(kid) is None
    assert service.store.access_key_secret("EKIA" + "A" * 16) is None


def test_no_listing_shows_a_secret(service: KeyService) -> None:
    key = create(service, UserName="nobody")
    for caller, params in ((ROOT, {}), (ROOT, {"UserName": "nobody"}), (NOBODY, {})):
        text = json.dumps(service.handle(caller, "ListAccessKeys", params))
        assert key["AccessKeyId"] in text
        assert key["SecretAccessKey"] not in text and "Secret" not in text


def test_the_secret_is_not_in_the_store_files(service: KeyService, store_dir: Path) -> None:
    secret = create(service, UserName="nobody")["SecretAccessKey"].encode()
    files = [p for p in store_dir.iterdir() if p.name.startswith("keys.db")]
    assert len(files) >= 1
    for path in files:
        assert secret not in path.read_bytes(), path
    service.store.checkpoint()
    assert secret not in (store_dir / "keys.db").read_bytes()


def test_a_sealed_secret_moved_to_another_row_does_not_open(
    service: KeyService, store_dir: Path
) -> None:
    a = create(service, UserName="nobody")["AccessKeyId"]
    b = create(service, UserName="nobody")["AccessKeyId"]
    with raw(store_dir) as conn:
        rows = dict(conn.execute("SELECT access_key_id, secret FROM access_keys").fetchall())
        conn.execute("UPDATE access_keys SET secret=? WHERE access_key_id=?", (rows[b], a))
    with pytest.raises(StoreCorruptError, match=rf"^sealed secret of access key '{a}'"):
        service.store.access_key_secret(a)
    assert service.store.access_key_secret(b) is not None


def test_an_access_key_given_to_another_user_does_not_open(
    service: KeyService, store_dir: Path
) -> None:
    """Whoever can write the store's rows cannot hand a user's key to root: the uid is
    bound to the sealed secret."""
    kid = create(service, UserName="nobody")["AccessKeyId"]
    with raw(store_dir) as conn:
        conn.execute("UPDATE access_keys SET uid=0 WHERE access_key_id=?", (kid,))
    with pytest.raises(StoreCorruptError, match=rf"^sealed secret of access key '{kid}'"):
        service.store.access_key_secret(kid)


def test_a_store_with_another_root_key_does_not_open_the_secret(
    service: KeyService, tmp_path: Path
) -> None:
    """The HKDF label and region bind the seal: a row copied into another store fails."""
    kid = create(service, UserName="nobody")["AccessKeyId"]
    other = KeyStore.init(tmp_path / "other" / REGION, REGION)
    try:
        with raw(service.store.directory) as src, raw(other.directory) as dst:
            row = src.execute("SELECT * FROM access_keys").fetchone()
            dst.execute("INSERT INTO access_keys VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        with pytest.raises(StoreCorruptError):
            other.access_key_secret(kid)
    finally:
        other.close()


# --- transactions -----------------------------------------------------------------------------


def test_a_failed_transaction_leaves_no_access_key(service: KeyService) -> None:
    record = AccessKeyRecord(
        "EKIA" + "B" * 16, NOBODY_UID, "nobody", AccessKeyStatus.ACTIVE, NOW, None
    )
    with pytest.raises(RuntimeError), service.store.transaction():
        service.store.insert_access_key(record, b"x" * 40)
        raise RuntimeError("boom")
    assert service.store.get_access_key(record.access_key_id) is None


def test_a_call_that_fails_after_inserting_leaves_no_key(
    service: KeyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = service.store.append_audit
    failures = []

    def failing_once(record: dict[str, Any]) -> int:
        if not failures:
            failures.append(record)
            raise StoreError("disk full")
        return real(record)

    monkeypatch.setattr(service.store, "append_audit", failing_once)
    with pytest.raises(StoreError, match=r"^disk full$"):
        create(service, UserName="nobody")
    assert failures and listed(service) == []


# --- schema upgrade ---------------------------------------------------------------------------


def test_a_schema_2_store_is_upgraded_and_takes_access_keys(store_dir: Path) -> None:
    with raw(store_dir) as conn:
        conn.execute("DROP TABLE access_keys")
        conn.execute("UPDATE meta SET value=2 WHERE name='schema'")
    svc = KeyService(KeyStore.open(store_dir, REGION), clock=lambda: NOW)
    try:
        assert svc.store.schema == SCHEMA_VERSION == 3
        assert svc.store.verify_audit() == (0, None)
        kid = create(svc, UserName="nobody")["AccessKeyId"]
        assert listed(svc) == [kid]
    finally:
        svc.close()
    with raw(store_dir) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone() == (3,)


def test_a_failed_upgrade_leaves_the_store_as_it_was(store_dir: Path) -> None:
    with raw(store_dir) as conn:
        conn.execute("DROP TABLE access_keys")
        conn.execute("UPDATE meta SET value=2 WHERE name='schema'")
        # A table in the way makes the upgrade's second statement (the index) fail.
        conn.execute("CREATE TABLE access_keys_by_uid (x)")
    with pytest.raises(StoreCorruptError, match=r"could not be upgraded to schema version 3"):
        KeyStore.open(store_dir, REGION)
    with raw(store_dir) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone() == (2,)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "access_keys" not in names


# --- who may do what --------------------------------------------------------------------------


def test_key_creators_manage_anyones_keys(service: KeyService) -> None:
    kid = create(service, MANAGER, UserName="nobody")["AccessKeyId"]
    assert listed(service, MANAGER) == [kid]
    service.handle(MANAGER, "UpdateAccessKey", {"AccessKeyId": kid, "Status": "Inactive"})
    service.handle(MANAGER, "DeleteAccessKey", {"AccessKeyId": kid})
    assert listed(service) == []


def test_a_user_manages_their_own_keys(service: KeyService) -> None:
    own = create(service, NOBODY, UserName="nobody")["AccessKeyId"]
    roots = create(service, ROOT)["AccessKeyId"]
    assert listed(service, NOBODY) == [own]
    assert listed(service, ROOT) == sorted([own, roots])
    service.handle(NOBODY, "UpdateAccessKey", {"AccessKeyId": own, "Status": "Inactive"})
    assert service.store.access_key_secret(own) is None
    service.handle(NOBODY, "DeleteAccessKey", {"AccessKeyId": own})
    assert listed(service, NOBODY) == []


def test_a_user_may_not_create_or_list_keys_of_another(service: KeyService) -> None:
    message = r"^user .* is not authorized to manage the access keys of user 'nobody'"
    with pytest.raises(AccessDeniedException, match=message):
        create(service, STRANGER, UserName="nobody")
    with pytest.raises(AccessDeniedException, match=message):
        listed(service, STRANGER, UserName="nobody")
    assert listed(service) == []


def test_another_users_key_reads_as_one_that_does_not_exist(service: KeyService) -> None:
    kid = create(service, UserName="nobody")["AccessKeyId"]
    missing = "EKIA" + "C" * 16
    for op, params in (
        ("UpdateAccessKey", {"Status": "Inactive"}),
        ("DeleteAccessKey", {}),
    ):
        with pytest.raises(NotFoundException) as theirs:
            service.handle(STRANGER, op, {"AccessKeyId": kid, **params})
        with pytest.raises(NotFoundException) as none:
            service.handle(STRANGER, op, {"AccessKeyId": missing, **params})
        assert str(theirs.value).replace(kid, "ID") == str(none.value).replace(missing, "ID")
    assert service.store.access_key_secret(kid) is not None


def test_a_service_on_a_users_behalf_may_not_manage_their_keys(service: KeyService) -> None:
    via = Caller(
        NOBODY_UID, NOBODY_UID, frozenset({NOBODY_UID}), "nobody", via="envfs-mount", via_uid=0
    )
    with pytest.raises(AccessDeniedException):
        create(service, via)
    with pytest.raises(AccessDeniedException):
        listed(service, via)
    kid = create(service, UserName="nobody")["AccessKeyId"]
    with pytest.raises(NotFoundException):
        service.handle(via, "DeleteAccessKey", {"AccessKeyId": kid})


def test_at_most_two_keys_per_user(service: KeyService) -> None:
    create(service, UserName="nobody")
    create(service, UserName="nobody")
    with pytest.raises(LimitExceededException, match=r"already has 2 access keys"):
        create(service, UserName="nobody")
    assert len(listed(service, UserName="nobody")) == 2
    create(service, UserName="root")  # another user's count is their own


def test_status_must_be_active_or_inactive(service: KeyService) -> None:
    kid = create(service, UserName="nobody")["AccessKeyId"]
    with pytest.raises(ValidationException, match=r"^Status 'active' is not valid"):
        service.handle(ROOT, "UpdateAccessKey", {"AccessKeyId": kid, "Status": "active"})


def test_malformed_ids_are_not_found(service: KeyService) -> None:
    with pytest.raises(NotFoundException, match=r"^access key 'AKIA' does not exist$"):
        service.handle(ROOT, "DeleteAccessKey", {"AccessKeyId": "AKIA"})


# --- audit ------------------------------------------------------------------------------------


def test_every_change_is_audited_and_no_secret_is(service: KeyService) -> None:
    key = create(service, UserName="nobody")
    kid = key["AccessKeyId"]
    service.handle(ROOT, "UpdateAccessKey", {"AccessKeyId": kid, "Status": "Inactive"})
    listed(service)
    with pytest.raises(AccessDeniedException):
        create(service, STRANGER, UserName="nobody")
    service.handle(ROOT, "DeleteAccessKey", {"AccessKeyId": kid})
    records = service.store.audit_records(0, 100)
    summary = [(r["operation"], r["outcome"], r.get("access_key_id")) for r in records]
    assert summary == [
        ("CreateAccessKey", "Success", kid),
        ("UpdateAccessKey", "Success", kid),
        ("ListAccessKeys", "Success", None),
        ("CreateAccessKey", "AccessDeniedException", None),
        ("DeleteAccessKey", "Success", kid),
    ]
    assert records[0]["request"] == {"UserName": "nobody"}
    assert records[1]["request"] == {"AccessKeyId": kid, "Status": "Inactive"}
    assert records[3]["caller"]["uid"] == STRANGER.uid
    assert key["SecretAccessKey"] not in json.dumps(records)
    assert service.store.verify_audit() == (5, None)


def test_a_use_is_shown_as_last_used_date(service: KeyService) -> None:
    kid = create(service, UserName="nobody")["AccessKeyId"]
    (meta,) = service.handle(ROOT, "ListAccessKeys", {})["AccessKeyMetadata"]
    assert "LastUsedDate" not in meta
    with service.store.transaction():
        service.store.mark_access_key_used(kid, NOW + 5)
    (meta,) = service.handle(ROOT, "ListAccessKeys", {})["AccessKeyMetadata"]
    assert meta["LastUsedDate"] == NOW + 5
