"""The encrypted filesystem without FUSE: inodes, backing paths, open files, access.

``Vfs`` serves a plaintext view of a backing folder. Directories, symlinks and FIFOs are
stored as they are; regular files are encrypted (:mod:`envfs.cryptfile`), each with its
own data key from the key service.

Every ``open`` and ``create`` is an access decision for the calling user, made by the
key service (Decrypt or GenerateDataKey on the user's behalf, audited with the file id
and backing path): the page cache is shared between users, so the open is the only gate.
Files already open keep working if the key is disabled afterwards.

Inodes and the names they are known by are kept by :mod:`envfs.inodes`.

All methods are synchronous and raise ``OSError`` (with an errno) or an ``EnvfsError``;
the FUSE adapter turns both into errno answers.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from envfs import crypto, format
from envfs.backing import TEMP_PREFIX, link_fd, open_unnamed, renameat2, reserve
from envfs.cryptfile import CryptFile, read_header
from envfs.errors import (
    AccessDeniedException,
    EnvfsError,
    IntegrityError,
    KMSError,
    VolumeError,
)
from envfs.format import FileHeader, FileKeys
from envfs.inodes import ROOT_INODE, InodeTable, Node
from envfs.keycache import DataKeyCache
from envfs.keypool import DataKeyPool
from envfs.kms.model import Caller
from envfs.kms.provider import KeyProvider
from envfs.readahead import FolderReadAhead
from envfs.volume import VOLUME_FILE, Volume

log = logging.getLogger(__name__)
T = TypeVar("T")

HIDDEN_AT_ROOT = frozenset({VOLUME_FILE.encode(), (VOLUME_FILE + ".tmp").encode()})
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_CALLER_TTL = 30.0


@dataclass
class Stat:
    """Attributes of a node in the plaintext view."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(eq=False)
class Handle:
    node: Node
    writable: bool


