"""Access keys: credentials of Unix users for the HTTP endpoint (``docs/kms.md`` §4.4).

An access key belongs to one uid; a request signed with it is to be decided as that
user. Root and members of the key creators group manage every user's access keys; any
other user manages only their own (as IAM lets users manage their own access keys). A
key of another user answers such a caller as a key that does not exist. The secret is
returned once, by CreateAccessKey, and is kept sealed in the store
(:meth:`envfs.kms.store.KeyStore.access_key_secret`).

A request signed with an access key may list access keys but never create, activate,
deactivate or delete one, whoever's it is: a stolen key must not be able to mint a second
that outlives it, nor switch its owner's other key off. Those changes are made on the key
service's machine, over its Unix socket, where the kernel says who calls.
"""

from __future__ import annotations

import pwd
from typing import Any

from envfs import crypto
from envfs.errors import (
    AccessDeniedException,
    LimitExceededException,
    NotFoundException,
    ValidationException,
)
from envfs.kms.core import ServiceCore, _Call
from envfs.kms.model import (
    ACCESS_KEY_ID_RE,
    MAX_ACCESS_KEYS_PER_USER,
    AccessKeyStatus,
    new_access_key_id,
    new_access_key_secret,
)
from envfs.kms.store import AccessKeyRecord


def _user(text: str) -> tuple[int, str | None] | None:
    """``(uid, name)`` of a user name or decimal uid; None if no such user exists."""
    try:
        entry = pwd.getpwuid(int(text)) if text.isdecimal() else pwd.getpwnam(text)
    except (KeyError, OverflowError, ValueError):
        return None
    return entry.pw_uid, entry.pw_name


