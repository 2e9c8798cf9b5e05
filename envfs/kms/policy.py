"""Key policies: AWS's policy grammar with Unix principals. Parse, validate, evaluate.

Grammar (the comments wrapped to fit)::

    {"Version": "2012-10-17",            # optional; if present must be "2012-10-17"
                                         #   (or "2008-10-17")
     "Id": "...",                         # optional string
     "Statement": [ statement, ... ]}     # required, non-empty list (a single object is
                                         #   also accepted, as AWS does)
    statement = {"Sid": "...",            # optional string; Sids unique within a document
                                         #   when given
      "Effect": "Allow" | "Deny",         # required
      "Principal": "*" | {"Unix": "*" | P | [P, ...]},   # required.
                          # P = "user:NAME" | "group:NAME" | "uid:N" | "gid:N" | "*"
      "Action": A | [A, ...],             # required (or "NotAction", exactly one of the
                          # two). A = "kms:Encrypt", case-insensitive, wildcards * and ?
                          # allowed, e.g. "kms:*", "kms:Generate*", "kms:ReEncrypt*"
      "Resource": "*" | ARN-pattern | [...],  # required; "*" means this key; otherwise
                          # matched (with * ? wildcards) against the key ARN
      "Condition": {OPERATOR: {CONDKEY: V | [V,...]}}    # optional
    }

Rules:

- At most 32768 characters of JSON. Field names and ``Effect`` are case-sensitive; unknown
  fields, duplicate fields, wrong types and empty lists or maps are refused.
- ``user:NAME`` must exist in the user database and ``group:NAME`` in the group database
  when the document is parsed; ``uid:N``/``gid:N`` take a decimal id. AWS's ``"AWS"``
  principal key is refused. A principal matches a caller that holds the same principal
  string (its uid, user name, any of its gids or group names); ``"*"`` matches everyone.
- An action without wildcards must be a known action (``ALL_ACTIONS``); one with wildcards
  must start with ``kms:``. A resource other than ``"*"`` must start with ``arn:``; resource
  patterns are case-sensitive, action names are not.
- Condition operators: ``StringEquals``, ``StringNotEquals``, ``StringEqualsIgnoreCase``,
  ``StringNotEqualsIgnoreCase``, ``StringLike``, ``StringNotLike``, ``Bool``, ``Null``; each
  but ``Null`` may end in ``IfExists`` and take a ``ForAnyValue:`` or ``ForAllValues:``
  prefix. Condition keys (case-insensitive, except the context key after
  ``kms:EncryptionContext:``, which is matched exactly):

  ``kms:EncryptionContext:<context-key>``  that pair's value in the request's context
  ``kms:EncryptionContextKeys``            the context's keys (multi-valued)
  ``kms:ViaService``                       the trusted service acting for the caller
  ``kms:CallerUid``                        the caller's uid, as a decimal string
  ``envfs:CallerUser``                     the caller's user name
  ``kms:CallerAccount``                    the account of the key service

  A multi-valued key needs a ``ForAnyValue:``/``ForAllValues:`` prefix and a single-valued
  key refuses one (so that an absent key cannot satisfy ``ForAllValues`` by accident).
- Evaluation: default deny; an applicable Deny wins over any Allow. A statement applies when
  its principal, action, resource and every condition operator match (AND); within one
  condition key any listed value may match (OR). For a key absent from the request, positive
  operators do not match, ``StringNot*`` operators do, ``...IfExists`` operators do,
  ``ForAllValues:`` does, ``ForAnyValue:`` does not; ``Null`` with ``"true"`` matches when
  absent. An empty encryption context counts as absent.
- Root (uid 0) has no special standing: it is one more caller.
"""

from __future__ import annotations

import enum
import grp
import json
import pwd
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envfs.errors import MalformedPolicyDocumentException
from envfs.identity import Caller

MAX_POLICY_CHARS = 32768
VERSIONS = ("2012-10-17", "2008-10-17")