class Vfs:
    """The plaintext view of one volume.

    Args:
        volume: the loaded volume (its file is verified here or on first use).
        provider: the key service, called on behalf of each user.
        chown_new: give new files and directories to the calling user (root-run,
            multi-user mounts); otherwise they belong to the daemon's user.
    """

    def __init__(
        self,
        volume: Volume,
        provider: KeyProvider,
        *,
        chown_new: bool,
        key_cache: DataKeyCache | None = None,
        key_pool: DataKeyPool | None = None,
    ) -> None:
        self.volume = volume
        self.provider = provider
        self.chown_new = chown_new
        self.key_cache = key_cache if key_cache is not None else DataKeyCache(0)
        self.key_pool = key_pool
        self.root_path = os.fsencode(volume.backing.resolve())
        st = os.lstat(self.root_path)
        self.inodes = InodeTable(self.root_path, (st.st_dev, st.st_ino))
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, tuple[int, list[bytes]]] = {}
        self._next_fh = 1
        self._callers: dict[tuple[int, int], tuple[float, Caller]] = {}
        self.read_ahead = FolderReadAhead()
        self.volume_verified = False
        self._remove_stale_temporaries()

    # --- volume ------------------------------------------------------------------------

    def verify_volume(self, caller: Caller) -> None:
        """Authenticate the volume file as ``caller`` unless already done.

        Raises:
            VolumeError: the volume file is not authentic.
            KMSError: the key service refused ``caller``.
        """
        if not self.volume_verified:
            self.volume.verify(self.provider, caller)
            self.volume_verified = True
            log.info("volume %s authenticated by the key service", self.volume.volume_id)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of creates a crash interrupted hold no data: remove them."""
        for dirpath, _dirs, files in os.walk(self.root_path):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    path = os.path.join(dirpath, name)
                    log.info("removing the leftover of an interrupted create: %r", path)
                    os.unlink(path)

    def caller(self, uid: int, gid: int) -> Caller:
        """The identity of a FUSE request's user, with its groups (cached briefly)."""
        now = time.monotonic()
        cached = self._callers.get((uid, gid))
        if cached is not None and cached[0] > now:
            return cached[1]
        caller = Caller.from_ids(uid, gid)
        self._callers[(uid, gid)] = (now + _CALLER_TTL, caller)
        return caller

    # --- nodes and paths ---------------------------------------------------------------

    def path(self, ino: int) -> bytes:
        """The backing path of a node."""
        return self.inodes.path(ino)

    def _child(self, parent: int, name: bytes) -> bytes:
        if b"/" in name or name in (b"", b".", b".."):
            raise OSError(errno.EINVAL, "invalid name")
        if name.startswith(TEMP_PREFIX) or (parent == ROOT_INODE and name in HIDDEN_AT_ROOT):
            raise OSError(errno.ENOENT, "reserved name")
        return self.path(parent) + b"/" + name

    def _remember(self, parent: int, name: bytes, st: os.stat_result, lookups: int) -> Node:
        return self.inodes.remember(parent, name, (st.st_dev, st.st_ino), lookups)

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)

    def add_lookup(self, ino: int) -> None:
        self.inodes.node(ino).lookups += 1

    def _stat(self, node: Node, st: os.stat_result, path: bytes | None) -> Stat:
        """Attributes from the backing ``st``; ``path`` (None: an open file's, unknown) is
        only for the log."""
        size = st.st_size
        if stat.S_ISREG(st.st_mode):
            if node.file is not None:
                size = node.file.size
            else:
                try:
                    size = format.plaintext_size(st.st_size, self.volume.block_shift)
                except IntegrityError:
                    where = self._safe_path(node) if path is None else path
                    log.warning("backing file %r has an impossible size %d", where, st.st_size)
                    size = 0
        return Stat(
            ino=node.ino,
            mode=st.st_mode,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            size=size,
            blksize=st.st_blksize,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )

    def lookup(self, parent: int, name: bytes) -> Stat:
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            node = self.inodes.node(parent)
            up = next(iter(node.links))[0] if node.links else ROOT_INODE
            return self.getattr(up)
        path = self._child(parent, name)
        st = os.lstat(path)
        return self._stat(self._remember(parent, name, st, 1), st, path)

    def getattr(self, ino: int) -> Stat:
        node = self.inodes.node(ino)
        if node.file is not None:  # its fd outlives its names (unlinked or replaced while open)
            return self._stat(node, os.fstat(node.file.fd), None)
        path = self.path(ino)
        return self._stat(node, os.lstat(path), path)

    # --- directories -------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        path = self.path(ino)
        names = sorted(os.listdir(path))
        if ino == ROOT_INODE:
            names = [n for n in names if n not in HIDDEN_AT_ROOT]
        fh = self._new_fh()
        self._dirs[fh] = (ino, [n for n in names if not n.startswith(TEMP_PREFIX)])
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Stat, int]]:
        """Entries of an open directory from index ``start``: (name, attributes, next).

        Nodes are registered without a lookup; call :meth:`add_lookup` for each entry
        the kernel accepted.
        """
        if fh not in self._dirs:
            raise OSError(errno.EBADF, "bad directory handle")
        ino, names = self._dirs[fh]
        base = self.path(ino)
        for index in range(start, len(names)):
            name = names[index]
            path = base + b"/" + name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed since opendir
            node = self._remember(ino, name, st, 0)
            yield name, self._stat(node, st, path), index + 1

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def _give_to(self, path: bytes, caller: Caller, parent_path: bytes) -> None:
        """Give a new entry to its creator on a multi-user mount (setgid dirs keep the gid)."""
        if not self.chown_new:
            return
        os.chown(path, caller.uid, _new_gid(parent_path, caller), follow_symlinks=False)

    def _entry(self, parent: int, name: bytes, path: bytes) -> Stat:
        st = os.lstat(path)
        return self._stat(self._remember(parent, name, st, 1), st, path)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Stat:
        path = self._child(parent, name)
        os.mkdir(path, mode & 0o7777)
        self._give_to(path, caller, self.path(parent))
        return self._entry(parent, name, path)

    def rmdir(self, parent: int, name: bytes) -> None:
        os.rmdir(self._child(parent, name))
        self.inodes.unlink_name(parent, name)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Stat:
        path = self._child(parent, name)
        os.symlink(target, path)
        self._give_to(path, caller, self.path(parent))
        return self._entry(parent, name, path)

    def readlink(self, ino: int) -> bytes:
        return os.readlink(self.path(ino))

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Stat:
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            fh, attr = self.create(parent, name, mode, os.O_WRONLY, caller)
            self.release(fh)
            return attr
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK):
            raise OSError(errno.EPERM, "only FIFOs, sockets and files can be made here")
        path = self._child(parent, name)
        os.mknod(path, mode, rdev)
        self._give_to(path, caller, self.path(parent))
        return self._entry(parent, name, path)

    def unlink(self, parent: int, name: bytes) -> None:
        os.unlink(self._child(parent, name))
        self.inodes.unlink_name(parent, name)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Stat:
        new_path = self._child(new_parent, new_name)
        os.link(self.path(ino), new_path, follow_symlinks=False)
        return self._entry(new_parent, new_name, new_path)

    def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        old_path = self._child(parent, name)
        new_path = self._child(new_parent, new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unknown rename flags")
        if flags:
            renameat2(old_path, new_path, flags)
        else:
            os.rename(old_path, new_path)
        moved = self.inodes.unlink_name(parent, name)
        replaced = self.inodes.unlink_name(new_parent, new_name)
        if replaced is not None and flags & RENAME_EXCHANGE:
            self.inodes.link(replaced, parent, name)
        if moved is not None:
            self.inodes.link(moved, new_parent, new_name)

    # --- attributes --------------------------------------------------------------------

    def setattr(
        self,
        ino: int,
        caller: Caller,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Stat:
        node = self.inodes.node(ino)
        if size is not None:
            self._truncate(node, size, caller)
        target = self._target(node)
        follow = isinstance(target, int)  # fds take only the default
        if mode is not None:
            os.chmod(target, stat.S_IMODE(mode))
        if uid is not None or gid is not None:
            os.chown(
                target,
                -1 if uid is None else uid,
                -1 if gid is None else gid,
                follow_symlinks=follow,
            )
        if atime_ns is not None or mtime_ns is not None:
            st = os.stat(target, follow_symlinks=follow)
            os.utime(
                target,
                ns=(
                    st.st_atime_ns if atime_ns is None else atime_ns,
                    st.st_mtime_ns if mtime_ns is None else mtime_ns,
                ),
                follow_symlinks=follow,
            )
        return self.getattr(ino)

    def _target(self, node: Node) -> bytes | int:
        """Where to act on a node's backing entry: an open file's fd, which outlives the
        file's names (unlinked or replaced while open), else its path, never to be followed
        (``follow_symlinks=isinstance(target, int)``: fds take only the default)."""
        return node.file.fd if node.file is not None else self.path(node.ino)

    def _truncate(self, node: Node, size: int, caller: Caller) -> None:
        if node.file is not None:
            self._guard(self._safe_path(node), node.file.truncate, size)
            return
        path = self.path(node.ino)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        fh = self.open(node.ino, os.O_WRONLY, caller)
        try:
            cfile = self._handles[fh].node.file
            assert cfile is not None
            self._guard(path, cfile.truncate, size)
        finally:
            self.release(fh)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.root_path)

    # --- extended attributes (user namespace only) -------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if not name.startswith(b"user."):
            # EOPNOTSUPP, not ENODATA: `ls -l` then stops asking for security.selinux and
            # system.posix_acl_access on every entry (two round trips per file).
            raise OSError(errno.EOPNOTSUPP, "only user.* attributes are supported")
        target = self._target(self.inodes.node(ino))
        return os.getxattr(target, name, follow_symlinks=isinstance(target, int))

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if not name.startswith(b"user."):
            raise OSError(errno.EOPNOTSUPP, "only user.* attributes are supported")
        target = self._target(self.inodes.node(ino))
        os.setxattr(target, name, value, follow_symlinks=isinstance(target, int))

    def listxattr(self, ino: int) -> list[bytes]:
        target = self._target(self.inodes.node(ino))
        names = os.listxattr(target, follow_symlinks=isinstance(target, int))
        return [os.fsencode(n) for n in names if n.startswith("user.")]

    def removexattr(self, ino: int, name: bytes) -> None:
        if not name.startswith(b"user."):
            raise OSError(errno.EOPNOTSUPP, "only user.* attributes are supported")
        target = self._target(self.inodes.node(ino))
        os.removexattr(target, name, follow_symlinks=isinstance(target, int))

    # --- files -------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _decide(self, caller: Caller) -> None:
        """The volume must be authentic before any file is opened or created."""
        try:
            self.verify_volume(caller)
        except VolumeError as exc:
            log.error("%s", exc.message)
            raise

    def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Stat]:
        """Create and open a new encrypted file; the data key is made for ``caller``.

        The file appears under its name only once its header is written (``O_TMPFILE``
        and ``linkat``, or a temporary name and ``link``), so a crash never leaves a
        file without a header.
        """
        path = self._child(parent, name)
        parent_path = self.path(parent)
        self._decide(caller)
        pooled = self.key_pool.take(caller) if self.key_pool is not None else None
        if pooled is not None:
            file_id, data_key = pooled
        else:
            file_id = crypto.random_bytes(format.FILE_ID_SIZE)
            data_key = self.provider.generate_data_key(
                self.volume.key_arn,
                self.volume.file_context(file_id),
                caller,
                os.fsdecode(path),
            )
        header = FileHeader(file_id, self.volume.block_shift, data_key.key_arn, data_key.wrapped)
        self.key_cache.put(caller.uid, caller.gid, file_id, data_key.wrapped, data_key.plaintext)
        keys = FileKeys.derive(data_key.plaintext, file_id)
        fd, temp = open_unnamed(parent_path, mode & 0o7777)
        try:
            cfile = CryptFile.create(fd, header, keys)
            if self.chown_new:
                os.fchown(fd, caller.uid, _new_gid(parent_path, caller))
            if temp is None:
                link_fd(fd, path)
            else:
                try:
                    os.link(temp, path)
                finally:
                    os.unlink(temp)
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        node = self._remember(parent, name, st, 1)
        node.file = cfile
        node.opens += 1
        fh = self._new_fh()
        self._handles[fh] = Handle(node, writable=True)
        return fh, self._stat(node, st, path)

    def open(self, ino: int, flags: int, caller: Caller) -> int:
        """Open a file for ``caller``: one key-service decision per open.

        Raises:
            AccessDeniedException (EACCES), DisabledException / KMSInvalidStateException
            (EKEYREVOKED), NotFoundException (ENOKEY), IntegrityError (EIO).
        """
        node = self.inodes.node(ino)
        path = self.path(ino)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self._decide(caller)
        if node.file is not None:
            header = node.file.header
            self._unwrap(header, caller, path)  # the decision; the keys are known already
        else:
            folder, _, name = path.rpartition(b"/")
            asked = self.read_ahead.opened(folder, name)
            node.file = self._open_backing(path, header_caller=caller, read_ahead=not asked)
        node.opens += 1
        fh = self._new_fh()
        self._handles[fh] = Handle(node, writable)
        if flags & os.O_TRUNC:  # as on Linux, even read-only (the kernel checked write access)
            self._guard(path, node.file.truncate, 0)
        return fh

    def _unwrap(self, header: FileHeader, caller: Caller, path: bytes) -> bytes:
        """The file's data key for ``caller``: the key service's decision, or a recent one
        for the same user from the cache (see :mod:`envfs.keycache`)."""
        wrapped, file_id = header.wrapped_key, header.file_id
        cached = self.key_cache.get(caller.uid, caller.gid, file_id, wrapped)
        if cached is not None:
            return cached
        try:
            data_key = self.provider.decrypt(
                wrapped,
                header.key_arn,
                self.volume.file_context(file_id),
                caller,
                os.fsdecode(path),
            )
        except AccessDeniedException:
            raise
        except KMSError as exc:
            if exc.errno == errno.EIO:
                log.warning("backing file %r: its data key does not unwrap: %s", path, exc)
            elif header.key_arn != self.volume.key_arn:
                # A header naming a key the service does not know (or a malformed ARN) is
                # a damaged or foreign file, not a missing volume key (ENOKEY).
                log.warning("backing file %r: its header names an unusable key: %s", path, exc)
                raise IntegrityError("the header names a key that is not the volume's") from None
            raise
        self.key_cache.put(caller.uid, caller.gid, file_id, wrapped, data_key)
        return data_key

    def _open_backing(
        self, path: bytes, header_caller: Caller, *, read_ahead: bool = True
    ) -> CryptFile:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            try:
                header, raw = read_header(fd, read_ahead=read_ahead)
            except IntegrityError as exc:
                log.warning("backing file %r: %s", path, exc.message)
                raise
            data_key = self._unwrap(header, header_caller, path)
            keys = FileKeys.derive(data_key, header.file_id)
            try:
                return CryptFile.open(fd, header, raw, keys)
            except IntegrityError as exc:
                log.warning("backing file %r: %s", path, exc.message)
                raise
        except BaseException:
            os.close(fd)
            raise

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

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` mode 0: afterwards the file is at least ``offset + length``
        bytes long (the new part reads as zeros) and writes inside that range will not fail
        for want of space. The backing space is reserved first, so ENOSPC leaves the file
        unchanged. Other modes (keep size, punch hole, zero range, ...) give EOPNOTSUPP.
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
        end = offset + length
        if end <= cfile.size:
            return  # every block of the range is written already: nothing is sparse
        shift = cfile.header.block_shift
        current = format.backing_size(cfile.size, shift)
        reserve(cfile.fd, current, format.backing_size(end, shift) - current)
        self._guard(self._safe_path(handle.node), cfile.truncate, end)

    def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        assert handle.node.file is not None
        (os.fdatasync if datasync else os.fsync)(handle.node.file.fd)

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

    def close(self) -> None:
        """Flush every open file to disk and close it (at unmount).

        A file still open here was not released by the kernel: the daemon is stopping
        under its users (SIGTERM). Its writes are in the backing file already; fsync
        makes them survive a crash or power loss that follows.
        """
        open_nodes = {id(h.node): h.node for h in self._handles.values() if h.node.file is not None}
        for node in open_nodes.values():
            assert node.file is not None
            try:
                os.fsync(node.file.fd)
            except OSError as exc:
                log.warning(
                    "backing file %r: fsync at unmount failed: %s",
                    self._safe_path(node),
                    exc.strerror,
                )
        for fh in list(self._handles):
            self.release(fh)
        self.key_cache.clear()
        if self.key_pool is not None:
            self.key_pool.clear()


def _new_gid(parent_path: bytes, caller: Caller) -> int:
    """The group of a new entry: the caller's, or the directory's if it is setgid."""
    parent_st = os.lstat(parent_path)
    return parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else caller.gid


__all__ = ["ROOT_INODE", "EnvfsError", "Handle", "Node", "Stat", "Vfs"]
