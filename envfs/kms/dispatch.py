"""The key-service daemon's dispatch: an authenticated peer's request to the handler.

Apart from any transport: the Unix socket (:mod:`envfs.kms.server`) tells a
:class:`Dispatcher` who the peer is (a :class:`Caller` learned from the kernel) and what
it asks (a decoded :class:`Request`); another transport (an HTTP listener) could do the
same. The dispatcher applies the rules that do not depend on how a request arrived:

- **trust**: a request on behalf of another user (``on_behalf_of``, AWS's
  ``kms:ViaService`` idea) is made for that user only if the peer's uid is trusted for it
  (``envfs kms serve --trust-on-behalf-of UID=NAME``); it is then decided and audited for
  the user, with the peer as ``via``. From any other peer it is refused
  (``AccessDeniedException``, logged and audited through ``on_refused``). A request on
  behalf of the peer itself is a plain call;
- **limits**: the per-uid call limits (:mod:`envfs.kms.limits`) are checked before any
  costly work: those of a peer not trusted for on-behalf-of calls before its request is
  even decoded (:meth:`Dispatcher.admit`), those of the user a trusted peer's call is
  made for before it is queued for the worker. A call over them is refused
  (``ThrottlingException``) without reaching the worker thread or the store; a call that
  fails with a key-service error counts against its user's failed calls. Refusals are
  reported per uid every ``summary_interval`` seconds (logged, and to ``on_throttled``
  for the audit log);
- **the worker**: the handler (synchronous, may block on SQLite for seconds) runs in a
  worker thread, one call at a time for the whole service, taken in turns by uid
  (round-robin, :class:`_Turns`), so that a uid with many calls waiting delays another
  uid's call by at most one of its own. Maintenance and the reports of refusals run there
  too, between calls.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import trio

from envfs.errors import AccessDeniedException, KMSError, KMSInternalException
from envfs.identity import Caller
from envfs.kms.limits import ThrottleSummary, UidLimiter

logger = logging.getLogger(__name__)

Handler = Callable[[Caller, str, dict[str, Any]], Mapping[str, Any]]
"""``handler(caller, operation, params) -> result``, e.g. ``KeyService.handle``."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class Request:
    """A decoded request: the AWS operation, its parameters, and ``(uid, gid)`` of the
    user it is made for when the peer asks to call on behalf of another user."""

    operation: str
    params: dict[str, Any]
    on_behalf_of: tuple[int, int] | None = None


@dataclass(frozen=True)
class Admitted:
    """A peer whose next request may be decoded: what :meth:`Dispatcher.admit` returns
    and :meth:`Dispatcher.call` takes, so that no call skips the check before decoding."""

    peer: Caller


