"""Key management operations: create, states, deletion, aliases, tags, rotation, policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envfs.errors import (
    AlreadyExistsException,
    KMSInvalidStateException,
    LimitExceededException,
    NotFoundException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from envfs.kms.core import (
    DAY,
    MAX_DESCRIPTION,
    MAX_ON_DEMAND_ROTATIONS,
    MAX_TAGS,
    ServiceCore,
    _Call,
)
from envfs.kms.model import (
    AWS_ORIGIN,
    KEY_USAGE,
    ORIGIN,
    SYMMETRIC_DEFAULT,
    KeyState,
    alias_arn,
    new_key_id,
    validate_alias_name_param,
)
from envfs.kms.policy import KeyPolicy, default_policy
from envfs.kms.store import KeyRecord


class ManagementOps(ServiceCore):
    def _set_state(self, call: _Call, req: dict[str, Any], action: str, state: KeyState) -> None:
        key = self._key(call, req["KeyId"])
        self._authorize(call, action, key)
        self._require_not_pending(key)
        key.state = state
        self.store.update_key(key)

    def _op_create_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        call.action = "kms:CreateKey"
        self._require_account_right(call, "kms:CreateKey")
        for name, allowed in (("KeyUsage", KEY_USAGE), ("KeySpec", SYMMETRIC_DEFAULT)):
            if req.get(name, allowed) != allowed:
                raise ValidationException(
                    f"{name} {req[name]!r} is not supported: only {allowed!r}"
                )
        if req.get("Origin", ORIGIN) not in (ORIGIN, AWS_ORIGIN):
            raise UnsupportedOperationException(
                f"Origin {req['Origin']!r} is not supported: only {ORIGIN!r} (or its AWS"
                f" name {AWS_ORIGIN!r}): the service makes every key's material"
            )
        if req.get("MultiRegion", False):
            raise UnsupportedOperationException(
                "MultiRegion true is not supported: envfs keys are single-region"
            )
        description = req.get("Description", "")
        if len(description) > MAX_DESCRIPTION:
            raise ValidationException(f"Description is longer than {MAX_DESCRIPTION} characters")
        tags = self._check_tags(req.get("Tags", []))
        if len(tags) > MAX_TAGS:
            raise TagException(f"a key can have at most {MAX_TAGS} tags")
        admins = req.get("KeyAdministrators")
        users = req.get("KeyUsers")
        key_id = new_key_id()
        if "Policy" in req:
            if admins is not None or users is not None:
                raise ValidationException(
                    "give either Policy or KeyAdministrators/KeyUsers, not both"
                )
            policy_text: str = req["Policy"]
            bypass = req.get("BypassPolicyLockoutSafetyCheck", False)
            self._check_lockout(call, KeyPolicy.parse(policy_text), key_id, bypass)
        else:
            creator = self._creator_principal(call.caller)
            policy_text = default_policy(admins or [creator], users or [creator])
        key = KeyRecord(
            key_id=key_id,
            created=call.now,
            description=description,
            state=KeyState.ENABLED,
            deletion_date=None,
            pending_window_days=None,
            rotation_period_days=None,
            next_rotation=None,
            policy=policy_text,
        )
        self.store.insert_key(key)
        self._add_version(key.key_id, call.now, None)
        for tag_key, tag_value in tags.items():
            self.store.set_tag(key.key_id, tag_key, tag_value)
        call.key_arn = self._arn(key.key_id)
        return {"KeyMetadata": self._metadata(key)}

    def _op_describe_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:DescribeKey", key)
        return {"KeyMetadata": self._metadata(key)}

    def _op_enable_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._set_state(call, req, "kms:EnableKey", KeyState.ENABLED)
        return {}

    def _op_disable_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._set_state(call, req, "kms:DisableKey", KeyState.DISABLED)
        return {}

    def _op_schedule_key_deletion(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:ScheduleKeyDeletion", key)
        days = req.get("PendingWindowInDays", 30)
        if not 7 <= days <= 30:
            raise ValidationException(f"PendingWindowInDays must be between 7 and 30, got {days}")
        self._require_not_pending(key)
        key.state = KeyState.PENDING_DELETION
        key.deletion_date = call.now + days * DAY
        key.pending_window_days = days
        self.store.update_key(key)
        return {
            "KeyId": self._arn(key.key_id),
            "DeletionDate": key.deletion_date,
            "KeyState": key.state.value,
            "PendingWindowInDays": days,
        }

    def _op_cancel_key_deletion(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:CancelKeyDeletion", key)
        if key.state is not KeyState.PENDING_DELETION:
            raise KMSInvalidStateException(f"key {self._arn(key.key_id)!r} is not pending deletion")
        key.state = KeyState.DISABLED
        key.deletion_date = None
        key.pending_window_days = None
        self.store.update_key(key)
        return {"KeyId": self._arn(key.key_id)}

    def _op_update_key_description(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:UpdateKeyDescription", key)
        if len(req["Description"]) > MAX_DESCRIPTION:
            raise ValidationException(f"Description is longer than {MAX_DESCRIPTION} characters")
        self._require_not_pending(key)
        key.description = req["Description"]
        self.store.update_key(key)
        return {}

    def _op_create_alias(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        name = validate_alias_name_param(req["AliasName"])
        key = self._key(call, req["TargetKeyId"], allow_alias=False)
        self._authorize(call, "kms:CreateAlias", key)
        self._require_not_pending(key)
        if self.store.get_alias(name) is not None:
            raise AlreadyExistsException(
                f"alias {alias_arn(self.region, self.account, name)!r} already exists"
            )
        self.store.put_alias(name, key.key_id, call.now)
        return {}

    def _existing_alias(self, call: _Call, name: str) -> KeyRecord:
        validate_alias_name_param(name)
        alias = self.store.get_alias(name)
        if alias is None:
            raise NotFoundException(f"alias {name!r} is not found in region {self.region!r}")
        return self._load(call, alias[0], name)

    def _op_update_alias(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        old = self._existing_alias(call, req["AliasName"])
        new = self._key(call, req["TargetKeyId"], allow_alias=False)
        call.key_arn = self._arn(old.key_id)
        call.destination_key_arn = self._arn(new.key_id)
        self._authorize(call, "kms:UpdateAlias", old)
        self._authorize(call, "kms:UpdateAlias", new)
        self._require_not_pending(new)
        self.store.put_alias(req["AliasName"], new.key_id, call.now)
        return {}

    def _op_delete_alias(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._existing_alias(call, req["AliasName"])
        call.key_arn = self._arn(key.key_id)
        self._authorize(call, "kms:DeleteAlias", key)
        self.store.delete_alias(req["AliasName"])
        return {}

    def _op_tag_resource(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:TagResource", key)
        self._require_not_pending(key)
        tags = self._check_tags(req["Tags"])
        if len(self.store.tags(key.key_id) | tags) > MAX_TAGS:
            raise LimitExceededException(f"a key can have at most {MAX_TAGS} tags")
        for tag_key, tag_value in tags.items():
            self.store.set_tag(key.key_id, tag_key, tag_value)
        return {}

    def _op_untag_resource(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:UntagResource", key)
        self._require_not_pending(key)
        for tag_key in req["TagKeys"]:
            self.store.remove_tag(key.key_id, tag_key)
        return {}

    def _rotatable(self, call: _Call, req: dict[str, Any], action: str) -> KeyRecord:
        key = self._key(call, req["KeyId"])
        self._authorize(call, action, key)
        self._require_usable(key)
        return key

    def _op_enable_key_rotation(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._rotatable(call, req, "kms:EnableKeyRotation")
        days = req.get("RotationPeriodInDays", 365)
        if not 90 <= days <= 2560:
            raise ValidationException(
                f"RotationPeriodInDays must be between 90 and 2560, got {days}"
            )
        if key.rotation_period_days is None:
            key.next_rotation = call.now + days * DAY
        else:
            last = self.store.versions(key.key_id)[-1].created
            key.next_rotation = last + days * DAY
        key.rotation_period_days = days
        self.store.update_key(key)
        return {}

    def _op_disable_key_rotation(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._rotatable(call, req, "kms:DisableKeyRotation")
        key.rotation_period_days = None
        key.next_rotation = None
        self.store.update_key(key)
        return {}

    def _op_get_key_rotation_status(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:GetKeyRotationStatus", key)
        result: dict[str, Any] = {
            "KeyId": self._arn(key.key_id),
            "KeyRotationEnabled": key.rotation_period_days is not None,
        }
        if key.rotation_period_days is not None:
            result["RotationPeriodInDays"] = key.rotation_period_days
            result["NextRotationDate"] = key.next_rotation
        on_demand = [v for v in self.store.versions(key.key_id) if v.rotation_type == "ON_DEMAND"]
        if on_demand:
            result["OnDemandRotationStartDate"] = on_demand[-1].created
        return result

    def _op_rotate_key_on_demand(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._rotatable(call, req, "kms:RotateKeyOnDemand")
        on_demand = [v for v in self.store.versions(key.key_id) if v.rotation_type == "ON_DEMAND"]
        if len(on_demand) >= MAX_ON_DEMAND_ROTATIONS:
            raise LimitExceededException(
                f"key {self._arn(key.key_id)!r} was already rotated on demand"
                f" {MAX_ON_DEMAND_ROTATIONS} times, the most allowed"
            )
        self._add_version(key.key_id, call.now, "ON_DEMAND")
        return {"KeyId": self._arn(key.key_id)}

    @staticmethod
    def _policy_name(req: Mapping[str, Any]) -> None:
        name = req.get("PolicyName", "default")
        if name != "default":
            raise NotFoundException(f"policy {name!r} does not exist: keys have only 'default'")

    def _op_get_key_policy(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:GetKeyPolicy", key)
        self._policy_name(req)
        return {"Policy": key.policy, "PolicyName": "default"}

    def _op_put_key_policy(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        key = self._key(call, req["KeyId"])
        self._authorize(call, "kms:PutKeyPolicy", key)
        self._policy_name(req)
        policy = KeyPolicy.parse(req["Policy"])
        bypass = req.get("BypassPolicyLockoutSafetyCheck", False)
        self._check_lockout(call, policy, key.key_id, bypass)
        self._require_not_pending(key)
        key.policy = req["Policy"]
        self.store.update_key(key)
        return {}
