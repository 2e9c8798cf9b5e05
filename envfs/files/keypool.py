"""Data keys made in advance, per user, so that ``create`` does not wait for the key service.

With a key-service daemon every GenerateDataKey is a round trip. After a user's first
create, the pool asks the daemon — in a worker thread, off the request path — for a few
more data keys *on that user's behalf*, each for a fresh file id (the encryption context
names the volume and the file id, as for any file). The user's next creates take them.

The key service decides and audits each one when it is made (its audit note says it was
made in advance), so an entry is a decision like a data-key cache entry: it is used only
for the same user and only for ``max_age`` seconds, after which it is dropped unused (at
the next create by anyone, or at unmount). A
policy change therefore takes effect for new files within ``max_age`` too.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from envfs import crypto
from envfs.errors import EnvfsError
from envfs.files import fileformat
from envfs.files.volume import Volume
from envfs.identity import Caller
from envfs.keys.provider import DataKey, KeyProvider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PooledKey:
    file_id: bytes
    data_key: DataKey
    expires: float


class DataKeyPool:
    """Up to ``size`` ready data keys per user (uid, gid), each usable for ``max_age`` s."""

    def __init__(
        self,
        volume: Volume,
        provider: KeyProvider,
        *,
        size: int = 4,
        max_age: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.volume = volume
        self.provider = provider
        self.size = size
        self.max_age = max_age
        self._clock = clock
        self._ready: dict[tuple[int, int], collections.deque[PooledKey]] = {}
        self._wanted: dict[tuple[int, int], Caller] = {}
        self._wake = trio.Event()

    def take(self, caller: Caller) -> tuple[bytes, DataKey] | None:
        """A ready (file id, data key) for ``caller``, or None; asks for a refill either way."""
        user = (caller.uid, caller.gid)
        ready = self._ready.get(user)
        now = self._clock()
        taken = None
        while ready:
            entry = ready.popleft()
            if entry.expires > now:
                taken = (entry.file_id, entry.data_key)
                break
        self._drop_expired(now)
        self._wanted[user] = caller
        self._wake.set()
        return taken

    def _drop_expired(self, now: float) -> None:
        """Forget the keys of users whose every key has expired (each deque is in the order
        the keys were made): plaintext keys of a user who stopped creating files are not
        kept for the mount's life."""
        for user in [u for u, ready in self._ready.items() if ready and ready[-1].expires <= now]:
            del self._ready[user]

    def clear(self) -> None:
        self._ready.clear()
        self._wanted.clear()

    async def run(self) -> None:
        """Refill the pools of the users who created files lately; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._wanted:
                user, caller = self._wanted.popitem()
                await self._refill(user, caller)

    async def _refill(self, user: tuple[int, int], caller: Caller) -> None:
        ready = self._ready.setdefault(user, collections.deque())
        now = self._clock()
        while ready and ready[0].expires <= now:
            ready.popleft()
        while len(ready) < self.size:
            file_id = crypto.random_bytes(fileformat.FILE_ID_SIZE)
            try:
                data_key = await trio.to_thread.run_sync(
                    self.provider.generate_data_key,
                    self.volume.key_arn,
                    self.volume.file_context(file_id),
                    caller,
                    f"envfs: made in advance for a file of {self.volume.backing}",
                )
            except EnvfsError as exc:
                # Refused or unreachable: creates will ask (and fail) themselves.
                log.debug("no data key made in advance for uid %d: %s", caller.uid, exc)
                return
            ready.append(PooledKey(file_id, data_key, self._clock() + self.max_age))
