"""Key policies: the role matrix, Deny over Allow, matching rules, conditions, malformed input."""

from __future__ import annotations

import grp
import json
import pwd
from typing import Any

import pytest

from envfs.errors import MalformedPolicyDocumentException
from envfs.identity import Caller
from envfs.kms.operations import OPERATIONS
from envfs.kms.policy import (
    ADMIN_ACTIONS,
    ALL_ACTIONS,
    USER_ACTIONS,
    Decision,
    KeyPolicy,
    RequestContext,
    default_policy,
    validate_principal,
)

ACCOUNT = "111122223333"
KEY_ARN = f"arn:envfs:kms:local-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_ARN = f"arn:envfs:kms:local-1:{ACCOUNT}:key/ffffffff-12ab-34cd-56ef-1234567890ab"
MISSING_NAME = "nobodyxyz-envfs-test"

# What each role may do, written out by hand rather than derived from the patterns.
ADMIN_MAY = frozenset(
    {
        "kms:CreateKey",
        "kms:CreateAlias",
        "kms:DescribeKey",
        "kms:EnableKey",
        "kms:EnableKeyRotation",
        "kms:ListKeys",
        "kms:ListAliases",
        "kms:ListResourceTags",
        "kms:ListKeyRotations",
        "kms:ListKeyPolicies",
        "kms:PutKeyPolicy",
        "kms:UpdateKeyDescription",
        "kms:UpdateAlias",
        "kms:DisableKey",
        "kms:DisableKeyRotation",
        "kms:GetKeyPolicy",
        "kms:GetKeyRotationStatus",
        "kms:DeleteAlias",
        "kms:TagResource",
        "kms:UntagResource",
        "kms:ScheduleKeyDeletion",
        "kms:CancelKeyDeletion",
        "kms:RotateKeyOnDemand",
    }
)
USER_MAY = frozenset(
    {
        "kms:Encrypt",
        "kms:Decrypt",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:GenerateDataKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:DescribeKey",
    }
)
CRYPTO = frozenset(USER_MAY - {"kms:DescribeKey"})


def who(uid: int, *groups: int, user: str | None = None, names: tuple[str, ...] = ()) -> Caller:
    gids = groups or (uid,)
    return Caller(uid, gids[0], frozenset(gids), user, frozenset(names))


ALICE = who(1001, 1001, user="alice", names=("alice",))


def request(
    action: str,
    caller: Caller = ALICE,
    *,
    arn: str = KEY_ARN,
    context: dict[str, str] | None = None,
    via: str | None = None,
) -> RequestContext:
    return RequestContext(action, caller, arn, ACCOUNT, context, via)


def statement(
    effect: Any = "Allow",
    principal: Any = None,
    action: Any = "kms:Decrypt",
    resource: Any = "*",
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Effect": effect,
        "Principal": {"Unix": "uid:1001"} if principal is None else principal,
        "Resource": resource,
        **extra,
    }
    if "NotAction" not in extra:
        body["Action"] = action
    return body


