"""Interrupted writes: an undo journal, so that a crash of the mount daemon never makes
fsynced data unreadable (normative spec: ``docs/format.md``, *Interrupted writes*).

A change that rewrites bytes of a file that are already on disk (an overwrite, an append
into the final block, a truncation, a growth, the header gaining ``FLAG_SPARSE``) first
writes a *record* of those bytes as they are, and of the backing size, to
``.envfs-journal/<file id as 32 hex digits>`` at the backing root. If the daemon dies in
the middle of the change's ``pwrite``, what that call wrote stays, up to a page boundary:
one sealed block is torn, and it fails authentication with all its bytes, those fsynced
before included. When the file is next opened, its record puts back the old bytes and the
old size, and the file reads as it was before the change.

Record layout (all integers big-endian)::

    offset  size  field
         0     8  magic b"\\x89envjnl\\n"
         8     2  record version, u16 = 1
        10     1  the file's block shift s, u8
        11     1  zero
        12    16  file id
        28     8  the backing size before the change, u64
        36     8  record length L, u64: these 44 bytes and the entries (the record file may
                  be longer: the tail of an earlier, longer record)
        44     -  entries, up to L, each:
                    0  1  kind: 1 = the header (512 bytes at offset 0), 2 = a run of blocks
                    1  8  index of the run's first block (0 for the header), u64
                    9  8  length n, u64
                   17  n  the bytes, exactly as they were on disk

A record is only ever applied to a file that fails authentication where the record says it
was being changed (the header, the final block, or a block the record holds), and only if
every byte it puts back authenticates as this file's, at its place, and the file then
authenticates. Its blocks are sealed under the file's keys with the file id and their index
in the associated data, so a record written by someone else can at most roll a damaged file
back to an older version of itself.

Cost: nothing for a file this mount created until its first ``fsync`` (nothing in it was
promised to last), and nothing for reads. Otherwise one extra ``pwrite`` per change (the
old bytes of the blocks it rewrites: up to one block for an append), the record file opened
at a file's first change and removed when it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
from dataclasses import dataclass

from envfs.errors import IntegrityError
from envfs.files import fileformat
from envfs.files.backing import O_PATH, pwrite_all, reopen
from envfs.files.backing import punch_hole as _punch_hole
from envfs.files.fileformat import FileHeader, FileKeys

log = logging.getLogger(__name__)

JOURNAL_DIR = ".envfs-journal"
RECORD_MAGIC = b"\x89envjnl\n"
RECORD_VERSION = 1
KIND_HEADER = 1
KIND_BLOCKS = 2
# Longer record files are not read (a change rewrites at most what one write covers, and a
# FUSE write is 1 MiB at most; cryptfile cuts longer writes into parts well below this).
MAX_RECORD_SIZE = 64 << 20

_HEAD = struct.Struct(">8sHBB16sQQ")  # magic, version, shift, zero, file id, old size, length
_ENTRY = struct.Struct(">BQQ")  # kind, first block index, length
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Opening the journal fails like this where the daemon may not write the backing root: the
# changes then go on without records (a warning says so once).
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass(frozen=True, slots=True)
class Record:
    """What a record says: the old bytes of a change, to put back if it was interrupted.

    Attributes:
        runs: ``(first block index, sealed bytes)`` of each run of blocks.
    """

    file_id: bytes
    block_shift: int
    old_backing: int
    header: bytes | None
    runs: tuple[tuple[int, bytes], ...]

    def encode(self) -> list[bytes]:
        """The record's bytes, in parts for one ``pwritev``."""
        parts: list[bytes] = []
        if self.header is not None:
            parts += (_ENTRY.pack(KIND_HEADER, 0, len(self.header)), self.header)
        for first, sealed in self.runs:
            parts += (_ENTRY.pack(KIND_BLOCKS, first, len(sealed)), sealed)
        length = _HEAD.size + sum(len(p) for p in parts)
        head = _HEAD.pack(
            RECORD_MAGIC,
            RECORD_VERSION,
            self.block_shift,
            0,
            self.file_id,
            self.old_backing,
            length,
        )
        return [head, *parts]

    @classmethod
    def parse(cls, raw: bytes) -> Record:
        """Read a record from the start of ``raw`` (unauthenticated: see :func:`settle`).

        Raises:
            IntegrityError: not a record of this version, or malformed.
        """
        if len(raw) < _HEAD.size:
            raise IntegrityError("not a journal record")
        magic, version, shift, zero, file_id, old_backing, length = _HEAD.unpack_from(raw)
        if magic != RECORD_MAGIC or version != RECORD_VERSION or zero:
            raise IntegrityError("not a journal record")
        if not _HEAD.size <= length <= len(raw):
            raise IntegrityError("journal record cut short")
        if not fileformat.MIN_BLOCK_SHIFT <= shift <= fileformat.MAX_BLOCK_SHIFT:
            raise IntegrityError("journal record with an impossible block size")
        header: bytes | None = None
        runs: list[tuple[int, bytes]] = []
        pos = _HEAD.size
        while pos < length:
            if pos + _ENTRY.size > length:
                raise IntegrityError("malformed journal record")
            kind, first, size = _ENTRY.unpack_from(raw, pos)
            pos += _ENTRY.size
            if size > length - pos:
                raise IntegrityError("malformed journal record")
            data = raw[pos : pos + size]
            pos += size
            if kind == KIND_HEADER and header is None and size == fileformat.HEADER_SIZE:
                header = data
            elif kind == KIND_BLOCKS and size > 0:
                runs.append((first, data))
            else:
                raise IntegrityError("malformed journal record")
        return cls(file_id, shift, old_backing, header, tuple(runs))


