"""``EmbeddedKeyProvider``: the key service of a region's store, in this process."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envfs.identity import Caller
from envfs.keys.envfskms import KeyServiceCalls
from envfs.kms.service import KeyService


class EmbeddedKeyProvider(KeyServiceCalls):
    """A :class:`~envfs.keys.provider.KeyProvider` over an in-process key service."""

    def __init__(self, service: KeyService) -> None:
        self.service = service

    @property
    def region(self) -> str:
        return self.service.region

    @property
    def batches_audit(self) -> bool:
        return True

    def _call(self, operation: str, params: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        return self.service.handle(caller, operation, params)

    def flush_audit(self) -> None:
        """Add the service's batched audit records to the chain if they are due."""
        self.service.flush_audit()
