"""Per-uid limits of the key-service daemon: connections, call rates, failed-call rates.

The daemon asks an :class:`UidLimiter` before it does any costly work for a uid: before
it starts a task for a new connection (:mod:`envfs.kms.server`), and before it decodes a
request or hands it to the worker thread (:mod:`envfs.kms.dispatch`). A refusal costs a
few dictionary operations; what was refused is counted per uid and handed out as
:class:`ThrottleSummary` objects for the audit log (``docs/kms.md`` §9).

Rates are token buckets: a bucket holds at most ``burst`` tokens and gains ``per_second``
tokens a second; an event takes one token, and finds none when the uid went faster than
the rate for longer than the burst allows. Three buckets per uid:

- **connections**: every new connection takes a token; without one it is refused
  (``ThrottlingException``). The number of open connections is capped as well
  (``LimitExceededException``).
- **calls**: every request takes a token; without one it is refused.
- **failed calls**: a call that ends in a key-service error (denied, not found, invalid…)
  takes a token after the fact. While this bucket is empty, *every* call of the uid is
  refused: a failed call costs the service an audit record and a transaction, so a uid
  that keeps failing is slowed down as a whole until its bucket refills.

Synchronous and clock-injectable; it knows nothing of sockets or trio.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from envfs.errors import KMSError, LimitExceededException, ThrottlingException


@dataclass(frozen=True)
class Rate:
    """The shape of a token bucket: ``per_second`` tokens a second, at most ``burst``."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (0 < self.per_second < math.inf and 1 <= self.burst < math.inf):
            raise ValueError("a rate needs a finite rate above 0 and a finite burst of 1 or more")

    @classmethod
    def parse(cls, text: str) -> Rate | None:
        """``RATE`` or ``RATE:BURST`` (events per second; the burst defaults to twice the
        rate, at least 1), or ``off`` for no limit (None).

        Raises:
            ValueError: anything else (with a message saying what is expected).
        """
        if text == "off":
            return None
        rate_text, colon, burst_text = text.partition(":")
        try:
            per_second = float(rate_text)
            burst = float(burst_text) if colon else max(1.0, 2 * per_second)
            return cls(per_second, burst)
        except ValueError:
            raise ValueError(
                f"{text!r} is not RATE[:BURST] (a rate above 0 per second, a burst of at"
                " least 1) or 'off'"
            ) from None

    def __str__(self) -> str:
        return f"{self.per_second:g}:{self.burst:g}"