def policy(*statements: dict[str, Any]) -> KeyPolicy:
    return KeyPolicy.parse(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


# --- action tables ------------------------------------------------------------------------


def test_all_actions_are_the_operations_actions_and_the_extras() -> None:
    from_table = {op.action for op in OPERATIONS.values() if op.action is not None}
    extras = {
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:CreateKey",
        "kms:ListKeys",
        "kms:ListAliases",
        "kms:GenerateRandom",
    }
    assert from_table | extras == ALL_ACTIONS


def test_every_action_is_classified_in_this_test() -> None:
    # A new action must be placed in the matrix below by hand.
    assert ADMIN_MAY | USER_MAY | {"kms:GenerateRandom"} == ALL_ACTIONS


def test_role_action_lists_are_awss() -> None:
    assert ADMIN_ACTIONS == (
        "kms:Create*",
        "kms:Describe*",
        "kms:Enable*",
        "kms:List*",
        "kms:Put*",
        "kms:Update*",
        "kms:Revoke*",
        "kms:Disable*",
        "kms:Get*",
        "kms:Delete*",
        "kms:TagResource",
        "kms:UntagResource",
        "kms:ScheduleKeyDeletion",
        "kms:CancelKeyDeletion",
        "kms:RotateKeyOnDemand",
    )
    assert USER_ACTIONS == (
        "kms:Encrypt",
        "kms:Decrypt",
        "kms:ReEncrypt*",
        "kms:GenerateDataKey*",
        "kms:DescribeKey",
    )


# --- the role matrix ------------------------------------------------------------------------

DEFAULT = KeyPolicy.parse(default_policy(["uid:1001", "gid:3000"], ["uid:2001", "group:root"]))
ROOT = Caller(0, 0, frozenset({0}), "root", frozenset({"root"}))
CALLERS: dict[str, tuple[Caller, frozenset[str]]] = {
    "admin-by-uid": (who(1001), ADMIN_MAY),
    "admin-by-gid": (who(1500, 1500, 3000), ADMIN_MAY),
    "user-by-uid": (who(2001), USER_MAY),
    "user-by-group-name": (who(2500, 2500, 4000, names=("root",)), USER_MAY),
    "admin-and-user": (who(1001, 1001, 4000, names=("root",)), ADMIN_MAY | USER_MAY),
    "stranger": (who(9999, 9999, user="mallory", names=("mallory",)), frozenset()),
    "uid-0-stranger": (who(0, 0, user="root"), frozenset()),
}


@pytest.mark.parametrize("action", sorted(ALL_ACTIONS))
@pytest.mark.parametrize("role", sorted(CALLERS))
def test_default_policy_matrix(role: str, action: str) -> None:
    caller, may = CALLERS[role]
    expected = Decision.ALLOW if action in may else Decision.IMPLICIT_DENY
    assert DEFAULT.evaluate(request(action, caller)) is expected


def test_admins_never_use_keys_and_users_never_manage_them() -> None:
    for role in ("admin-by-uid", "admin-by-gid"):
        caller = CALLERS[role][0]
        assert not {
            a for a in CRYPTO | {"kms:GenerateRandom"} if DEFAULT.allows(request(a, caller))
        }
    for role in ("user-by-uid", "user-by-group-name"):
        caller = CALLERS[role][0]
        assert {a for a in ALL_ACTIONS if DEFAULT.allows(request(a, caller))} == USER_MAY


def test_remembered_decisions_are_per_caller_action_and_key() -> None:
    """Decisions of a policy without conditions are remembered: asked twice, each question
    must still get its own answer."""
    both = KeyPolicy.parse(default_policy(["uid:1001"], ["uid:1002"]))
    admin, user = who(1001), who(1002)
    for _ in range(2):
        assert both.allows(request("kms:Decrypt", user))
        assert not both.allows(request("kms:Decrypt", admin))
        assert both.allows(request("kms:DisableKey", admin))
        assert not both.allows(request("kms:DisableKey", user))
    one_key = policy(statement(principal={"Unix": "uid:1002"}, resource=KEY_ARN))
    for _ in range(2):
        assert one_key.allows(request("kms:Decrypt", user))
        assert not one_key.allows(request("kms:Decrypt", user, arn=OTHER_ARN))


def test_decisions_with_conditions_are_never_remembered() -> None:
    needs_context = policy(
        statement(
            principal={"Unix": "uid:1002"},
            Condition={"StringEquals": {"kms:EncryptionContext:volume": "v1"}},
        )
    )
    user = who(1002)
    for _ in range(2):
        assert needs_context.allows(request("kms:Decrypt", user, context={"volume": "v1"}))
        assert not needs_context.allows(request("kms:Decrypt", user, context={"volume": "v2"}))


def test_root_gets_nothing_special() -> None:
    # Root's group "root" is named in the users statement: root is a key user, nothing more.
    assert {a for a in ALL_ACTIONS if DEFAULT.allows(request(a, ROOT))} == USER_MAY
    only_admins = KeyPolicy.parse(default_policy(["uid:1001"], []))
    assert not any(only_admins.allows(request(a, ROOT)) for a in ALL_ACTIONS)


# --- default_policy -----------------------------------------------------------------------


def test_default_policy_document() -> None:
    text = default_policy(["user:root", "uid:007", "uid:7"], ["group:root"])
    assert '\n  "Statement": [' in text  # indent=2
    doc = json.loads(text)
    assert doc["Version"] == "2012-10-17"
    admins, users = doc["Statement"]
    assert admins == {
        "Sid": "Allow access for Key Administrators",
        "Effect": "Allow",
        "Principal": {"Unix": ["user:root", "uid:7"]},
        "Action": list(ADMIN_ACTIONS),
        "Resource": "*",
    }
    assert users == {
        "Sid": "Allow use of the key",
        "Effect": "Allow",
        "Principal": {"Unix": ["group:root"]},
        "Action": list(USER_ACTIONS),
        "Resource": "*",
    }


def test_default_policy_omits_an_empty_role() -> None:
    [only] = json.loads(default_policy([], ["uid:5"]))["Statement"]
    assert only["Sid"] == "Allow use of the key"
    [only] = json.loads(default_policy(["uid:5"], []))["Statement"]
    assert only["Sid"] == "Allow access for Key Administrators"


def test_default_policy_needs_someone() -> None:
    with pytest.raises(
        MalformedPolicyDocumentException,
        match=r"^a key policy needs at least one key administrator or key user$",
    ):
        default_policy([], [])


def test_default_policy_validates_principals() -> None:
    with pytest.raises(MalformedPolicyDocumentException, match=MISSING_NAME):
        default_policy([f"user:{MISSING_NAME}"], ["uid:1"])
    with pytest.raises(MalformedPolicyDocumentException):
        default_policy(["uid:1"], ["alice"])


def test_default_policy_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError):
        default_policy("uid:1", [])


# --- principals ----------------------------------------------------------------------------


def test_missing_name_really_is_missing() -> None:
    with pytest.raises(KeyError):
        pwd.getpwnam(MISSING_NAME)
    with pytest.raises(KeyError):
        grp.getgrnam(MISSING_NAME)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("user:root", "user:root"),
        ("group:root", "group:root"),
        ("uid:0", "uid:0"),
        ("uid:007", "uid:7"),
        ("gid:4294967294", "gid:4294967294"),
        ("*", "*"),
    ],
)
def test_valid_principals(text: str, canonical: str) -> None:
    assert validate_principal(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        f"user:{MISSING_NAME}",
        f"group:{MISSING_NAME}",
        "uid:-1",
        "uid:abc",
        "uid:",
        "gid:1.5",
        "uid:4294967295",
        "uid:99999999999",
        "user:",
        "user:ro ot",
        "User:root",
        "root",
        "",
        "arn:aws:iam::111122223333:root",
        "uid:0:0",
    ],
)
def test_invalid_principals(text: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException, match=r"^invalid principal "):
        validate_principal(text)


