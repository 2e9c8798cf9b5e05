"""What a failed call costs the key service: a bounded audit record, and no sync.

Anyone may make a call fail (a denied Encrypt, an unknown key…) with up to a MiB of
request, and every failed call is recorded, so its record is bounded in size; a failed
call that would have changed a key is rolled back and its record committed without the
sync that a change of a key pays for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from envfs.errors import (
    AccessDeniedException,
    InvalidAliasNameException,
    KMSError,
    NotFoundException,
)
from envfs.kms.core import FAILED_CONTEXT_CHARS, FAILED_MESSAGE_CHARS, FAILED_RECORD_CHARS
from envfs.kms.model import MAX_CONTEXT_BYTES, encode_context
from envfs.kms.service import KeyService
from envfs.kms.store import DB_NAME, KeyStore
from tests.unit import test_service
from tests.unit.test_service import MANAGER, ROOT, STRANGER, USER, Clock, scenario_key

# The key service of the service tests, on their injected clock.
clock = test_service.clock
service = test_service.service


def big_context(size: int = MAX_CONTEXT_BYTES) -> dict[str, str]:
    """A context of exactly ``size`` bytes encoded (8 KiB, the most a call may give)."""
    context = {f"k{n:02}": "v" * 500 for n in range(16)}
    filler = size - len(encode_context(context)) - 4 - len(b"pad") - 4
    context["pad"] = "x" * filler
    assert len(encode_context(context)) == size
    return context


def canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def digest(value: object) -> dict[str, Any]:
    text = canonical(value)
    return {"chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def stored(svc: KeyService) -> list[str]:
    """The audit records' texts as the store keeps them, oldest first."""
    with contextlib.closing(sqlite3.connect(svc.store.directory / DB_NAME)) as db:
        return [row[0] for row in db.execute("SELECT record FROM audit ORDER BY seq")]


def last_record(svc: KeyService) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(stored(svc)[-1])
    return record


def store_bytes(svc: KeyService) -> int:
    svc.store.checkpoint()  # the WAL into the database, so that its size counts
    return (svc.store.directory / DB_NAME).stat().st_size


def test_a_denied_call_keeps_a_large_context_as_its_digest(service: KeyService) -> None:
    key = scenario_key(service)
    context = big_context()
    with pytest.raises(AccessDeniedException):
        service.handle(STRANGER, "Encrypt", {"KeyId": key, "Plaintext": b"x", **ctx(context)})
    text = stored(service)[-1]
    assert len(text) <= FAILED_RECORD_CHARS
    record = json.loads(text)
    assert "encryption_context" not in record
    assert record["omitted"] == {"encryption_context": digest(context)}
    assert record["outcome"] == "AccessDeniedException"
    assert record["key_arn"].endswith(key)
    assert service.handle(ROOT, "VerifyAudit", {})["Valid"] is True


def test_a_denied_call_keeps_a_small_context(service: KeyService) -> None:
    key = scenario_key(service)
    context = {"envfs:volume": "3f0c8a52-1111-4222-8333-944455556666", "envfs:file": "f" * 32}
    with pytest.raises(AccessDeniedException):
        service.handle(STRANGER, "Encrypt", {"KeyId": key, "Plaintext": b"x", **ctx(context)})
    record = last_record(service)
    assert record["encryption_context"] == context
    assert "omitted" not in record
    assert len(canonical({"c": {"k": "v" * FAILED_CONTEXT_CHARS}})) > FAILED_CONTEXT_CHARS


def test_a_successful_call_keeps_its_whole_context(service: KeyService) -> None:
    key = scenario_key(service)
    context = big_context()
    service.handle(USER, "Encrypt", {"KeyId": key, "Plaintext": b"x", **ctx(context)})
    record = last_record(service)
    assert record["encryption_context"] == context
    assert len(stored(service)[-1]) > MAX_CONTEXT_BYTES


def test_denied_calls_with_8_kib_contexts_grow_the_store_by_a_bounded_amount(
    service: KeyService,
) -> None:
    key = scenario_key(service)
    context = big_context()
    calls = 200
    before = store_bytes(service)
    params = {"KeyId": key, "Plaintext": b"x", **ctx(context)}
    for _ in range(calls):
        with pytest.raises(AccessDeniedException):
            service.handle(STRANGER, "Encrypt", params)
    growth = store_bytes(service) - before
    texts = stored(service)[-calls:]
    assert max(map(len, texts)) <= FAILED_RECORD_CHARS
    # Each record is its text, a MAC and SQLite's bookkeeping: well under 1 KiB here,
    # where keeping the context made 8.6 KB.
    assert growth <= calls * 1024, f"{growth / calls:.0f} bytes per denied call"


def hostile_calls(key: str) -> list[tuple[str, dict[str, Any], type[KMSError]]]:
    tags = [{"TagKey": f"t{n:04}", "TagValue": "v" * 200} for n in range(2000)]
    return [
        ("TagResource", {"KeyId": key, "Tags": tags}, AccessDeniedException),
        ("DescribeKey", {"KeyId": "x" * 2000}, NotFoundException),
        ("DescribeKey", {"KeyId": "alias/" + "\u00e9" * 2000}, InvalidAliasNameException),
        ("DescribeKey", {"KeyId": "alias/" + "\x01" * 2000}, InvalidAliasNameException),
        (
            "UntagResource",
            {"KeyId": key, "TagKeys": ["\u00e9" * 256] * 3000},
            AccessDeniedException,
        ),
        ("Encrypt", {"KeyId": key, "Plaintext": b"x", **ctx(big_context())}, AccessDeniedException),
    ]


