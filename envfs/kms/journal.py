"""The audit journal: records of calls that changed no key, on disk before they are in the
chain.

A key service that batches its audit records (the mount's embedded service, see
``docs/kms.md`` §8) writes each such record to its own journal file with one ``write``
and adds the records to the store's chain later, many in one transaction. A record in
the journal survives a crash of the process (it is in the page cache), as a committed
``synchronous=NORMAL`` transaction does; whoever opens the store next adds the records
of a dead process's journal to the chain.

Files live in the store's directory, one per process, named ``audit-journal-<hex>.log``
and locked (``flock``) by their process for as long as it runs: a journal that can be
locked belongs to a process that is gone. The store's ``meta`` row
``audit_journal:<file name>`` says how many bytes of the journal are in the chain, and
is written in the same transaction that adds them, so no record is added twice.

A record is ``u32 length || JSON || tag`` (big-endian), where the tag is
``HMAC-SHA256(journal key, "envfs-kms v1 audit journal" || u32 len || file name || u64
offset || JSON)``, the offset being where the record starts in the file. The journal key
is derived from the root key, so a record cannot be made, changed, moved or copied
without it; the first record that does not verify ends what is read. A record torn at
the end (a crash in the middle of a write, or lost power) is ignored the same way;
:func:`damaged_at` tells the two apart, so that the store can keep a damaged journal as
evidence. Anything under a journal's name that is not a regular file is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from envfs import crypto

logger = logging.getLogger(__name__)

PREFIX = "audit-journal-"
SUFFIX = ".log"
_TEMP_PREFIX = ".audit-journal-"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_TAG_INFO = b"envfs-kms v1 audit journal"
TAG_SIZE = 32


def _tag(key: bytes, name: str, offset: int, body: bytes) -> bytes:
    raw_name = name.encode()
    return crypto.hmac_sha256(
        key, _TAG_INFO + _U32.pack(len(raw_name)) + raw_name + _U64.pack(offset) + body
    )


def meta_name(path: Path) -> str:
    """The ``meta`` row that says how much of the journal ``path`` is in the chain."""
    return "audit_journal:" + path.name


class Journal:
    """This process's journal: created and locked at construction, appended to by
    :meth:`append`. Not thread-safe."""

    def __init__(self, directory: Path, key: bytes) -> None:
        """Create a new journal in ``directory``, its records tagged under ``key``.

        It is created and locked under a temporary name first and then renamed, so that
        nobody ever finds it unlocked under its real name.

        Raises:
            OSError: it could not be created.
        """
        name = secrets.token_hex(8)
        temp = directory / f"{_TEMP_PREFIX}{name}.tmp"
        self.path = directory / f"{PREFIX}{name}{SUFFIX}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._fd = fd
        self._key = key
        self.size = 0

    def append(self, text: str) -> None:
        """Write one record, given as its JSON text (one ``write`` call).

        Raises:
            OSError: it could not be written whole (the journal is then unusable: a
                partial record may sit at its end).
        """
        body = text.encode()
        frame = _U32.pack(len(body)) + body + _tag(self._key, self.path.name, self.size, body)
        written = os.write(self._fd, frame)
        self.size += written
        if written != len(frame):
            raise OSError(f"short write to the audit journal {str(self.path)!r}")

    def remove(self) -> None:
        """Delete the journal (all its records are in the chain) and drop the lock."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.close()

    def close(self) -> None:
        """Drop the lock, keeping the file (its records are added by the next opener)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_records(
    key: bytes, name: str, data: bytes, start: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """The whole, verified records of the journal file ``name`` (contents ``data``) from
    offset ``start`` on, and the offset after the last; stops at the first record that is
    torn or does not verify."""
    records: list[dict[str, Any]] = []
    offset = start
    while offset + 4 + TAG_SIZE <= len(data):
        (length,) = _U32.unpack_from(data, offset)
        end = offset + 4 + length + TAG_SIZE
        if end > len(data):
            break
        body = data[offset + 4 : offset + 4 + length]
        tag = data[offset + 4 + length : end]
        if not crypto.constant_time_equal(tag, _tag(key, name, offset, body)):
            break
        try:
            record = json.loads(body)
        except ValueError:
            break
        if not isinstance(record, dict) or "seq" in record:
            break  # not a record as this module writes them
        records.append(record)
        offset = end
    return records, offset


def damaged_at(data: bytes, end: int) -> bool:
    """Whether reading ``data`` stopped at ``end`` on a whole record that does not verify
    (an altered or planted record), rather than at the end or on a record cut short
    (lost power), which is expected."""
    if end + 4 + TAG_SIZE > len(data):
        return False
    length: int = _U32.unpack_from(data, end)[0]
    return end + 4 + length + TAG_SIZE <= len(data)


@contextlib.contextmanager
def orphaned(directory: Path) -> Iterator[list[tuple[Path, bytes]]]:
    """The journals in ``directory`` whose process is gone, with their contents, locked
    for as long as the block runs: the caller adds their records and deletes them inside
    it, so that two openers never add one twice.

    Leftover temporary files (a process that died while creating its journal) are
    deleted.
    """
    found: list[tuple[Path, bytes]] = []
    fds: list[int] = []
    try:
        for path in sorted(directory.glob(f"{_TEMP_PREFIX}*.tmp")):
            _remove_if_unlocked(path)
        for path in sorted(directory.glob(f"{PREFIX}*{SUFFIX}")):
            fd = _lock(path)
            if fd is None:
                continue  # its process runs: not ours to add
            if os.fstat(fd).st_nlink == 0:
                os.close(fd)  # added and deleted by another opener meanwhile
                continue
            fds.append(fd)
            try:
                with open(fd, "rb", closefd=False) as f:
                    found.append((path, f.read()))
            except OSError as exc:
                logger.warning("cannot read the audit journal %s: %s", path, exc.strerror)
        yield found
    finally:
        for fd in fds:
            os.close(fd)


def _lock(path: Path) -> int | None:
    """An fd of ``path`` with its lock taken, or None if its process holds it (or it is
    gone, or it is not a regular file: never a journal, and left alone with a warning)."""
    try:
        # O_NONBLOCK: a FIFO planted under a journal's name must not hang the opener.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            logger.warning("%s is not a regular file, so not an audit journal: left alone", path)
            raise OSError
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_if_unlocked(path: Path) -> None:
    fd = _lock(path)
    if fd is None:
        return
    try:
        os.unlink(path)  # before the lock goes, so that its creator cannot take it
    except OSError:
        pass
    finally:
        os.close(fd)