def test_invalid_principal_messages() -> None:
    with pytest.raises(
        MalformedPolicyDocumentException,
        match=rf"^invalid principal 'user:{MISSING_NAME}': no such user$",
    ):
        validate_principal(f"user:{MISSING_NAME}")
    with pytest.raises(
        MalformedPolicyDocumentException,
        match=r"^invalid principal 5: expected user:NAME, group:NAME, uid:N, gid:N or \*$",
    ):
        validate_principal(5)  # type: ignore[arg-type]


def test_policy_with_missing_user_is_refused() -> None:
    text = json.dumps({"Statement": [statement(principal={"Unix": f"user:{MISSING_NAME}"})]})
    with pytest.raises(
        MalformedPolicyDocumentException,
        match=rf"^policy contains a statement with one or more invalid principals:"
        rf" 'user:{MISSING_NAME}'$",
    ):
        KeyPolicy.parse(text)


def test_stored_policy_reloads_without_name_lookup() -> None:
    text = json.dumps({"Statement": [statement(principal={"Unix": [f"user:{MISSING_NAME}"]})]})
    loaded = KeyPolicy.parse(text, check_names=False)
    assert loaded.allows(request("kms:Decrypt", who(4242, user=MISSING_NAME)))
    assert not loaded.allows(request("kms:Decrypt", who(4242, user="someone-else")))
    bad = json.dumps({"Statement": [statement(principal={"Unix": ["uid:x"]})]})
    with pytest.raises(MalformedPolicyDocumentException):
        KeyPolicy.parse(bad, check_names=False)


def test_aws_principal_is_refused_with_a_hint() -> None:
    text = json.dumps({"Statement": [statement(principal={"AWS": "arn:aws:iam::1:root"})]})
    with pytest.raises(
        MalformedPolicyDocumentException,
        match=r"^statement 1: principal type 'AWS' is not supported; name Unix users and groups"
        r' with \{"Unix": \["user:NAME", "group:NAME", \.\.\.\]\}$',
    ):
        KeyPolicy.parse(text)


@pytest.mark.parametrize(
    ("principal", "caller", "allowed"),
    [
        ({"Unix": "group:root"}, who(5000, 5000, names=("root",)), True),
        ({"Unix": "group:root"}, who(5000, 5000, names=("wheel",)), False),
        ({"Unix": "user:root"}, who(5000, user="root"), True),
        ({"Unix": "user:root"}, who(0), False),  # matching is by principal string
        ({"Unix": ["gid:3000", "uid:7"]}, who(5000, 5000, 3000), True),
        ({"Unix": ["gid:3000", "uid:7"]}, who(7), True),
        ({"Unix": ["gid:3000", "uid:7"]}, who(8, 8, 3001), False),
        ({"Unix": "uid:07"}, who(7), True),
        ({"Unix": "*"}, who(31337), True),
        ({"Unix": ["uid:1", "*"]}, who(31337), True),
        ("*", who(31337), True),
    ],
)
def test_principal_matching(principal: Any, caller: Caller, allowed: bool) -> None:
    assert policy(statement(principal=principal)).allows(request("kms:Decrypt", caller)) is allowed


# --- Deny, actions, resources ---------------------------------------------------------------


@pytest.mark.parametrize("deny_first", [True, False])
def test_explicit_deny_beats_allow(deny_first: bool) -> None:
    allow = statement(action="kms:*")
    deny = statement("Deny", principal={"Unix": "gid:1001"}, action="kms:Decrypt")
    p = policy(deny, allow) if deny_first else policy(allow, deny)
    assert p.evaluate(request("kms:Decrypt")) is Decision.EXPLICIT_DENY
    assert p.evaluate(request("kms:Encrypt")) is Decision.ALLOW
    assert p.evaluate(request("kms:Encrypt", who(2))) is Decision.IMPLICIT_DENY


def test_deny_everyone_applies_to_root_too() -> None:
    p = policy(statement(principal="*", action="kms:*"), statement("Deny", "*", "kms:Put*"))
    assert p.evaluate(request("kms:PutKeyPolicy", ROOT)) is Decision.EXPLICIT_DENY
    assert p.allows(request("kms:GetKeyPolicy", ROOT))


def test_default_deny() -> None:
    p = policy(statement())
    assert p.evaluate(request("kms:Encrypt")) is Decision.IMPLICIT_DENY
    assert not p.allows(request("kms:Encrypt"))
    assert p.allows(request("kms:Decrypt"))


@pytest.mark.parametrize(
    ("pattern", "matched"),
    [
        ("kms:*", ALL_ACTIONS),
        (
            "kms:Generate*",
            {"kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:GenerateRandom"},
        ),
        ("kms:ReEncrypt*", {"kms:ReEncryptFrom", "kms:ReEncryptTo"}),
        ("kms:?ncrypt", {"kms:Encrypt"}),
        ("kms:*crypt", {"kms:Encrypt", "kms:Decrypt"}),
        (
            "kms:List*",
            {
                "kms:ListKeys",
                "kms:ListAliases",
                "kms:ListResourceTags",
                "kms:ListKeyRotations",
                "kms:ListKeyPolicies",
            },
        ),
        ("KMS:DECRYPT", {"kms:Decrypt"}),
        ("kms:generatedatakey", {"kms:GenerateDataKey"}),
        ("Kms:reencrypt?o", {"kms:ReEncryptTo"}),
        ("kms:Revoke*", set()),
    ],
)
def test_action_patterns(pattern: str, matched: set[str]) -> None:
    p = policy(statement(action=pattern))
    assert {a for a in ALL_ACTIONS if p.allows(request(a))} == matched


