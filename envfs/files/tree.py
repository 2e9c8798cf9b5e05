"""The backing folder through directory descriptors: no path is ever walked by name.

The backing folder may be written by someone hostile while the mount works on it (another
local user, a sync client): a folder swapped for a symlink between a check and a use must
not lead the daemon, which may run as root, anywhere outside. So every backing system call
is made on a directory descriptor and a single name (the ``*at`` family), with no symlink
followed, and a directory descriptor is found afresh for each request:

- from the backing root's descriptor, opened once at mount, through the names the inode
  table knows (:meth:`InodeTable.names`), with ``openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS)`` (one system call for up to ``PATH_CHUNK`` bytes of names; longer
  paths in several steps, each beneath the last), or one ``openat(O_NOFOLLOW)`` per name
  where the kernel has no ``openat2``;
- the directory found must be the one the node was found as (same device and inode
  number); else the folder changed under the mount and the request fails with ``ESTALE``.

Paths longer than ``PATH_MAX`` therefore work as on any filesystem. Calls that take no
descriptor of a file reached this way (xattrs, ``chmod``) go through an ``O_PATH``
descriptor and its ``/proc/self/fd`` name, which reach exactly that file.

Residual risk, as for any program that works on a folder others may change: a directory
that someone with write access to the backing folder *moves* out of it (to a place where
they may write) while a request is between finding it and using it (microseconds) is still
used by that request.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from envfs.files import backing
from envfs.files.backing import O_PATH
from envfs.files.inodes import ROOT_INODE, InodeTable

log = logging.getLogger(__name__)

# The most bytes of names resolved by one openat2 call (the kernel refuses paths of
# PATH_MAX = 4096 bytes and more).
PATH_CHUNK = 4000
_DIR_FLAGS = O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class DirFd:
    """A directory descriptor for the length of a ``with`` block (the root's stays open)."""

    __slots__ = ("fd", "own")

    def __init__(self, fd: int, own: bool) -> None:
        self.fd = fd
        self.own = own

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        if self.own:
            os.close(self.fd)


class BackingTree:
    """Directory descriptors for the directories of an :class:`InodeTable`.

    Args:
        root_path: the backing folder (resolved once, at mount).
        inodes: the inode table whose names lead to each node.
    """

    def __init__(self, root_path: bytes, inodes: InodeTable) -> None:
        self.root_path = root_path
        self.inodes = inodes
        self.root_fd = os.open(root_path, _DIR_FLAGS)
        st = os.fstat(self.root_fd)
        if (st.st_dev, st.st_ino) != inodes.node(ROOT_INODE).key:
            os.close(self.root_fd)
            raise OSError(errno.ESTALE, "the backing folder changed while it was opened")

    def close(self) -> None:
        os.close(self.root_fd)

    def dir(self, ino: int) -> DirFd:
        """An ``O_PATH`` descriptor of directory node ``ino``, for a ``with`` block.

        Raises:
            OSError: ENOENT, ELOOP, ENOTDIR (the folder changed: a name is gone or is no
                longer a directory), ESTALE (the name leads to another directory).
        """
        if ino == ROOT_INODE:
            return DirFd(self.root_fd, False)
        node = self.inodes.node(ino)
        fd = self._walk(self.inodes.names(ino))
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != node.key:
                raise OSError(errno.ESTALE, "the backing folder changed: another directory")
        except BaseException:
            os.close(fd)
            raise
        return DirFd(fd, True)

    def _walk(self, names: list[bytes]) -> int:
        if len(names) == 1:
            return os.open(names[0], _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self.root_fd)
        if backing.openat2_works:
            try:
                return self._walk_beneath(names)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
        fd = self.root_fd
        try:
            for name in names:
                step = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                if fd != self.root_fd:
                    os.close(fd)
                fd = step
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        return fd

    def _walk_beneath(self, names: list[bytes]) -> int:
        fd = self.root_fd
        try:
            start = 0
            while start < len(names):
                stop, size = start, 0
                while stop < len(names) and (stop == start or size + len(names[stop]) < PATH_CHUNK):
                    size += len(names[stop]) + 1
                    stop += 1
                step = backing.openat2(fd, b"/".join(names[start:stop]), _DIR_FLAGS)
                if fd != self.root_fd:
                    os.close(fd)
                fd, start = step, stop
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        return fd


# --- one entry ------------------------------------------------------------------------------


def open_path(dir_fd: int, name: bytes) -> int:
    """An ``O_PATH`` descriptor of the entry ``name`` itself (a symlink is not followed)."""
    return os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def open_regular(dir_fd: int, name: bytes, flags: int, key: tuple[int, int] | None = None) -> int:
    """Open the regular file ``name`` with ``flags`` (``O_RDWR``...), never anything else:
    a FIFO or device node put in its place is not opened (a device's open may act).

    Args:
        key: the (device, inode) the file must have, if known.

    Raises:
        OSError: ENOENT; ELOOP (a symlink), EISDIR, EINVAL (not a regular file);
            ESTALE (another file than ``key``).
    """
    pfd = open_path(dir_fd, name)
    try:
        st = os.fstat(pfd)
        check_regular(st)
        if key is not None and (st.st_dev, st.st_ino) != key:
            raise OSError(errno.ESTALE, "the backing folder changed: another file")
        return backing.reopen(pfd, flags)
    finally:
        os.close(pfd)


def check_regular(st: os.stat_result) -> None:
    """Raise the errno a file operation on a non-regular entry gives."""
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EISDIR, "is a directory")
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "is a symlink")
    raise OSError(errno.EINVAL, "not a regular file")
