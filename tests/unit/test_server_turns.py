"""The daemon's worker is taken in turns by uid: round-robin over uids, in order within one."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from envfs.kms.dispatch import _Turns


async def take(turns: _Turns, key: int | None, name: str, order: list[str]) -> None:
    async with turns.turn(key):
        order.append(name)
        await trio.sleep(0)  # hold the turn across a checkpoint, as a worker thread does


async def queue_up(
    nursery: trio.Nursery, turns: _Turns, calls: list[tuple[int, str]], order: list[str]
) -> None:
    for key, name in calls:
        nursery.start_soon(take, turns, key, name, order)
        await trio.testing.wait_all_tasks_blocked()  # queued in this order


async def test_a_uid_with_many_calls_waiting_delays_another_by_one_call() -> None:
    turns = _Turns()
    order: list[str] = []
    async with trio.open_nursery() as nursery, turns.turn(1000):
        await queue_up(
            nursery,
            turns,
            [
                (1000, "a1"),
                (1000, "a2"),
                (1000, "a3"),
                (1001, "b1"),
                (1000, "a4"),
                (1002, "c1"),
            ],
            order,
        )
    # First come first served would be a1 a2 a3 b1 a4 c1.
    assert order == ["a1", "b1", "c1", "a2", "a3", "a4"]


async def test_a_free_worker_is_taken_at_once_and_released() -> None:
    turns = _Turns()
    order: list[str] = []
    await take(turns, 1000, "first", order)
    await take(turns, 1001, "second", order)
    assert order == ["first", "second"]
    assert not turns._busy and not turns._waiting


async def test_a_cancelled_waiter_leaves_its_place() -> None:
    turns = _Turns()
    order: list[str] = []
    scope = trio.CancelScope()

    async def cancelled_waiter() -> None:
        with scope:
            await take(turns, 1002, "c1", order)

    async with trio.open_nursery() as nursery, turns.turn(1000):
        await queue_up(nursery, turns, [(1001, "b1")], order)
        nursery.start_soon(cancelled_waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert set(turns._waiting) == {1001, 1002}
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert set(turns._waiting) == {1001}
    assert order == ["b1"]
    assert not turns._busy and not turns._waiting


async def test_a_waiter_cancelled_as_its_turn_comes_passes_it_on() -> None:
    turns = _Turns()
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def doomed() -> None:
            with scope:
                await take(turns, 1001, "b1", order)

        async with turns.turn(1000):
            nursery.start_soon(doomed)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(take, turns, 1002, "c1", order)
            await trio.testing.wait_all_tasks_blocked()
            # Cancelled, and then handed the turn (below) before it ran again.
            scope.cancel()
        with trio.fail_after(5):  # a turn lost with the cancelled waiter: c1 waits forever
            await trio.testing.wait_all_tasks_blocked()
            while order != ["c1"]:
                await trio.sleep(0.01)
    assert order == ["c1"]
    assert not turns._busy and not turns._waiting


async def test_an_error_inside_a_turn_releases_it() -> None:
    turns = _Turns()
    with pytest.raises(RuntimeError, match=r"^boom$"):
        async with turns.turn(1000):
            raise RuntimeError("boom")
    assert not turns._busy
