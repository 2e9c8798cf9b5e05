"""System calls on the backing folder that the standard library does not offer directly.

- :func:`open_unnamed`: a new file with no name yet (``O_TMPFILE``), so a file appears
  under its name only once its header is written; a hidden temporary name where the
  filesystem lacks ``O_TMPFILE``.
- :func:`link_fd`: give such a file its name (``linkat`` through ``/proc/self/fd``).
- :func:`renameat2`: rename with ``RENAME_NOREPLACE`` / ``RENAME_EXCHANGE``.
- :func:`reserve`: allocate disk space for a byte range without changing the file's size.
"""

from __future__ import annotations

import ctypes
import errno
import os

from envfs import crypto

TEMP_PREFIX = b".envfs-tmp-"
_AT_FDCWD = -100
_O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


def open_unnamed(directory: bytes, mode: int) -> tuple[int, bytes | None]:
    """An fd for a new file in ``directory`` that has no name yet.

    Returns ``(fd, None)`` for an ``O_TMPFILE`` file, or ``(fd, temp path)`` where the
    filesystem lacks ``O_TMPFILE`` (the temporary name is hidden from the plaintext view).
    """
    try:
        return os.open(directory, _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode), None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    temp = directory + b"/" + TEMP_PREFIX + crypto.random_bytes(8).hex().encode()
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    return fd, temp


def link_fd(fd: int, path: bytes) -> None:
    """Give the ``O_TMPFILE`` file open on ``fd`` the name ``path`` (EEXIST if taken).

    ``linkat`` must follow the /proc magic link; os.link does so only with a dir fd.
    """
    os.link(str(fd), path, src_dir_fd=_proc_fds(), follow_symlinks=True)


_proc_fds_of: tuple[int, int] | None = None  # (pid, fd of /proc/<pid>/fd), opened once


def _proc_fds() -> int:
    global _proc_fds_of
    pid = os.getpid()
    if _proc_fds_of is None or _proc_fds_of[0] != pid:  # a forked child needs its own
        fd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _proc_fds_of = (pid, fd)
    return _proc_fds_of[1]


_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    result = _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, ctypes.c_uint(flags))
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_FALLOC_FL_KEEP_SIZE = 0x01


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate disk space for ``length`` bytes at ``offset`` of the file on ``fd`` without
    changing its size (``fallocate(FALLOC_FL_KEEP_SIZE)``): a later write there cannot fail
    with ENOSPC. Does nothing where the filesystem cannot do this (EOPNOTSUPP).

    Raises:
        OSError: ENOSPC, EFBIG, EIO and the like.
    """
    if length <= 0:
        return
    result = _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset), ctypes.c_long(length))
    if result != 0:
        err = ctypes.get_errno()
        if err != errno.EOPNOTSUPP:
            raise OSError(err, os.strerror(err))