def test_action_list_is_any_of() -> None:
    p = policy(statement(action=["kms:Encrypt", "kms:DescribeKey"]))
    assert {a for a in ALL_ACTIONS if p.allows(request(a))} == {"kms:Encrypt", "kms:DescribeKey"}


def test_not_action() -> None:
    p = policy(statement(NotAction=["kms:Decrypt", "kms:Put*"]))
    allowed = {a for a in ALL_ACTIONS if p.allows(request(a))}
    assert allowed == ALL_ACTIONS - {"kms:Decrypt", "kms:PutKeyPolicy"}
    guard = policy(statement(action="kms:*"), statement("Deny", "*", NotAction="kms:*crypt"))
    assert guard.evaluate(request("kms:Decrypt")) is Decision.ALLOW
    assert guard.evaluate(request("kms:ScheduleKeyDeletion")) is Decision.EXPLICIT_DENY


@pytest.mark.parametrize(
    ("resource", "arn", "allowed"),
    [
        ("*", KEY_ARN, True),
        ("*", OTHER_ARN, True),
        (KEY_ARN, KEY_ARN, True),
        (KEY_ARN, OTHER_ARN, False),
        (KEY_ARN.upper().replace("ARN:", "arn:"), KEY_ARN, False),  # ARNs are case-sensitive
        (f"arn:envfs:kms:local-1:{ACCOUNT}:key/*", OTHER_ARN, True),
        ("arn:envfs:kms:local-1:999999999999:key/*", KEY_ARN, False),
        ("arn:envfs:kms:local?1:*", KEY_ARN, True),
        ("arn:envfs:kms:local.1:*", KEY_ARN, False),  # "." is no wildcard
        ("arn:envfs:kms:*:key/1234abcd-*", KEY_ARN, True),
        ("arn:envfs:kms:*:key/1234abcd-*", OTHER_ARN, False),
        ([OTHER_ARN, KEY_ARN], KEY_ARN, True),
    ],
)
def test_resource_matching(resource: Any, arn: str, allowed: bool) -> None:
    p = policy(statement(resource=resource))
    assert p.allows(request("kms:Decrypt", arn=arn)) is allowed


def test_unknown_request_action_is_a_programming_error() -> None:
    p = policy(statement(action="kms:*"))
    with pytest.raises(ValueError, match=r"^unknown action 'kms:decrypt'$"):
        p.evaluate(request("kms:decrypt"))
    with pytest.raises(ValueError):
        p.names_principal_for("kms:Frobnicate", ALICE)


# --- conditions ---------------------------------------------------------------------------

VOL = "kms:EncryptionContext:volume"
RO = "kms:EncryptionContext:ro"
KEYS = "kms:EncryptionContextKeys"
VIA = "kms:ViaService"
V1 = {"volume": "v1"}
V2 = {"volume": "v2"}
NAMELESS = who(1001)


def _check_condition(condition: dict[str, Any], req: RequestContext, allowed: bool) -> None:
    assert policy(statement(principal="*", Condition=condition)).allows(req) is allowed
    # The same condition on a Deny denies exactly when it would have allowed.
    guarded = policy(statement(principal="*"), statement("Deny", "*", Condition=condition))
    assert guarded.evaluate(req) is (Decision.EXPLICIT_DENY if allowed else Decision.ALLOW)


