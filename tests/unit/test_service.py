"""KeyService: operations, key states with a moved clock, rotation, policy enforcement."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from envfs.errors import (
    AccessDeniedException,
    AlreadyExistsException,
    DisabledException,
    IncorrectKeyException,
    InvalidAliasNameException,
    InvalidCiphertextException,
    InvalidMarkerException,
    InvalidRequestException,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from envfs.identity import Caller
from envfs.kms.operations import OPERATIONS
from envfs.kms.service import DAY, KeyService
from envfs.kms.store import KeyStore

ROOT = Caller(0, 0, frozenset({0}), "root", frozenset({"root"}))
MANAGER = Caller(61001, 61001, frozenset({61001, 61010}))  # 61010: the key creators group
USER = Caller(61002, 61002, frozenset({61002}))
STRANGER = Caller(61003, 61003, frozenset({61003}))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, days: float) -> None:
        self.now += days * DAY


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(tmp_path: Path, clock: Clock) -> Iterator[KeyService]:
    store = KeyStore.init(tmp_path / "local-1", "local-1", key_creators_group="gid:61010")
    svc = KeyService(store, clock=clock)
    yield svc
    svc.close()


def create(svc: KeyService, caller: Caller = ROOT, **params: Any) -> str:
    key_id: str = svc.handle(caller, "CreateKey", params)["KeyMetadata"]["KeyId"]
    return key_id


def scenario_key(svc: KeyService) -> str:
    """The origin document's key: MANAGER administers, USER uses."""
    return create(svc, MANAGER, KeyAdministrators=["uid:61001"], KeyUsers=["uid:61002"])


def encrypt(svc: KeyService, key: str, data: bytes = b"Some text", **ctx: str) -> bytes:
    params = {"KeyId": key, "Plaintext": data, "EncryptionContext": ctx}
    blob: bytes = svc.handle(USER, "Encrypt", params)["CiphertextBlob"]
    return blob


def state(svc: KeyService, key: str) -> str:
    return str(svc.handle(MANAGER, "DescribeKey", {"KeyId": key})["KeyMetadata"]["KeyState"])


# --- the table of handlers ----------------------------------------------------------------


def test_the_handler_table_covers_exactly_the_operations() -> None:
    assert sorted(KeyService.HANDLERS) == sorted(OPERATIONS)


def test_each_operation_has_a_handler_of_its_own() -> None:
    handlers = list(KeyService.HANDLERS.values())
    assert len(set(handlers)) == len(handlers)


def test_each_handler_is_the_method_the_service_has_by_its_name() -> None:
    """A method of the same name further down the classes would never run."""
    for name, handler in KeyService.HANDLERS.items():
        assert getattr(KeyService, handler.__name__) is handler, name


# --- creating and describing --------------------------------------------------------------