class TokenBucket:
    """A token bucket, filled lazily when it is looked at."""

    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = rate.burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(
                self.rate.burst, self.tokens + (now - self.stamp) * self.rate.per_second
            )
        self.stamp = now

    def has_token(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1

    def take(self, now: float) -> bool:
        """Take one token if there is one; False (and nothing taken) if not."""
        self._refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def drain(self, now: float) -> None:
        """Take one token, or what is left of one."""
        self._refill(now)
        self.tokens = max(0.0, self.tokens - 1)

    def seconds_to_token(self) -> float:
        """How long until the bucket holds a token again (as of its last look)."""
        return max(0.0, (1 - self.tokens) / self.rate.per_second)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.rate.burst


@dataclass(frozen=True)
class Limits:
    """The daemon's per-uid limits; a rate of None is no limit."""

    max_connections_per_uid: int = 128
    connection_rate: Rate | None = Rate(100, 200)
    call_rate: Rate | None = Rate(2000, 4000)
    failure_rate: Rate | None = Rate(10, 100)


@dataclass
class ThrottleSummary:
    """What was refused for one uid since the last summary (for an audit record)."""

    uid: int
    gid: int
    calls: int = 0
    connections: int = 0
    first: float = 0.0  # seconds since the epoch
    last: float = 0.0


@dataclass
class _UidState:
    gid: int
    connections: int = 0
    connection_bucket: TokenBucket | None = None
    call_bucket: TokenBucket | None = None
    failure_bucket: TokenBucket | None = None
    refused: ThrottleSummary | None = None
    buckets: list[TokenBucket] = field(default_factory=list)


class UidLimiter:
    """Per-uid accounting for the daemon. Not thread-safe: use it from one thread."""

    def __init__(
        self,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._wall_clock = wall_clock
        self._uids: dict[int, _UidState] = {}

    def _state(self, uid: int, gid: int) -> _UidState:
        state = self._uids.get(uid)
        if state is None:
            state = self._uids[uid] = _UidState(gid)
            now = self._clock()
            limits = self.limits
            if limits.connection_rate is not None:
                state.connection_bucket = TokenBucket(limits.connection_rate, now)
            if limits.call_rate is not None:
                state.call_bucket = TokenBucket(limits.call_rate, now)
            if limits.failure_rate is not None:
                state.failure_bucket = TokenBucket(limits.failure_rate, now)
            state.buckets = [
                b
                for b in (state.connection_bucket, state.call_bucket, state.failure_bucket)
                if b is not None
            ]
        return state

    def _refuse(self, state: _UidState, uid: int, *, connection: bool) -> bool:
        """Count a refusal; True if it is the uid's first of its kind (connection or call)
        since the last summary."""
        now = self._wall_clock()
        summary = state.refused
        if summary is None:
            summary = state.refused = ThrottleSummary(uid, state.gid, first=now)
        summary.last = now
        if connection:
            summary.connections += 1
            return summary.connections == 1
        summary.calls += 1
        return summary.calls == 1

    def admit_connection(self, uid: int, gid: int) -> tuple[KMSError | None, bool]:
        """Whether a new connection of ``uid`` may be served.

        Returns ``(None, False)`` and counts the connection as open (call
        :meth:`connection_closed` when it ends), or ``(error, first)``: the error to
        answer with, and whether it is the uid's first refused connection since the last
        summary (worth a log line).
        """
        state = self._state(uid, gid)
        state.gid = gid
        limit = self.limits.max_connections_per_uid
        error: KMSError | None = None
        if state.connections >= limit:
            error = LimitExceededException(
                f"too many connections from uid {uid} (at most {limit} at once)"
            )
        elif state.connection_bucket is not None and not state.connection_bucket.take(
            self._clock()
        ):
            rate = state.connection_bucket.rate
            error = ThrottlingException(
                f"too many new connections from uid {uid} (at most {rate.per_second:g} a"
                f" second, {rate.burst:g} at once); reduce the frequency of your calls"
            )
        if error is not None:
            return error, self._refuse(state, uid, connection=True)
        state.connections += 1
        return None, False

    def connection_closed(self, uid: int) -> None:
        state = self._uids.get(uid)
        if state is not None and state.connections > 0:
            state.connections -= 1

    def admit_call(self, uid: int, gid: int) -> tuple[ThrottlingException | None, bool]:
        """Whether a call for ``uid`` may run: ``(None, False)``, or ``(error, first)`` as
        :meth:`admit_connection` answers."""
        state = self._state(uid, gid)
        now = self._clock()
        error: ThrottlingException | None = None
        failures = state.failure_bucket
        if failures is not None and not failures.has_token(now):
            rate = failures.rate
            error = ThrottlingException(
                f"too many failed calls from uid {uid} (at most {rate.per_second:g} a second,"
                f" {rate.burst:g} at once): its calls are refused for"
                f" {failures.seconds_to_token():.1f} s; reduce the frequency of your calls"
            )
        elif state.call_bucket is not None and not state.call_bucket.take(now):
            rate = state.call_bucket.rate
            error = ThrottlingException(
                f"too many calls from uid {uid} (at most {rate.per_second:g} a second,"
                f" {rate.burst:g} at once); reduce the frequency of your calls"
            )
        if error is None:
            return None, False
        return error, self._refuse(state, uid, connection=False)

    def call_failed(self, uid: int, gid: int) -> None:
        """A call of ``uid`` ended in a key-service error: it takes a failure token."""
        bucket = self._state(uid, gid).failure_bucket
        if bucket is not None:
            bucket.drain(self._clock())

    def take_summaries(self) -> list[ThrottleSummary]:
        """What was refused per uid since the last call; forgets uids with nothing left
        to remember (no open connection, full buckets)."""
        now = self._clock()
        summaries: list[ThrottleSummary] = []
        for uid, state in list(self._uids.items()):
            if state.refused is not None:
                summaries.append(state.refused)
                state.refused = None
            elif not state.connections and all(b.full(now) for b in state.buckets):
                del self._uids[uid]
        return summaries
