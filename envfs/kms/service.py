"""``KeyService``: every key-service operation, performed for a given caller.

The machinery (validation, audit, transactions, checks) is in :mod:`envfs.kms.core`; the
operations are grouped in :mod:`.manage`, :mod:`.usage`, :mod:`.listing` and
:mod:`.accesskeys`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from envfs.kms.accesskeys import AccessKeyOps
from envfs.kms.core import DAY, OperationHandler, ServiceCore
from envfs.kms.listing import ListingOps
from envfs.kms.manage import ManagementOps
from envfs.kms.usage import CryptoOps

__all__ = ["DAY", "KeyService", "ServiceCore"]


class KeyService(ManagementOps, CryptoOps, ListingOps, AccessKeyOps):
    """The key service of one region, over one :class:`~envfs.kms.store.KeyStore`.

    ``handle(caller, operation, params)`` performs one AWS-named operation with AWS
    request and response shapes; ``run_due_tasks()`` carries out due rotations and
    deletions. Construct with ``KeyService(store, clock=time.time)``.
    """

    # Each AWS operation's method, named here so that a search for the operation finds
    # its code; exactly the operations of kms.operations (a unit test checks it).
    HANDLERS: ClassVar[Mapping[str, OperationHandler]] = {
        "CreateKey": ManagementOps._op_create_key,
        "DescribeKey": ManagementOps._op_describe_key,
        "ListKeys": ListingOps._op_list_keys,
        "EnableKey": ManagementOps._op_enable_key,
        "DisableKey": ManagementOps._op_disable_key,
        "ScheduleKeyDeletion": ManagementOps._op_schedule_key_deletion,
        "CancelKeyDeletion": ManagementOps._op_cancel_key_deletion,
        "UpdateKeyDescription": ManagementOps._op_update_key_description,
        "CreateAlias": ManagementOps._op_create_alias,
        "UpdateAlias": ManagementOps._op_update_alias,
        "DeleteAlias": ManagementOps._op_delete_alias,
        "ListAliases": ListingOps._op_list_aliases,
        "TagResource": ManagementOps._op_tag_resource,
        "UntagResource": ManagementOps._op_untag_resource,
        "ListResourceTags": ListingOps._op_list_resource_tags,
        "Encrypt": CryptoOps._op_encrypt,
        "Decrypt": CryptoOps._op_decrypt,
        "ReEncrypt": CryptoOps._op_re_encrypt,
        "GenerateDataKey": CryptoOps._op_generate_data_key,
        "GenerateDataKeyWithoutPlaintext": CryptoOps._op_generate_data_key_without_plaintext,
        "GenerateRandom": CryptoOps._op_generate_random,
        "EnableKeyRotation": ManagementOps._op_enable_key_rotation,
        "DisableKeyRotation": ManagementOps._op_disable_key_rotation,
        "GetKeyRotationStatus": ManagementOps._op_get_key_rotation_status,
        "RotateKeyOnDemand": ManagementOps._op_rotate_key_on_demand,
        "ListKeyRotations": ListingOps._op_list_key_rotations,
        "GetKeyPolicy": ManagementOps._op_get_key_policy,
        "ListKeyPolicies": ListingOps._op_list_key_policies,
        "PutKeyPolicy": ManagementOps._op_put_key_policy,
        "ListAuditRecords": ListingOps._op_list_audit_records,
        "VerifyAudit": ListingOps._op_verify_audit,
        "CreateAccessKey": AccessKeyOps._op_create_access_key,
        "ListAccessKeys": AccessKeyOps._op_list_access_keys,
        "UpdateAccessKey": AccessKeyOps._op_update_access_key,
        "DeleteAccessKey": AccessKeyOps._op_delete_access_key,
    }