class _RecordFile:
    """An open record file, shared by the open files with its file id (hard links; copies)."""

    __slots__ = ("changing", "fd", "users", "written")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.changing = False  # a change began and has neither completed nor been undone
        self.written = False  # a record was written and not voided since


class Journal:
    """The journal of one volume: the record files in ``.envfs-journal`` at the backing root.

    Args:
        root_fd: the backing root's descriptor; the journal is reached from it only, by
            one name, following no symlink.
        root_path: the backing root (for messages only).

    Records left by an earlier mount (the daemon died, or a failed change could not be
    undone) are listed once, here: a file with one is checked when it is opened
    (:meth:`FileJournal.settle`).
    """

    def __init__(self, root_fd: int, root_path: bytes) -> None:
        self._root_fd = root_fd
        self.root_path = root_path
        self._dir_fd: int | None = None
        self._records: dict[bytes, _RecordFile] = {}
        self._disabled = False
        self.leftovers: set[bytes] = set()
        try:
            self._dir_fd = os.open(JOURNAL_DIR, _DIR_FLAGS, dir_fd=root_fd)
            names = os.listdir(self._dir_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("journal %r cannot be read: %s", self._path(), exc.strerror)
            return
        for name in names:
            with contextlib.suppress(ValueError):
                if len(name) == 2 * fileformat.FILE_ID_SIZE and name == name.lower():
                    self.leftovers.add(bytes.fromhex(name))

    def for_file(self, file_id: bytes, path: bytes) -> FileJournal:
        """The journal of one open file (``path`` for messages only)."""
        return FileJournal(self, file_id, path)

    def close(self) -> None:
        for record in self._records.values():
            os.close(record.fd)
        self._records.clear()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _path(self, name: str = "") -> bytes:
        return os.path.join(self.root_path, JOURNAL_DIR.encode(), name.encode())

    def _dir(self) -> int:
        """The journal directory's descriptor; the directory is made on first need."""
        if self._dir_fd is None:
            with contextlib.suppress(FileExistsError):
                os.mkdir(JOURNAL_DIR, 0o700, dir_fd=self._root_fd)
            self._dir_fd = os.open(JOURNAL_DIR, _DIR_FLAGS, dir_fd=self._root_fd)
        return self._dir_fd

    def _acquire(self, file_id: bytes) -> _RecordFile | None:
        """The record file of ``file_id``, made (empty) if this mount has none open; None
        where the backing root does not let the daemon keep a journal."""
        record = self._records.get(file_id)
        if record is None:
            if self._disabled:
                return None
            try:
                fd = self._create(file_id.hex())
            except OSError as exc:
                if exc.errno not in _NOT_ALLOWED:
                    raise
                log.warning(
                    "journal %r cannot be written (%s): changes to files go on without it, and"
                    " a crash of the mount daemon may make fsynced data unreadable",
                    self._path(),
                    exc.strerror,
                )
                self._disabled = True
                return None
            record = self._records[file_id] = _RecordFile(fd)
        record.users += 1
        return record

    def _create(self, name: str) -> int:
        """A new, empty record file (a leftover of that name is replaced: it was checked
        when its file was opened, or it appeared since)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for attempt in range(3):
            try:
                return os.open(name, flags, 0o600, dir_fd=self._dir())
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=self._dir())
            except FileNotFoundError:
                if attempt or self._dir_fd is None:
                    raise
                os.close(self._dir_fd)  # the directory was removed: made again
                self._dir_fd = None
        raise OSError(errno.EEXIST, "journal record keeps reappearing")

    def _release(self, file_id: bytes) -> None:
        """One user fewer; the last one closes the record file and removes it, unless a
        change failed and could not be undone (then it is kept for the next open)."""
        record = self._records[file_id]
        record.users -= 1
        if record.users:
            return
        del self._records[file_id]
        os.close(record.fd)
        if record.changing:
            self.leftovers.add(file_id)
        else:
            self._remove(file_id)

    def _remove(self, file_id: bytes) -> None:
        self.leftovers.discard(file_id)
        if file_id in self._records or self._dir_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file_id.hex(), dir_fd=self._dir_fd)

    def _read(self, file_id: bytes) -> bytes | None:
        """The content of the record file of ``file_id``, if there is one (a regular file)."""
        if self._dir_fd is None:
            return None
        try:
            pfd = os.open(file_id.hex(), O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD_SIZE:
                return None  # a device node is never opened
            fd = reopen(pfd, os.O_RDONLY)
        finally:
            os.close(pfd)
        try:
            return os.pread(fd, st.st_size, 0)
        finally:
            os.close(fd)


class FileJournal:
    """The journal of one open file: :meth:`save` before a change in place, :meth:`done`
    once it completed or was undone, :meth:`settle` at open, :meth:`close` at release."""

    __slots__ = ("_journal", "_record", "file_id", "path")

    def __init__(self, journal: Journal, file_id: bytes, path: bytes) -> None:
        self._journal = journal
        self._record: _RecordFile | None = None
        self.file_id = file_id
        self.path = path

    @property
    def leftover(self) -> bool:
        """Whether a record of this file may be left from before (see :meth:`settle`)."""
        return self.file_id in self._journal.leftovers

    def save(self, record: Record) -> None:
        """Write ``record`` before the change it undoes begins (no fsync: what a completed
        ``pwrite`` wrote survives the daemon).

        Raises:
            OSError: ENOSPC, EIO...: the change must not begin.
        """
        if self._record is None:
            self._record = self._journal._acquire(self.file_id)
            if self._record is None:
                return
        parts = record.encode()
        fd = self._record.fd
        written = os.pwritev(fd, parts, 0)
        total = sum(len(p) for p in parts)
        if written < total:
            pwrite_all(fd, b"".join(parts)[written:], written)
        self._record.written = self._record.changing = True

    def done(self) -> None:
        """The change completed, or was undone: the file authenticates again."""
        if self._record is not None:
            self._record.changing = False

    def void(self) -> None:
        """Make the record say nothing (after an fsync: what it would undo is now promised;
        after a truncation to zero: nothing it would undo is left)."""
        record = self._record
        if record is not None and record.written and not record.changing:
            pwrite_all(record.fd, bytes(len(RECORD_MAGIC)), 0)
            record.written = False

    def close(self) -> None:
        if self._record is not None:
            self._record = None
            self._journal._release(self.file_id)

    # --- recovery ---------------------------------------------------------------------

    def settle(
        self, fd: int, header: FileHeader, raw: bytes, keys: FileKeys
    ) -> tuple[FileHeader, bytes]:
        """Deal with a record left from before, when the file is opened; returns the header
        and raw bytes to open the file with (read again if the file was repaired).

        If the file authenticates where the record says it was being changed (its header,
        its final block, the blocks the record holds), the change completed: the record is
        removed. Else, if every byte the record holds authenticates as this file's and the
        file would authenticate with them, they are written back, the backing file is cut
        to the record's size, and the record is removed. Else nothing is changed: the file
        gives its integrity error as it would without a record.
        """
        journal = self._journal
        journal.leftovers.discard(self.file_id)
        if self.file_id in journal._records:
            return header, raw  # being written by this mount: not a leftover
        data = journal._read(self.file_id)
        record: Record | None = None
        if data is not None:
            with contextlib.suppress(IntegrityError):
                record = Record.parse(data)
        if record is not None and (
            record.file_id != header.file_id or record.block_shift != header.block_shift
        ):
            record = None
        if _intact(fd, header, raw, keys, record):
            if data is not None:
                journal._remove(self.file_id)
            return header, raw
        if record is None or not _repairable(fd, header, raw, keys, record):
            if data is not None:
                log.warning(
                    "backing file %r: its journal record %r does not repair it: ignored",
                    self.path,
                    journal._path(self.file_id.hex()),
                )
            return header, raw
        try:
            _repair(fd, record, header.block_shift)
        except OSError as exc:
            log.error(
                "backing file %r: an interrupted write could not be put back: %s",
                self.path,
                exc.strerror,
            )
            journal.leftovers.add(self.file_id)  # tried again at the next open
            return header, raw
        raw = bytes(os.pread(fd, fileformat.HEADER_SIZE + fileformat.BLOCK_OVERHEAD, 0))
        header = FileHeader.parse(raw)
        if not _intact(fd, header, raw, keys, record):
            log.error("backing file %r: putting back an interrupted write failed", self.path)
            return header, raw
        log.warning(
            "backing file %r: recovered an interrupted write (journal record %r)",
            self.path,
            journal._path(self.file_id.hex()),
        )
        journal._remove(self.file_id)
        return header, raw


def _intact(fd: int, header: FileHeader, raw: bytes, keys: FileKeys, record: Record | None) -> bool:
    """Whether the file authenticates where ``record`` says a change was made: its header,
    its final block and the record's blocks that it has."""
    shift = header.block_shift
    try:
        header.verify(raw, keys)
        backing = os.fstat(fd).st_size
        size = fileformat.plaintext_size(backing, shift)
        final = size >> shift
        start = fileformat.block_offset(final, shift)
        sealed = os.pread(fd, backing - start, start)
        fileformat.decrypt_block(keys, header.file_id, final, sealed, shift)
        stride = fileformat.block_stride(shift)
        for first, run in record.runs if record is not None else ():
            count = min(final + 1 - first, -(-len(run) // stride))
            if count > 0:
                at = fileformat.block_offset(first, shift)
                sealed = os.pread(fd, min(count * stride, backing - at), at)
                fileformat.decrypt_blocks(
                    keys, header.file_id, first, sealed, shift, holes=header.sparse
                )
    except (IntegrityError, ValueError):  # ValueError: an impossible index in a record
        return False
    return True


def _repairable(fd: int, header: FileHeader, raw: bytes, keys: FileKeys, record: Record) -> bool:
    """Whether every byte ``record`` holds authenticates as this file's at its place, and
    the file with them put back, cut or grown to the record's size, authenticates (header
    and final block); nothing is written."""
    shift, file_id = header.block_shift, header.file_id
    stride = fileformat.block_stride(shift)
    old_backing = record.old_backing
    current = os.fstat(fd).st_size
    try:
        if current < old_backing and not _covered(record, current, old_backing):
            return False  # growing the backing file back would leave zeros no run covers
        if record.header is not None:
            old = FileHeader.parse_verified(record.header, keys)
            if (old.file_id, old.block_shift, old.key_arn, old.wrapped_key) != (
                file_id,
                shift,
                header.key_arn,
                header.wrapped_key,
            ):
                return False
            header = old
        else:
            header.verify(raw, keys)
        size = fileformat.plaintext_size(old_backing, shift)
        for first, run in record.runs:
            at = fileformat.block_offset(first, shift)
            if at + len(run) > old_backing or (len(run) % stride and at + len(run) != old_backing):
                return False  # beyond the old end, or a short block that is not the final one
            fileformat.decrypt_blocks(keys, file_id, first, run, shift, holes=header.sparse)
        final = size >> shift
        start = fileformat.block_offset(final, shift)
        sealed = _image(fd, record, start, old_backing)
        fileformat.decrypt_block(keys, file_id, final, sealed, shift)
    except (IntegrityError, ValueError):
        return False
    return True


def _image(fd: int, record: Record, start: int, end: int) -> bytearray:
    """Bytes ``[start, end)`` of the file as it would be with the record's runs put back
    (zeros where there is neither)."""
    data = bytearray(os.pread(fd, end - start, start))
    data.extend(bytes(end - start - len(data)))
    for first, run in record.runs:
        at = fileformat.block_offset(first, record.block_shift)
        lo, hi = max(at, start), min(at + len(run), end)
        if lo < hi:
            data[lo - start : hi - start] = run[lo - at : hi - at]
    return data


def _covered(record: Record, start: int, end: int) -> bool:
    """Whether the record's runs cover the backing bytes ``[start, end)``."""
    reach = start
    for at, size in sorted(
        (fileformat.block_offset(first, record.block_shift), len(run)) for first, run in record.runs
    ):
        if at > reach:
            break
        reach = max(reach, at + size)
    return reach >= end


def _repair(fd: int, record: Record, block_shift: int) -> None:
    """Put back the record's bytes and size. Each step can be done again, so a daemon that
    dies here leaves the record to be applied at the next open."""
    if os.fstat(fd).st_size != record.old_backing:
        os.ftruncate(fd, record.old_backing)
    for first, run in record.runs:
        restore_blocks(fd, run, fileformat.block_offset(first, block_shift), block_shift)
    if record.header is not None:
        pwrite_all(fd, record.header, 0)


def restore_blocks(fd: int, saved: bytes, at: int, block_shift: int) -> None:
    """Write back ``saved`` at ``at``; holes (whole zero blocks) are punched again, not
    written, so that putting back a filled hole needs no disk space."""
    stride = fileformat.block_stride(block_shift)
    zero = bytes(stride)
    start = 0
    while start < len(saved):
        end = start
        while saved[end : end + stride] == zero:
            end += stride
        if end > start and not _punch_hole(fd, at + start, end - start):
            end = start  # the filesystem cannot punch holes: write the zeros
        if end == start:
            end = min(len(saved), start + stride)
            while end < len(saved) and saved[end : end + stride] != zero:
                end += stride
            pwrite_all(fd, saved[start:end], at + start)
        start = end
