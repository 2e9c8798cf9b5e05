"""The undo journal: a change cut short by the daemon's death never costs fsynced data.

The death is simulated exactly as the kernel leaves it after ``kill -9``: the change runs in
a forked child whose ``pwrite`` of the data writes only a prefix of its bytes, up to a page
boundary of the file, and the child then exits at once (no undo runs, every completed
system call stays). The parent then opens the backing file afresh, as the next mount does.
Every death point of each change is tried: before each of its system calls, and at every
page boundary inside each of its writes.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envfs.errors import IntegrityError
from envfs.files import cryptfile, fileformat
from envfs.files.backing import O_PATH
from envfs.files.cryptfile import CryptFile, read_header
from envfs.files.fileformat import FileHeader, FileKeys
from envfs.files.inodes import ROOT_INODE
from envfs.files.journal import JOURNAL_DIR, RECORD_MAGIC, Journal, Record
from envfs.files.vfs import Vfs
from tests.unit.fakekeys import ROOT

SHIFT = fileformat.DEFAULT_BLOCK_SHIFT
B = 1 << SHIFT
PAGE = 4096
DATA_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ARN = "arn:envfs:kms:local-1:111122223333:key/x"


class Folder:
    """A backing folder with its journal, as a mount holds them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_fd = os.open(root, O_PATH | os.O_DIRECTORY)
        self.journal = Journal(self.root_fd, os.fsencode(root))
        self.files: list[CryptFile] = []

    def create(self, name: str = "f", data_key: bytes = DATA_KEY) -> CryptFile:
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        header = FileHeader.new(ARN, b"w" * 97, SHIFT)
        keys = FileKeys.derive(data_key, header.file_id)
        f = CryptFile.create(fd, header, keys, self.journal.for_file(header.file_id, b"f"))
        self.files.append(f)
        return f

    def open(
        self, name: str = "f", *, journal: bool = True, data_key: bytes = DATA_KEY
    ) -> CryptFile:
        fd = os.open(self.root / name, os.O_RDWR)
        try:
            header, raw = read_header(fd, extra=fileformat.BLOCK_OVERHEAD)
            keys = FileKeys.derive(data_key, header.file_id)
            fj = self.journal.for_file(header.file_id, name.encode()) if journal else None
            f = CryptFile.open(fd, header, raw, keys, fj)
        except BaseException:
            os.close(fd)
            raise
        self.files.append(f)
        return f

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.journal.close()
        os.close(self.root_fd)


@pytest.fixture
def folders(tmp_path: Path) -> Iterator[Callable[[Path], Folder]]:
    """Open backing folders, each closed at the end (with its open files)."""
    opened: list[Folder] = []

    def make(root: Path) -> Folder:
        root.mkdir(exist_ok=True)
        folder = Folder(root)
        opened.append(folder)
        return folder

    yield make
    for folder in opened:
        folder.close()


def content(f: CryptFile) -> bytes:
    return f.read(0, f.size + 1)


def file_id_of(root: Path) -> str:
    """The file id of ``root/f``, as its record is named."""
    return FileHeader.parse((root / "f").read_bytes()).file_id.hex()


def record_path(root: Path, f: CryptFile) -> Path:
    return root / JOURNAL_DIR / f.header.file_id.hex()


def read_all(root: Path, *, journal: bool) -> bytes:
    folder = Folder(root)
    try:
        return content(folder.open(journal=journal))
    finally:
        folder.close()


# --- dying in the middle of a change -------------------------------------------------------

Change = Callable[[CryptFile], object]


def events_of(root: Path, change: Change) -> tuple[list[tuple[int, int]], bytes]:
    """The system calls that change the file's bytes or size, in order: ``(offset,
    length)`` of each write, ``(size, -1)`` of each truncation; and the content after the
    change (made in a scratch copy)."""
    scratch = root.with_name(root.name + "-scratch")
    shutil.copytree(root, scratch)
    events: list[tuple[int, int]] = []
    real_pwrite, real_ftruncate = cryptfile._pwrite_all, os.ftruncate
    folder = Folder(scratch)
    f = folder.open()
    try:

        def pwrite(fd: int, data: bytes, offset: int) -> None:
            events.append((offset, len(data)))
            real_pwrite(fd, data, offset)

        def ftruncate(fd: int, size: int) -> None:
            events.append((size, -1))
            real_ftruncate(fd, size)

        cryptfile._pwrite_all = pwrite  # type: ignore[assignment]
        os.ftruncate = ftruncate
        change(f)
    finally:
        cryptfile._pwrite_all, os.ftruncate = real_pwrite, real_ftruncate
    try:
        return events, content(f)
    finally:
        folder.close()
        shutil.rmtree(scratch)