class AccessKeyOps(ServiceCore):
    def _target_user(self, call: _Call, req: dict[str, Any]) -> tuple[int, str | None]:
        """The user a request's ``UserName`` names (the caller if absent), if the caller
        may manage that user's access keys.

        Raises:
            ValidationException: no such user.
            AccessDeniedException: another user's keys, and the caller lacks the right.
        """
        if "UserName" not in req:
            return call.caller.uid, call.caller.user_name
        user = _user(req["UserName"])
        if user is None:
            raise ValidationException(
                f"user {req['UserName']!r} does not exist (expected a user name or uid)"
            )
        if not self._may_manage(call, user[0]):
            raise AccessDeniedException(
                f"user {call.caller.describe()} is not authorized to manage the access keys"
                f" of user {req['UserName']!r}: only their owner, root and members of group"
                f" {self.store.key_creators_group!r} may"
            )
        return user

    def _may_manage(self, call: _Call, uid: int) -> bool:
        if self._account_right(call.caller):
            return True
        # A service calling on a user's behalf (a mount) has no business with credentials.
        return call.caller.uid == uid and call.caller.via is None

    def _access_key(self, call: _Call, req: dict[str, Any]) -> AccessKeyRecord:
        """The access key ``AccessKeyId`` names, if the caller may manage it; another
        user's key reads as one that does not exist."""
        access_key_id: str = req["AccessKeyId"]
        call.access_key_id = access_key_id[:32]
        key = None
        if ACCESS_KEY_ID_RE.fullmatch(access_key_id):
            key = self.store.get_access_key(access_key_id)
        if key is None or not self._may_manage(call, key.uid):
            raise NotFoundException(f"access key {access_key_id!r} does not exist")
        return key

    @staticmethod
    def _access_key_metadata(key: AccessKeyRecord) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "UserName": key.user_name if key.user_name is not None else str(key.uid),
            "Uid": key.uid,
            "AccessKeyId": key.access_key_id,
            "Status": key.status.value,
            "CreateDate": key.created,
        }
        if key.last_used is not None:
            meta["LastUsedDate"] = key.last_used
        return meta

    # --- for the HTTP endpoint (run in the daemon's worker thread) ------------------------

    def signing_secret(self, access_key_id: str) -> tuple[bytes, int, str | None] | None:
        """The secret, uid and owner's name (as at its creation) of an *Active* access key
        (to check a request's signature), or None if the key is unknown or Inactive. Reads
        only; not audited (the call the request makes is).

        The name is for the HTTP endpoint to see that the uid is still that user's: a uid
        freed by a deleted user and given to a new one must not carry the old user's keys.

        Raises:
            StoreCorruptError: the sealed secret does not open.
        """
        if not ACCESS_KEY_ID_RE.fullmatch(access_key_id):
            return None
        with self.store.reading():
            found = self.store.access_key_secret(access_key_id)
            key = self.store.get_access_key(access_key_id) if found is not None else None
        if found is None or key is None:
            return None
        return found[0], found[1], key.user_name

    def access_key_used(self, access_key_id: str) -> None:
        """Record that ``access_key_id`` signed a request now (its ``LastUsedDate``)."""
        with self.store.transaction(durable=False):
            self.store.mark_access_key_used(access_key_id, self._clock())

    # --- operations ------------------------------------------------------------------

    @staticmethod
    def _refuse_signed(call: _Call, operation: str) -> None:
        if call.caller.access_key_id is not None:
            raise AccessDeniedException(
                f"{operation} is not allowed with a request signed by an access key: manage"
                " access keys on the key service's machine (envfs kms ... over its Unix socket)"
            )

    def _op_create_access_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._refuse_signed(call, "CreateAccessKey")
        uid, user_name = self._target_user(call, req)
        if call.caller.via is not None and not self._account_right(call.caller):
            raise AccessDeniedException(
                f"a service ({call.caller.via!r}) may not create access keys on a user's behalf"
            )
        if len(self.store.list_access_keys(uid)) >= MAX_ACCESS_KEYS_PER_USER:
            raise LimitExceededException(
                f"user {user_name or uid!r} already has {MAX_ACCESS_KEYS_PER_USER} access keys:"
                " delete one first"
            )
        while True:  # 80 random bits: a collision is all but impossible, but cheap to rule out
            access_key_id = new_access_key_id(crypto.random_bytes(10))
            if self.store.get_access_key(access_key_id) is None:
                break
        secret = new_access_key_secret(crypto.random_bytes(30))
        key = AccessKeyRecord(access_key_id, uid, user_name, AccessKeyStatus.ACTIVE, call.now, None)
        self.store.insert_access_key(key, secret.encode("ascii"))
        call.access_key_id = access_key_id
        metadata = self._access_key_metadata(key)
        metadata["SecretAccessKey"] = secret
        return {"AccessKey": metadata}

    def _op_list_access_keys(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        if "UserName" in req:
            uid: int | None = self._target_user(call, req)[0]
        elif self._account_right(call.caller):
            uid = None  # root and key creators: every user's keys
        elif self._may_manage(call, call.caller.uid):
            uid = call.caller.uid
        else:
            raise AccessDeniedException(
                f"a service ({call.caller.via!r}) may not list access keys on a user's behalf"
            )
        keys = self.store.list_access_keys(uid)
        return {
            "AccessKeyMetadata": [self._access_key_metadata(k) for k in keys],
            "IsTruncated": False,
        }

    def _op_update_access_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._refuse_signed(call, "UpdateAccessKey")
        try:
            status = AccessKeyStatus(req["Status"])
        except ValueError:
            raise ValidationException(
                f"Status {req['Status']!r} is not valid: expected 'Active' or 'Inactive'"
            ) from None
        key = self._access_key(call, req)
        self.store.set_access_key_status(key.access_key_id, status)
        return {}

    def _op_delete_access_key(self, call: _Call, req: dict[str, Any]) -> dict[str, Any]:
        self._refuse_signed(call, "DeleteAccessKey")
        key = self._access_key(call, req)
        self.store.delete_access_key(key.access_key_id)
        return {}
