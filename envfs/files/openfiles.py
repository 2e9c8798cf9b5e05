"""Open files of the plaintext view: create, open, read, write, truncate, fallocate, release.

Mixed into :class:`envfs.files.vfs.Vfs`, which keeps the namespace. A regular file is
encrypted (:mod:`.cryptfile`); its ``CryptFile`` (and so its keys) stays with the node while
any handle is open and is dropped at the last release. Every open and create, and every
content change not made through a handle the caller opened (truncate, fallocate), is a key
decision for the caller (:class:`~.keyaccess.KeyAccess`); writes through a handle are
covered by that handle's open, as Unix permissions are.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from envfs.errors import IntegrityError
from envfs.files import acl, fileformat
from envfs.files.acl import AclStore
from envfs.files.backing import link_fd, open_unnamed
from envfs.files.cryptfile import CryptFile, read_header
from envfs.files.dirnames import Entry, Names
from envfs.files.fileformat import FileHeader, FileKeys
from envfs.files.inodes import InodeTable, Node
from envfs.files.journal import Journal
from envfs.files.keyaccess import KeyAccess
from envfs.files.readahead import FolderReadAhead
from envfs.files.tree import BackingTree, check_regular, open_regular
from envfs.files.volume import Volume
from envfs.files.xattrs import NewMode
from envfs.identity import Caller

if TYPE_CHECKING:
    from envfs.files.vfs import Stat

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Handle:
    node: Node
    writable: bool


class OpenFiles:
    """File handles and the content operations, for :class:`envfs.files.vfs.Vfs`."""

    volume: Volume
    access: KeyAccess
    inodes: InodeTable
    tree: BackingTree
    journal: Journal
    read_ahead: FolderReadAhead
    chown_new: bool
    acls: AclStore | None
    _handles: dict[int, Handle]

    if TYPE_CHECKING:  # provided by Vfs and ExtendedAttributes

        def path(self, ino: int) -> bytes: ...

        names: Names

        def _entry(self, parent: int, dir_fd: int, name: bytes) -> Entry: ...
        def _remember(self, parent: int, name: bytes, st: os.stat_result, lookups: int) -> Node: ...
        def _lstat(self, ino: int) -> os.stat_result: ...
        def _stat(self, node: Node, st: os.stat_result) -> Stat: ...
        def _new_fh(self) -> int: ...
        def _inherited(self, parent: int, dir_fd: int, mode: int, umask: int) -> NewMode: ...

    def _truncate(self, node: Node, size: int, caller: Caller) -> None:
        """Truncate a file for ``caller``: a key decision even when the file is open."""
        if node.file is not None:
            path = self._safe_path(node)
            self.access.unwrap(node.file.header, caller, path, "truncate")
            self._ensure_writable(node)
            self._guard(path, node.file.truncate, size)
            return
        check_regular(self._lstat(node.ino))
        fh = self.open(node.ino, os.O_WRONLY, caller, purpose="truncate")
        try:
            cfile = self._handles[fh].node.file
            assert cfile is not None
            self._guard(self._safe_path(node), cfile.truncate, size)
        finally:
            self.release(fh)

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller, *, umask: int = 0
    ) -> tuple[int, Stat]:
        """Create and open a new encrypted file; the data key is made for ``caller``.

        The file appears under its name only once its header is written (``O_TMPFILE``
        and ``linkat``, or a temporary name and ``link``), so a crash never leaves a
        file without a header.
        """
        self.access.decide(caller)  # before the name: it may need the volume's name keys
        with self.tree.dir(parent) as dir_fd:
            entry = self._entry(parent, dir_fd, name)
            name = entry.backing
            path = self.path(parent) + b"/" + name
            file_id, data_key = self.access.new_data_key(caller, path)
            version = self.volume.format_version
            header = FileHeader(
                file_id,
                self.volume.block_shift,
                data_key.key_arn,
                data_key.wrapped,
                version=version,
            )
            keys = FileKeys.derive(data_key.plaintext, file_id, version)
            new = self._inherited(parent, dir_fd, stat.S_IFREG | (mode & 0o7777), umask)
            fd, temp = open_unnamed(dir_fd, new.mode & 0o7777)
            try:
                cfile = CryptFile.create(fd, header, keys, self.journal.for_file(file_id, path))
                if new.access is not None:  # before it has a name
                    assert self.acls is not None
                    self.acls.write(fd, acl.ACCESS, new.access)
                if self.chown_new:
                    os.fchown(fd, caller.uid, new_gid(dir_fd, caller))
                self.names.add_name_file(dir_fd, entry)
                if temp is None:
                    link_fd(fd, dir_fd, name)
                else:
                    try:
                        os.link(
                            temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False
                        )
                    finally:
                        os.unlink(temp, dir_fd=dir_fd)
            except BaseException:
                os.close(fd)
                raise
        st = os.fstat(fd)
        node = self._remember(parent, name, st, 1)
        node.file = cfile
        node.opens += 1
        fh = self._new_fh()
        self._handles[fh] = Handle(node, writable=True)
        return fh, self._stat(node, st)

    def open(self, ino: int, flags: int, caller: Caller, *, purpose: str = "") -> int:
        """Open a file for ``caller``: one key-service decision per open.

        Raises:
            AccessDeniedException (EACCES), DisabledException / KMSInvalidStateException
            (EKEYREVOKED), NotFoundException (ENOKEY), IntegrityError (EIO: a damaged file,
            or one whose header names a key the volume does not accept).
        """
        node = self.inodes.node(ino)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.access.decide(caller)
        if node.file is not None:
            # The decision; the keys are known already.
            self.access.unwrap(node.file.header, caller, self._safe_path(node), purpose)
        else:
            parent, name = self.inodes.entry(ino)
            with self.tree.dir(parent) as dir_fd:
                self.read_ahead.opened(parent, name, dir_fd)
                held = self.read_ahead.take(parent, name)  # opened and asked for already
                node.file = self._open_backing(dir_fd, name, node, caller, purpose, held=held)
        node.opens += 1
        fh = self._new_fh()
        self._handles[fh] = Handle(node, writable)
        try:
            # O_TRUNC truncates as on Linux, even read-only (the kernel checked write access).
            if writable or flags & os.O_TRUNC:
                self._ensure_writable(node)
            if flags & os.O_TRUNC:
                self._guard(self._safe_path(node), node.file.truncate, 0)
        except BaseException:
            self.release(fh)  # the kernel gets no handle to release
            raise
        return fh

    def _ensure_writable(self, node: Node) -> None:
        """Have the node's backing file open read-write. Readers may have opened it
        read-only (where the daemon may not write it); it is opened again, so that a writer
        is refused at its open with the backing file's own errno (EACCES; EPERM for an
        immutable file; EROFS), never later with EBADF."""
        cfile = node.file
        assert cfile is not None
        if fcntl.fcntl(cfile.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            return
        parent, name = self.inodes.entry(node.ino)
        with self.tree.dir(parent) as dir_fd:
            cfile.reopened(open_regular(dir_fd, name, os.O_RDWR, node.key))

    def _open_backing(
        self,
        dir_fd: int,
        name: bytes,
        node: Node,
        caller: Caller,
        purpose: str,
        *,
        held: int | None = None,
    ) -> CryptFile:
        """Open a node's backing file and its data key for ``caller``.

        ``held``: a descriptor the read-ahead opened for this name (and asked the kernel
        for its start): used if it is still the node's file, else closed.
        """
        fd = None
        if held is not None:
            st = os.fstat(held)
            if (st.st_dev, st.st_ino) == node.key:
                fd = held
            else:
                os.close(held)
        if fd is None:
            fd = self._open_file(dir_fd, name, node.key)
        path = self._safe_path(node)
        try:
            try:  # with an empty file's final block (28 bytes, in the same page)
                header, raw = read_header(
                    fd, read_ahead=held is None, extra=fileformat.BLOCK_OVERHEAD
                )
            except IntegrityError as exc:
                log.warning("backing file %r: %s", path, exc.message)
                raise
            data_key = self.access.unwrap(header, caller, path, purpose)
            # unwrap refused a header of another version than the volume's.
            keys = FileKeys.derive(data_key, header.file_id, header.version)
            journal = self.journal.for_file(header.file_id, path)
            return self._guard(path, CryptFile.open, fd, header, raw, keys, journal)
        except BaseException:
            os.close(fd)
            raise

    def _open_file(self, dir_fd: int, name: bytes, key: tuple[int, int] | None = None) -> int:
        """A regular backing file, read-write where the daemon may write it."""
        try:
            return open_regular(dir_fd, name, os.O_RDWR, key)
        except PermissionError:
            return open_regular(dir_fd, name, os.O_RDONLY, key)

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None or handle.node.file is None:
            raise OSError(errno.EBADF, "bad file handle")
        return handle

    def _guard(self, path: bytes, fn: Callable[..., T], *args: object) -> T:
        """Call ``fn``; an integrity failure is logged with the backing path."""
        try:
            return fn(*args)
        except IntegrityError as exc:
            log.warning("backing file %r: %s", path, exc.message)
            raise

    def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        assert handle.node.file is not None
        try:
            return handle.node.file.read(offset, size)
        except IntegrityError as exc:
            log.warning("backing file %r: %s", self._safe_path(handle.node), exc.message)
            raise

    def write(self, fh: int, offset: int, data: bytes) -> int:
        """Write through a handle: decided at the handle's open, like any Unix file."""
        handle = self._handle(fh)
        assert handle.node.file is not None
        if not handle.writable:
            raise OSError(errno.EBADF, "file not open for writing")
        try:
            return handle.node.file.write(offset, data)
        except IntegrityError as exc:
            log.warning("backing file %r: %s", self._safe_path(handle.node), exc.message)
            raise

    def _safe_path(self, node: Node) -> bytes:
        try:
            return self.path(node.ino)
        except OSError:
            return b"<unlinked>"

    def fallocate(self, fh: int, mode: int, offset: int, length: int, caller: Caller) -> None:
        """``fallocate(2)`` mode 0 for ``caller`` (a key decision): afterwards the file is at
        least ``offset + length`` bytes long (the new part reads as zeros) and writes inside
        that range will not fail for want of space. The space is checked and reserved
        first, so ENOSPC leaves the file unchanged. Other modes (keep size, punch hole,
        zero range, ...) give EOPNOTSUPP.
        """
        handle = self._handle(fh)
        cfile = handle.node.file
        assert cfile is not None
        if mode != 0:
            raise OSError(errno.EOPNOTSUPP, "only fallocate mode 0 is supported")
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "invalid fallocate range")
        if not handle.writable:
            raise OSError(errno.EBADF, "file not open for writing")
        path = self._safe_path(handle.node)
        self.access.unwrap(cfile.header, caller, path, "fallocate")
        self._guard(path, cfile.reserve, offset + length)

    def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        assert handle.node.file is not None
        (os.fdatasync if datasync else os.fsync)(handle.node.file.fd)
        handle.node.file.synced()

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        node = handle.node
        node.opens -= 1
        if node.opens == 0 and node.file is not None:
            node.file.close()
            node.file = None
        self.inodes.drop_if_unused(node)

    def file_size(self, fh: int) -> int:
        handle = self._handle(fh)
        assert handle.node.file is not None
        return handle.node.file.size


def new_gid(dir_fd: int, caller: Caller) -> int:
    """The group of a new entry: the caller's, or the directory's if it is setgid."""
    parent_st = os.fstat(dir_fd)
    return parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else caller.gid
