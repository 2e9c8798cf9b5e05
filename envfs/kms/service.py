"""``KeyService``: every key-service operation, performed for a given caller.

The machinery (validation, audit, transactions, checks) is in :mod:`envfs.kms.core`; the
operations are grouped in :mod:`.manage`, :mod:`.usage` and :mod:`.listing`.
"""

from __future__ import annotations

from envfs.kms.core import DAY, ServiceCore
from envfs.kms.listing import ListingOps
from envfs.kms.manage import ManagementOps
from envfs.kms.usage import CryptoOps

__all__ = ["DAY", "KeyService", "ServiceCore"]


class KeyService(ManagementOps, CryptoOps, ListingOps):
    """The key service of one region, over one :class:`~envfs.kms.store.KeyStore`.

    ``handle(caller, operation, params)`` performs one AWS-named operation with AWS
    request and response shapes; ``run_due_tasks()`` carries out due rotations and
    deletions. Construct with ``KeyService(store, clock=time.time)``.
    """