# Every action a key policy can name: each operation's action, ReEncrypt's two halves, and the
# account-level operations (so that a policy naming them is not refused).
# fmt: off
ALL_ACTIONS: frozenset[str] = frozenset({
    "kms:CancelKeyDeletion", "kms:CreateAlias", "kms:CreateKey", "kms:Decrypt",
    "kms:DeleteAlias", "kms:DescribeKey", "kms:DisableKey", "kms:DisableKeyRotation",
    "kms:EnableKey", "kms:EnableKeyRotation", "kms:Encrypt", "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext", "kms:GenerateRandom", "kms:GetKeyPolicy",
    "kms:GetKeyRotationStatus", "kms:ListAliases", "kms:ListKeyPolicies", "kms:ListKeyRotations",
    "kms:ListKeys",
    "kms:ListResourceTags", "kms:PutKeyPolicy", "kms:ReEncryptFrom", "kms:ReEncryptTo",
    "kms:RotateKeyOnDemand", "kms:ScheduleKeyDeletion", "kms:TagResource",
    "kms:UntagResource", "kms:UpdateAlias", "kms:UpdateKeyDescription",
})
_CANONICAL_ACTION = {a.lower(): a for a in ALL_ACTIONS}

# AWS's default policy: key administrators manage the key but cannot use it; key users use
# it (and may describe it) but cannot manage it.
ADMIN_ACTIONS: tuple[str, ...] = (
    "kms:Create*", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*", "kms:Update*",
    "kms:Revoke*", "kms:Disable*", "kms:Get*", "kms:Delete*", "kms:TagResource",
    "kms:UntagResource", "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion",
    "kms:RotateKeyOnDemand",
)
USER_ACTIONS: tuple[str, ...] = (
    "kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey",
)
_OPERATORS = frozenset({
    "StringEquals", "StringNotEquals", "StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase",
    "StringLike", "StringNotLike", "Bool", "Null",
})
# fmt: on

_STATEMENT_FIELDS = frozenset(
    {"Sid", "Effect", "Principal", "Action", "NotAction", "Resource", "Condition"}
)
_PRINCIPAL_FORMS = "expected user:NAME, group:NAME, uid:N, gid:N or *"
_NAME_RE = re.compile(r"^[^\s:\x00]+$")
_ID_RE = re.compile(r"^[0-9]{1,10}$")
_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "no id" to the kernel
_CONTEXT_KEY_PREFIX = "kms:encryptioncontext:"
_MULTI_VALUED_KEYS = frozenset({"kms:encryptioncontextkeys"})
_SINGLE_VALUED_KEYS = frozenset(
    {"kms:viaservice", "kms:calleruid", "envfs:calleruser", "kms:calleraccount"}
)


class Decision(enum.Enum):
    ALLOW = "Allow"
    EXPLICIT_DENY = "ExplicitDeny"
    IMPLICIT_DENY = "ImplicitDeny"


@dataclass(frozen=True)
class RequestContext:
    """What a policy decides on: who asks for which action on which key, with what context."""

    action: str  # canonical, e.g. "kms:Decrypt"
    caller: Caller
    resource_arn: str  # the key's ARN
    account: str
    encryption_context: Mapping[str, str] | None = None
    via_service: str | None = None


class _Unknown(enum.Enum):
    """A fact the lockout check cannot know; conditions on it decide nothing."""

    UNKNOWN = 0


_UNKNOWN = _Unknown.UNKNOWN
# A condition key's values in a request: None when absent.
_Values = tuple[str, ...] | _Unknown | None


@dataclass(frozen=True)
class _Facts:
    """A request as statements see it; ``_UNKNOWN`` marks what the lockout check cannot know."""

    action: str
    caller: Caller
    principals: frozenset[str]
    resource_arn: str | None  # None: unknown
    context: Mapping[str, str]
    via_service: str | _Unknown | None
    account: str | _Unknown

    def values(self, key: str) -> _Values:
        """A condition key's values; ``key`` as ``_parse_condition_key`` returns it."""
        if key == "kms:encryptioncontextkeys":
            return tuple(self.context) or None
        value: str | _Unknown | None
        if key.startswith(_CONTEXT_KEY_PREFIX):
            value = self.context.get(key[len(_CONTEXT_KEY_PREFIX) :])
        else:
            value = {
                "kms:viaservice": self.via_service,
                "kms:calleruid": str(self.caller.uid),
                "envfs:calleruser": self.caller.user_name,
                "kms:calleraccount": self.account,
            }[key]
        return value if value is None or value is _UNKNOWN else (value,)


