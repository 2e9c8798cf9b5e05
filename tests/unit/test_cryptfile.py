"""CryptFile: plaintext I/O over the block format, checked against a bytearray model."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs import cryptfile, format
from envfs.cryptfile import CryptFile, read_header
from envfs.errors import IntegrityError
from envfs.format import FileHeader, FileKeys

SHIFT = 12  # 4 KiB blocks keep the model test small
DATA_KEY = bytes(range(32))


@pytest.fixture
def cfile(tmp_path: Path) -> Iterator[CryptFile]:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    header = FileHeader.new("arn:envfs:kms:local-1:111122223333:key/x", b"w" * 97, SHIFT)
    keys = FileKeys.derive(DATA_KEY, header.file_id)
    f = CryptFile.create(fd, header, keys)
    yield f
    f.close()


def reopen(f: CryptFile) -> CryptFile:
    header, raw = read_header(f.fd)
    return CryptFile.open(f.fd, header, raw, FileKeys.derive(DATA_KEY, header.file_id))


def test_new_file_is_empty_with_a_header(cfile: CryptFile) -> None:
    assert cfile.size == 0
    assert os.fstat(cfile.fd).st_size == format.MIN_BACKING_SIZE
    assert reopen(cfile).size == 0
    assert cfile.read(0, 100) == b""


def test_random_operations_match_a_model(cfile: CryptFile) -> None:
    rng = random.Random(1234)
    model = bytearray()
    block = 1 << SHIFT
    for _ in range(400):
        op = rng.random()
        if op < 0.6:
            offset = rng.choice([0, len(model), rng.randrange(0, len(model) + 2 * block + 1)])
            size = rng.choice([1, block - 1, block, block + 1, rng.randrange(1, 3 * block)])
            data = rng.randbytes(size)
            cfile.write(offset, data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + size] = data
        elif op < 0.8:
            new_size = rng.choice([0, len(model) // 2, len(model) + rng.randrange(0, 2 * block)])
            cfile.truncate(new_size)
            if new_size < len(model):
                del model[new_size:]
            else:
                model.extend(bytes(new_size - len(model)))
        else:
            offset = rng.randrange(0, len(model) + 10)
            length = rng.randrange(0, 3 * block)
            assert cfile.read(offset, length) == bytes(model[offset : offset + length])
        assert cfile.size == len(model)
        assert os.fstat(cfile.fd).st_size == format.backing_size(len(model), SHIFT)
    again = reopen(cfile)
    assert again.size == len(model)
    assert again.read(0, len(model) + 1) == bytes(model)


def test_write_past_the_end_reads_zeros(cfile: CryptFile) -> None:
    cfile.write(3 * (1 << SHIFT) + 5, b"xyz")
    assert cfile.read(0, 1 << 20) == bytes(3 * (1 << SHIFT) + 5) + b"xyz"


def test_tampered_block_gives_integrity_error(cfile: CryptFile) -> None:
    cfile.write(0, b"a" * 10000)
    offset = format.block_offset(1, SHIFT) + 40
    byte = os.pread(cfile.fd, 1, offset)
    os.pwrite(cfile.fd, bytes([byte[0] ^ 1]), offset)
    assert cfile.read(0, 100) == b"a" * 100  # block 0 is fine
    with pytest.raises(IntegrityError, match=r"^block 1 failed authentication$"):
        cfile.read(5000, 10)
    with pytest.raises(IntegrityError):
        cfile.write(5000, b"b")  # merging with a bad block refuses too


def test_cut_at_a_block_boundary_is_refused_at_open(cfile: CryptFile) -> None:
    cfile.write(0, b"a" * 10000)
    os.ftruncate(cfile.fd, format.block_offset(2, SHIFT))
    with pytest.raises(IntegrityError, match="impossible backing size"):
        reopen(cfile)


def test_sequential_reads_ask_the_kernel_ahead_now_and_then(
    cfile: CryptFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ask costs a system call: one per half read-ahead stretch, not one per read; a
    read that goes back before the stretch asks again at once."""
    cfile.write(0, bytes(8 << 20))
    asks: list[int] = []
    monkeypatch.setattr(
        "envfs.cryptfile.os.posix_fadvise",
        lambda fd, offset, length, advice: asks.append(offset),
    )
    chunk = 128 << 10
    for offset in range(0, 4 << 20, chunk):  # 32 reads of 4 MiB in order
        assert cfile.read(offset, chunk) == bytes(chunk)
    assert 4 <= len(asks) <= 10
    asks.clear()
    cfile.read(0, chunk)  # back to the start: a new sequence
    cfile.read(chunk, chunk)
    assert len(asks) == 1 and asks[0] < 1 << 20