def test_create_key_metadata_is_aws_shaped(service: KeyService, clock: Clock) -> None:
    meta = service.handle(ROOT, "CreateKey", {"Description": "demo"})["KeyMetadata"]
    assert meta["Arn"] == f"arn:envfs:kms:local-1:{service.account}:key/{meta['KeyId']}"
    assert meta["KeyState"] == "Enabled" and meta["Enabled"] is True
    assert meta["CreationDate"] == clock.now
    assert meta["Origin"] == "ENVFS_KMS"
    assert meta["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert meta["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert meta["Description"] == "demo"


def test_creating_keys_is_for_root_and_the_creators_group(service: KeyService) -> None:
    create(service, ROOT)
    create(service, MANAGER)
    with pytest.raises(AccessDeniedException, match=r"only root and members of group 'gid:61010'"):
        create(service, USER)


def test_creator_is_admin_and_user_without_flags(service: KeyService) -> None:
    key = create(service, MANAGER)
    blob = service.handle(MANAGER, "Encrypt", {"KeyId": key, "Plaintext": b"x"})
    assert blob["KeyId"].endswith(key)
    service.handle(MANAGER, "DisableKey", {"KeyId": key})
    with pytest.raises(AccessDeniedException):
        service.handle(USER, "DescribeKey", {"KeyId": key})


def test_a_missing_flag_defaults_to_the_creator(service: KeyService) -> None:
    key = create(service, MANAGER, KeyUsers=["uid:61002"])
    service.handle(MANAGER, "DisableKey", {"KeyId": key})  # creator administers
    with pytest.raises(AccessDeniedException):
        service.handle(MANAGER, "Encrypt", {"KeyId": key, "Plaintext": b"x"})


def test_policy_and_role_flags_are_exclusive(service: KeyService) -> None:
    policy = json.dumps(
        {"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}]}
    )
    with pytest.raises(ValidationException, match="not both"):
        create(service, ROOT, Policy=policy, KeyUsers=["uid:1"])


def test_create_key_lockout_check(service: KeyService) -> None:
    policy = json.dumps(
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Unix": "uid:61002"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ]
        }
    )
    with pytest.raises(MalformedPolicyDocumentException, match="will not allow you"):
        create(service, MANAGER, Policy=policy)
    create(service, MANAGER, Policy=policy, BypassPolicyLockoutSafetyCheck=True)


def test_malformed_policy_is_refused_at_create(service: KeyService) -> None:
    with pytest.raises(MalformedPolicyDocumentException):
        create(service, ROOT, Policy="{not json")
    with pytest.raises(MalformedPolicyDocumentException):
        create(service, ROOT, KeyUsers=["user:no-such-user-envfs-test"])


def test_unsupported_key_specs(service: KeyService) -> None:
    with pytest.raises(ValidationException, match="KeySpec 'RSA_2048' is not supported"):
        create(service, ROOT, KeySpec="RSA_2048")


def test_multi_region_false_is_accepted_and_true_unsupported(service: KeyService) -> None:
    # AWS's CreateKey takes MultiRegion; false asks for what every envfs key is.
    meta = service.handle(ROOT, "CreateKey", {"MultiRegion": False})["KeyMetadata"]
    assert meta["MultiRegion"] is False
    with pytest.raises(
        UnsupportedOperationException,
        match=r"^MultiRegion true is not supported: envfs keys are single-region$",
    ):
        create(service, ROOT, MultiRegion=True)


def test_request_shape_is_validated(service: KeyService) -> None:
    with pytest.raises(InvalidRequestException, match="unknown operation 'Explode'"):
        service.handle(ROOT, "Explode", {})
    with pytest.raises(ValidationException, match="unknown parameter 'Bogus'"):
        service.handle(ROOT, "CreateKey", {"Bogus": 1})
    with pytest.raises(ValidationException, match="missing required parameter 'KeyId'"):
        service.handle(ROOT, "DescribeKey", {})
    with pytest.raises(ValidationException, match="must be of type integer"):
        service.handle(ROOT, "GenerateRandom", {"NumberOfBytes": True})


def test_key_ids_arns_and_aliases_resolve(service: KeyService) -> None:
    key = create(service)
    arn = f"arn:envfs:kms:local-1:{service.account}:key/{key}"
    service.handle(ROOT, "CreateAlias", {"AliasName": "alias/app", "TargetKeyId": key})
    alias_arn = f"arn:envfs:kms:local-1:{service.account}:alias/app"
    for ref in (key, arn, "alias/app", alias_arn):
        assert service.handle(ROOT, "DescribeKey", {"KeyId": ref})["KeyMetadata"]["KeyId"] == key


@pytest.mark.parametrize(
    "ref",
    [
        "11111111-2222-3333-4444-555555555555",
        "arn:envfs:kms:eu-west-1:{account}:key/{key}",
        "arn:envfs:kms:local-1:999999999999:key/{key}",
        "alias/missing",
        "not-a-key",
    ],
)
def test_unknown_or_foreign_keys_are_not_found(service: KeyService, ref: str) -> None:
    key = create(service)
    with pytest.raises(NotFoundException):
        service.handle(ROOT, "DescribeKey", {"KeyId": ref.format(account=service.account, key=key)})


# --- the origin document's separation of duties --------------------------------------------


ADMIN_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("DescribeKey", {}),
    ("EnableKeyRotation", {}),
    ("GetKeyRotationStatus", {}),
    ("TagResource", {"Tags": [{"TagKey": "owner", "TagValue": "ops"}]}),
    ("ListResourceTags", {}),
    ("UpdateKeyDescription", {"Description": "new"}),
    ("GetKeyPolicy", {}),
    ("ListKeyPolicies", {}),
    ("RotateKeyOnDemand", {}),
    ("ListKeyRotations", {}),
    ("DisableKey", {}),
    ("EnableKey", {}),
]


