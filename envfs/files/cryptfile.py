"""One open encrypted backing file: plaintext reads, writes and truncation over ``format``.

A :class:`CryptFile` owns a backing file descriptor, the file's header and derived keys,
and the plaintext size, which it keeps exact while the file is open. Every request is
one backing ``pread`` and, for writes, one ``pwrite`` covering all the blocks it touches
(the edge blocks are read, merged and re-sealed with fresh nonces).

The final block, which says where the file ends, is authenticated before anything of the
file is served or changed: at the first read, write or truncation after the open (for a
read that covers it, by that read itself), and at the open for an empty file (which no
read would reach). A file cut or extended at a block boundary, or whose empty final block
was replaced, gives an integrity error there, and nothing of it is served.

Gaps (a write past the end, truncation upwards, ``fallocate``) up to ``SPARSE_GAP`` bytes
are sealed as zero blocks. Larger ones become holes in the backing file, which cost neither
disk space nor time: the file's header then carries ``fileformat.FLAG_SPARSE`` (see
``docs/format.md`` for what that lets an attacker do).

A write or truncation that moves the end of the file and fails (``ENOSPC``, ``EFBIG``, ``EIO``)
puts back the bytes it overwrote and the old backing size: the file is left as it was.

A change that rewrites bytes already on disk first saves them in the volume's journal
(:mod:`.journal`), so that a crash of the daemon in the middle of it never leaves a torn
block: the file's next open puts them back. A file this mount created is not journaled
until its first fsync (:meth:`CryptFile.synced`): nothing in it was promised to last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import time
from collections.abc import Iterator

from envfs.errors import IntegrityError
from envfs.files import fileformat
from envfs.files.backing import pwrite_all as _pwrite_all
from envfs.files.backing import reserve as _reserve
from envfs.files.fileformat import FileHeader, FileKeys
from envfs.files.journal import FileJournal, Record, restore_blocks

log = logging.getLogger(__name__)

# Gaps up to this many bytes are sealed as zero blocks; larger ones are left as holes. At
# least the largest block size, so a gap this large always spans a whole block.
SPARSE_GAP = 1 << 20
# The largest backing file offset the system calls take (off_t).
MAX_BACKING_SIZE = (1 << 63) - 1
# A journaled write longer than this is made in parts, so that its records stay far below
# journal.MAX_RECORD_SIZE (a FUSE write is 1 MiB at most: only direct callers reach it).
JOURNALED_WRITE_MAX = 16 << 20
# Sequential reads ask the kernel to fetch this much of the backing file ahead.
_READ_AHEAD = 1 << 20
# Opening asks for the header and a first FUSE read's worth (128 KiB) of blocks.
_OPEN_READ_AHEAD = (128 << 10) + 8192


# A read whose blocks are not in the page cache waits for the disk busily, for this long at
# most, before it sleeps (see :func:`_pread`).
SPIN_NS = 250_000
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_nowait_works = bool(_NOWAIT)  # False once the backing filesystem refused RWF_NOWAIT


def _pread(fd: int, length: int, offset: int) -> bytes | bytearray:
    """``os.pread``, but waiting for the disk without sleeping, for up to ``SPIN_NS``.

    On virtual machines, waking a vCPU that went idle while the disk worked costs tens of
    microseconds, as much as the rest of a random read. So a read whose pages are not in
    the page cache is started (``POSIX_FADV_WILLNEED``) and then polled with ``RWF_NOWAIT``
    reads, which never block, until its data is there or ``SPIN_NS`` has passed; then it
    sleeps in a plain ``pread``. A read whose pages are cached costs one system call, as
    ``pread`` does. A short result means the end of the file, as with ``pread``.
    """
    global _nowait_works
    if not _nowait_works:
        return os.pread(fd, length, offset)
    buf = bytearray(length)
    got = 0
    deadline = 0
    while True:
        try:
            n = os.preadv(fd, (memoryview(buf)[got:] if got else buf,), offset + got, _NOWAIT)
        except BlockingIOError:
            n = -1
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _nowait_works = False  # this filesystem cannot: read the plain way from now on
            break
        if n > 0:
            got += n
            if got == length:
                return buf
            continue
        if n == 0:  # the end of the file
            return bytes(buf[:got])
        now = time.monotonic_ns()
        if not deadline:
            os.posix_fadvise(fd, offset + got, length - got, os.POSIX_FADV_WILLNEED)
            deadline = now + SPIN_NS
        elif now > deadline:
            break
    return bytes(buf[:got]) + os.pread(fd, length - got, offset + got)


def read_header(fd: int, *, read_ahead: bool = True, extra: int = 0) -> tuple[FileHeader, bytes]:
    """Parse a backing file's header (unauthenticated), returning it and its raw bytes.

    Args:
        read_ahead: ask the kernel for the file's first blocks too; False where that was
            done already (:mod:`envfs.files.readahead`).
        extra: also read up to this many bytes after the header (returned in the raw
            bytes), so that :meth:`CryptFile.open` finds a small file's final block there.

    Raises:
        IntegrityError: not an envfs file, unsupported version, malformed header.
    """
    if read_ahead:
        # An open is mostly followed by a read of the file's start: ask for that stretch
        # now, so that the header and the first blocks come from the disk in one request.
        os.posix_fadvise(fd, 0, _OPEN_READ_AHEAD, os.POSIX_FADV_WILLNEED)
    raw = bytes(_pread(fd, fileformat.HEADER_SIZE + extra, 0))
    return FileHeader.parse(raw), raw


class CryptFile:
    """An encrypted file open on ``fd``; not thread-safe (the filesystem is one trio loop)."""

    __slots__ = (
        "_ahead_to",
        "_block",
        "_end_checked",
        "_journal",
        "_journaling",
        "_read_end",
        "_shift",
        "fd",
        "header",
        "keys",
        "size",
    )

    def __init__(
        self,
        fd: int,
        header: FileHeader,
        keys: FileKeys,
        size: int,
        *,
        end_checked: bool = True,
        journal: FileJournal | None = None,
        journaling: bool = True,
    ) -> None:
        self.fd = fd
        self.header = header
        self.keys = keys
        self.size = size
        self._shift = header.block_shift
        self._block = 1 << header.block_shift
        self._read_end = -1  # where the last read ended in the backing file
        self._ahead_to = 0  # how far the kernel was last asked to read ahead
        self._end_checked = end_checked  # the final block was authenticated
        self._journal = journal
        # Changes in place are journaled: the file may hold data promised to last.
        self._journaling = journaling and journal is not None

    @classmethod
    def create(
        cls, fd: int, header: FileHeader, keys: FileKeys, journal: FileJournal | None = None
    ) -> CryptFile:
        """Write a new, empty file (header and empty final block) to ``fd``.

        Its changes are not journaled until it is first fsynced (:meth:`synced`).
        """
        empty = fileformat.encrypt_blocks(
            keys, header.file_id, 0, b"", header.block_shift, final=True
        )
        _pwrite_all(fd, header.encode(keys) + empty, 0)
        return cls(fd, header, keys, 0, journal=journal, journaling=False)

    @classmethod
    def open(
        cls,
        fd: int,
        header: FileHeader,
        raw: bytes,
        keys: FileKeys,
        journal: FileJournal | None = None,
    ) -> CryptFile:
        """Authenticate the header and size up the file; an empty file's final block too.

        ``raw`` is what :func:`read_header` read: the header, and perhaps more of the file.
        The final block of a file that is not empty is authenticated later, before the
        first byte is served or changed (:meth:`check_end`): at open it would cost a wait for
        the disk that the first read then pays anyway. A file with a journal record left
        from before is first settled with it (:meth:`.FileJournal.settle`): a change a
        crash interrupted is undone.

        Raises:
            IntegrityError: the header does not verify, the backing size is impossible, or
                an empty file's final block does not verify.
        """
        if journal is not None and journal.leftover:
            header, raw = journal.settle(fd, header, raw, keys)
        header.verify(raw, keys)
        backing = os.fstat(fd).st_size
        size = fileformat.plaintext_size(backing, header.block_shift)
        cfile = cls(fd, header, keys, size, end_checked=False, journal=journal)
        if size == 0:  # no read reaches an empty file: the kernel answers EOF by itself
            cfile.check_end(raw[fileformat.HEADER_SIZE : backing] if len(raw) >= backing else None)
        return cfile

    def check_end(self, sealed: bytes | None = None) -> None:
        """Authenticate the final block once: it says where the file ends, so a cut at a
        block boundary, a replaced empty final block or appended bytes are caught here.

        Raises:
            IntegrityError: the final block does not verify.
        """
        if self._end_checked:
            return
        final = self.size >> self._shift
        start = fileformat.block_offset(final, self._shift)
        length = fileformat.backing_size(self.size, self._shift) - start
        if sealed is None:
            sealed = bytes(_pread(self.fd, length, start))
        if len(sealed) != length:
            raise IntegrityError("the backing file is shorter than expected")
        fileformat.decrypt_block(self.keys, self.header.file_id, final, sealed, self._shift)
        self._end_checked = True

    # --- reading -----------------------------------------------------------------------

    def _plain_block(self, index: int, run: bytes | None = None, first: int = 0) -> bytes:
        """Block ``index``'s plaintext, read from the file, or from ``run`` (the sealed
        blocks from ``first`` on) when given."""
        stride = fileformat.block_stride(self._shift)
        if run is None:
            sealed = _pread(self.fd, stride, fileformat.block_offset(index, self._shift))
        else:
            sealed = run[(index - first) * stride : (index - first + 1) * stride]
        return fileformat.decrypt_block(
            self.keys, self.header.file_id, index, sealed, self._shift, holes=self.header.sparse
        )

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` plaintext bytes at ``offset`` (fewer at the end of the file).

        Raises:
            IntegrityError: a block fails authentication.
        """
        if offset >= self.size or length <= 0:
            self.check_end()
            return b""
        length = min(length, self.size - offset)
        span = fileformat.block_span(offset, length, self._shift)
        # A read that covers the final block authenticates it itself.
        covers_end = span.first_block + span.block_count > self.size >> self._shift
        if not covers_end:
            self.check_end()
        data = _pread(self.fd, span.backing_length, span.backing_offset)
        end = span.backing_offset + span.backing_length
        if span.backing_offset == self._read_end and not (
            _READ_AHEAD // 2 <= self._ahead_to - end <= _READ_AHEAD
        ):
            # Sequential: have the backing file's next stretch read while we decrypt (the
            # daemon serves one request at a time, so its disk waits cannot overlap else).
            # Asked again once half of that stretch is used up, or when reading went back
            # before it (each ask costs about 20 µs).
            os.posix_fadvise(self.fd, end, _READ_AHEAD, os.POSIX_FADV_WILLNEED)
            self._ahead_to = end + _READ_AHEAD
        self._read_end = end
        plain = fileformat.decrypt_blocks(
            self.keys,
            self.header.file_id,
            span.first_block,
            data,
            self._shift,
            holes=self.header.sparse,
        )
        if len(plain) < span.skip + length:
            # The backing file is shorter than its size said: cut behind our back.
            raise IntegrityError("the backing file is shorter than expected")
        if covers_end:
            self._end_checked = True
        return plain[span.skip : span.skip + length]

    # --- writing -----------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset``; a gap past the end reads as zeros.

        Raises:
            OSError: EFBIG (past the largest backing file), ENOSPC, EIO...: the file is as
                it was before the call.
            IntegrityError: an edge block to merge with fails authentication.
        """
        if not data:
            return 0
        end = offset + len(data)
        self._check_size(end)
        self.check_end()
        if self._journaling and len(data) > JOURNALED_WRITE_MAX:
            view = memoryview(data)
            for start in range(0, len(data), JOURNALED_WRITE_MAX):
                self.write(offset + start, bytes(view[start : start + JOURNALED_WRITE_MAX]))
            return len(data)
        if offset <= self.size:
            self._write_run(offset, data)
            return len(data)
        with self._rollback(grow_to=offset):
            self._grow(offset)
            self._write_run(offset, data, guarded=True)
        return len(data)

    def _write_run(self, offset: int, data: bytes, *, guarded: bool = False) -> None:
        """Rewrite the blocks covering ``[offset, offset + len(data))``; offset <= size.

        A run that moves the end of the file, or may fill holes (which needs disk space),
        or is journaled, is undone if it fails, unless ``guarded`` (the caller journals it
        and undoes it).
        """
        block, size, shift = self._block, self.size, self._shift
        end = offset + len(data)
        new_size = max(size, end)
        first = offset >> shift
        last = (end - 1) >> shift
        run_end = min(new_size, (last + 1) << shift)
        head = offset - (first << shift)
        journaled = self._journaling and not guarded
        old: bytes | None = None  # the run's blocks on disk, as they are: for the journal
        if journaled:
            at = fileformat.block_offset(first, shift)
            top = fileformat.block_offset(min(last, size >> shift) + 1, shift)
            old = bytes(_pread(self.fd, min(fileformat.backing_size(size, shift), top) - at, at))
        parts: list[bytes] = []
        first_plain: bytes | None = None
        if head:
            first_plain = self._plain_block(first, old, first)
            parts.append(first_plain[:head])
        parts.append(data)
        if end < run_end:
            tail_plain = first_plain if last == first and first_plain is not None else None
            if tail_plain is None:
                tail_plain = self._plain_block(last, old, first)
            base = last * block
            parts.append(tail_plain[end - base : run_end - base])
        sealed = fileformat.encrypt_blocks(
            self.keys,
            self.header.file_id,
            first,
            b"".join(parts),
            self._shift,
            final=run_end == new_size,
        )
        at = fileformat.block_offset(first, self._shift)
        if guarded or (not journaled and new_size == size and not self.header.sparse):
            # Overwriting blocks in place needs no new disk space.
            _pwrite_all(self.fd, sealed, at)
        else:
            with self._rollback(first, last, saved=old):
                _pwrite_all(self.fd, sealed, at)
        self.size = new_size

    def _grow(self, until: int) -> None:
        """Extend the file with zeros up to ``until`` bytes: sealed zero blocks for a small
        gap, holes for a large one."""
        if until - self.size <= SPARSE_GAP:
            self._write_run(self.size, bytes(until - self.size), guarded=True)
            return
        shift, size = self._shift, self.size
        last_old, last_new = size >> shift, until >> shift  # last_new > last_old: a big gap
        if not self.header.sparse:
            self.header = dataclasses.replace(self.header, flags=fileformat.FLAG_SPARSE)
            _pwrite_all(self.fd, self.header.encode(self.keys), 0)
        # The old final block becomes a whole one, padded with zeros; the new final block
        # holds the zeros after the last whole block; everything between is a hole.
        padded = self._plain_block(last_old).ljust(self._block, b"\0")
        file_id = self.header.file_id
        whole = fileformat.encrypt_blocks(self.keys, file_id, last_old, padded, shift, final=False)
        tail = bytes(until - (last_new << shift))
        final = fileformat.encrypt_blocks(self.keys, file_id, last_new, tail, shift, final=True)
        _pwrite_all(self.fd, final, fileformat.block_offset(last_new, shift))
        _pwrite_all(self.fd, whole, fileformat.block_offset(last_old, shift))
        self.size = until

    def truncate(self, new_size: int) -> None:
        """Cut or extend the file to ``new_size`` plaintext bytes.

        Raises:
            OSError: EFBIG (past the largest backing file), ENOSPC, EIO...: the file is as
                it was before the call.
            IntegrityError: the block that becomes the final one fails authentication.
        """
        if new_size == self.size:
            return
        self._check_size(new_size)
        if new_size > self.size:
            self.check_end()  # growing keeps the end: it must be the writer's, not a cut
            with self._rollback(grow_to=new_size):
                self._grow(new_size)
            return
        index = new_size >> self._shift
        keep = new_size - (index << self._shift)
        plain = self._plain_block(index)[:keep] if keep else b""
        sealed = fileformat.encrypt_blocks(
            self.keys, self.header.file_id, index, plain, self._shift, final=True
        )
        with self._rollback(index, index):
            _pwrite_all(self.fd, sealed, fileformat.block_offset(index, self._shift))
            os.ftruncate(self.fd, fileformat.backing_size(new_size, self._shift))
        self.size = new_size
        self._end_checked = True  # the final block is the one just written
        if new_size == 0 and self._journal is not None:
            # Nothing that was promised to last is left: no journal until the next fsync.
            self._journaling = False
            self._journal.void()

    def reserve(self, until: int) -> None:
        """Make sure the file can grow to ``until`` bytes and be written up to there without
        running out of disk space (``fallocate`` mode 0), then grow it: the new part reads
        as zeros. Fails fast, before anything is written, when the space is not there.

        Raises:
            OSError: ENOSPC, EFBIG, EIO...: the file is as it was before the call.
        """
        self._check_size(until)
        if until <= self.size:
            return
        self.check_end()
        current = fileformat.backing_size(self.size, self._shift)
        wanted = fileformat.backing_size(until, self._shift) - current
        free = os.fstatvfs(self.fd)
        if wanted > free.f_bavail * free.f_frsize:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with self._rollback(grow_to=until):
            _reserve(self.fd, current, wanted)
            self._grow(until)

    def _check_size(self, size: int) -> None:
        if fileformat.backing_size(size, self._shift) > MAX_BACKING_SIZE:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    @contextlib.contextmanager
    def _rollback(
        self,
        first: int | None = None,
        last: int | None = None,
        *,
        grow_to: int | None = None,
        saved: bytes | None = None,
    ) -> Iterator[None]:
        """Undo the body's changes to the backing file if it fails: the bytes of blocks
        ``first`` to ``last`` (default: the final block), the backing size, the header.

        Args:
            grow_to: the body may grow the file to this size (it rewrites the header if
                that makes holes).
            saved: the bytes of those blocks, if the caller read them already.

        Before the body runs, the same bytes are saved in the journal if the file is
        journaled, so that a crash in the middle of the body is undone at the next open.
        """
        shift, size, header = self._shift, self.size, self.header
        final = size >> shift
        first = final if first is None else min(first, final)
        last = final if last is None else min(last, final)
        at = fileformat.block_offset(first, shift)
        old_backing = fileformat.backing_size(size, shift)
        if saved is None:
            top = min(old_backing, fileformat.block_offset(last + 1, shift))
            saved = bytes(_pread(self.fd, top - at, at))
        journal = self._journal if self._journaling else None
        if journal is not None:
            old_header = None
            if grow_to is not None and grow_to - size > SPARSE_GAP and not header.sparse:
                old_header = bytes(_pread(self.fd, fileformat.HEADER_SIZE, 0))
            record = Record(header.file_id, shift, old_backing, old_header, ((first, saved),))
            journal.save(record)
        try:
            yield
        except BaseException:
            try:
                os.ftruncate(self.fd, old_backing)
                restore_blocks(self.fd, saved, at, shift)
                if header is not self.header:
                    _pwrite_all(self.fd, header.encode(self.keys), 0)
            except OSError as exc:
                log.error("a failed change could not be undone: %s", exc.strerror)
            else:
                if journal is not None:
                    journal.done()
            self.size, self.header = size, header
            raise
        if journal is not None:
            journal.done()

    def synced(self) -> None:
        """The backing file was just fsynced: everything in it is now promised to last, so
        its changes are journaled from now on, and the last record, which would undo a
        change now promised, is voided."""
        if self._journal is not None:
            self._journal.void()
            self._journaling = True

    def reopened(self, fd: int) -> None:
        """Go on over ``fd``, the same backing file opened again (read-write where it was
        read-only); the old descriptor is closed."""
        old, self.fd = self.fd, fd
        os.close(old)

    def close(self) -> None:
        """Close the file; its journal record goes, every change having completed."""
        if self._journal is not None:
            self._journal.close()
        os.close(self.fd)
