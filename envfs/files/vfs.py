"""The encrypted filesystem without FUSE: the namespace of the plaintext view.

``Vfs`` serves a plaintext view of a backing folder. Directories, symlinks, FIFOs, sockets
and device nodes are stored as they are; regular files are encrypted
(:mod:`envfs.files.cryptfile`), each with its own data key from the key service.

Every ``open`` and ``create``, and every content change not made through a handle the user
opened (``truncate(2)``, ``ftruncate(2)``, ``O_TRUNC``, ``fallocate(2)``), is a key
decision for the calling user, made by :class:`~.keyaccess.KeyAccess` (:attr:`Vfs.access`)
whether or not the file is open already. Files already open keep working if the key is
disabled afterwards.

Open files and their handles are :mod:`.openfiles`'s (mixed into ``Vfs``). Inodes and the
names they are known by are kept by :mod:`.inodes`; the backing folder is reached only
through directory descriptors (:mod:`.tree`), never by path. Extended
attributes and POSIX ACLs (which the kernel enforces; a new node's mode and ACLs come from
its parent's default ACL or the umask) are :mod:`.xattrs`'s. Leftovers of interrupted
creates are removed when a ``Vfs`` is made (:mod:`.leftovers`).

All methods are synchronous and raise ``OSError`` (with an errno) or an ``EnvfsError``;
the FUSE adapter turns both into errno answers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from envfs.errors import (
    EnvfsError,
    IntegrityError,
)
from envfs.files import fileformat
from envfs.files import names as name_format
from envfs.files.acl import AclStore
from envfs.files.backing import TEMP_PREFIX, chown_fd, link_fd, proc_path, renameat2
from envfs.files.dirnames import EncryptedNames, Entry, Names, PlainNames
from envfs.files.inodes import ROOT_INODE, InodeTable, Node
from envfs.files.journal import JOURNAL_DIR, Journal
from envfs.files.keyaccess import KeyAccess
from envfs.files.keycache import DataKeyCache
from envfs.files.keypool import DataKeyPool
from envfs.files.leftovers import remove_new_dir, remove_stale_temporaries
from envfs.files.openfiles import Handle, OpenFiles, new_gid
from envfs.files.readahead import FolderReadAhead
from envfs.files.tree import BackingTree, DirFd, open_path
from envfs.files.volume import VOLUME_FILE, Volume
from envfs.files.xattrs import ExtendedAttributes, NewMode
from envfs.identity import Caller
from envfs.keys.provider import KeyProvider

log = logging.getLogger(__name__)
T = TypeVar("T")

HIDDEN_AT_ROOT = frozenset(
    {VOLUME_FILE.encode(), (VOLUME_FILE + ".tmp").encode(), JOURNAL_DIR.encode()}
)
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_NODE_KINDS = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)


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


class Vfs(OpenFiles, ExtendedAttributes):
    """The plaintext view of one volume.

    Args:
        volume: the loaded volume (its file is verified here or on first use).
        provider: the key service, called on behalf of each user.
        chown_new: give new files and directories to the calling user (root-run,
            multi-user mounts); otherwise they belong to the daemon's user.
        key_cache, key_pool: see :class:`~.keyaccess.KeyAccess`, which makes every key
            decision (:attr:`access`).
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
        self.access = KeyAccess(volume, provider, key_cache=key_cache, key_pool=key_pool)
        self.chown_new = chown_new
        self.root_path = os.fsencode(volume.backing.resolve())
        st = os.lstat(self.root_path)
        self.inodes = InodeTable(self.root_path, (st.st_dev, st.st_ino))
        self.tree = BackingTree(self.root_path, self.inodes)
        self.names: Names = (
            EncryptedNames(volume.volume_id, lambda: self.access.name_keys)
            if volume.encrypted_names
            else PlainNames(HIDDEN_AT_ROOT)
        )
        self._link_sizes: dict[tuple[int, int, int], int] = {}  # a symlink's target is fixed
        self.journal = Journal(self.tree.root_fd, self.root_path)
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, tuple[int, list[tuple[bytes, bytes]]]] = {}
        self._next_fh = 1
        self.read_ahead = FolderReadAhead(self._open_file, view_name=self._view_name)
        self._euid = os.geteuid()
        self.acls: AclStore | None = None  # POSIX ACLs: off until the kernel enforces them
        remove_stale_temporaries(
            self.tree.root_fd, self.root_path, encrypted_names=volume.encrypted_names
        )

    def verify_volume(self, caller: Caller) -> None:
        """Authenticate the volume file as ``caller`` unless already done (see
        :meth:`KeyAccess.verify_volume`)."""
        self.access.verify_volume(caller)

    def unlock_names(self, caller: Caller) -> None:
        """Make the volume's names readable if they are not yet: authenticate the volume
        as ``caller`` (a refusal is that request's ``EACCES``)."""
        if not self.names.ready:
            self.access.decide(caller)

    def caller(self, uid: int, gid: int) -> Caller:
        """The identity of a FUSE request's user, with its groups (see :mod:`.callers`)."""
        return self.access.caller(uid, gid)

    # --- nodes and entries -------------------------------------------------------------

    def path(self, ino: int) -> bytes:
        """The backing path of a node (for messages only)."""
        return self.inodes.path(ino)

    def _entry(self, parent: int, dir_fd: int, name: bytes) -> Entry:
        """The backing entry of the view's ``name`` in the directory ``parent`` (open as
        ``dir_fd``).

        Raises:
            OSError: EINVAL, ENAMETOOLONG, ENOENT (a reserved name), EACCES (the names are
                still locked).
            IntegrityError: the directory's id file is damaged (logged).
        """
        try:
            return self.names.entry(
                dir_fd, self.inodes.node(parent).key, name, parent == ROOT_INODE
            )
        except IntegrityError as exc:
            log.warning("backing folder %r: %s", self.path(parent), exc.message)
            raise

    def _remember(self, parent: int, name: bytes, st: os.stat_result, lookups: int) -> Node:
        return self.inodes.remember(parent, name, (st.st_dev, st.st_ino), lookups)

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)

    def add_lookup(self, ino: int) -> None:
        self.inodes.node(ino).lookups += 1

    def _lstat(self, ino: int) -> os.stat_result:
        """The backing attributes of a node (its entry, no symlink followed)."""
        if ino == ROOT_INODE:
            return os.fstat(self.tree.root_fd)
        parent, name = self.inodes.entry(ino)
        with self.tree.dir(parent) as dir_fd:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)

    def _entry_fd(self, node: Node) -> DirFd:
        """A descriptor of a node's backing entry itself for a ``with`` block: an open file's
        (it outlives the file's names), the root's, or an ``O_PATH`` one of the entry, which
        must still be the node's (ESTALE otherwise). Calls that take no ``O_PATH``
        descriptor use its :func:`proc_path`, which reaches exactly that entry."""
        if node.file is not None:
            return DirFd(node.file.fd, False)
        if node.ino == ROOT_INODE:
            return DirFd(self.tree.root_fd, False)
        parent, name = self.inodes.entry(node.ino)
        with self.tree.dir(parent) as dir_fd:
            fd = open_path(dir_fd, name)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != node.key:
            os.close(fd)
            raise OSError(errno.ESTALE, "the backing folder changed: another entry")
        return DirFd(fd, True)

    def _stat(self, node: Node, st: os.stat_result) -> Stat:
        """Attributes in the plaintext view from the backing ``st``."""
        size = st.st_size
        if stat.S_ISLNK(st.st_mode) and self.names.encrypted:
            size = self._link_size(node, st)
        elif stat.S_ISREG(st.st_mode):
            if node.file is not None:
                size = node.file.size
            else:
                try:
                    size = fileformat.plaintext_size(st.st_size, self.volume.block_shift)
                except IntegrityError:
                    log.warning(
                        "backing file %r has an impossible size %d",
                        self._safe_path(node),
                        st.st_size,
                    )
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

    def _link_size(self, node: Node, st: os.stat_result) -> int:
        """The length of a symlink's plaintext target (the backing one is longer)."""
        key = (*node.key, st.st_ctime_ns)  # an inode number may come back as another link
        size = self._link_sizes.get(key)
        if size is None:
            try:
                size = len(self.readlink(node.ino))
            except (OSError, EnvfsError):
                return st.st_size
            if len(self._link_sizes) >= 65536:
                self._link_sizes.clear()
            self._link_sizes[key] = size
        return size

    def _view_name(self, folder: int, dir_fd: int, backing: bytes) -> bytes | None:
        """The plaintext view's name of an entry of ``folder``, if it has one (for the
        read-ahead's order: failures are only said where names are listed)."""
        try:
            return self.names.plain(
                dir_fd, self.inodes.node(folder).key, backing, folder == ROOT_INODE
            )
        except (IntegrityError, OSError):
            return None

    def lookup(self, parent: int, name: bytes) -> Stat:
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            node = self.inodes.node(parent)
            up = next(iter(node.links))[0] if node.links else ROOT_INODE
            return self.getattr(up)
        with self.tree.dir(parent) as dir_fd:
            entry = self._entry(parent, dir_fd, name)
            st = os.stat(entry.backing, dir_fd=dir_fd, follow_symlinks=False)
        return self._stat(self._remember(parent, entry.backing, st, 1), st)

    def getattr(self, ino: int) -> Stat:
        node = self.inodes.node(ino)
        if node.file is not None:  # its fd outlives its names (unlinked or replaced while open)
            return self._stat(node, os.fstat(node.file.fd))
        return self._stat(node, self._lstat(ino))

    # --- directories -------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        with self.tree.dir(ino):  # ENOENT, ENOTDIR... now rather than at the first read
            pass
        fh = self._new_fh()
        self._dirs[fh] = (ino, [])
        return fh

    def _listing(self, ino: int) -> list[tuple[bytes, bytes]]:
        """The entries of a directory, sorted by their names in the view (the order the
        read-ahead expects), without envfs's own: pairs of backing name and name in the
        view. An entry whose name does not decrypt here
        (moved from another directory, edited) is left out, with a warning."""
        key = self.inodes.node(ino).key
        with self.tree.dir(ino) as dir_fd:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                backing = sorted(os.fsencode(n) for n in os.listdir(fd))
            finally:
                os.close(fd)
            if isinstance(self.names, EncryptedNames):
                try:
                    self.names.dir_id(dir_fd, key)
                except IntegrityError as exc:
                    log.warning("backing folder %r: %s", self.path(ino), exc.message)
                    raise
            listed = []
            for name in backing:
                try:
                    plain = self.names.plain(dir_fd, key, name, ino == ROOT_INODE)
                except IntegrityError as exc:
                    log.warning(
                        "backing entry %r: %s: not listed",
                        self.path(ino) + b"/" + name,
                        exc.message,
                    )
                    continue
                if plain is not None:
                    listed.append((name, plain))
        if isinstance(self.names, EncryptedNames):
            listed.sort(key=lambda entry: entry[1])  # the view's order, as with plain names
        return listed

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Stat, int]]:
        """Entries of an open directory from index ``start``: (name, attributes, next).

        The names are listed when reading starts at the beginning (the first read, or one
        after ``rewinddir``), so offsets stay stable while a listing is read. Nodes are
        registered without a lookup; call :meth:`add_lookup` for each entry the kernel
        accepted.
        """
        if fh not in self._dirs:
            raise OSError(errno.EBADF, "bad directory handle")
        ino, entries = self._dirs[fh]
        if start == 0:  # the first read, or one after rewinddir: the directory as it is now
            entries = self._listing(ino)
            self._dirs[fh] = (ino, entries)
        with self.tree.dir(ino) as dir_fd:
            for index in range(start, len(entries)):
                backing, name = entries[index]
                try:
                    st = os.stat(backing, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since opendir
                node = self._remember(ino, backing, st, 0)
                yield name, self._stat(node, st), index + 1

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def _new_entry(
        self,
        parent: int,
        dir_fd: int,
        name: bytes,
        kind: int,
        caller: Caller,
        new: NewMode | None = None,
    ) -> Stat:
        """Register an entry just made in ``dir_fd`` (with ``new.first_mode``): store its
        inherited ACLs and give it its mode; on a multi-user mount, give it to its creator
        (setgid folders keep their group).

        The entry is checked before it is given away: still of the kind made, and still
        the daemon's. Someone who swapped another entry in meanwhile gets nothing chowned.
        """
        fd = open_path(dir_fd, name)
        try:
            st = os.fstat(fd)
            if stat.S_IFMT(st.st_mode) != kind or (self.chown_new and st.st_uid != self._euid):
                log.warning(
                    "backing entry %r changed while it was made: left as it is",
                    self.path(parent) + b"/" + name,
                )
                raise OSError(errno.EIO, "the backing folder changed under the mount")
            if new is not None and new.has_acls:
                self._store_inherited(dir_fd, name, fd, st, new)
                st = os.fstat(fd)
            if self.chown_new:
                chown_fd(fd, caller.uid, new_gid(dir_fd, caller))
                st = os.fstat(fd)
        finally:
            os.close(fd)
        return self._stat(self._remember(parent, name, st, 1), st)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller, *, umask: int = 0) -> Stat:
        with self.tree.dir(parent) as dir_fd:
            entry = self._entry(parent, dir_fd, name)
            new = self._inherited(parent, dir_fd, stat.S_IFDIR | (mode & 0o7777), umask)
            if isinstance(self.names, EncryptedNames):
                self._make_dir(dir_fd, entry, new.first_mode)
            else:
                os.mkdir(entry.backing, new.first_mode, dir_fd=dir_fd)
            return self._new_entry(parent, dir_fd, entry.backing, stat.S_IFDIR, caller, new)

    def _make_dir(self, dir_fd: int, entry: Entry, mode: int) -> None:
        """Make a directory with encrypted names: under a temporary name, with its id file
        written while it is still the daemon's own ``0700``, then given ``mode`` exactly
        and renamed into place. A crash leaves only the temporary directory, removed at
        the next mount (:mod:`.leftovers`)."""
        assert isinstance(self.names, EncryptedNames)
        temp = TEMP_PREFIX + os.urandom(8).hex().encode()
        os.mkdir(temp, 0o700, dir_fd=dir_fd)
        try:
            fd = os.open(temp, _LIST_FLAGS, dir_fd=dir_fd)
            try:
                st = os.fstat(fd)
                if st.st_uid != self._euid:
                    raise OSError(errno.EIO, "the backing folder changed under the mount")
                self.names.write_dir_file(fd, name_format.new_dir_id())
                # As mkdir(2): the mode's permission and sticky bits; set-group-ID only
                # from a set-group-ID parent (the kernel gave it to the new directory).
                os.chmod(fd, (mode & 0o1777) | (st.st_mode & stat.S_ISGID))
            finally:
                os.close(fd)
            self.names.add_name_file(dir_fd, entry)
            renameat2(dir_fd, temp, dir_fd, entry.backing, RENAME_NOREPLACE)
        except BaseException:
            remove_new_dir(dir_fd, temp)
            raise

    def rmdir(self, parent: int, name: bytes) -> None:
        with self.tree.dir(parent) as dir_fd:
            entry = self._entry(parent, dir_fd, name)
            if isinstance(self.names, EncryptedNames):
                self._remove_dir(dir_fd, entry)
            else:
                os.rmdir(entry.backing, dir_fd=dir_fd)
            self.names.remove_name_file(dir_fd, entry)
        self.inodes.unlink_name(parent, entry.backing)

    def _remove_dir(self, dir_fd: int, entry: Entry) -> None:
        """Remove an empty directory with encrypted names: its id file first, put back if
        the directory cannot be removed after all."""
        try:
            fd = os.open(entry.backing, _LIST_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(errno.ENOTDIR, "not a directory") from None
            raise
        try:
            if any(os.fsencode(n) != name_format.DIR_FILE for n in os.listdir(fd)):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))
            with self._without_dir_file(fd):
                os.rmdir(entry.backing, dir_fd=dir_fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _without_dir_file(self, fd: int) -> Iterator[None]:
        """For the body, the directory open as ``fd`` has no id file (so that it can be
        removed, or replaced by a rename, as an empty directory); the file is put back if
        the body fails. A read-only directory of the daemon's own is made writable for
        the moment it takes."""
        assert isinstance(self.names, EncryptedNames)
        st = os.fstat(fd)
        try:
            dir_id: bytes | None = self.names.dir_id(fd, (st.st_dev, st.st_ino))
        except IntegrityError:
            dir_id = None  # damaged or missing: nothing worth putting back
        mode = stat.S_IMODE(st.st_mode)
        try:
            os.unlink(name_format.DIR_FILE, dir_fd=fd)
        except FileNotFoundError:
            pass
        except PermissionError:
            if st.st_uid != self._euid:
                raise
            os.chmod(fd, mode | stat.S_IRWXU)
            os.unlink(name_format.DIR_FILE, dir_fd=fd)
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                if dir_id is not None:
                    self.names.write_dir_file(fd, dir_id)
                os.chmod(fd, mode)
            raise
        self.names.forget_dir((st.st_dev, st.st_ino))

    def _replacing(
        self, flags: int, old_dir: int, old: Entry, new_dir: int, new: Entry
    ) -> contextlib.AbstractContextManager[None]:
        if isinstance(self.names, EncryptedNames) and not flags:
            return self._replaceable(old_dir, old, new_dir, new)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _replaceable(self, old_dir: int, old: Entry, new_dir: int, new: Entry) -> Iterator[None]:
        """For a rename of a directory onto an empty one (with encrypted names): the
        target without its id file for the body, so that the backing rename may replace
        it. Anything else is left to the backing rename's own checks."""
        try:
            source = os.stat(old.backing, dir_fd=old_dir, follow_symlinks=False)
            fd = os.open(new.backing, _LIST_FLAGS, dir_fd=new_dir)
        except OSError:
            fd = -1  # no such directory: nothing to make room in
        if fd < 0:
            yield
            return
        try:
            target = os.fstat(fd)
            if (
                not stat.S_ISDIR(source.st_mode)
                or (source.st_dev, source.st_ino) == (target.st_dev, target.st_ino)
                or any(os.fsencode(n) != name_format.DIR_FILE for n in os.listdir(fd))
            ):
                yield
                return
            with self._without_dir_file(fd):
                yield
        finally:
            os.close(fd)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Stat:
        with self.tree.dir(parent) as dir_fd:
            entry = self._entry(parent, dir_fd, name)
            stored = self.names.seal_target(target)
            self.names.add_name_file(dir_fd, entry)
            os.symlink(stored, entry.backing, dir_fd=dir_fd)
            return self._new_entry(parent, dir_fd, entry.backing, stat.S_IFLNK, caller)

    def readlink(self, ino: int) -> bytes:
        parent, name = self.inodes.entry(ino)
        with self.tree.dir(parent) as dir_fd:
            stored = os.readlink(name, dir_fd=dir_fd)
        try:
            return self.names.open_target(stored)
        except IntegrityError as exc:
            log.warning("backing symlink %r: %s", self.path(ino), exc.message)
            raise

    def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller, *, umask: int = 0
    ) -> Stat:
        """Make a regular file (encrypted, as ``create``), a FIFO, a socket or a device node.

        Device nodes are root's, as on any filesystem (the kernel checks ``CAP_MKNOD``
        before asking; this checks the caller is root too). The mount is ``nodev`` unless
        mounted with ``-o dev``, so they can be made and listed but not used as devices.
        """
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            fh, attr = self.create(parent, name, mode, os.O_WRONLY, caller, umask=umask)
            self.release(fh)
            return attr
        if kind not in _NODE_KINDS:
            raise OSError(errno.EINVAL, "not a kind of file mknod makes")
        if kind in (stat.S_IFCHR, stat.S_IFBLK) and caller.uid != 0:
            raise OSError(errno.EPERM, "only root makes device nodes")
        with self.tree.dir(parent) as dir_fd:
            entry = self._entry(parent, dir_fd, name)
            new = self._inherited(parent, dir_fd, kind | (mode & 0o7777), umask)
            self.names.add_name_file(dir_fd, entry)
            os.mknod(entry.backing, kind | new.first_mode, rdev, dir_fd=dir_fd)
            return self._new_entry(parent, dir_fd, entry.backing, kind, caller, new)

    def unlink(self, parent: int, name: bytes) -> None:
        with self.tree.dir(parent) as dir_fd:
            entry = self._entry(parent, dir_fd, name)
            os.unlink(entry.backing, dir_fd=dir_fd)
            self.names.remove_name_file(dir_fd, entry)
        self.inodes.unlink_name(parent, entry.backing)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Stat:
        node = self.inodes.node(ino)
        with self.tree.dir(new_parent) as new_dir:
            entry = self._entry(new_parent, new_dir, new_name)
            new_name = entry.backing
            self.names.add_name_file(new_dir, entry)
            if node.file is not None:  # exactly the open file, even if renamed meanwhile
                link_fd(node.file.fd, new_dir, new_name)
            else:
                parent, name = self.inodes.entry(ino)
                with self.tree.dir(parent) as dir_fd:
                    os.link(
                        name, new_name, src_dir_fd=dir_fd, dst_dir_fd=new_dir, follow_symlinks=False
                    )
            st = os.stat(new_name, dir_fd=new_dir, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != node.key:
                os.unlink(new_name, dir_fd=new_dir)
                raise OSError(errno.ESTALE, "the backing folder changed: another entry")
        return self._stat(self._remember(new_parent, new_name, st, 1), st)

    def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unknown rename flags")
        with self.tree.dir(parent) as old_dir:
            old = self._entry(parent, old_dir, name)
            if new_parent == parent:
                new = self._entry(new_parent, old_dir, new_name)
                self.names.add_name_file(old_dir, new)
                with self._replacing(flags, old_dir, old, old_dir, new):
                    renameat2(old_dir, old.backing, old_dir, new.backing, flags)
                if not flags & RENAME_EXCHANGE and old != new:
                    self.names.remove_name_file(old_dir, old)
            else:
                with self.tree.dir(new_parent) as new_dir:
                    new = self._entry(new_parent, new_dir, new_name)
                    self.names.add_name_file(new_dir, new)
                    with self._replacing(flags, old_dir, old, new_dir, new):
                        renameat2(old_dir, old.backing, new_dir, new.backing, flags)
                if not flags & RENAME_EXCHANGE:
                    self.names.remove_name_file(old_dir, old)
        name, new_name = old.backing, new.backing
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
        caller: Caller | None,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Stat:
        """Change a node's attributes; a new size is a key decision for ``caller`` (who must
        then be given)."""
        node = self.inodes.node(ino)
        if size is not None:
            if caller is None:
                raise ValueError("a change of size needs the caller")
            self._truncate(node, size, caller)
        if mode is None and uid is None and gid is None and atime_ns is None and mtime_ns is None:
            return self.getattr(ino)
        with self._entry_fd(node) as fd:
            st = os.fstat(fd)
            target = proc_path(fd)  # reaches the entry itself, a symlink too
            if mode is not None:
                if stat.S_ISLNK(st.st_mode):
                    raise OSError(errno.EOPNOTSUPP, "symlinks have no mode of their own")
                os.chmod(target, stat.S_IMODE(mode))
            if uid is not None or gid is not None:
                chown_fd(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            if atime_ns is not None or mtime_ns is not None:
                os.utime(
                    target,
                    ns=(
                        st.st_atime_ns if atime_ns is None else atime_ns,
                        st.st_mtime_ns if mtime_ns is None else mtime_ns,
                    ),
                )
            return self._stat(node, os.fstat(fd))

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.tree.root_fd)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

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
        self.access.close()
        self.read_ahead.close()
        self.journal.close()
        self.tree.close()


__all__ = ["ROOT_INODE", "EnvfsError", "Handle", "Node", "Stat", "Vfs"]