@pytest.mark.parametrize(
    ("condition", "context", "allowed"),
    [
        # StringEquals: exact, any listed value; an absent key does not match
        ({"StringEquals": {VOL: "v1"}}, V1, True),
        ({"StringEquals": {VOL: "v1"}}, {"volume": "V1"}, False),
        ({"StringEquals": {VOL: ["v1", "v2"]}}, V2, True),
        ({"StringEquals": {VOL: "v1"}}, {"file": "v1"}, False),
        ({"StringEquals": {VOL: "v1"}}, None, False),
        ({"StringEquals": {VOL: "v1"}}, {"Volume": "v1"}, False),
        ({"StringEquals": {"KMS:ENCRYPTIONCONTEXT:volume": "v1"}}, V1, True),
        # StringNotEquals: an absent key matches
        ({"StringNotEquals": {VOL: "v1"}}, V1, False),
        ({"StringNotEquals": {VOL: ["v1", "v2"]}}, V2, False),
        ({"StringNotEquals": {VOL: "v1"}}, V2, True),
        ({"StringNotEquals": {VOL: "v1"}}, None, True),
        # IgnoreCase
        ({"StringEqualsIgnoreCase": {VOL: "v1"}}, {"volume": "V1"}, True),
        ({"StringEqualsIgnoreCase": {VOL: "V1"}}, V2, False),
        ({"StringEqualsIgnoreCase": {VOL: "v1"}}, None, False),
        ({"StringNotEqualsIgnoreCase": {VOL: "v1"}}, {"volume": "V1"}, False),
        ({"StringNotEqualsIgnoreCase": {VOL: "v1"}}, V2, True),
        ({"StringNotEqualsIgnoreCase": {VOL: "v1"}}, None, True),
        # StringLike / StringNotLike: * and ?, case-sensitive, nothing else special
        ({"StringLike": {VOL: "vol-*"}}, {"volume": "vol-12"}, True),
        ({"StringLike": {VOL: "vol-?"}}, {"volume": "vol-12"}, False),
        ({"StringLike": {VOL: "vol-?"}}, {"volume": "vol-1"}, True),
        ({"StringLike": {VOL: "vol.1"}}, {"volume": "vol-1"}, False),
        ({"StringLike": {VOL: "VOL-*"}}, {"volume": "vol-1"}, False),
        ({"StringLike": {VOL: ["x", "v*"]}}, V1, True),
        ({"StringLike": {VOL: "*"}}, None, False),
        ({"StringNotLike": {VOL: "vol-*"}}, {"volume": "vol-12"}, False),
        ({"StringNotLike": {VOL: "vol-*"}}, {"volume": "other"}, True),
        ({"StringNotLike": {VOL: "vol-*"}}, None, True),
        # Bool
        ({"Bool": {RO: "true"}}, {"ro": "true"}, True),
        ({"Bool": {RO: True}}, {"ro": "TRUE"}, True),
        ({"Bool": {RO: "true"}}, {"ro": "false"}, False),
        ({"Bool": {RO: "false"}}, {"ro": "false"}, True),
        ({"Bool": {RO: "false"}}, None, False),
        # Null: "true" matches an absent key, "false" a present one
        ({"Null": {KEYS: "true"}}, None, True),
        ({"Null": {KEYS: "true"}}, {}, True),
        ({"Null": {KEYS: "true"}}, {"a": "b"}, False),
        ({"Null": {VOL: "false"}}, {"volume": ""}, True),
        ({"Null": {VOL: False}}, None, False),
        # IfExists: an absent key matches, a present one is compared
        ({"StringEqualsIfExists": {VOL: "v1"}}, None, True),
        ({"StringEqualsIfExists": {VOL: "v1"}}, V1, True),
        ({"StringEqualsIfExists": {VOL: "v1"}}, V2, False),
        ({"StringLikeIfExists": {VOL: "x*"}}, V1, False),
        ({"StringNotEqualsIfExists": {VOL: "v1"}}, None, True),
        ({"StringNotEqualsIfExists": {VOL: "v1"}}, V1, False),
        ({"BoolIfExists": {RO: "true"}}, None, True),
        # ForAnyValue / ForAllValues over the context's keys
        ({"ForAnyValue:StringEquals": {KEYS: "volume"}}, {"volume": "1", "f": "2"}, True),
        ({"ForAnyValue:StringEquals": {KEYS: "volume"}}, {"f": "2"}, False),
        ({"ForAnyValue:StringEquals": {KEYS: "volume"}}, None, False),
        ({"ForAnyValue:StringEquals": {KEYS: "volume"}}, {}, False),
        ({"ForAnyValue:StringNotEquals": {KEYS: "volume"}}, V1, False),
        ({"ForAnyValue:StringNotEquals": {KEYS: "volume"}}, {"volume": "1", "f": "2"}, True),
        ({"ForAnyValue:StringNotEquals": {KEYS: "volume"}}, None, False),
        ({"ForAllValues:StringEquals": {KEYS: ["volume", "f"]}}, {"volume": "1", "f": "2"}, True),
        ({"ForAllValues:StringEquals": {KEYS: ["volume", "f"]}}, V1, True),
        ({"ForAllValues:StringEquals": {KEYS: ["volume", "f"]}}, {"volume": "1", "x": "2"}, False),
        ({"ForAllValues:StringEquals": {KEYS: "volume"}}, None, True),  # as in AWS
        ({"ForAllValues:StringLike": {KEYS: "v*"}}, {"volume": "1", "vx": "2"}, True),
        ({"ForAllValues:StringLike": {KEYS: "v*"}}, {"volume": "1", "x": "2"}, False),
        ({"ForAllValues:StringEqualsIgnoreCase": {KEYS: "VOLUME"}}, V1, True),
        ({"ForAnyValue:StringEqualsIfExists": {KEYS: "volume"}}, None, True),
        # AND across keys and across operators
        ({"StringEquals": {VOL: "v1", "kms:EncryptionContext:f": "1"}}, {**V1, "f": "1"}, True),
        ({"StringEquals": {VOL: "v1", "kms:EncryptionContext:f": "1"}}, {**V1, "f": "2"}, False),
        ({"StringEquals": {VOL: "v1"}, "StringLike": {VOL: "*2"}}, V1, False),
        ({"StringEquals": {VOL: "v1"}, "Null": {KEYS: "false"}}, V1, True),
    ],
)
def test_context_conditions(
    condition: dict[str, Any], context: dict[str, str] | None, allowed: bool
) -> None:
    _check_condition(condition, request("kms:Decrypt", context=context), allowed)


