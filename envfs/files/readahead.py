"""Read-ahead across the files of a folder.

Tools that copy, archive, search or print a tree (``cp -r``, ``tar c``, ``rsync``,
``grep -r``, ``cat`` of a listing) open the files of a folder one after the other in name
order, and every open of an envfs file first reads the file's header from the backing
folder. With a cold cache each such open waits for the disk, and the daemon, which serves
one request at a time, waits with it.

:class:`FolderReadAhead` notices when two files of one folder are opened in a row in the
order of the folder's sorted listing (the names of the plaintext view sorted, as ``ls``
and shells sort them; with encrypted names not the backing names' order) and then asks the kernel
(``POSIX_FADV_WILLNEED``) for the start of the next few files of the listing, so that
their headers and first blocks are on their way while the current file is served. A file
opened out of order costs nothing more than a dictionary lookup. Reading ahead is a hint:
every failure is ignored.

Folders are identified by their inode number and read through a directory descriptor, and
files are opened by a function of the caller's (which opens regular files only, safely: it
costs more than a plain ``open``), so a backing folder changed meanwhile leads nowhere. The
descriptors opened to ask ahead are kept (at most ``FILES_AHEAD + 1``, for the folder being
read only) and handed to the caller when it opens that file (:meth:`take`): a file read in
order is opened once, not twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# The files asked for ahead of the one opened, and how much of each (header and the first
# FUSE read's worth of blocks, as cryptfile.read_header asks for the file it opens).
FILES_AHEAD = 8
BYTES_AHEAD = (128 << 10) + 8192


class FolderReadAhead:
    """Watches the opens of one folder at a time (the one last opened in)."""

    def __init__(
        self,
        open_file: Callable[[int, bytes], int],
        files_ahead: int = FILES_AHEAD,
        bytes_ahead: int = BYTES_AHEAD,
        view_name: Callable[[int, int, bytes], bytes | None] | None = None,
    ) -> None:
        """``open_file(dir_fd, name)`` opens a regular file as the caller opens it (OSError
        if not a regular file); ``view_name(folder, dir_fd, name)`` is the plaintext view's
        name of a backing name (None: not one of the view's), by default the name itself."""
        self.open_file = open_file
        self.view_name = view_name or (lambda folder, dir_fd, name: name)
        self.files_ahead = files_ahead
        self.bytes_ahead = bytes_ahead
        self._folder: int | None = None
        self._last_name: bytes | None = None  # the view's name of the last file opened
        self._listing: list[bytes] | None = None  # backing names in the view's order
        self._index: dict[bytes, int] = {}
        self._last_backing: bytes | None = None  # its backing name
        self._asked_up_to = -1  # index of the last file asked for
        self._held: dict[bytes, int] = {}  # name -> descriptor opened to ask ahead

    def opened(self, folder: int, name: bytes, dir_fd: int) -> bool:
        """``name`` in the folder ``folder`` (an inode number; ``dir_fd`` a descriptor of
        it) was just opened. True if its start was asked for already (the caller need not
        ask again)."""
        view = self.view_name(folder, dir_fd, name)
        if folder != self._folder:
            self.close()
            self._folder, self._last_name, self._last_backing = folder, view, name
            self._listing, self._index, self._asked_up_to = None, {}, -1
            return False
        last, self._last_name = self._last_name, view
        last_backing, self._last_backing = self._last_backing, name
        if self._listing is None:
            if last is None or view is None or view <= last:
                return False  # not in name order: no listing yet
            try:
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    listed = [os.fsencode(n) for n in os.listdir(fd)]
                finally:
                    os.close(fd)
            except OSError:
                self._folder = None
                return False
            keyed = [(self.view_name(folder, dir_fd, n), n) for n in listed]
            self._listing = [n for key, n in sorted((k, n) for k, n in keyed if k is not None)]
            self._index = {n: i for i, n in enumerate(self._listing)}
        here = self._index.get(name)
        before = self._index.get(last_backing) if last_backing is not None else None
        if here is None or before is None or not 0 < here - before <= 2:
            return False  # out of order (or a file made since the listing): nothing to ask
        was_asked = here <= self._asked_up_to
        first = max(here + 1, self._asked_up_to + 1)
        stop = min(here + 1 + self.files_ahead, len(self._listing))
        for index in range(first, stop):
            self._ask(dir_fd, self._listing[index])
        self._asked_up_to = max(self._asked_up_to, stop - 1)
        return was_asked

    def _ask(self, dir_fd: int, name: bytes) -> None:
        try:
            fd = self.open_file(dir_fd, name)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, self.bytes_ahead, os.POSIX_FADV_WILLNEED)
        except OSError:
            os.close(fd)
            return
        old = self._held.pop(name, None)
        if old is not None:
            os.close(old)
        self._held[name] = fd
        while len(self._held) > self.files_ahead + 1:
            os.close(self._held.pop(next(iter(self._held))))

    def take(self, folder: int, name: bytes) -> int | None:
        """The descriptor opened when ``name`` in ``folder`` was asked ahead, if any: the
        caller owns it now (and checks it is still the file it wants)."""
        if folder != self._folder:
            return None
        return self._held.pop(name, None)

    def close(self) -> None:
        """Close the descriptors still held."""
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()