def death_points(events: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """``(event, bytes written of it)``: before each call, and at each page boundary of the
    file inside each write."""
    for number, (offset, length) in enumerate(events):
        yield number, 0
        for boundary in range((offset // PAGE + 1) * PAGE, offset + length, PAGE):
            yield number, boundary - offset


def die_during(root: Path, change: Change, death: int, written: int) -> None:
    """Open ``root/f`` in a child process and make ``change``; the child dies at system
    call ``death``, after writing ``written`` of its bytes."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 4
        try:
            calls = [0]
            real_pwrite, real_ftruncate = cryptfile._pwrite_all, os.ftruncate

            def pwrite(fd: int, data: bytes, offset: int) -> None:
                if calls[0] == death:
                    view = memoryview(data)[:written]
                    while view:
                        view = view[os.pwrite(fd, view, offset + written - len(view)) :]
                    os._exit(0)  # killed: nothing after this runs
                calls[0] += 1
                real_pwrite(fd, data, offset)

            def ftruncate(fd: int, size: int) -> None:
                if calls[0] == death:
                    os._exit(0)
                calls[0] += 1
                real_ftruncate(fd, size)

            folder = Folder(root)
            f = folder.open()
            cryptfile._pwrite_all = pwrite  # type: ignore[assignment]
            os.ftruncate = ftruncate
            change(f)
            code = 3  # the change completed: the death point was never reached
        except BaseException:
            code = 5
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child did not die where it was told"


def between(got: bytes, before: bytes, after: bytes) -> bool:
    """Whether every byte of ``got`` is the one before or after the change (or a zero of a
    gap it made), and its length one of theirs or between: a change cut short between two
    of its system calls may leave such a file, every fsynced byte in place."""
    if not min(len(before), len(after)) <= len(got) <= max(len(before), len(after)):
        return False
    old = before[: len(got)].ljust(len(got), b"\0")
    new = after[: len(got)].ljust(len(got), b"\0")
    for at in range(0, len(got), PAGE):
        part = slice(at, at + PAGE)
        if got[part] not in (old[part], new[part]) and not all(
            g in (o, n) for g, o, n in zip(got[part], old[part], new[part], strict=True)
        ):
            return False
    return True


def base_file(root: Path, size: int, *, sparse: bool = False) -> bytes:
    """``root/f``: ``size`` random bytes (after a hole of 3 MiB if ``sparse``), fsynced
    and closed; returns its content."""
    root.mkdir()
    folder = Folder(root)
    try:
        f = folder.create()
        if sparse:
            f.truncate(3 << 20)
        f.write(f.size, random.Random(size).randbytes(size))
        os.fsync(f.fd)
        f.synced()
        return content(f)
    finally:
        folder.close()


CHANGES: dict[str, Change] = {
    "append into the final block": lambda f: f.write(f.size, b"a" * 500),
    "append across blocks": lambda f: f.write(f.size, b"a" * (2 * B + 300)),
    "overwrite a page in the middle": lambda f: f.write(B + 8192, b"o" * 4096),
    "overwrite across blocks": lambda f: f.write(5000, b"o" * (2 * B)),
    "overwrite whole blocks": lambda f: f.write(B, b"o" * (2 * B)),
    "overwrite across the end": lambda f: f.write(f.size - 100, b"o" * (B + 50)),
    "truncate into a block": lambda f: f.truncate(B + 77),
    "truncate to a block boundary": lambda f: f.truncate(2 * B),
    "truncate to zero": lambda f: f.truncate(0),
    "truncate up": lambda f: f.truncate(f.size + 5000),
    "write past the end": lambda f: f.write(f.size + 3000, b"p" * 200),
    "grow by holes (the header gains FLAG_SPARSE)": lambda f: f.truncate(f.size + (3 << 20)),
    "write far past the end": lambda f: f.write(f.size + (2 << 20), b"p" * 100),
    "reserve": lambda f: f.reserve(f.size + 20000),
}


@pytest.mark.parametrize(
    "size", [3 * B + 10000, 3 * B], ids=["partial final block", "empty final block"]
)
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_cut_anywhere_leaves_the_fsynced_file(
    tmp_path: Path, change: str, size: int
) -> None:
    """Every death point of the change: the next open gives the file as it was, and
    without the journal at least one of them would have lost fsynced bytes to EIO."""
    base = tmp_path / "base"
    before = base_file(base, size)
    events, after = events_of(base, CHANGES[change])
    torn = cut = 0
    for number, (death, written) in enumerate(death_points(events)):
        cut += written > 0
        work = tmp_path / f"cut{number}"
        shutil.copytree(base, work)
        die_during(work, CHANGES[change], death, written)
        try:
            plain: bytes | None = read_all(work, journal=False)
        except IntegrityError:
            plain = None
        got = read_all(work, journal=True)
        if plain is None:  # torn: put back as it was
            torn += 1
            assert got == before, (death, written)
        else:  # whole: left as it is (cut between two system calls of the change)
            assert got == plain and between(got, before, after), (death, written)
        assert read_all(work, journal=False) == got  # repaired on disk, not only served
        assert os.listdir(work / JOURNAL_DIR) == []
        shutil.rmtree(work)
    assert events, "the change wrote nothing"
    # A write within one page cannot be cut; any other lost fsynced bytes without the journal.
    assert torn >= 1 or not cut, "no death point tore the file: a missing journal would pass"


def test_a_change_in_a_file_with_holes_cut_anywhere_leaves_the_fsynced_file(tmp_path: Path) -> None:
    """Filling a hole and overwriting next to one: holes are put back as holes."""
    base = tmp_path / "base"
    before = base_file(base, 2 * B + 10, sparse=True)
    for change in (
        lambda f: f.write(B + 100, b"h" * (2 * B)),  # into the hole
        lambda f: f.write((3 << 20) - 50, b"h" * 200),  # the hole's end and the data
    ):
        torn = 0
        events, after = events_of(base, change)
        for number, (death, written) in enumerate(death_points(events)):
            work = tmp_path / f"cut{number}"
            shutil.copytree(base, work)
            die_during(work, change, death, written)
            try:
                read_all(work, journal=False)
            except IntegrityError:
                torn += 1
                assert read_all(work, journal=True) == before
            else:
                assert between(read_all(work, journal=True), before, after)
            shutil.rmtree(work)
        assert torn >= 1


def test_a_recovery_is_logged_with_the_backing_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = tmp_path / "base"
    before = base_file(base, 3 * B + 1000)
    change = CHANGES["overwrite across blocks"]
    die_during(base, change, 0, PAGE * 3 - 512)  # the run starts at 512: 3 pages in
    with pytest.raises(IntegrityError):
        read_all(base, journal=False)
    caplog.set_level(logging.WARNING)
    assert read_all(base, journal=True) == before
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("backing file b'f': recovered an interrupted write") for m in warnings)
    assert all(before[:16].hex() not in m for m in warnings)  # no plaintext in messages


# --- records that must not be applied ------------------------------------------------------


def torn_with_record(tmp_path: Path) -> tuple[Path, bytes, Path]:
    """A file torn by a death in the middle of an overwrite, with its record: (folder,
    content before, record)."""
    root = tmp_path / "torn"
    before = base_file(root, 3 * B + 1000)
    die_during(root, CHANGES["overwrite across blocks"], 0, PAGE * 2 - 512)
    (record,) = (root / JOURNAL_DIR).iterdir()
    return root, before, record


def test_a_record_over_a_good_file_changes_nothing(tmp_path: Path) -> None:
    """A change that completed leaves a record if the daemon dies before the file is
    closed: it must not roll the file back, even when it authenticates."""
    root = tmp_path / "good"
    base_file(root, 3 * B + 1000)
    folder = Folder(root)
    f = folder.open()
    f.write(5000, b"n" * (2 * B))  # completed
    after = content(f)
    record = record_path(root, f)
    assert Record.parse(record.read_bytes()).runs  # a valid record of the old bytes
    saved = record.read_bytes()
    folder.files.clear()  # the daemon dies: the file is not released, its record stays
    os.close(f.fd)
    folder.close()
    backing = (root / "f").read_bytes()
    assert read_all(root, journal=True) == after
    assert (root / "f").read_bytes() == backing
    assert not record.exists()  # a stale record goes
    # Also when it is planted afresh, or cut short by a death while it was written.
    for planted in (saved, saved[: PAGE + 100]):
        record.write_bytes(planted)
        assert read_all(root, journal=True) == after
        assert (root / "f").read_bytes() == backing


def test_a_tampered_record_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, _, record = torn_with_record(tmp_path)
    raw = bytearray(record.read_bytes())
    raw[-100] ^= 1  # in a saved block
    record.write_bytes(raw)
    backing = (root / "f").read_bytes()
    with pytest.raises(IntegrityError):
        read_all(root, journal=True)
    assert (root / "f").read_bytes() == backing  # nothing written
    assert any("does not repair it: ignored" in r.getMessage() for r in caplog.records)


def test_a_record_cut_short_is_ignored(tmp_path: Path) -> None:
    root, _, record = torn_with_record(tmp_path)
    record.write_bytes(record.read_bytes()[:-1])
    with pytest.raises(IntegrityError):
        read_all(root, journal=True)


def test_a_record_of_another_file_is_ignored(tmp_path: Path) -> None:
    """A record of another file put under this file's name, as it is or claiming this
    file's id: its blocks do not open under this file's keys and id."""
    root, _, record = torn_with_record(tmp_path)
    other = tmp_path / "other"
    base_file(other, 3 * B + 1000)
    folder = Folder(other)
    g = folder.open()
    g.write(5000, b"x" * (2 * B))
    theirs = record_path(other, g).read_bytes()
    folder.close()
    ours = Record.parse(record.read_bytes())
    claimed = Record.parse(theirs)
    claimed = Record(ours.file_id, SHIFT, claimed.old_backing, claimed.header, claimed.runs)
    backing = (root / "f").read_bytes()
    for planted in (theirs, b"".join(claimed.encode())):
        record.write_bytes(planted)
        with pytest.raises(IntegrityError):
            read_all(root, journal=True)
        assert (root / "f").read_bytes() == backing


def test_a_record_whose_blocks_moved_is_ignored(tmp_path: Path) -> None:
    """This file's own blocks, at another index than theirs: the index is authenticated."""
    root, _, record = torn_with_record(tmp_path)
    ours = Record.parse(record.read_bytes())
    ((first, run),) = ours.runs
    moved = Record(ours.file_id, SHIFT, ours.old_backing, None, ((first + 1, run[: 2 * (B + 28)]),))
    record.write_bytes(b"".join(moved.encode()))
    with pytest.raises(IntegrityError):
        read_all(root, journal=True)


def test_malformed_records_are_ignored(tmp_path: Path) -> None:
    """Garbage, absurd indices and sizes, a FIFO or a folder in a record's place: over a
    torn file they change nothing (it gives EIO); over a good file they go."""
    root, _, record = torn_with_record(tmp_path)
    ours = Record.parse(record.read_bytes())
    ((first, run),) = ours.runs
    plants: list[bytes | str] = [
        b"",
        b"garbage" * 10,
        record.read_bytes()[:40],
        b"".join(Record(ours.file_id, SHIFT, ours.old_backing, None, ((2**64 - 1, run),)).encode()),
        b"".join(Record(ours.file_id, SHIFT, 2**63, None, ((first, run),)).encode()),
        b"".join(Record(ours.file_id, SHIFT, 2**63, None, ((2**64 - 1, run),)).encode()),
        b"".join(Record(ours.file_id, 12, ours.old_backing, None, ((first, run),)).encode()),
        "fifo",
        "folder",
    ]
    backing = (root / "f").read_bytes()
    for plant in plants:
        record.unlink(missing_ok=True)
        if record.is_dir():
            record.rmdir()
        if plant == "fifo":
            os.mkfifo(record)
        elif plant == "folder":
            record.mkdir()
        else:
            assert isinstance(plant, bytes)
            record.write_bytes(plant)
        with pytest.raises(IntegrityError):
            read_all(root, journal=True)
        assert (root / "f").read_bytes() == backing, plant
    good = tmp_path / "good"
    base_file(good, 100)
    (good / JOURNAL_DIR).mkdir()
    (good / JOURNAL_DIR / file_id_of(good)).write_bytes(b"garbage")
    assert read_all(good, journal=True) == random.Random(100).randbytes(100)
    assert os.listdir(good / JOURNAL_DIR) == []


def test_a_planted_record_rolls_a_damaged_file_back_at_most(tmp_path: Path) -> None:
    """What an attacker who may write the backing folder gains with a record: a record of
    an older version of this very file, over a file they damaged where it applies, rolls
    the file back to that version, as putting back an older copy of the file would."""
    root = tmp_path / "f"
    older = base_file(root, 3 * B + 1000)
    folder = Folder(root)
    f = folder.open()
    f.write(5000, b"n" * (2 * B))
    saved = record_path(root, f).read_bytes()
    os.fsync(f.fd)
    f.synced()
    folder.close()
    assert not (root / JOURNAL_DIR / Record.parse(saved).file_id.hex()).exists()
    with open(root / "f", "r+b") as backing:
        backing.seek(fileformat.block_offset(1, SHIFT) + 100)
        backing.write(b"\xff")  # damage inside what the record holds
    (root / JOURNAL_DIR / Record.parse(saved).file_id.hex()).write_bytes(saved)
    folder = Folder(root)  # a new mount finds the record
    try:
        assert content(folder.open()) == older
    finally:
        folder.close()


def test_a_record_found_while_the_file_is_open_read_only_is_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon may not write the file: the record cannot be applied, the file gives
    EIO, and the record stays for a mount that can."""
    root, before, record = torn_with_record(tmp_path)
    folder = Folder(root)
    fd = os.open(root / "f", os.O_RDONLY)
    try:
        header, raw = read_header(fd, extra=fileformat.BLOCK_OVERHEAD)
        keys = FileKeys.derive(DATA_KEY, header.file_id)
        with pytest.raises(IntegrityError):
            f = CryptFile.open(fd, header, raw, keys, folder.journal.for_file(header.file_id, b"f"))
            content(f)
    finally:
        os.close(fd)
        folder.close()
    assert record.exists()
    assert "could not be put back" in caplog.text
    assert read_all(root, journal=True) == before


# --- when records are written, and when they go --------------------------------------------


def test_a_new_file_has_no_record_until_it_is_fsynced(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    try:
        f = folder.create()
        f.write(0, b"x" * (3 * B))
        f.write(100, b"y" * 5000)
        f.truncate(B + 1)
        f.write(f.size, b"z" * 10)
        assert not (tmp_path / JOURNAL_DIR).exists()  # untar and cp pay nothing
        os.fsync(f.fd)
        f.synced()
        f.write(f.size, b"after the fsync")
        record = record_path(tmp_path, f)
        assert Record.parse(record.read_bytes()).old_backing == fileformat.backing_size(
            B + 11, SHIFT
        )
        f.close()
        folder.files.remove(f)
        assert not record.exists()  # closed: every change completed
        mode = os.stat(tmp_path / JOURNAL_DIR).st_mode
        assert stat.S_IMODE(mode) & 0o077 == 0
    finally:
        folder.close()


def test_an_opened_file_is_journaled_and_its_record_goes_at_close(tmp_path: Path) -> None:
    root = tmp_path / "r"
    base_file(root, B + 5)
    folder = Folder(root)
    try:
        f = folder.open()
        f.write(7, b"in place")
        record = record_path(root, f)
        parsed = Record.parse(record.read_bytes())
        assert parsed.runs[0][0] == 0 and parsed.header is None
        assert len(parsed.runs[0][1]) == B + 28  # the one block the overwrite rewrites
        f.truncate(f.size + (3 << 20))  # the header gains FLAG_SPARSE: saved too
        assert Record.parse(record.read_bytes()).header is not None
        os.fsync(f.fd)
        f.synced()  # what the record would undo is promised now: voided
        assert record.read_bytes()[: len(RECORD_MAGIC)] == bytes(len(RECORD_MAGIC))
        f.truncate(0)
        f.write(0, b"rewritten")  # after a truncation to zero: nothing promised is left
        assert record.read_bytes()[: len(RECORD_MAGIC)] == bytes(len(RECORD_MAGIC))
    finally:
        folder.close()
    assert not record.exists()


def test_a_change_that_fails_and_is_undone_removes_its_record_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "r"
    before = base_file(root, 2 * B)
    folder = Folder(root)
    f = folder.open()
    real = cryptfile._pwrite_all

    def full(fd: int, data: bytes, offset: int) -> None:
        os.pwrite(fd, data[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cryptfile, "_pwrite_all", full)
    with pytest.raises(OSError):
        f.write(100, b"o" * B)  # in place: journaled, so undone too
    monkeypatch.setattr(cryptfile, "_pwrite_all", real)
    assert content(f) == before
    record = record_path(root, f)
    folder.close()
    assert not record.exists()


def test_a_change_whose_undo_fails_keeps_its_record_for_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "r"
    before = base_file(root, 2 * B)
    folder = Folder(root)
    f = folder.open()

    def broken(fd: int, data: bytes, offset: int) -> None:
        os.pwrite(fd, data[: PAGE * 2], offset)
        raise OSError(errno.EIO, "Input/output error")

    def unrestorable(fd: int, saved: bytes, at: int, block_shift: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cryptfile, "_pwrite_all", broken)
    monkeypatch.setattr(cryptfile, "restore_blocks", unrestorable)
    with pytest.raises(OSError):
        f.write(100, b"o" * B)
    monkeypatch.undo()
    with pytest.raises(IntegrityError):
        content(f)
    record = record_path(root, f)
    f.close()
    folder.files.remove(f)
    assert record.exists()
    assert content(folder.open()) == before  # the same mount's next open repairs it
    folder.close()


def test_records_left_by_a_crash_are_found_by_the_next_mount_only_for_their_files(
    tmp_path: Path,
) -> None:
    """Stale records of files that are gone stay (nothing can tell them apart cheaply);
    names that are not file ids are left alone."""
    (tmp_path / JOURNAL_DIR).mkdir()
    (tmp_path / JOURNAL_DIR / ("ab" * 16)).write_bytes(b"stale")
    (tmp_path / JOURNAL_DIR / "notes.txt").write_text("not a record")
    folder = Folder(tmp_path)
    try:
        assert folder.journal.leftovers == {bytes.fromhex("ab" * 16)}
    finally:
        folder.close()


def test_the_journal_is_never_reached_through_a_symlink(tmp_path: Path) -> None:
    """A symlink planted as ``.envfs-journal`` is not followed: changes fail (ELOOP) rather
    than write records anywhere else."""
    root = tmp_path / "r"
    base_file(root, 100)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / JOURNAL_DIR).symlink_to(elsewhere)
    folder = Folder(root)
    try:
        f = folder.open()
        with pytest.raises(OSError) as info:
            f.write(0, b"x")
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
        assert content(f) == random.Random(100).randbytes(100)
    finally:
        folder.close()
    assert os.listdir(elsewhere) == []


# --- through the plaintext view ------------------------------------------------------------


def test_the_journal_is_hidden_from_the_view_and_used_by_it(vfs: Vfs) -> None:
    fh, _ = vfs.create(ROOT_INODE, b"db", 0o644, os.O_RDWR, ROOT)
    vfs.write(fh, 0, b"x" * (2 * B))
    journal = vfs.root_path + b"/" + JOURNAL_DIR.encode()
    assert not os.path.exists(journal)  # a new file: nothing journaled before its fsync
    vfs.fsync(fh, False)
    vfs.write(fh, 100, b"y" * 4096)
    assert len(os.listdir(journal)) == 1
    name = JOURNAL_DIR.encode()
    for call in (
        lambda: vfs.lookup(ROOT_INODE, name),
        lambda: vfs.create(ROOT_INODE, name, 0o644, os.O_RDWR, ROOT),
        lambda: vfs.mkdir(ROOT_INODE, name, 0o755, ROOT),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.ENOENT
    listing = [entry[0] for entry in vfs.readdir(vfs.opendir(ROOT_INODE), 0)]
    assert listing == [b"db"]
    vfs.release(fh)
    assert os.listdir(journal) == []


def test_a_long_journaled_write_is_made_in_parts_whose_records_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No record is longer than what recovery reads: a long write is journaled in parts."""
    monkeypatch.setattr(cryptfile, "JOURNALED_WRITE_MAX", 3 * B)
    root = tmp_path / "r"
    base_file(root, 10 * B)
    folder = Folder(root)
    try:
        f = folder.open()
        f.write(100, b"L" * (8 * B))  # parts at 100, 100 + 3B, 100 + 6B
        ((first, run),) = Record.parse(record_path(root, f).read_bytes()).runs
        assert (first, len(run)) == (6, 3 * (B + 28))  # the last part's blocks: 6 to 8
        assert content(f)[100 : 100 + 8 * B] == b"L" * (8 * B)
    finally:
        folder.close()