# --- _pread: waiting for the disk without sleeping ---------------------------------------


@pytest.fixture
def data_fd(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = random.Random(7).randbytes(256 << 10)
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


class FakeDisk:
    """``os.preadv`` that answers EAGAIN ``busy`` times, then ``chunk`` bytes at a time."""

    def __init__(self, busy: int, chunk: int | None = None) -> None:
        self.busy, self.chunk, self.calls = busy, chunk, 0
        self.real = os.preadv

    def __call__(
        self, fd: int, buffers: tuple[bytearray | memoryview], offset: int, flags: int
    ) -> int:
        assert flags == os.RWF_NOWAIT
        self.calls += 1
        if self.busy > 0:
            self.busy -= 1
            raise BlockingIOError
        (buf,) = buffers
        view = memoryview(buf)
        if self.chunk is not None:
            view = view[: self.chunk]
        return self.real(fd, (view,), offset, flags)


def test_pread_matches_pread_from_the_page_cache_and_from_the_disk(
    data_fd: tuple[int, bytes],
) -> None:
    fd, data = data_fd
    assert cryptfile._pread(fd, 20000, 5000) == data[5000:25000]
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # gone from the page cache (if clean)
    assert cryptfile._pread(fd, 70000, 100000) == data[100000:170000]
    assert cryptfile._pread(fd, 4096, len(data) - 100) == data[-100:]  # short at the end
    assert cryptfile._pread(fd, 4096, len(data) + 1) == b""


def test_pread_polls_a_busy_disk_after_starting_the_read(
    data_fd: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, data = data_fd
    disk = FakeDisk(busy=3, chunk=1000)
    advice: list[tuple[int, int, int]] = []
    monkeypatch.setattr("envfs.cryptfile.os.preadv", disk)
    monkeypatch.setattr(
        "envfs.cryptfile.os.posix_fadvise", lambda fd, o, n, a: advice.append((o, n, a))
    )
    assert cryptfile._pread(fd, 2500, 10) == data[10:2510]
    # EAGAIN three times (the read is started once), then 1000 + 1000 + 500 bytes.
    assert disk.calls == 6
    assert advice == [(10, 2500, os.POSIX_FADV_WILLNEED)]


def test_pread_sleeps_in_pread_once_the_spin_time_is_over(
    data_fd: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, data = data_fd
    disk = FakeDisk(busy=10**9, chunk=None)
    monkeypatch.setattr("envfs.cryptfile.os.preadv", disk)
    monkeypatch.setattr("envfs.cryptfile.SPIN_NS", 2_000_000)
    assert cryptfile._pread(fd, 3000, 7) == data[7:3007]
    assert disk.calls >= 2  # polled until the deadline, then pread


def test_pread_falls_back_for_good_where_rwf_nowait_is_refused(
    data_fd: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, data = data_fd
    calls: list[int] = []

    def refusing(*args: object) -> int:
        calls.append(1)
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr("envfs.cryptfile.os.preadv", refusing)
    monkeypatch.setattr("envfs.cryptfile._nowait_works", True)
    assert cryptfile._pread(fd, 100, 0) == data[:100]
    assert cryptfile._pread(fd, 100, 100) == data[100:200]
    assert len(calls) == 1
    assert cryptfile._nowait_works is False


def test_pread_passes_other_errors_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr("envfs.cryptfile.os.preadv", failing)
    monkeypatch.setattr("envfs.cryptfile._nowait_works", True)
    with pytest.raises(OSError) as info:
        cryptfile._pread(0, 10, 0)
    assert info.value.errno == errno.EIO


def test_read_header_asks_for_the_file_s_start_unless_told_not_to(
    cfile: CryptFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    asks: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        "envfs.cryptfile.os.posix_fadvise", lambda fd, o, n, a: asks.append((o, n, a))
    )
    assert read_header(cfile.fd)[0] == cfile.header
    assert asks == [(0, (128 << 10) + 8192, os.POSIX_FADV_WILLNEED)]
    asks.clear()
    assert read_header(cfile.fd, read_ahead=False)[0] == cfile.header
    assert asks == []