def test_manager_manages_and_may_not_use(service: KeyService) -> None:
    key = scenario_key(service)
    for op, params in ADMIN_CALLS:
        service.handle(MANAGER, op, {"KeyId": key, **params})
    for op, params in [
        ("Encrypt", {"KeyId": key, "Plaintext": b"x"}),
        ("GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"}),
        ("GenerateDataKeyWithoutPlaintext", {"KeyId": key, "NumberOfBytes": 8}),
    ]:
        with pytest.raises(AccessDeniedException, match=r"^user uid 61001 is not authorized"):
            service.handle(MANAGER, op, params)
    blob = encrypt(service, key)
    with pytest.raises(AccessDeniedException):
        service.handle(MANAGER, "Decrypt", {"CiphertextBlob": blob})
    with pytest.raises(AccessDeniedException):
        service.handle(MANAGER, "ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": key})


def test_user_uses_and_may_not_manage(service: KeyService) -> None:
    key = scenario_key(service)
    blob = encrypt(service, key, b"Some text", purpose="demo")
    out = service.handle(
        USER, "Decrypt", {"CiphertextBlob": blob, "EncryptionContext": {"purpose": "demo"}}
    )
    assert out["Plaintext"] == b"Some text"
    service.handle(USER, "DescribeKey", {"KeyId": key})
    for op, params in [*ADMIN_CALLS[1:], ("ScheduleKeyDeletion", {}), ("PutKeyPolicy", {})]:
        if op == "PutKeyPolicy":
            params = {"Policy": service.handle(MANAGER, "GetKeyPolicy", {"KeyId": key})["Policy"]}
        with pytest.raises(AccessDeniedException):
            service.handle(USER, op, {"KeyId": key, **params})


def test_stranger_gets_nothing(service: KeyService) -> None:
    key = scenario_key(service)
    blob = encrypt(service, key)
    with pytest.raises(AccessDeniedException):
        service.handle(STRANGER, "Decrypt", {"CiphertextBlob": blob})
    with pytest.raises(AccessDeniedException):
        service.handle(STRANGER, "DescribeKey", {"KeyId": key})
    with pytest.raises(AccessDeniedException):
        service.handle(STRANGER, "DisableKey", {"KeyId": key})


def test_root_is_not_a_key_user_unless_the_policy_says_so(service: KeyService) -> None:
    key = scenario_key(service)
    with pytest.raises(AccessDeniedException):
        service.handle(ROOT, "Encrypt", {"KeyId": key, "Plaintext": b"x"})
    with pytest.raises(AccessDeniedException):
        service.handle(ROOT, "DisableKey", {"KeyId": key})


def test_explicit_deny_in_put_policy(service: KeyService) -> None:
    key = scenario_key(service)
    policy = json.loads(service.handle(MANAGER, "GetKeyPolicy", {"KeyId": key})["Policy"])
    policy["Statement"].append(
        {
            "Sid": "NoDecrypt",
            "Effect": "Deny",
            "Principal": {"Unix": ["uid:61002"]},
            "Action": "kms:Decrypt",
            "Resource": "*",
        }
    )
    blob = encrypt(service, key)
    service.handle(MANAGER, "PutKeyPolicy", {"KeyId": key, "Policy": json.dumps(policy)})
    with pytest.raises(AccessDeniedException):
        service.handle(USER, "Decrypt", {"CiphertextBlob": blob})
    encrypt(service, key)  # Encrypt is still allowed


def test_put_key_policy_lockout_and_malformed(service: KeyService) -> None:
    key = scenario_key(service)
    users_only = json.dumps(
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Unix": ["uid:61002"]},
                    "Action": "kms:Encrypt",
                    "Resource": "*",
                }
            ]
        }
    )
    with pytest.raises(MalformedPolicyDocumentException, match="will not allow you"):
        service.handle(MANAGER, "PutKeyPolicy", {"KeyId": key, "Policy": users_only})
    for bad in ("", "[]", '{"Statement": []}', '{"Statement": [{"Effect": "Maybe"}]}'):
        with pytest.raises(MalformedPolicyDocumentException):
            service.handle(MANAGER, "PutKeyPolicy", {"KeyId": key, "Policy": bad})
    with pytest.raises(NotFoundException, match="only 'default'"):
        service.handle(MANAGER, "GetKeyPolicy", {"KeyId": key, "PolicyName": "other"})
    # the old policy still stands
    service.handle(MANAGER, "DisableKey", {"KeyId": key})


