"""Per-uid limits of the key-service daemon (``envfs.kms.limits``), on an injected clock."""

from __future__ import annotations

import pytest

from envfs.errors import KMSError, LimitExceededException, ThrottlingException
from envfs.kms.limits import Limits, Rate, UidLimiter

ALICE, BOB = 1000, 1001


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.wall = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


def limiter(clock: Clock, **limits: object) -> UidLimiter:
    unlimited: dict[str, object] = {
        "connection_rate": None,
        "call_rate": None,
        "failure_rate": None,
    }
    return UidLimiter(
        Limits(**{**unlimited, **limits}),  # type: ignore[arg-type]
        clock=lambda: clock.now,
        wall_clock=lambda: clock.wall,
    )


def throttled(outcome: tuple[KMSError | None, bool], *, first: bool) -> str:
    """The message of a ThrottlingException refusal, checking whether it came first."""
    error, came_first = outcome
    assert isinstance(error, ThrottlingException)
    assert came_first is first
    return error.message


# --- Rate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10", Rate(10, 20)),
        ("10:50", Rate(10, 50)),
        ("0.2", Rate(0.2, 1)),
        ("2.5:1", Rate(2.5, 1)),
        ("off", None),
    ],
)
def test_rate_parses(text: str, expected: Rate | None) -> None:
    assert Rate.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["", "0", "-1", "x", "10:", "10:0", "10:0.5", "nan", "1:nan", "inf", "1:inf", "Off"]
)
def test_rate_refuses_what_is_not_a_rate(text: str) -> None:
    with pytest.raises(ValueError, match=r"^'.*' is not RATE\[:BURST\] \(a rate above 0"):
        Rate.parse(text)


def test_rate_prints_as_it_parses() -> None:
    assert str(Rate(100, 200)) == "100:200"
    assert Rate.parse(str(Rate(0.5, 3))) == Rate(0.5, 3)


def test_defaults() -> None:
    limits = Limits()
    assert limits.max_connections_per_uid == 128
    assert limits.connection_rate == Rate(100, 200)
    assert limits.call_rate == Rate(2000, 4000)
    assert limits.failure_rate == Rate(10, 100)


# --- connections ---------------------------------------------------------------------------


def test_connections_at_once_are_capped_per_uid() -> None:
    clock = Clock()
    lim = limiter(clock, max_connections_per_uid=2)
    assert lim.admit_connection(ALICE, 100) == (None, False)
    assert lim.admit_connection(ALICE, 100) == (None, False)
    error, first = lim.admit_connection(ALICE, 100)
    assert isinstance(error, LimitExceededException)
    assert error.message == "too many connections from uid 1000 (at most 2 at once)"
    assert first
    assert lim.admit_connection(BOB, 100) == (None, False)  # another uid is not concerned
    lim.connection_closed(ALICE)
    assert lim.admit_connection(ALICE, 100) == (None, False)


def test_new_connections_are_rate_limited_per_uid() -> None:
    clock = Clock()
    lim = limiter(clock, connection_rate=Rate(2, 3))
    for _ in range(3):
        assert lim.admit_connection(ALICE, 100)[0] is None
        lim.connection_closed(ALICE)
    assert throttled(lim.admit_connection(ALICE, 100), first=True) == (
        "too many new connections from uid 1000 (at most 2 a second, 3 at once);"
        " reduce the frequency of your calls"
    )
    throttled(lim.admit_connection(ALICE, 100), first=False)  # logged once per summary
    assert lim.admit_connection(BOB, 100)[0] is None
    clock.advance(0.5)  # one token back
    assert lim.admit_connection(ALICE, 100)[0] is None
    assert isinstance(lim.admit_connection(ALICE, 100)[0], ThrottlingException)


# --- calls ---------------------------------------------------------------------------------


def test_calls_are_rate_limited_per_uid() -> None:
    clock = Clock()
    lim = limiter(clock, call_rate=Rate(8, 2))
    assert lim.admit_call(ALICE, 100) == (None, False)
    assert lim.admit_call(ALICE, 100) == (None, False)
    assert throttled(lim.admit_call(ALICE, 100), first=True) == (
        "too many calls from uid 1000 (at most 8 a second, 2 at once);"
        " reduce the frequency of your calls"
    )
    assert lim.admit_call(BOB, 100) == (None, False)
    clock.advance(0.125)  # one token back (a binary fraction: no rounding)
    assert lim.admit_call(ALICE, 100) == (None, False)


def test_a_uid_that_keeps_failing_is_refused_every_call_until_its_bucket_refills() -> None:
    clock = Clock()
    lim = limiter(clock, failure_rate=Rate(0.5, 3))
    for _ in range(3):
        assert lim.admit_call(ALICE, 100)[0] is None
        lim.call_failed(ALICE, 100)
    # Calls that would succeed are refused too: the uid is slowed down as a whole.
    error, _ = lim.admit_call(ALICE, 100)
    assert isinstance(error, ThrottlingException)
    assert error.message == (
        "too many failed calls from uid 1000 (at most 0.5 a second, 3 at once): its calls"
        " are refused for 2.0 s; reduce the frequency of your calls"
    )
    assert lim.admit_call(BOB, 100)[0] is None
    clock.advance(2.0)
    assert lim.admit_call(ALICE, 100)[0] is None  # succeeding calls take no failure token
    assert lim.admit_call(ALICE, 100)[0] is None
    lim.call_failed(ALICE, 100)
    assert isinstance(lim.admit_call(ALICE, 100)[0], ThrottlingException)


def test_no_limits_refuse_nothing() -> None:
    clock = Clock()
    lim = limiter(clock, max_connections_per_uid=10**6)
    for _ in range(10000):
        assert lim.admit_connection(ALICE, 100)[0] is None
        assert lim.admit_call(ALICE, 100)[0] is None
        lim.call_failed(ALICE, 100)
    assert lim.take_summaries() == []


# --- summaries -----------------------------------------------------------------------------


def test_summaries_count_refusals_per_uid_and_start_afresh() -> None:
    clock = Clock()
    lim = limiter(clock, connection_rate=Rate(1, 1), call_rate=Rate(1, 1))
    assert lim.admit_connection(ALICE, 100)[0] is None
    assert lim.admit_call(ALICE, 100)[0] is None
    start = clock.wall
    for _ in range(3):
        clock.advance(0.01)
        assert lim.admit_call(ALICE, 100)[0] is not None
    clock.advance(0.01)
    assert lim.admit_connection(ALICE, 100)[0] is not None
    [summary] = lim.take_summaries()
    assert (summary.uid, summary.gid, summary.calls, summary.connections) == (ALICE, 100, 3, 1)
    assert (summary.first, summary.last) == (
        pytest.approx(start + 0.01),
        pytest.approx(start + 0.04),
    )
    assert lim.take_summaries() == []
    clock.advance(0.5)
    error, first = lim.admit_call(ALICE, 100)
    assert error is not None and first  # a new summary period: worth a log line again


def test_idle_uids_are_forgotten() -> None:
    clock = Clock()
    lim = limiter(clock, call_rate=Rate(1, 1), failure_rate=Rate(1, 1))
    assert lim.admit_connection(ALICE, 100)[0] is None
    assert lim.admit_call(BOB, 100)[0] is None
    lim.call_failed(BOB, 100)
    lim.take_summaries()
    assert set(lim._uids) == {ALICE, BOB}  # ALICE is connected, BOB's buckets are not full
    clock.advance(1.0)
    lim.take_summaries()
    assert set(lim._uids) == {ALICE}
    lim.connection_closed(ALICE)
    lim.take_summaries()
    assert lim._uids == {}
