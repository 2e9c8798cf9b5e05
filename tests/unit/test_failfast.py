"""Failing fast while a key service is unreachable: the delays and their reset."""

from __future__ import annotations

import pytest

from envfs.errors import KMSUnavailableException
from envfs.keys import failfast
from envfs.keys.failfast import FailFast


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(failfast.time, "monotonic", fake)
    return fake


def test_after_a_failure_calls_fail_at_once_until_the_delay_passes(clock: Clock) -> None:
    state = FailFast("/run/envfs/kms.sock", max_backoff=0.5)
    state.check()  # nothing failed yet
    error = KMSUnavailableException("connection refused")
    assert state.failed(error) is error
    with pytest.raises(KMSUnavailableException, match=r"'/run/envfs/kms.sock'.*next try in 0.1 s"):
        state.check()
    clock.now += 0.1
    state.check()  # the next try goes through


def test_delays_double_up_to_the_bound_and_an_answer_resets_them(clock: Clock) -> None:
    state = FailFast("x", max_backoff=0.5)
    delays = []
    for _ in range(5):
        state.failed(KMSUnavailableException("down"))
        start = clock.now
        while True:
            try:
                state.check()
                break
            except KMSUnavailableException:
                clock.now += 0.01
        delays.append(round(clock.now - start, 2))
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5], abs=0.015)
    state.succeeded()
    state.failed(KMSUnavailableException("down again"))
    with pytest.raises(KMSUnavailableException, match=r"next try in 0\.1 s"):
        state.check()