def test_encryption_context_condition(service: KeyService) -> None:
    key = scenario_key(service)
    policy = json.loads(service.handle(MANAGER, "GetKeyPolicy", {"KeyId": key})["Policy"])
    for statement in policy["Statement"]:
        if statement["Sid"] == "Allow use of the key":
            statement["Condition"] = {"StringEquals": {"kms:EncryptionContext:volume": "v1"}}
    service.handle(MANAGER, "PutKeyPolicy", {"KeyId": key, "Policy": json.dumps(policy)})
    encrypt(service, key, volume="v1")
    with pytest.raises(AccessDeniedException):
        encrypt(service, key, volume="v2")
    with pytest.raises(AccessDeniedException):
        encrypt(service, key)


# --- cryptographic operations -------------------------------------------------------------


def test_encrypt_limits(service: KeyService) -> None:
    key = scenario_key(service)
    encrypt(service, key, b"x" * 4096)
    for size in (0, 4097):
        with pytest.raises(ValidationException, match=r"Plaintext must be 1 to 4096 bytes"):
            encrypt(service, key, b"x" * size)


def test_decrypt_with_the_wrong_key_id(service: KeyService) -> None:
    key = scenario_key(service)
    other = scenario_key(service)
    blob = encrypt(service, key)
    with pytest.raises(IncorrectKeyException):
        service.handle(USER, "Decrypt", {"CiphertextBlob": blob, "KeyId": other})
    out = service.handle(USER, "Decrypt", {"CiphertextBlob": blob, "KeyId": key})
    assert out["Plaintext"] == b"Some text"


def test_tampered_blob_and_wrong_context(service: KeyService) -> None:
    key = scenario_key(service)
    blob = encrypt(service, key, a="bc")
    with pytest.raises(InvalidCiphertextException):
        service.handle(USER, "Decrypt", {"CiphertextBlob": blob, "EncryptionContext": {"ab": "c"}})
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(InvalidCiphertextException):
        service.handle(
            USER, "Decrypt", {"CiphertextBlob": tampered, "EncryptionContext": {"a": "bc"}}
        )
    with pytest.raises(InvalidCiphertextException):
        service.handle(USER, "Decrypt", {"CiphertextBlob": b"\x01short"})


def test_re_encrypt_keeps_plaintext_inside(service: KeyService) -> None:
    key = scenario_key(service)
    other = scenario_key(service)
    blob = encrypt(service, key, a="1")
    out = service.handle(
        USER,
        "ReEncrypt",
        {
            "CiphertextBlob": blob,
            "SourceEncryptionContext": {"a": "1"},
            "DestinationKeyId": other,
            "DestinationEncryptionContext": {"b": "2"},
        },
    )
    assert "Plaintext" not in out
    assert out["SourceKeyId"].endswith(key) and out["KeyId"].endswith(other)
    back = service.handle(
        USER,
        "Decrypt",
        {"CiphertextBlob": out["CiphertextBlob"], "EncryptionContext": {"b": "2"}},
    )
    assert back["Plaintext"] == b"Some text" and back["KeyId"].endswith(other)


def test_generate_data_key_specs(service: KeyService) -> None:
    key = scenario_key(service)
    for params, size in (({"KeySpec": "AES_256"}, 32), ({"KeySpec": "AES_128"}, 16)):
        out = service.handle(USER, "GenerateDataKey", {"KeyId": key, **params})
        assert len(out["Plaintext"]) == size
        back = service.handle(USER, "Decrypt", {"CiphertextBlob": out["CiphertextBlob"]})
        assert back["Plaintext"] == out["Plaintext"]
    for n in (1, 1024):
        out = service.handle(USER, "GenerateDataKey", {"KeyId": key, "NumberOfBytes": n})
        assert len(out["Plaintext"]) == n
    for bad in ({}, {"KeySpec": "AES_256", "NumberOfBytes": 32}):
        with pytest.raises(ValidationException, match="exactly one of KeySpec and NumberOfBytes"):
            service.handle(USER, "GenerateDataKey", {"KeyId": key, **bad})
    for n in (0, 1025):
        with pytest.raises(ValidationException):
            service.handle(USER, "GenerateDataKey", {"KeyId": key, "NumberOfBytes": n})
    out = service.handle(
        USER, "GenerateDataKeyWithoutPlaintext", {"KeyId": key, "KeySpec": "AES_256"}
    )
    assert set(out) == {"CiphertextBlob", "KeyId"}


