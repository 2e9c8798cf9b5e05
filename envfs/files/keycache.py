"""Recently unwrapped data keys, per user, with a maximum age and size.

An entry says: the key service let this user (uid, gid) unwrap this file's data key at
most ``max_age`` seconds ago. While it holds, a re-open by the same user needs no call to
the key service; another user never benefits from it. So a policy change (or a disabled
key) takes effect for new opens within ``max_age``; with ``max_age`` 0 the cache is off
and every open is decided by the key service (the default with the embedded store).

Entries are dropped when they are found expired, in a sweep of every expired entry at most
once every ``max_age`` seconds (at a lookup or an insertion: an expired key is kept for at
most about twice ``max_age`` while the mount is used), when the cache is full (least
recently used first) and when the mount ends. Python cannot wipe the bytes of a dropped
key; it is garbage.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

_Key = tuple[int, int, bytes, bytes]  # uid, gid, file id, wrapped data key


class DataKeyCache:
    """Data keys by (user, file), each valid for ``max_age`` seconds; at most ``max_entries``."""

    def __init__(
        self,
        max_age: float,
        max_entries: int = 4096,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age < 0 or max_entries < 1:
            raise ValueError("max_age must be >= 0 and max_entries >= 1")
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[_Key, tuple[float, bytes]] = OrderedDict()
        self._next_sweep = clock() + max_age

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, uid: int, gid: int, file_id: bytes, wrapped: bytes) -> bytes | None:
        """The data key if this user unwrapped it less than ``max_age`` seconds ago."""
        if not self.max_age:
            return None
        self._sweep()
        key = (uid, gid, file_id, wrapped)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, uid: int, gid: int, file_id: bytes, wrapped: bytes, data_key: bytes) -> None:
        """Remember that the key service just gave this user this data key."""
        if not self.max_age:
            return
        self._sweep()
        key = (uid, gid, file_id, wrapped)
        self._entries[key] = (self._clock() + self.max_age, data_key)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _sweep(self) -> None:
        """Drop every expired entry, at most once every ``max_age`` seconds: plaintext keys
        that will never be served again are not kept until the cache fills up."""
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.max_age
        for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()
