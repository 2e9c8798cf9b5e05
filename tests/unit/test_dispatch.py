"""The daemon's dispatch without a transport: trust, per-uid call limits, the worker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from envfs.errors import AccessDeniedException, KMSError, NotFoundException, ThrottlingException
from envfs.identity import Caller
from envfs.kms.dispatch import Dispatcher, Request
from envfs.kms.limits import Limits, Rate, UidLimiter

PEER = Caller(61001, 61001, frozenset({61001}))
MOUNT = Caller(61000, 61000, frozenset({61000}))  # trusted to call on behalf of others
USER = (61002, 61002)


class Handler:
    """Answers with whom it was called for; fails as NotFoundException if asked to."""

    def __init__(self) -> None:
        self.called: list[Caller] = []

    def __call__(self, caller: Caller, operation: str, params: dict[str, Any]) -> Mapping[str, Any]:
        self.called.append(caller)
        if params.get("Fail"):
            raise NotFoundException("no such key")
        return {"Operation": operation, "Uid": caller.uid, "Via": caller.via}


def dispatcher(
    handler: Handler,
    limits: Limits | None = None,
    refused: list[tuple[Caller, str, KMSError]] | None = None,
) -> Dispatcher:
    def on_refused(caller: Caller, operation: str, error: KMSError) -> None:
        assert refused is not None
        refused.append((caller, operation, error))

    return Dispatcher(
        handler,
        limiter=UidLimiter(limits or Limits()),
        trusted_services={MOUNT.uid: "envfs-mount"},
        on_refused=on_refused if refused is not None else None,
        on_throttled=None,
    )


async def test_a_plain_call_runs_for_the_peer() -> None:
    handler = Handler()
    dispatch = dispatcher(handler)
    result = await dispatch.call(dispatch.admit(PEER), Request("DescribeKey", {}))
    assert result == {"Operation": "DescribeKey", "Uid": PEER.uid, "Via": None}
    assert handler.called == [PEER]


async def test_a_trusted_peer_calls_for_the_user_as_via() -> None:
    handler = Handler()
    dispatch = dispatcher(handler)
    request = Request("Decrypt", {}, on_behalf_of=USER)
    result = await dispatch.call(dispatch.admit(MOUNT), request)
    assert result == {"Operation": "Decrypt", "Uid": USER[0], "Via": "envfs-mount"}
    [called] = handler.called
    assert (called.uid, called.gid, called.via_uid) == (*USER, MOUNT.uid)


async def test_an_untrusted_peer_is_refused_and_the_refusal_recorded() -> None:
    handler = Handler()
    refused: list[tuple[Caller, str, KMSError]] = []
    dispatch = dispatcher(handler, refused=refused)
    request = Request("Decrypt", {}, on_behalf_of=USER)
    message = (
        r"^user uid 61001 is not trusted to call on behalf of other users \(asked for uid"
        r" 61002\)$"
    )
    with pytest.raises(AccessDeniedException, match=message):
        await dispatch.call(dispatch.admit(PEER), request)
    assert handler.called == []
    [(caller, operation, error)] = refused
    assert (caller, operation, type(error)) == (PEER, "Decrypt", AccessDeniedException)


async def test_on_behalf_of_itself_is_a_plain_call() -> None:
    handler = Handler()
    dispatch = dispatcher(handler)
    request = Request("Decrypt", {}, on_behalf_of=(PEER.uid, PEER.gid))
    await dispatch.call(dispatch.admit(PEER), request)
    assert handler.called == [PEER]


async def test_an_untrusted_peer_is_throttled_before_its_request_is_decoded() -> None:
    dispatch = dispatcher(Handler(), Limits(call_rate=Rate(0.001, 1)))
    dispatch.admit(PEER)
    with pytest.raises(ThrottlingException, match=r"^too many calls from uid 61001 "):
        dispatch.admit(PEER)


async def test_a_trusted_peer_is_throttled_for_the_user_it_calls_for() -> None:
    handler = Handler()
    dispatch = dispatcher(handler, Limits(call_rate=Rate(0.001, 1)))
    request = Request("Decrypt", {}, on_behalf_of=USER)
    await dispatch.call(dispatch.admit(MOUNT), request)
    with pytest.raises(ThrottlingException, match=r"^too many calls from uid 61002 "):
        await dispatch.call(dispatch.admit(MOUNT), request)
    await dispatch.call(dispatch.admit(MOUNT), Request("Decrypt", {}))  # for itself: fine
    assert len(handler.called) == 2


async def test_a_failed_call_counts_against_its_user() -> None:
    dispatch = dispatcher(Handler(), Limits(failure_rate=Rate(0.001, 1)))
    with pytest.raises(NotFoundException):
        await dispatch.call(dispatch.admit(PEER), Request("Decrypt", {"Fail": True}))
    with pytest.raises(ThrottlingException, match=r"^too many failed calls from uid 61001 "):
        dispatch.admit(PEER)