def test_generate_random(service: KeyService) -> None:
    assert len(service.handle(STRANGER, "GenerateRandom", {"NumberOfBytes": 64})["Plaintext"]) == 64
    with pytest.raises(ValidationException):
        service.handle(STRANGER, "GenerateRandom", {"NumberOfBytes": 2000})


# --- key states ---------------------------------------------------------------------------


def test_disabled_key(service: KeyService) -> None:
    key = scenario_key(service)
    blob = encrypt(service, key)
    service.handle(MANAGER, "DisableKey", {"KeyId": key})
    assert state(service, key) == "Disabled"
    with pytest.raises(DisabledException, match=r"is disabled$"):
        encrypt(service, key)
    with pytest.raises(DisabledException):
        service.handle(USER, "Decrypt", {"CiphertextBlob": blob})
    with pytest.raises(DisabledException):
        service.handle(MANAGER, "RotateKeyOnDemand", {"KeyId": key})
    service.handle(MANAGER, "EnableKey", {"KeyId": key})
    assert service.handle(USER, "Decrypt", {"CiphertextBlob": blob})["Plaintext"] == b"Some text"


def test_deletion_window_and_cancel(service: KeyService, clock: Clock) -> None:
    key = scenario_key(service)
    blob = encrypt(service, key)
    for days in (6, 31):
        with pytest.raises(ValidationException, match="between 7 and 30"):
            service.handle(
                MANAGER, "ScheduleKeyDeletion", {"KeyId": key, "PendingWindowInDays": days}
            )
    out = service.handle(MANAGER, "ScheduleKeyDeletion", {"KeyId": key})
    assert out["PendingWindowInDays"] == 30
    assert out["DeletionDate"] == clock.now + 30 * DAY
    assert state(service, key) == "PendingDeletion"
    with pytest.raises(KMSInvalidStateException):
        service.handle(USER, "Decrypt", {"CiphertextBlob": blob})
    with pytest.raises(KMSInvalidStateException):
        service.handle(MANAGER, "EnableKey", {"KeyId": key})
    with pytest.raises(KMSInvalidStateException):
        service.handle(MANAGER, "ScheduleKeyDeletion", {"KeyId": key})
    clock.advance(29)
    service.run_due_tasks()
    service.handle(MANAGER, "CancelKeyDeletion", {"KeyId": key})
    assert state(service, key) == "Disabled"
    with pytest.raises(KMSInvalidStateException, match="is not pending deletion"):
        service.handle(MANAGER, "CancelKeyDeletion", {"KeyId": key})
    service.handle(MANAGER, "EnableKey", {"KeyId": key})
    assert service.handle(USER, "Decrypt", {"CiphertextBlob": blob})["Plaintext"] == b"Some text"


def test_deleted_key_is_gone_for_good(service: KeyService, clock: Clock) -> None:
    key = scenario_key(service)
    service.handle(MANAGER, "CreateAlias", {"AliasName": "alias/doomed", "TargetKeyId": key})
    blob = encrypt(service, key)
    service.handle(MANAGER, "ScheduleKeyDeletion", {"KeyId": key, "PendingWindowInDays": 7})
    clock.advance(7)
    service.run_due_tasks()
    with pytest.raises(NotFoundException):
        service.handle(MANAGER, "DescribeKey", {"KeyId": key})
    with pytest.raises(NotFoundException):
        service.handle(USER, "Decrypt", {"CiphertextBlob": blob})
    with pytest.raises(NotFoundException):
        service.handle(MANAGER, "DescribeKey", {"KeyId": "alias/doomed"})
    records = service.handle(ROOT, "ListAuditRecords", {"KeyId": key})["Records"]
    assert records[-1]["operation"] == "DeleteKey"


def test_deletion_happens_on_access_when_due(service: KeyService, clock: Clock) -> None:
    key = scenario_key(service)
    service.handle(MANAGER, "ScheduleKeyDeletion", {"KeyId": key, "PendingWindowInDays": 7})
    clock.advance(7.5)
    with pytest.raises(NotFoundException):
        service.handle(MANAGER, "DescribeKey", {"KeyId": key})


# --- rotation -----------------------------------------------------------------------------


