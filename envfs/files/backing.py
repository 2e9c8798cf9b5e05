"""System calls on the backing folder that the standard library does not offer directly.

Everything here works on directory descriptors and single names (the ``*at`` family), never
on paths that the kernel would walk through symlinks:

- :func:`openat2`: resolve a relative path strictly beneath a directory, refusing symlinks
  and ``..`` on the way (``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``), in one system call.
- :func:`open_unnamed`: a new file with no name yet (``O_TMPFILE``), so a file appears
  under its name only once its header is written; a hidden temporary name where the
  filesystem lacks ``O_TMPFILE``.
- :func:`link_fd`: give such a file its name (``linkat`` through ``/proc/self/fd``).
- :func:`renameat2`: rename with ``RENAME_NOREPLACE`` / ``RENAME_EXCHANGE``.
- :func:`chown_fd`: change the owner of what an ``O_PATH`` descriptor holds
  (``fchownat(AT_EMPTY_PATH)``), a symlink included.
- :func:`reserve`: allocate disk space for a byte range without changing the file's size;
  :func:`punch_hole`: give it back.
- :func:`pwrite_all`: ``pwrite`` until every byte is written.
"""

from __future__ import annotations

import ctypes
import errno
import os

from envfs import crypto

TEMP_PREFIX = b".envfs-tmp-"
_O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(None, use_errno=True)


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


# --- resolving beneath a directory ---------------------------------------------------------

_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "riscv64": 437, "ppc64le": 437, "s390x": 437}.get(
    os.uname().machine
)
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


openat2_works = _SYS_OPENAT2 is not None  # False once the kernel refused the call


def openat2(dir_fd: int, path: bytes, flags: int) -> int:
    """Open ``path`` relative to ``dir_fd``, strictly beneath it and following no symlink.

    Raises:
        OSError: ELOOP (a symlink on the way), EXDEV (``..`` leaving ``dir_fd``), ENOENT,
            ENOTDIR...; ENOSYS where the kernel has no openat2 (before Linux 5.6, or a
            seccomp filter), after which :data:`openat2_works` is False.
    """
    global openat2_works
    if _SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
    fd: int = _libc.syscall(
        _SYS_OPENAT2, ctypes.c_int(dir_fd), path, ctypes.byref(how), ctypes.sizeof(how)
    )
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM) and openat2_works:
            openat2_works = False  # EPERM: refused by a seccomp filter
            err = errno.ENOSYS
        raise OSError(err, os.strerror(err))
    return fd


def proc_path(fd: int) -> str:
    """The ``/proc/self/fd`` name of ``fd``: for the calls that take no descriptor of an
    ``O_PATH`` file (xattrs, chmod), which then reach exactly that file."""
    return f"/proc/self/fd/{fd}"


def reopen(fd: int, flags: int) -> int:
    """A new open file description of what ``fd`` (an ``O_PATH`` one) refers to, opened
    with ``flags``, through ``/proc/self/fd`` (one name looked up, not a path)."""
    return os.open(str(fd), flags | os.O_CLOEXEC, dir_fd=_proc_fds())


# --- creating ------------------------------------------------------------------------------


def open_unnamed(dir_fd: int, mode: int) -> tuple[int, bytes | None]:
    """An fd for a new file in the directory ``dir_fd`` that has no name yet.

    Returns ``(fd, None)`` for an ``O_TMPFILE`` file, or ``(fd, temporary name)`` where the
    filesystem lacks ``O_TMPFILE`` (the temporary name, in that directory, is hidden from
    the plaintext view).
    """
    try:
        return os.open(".", _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode, dir_fd=dir_fd), None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    temp = TEMP_PREFIX + crypto.random_bytes(8).hex().encode()
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(temp, flags, mode, dir_fd=dir_fd), temp


def link_fd(fd: int, dir_fd: int, name: bytes) -> None:
    """Give the ``O_TMPFILE`` file open on ``fd`` the name ``name`` in the directory
    ``dir_fd`` (EEXIST if taken).

    ``linkat`` must follow the /proc magic link; os.link does so only with a dir fd.
    """
    os.link(str(fd), name, src_dir_fd=_proc_fds(), dst_dir_fd=dir_fd, follow_symlinks=True)


_proc_fds_of: tuple[int, int] | None = None  # (pid, fd of /proc/<pid>/fd), opened once


def _proc_fds() -> int:
    global _proc_fds_of
    pid = os.getpid()
    if _proc_fds_of is None or _proc_fds_of[0] != pid:  # a forked child needs its own
        fd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _proc_fds_of = (pid, fd)
    return _proc_fds_of[1]


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    result = _libc.renameat2(
        ctypes.c_int(old_dir), old, ctypes.c_int(new_dir), new, ctypes.c_uint(flags)
    )
    if result != 0:
        _raise_errno()


_AT_EMPTY_PATH = 0x1000


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """``chown`` what ``fd`` (``O_PATH`` or not) refers to, following nothing."""
    if _libc.fchownat(ctypes.c_int(fd), b"", uid, gid, _AT_EMPTY_PATH) != 0:
        _raise_errno()


# --- writing -------------------------------------------------------------------------------


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


# --- space ---------------------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


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


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give back the disk space of a byte range, which then reads as zeros
    (``fallocate(FALLOC_FL_PUNCH_HOLE)``). False where the filesystem cannot.

    Raises:
        OSError: EIO and the like.
    """
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))