class Dispatcher:
    """Requests of authenticated peers to the handler: trust, limits, the worker in turns.

    A transport calls :meth:`admit` for each request before it decodes it, then
    :meth:`call`; it runs :meth:`run_periodic` and :meth:`run_summaries` beside its
    connections, and :meth:`report_throttled` once more when it stops.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        limiter: UidLimiter,
        trusted_services: Mapping[int, str],
        on_refused: Callable[[Caller, str, KMSError], object] | None,
        on_throttled: Callable[[Caller, int, int, float, float], object] | None,
    ) -> None:
        """Args: as :func:`envfs.kms.server.serve` takes them; ``limiter`` is shared with
        the transport, which counts connections in it."""
        self._handler = handler
        self._limiter = limiter
        self._trusted = dict(trusted_services)
        self._on_refused = on_refused
        self._on_throttled = on_throttled
        self._turns = _Turns()
        # One worker thread at a time: the handler is not re-entrant and SQLite serializes.
        self._worker = trio.CapacityLimiter(1)

    async def _in_worker(self, key: int | None, fn: Callable[..., _T], *args: object) -> _T:
        async with self._turns.turn(key):
            return await trio.to_thread.run_sync(fn, *args, limiter=self._worker)

    async def in_worker(self, key: int, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(*args)`` in the worker thread, in the turn of ``key`` (a uid, or a
        negative number for work done for nobody known yet, such as checking a signature):
        for a transport's own reads and writes of the store."""
        return await self._in_worker(key, fn, *args)

    # --- calls -----------------------------------------------------------------------

    def admit(self, peer: Caller) -> Admitted:
        """Let ``peer``'s next request be decoded.

        A peer not trusted for on-behalf-of calls makes every call for itself (or is
        refused), so its limits are checked here, before its request is even decoded.
        A trusted peer's calls are checked by :meth:`call`, for the user each is for.

        Raises:
            ThrottlingException: the call is over the limits of the peer's uid.
        """
        if peer.uid not in self._trusted:
            self._check_limits(peer.uid, peer.gid)
        return Admitted(peer)

    async def call(self, admitted: Admitted, request: Request) -> Mapping[str, Any]:
        """Run ``request`` for the user it is made for, in that uid's turn of the worker.

        Returns:
            The handler's result.

        Raises:
            AccessDeniedException: on behalf of another user, from a peer not trusted for
                that (counted as a failed call of the peer, and told to ``on_refused``).
            ThrottlingException: a trusted peer's call over the limits of its user.
            KMSError: the handler's (a failed call of the user, unless internal).
            Exception: anything else the handler raised, for the transport to answer.
        """
        peer = admitted.peer
        trusted_peer = peer.uid in self._trusted
        uid, gid, via = peer.uid, peer.gid, None
        on_behalf_of = request.on_behalf_of
        if on_behalf_of is not None and on_behalf_of[0] != peer.uid:
            if not trusted_peer:
                await self._refuse_untrusted(peer, request.operation, on_behalf_of[0])
            (uid, gid), via = on_behalf_of, self._trusted[peer.uid]
        if trusted_peer:
            self._check_limits(uid, gid)

        def run() -> Mapping[str, Any]:
            called = peer
            if via is not None:  # on behalf of a user: their groups from the databases
                called = Caller.from_ids(uid, gid, via=via, via_uid=peer.uid)
            return self._handler(called, request.operation, request.params)

        try:
            return await self._in_worker(uid, run)
        except KMSError as exc:
            if not isinstance(exc, KMSInternalException):
                self._limiter.call_failed(uid, gid)
            raise

    def _check_limits(self, uid: int, gid: int) -> None:
        """Raise the refusal of a call of ``uid`` over its limits (ThrottlingException)."""
        refusal, first = self._limiter.admit_call(uid, gid)
        if refusal is None:
            return
        if first:
            logger.warning("throttling calls of uid %d: %s", uid, refusal.message)
        raise refusal

    async def _refuse_untrusted(self, peer: Caller, operation: str, asked_uid: int) -> NoReturn:
        logger.warning(
            "%s asked to call %s on behalf of uid %d but is not trusted for that",
            peer.describe(),
            operation,
            asked_uid,
        )
        refusal = AccessDeniedException(
            f"user {peer.describe()} is not trusted to call on behalf of other users"
            f" (asked for uid {asked_uid})"
        )
        self._limiter.call_failed(peer.uid, peer.gid)
        if self._on_refused is not None:
            try:
                await self._in_worker(peer.uid, self._on_refused, peer, operation, refusal)
            except Exception:
                logger.exception("recording a refused call failed")
        raise refusal

    # --- maintenance -----------------------------------------------------------------

    async def run_periodic(self, periodic: Callable[[], object], interval: float) -> None:
        while True:
            try:
                await self._in_worker(None, periodic)
            except Exception:
                logger.exception("periodic key maintenance failed")
            await trio.sleep(interval)

    async def run_summaries(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            await self.report_throttled()

    async def report_throttled(self) -> None:
        """Log, and tell ``on_throttled``, what was refused per uid since the last report."""
        summaries = self._limiter.take_summaries()
        for summary in summaries:
            logger.info(
                "uid %d: %d calls and %d connections refused for its limits in the last %.0f s",
                summary.uid,
                summary.calls,
                summary.connections,
                summary.last - summary.first,
            )
        if not summaries or self._on_throttled is None:
            return
        try:
            await self._in_worker(None, self._record_throttled, summaries)
        except Exception:
            logger.exception("recording throttled calls failed")

    def _record_throttled(self, summaries: list[ThrottleSummary]) -> None:
        assert self._on_throttled is not None
        for s in summaries:
            caller = Caller.from_ids(s.uid, s.gid)
            self._on_throttled(caller, s.calls, s.connections, s.first, s.last)


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
