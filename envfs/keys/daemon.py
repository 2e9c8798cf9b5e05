"""``DaemonKeyProvider``: an envfs key-service daemon, called on behalf of each user.

The daemon accepts such calls only from a process it trusts for that (``envfs kms serve
--trust-on-behalf-of``); when it cannot be reached the provider fails fast for a while
(exponential backoff) and recovers by itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envfs.errors import DependencyTimeoutException, KMSUnavailableException
from envfs.identity import Caller
from envfs.keys.envfskms import KeyServiceCalls
from envfs.keys.failfast import FailFast
from envfs.kms.client import KMSClient


class DaemonKeyProvider(KeyServiceCalls):
    """A :class:`~envfs.keys.provider.KeyProvider` over a key-service daemon, calling on
    behalf of each user.

    After the daemon could not be reached, calls fail at once (KMSUnavailableException)
    until a backoff delay has passed: 0.1 s, doubling up to ``max_backoff``. The first call
    after that tries again; success resets the delay.
    """

    def __init__(self, client: KMSClient, region: str, *, max_backoff: float = 5.0) -> None:
        self.client = client
        self._region = region
        self._fail_fast = FailFast(str(client.socket_path), max_backoff=max_backoff)

    @property
    def region(self) -> str:
        return self._region

    @property
    def batches_audit(self) -> bool:
        return False  # the daemon keeps its own audit

    def flush_audit(self) -> None:
        pass

    def _call(self, operation: str, params: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        self._fail_fast.check()
        try:
            out = self.client.call(operation, params, on_behalf_of=(caller.uid, caller.gid))
        except (KMSUnavailableException, DependencyTimeoutException) as exc:
            raise self._fail_fast.failed(exc) from None
        self._fail_fast.succeeded()
        return out