def test_rotation_schedule(service: KeyService, clock: Clock) -> None:
    key = scenario_key(service)
    before = encrypt(service, key)
    for days in (89, 2561):
        with pytest.raises(ValidationException, match="between 90 and 2560"):
            service.handle(
                MANAGER, "EnableKeyRotation", {"KeyId": key, "RotationPeriodInDays": days}
            )
    service.handle(MANAGER, "EnableKeyRotation", {"KeyId": key})
    status = service.handle(MANAGER, "GetKeyRotationStatus", {"KeyId": key})
    assert status["KeyRotationEnabled"] is True
    assert status["RotationPeriodInDays"] == 365
    assert status["NextRotationDate"] == clock.now + 365 * DAY
    clock.advance(364)
    service.run_due_tasks()
    assert service.handle(MANAGER, "ListKeyRotations", {"KeyId": key})["Rotations"] == []
    clock.advance(1)
    service.run_due_tasks()
    rotations = service.handle(MANAGER, "ListKeyRotations", {"KeyId": key})["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["AUTOMATIC"]
    after = encrypt(service, key)
    assert before[17:21] == b"\x00\x00\x00\x01" and after[17:21] == b"\x00\x00\x00\x02"
    for blob in (before, after):
        assert service.handle(USER, "Decrypt", {"CiphertextBlob": blob})["Plaintext"]
    status = service.handle(MANAGER, "GetKeyRotationStatus", {"KeyId": key})
    assert status["NextRotationDate"] == clock.now + 365 * DAY
    service.handle(MANAGER, "DisableKeyRotation", {"KeyId": key})
    clock.advance(400)
    service.run_due_tasks()
    assert len(service.handle(MANAGER, "ListKeyRotations", {"KeyId": key})["Rotations"]) == 1


def test_disabled_keys_do_not_rotate_until_enabled(service: KeyService, clock: Clock) -> None:
    key = scenario_key(service)
    service.handle(MANAGER, "EnableKeyRotation", {"KeyId": key, "RotationPeriodInDays": 90})
    service.handle(MANAGER, "DisableKey", {"KeyId": key})
    clock.advance(100)
    service.run_due_tasks()
    assert service.handle(MANAGER, "ListKeyRotations", {"KeyId": key})["Rotations"] == []
    service.handle(MANAGER, "EnableKey", {"KeyId": key})
    service.run_due_tasks()
    assert len(service.handle(MANAGER, "ListKeyRotations", {"KeyId": key})["Rotations"]) == 1


def test_rotate_on_demand_and_its_limit(service: KeyService) -> None:
    key = scenario_key(service)
    blobs = [encrypt(service, key)]
    for _ in range(10):
        service.handle(MANAGER, "RotateKeyOnDemand", {"KeyId": key})
        blobs.append(encrypt(service, key))
    with pytest.raises(LimitExceededException):
        service.handle(MANAGER, "RotateKeyOnDemand", {"KeyId": key})
    for blob in blobs:
        assert service.handle(USER, "Decrypt", {"CiphertextBlob": blob})["Plaintext"]
    page = service.handle(MANAGER, "ListKeyRotations", {"KeyId": key, "Limit": 4})
    assert len(page["Rotations"]) == 4 and page["Truncated"] is True
    rest = service.handle(MANAGER, "ListKeyRotations", {"KeyId": key, "Marker": page["NextMarker"]})
    assert len(rest["Rotations"]) == 6 and rest["Truncated"] is False
    status = service.handle(MANAGER, "GetKeyRotationStatus", {"KeyId": key})
    assert "OnDemandRotationStartDate" in status


def test_re_encrypt_moves_old_blobs_to_the_newest_version(service: KeyService) -> None:
    key = scenario_key(service)
    blob = encrypt(service, key)
    service.handle(MANAGER, "RotateKeyOnDemand", {"KeyId": key})
    out = service.handle(USER, "ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": key})
    assert out["CiphertextBlob"][17:21] == b"\x00\x00\x00\x02"


# --- aliases, tags, descriptions, listing ---------------------------------------------------