@pytest.mark.parametrize(
    ("condition", "via", "caller", "allowed"),
    [
        ({"StringEquals": {VIA: "mnt"}}, "mnt", ALICE, True),
        ({"StringEquals": {VIA: "mnt"}}, None, ALICE, False),
        ({"StringEquals": {VIA: "mnt"}}, "other", ALICE, False),
        ({"StringEqualsIfExists": {VIA: "mnt"}}, None, ALICE, True),
        ({"StringEqualsIfExists": {VIA: "mnt"}}, "other", ALICE, False),
        ({"StringLike": {VIA: "envfs-*"}}, "envfs-mount", ALICE, True),
        ({"Null": {VIA: "true"}}, None, ALICE, True),
        ({"Null": {VIA: "true"}}, "mnt", ALICE, False),
        ({"Null": {VIA: False}}, "mnt", ALICE, True),
        ({"Null": {VIA: "false"}}, None, ALICE, False),
        ({"StringEquals": {"kms:CallerUid": "1001"}}, None, ALICE, True),
        ({"StringEquals": {"kms:calleruid": "1002"}}, None, ALICE, False),
        ({"StringEquals": {"kms:CallerUid": "7"}}, None, who(7), True),
        ({"StringEquals": {"kms:CallerUid": "1001"}}, None, who(7), False),
        ({"StringEquals": {"envfs:CallerUser": "bob"}}, None, who(7, user="bob"), True),
        ({"StringEquals": {"envfs:CallerUser": "alice"}}, None, ALICE, True),
        ({"StringEquals": {"ENVFS:CALLERUSER": "alice"}}, None, NAMELESS, False),
        ({"StringNotEquals": {"envfs:CallerUser": "alice"}}, None, NAMELESS, True),
        ({"Null": {"envfs:CallerUser": "true"}}, None, NAMELESS, True),
        ({"StringEquals": {"kms:CallerAccount": ACCOUNT}}, None, ALICE, True),
        ({"StringEquals": {"kms:CallerAccount": "999999999999"}}, None, ALICE, False),
        ({"StringEquals": {"kms:CallerUid": "1001"}, "Null": {VIA: "false"}}, None, ALICE, False),
        ({"StringEquals": {"kms:CallerUid": "1001"}, "Null": {VIA: "false"}}, "m", ALICE, True),
    ],
)
def test_caller_conditions(
    condition: dict[str, Any], via: str | None, caller: Caller, allowed: bool
) -> None:
    _check_condition(condition, request("kms:Decrypt", caller, via=via), allowed)


def test_caller_account_comes_from_the_request() -> None:
    p = policy(statement(Condition={"StringEquals": {"kms:CallerAccount": ACCOUNT}}))
    assert p.allows(RequestContext("kms:Decrypt", ALICE, KEY_ARN, ACCOUNT))
    assert not p.allows(RequestContext("kms:Decrypt", ALICE, KEY_ARN, "444455556666"))


def test_deny_unless_context_matches() -> None:
    p = policy(
        statement(action="kms:*"),
        statement(
            "Deny",
            "*",
            ["kms:Decrypt", "kms:GenerateDataKey*"],
            Condition={"StringNotEquals": {VOL: "v1"}},
        ),
    )
    assert p.allows(request("kms:Decrypt", context={"volume": "v1", "file": "f"}))
    assert p.evaluate(request("kms:Decrypt", context={"volume": "v2"})) is Decision.EXPLICIT_DENY
    assert p.evaluate(request("kms:GenerateDataKey")) is Decision.EXPLICIT_DENY
    assert p.allows(request("kms:Encrypt"))


# --- the lockout check --------------------------------------------------------------------


def test_names_principal_for_default_policy() -> None:
    assert DEFAULT.names_principal_for("kms:PutKeyPolicy", who(1001))
    assert DEFAULT.names_principal_for("kms:PutKeyPolicy", who(1500, 1500, 3000))
    assert not DEFAULT.names_principal_for("kms:PutKeyPolicy", who(2001))
    assert not DEFAULT.names_principal_for("kms:PutKeyPolicy", ROOT)
    assert DEFAULT.names_principal_for("kms:Decrypt", who(2001))


PUT = "kms:PutKeyPolicy"


@pytest.mark.parametrize(
    ("statements", "resource_arn", "named"),
    [
        ([statement(action=PUT)], None, True),
        (
            [statement(action=PUT, Condition={"StringEquals": {"kms:CallerUid": "1001"}})],
            None,
            True,
        ),
        ([statement(action=PUT, Condition={"StringEquals": {"kms:CallerUid": "1"}})], None, False),
        (
            [statement(action=PUT, Condition={"StringEquals": {"envfs:CallerUser": "alice"}})],
            None,
            True,
        ),
        # undecidable conditions: an Allow does not count, a Deny does
        ([statement(action=PUT, Condition={"StringEquals": {"kms:ViaService": "m"}})], None, False),
        ([statement(action=PUT, Condition={"Null": {"kms:ViaService": "true"}})], None, False),
        (
            [statement(action=PUT, Condition={"StringEquals": {"kms:CallerAccount": ACCOUNT}})],
            None,
            False,
        ),
        (
            [
                statement(action=PUT),
                statement("Deny", action=PUT, Condition={"StringEquals": {"kms:ViaService": "m"}}),
            ],
            None,
            False,
        ),
        (
            [
                statement(action=PUT),
                statement("Deny", action=PUT, Condition={"StringEquals": {"kms:CallerUid": "7"}}),
            ],
            None,
            True,
        ),
        # no encryption context on the synthetic request
        (
            [
                statement(action=PUT),
                statement("Deny", action=PUT, Condition={"StringEquals": {VOL: "v"}}),
            ],
            None,
            True,
        ),
        (
            [
                statement(action=PUT),
                statement("Deny", action=PUT, Condition={"StringNotEquals": {VOL: "v"}}),
            ],
            None,
            False,
        ),
        # the key's ARN: unknown unless given
        ([statement(action=PUT, resource=KEY_ARN)], None, False),
        ([statement(action=PUT, resource=KEY_ARN)], KEY_ARN, True),
        ([statement(action=PUT, resource=KEY_ARN)], OTHER_ARN, False),
        (
            [statement(action="kms:*"), statement("Deny", action=PUT, resource=OTHER_ARN)],
            None,
            False,
        ),
        (
            [statement(action="kms:*"), statement("Deny", action=PUT, resource=OTHER_ARN)],
            KEY_ARN,
            True,
        ),
        ([statement(action="kms:Put*"), statement("Deny", action="kms:Decrypt")], None, True),
        ([statement(action="kms:Decrypt")], None, False),
    ],
)
def test_names_principal_for(
    statements: list[dict[str, Any]], resource_arn: str | None, named: bool
) -> None:
    p = policy(*statements)
    assert p.names_principal_for(PUT, ALICE, resource_arn=resource_arn) is named


