"""Fail fast while a key service is unreachable: what every remote key provider shares.

After a call found the service unreachable (or timed out), the next calls fail at once
with ``KMSUnavailableException`` until a delay has passed: 0.1 s, doubling up to a bound.
The first call after that tries again; a success resets the delay. A mount whose key
service is down thus answers each open at once instead of waiting out a timeout for each,
and recovers by itself.
"""

from __future__ import annotations

import logging
import threading
import time

from envfs.errors import KMSError, KMSUnavailableException

log = logging.getLogger(__name__)

FIRST_DELAY = 0.1  # seconds


class FailFast:
    """The fail-fast state of one key service, named ``where`` in messages. Thread-safe."""

    def __init__(self, where: str, *, max_backoff: float = 5.0) -> None:
        self.where = where
        self._max_backoff = max_backoff
        self._backoff = 0.0
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise ``KMSUnavailableException`` while the delay after a failure runs."""
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise KMSUnavailableException(
                f"the key service at {self.where!r} is unavailable (next try in {wait:.1f} s)"
            )

    def failed(self, exc: KMSError) -> KMSError:
        """Start (or double) the delay after ``exc``, an unreachable or silent service;
        return ``exc`` for the caller to raise."""
        with self._lock:
            self._backoff = min(self._max_backoff, max(FIRST_DELAY, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            delay = self._backoff
        log.warning("key service unavailable: %s (retrying in %.1f s)", exc.message, delay)
        return exc

    def succeeded(self) -> None:
        """A call was answered: no delay any more."""
        if not self._backoff:
            return
        with self._lock:
            self._backoff = 0.0
            self._retry_at = 0.0
        log.info("key service at %r reachable again", self.where)
