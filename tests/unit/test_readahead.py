"""Read-ahead across the files of a folder: when it asks the kernel for which files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from envfs.files import readahead
from envfs.files.readahead import FolderReadAhead
from envfs.files.tree import open_regular


class Ahead:
    """A FolderReadAhead driven by folder paths, as the filesystem drives it by inode and
    directory descriptor."""

    def __init__(self, **kwargs: int) -> None:
        self.ahead = FolderReadAhead(lambda d, n: open_regular(d, n, os.O_RDONLY), **kwargs)
        self.fds: dict[bytes, int] = {}

    def opened(self, folder: bytes, name: bytes) -> bool:
        if folder not in self.fds:
            self.fds[folder] = os.open(folder, os.O_PATH | os.O_DIRECTORY)
        return self.ahead.opened(list(self.fds).index(folder), name, self.fds[folder])


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files the read-ahead asked the kernel for, in order."""
    names: list[str] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        assert (offset, length, advice) == (0, readahead.BYTES_AHEAD, os.POSIX_FADV_WILLNEED)
        names.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd, offset, length, advice)

    monkeypatch.setattr(readahead.os, "posix_fadvise", record)
    return names


@pytest.fixture
def folder(tmp_path: Path) -> bytes:
    for i in range(20):
        (tmp_path / f"f{i:02d}").write_bytes(b"x" * 100)
    return os.fsencode(tmp_path)


def names(*numbers: int) -> list[str]:
    return [f"f{n:02d}" for n in numbers]


def test_one_open_asks_for_nothing(folder: bytes, asked: list[str]) -> None:
    Ahead(files_ahead=3).opened(folder, b"f00")
    assert asked == []


def test_opens_in_name_order_ask_for_the_next_files_once(folder: bytes, asked: list[str]) -> None:
    ahead = Ahead(files_ahead=3)
    assert ahead.opened(folder, b"f00") is False
    assert ahead.opened(folder, b"f01") is False  # not asked for: the caller asks
    assert asked == names(2, 3, 4)
    assert ahead.opened(folder, b"f02") is True  # asked for already
    assert asked == names(2, 3, 4, 5)  # only the one not asked for yet
    assert ahead.opened(folder, b"f04") is True  # one skipped still counts as in order
    assert asked == names(2, 3, 4, 5, 6, 7)
    assert ahead.opened(folder, b"f00") is False  # out of order


def test_opens_out_of_order_ask_for_nothing(folder: bytes, asked: list[str]) -> None:
    ahead = Ahead(files_ahead=3)
    for name in (b"f05", b"f01", b"f09", b"f03", b"f03"):
        ahead.opened(folder, name)
    assert asked == []


def test_the_end_of_the_folder_stops_it(folder: bytes, asked: list[str]) -> None:
    ahead = Ahead(files_ahead=5)
    ahead.opened(folder, b"f17")
    ahead.opened(folder, b"f18")
    assert asked == names(19)


def test_another_folder_starts_again(folder: bytes, tmp_path: Path, asked: list[str]) -> None:
    other = tmp_path / "sub"
    other.mkdir()
    (other / "g0").touch()
    (other / "g1").touch()
    ahead = Ahead(files_ahead=2)
    ahead.opened(folder, b"f00")
    ahead.opened(os.fsencode(other), b"g0")
    ahead.opened(folder, b"f01")  # f00 was opened before the other folder: no sequence yet
    assert asked == []
    ahead.opened(folder, b"f02")
    assert asked == names(3, 4)


def test_what_cannot_be_opened_is_skipped(folder: bytes, asked: list[str]) -> None:
    ahead = Ahead(files_ahead=2)
    ahead.opened(folder, b"f00")
    ahead.opened(folder, b"f01")  # the listing is made now
    os.unlink(os.path.join(folder, b"f04"))  # gone since
    os.unlink(os.path.join(folder, b"f05"))
    os.mkfifo(os.path.join(folder, b"f05"))  # refused without being opened
    ahead.opened(folder, b"f02")
    ahead.opened(folder, b"f03")
    assert asked == names(2, 3)  # f04 is gone, f05 no regular file


def test_a_vanished_folder_is_no_error(tmp_path: Path, asked: list[str]) -> None:
    ahead = Ahead()
    gone = os.fsencode(tmp_path / "gone")
    os.mkdir(gone)
    ahead.opened(gone, b"a")
    os.rmdir(gone)
    ahead.opened(gone, b"b")
    assert asked == []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_opened_ahead_are_handed_over_once_and_never_leak(
    folder: bytes, asked: list[str]
) -> None:
    before = open_fds()
    ahead = Ahead(files_ahead=3)
    ahead.opened(folder, b"f00")
    ahead.opened(folder, b"f01")  # asks for f02..f04 and keeps their descriptors
    fd = ahead.ahead.take(0, b"f02")
    assert fd is not None and os.readlink(f"/proc/self/fd/{fd}").endswith("/f02")
    os.close(fd)
    assert ahead.ahead.take(0, b"f02") is None  # handed over once
    assert ahead.ahead.take(1, b"f03") is None  # another folder: nothing
    for n in range(2, 15):
        ahead.opened(folder, b"f%02d" % n)
    assert open_fds() - len(ahead.fds) - before <= 4  # files_ahead + 1 at most
    other = os.path.join(folder, b"sub")
    os.mkdir(other)
    ahead.opened(other, b"x")  # another folder: the held ones are closed
    assert open_fds() - len(ahead.fds) == before
    ahead.ahead.close()
    for fd in ahead.fds.values():
        os.close(fd)
    assert open_fds() == before
