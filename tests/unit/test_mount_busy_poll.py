"""envfs.files.mount hands --busy-poll to pyfuse3, or says plainly why it cannot."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyfuse3
import pytest

from envfs.files import mount

NO_EFFECT = ", and --busy-poll has no effect (install pyfuse3 with scripts/build_pyfuse3.py)"


@pytest.fixture
def restore_busy_poll() -> Iterator[None]:
    before = pyfuse3._envfs_get_busy_poll()  # type: ignore[attr-defined]
    yield
    pyfuse3._envfs_set_busy_poll(before)  # type: ignore[attr-defined]


@pytest.mark.parametrize("microseconds", [0, 40, 10_000])
def test_value_reaches_pyfuse3(
    microseconds: int, restore_busy_poll: object, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="envfs.files.mount"):
        mount._set_busy_poll(microseconds)
    assert pyfuse3._envfs_get_busy_poll() == microseconds / 1e6  # type: ignore[attr-defined]
    assert caplog.messages == [f"busy poll: {microseconds} µs after each answer"]


def test_stock_pyfuse3_says_what_it_lacks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(pyfuse3, "_envfs_set_busy_poll")
    monkeypatch.delattr(pyfuse3, "_envfs_fast_path")
    with caplog.at_level(logging.INFO, logger="envfs.files.mount"):
        mount._set_busy_poll(50)
    assert caplog.messages == [
        "this pyfuse3 lacks envfs's faster request loop: each request costs more" + NO_EFFECT
    ]


def test_older_envfs_build_says_its_time_is_fixed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(pyfuse3, "_envfs_set_busy_poll")
    monkeypatch.setattr(pyfuse3, "_envfs_fast_path", 1)
    with caplog.at_level(logging.INFO, logger="envfs.files.mount"):
        mount._set_busy_poll(50)
    assert caplog.messages == ["this pyfuse3 polls for requests a fixed time" + NO_EFFECT]