def _malformed(message: str) -> MalformedPolicyDocumentException:
    return MalformedPolicyDocumentException(message)


def _show(value: object) -> str:
    """Quote a piece of user input for a message, shortened."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """Compile a pattern where ``*`` is any run of characters and ``?`` one character."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    return re.compile("".join(parts), flags)


def _principal(text: object, check_names: bool) -> str:
    if not isinstance(text, str):
        raise _malformed(f"invalid principal {_show(text)}: {_PRINCIPAL_FORMS}")
    if text == "*":
        return text
    kind, _, name = text.partition(":")
    if kind in ("uid", "gid") and _ID_RE.match(name) and int(name) <= _MAX_ID:
        return f"{kind}:{int(name)}"
    if kind in ("user", "group") and _NAME_RE.match(name):
        if check_names:
            try:
                pwd.getpwnam(name) if kind == "user" else grp.getgrnam(name)
            except KeyError:
                raise _malformed(f"invalid principal {text!r}: no such {kind}") from None
        return text
    raise _malformed(f"invalid principal {_show(text)}: {_PRINCIPAL_FORMS}")


def validate_principal(text: str) -> str:
    """Return the canonical form of a principal (``uid:007`` becomes ``uid:7``).

    Raises:
        MalformedPolicyDocumentException: not of a principal form, or a user or group that
            does not exist.
    """
    return _principal(text, check_names=True)


@dataclass(frozen=True)
class _Condition:
    operator: str  # base operator, e.g. "StringEquals"
    set_mode: str | None  # "any", "all" or None
    if_exists: bool
    key: str  # lowercased, except the context key after "kms:encryptioncontext:"
    values: tuple[str, ...]  # casefolded for the IgnoreCase operators; "true"/"false" for Bool/Null
    patterns: tuple[re.Pattern[str], ...]  # for StringLike / StringNotLike

    def check(self, values: _Values) -> bool | None:
        if values is _UNKNOWN:
            return None
        if self.operator == "Null":
            return any((v == "true") == (values is None) for v in self.values)
        if values is None:
            if self.if_exists or self.set_mode == "all":
                return True
            if self.set_mode == "any":
                return False
            return self.operator.startswith("StringNot")
        results = (self._match_one(v) for v in values)
        return all(results) if self.set_mode == "all" else any(results)

    def _match_one(self, value: str) -> bool:
        op = self.operator
        if op in ("StringLike", "StringNotLike"):
            hit = any(p.fullmatch(value) for p in self.patterns)
        elif op.endswith("IgnoreCase"):
            hit = value.casefold() in self.values
        elif op == "Bool":
            hit = value.lower() in self.values
        else:
            hit = value in self.values
        return not hit if op.startswith("StringNot") else hit


@dataclass(frozen=True)
class _Statement:
    allow: bool
    principals: frozenset[str] | None  # None: everyone
    actions: tuple[re.Pattern[str], ...]
    not_action: bool
    resources: tuple[re.Pattern[str], ...]
    conditions: tuple[_Condition, ...]

    def applies(self, facts: _Facts) -> bool | None:
        """Whether the statement applies; None when it depends on an unknown fact."""
        if self.principals is not None and not (self.principals & facts.principals):
            return False
        named = any(p.fullmatch(facts.action) for p in self.actions)
        if named == self.not_action:
            return False
        result: bool | None = True
        if facts.resource_arn is None:
            if not any(p.pattern == ".*" for p in self.resources):
                result = None
        elif not any(p.fullmatch(facts.resource_arn) for p in self.resources):
            return False
        for cond in self.conditions:
            outcome = cond.check(facts.values(cond.key))
            if outcome is False:
                return False
            if outcome is None:
                result = None
        return result