# --- well-formed documents ----------------------------------------------------------------


def test_text_is_kept_verbatim() -> None:
    text = (
        '  {"Statement": {"Effect": "Allow", "Principal": "*",\n'
        '"Action": "kms:Decrypt",  "Resource": "*"}}\n'
    )
    assert KeyPolicy.parse(text).text == text


@pytest.mark.parametrize(
    "doc",
    [
        {"Statement": [statement()]},
        {"Statement": statement()},  # a single object, as AWS accepts
        {"Version": "2008-10-17", "Statement": [statement()]},
        {"Version": "2012-10-17", "Id": "key-default-1", "Statement": [statement(Sid="")]},
        {"Statement": [statement(Sid="a"), statement(Sid="b"), statement(), statement()]},
        {"Statement": [statement(Condition={"ForAnyValue:StringLikeIfExists": {KEYS: "x*"}})]},
    ],
)
def test_well_formed_documents(doc: dict[str, Any]) -> None:
    assert KeyPolicy.parse(json.dumps(doc)).allows(request("kms:Decrypt"))


def test_size_limit() -> None:
    text = json.dumps({"Statement": [statement()]})
    at_limit = text + " " * (32768 - len(text))
    assert KeyPolicy.parse(at_limit).allows(request("kms:Decrypt"))
    with pytest.raises(
        MalformedPolicyDocumentException,
        match=r"^policy is 32769 characters long; at most 32768 are allowed$",
    ):
        KeyPolicy.parse(at_limit + " ")


# --- malformed documents ------------------------------------------------------------------


def _doc(*statements: Any, **top: Any) -> str:
    return json.dumps({"Version": "2012-10-17", **top, "Statement": list(statements)})


def _cond(condition: Any) -> str:
    return _doc(statement(Condition=condition))


