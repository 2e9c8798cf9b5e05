"""DataKeyCache: per-user entries, maximum age, maximum size, off at 0."""

from __future__ import annotations

import pytest

from envfs.files.keycache import DataKeyCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_are_per_user_and_expire() -> None:
    clock = Clock()
    cache = DataKeyCache(30, clock=clock)
    cache.put(1000, 1000, b"f" * 16, b"wrapped", b"k" * 32)
    assert cache.get(1000, 1000, b"f" * 16, b"wrapped") == b"k" * 32
    assert cache.get(1001, 1000, b"f" * 16, b"wrapped") is None  # another user
    assert cache.get(1000, 1001, b"f" * 16, b"wrapped") is None  # another group
    assert cache.get(1000, 1000, b"g" * 16, b"wrapped") is None  # another file
    assert cache.get(1000, 1000, b"f" * 16, b"rewrapped") is None  # another wrapped key
    clock.now += 29.9
    assert cache.get(1000, 1000, b"f" * 16, b"wrapped") == b"k" * 32
    clock.now += 0.1
    assert cache.get(1000, 1000, b"f" * 16, b"wrapped") is None
    assert len(cache) == 0


def test_least_recently_used_entries_go_first() -> None:
    cache = DataKeyCache(30, max_entries=2, clock=Clock())
    cache.put(1, 1, b"a", b"w", b"ka")
    cache.put(1, 1, b"b", b"w", b"kb")
    assert cache.get(1, 1, b"a", b"w") == b"ka"  # a is now the most recent
    cache.put(1, 1, b"c", b"w", b"kc")
    assert cache.get(1, 1, b"b", b"w") is None
    assert cache.get(1, 1, b"a", b"w") == b"ka"
    assert cache.get(1, 1, b"c", b"w") == b"kc"


def test_expired_entries_are_swept_out() -> None:
    """An expired key is not kept until the cache fills up: a lookup or an insertion at
    least ``max_age`` after the last sweep drops every expired entry."""
    clock = Clock()
    cache = DataKeyCache(30, clock=clock)
    cache.put(1, 1, b"a", b"w", b"ka")
    clock.now += 31
    cache.put(2, 2, b"b", b"w", b"kb")
    assert len(cache) == 1 and cache.get(2, 2, b"b", b"w") == b"kb"
    clock.now += 61
    assert cache.get(3, 3, b"c", b"w") is None
    assert len(cache) == 0


def test_zero_max_age_caches_nothing() -> None:
    cache = DataKeyCache(0)
    cache.put(1, 1, b"a", b"w", b"ka")
    assert cache.get(1, 1, b"a", b"w") is None
    assert len(cache) == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DataKeyCache(-1)
    with pytest.raises(ValueError):
        DataKeyCache(1, max_entries=0)