def test_alias_lifecycle(service: KeyService) -> None:
    key = scenario_key(service)
    other = scenario_key(service)
    service.handle(MANAGER, "CreateAlias", {"AliasName": "alias/app", "TargetKeyId": key})
    with pytest.raises(AlreadyExistsException):
        service.handle(MANAGER, "CreateAlias", {"AliasName": "alias/app", "TargetKeyId": key})
    for bad in ("app", "alias/aws/x", "alias/a:b", "alias/"):
        with pytest.raises(InvalidAliasNameException):
            service.handle(MANAGER, "CreateAlias", {"AliasName": bad, "TargetKeyId": key})
    with pytest.raises(ValidationException, match="is an alias"):
        service.handle(MANAGER, "CreateAlias", {"AliasName": "alias/b", "TargetKeyId": "alias/app"})
    with pytest.raises(AccessDeniedException):
        service.handle(USER, "CreateAlias", {"AliasName": "alias/u", "TargetKeyId": key})
    service.handle(MANAGER, "UpdateAlias", {"AliasName": "alias/app", "TargetKeyId": other})
    meta = service.handle(MANAGER, "DescribeKey", {"KeyId": "alias/app"})["KeyMetadata"]
    assert meta["KeyId"] == other
    aliases = service.handle(MANAGER, "ListAliases", {})["Aliases"]
    assert [a["AliasName"] for a in aliases] == ["alias/app"]
    assert aliases[0]["TargetKeyId"] == other
    assert service.handle(MANAGER, "ListAliases", {"KeyId": key})["Aliases"] == []
    service.handle(MANAGER, "DeleteAlias", {"AliasName": "alias/app"})
    with pytest.raises(NotFoundException):
        service.handle(MANAGER, "DeleteAlias", {"AliasName": "alias/app"})


@pytest.mark.parametrize(
    "bad", ["alias/bad name", "alias/x!", "alias/\u00e9", "", "alias/" + "x" * 251]
)
@pytest.mark.parametrize("operation", ["CreateAlias", "UpdateAlias", "DeleteAlias"])
def test_an_alias_name_outside_awss_pattern_is_a_validation_error(
    service: KeyService, operation: str, bad: str
) -> None:
    # AWS checks AliasName against its model's pattern ^[a-zA-Z0-9:/_-]+$ (1-256
    # characters) before anything else: ValidationException, not InvalidAliasNameException.
    key = scenario_key(service)
    params = (
        {"AliasName": bad} if operation == "DeleteAlias" else {"AliasName": bad, "TargetKeyId": key}
    )
    with pytest.raises(
        ValidationException, match=r"^AliasName '.*' is not valid: expected 1 to 256"
    ):
        service.handle(MANAGER, operation, params)


def test_tags(service: KeyService) -> None:
    key = create(service, MANAGER, Tags=[{"TagKey": "owner", "TagValue": "ops"}])
    service.handle(
        MANAGER, "TagResource", {"KeyId": key, "Tags": [{"TagKey": "env", "TagValue": "prod"}]}
    )
    tags = service.handle(MANAGER, "ListResourceTags", {"KeyId": key})["Tags"]
    assert tags == [{"TagKey": "env", "TagValue": "prod"}, {"TagKey": "owner", "TagValue": "ops"}]
    service.handle(MANAGER, "UntagResource", {"KeyId": key, "TagKeys": ["owner"]})
    assert len(service.handle(MANAGER, "ListResourceTags", {"KeyId": key})["Tags"]) == 1
    for bad in (
        [{"TagKey": "aws:x", "TagValue": "y"}],
        [{"TagKey": "", "TagValue": "y"}],
        [{"TagKey": "k", "TagValue": "v" * 257}],
        [{"TagKey": "k", "TagValue": "1"}, {"TagKey": "k", "TagValue": "2"}],
        [{"Key": "k"}],
    ):
        with pytest.raises(TagException):
            service.handle(MANAGER, "TagResource", {"KeyId": key, "Tags": bad})
    many = [{"TagKey": f"t{i}", "TagValue": ""} for i in range(50)]
    with pytest.raises(LimitExceededException):
        service.handle(MANAGER, "TagResource", {"KeyId": key, "Tags": many})


def test_update_description(service: KeyService) -> None:
    key = scenario_key(service)
    service.handle(MANAGER, "UpdateKeyDescription", {"KeyId": key, "Description": "new"})
    assert (
        service.handle(MANAGER, "DescribeKey", {"KeyId": key})["KeyMetadata"]["Description"]
        == "new"
    )
    with pytest.raises(ValidationException):
        service.handle(MANAGER, "UpdateKeyDescription", {"KeyId": key, "Description": "x" * 8193})