@pytest.mark.parametrize("index", range(6))
def test_any_failed_call_leaves_at_most_4_kib_of_record(service: KeyService, index: int) -> None:
    key = scenario_key(service)
    operation, params, error = hostile_calls(key)[index]
    with pytest.raises(error):
        service.handle(STRANGER, operation, params)
    text = stored(service)[-1]
    assert len(text) <= FAILED_RECORD_CHARS
    record = json.loads(text)
    assert record["operation"] == operation
    assert record["caller"]["uid"] == STRANGER.uid
    assert record["outcome"] == error.aws_name
    assert len(record.get("message", "")) <= FAILED_MESSAGE_CHARS + 3
    assert service.handle(ROOT, "VerifyAudit", {})["Valid"] is True


def test_an_oversized_request_is_kept_as_its_digest(service: KeyService) -> None:
    key = scenario_key(service)
    tags = [{"TagKey": f"t{n:04}", "TagValue": "v"} for n in range(500)]
    with pytest.raises(AccessDeniedException):
        service.handle(STRANGER, "TagResource", {"KeyId": key, "Tags": tags})
    record = last_record(service)
    assert "request" not in record
    assert record["omitted"] == {"request": digest({"KeyId": key, "Tags": tags})}
    assert record["message"].startswith(f"user uid {STRANGER.uid} is not authorized")


def test_a_long_message_is_cut(service: KeyService) -> None:
    with pytest.raises(NotFoundException) as raised:
        service.handle(STRANGER, "DescribeKey", {"KeyId": "x" * 2000})
    record = last_record(service)
    assert len(raised.value.message) > FAILED_MESSAGE_CHARS  # the caller gets it whole
    assert record["message"] == raised.value.message[:FAILED_MESSAGE_CHARS] + "..."


def test_the_batched_records_of_a_mount_are_bounded_too(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore.init(tmp_path / "local-1", "local-1", key_creators_group="gid:61010")
    svc = KeyService(store, clock=clock, batch_audit=True)
    try:
        key = scenario_key(svc)
        blob = svc.handle(USER, "Encrypt", {"KeyId": key, "Plaintext": b"x", **ctx(big_context())})
        with pytest.raises(AccessDeniedException):
            svc.handle(STRANGER, "Decrypt", {"CiphertextBlob": blob["CiphertextBlob"]})
        svc.store.flush_audit()
        record = last_record(svc)
        assert (record["operation"], record["outcome"]) == ("Decrypt", "AccessDeniedException")
        assert len(stored(svc)[-1]) <= FAILED_RECORD_CHARS
    finally:
        svc.close()


# --- no sync for a failed change --------------------------------------------------------------


@pytest.fixture
def commits(service: KeyService, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The ``durable`` flag of every transaction the service commits, in order."""
    committed: list[bool] = []
    real = service.store.transaction

    @contextlib.contextmanager
    def spy(*, durable: bool = True) -> Iterator[None]:
        with real(durable=durable):
            yield
        committed.append(durable)

    monkeypatch.setattr(service.store, "transaction", spy)
    return committed


def test_a_denied_key_change_commits_only_its_record_and_without_a_sync(
    service: KeyService, commits: list[bool]
) -> None:
    key = scenario_key(service)
    statement = {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}
    policy = json.dumps({"Statement": [statement]})
    commits.clear()
    with pytest.raises(AccessDeniedException):
        service.handle(STRANGER, "PutKeyPolicy", {"KeyId": key, "Policy": policy})
    assert commits == [False]
    assert last_record(service)["outcome"] == "AccessDeniedException"
    with pytest.raises(AccessDeniedException):  # the policy did not change
        service.handle(STRANGER, "DescribeKey", {"KeyId": key})
    commits.clear()
    service.handle(MANAGER, "PutKeyPolicy", {"KeyId": key, "Policy": policy})
    assert commits == [True]  # a change of a key is synced, its record with it
    assert last_record(service)["outcome"] == "Success"


# --- throttled calls --------------------------------------------------------------------------


def test_throttled_calls_are_summed_up_in_one_record(service: KeyService, clock: Clock) -> None:
    service.record_throttled(STRANGER, 812, 3, clock.now - 10, clock.now - 1)
    record = last_record(service)
    assert record == {
        "seq": record["seq"],
        "time": clock.now,
        "caller": {"uid": STRANGER.uid, "user": None, "gid": STRANGER.gid},
        "operation": "ThrottleSummary",
        "action": None,
        "key_arn": None,
        "outcome": "ThrottlingException",
        "message": f"812 calls and 3 connections of uid {STRANGER.uid} were refused for"
        " exceeding its limits",
        "throttled": {
            "calls": 812,
            "connections": 3,
            "first": clock.now - 10,
            "last": clock.now - 1,
        },
    }
    assert service.handle(ROOT, "VerifyAudit", {})["Valid"] is True


def ctx(context: dict[str, str]) -> dict[str, Any]:
    return {"EncryptionContext": context}
