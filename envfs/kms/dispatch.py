"""The key-service daemon's dispatch, apart from any transport: the worker thread.

The handler (synchronous, may block on SQLite for seconds) runs in a worker thread, one
call at a time for the whole service, taken in turns by uid (round-robin,
:class:`_Turns`), so that a uid with many calls waiting delays another uid's call by at
most one of its own.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator

import trio


class _Turns:
    """The worker, taken in turns: round-robin over keys (uids), in order within a key.

    One uid with many connections (or a trusted service calling for one user again and
    again) thus waits behind every other uid that has a call waiting, and delays each of
    them by at most one of its own calls.
    """

    def __init__(self) -> None:
        self._busy = False
        self._waiting: dict[int | None, collections.deque[trio.Event]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: int | None) -> AsyncIterator[None]:
        if self._busy:
            event = trio.Event()
            queue = self._waiting.setdefault(key, collections.deque())
            queue.append(event)
            try:
                await event.wait()
            except BaseException:
                if event.is_set():
                    self._hand_over()  # the turn came with the cancellation: pass it on
                else:
                    queue.remove(event)
                    if not queue:
                        del self._waiting[key]
                raise
        else:
            self._busy = True
        try:
            yield
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        if not self._waiting:
            self._busy = False
            return
        key = next(iter(self._waiting))
        queue = self._waiting.pop(key)
        event = queue.popleft()
        if queue:
            self._waiting[key] = queue  # to the back of the round
        event.set()