def test_list_keys_paginates_and_filters(service: KeyService) -> None:
    keys = sorted(create(service) for _ in range(5))
    mine = scenario_key(service)
    seen: list[str] = []
    marker = None
    while True:
        params: dict[str, Any] = {"Limit": 2}
        if marker:
            params["Marker"] = marker
        page = service.handle(ROOT, "ListKeys", params)
        seen += [k["KeyId"] for k in page["Keys"]]
        if not page["Truncated"]:
            break
        marker = page["NextMarker"]
    assert sorted(seen) == sorted([*keys, mine])
    # a key user sees only the keys its policy lets it describe
    assert [k["KeyId"] for k in service.handle(USER, "ListKeys", {})["Keys"]] == [mine]
    assert service.handle(STRANGER, "ListKeys", {})["Keys"] == []
    with pytest.raises(InvalidMarkerException):
        service.handle(ROOT, "ListKeys", {"Marker": "%%%"})
    with pytest.raises(ValidationException):
        service.handle(ROOT, "ListKeys", {"Limit": 0})


# --- audit --------------------------------------------------------------------------------


def test_every_call_is_audited(service: KeyService) -> None:
    key = scenario_key(service)
    blob = encrypt(service, key, file="f1")
    with pytest.raises(AccessDeniedException):
        service.handle(STRANGER, "Decrypt", {"CiphertextBlob": blob})
    with pytest.raises(ValidationException):
        service.handle(STRANGER, "DescribeKey", {})
    records = service.handle(ROOT, "ListAuditRecords", {})["Records"]
    outcomes = [(r["operation"], r["caller"]["uid"], r["outcome"]) for r in records]
    assert outcomes == [
        ("CreateKey", 61001, "Success"),
        ("Encrypt", 61002, "Success"),
        ("Decrypt", 61003, "AccessDeniedException"),
        ("DescribeKey", 61003, "ValidationException"),
    ]
    assert records[1]["encryption_context"] == {"file": "f1"}
    assert records[2]["key_arn"].endswith(key)
    text = json.dumps(records)
    assert "Some text" not in text and "U29tZSB0ZXh0" not in text
    verified = service.handle(ROOT, "VerifyAudit", {})
    assert verified == {
        "Valid": True,
        "Records": 5,
        "Checkpoint": 0,
        "Problem": None,
        "DamagedRecord": None,
        "Repairable": False,
    }
    with pytest.raises(AccessDeniedException):
        service.handle(USER, "ListAuditRecords", {})


def test_audit_filters(service: KeyService, clock: Clock) -> None:
    key = scenario_key(service)
    other = scenario_key(service)
    clock.advance(1)
    encrypt(service, key)
    encrypt(service, other)
    by_key = service.handle(ROOT, "ListAuditRecords", {"KeyId": key})["Records"]
    assert [r["operation"] for r in by_key] == ["CreateKey", "Encrypt"]
    since = service.handle(ROOT, "ListAuditRecords", {"Since": str(clock.now)})["Records"]
    assert [r["operation"] for r in since] == ["Encrypt", "Encrypt", "ListAuditRecords"]
    with pytest.raises(ValidationException):
        service.handle(ROOT, "ListAuditRecords", {"Since": "yesterday"})


def test_a_key_has_one_policy_named_default(service: KeyService) -> None:
    key = scenario_key(service)
    out = service.handle(MANAGER, "ListKeyPolicies", {"KeyId": key, "Limit": 1})
    assert out == {"PolicyNames": ["default"], "Truncated": False}
    with pytest.raises(AccessDeniedException):
        service.handle(STRANGER, "ListKeyPolicies", {"KeyId": key})
    with pytest.raises(InvalidMarkerException):
        service.handle(MANAGER, "ListKeyPolicies", {"KeyId": key, "Marker": "junk"})


def test_aws_s_name_for_the_origin_is_taken_and_others_are_refused(service: KeyService) -> None:
    meta = service.handle(ROOT, "CreateKey", {"Origin": "AWS_KMS"})["KeyMetadata"]
    assert meta["Origin"] == "ENVFS_KMS"
    for origin in ("EXTERNAL", "AWS_CLOUDHSM", "aws_kms"):
        with pytest.raises(UnsupportedOperationException, match="AWS_KMS"):
            service.handle(ROOT, "CreateKey", {"Origin": origin})