MALFORMED: dict[str, str] = {
    "empty": "",
    "not-json": "{Statement: []}",
    "trailing-garbage": _doc(statement()) + "x",
    "array": "[]",
    "string": '"policy"',
    "null": "null",
    "number": "42",
    "nan": '{"Version": NaN, "Statement": []}',
    "deeply-nested": "[" * 30000 + "]" * 2000,
    "no-statement": "{}",
    "empty-statement-list": _doc(),
    "statement-string": json.dumps({"Statement": "Allow"}),
    "statement-number": _doc(42),
    "bad-version": _doc(statement(), Version="2020-01-01"),
    "version-number": _doc(statement(), Version=2012),
    "id-number": _doc(statement(), Id=5),
    "unknown-top-field": _doc(statement(), Foo="bar"),
    "lowercase-top-field": json.dumps({"statement": [statement()]}),
    "duplicate-field": '{"Statement": [{"Effect": "Deny", "Effect": "Allow", "Principal": "*",'
    ' "Action": "kms:*", "Resource": "*"}]}',
    "duplicate-statement-field": '{"Statement": [], "Statement": [{"Effect": "Allow",'
    ' "Principal": "*", "Action": "kms:*", "Resource": "*"}]}',
    "sid-number": _doc(statement(Sid=5)),
    "sid-null": _doc(statement(Sid=None)),
    "duplicate-sid": _doc(statement(Sid="a"), statement(Sid="a")),
    "not-principal": _doc(statement(NotPrincipal="*")),
    "not-resource": _doc(statement(NotResource="*")),
    "lowercase-field": _doc({**statement(), "effect": "Allow"}),
    "no-effect": _doc({k: v for k, v in statement().items() if k != "Effect"}),
    "effect-lowercase": _doc(statement("allow")),
    "effect-other": _doc(statement("Maybe")),
    "effect-list": _doc(statement(["Allow"])),
    "no-principal": _doc({k: v for k, v in statement().items() if k != "Principal"}),
    "principal-string": _doc(statement(principal="everyone")),
    "principal-list": _doc(statement(principal=["*"])),
    "principal-empty-object": _doc(statement(principal={})),
    "principal-aws": _doc(statement(principal={"AWS": "*"})),
    "principal-aws-and-unix": _doc(statement(principal={"AWS": "*", "Unix": "*"})),
    "principal-other-type": _doc(statement(principal={"Unix": "*", "Service": "x"})),
    "principal-empty-list": _doc(statement(principal={"Unix": []})),
    "principal-bad-uid": _doc(statement(principal={"Unix": "uid:x"})),
    "principal-number": _doc(statement(principal={"Unix": [5]})),
    "principal-nested": _doc(statement(principal={"Unix": [["uid:1"]]})),
    "principal-missing-group": _doc(statement(principal={"Unix": f"group:{MISSING_NAME}"})),
    "no-action": _doc({k: v for k, v in statement().items() if k != "Action"}),
    "action-and-not-action": _doc({**statement(), "NotAction": "kms:Encrypt"}),
    "action-empty-list": _doc(statement(action=[])),
    "action-unknown": _doc(statement(action="kms:Frobnicate")),
    "action-no-prefix": _doc(statement(action="Decrypt")),
    "action-star": _doc(statement(action="*")),
    "action-other-service": _doc(statement(action="s3:*")),
    "action-number": _doc(statement(action=5)),
    "action-null-in-list": _doc(statement(action=["kms:Decrypt", None])),
    "not-action-unknown": _doc(statement(NotAction=["kms:Nope"])),
    "no-resource": _doc({k: v for k, v in statement().items() if k != "Resource"}),
    "resource-empty-list": _doc(statement(resource=[])),
    "resource-not-arn": _doc(statement(resource="key/1234")),
    "resource-number": _doc(statement(resource=5)),
    "condition-empty": _cond({}),
    "condition-list": _cond([]),
    "condition-empty-block": _cond({"StringEquals": {}}),
    "condition-block-list": _cond({"StringEquals": [VOL]}),
    "operator-unknown": _cond({"StringMatches": {VOL: "v"}}),
    "operator-numeric": _cond({"NumericEquals": {VOL: "1"}}),
    "operator-lowercase": _cond({"stringequals": {VOL: "v"}}),
    "operator-null-if-exists": _cond({"NullIfExists": {VOL: "true"}}),
    "operator-for-any-null": _cond({"ForAnyValue:Null": {KEYS: "true"}}),
    "operator-double-prefix": _cond({"ForAnyValue:ForAllValues:StringEquals": {KEYS: "v"}}),
    "operator-bare-if-exists": _cond({"IfExists": {VOL: "v"}}),
    "key-unknown": _cond({"StringEquals": {"aws:username": "alice"}}),
    "key-empty-context-key": _cond({"StringEquals": {"kms:EncryptionContext:": "v"}}),
    "key-set-prefix-on-single": _cond({"ForAllValues:StringEquals": {"kms:ViaService": "m"}}),
    "key-multi-without-prefix": _cond({"StringEquals": {KEYS: "volume"}}),
    "value-empty-list": _cond({"StringEquals": {VOL: []}}),
    "value-number": _cond({"StringEquals": {VOL: 1}}),
    "value-null": _cond({"StringEquals": {VOL: None}}),
    "value-bool-for-string": _cond({"StringEquals": {VOL: True}}),
    "value-nested-list": _cond({"StringEquals": {VOL: [["v"]]}}),
    "bool-value-yes": _cond({"Bool": {VOL: "yes"}}),
    "null-value-maybe": _cond({"Null": {VOL: "maybe"}}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_documents_are_refused(name: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException) as info:
        KeyPolicy.parse(MALFORMED[name])
    message = info.value.message
    assert message[:1].islower(), message
    assert len(message) < 300, message


def test_non_string_document_is_refused() -> None:
    with pytest.raises(
        MalformedPolicyDocumentException, match=r"^policy must be a string, not bytes$"
    ):
        KeyPolicy.parse(b"{}")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", r"policy must be a JSON object, not \[\]"),
        ("{}", r"policy has no 'Statement' field"),
        (_doc(statement(), Foo=1), r"policy has an unknown field 'Foo'"),
        (
            _doc(statement(), Version="2020-01-01"),
            r"policy Version must be '2012-10-17' or '2008-10-17', not '2020-01-01'",
        ),
        (_doc(), r"policy Statement must be a non-empty list, not \[\]"),
        (_doc(statement(NotPrincipal="*")), r"statement 1 has an unknown field 'NotPrincipal'"),
        (
            _doc(statement("allow", Sid="Admins")),
            r"statement 'Admins': Effect must be 'Allow' or 'Deny', not 'allow'",
        ),
        (
            _doc(statement(), statement(action="kms:Frobnicate")),
            r"statement 2: Action: unknown action 'kms:Frobnicate'",
        ),
        (
            _doc(statement(action="s3:*")),
            r"statement 1: Action: action pattern 's3:\*' must start with 'kms:'",
        ),
        (
            _doc(statement(resource="key/1")),
            r"statement 1: Resource must be '\*' or a key ARN pattern, not 'key/1'",
        ),
        (
            _doc(statement(Sid="a"), statement(Sid="a")),
            r"policy has more than one statement with Sid 'a'",
        ),
        (
            _cond({"NumericEquals": {VOL: "1"}}),
            r"statement 1: unknown condition operator 'NumericEquals'",
        ),
        (
            _cond({"StringEquals": {"aws:username": "a"}}),
            r"statement 1: unknown condition key 'aws:username'",
        ),
        (
            '{"Statement": 1, "Statement": 2}',
            r"policy has the field 'Statement' twice in one object",
        ),
        ("{Statement}", r"policy is not valid JSON: .+ at line 1 column 2"),
        (
            _cond({"ForAllValues:StringEquals": {"kms:ViaService": "m"}}),
            r"statement 1: condition key 'kms:ViaService' is single-valued;"
            r" ForAnyValue: and ForAllValues: apply to multi-valued keys only",
        ),
    ],
)
def test_malformed_messages(text: str, message: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException, match=f"^{message}$"):
        KeyPolicy.parse(text)