def _strings(value: object, where: str) -> list[Any]:
    """A field that is one value or a non-empty list of them."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _malformed(f"{where} must not be an empty list")
    return items


def _parse_actions(value: object, where: str) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for item in _strings(value, where):
        if not isinstance(item, str):
            raise _malformed(f"{where} must be action names, not {_show(item)}")
        if "*" in item or "?" in item:
            if not item.lower().startswith("kms:"):
                raise _malformed(f"{where}: action pattern {item!r} must start with 'kms:'")
        elif item.lower() not in _CANONICAL_ACTION:
            raise _malformed(f"{where}: unknown action {item!r}")
        patterns.append(_wildcard(item, ignore_case=True))
    return tuple(patterns)


def _parse_resources(value: object, where: str) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for item in _strings(value, where):
        if not isinstance(item, str) or not (item == "*" or item.startswith("arn:")):
            raise _malformed(f"{where} must be '*' or a key ARN pattern, not {_show(item)}")
        patterns.append(_wildcard(item, ignore_case=False))
    return tuple(patterns)


def _parse_principal(value: object, where: str, check_names: bool) -> frozenset[str] | None:
    if value == "*":
        return None
    if not isinstance(value, dict) or not value:
        raise _malformed(
            f"{where}: Principal must be '*' or {{\"Unix\": [...]}}, not {_show(value)}"
        )
    if "AWS" in value:
        raise _malformed(
            f"{where}: principal type 'AWS' is not supported; name Unix users and groups"
            ' with {"Unix": ["user:NAME", "group:NAME", ...]}'
        )
    others = sorted(set(value) - {"Unix"})
    if others:
        raise _malformed(f"{where}: unknown principal type {others[0]!r}")
    names = set()
    for item in _strings(value["Unix"], f"{where}: Principal 'Unix'"):
        try:
            names.add(_principal(item, check_names))
        except MalformedPolicyDocumentException:
            raise _malformed(
                "policy contains a statement with one or more invalid principals: " + _show(item)
            ) from None
    return None if "*" in names else frozenset(names)


def _parse_condition_key(key: str, set_mode: str | None, where: str) -> str:
    lowered = key.lower()
    if lowered.startswith(_CONTEXT_KEY_PREFIX) and len(key) > len(_CONTEXT_KEY_PREFIX):
        canonical = _CONTEXT_KEY_PREFIX + key[len(_CONTEXT_KEY_PREFIX) :]
    elif lowered in _SINGLE_VALUED_KEYS or lowered in _MULTI_VALUED_KEYS:
        canonical = lowered
    else:
        raise _malformed(f"{where}: unknown condition key {key!r}")
    if set_mode is not None and canonical not in _MULTI_VALUED_KEYS:
        raise _malformed(
            f"{where}: condition key {key!r} is single-valued; ForAnyValue: and ForAllValues:"
            " apply to multi-valued keys only"
        )
    return canonical


def _parse_conditions(value: object, where: str) -> tuple[_Condition, ...]:
    if not isinstance(value, dict) or not value:
        raise _malformed(f"{where}: Condition must be a non-empty object, not {_show(value)}")
    conditions = []
    for op_name, block in value.items():
        set_mode = None
        base = op_name
        for prefix, mode in (("ForAnyValue:", "any"), ("ForAllValues:", "all")):
            if base.startswith(prefix):
                set_mode, base = mode, base[len(prefix) :]
                break
        if_exists = base.endswith("IfExists")
        base = base.removesuffix("IfExists") if if_exists else base
        if base not in _OPERATORS or (base == "Null" and (set_mode or if_exists)):
            raise _malformed(f"{where}: unknown condition operator {op_name!r}")
        if not isinstance(block, dict) or not block:
            raise _malformed(
                f"{where}: condition {op_name!r} must be a non-empty object, not {_show(block)}"
            )
        for key, raw in block.items():
            cond_key = _parse_condition_key(key, set_mode, where)
            if set_mode is None and cond_key in _MULTI_VALUED_KEYS and base != "Null":
                raise _malformed(
                    f"{where}: condition key {key!r} is multi-valued; use it with"
                    " ForAnyValue: or ForAllValues:"
                )
            values = []
            for item in _strings(raw, f"{where}: condition {op_name!r} {key!r}"):
                if base in ("Bool", "Null"):
                    text = str(item).lower() if isinstance(item, bool | str) else ""
                    if text not in ("true", "false"):
                        raise _malformed(
                            f"{where}: condition {op_name!r} {key!r} takes true or false,"
                            f" not {_show(item)}"
                        )
                elif not isinstance(item, str):
                    raise _malformed(
                        f"{where}: condition {op_name!r} {key!r} values must be strings,"
                        f" not {_show(item)}"
                    )
                else:
                    text = item.casefold() if base.endswith("IgnoreCase") else item
                values.append(text)
            patterns = tuple(_wildcard(v, ignore_case=False) for v in values)
            like = base in ("StringLike", "StringNotLike")
            conditions.append(
                _Condition(
                    base, set_mode, if_exists, cond_key, tuple(values), patterns if like else ()
                )
            )
    return tuple(conditions)


def _parse_statement(raw: object, index: int, check_names: bool) -> tuple[str | None, _Statement]:
    where = f"statement {index}"
    if not isinstance(raw, dict):
        raise _malformed(f"{where} must be an object, not {_show(raw)}")
    sid = raw.get("Sid")
    if "Sid" in raw:
        if not isinstance(sid, str):
            raise _malformed(f"{where}: Sid must be a string, not {_show(sid)}")
        where = f"statement {sid!r}"
    unknown = sorted(set(raw) - _STATEMENT_FIELDS)
    if unknown:
        raise _malformed(f"{where} has an unknown field {unknown[0]!r}")
    for required in ("Effect", "Principal", "Resource"):
        if required not in raw:
            raise _malformed(f"{where} has no {required!r} field")
    effect = raw["Effect"]
    if effect not in ("Allow", "Deny"):
        raise _malformed(f"{where}: Effect must be 'Allow' or 'Deny', not {_show(effect)}")
    if ("Action" in raw) == ("NotAction" in raw):
        raise _malformed(f"{where} must have exactly one of 'Action' and 'NotAction'")
    not_action = "NotAction" in raw
    action_field = "NotAction" if not_action else "Action"
    statement = _Statement(
        allow=effect == "Allow",
        principals=_parse_principal(raw["Principal"], where, check_names),
        actions=_parse_actions(raw[action_field], f"{where}: {action_field}"),
        not_action=not_action,
        resources=_parse_resources(raw["Resource"], f"{where}: Resource"),
        conditions=_parse_conditions(raw["Condition"], where) if "Condition" in raw else (),
    )
    return sid, statement


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _malformed(f"policy has the field {key!r} twice in one object")
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise _malformed(f"policy is not valid JSON: {name} is not a JSON value")


_MEMO_SIZE = 1024  # remembered decisions per policy


@dataclass(frozen=True)
class KeyPolicy:
    """A parsed, valid key policy. Build one with ``KeyPolicy.parse``."""

    text: str  # the document as given, stored verbatim
    _statements: tuple[_Statement, ...] = field(repr=False)
    # Decisions of a policy without conditions depend only on (action, principals,
    # resource), so they are remembered: a mount asks the same question on every open.
    _memo: dict[tuple[str, frozenset[str], str | None], Decision] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def parse(cls, text: str, *, check_names: bool = True) -> KeyPolicy:
        """Parse and validate a policy document.

        Args:
            text: the JSON document.
            check_names: look ``user:``/``group:`` names up in the user and group databases.
                Turn off only to reload a stored policy, which must stay usable when a user
                it names is deleted.

        Raises:
            MalformedPolicyDocumentException: the document is not a valid key policy.
        """
        if not isinstance(text, str):
            raise _malformed(f"policy must be a string, not {type(text).__name__}")
        if len(text) > MAX_POLICY_CHARS:
            raise _malformed(
                f"policy is {len(text)} characters long; at most {MAX_POLICY_CHARS} are allowed"
            )
        try:
            doc = json.loads(
                text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant
            )
        except json.JSONDecodeError as exc:
            message = exc.msg[:1].lower() + exc.msg[1:]
            raise _malformed(
                f"policy is not valid JSON: {message} at line {exc.lineno} column {exc.colno}"
            ) from None
        except RecursionError:
            raise _malformed("policy is not valid JSON: nested too deeply") from None
        if not isinstance(doc, dict):
            raise _malformed(f"policy must be a JSON object, not {_show(doc)}")
        unknown = sorted(set(doc) - {"Version", "Id", "Statement"})
        if unknown:
            raise _malformed(f"policy has an unknown field {unknown[0]!r}")
        if "Version" in doc and doc["Version"] not in VERSIONS:
            raise _malformed(
                f"policy Version must be '2012-10-17' or '2008-10-17', not {_show(doc['Version'])}"
            )
        if "Id" in doc and not isinstance(doc["Id"], str):
            raise _malformed(f"policy Id must be a string, not {_show(doc['Id'])}")
        if "Statement" not in doc:
            raise _malformed("policy has no 'Statement' field")
        raw_statements = doc["Statement"]
        if isinstance(raw_statements, dict):
            raw_statements = [raw_statements]
        if not isinstance(raw_statements, list) or not raw_statements:
            raise _malformed(
                f"policy Statement must be a non-empty list, not {_show(raw_statements)}"
            )
        sids: set[str] = set()
        statements = []
        for index, raw in enumerate(raw_statements, start=1):
            sid, statement = _parse_statement(raw, index, check_names)
            if sid is not None:
                if sid in sids:
                    raise _malformed(f"policy has more than one statement with Sid {sid!r}")
                sids.add(sid)
            statements.append(statement)
        return cls(text, tuple(statements))

    def _decide(self, facts: _Facts) -> Decision:
        if facts.action not in ALL_ACTIONS:
            raise ValueError(f"unknown action {facts.action!r}")
        if any(statement.conditions for statement in self._statements):
            return self._evaluate(facts)
        memo_key = (facts.action, facts.principals, facts.resource_arn)
        decision = self._memo.get(memo_key)
        if decision is None:
            decision = self._evaluate(facts)
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[memo_key] = decision
        return decision

    def _evaluate(self, facts: _Facts) -> Decision:
        allowed = False
        for statement in self._statements:
            applies = statement.applies(facts)
            # Fail closed: a Deny that may apply denies; an Allow must surely apply.
            if not statement.allow and applies is not False:
                return Decision.EXPLICIT_DENY
            if statement.allow and applies is True:
                allowed = True
        return Decision.ALLOW if allowed else Decision.IMPLICIT_DENY

    def evaluate(self, request: RequestContext) -> Decision:
        """Decide a request.

        Raises:
            ValueError: ``request.action`` is not one of ``ALL_ACTIONS`` (a programming error).
        """
        caller = request.caller
        context = request.encryption_context or {}
        facts = _Facts(
            request.action,
            caller,
            caller.principals(),
            request.resource_arn,
            context,
            request.via_service,
            request.account,
        )
        return self._decide(facts)

    def allows(self, request: RequestContext) -> bool:
        """Whether the request is allowed (see ``evaluate``)."""
        return self.evaluate(request) is Decision.ALLOW

    def names_principal_for(
        self, action: str, caller: Caller, *, resource_arn: str | None = None
    ) -> bool:
        """Whether the policy surely allows ``caller`` to do ``action`` (the lockout check).

        The request is synthetic: no encryption context; the caller's uid and name known;
        the trusted service and account unknown; the key's ARN unknown unless given, so that
        only ``"Resource": "*"`` surely names the key. A Deny that may apply counts; an
        Allow that depends on something unknown does not.

        Raises:
            ValueError: ``action`` is not one of ``ALL_ACTIONS``.
        """
        facts = _Facts(action, caller, caller.principals(), resource_arn, {}, _UNKNOWN, _UNKNOWN)
        return self._decide(facts) is Decision.ALLOW


def default_policy(administrators: Sequence[str], users: Sequence[str]) -> str:
    """The default key policy naming key administrators and key users, as JSON text.

    Raises:
        MalformedPolicyDocumentException: an invalid principal, or no principal at all.
    """
    statements = []
    for sid, names, actions in (
        ("Allow access for Key Administrators", administrators, ADMIN_ACTIONS),
        ("Allow use of the key", users, USER_ACTIONS),
    ):
        if isinstance(names, str):
            raise TypeError("principals must be a sequence of strings, not one string")
        principals = list(dict.fromkeys(validate_principal(n) for n in names))
        if principals:
            statements.append(
                {
                    "Sid": sid,
                    "Effect": "Allow",
                    "Principal": {"Unix": principals},
                    "Action": list(actions),
                    "Resource": "*",
                }
            )
    if not statements:
        raise _malformed("a key policy needs at least one key administrator or key user")
    text = json.dumps({"Version": "2012-10-17", "Statement": statements}, indent=2)
    KeyPolicy.parse(text)  # the document we hand out must be one we accept
    return text
