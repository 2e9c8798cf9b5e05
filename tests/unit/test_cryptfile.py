"""CryptFile: plaintext I/O over the block format, checked against a bytearray model."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envfs.errors import IntegrityError
from envfs.files import cryptfile, fileformat
from envfs.files.cryptfile import CryptFile, read_header
from envfs.files.fileformat import FileHeader, FileKeys

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
    assert os.fstat(cfile.fd).st_size == fileformat.MIN_BACKING_SIZE
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
        assert os.fstat(cfile.fd).st_size == fileformat.backing_size(len(model), SHIFT)
    again = reopen(cfile)
    assert again.size == len(model)
    assert again.read(0, len(model) + 1) == bytes(model)


def test_write_past_the_end_reads_zeros(cfile: CryptFile) -> None:
    cfile.write(3 * (1 << SHIFT) + 5, b"xyz")
    assert cfile.read(0, 1 << 20) == bytes(3 * (1 << SHIFT) + 5) + b"xyz"


def test_tampered_block_gives_integrity_error(cfile: CryptFile) -> None:
    cfile.write(0, b"a" * 10000)
    offset = fileformat.block_offset(1, SHIFT) + 40
    byte = os.pread(cfile.fd, 1, offset)
    os.pwrite(cfile.fd, bytes([byte[0] ^ 1]), offset)
    assert cfile.read(0, 100) == b"a" * 100  # block 0 is fine
    with pytest.raises(IntegrityError, match=r"^block 1 failed authentication$"):
        cfile.read(5000, 10)
    with pytest.raises(IntegrityError):
        cfile.write(5000, b"b")  # merging with a bad block refuses too


def test_cut_at_a_block_boundary_is_refused_at_open(cfile: CryptFile) -> None:
    cfile.write(0, b"a" * 10000)
    os.ftruncate(cfile.fd, fileformat.block_offset(2, SHIFT))
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
        "envfs.files.cryptfile.os.posix_fadvise",
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
    monkeypatch.setattr("envfs.files.cryptfile.os.preadv", disk)
    monkeypatch.setattr(
        "envfs.files.cryptfile.os.posix_fadvise", lambda fd, o, n, a: advice.append((o, n, a))
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
    monkeypatch.setattr("envfs.files.cryptfile.os.preadv", disk)
    monkeypatch.setattr("envfs.files.cryptfile.SPIN_NS", 2_000_000)
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

    monkeypatch.setattr("envfs.files.cryptfile.os.preadv", refusing)
    monkeypatch.setattr("envfs.files.cryptfile._nowait_works", True)
    assert cryptfile._pread(fd, 100, 0) == data[:100]
    assert cryptfile._pread(fd, 100, 100) == data[100:200]
    assert len(calls) == 1
    assert cryptfile._nowait_works is False


def test_pread_passes_other_errors_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr("envfs.files.cryptfile.os.preadv", failing)
    monkeypatch.setattr("envfs.files.cryptfile._nowait_works", True)
    with pytest.raises(OSError) as info:
        cryptfile._pread(0, 10, 0)
    assert info.value.errno == errno.EIO


def test_read_header_asks_for_the_file_s_start_unless_told_not_to(
    cfile: CryptFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    asks: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        "envfs.files.cryptfile.os.posix_fadvise", lambda fd, o, n, a: asks.append((o, n, a))
    )
    assert read_header(cfile.fd)[0] == cfile.header
    assert asks == [(0, (128 << 10) + 8192, os.POSIX_FADV_WILLNEED)]
    asks.clear()
    assert read_header(cfile.fd, read_ahead=False)[0] == cfile.header
    assert asks == []


# --- the final block is authenticated at open --------------------------------------------


def whole_blocks(cfile: CryptFile, count: int) -> bytes:
    """Fill ``cfile`` with ``count`` whole blocks: it ends in an empty final block."""
    data = whole_blocks_data(count)
    cfile.write(0, data)
    assert os.fstat(cfile.fd).st_size == fileformat.block_offset(count, SHIFT) + 28
    return data


@pytest.mark.parametrize(
    "attack",
    ["flip the empty block's tag", "replace the empty block", "cut into the last whole block"],
)
def test_a_forged_end_is_refused_before_anything_is_served(cfile: CryptFile, attack: str) -> None:
    whole_blocks(cfile, 3)
    end = fileformat.block_offset(3, SHIFT)
    if attack == "flip the empty block's tag":
        byte = os.pread(cfile.fd, 1, end + 20)
        os.pwrite(cfile.fd, bytes([byte[0] ^ 0x80]), end + 20)
    elif attack == "replace the empty block":
        os.pwrite(cfile.fd, random.Random(1).randbytes(28), end)
    else:  # 512 + 2 * (B + 28) + 28: looks like two whole blocks and an empty one
        os.ftruncate(cfile.fd, fileformat.block_offset(2, SHIFT) + 28)
    size = reopen(cfile).size
    block = 1 << SHIFT
    uses: list[Callable[[CryptFile], object]] = [
        lambda f: f.read(0, 10),  # the first block only: the end is checked first
        lambda f: f.read(0, size),  # up to the end: this read checks it
        lambda f: f.read(size, 10),  # past the end: "nothing there" is not served either
        lambda f: f.write(0, b"x"),
        lambda f: f.write(size, b"appended"),  # would make the cut the writer's
        lambda f: f.truncate(size + block),
        lambda f: f.reserve(size + 3 * block),
    ]
    for use in uses:
        with pytest.raises(IntegrityError, match=r"^block \d failed authentication$"):
            use(reopen(cfile))
    before = os.pread(cfile.fd, 1 << 20, 0)
    shorter = reopen(cfile)
    shorter.truncate(5)  # cutting keeps nothing of the forged end: allowed
    assert shorter.read(0, 10) == whole_blocks_data(3)[:5]
    os.pwrite(cfile.fd, before, 0)


def whole_blocks_data(count: int) -> bytes:
    return random.Random(count).randbytes(count << SHIFT)


def test_an_empty_file_whose_only_block_is_forged_is_refused(cfile: CryptFile) -> None:
    cfile.write(0, b"x" * 100)
    os.ftruncate(cfile.fd, fileformat.MIN_BACKING_SIZE)  # 540 bytes: the size of an empty file
    with pytest.raises(IntegrityError, match=r"^block 0 failed authentication$"):
        reopen(cfile)


def test_the_end_costs_no_extra_read_when_the_read_covers_it(
    cfile: CryptFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfile.write(0, b"x" * 1000)
    header, raw = read_header(cfile.fd, extra=28)
    keys = FileKeys.derive(DATA_KEY, header.file_id)
    opened = CryptFile.open(cfile.fd, header, raw, keys)
    reads: list[int] = []
    real = cryptfile._pread
    monkeypatch.setattr(
        "envfs.files.cryptfile._pread", lambda fd, n, at: reads.append(at) or real(fd, n, at)
    )
    assert opened.read(0, 4096) == b"x" * 1000
    assert opened.read(10, 10) == b"x" * 10
    assert reads == [fileformat.HEADER_SIZE, fileformat.HEADER_SIZE]  # no separate read of the end


# --- holes ----------------------------------------------------------------------------------


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_a_large_gap_becomes_holes_that_read_as_zeros(cfile: CryptFile) -> None:
    cfile.write(0, b"head")
    size = 64 << 20  # 64 MiB
    cfile.truncate(size)
    assert cfile.size == size
    assert os.fstat(cfile.fd).st_size == fileformat.backing_size(size, SHIFT)
    assert allocated(cfile.fd) < 1 << 20  # nothing was written in between
    assert cfile.header.sparse
    again = reopen(cfile)
    assert again.header.sparse
    assert again.read(0, 8) == b"head" + bytes(4)
    assert again.read(size // 2, 3 << SHIFT) == bytes(3 << SHIFT)
    assert again.read(size - 10, 100) == bytes(10)
    cfile.write(size // 2, b"middle")  # writing into a hole fills that block only
    assert reopen(cfile).read(size // 2 - 2, 10) == bytes(2) + b"middle" + bytes(2)


def test_a_small_gap_is_sealed_and_the_file_has_no_holes(cfile: CryptFile) -> None:
    cfile.write(0, b"head")
    cfile.truncate(cryptfile.SPARSE_GAP)
    assert not cfile.header.sparse
    zero = bytes(fileformat.block_stride(SHIFT))
    os.pwrite(cfile.fd, zero, fileformat.block_offset(1, SHIFT))  # zeroing a block is caught
    with pytest.raises(IntegrityError, match=r"^block 1 failed authentication$"):
        reopen(cfile).read(1 << SHIFT, 10)


def test_in_a_sparse_file_only_whole_zero_blocks_are_holes(cfile: CryptFile) -> None:
    size = 8 << 20
    cfile.write(size, b"tail")  # a write far past the end makes holes too
    assert cfile.header.sparse and cfile.read(size, 10) == b"tail"
    at = fileformat.block_offset(3, SHIFT)
    os.pwrite(cfile.fd, b"\1", at + 100)  # a hole with one byte set is a damaged block
    with pytest.raises(IntegrityError, match=r"^block 3 failed authentication$"):
        reopen(cfile).read(3 << SHIFT, 1)
    os.pwrite(cfile.fd, b"\0", at + 100)
    # The final block is never a hole: zeroing it fails before anything is served.
    end = os.fstat(cfile.fd).st_size
    final = fileformat.block_offset(size >> SHIFT, SHIFT)
    os.pwrite(cfile.fd, bytes(end - final), final)
    with pytest.raises(IntegrityError, match=r"failed authentication$"):
        reopen(cfile).read(0, 5)


def test_random_operations_with_holes_match_a_model(
    cfile: CryptFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = 1 << SHIFT
    monkeypatch.setattr(cryptfile, "SPARSE_GAP", 2 * block)  # holes from 2 blocks of gap on
    rng = random.Random(99)
    model = bytearray()
    for _ in range(300):
        op = rng.random()
        if op < 0.5:
            offset = rng.choice([len(model), rng.randrange(0, len(model) + 12 * block)])
            data = rng.randbytes(rng.choice([1, block, rng.randrange(1, 3 * block)]))
            cfile.write(offset, data)
            model.extend(bytes(max(0, offset - len(model))))
            model[offset : offset + len(data)] = data
        elif op < 0.75:
            new_size = rng.choice([0, len(model) // 3, len(model) + rng.randrange(0, 12 * block)])
            cfile.truncate(new_size)
            del model[new_size:]
            model.extend(bytes(new_size - len(model)))
        else:
            offset = rng.randrange(0, len(model) + 10)
            length = rng.randrange(0, 4 * block)
            assert cfile.read(offset, length) == bytes(model[offset : offset + length])
        assert cfile.size == len(model)
    assert cfile.header.sparse
    again = reopen(cfile)
    assert again.read(0, len(model) + 1) == bytes(model)


# --- changes that cannot complete leave the file as it was ---------------------------------


def test_a_size_past_the_largest_backing_file_is_efbig_at_once(cfile: CryptFile) -> None:
    cfile.write(0, b"data")
    before = os.pread(cfile.fd, 1 << 16, 0)
    for change in (
        lambda: cfile.truncate((1 << 63) - 1),
        lambda: cfile.write((1 << 63) - 10, b"x"),
        lambda: cfile.reserve(1 << 63),
    ):
        with pytest.raises(OSError) as info:
            change()
        assert info.value.errno == errno.EFBIG
    assert os.pread(cfile.fd, 1 << 16, 0) == before and cfile.size == 4


class FailingWrites:
    """``_pwrite_all`` whose call number ``failing`` writes ``part`` of its bytes and then
    fails with ENOSPC, as a full disk would in the middle of a write. Later calls (the
    undoing, which only overwrites bytes that were there) work."""

    def __init__(self, failing: int, part: float) -> None:
        self.failing, self.part, self.calls = failing, part, 0
        self.real = cryptfile._pwrite_all

    def __call__(self, fd: int, data: bytes, offset: int) -> None:
        self.calls += 1
        if self.calls - 1 == self.failing:
            os.pwrite(fd, data[: int(len(data) * self.part)], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(fd, data, offset)


CHANGES: dict[str, Callable[[CryptFile, int], None]] = {
    "append": lambda f, b: f.write(f.size, b"y" * (3 * b)),
    "write past the end": lambda f, b: f.write(f.size + b, b"y" * 10),
    "write across the end": lambda f, b: f.write(b - 7, b"y" * (3 * b)),
    "grow by holes": lambda f, b: f.truncate(50 * b),
    "write far past the end": lambda f, b: f.write(60 * b + 1, b"y" * b),
    "truncate down": lambda f, b: f.truncate(b + 5),
    "fill a hole": lambda f, b: f.write(10 * b + 3, b"y" * (2 * b)),
}


@pytest.mark.parametrize("part", [0.0, 0.5])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_failed_change_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, part: float
) -> None:
    """Every write the change makes fails in turn (in a fresh file each time); each time
    the file is left exactly as it was, bytes and size."""
    block = 1 << SHIFT
    monkeypatch.setattr(cryptfile, "SPARSE_GAP", 2 * block)
    failures = 0
    for failing in range(10):
        path = tmp_path / f"f{failing}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        header = FileHeader.new("arn:envfs:kms:local-1:111122223333:key/x", b"w" * 97, SHIFT)
        f = CryptFile.create(fd, header, FileKeys.derive(DATA_KEY, header.file_id))
        try:
            f.write(0, random.Random(5).randbytes(2 * block + 100))
            if change == "fill a hole":
                f.truncate(20 * block)
            before, size = os.pread(fd, 1 << 20, 0), f.size
            writes = FailingWrites(failing, part)
            monkeypatch.setattr(cryptfile, "_pwrite_all", writes)
            try:
                CHANGES[change](f, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            else:
                assert writes.calls <= failing
                break  # every write of this change has failed once
            finally:
                monkeypatch.setattr(cryptfile, "_pwrite_all", writes.real)
            failures += 1
            assert (os.pread(fd, 1 << 20, 0), f.size) == (before, size), f"write {failing}"
            assert reopen(f).read(0, size) == f.read(0, size)
        finally:
            f.close()
    assert failures >= 1


def test_reserve_fails_fast_without_the_space(
    cfile: CryptFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfile.write(0, b"data")
    before = os.pread(cfile.fd, 1 << 16, 0)
    real = os.fstatvfs(cfile.fd)

    class Full:
        f_bavail, f_frsize = 10, real.f_frsize

    monkeypatch.setattr("envfs.files.cryptfile.os.fstatvfs", lambda fd: Full)
    with pytest.raises(OSError) as info:
        cfile.reserve(1 << 20)
    assert info.value.errno == errno.ENOSPC
    assert os.pread(cfile.fd, 1 << 16, 0) == before and cfile.size == 4
    monkeypatch.undo()
    cfile.reserve(1 << 20)
    assert cfile.size == 1 << 20 and reopen(cfile).read(0, 6) == b"data\0\0"
