"""The plaintext view's extended attributes: the ``user.`` namespace and POSIX ACLs.

``user.`` attributes are the backing entry's own, except envfs's private names
(``user.envfs.*``), which the view neither shows nor lets anyone set. With encrypted names
every ``user.`` attribute is stored encrypted under a name of envfs's own
(``user.envfs.x.*``), so then no name of the view is reserved. Other namespaces are
refused (EOPNOTSUPP).

POSIX ACLs (``system.posix_acl_access``, ``system.posix_acl_default``) are served once
the kernel enforces them (:meth:`ExtendedAttributes.enable_acls`) and kept as private
xattrs of the backing entries (:class:`envfs.files.acl.AclStore`); everything read back is
checked, and a malformed ACL is an integrity failure (EIO, a WARNING with the backing
path), never handed to the kernel. As on ext4, setting an access ACL sets the mode's
bits, a ``chmod`` sets the mask (the stored ACL's owner, group class and other bits
always come from the mode), and a new node gets its ACLs and mode from its parent's
default ACL, or its mode masked by the umask where the parent has none
(:meth:`ExtendedAttributes._inherited`).

What the kernel leaves to a FUSE file system with POSIX ACLs (``fs/fuse/acl.c`` and
``dir.c``, and seen on Linux 6.18): it enforces and caches ACLs, asks for them with
getxattr and hands over ``setfacl``'s value with setxattr; but it sends no setattr for the
mode an access ACL implies, leaves the stored ACL alone on ``chmod`` (it only forgets its
cached copy), computes no ACL for a new node, and, with ``FUSE_CAP_DONT_MASK`` (which
the pyfuse3 build asks for with ACLs), leaves the umask to the file system too (passed as
the request's ``umask``). Nor does pyfuse3 pass ``FUSE_SETXATTR_ACL_KILL_SGID``: the
set-group-ID rule is applied here from the caller.

Mixed into :class:`envfs.files.vfs.Vfs`, whose inodes and backing descriptors it uses.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from typing import NamedTuple

from envfs.errors import IntegrityError
from envfs.files import acl
from envfs.files.acl import Acl, AclStore, MalformedAcl
from envfs.files.backing import proc_path
from envfs.files.dirnames import Names
from envfs.files.inodes import InodeTable, Node
from envfs.files.tree import DirFd
from envfs.identity import Caller

log = logging.getLogger(__name__)


class NewMode(NamedTuple):
    """What a new node gets from its parent: its mode (with the file type bits it was asked
    for), and the access and default ACLs to store (None: none)."""

    mode: int
    access: Acl | None = None
    default: Acl | None = None

    @property
    def has_acls(self) -> bool:
        return self.access is not None or self.default is not None

    @property
    def first_mode(self) -> int:
        """The mode to make the node with: only its owner may use it until its ACLs are
        stored (a crash in between leaves it closed, never open to its group)."""
        perm = self.mode & 0o7777
        return perm & ~0o077 if self.has_acls else perm


class ExtendedAttributes:
    """xattr requests and the ACLs of new nodes, for :class:`envfs.files.vfs.Vfs`."""

    inodes: InodeTable
    acls: AclStore | None
    names: Names
    _euid: int

    # Provided by Vfs.
    def _entry_fd(self, node: Node) -> DirFd:
        raise NotImplementedError

    def _safe_path(self, node: Node) -> bytes:
        raise NotImplementedError

    def enable_acls(self, prefix: bytes | None = None) -> None:
        """Serve POSIX ACLs: call once the kernel enforces them (and leaves create modes
        unmasked). They are kept as ``prefix`` xattrs in the backing folder (default: by
        who runs the mount, see :func:`envfs.files.acl.namespace_prefix`)."""
        self.acls = AclStore(acl.namespace_prefix(self._euid) if prefix is None else prefix)

    def _acl_store(self) -> AclStore:
        if self.acls is None:
            raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are off")
        return self.acls

    def _read_acl(self, target: str, kind: bytes, st: os.stat_result, ino: int) -> Acl | None:
        """An ACL from the backing folder, checked: a malformed one is an integrity failure
        (EIO, logged with the backing path), never handed to the kernel."""
        store = self._acl_store()
        try:
            return store.read(target, kind, st.st_mode)
        except MalformedAcl as exc:
            log.warning(
                "backing entry %r: its %s is not a valid ACL: %s",
                self._safe_path(self.inodes.node(ino)),
                os.fsdecode(store.names[kind]),
                exc,
            )
            raise OSError(errno.EIO, "malformed ACL in the backing folder") from None

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if name in acl.NAMES:
            self._acl_store()
            with self._entry_fd(self.inodes.node(ino)) as fd:
                found = self._read_acl(proc_path(fd), name, os.fstat(fd), ino)
            if found is None:
                raise OSError(errno.ENODATA, "no ACL")
            return found.to_bytes()
        if not name.startswith(b"user."):
            # EOPNOTSUPP, not ENODATA: `ls -l` then stops asking for security.selinux on
            # every entry (a round trip per file).
            raise OSError(errno.EOPNOTSUPP, "only user.* attributes are supported")
        if acl.is_private(name) and not self.names.encrypted:
            raise OSError(errno.ENODATA, "no such attribute")
        node = self.inodes.node(ino)
        stored = self.names.xattr_name(name)
        with self._entry_fd(node) as fd:
            sealed = os.getxattr(proc_path(fd), stored)
        try:
            return self.names.open_xattr(stored, sealed)
        except IntegrityError as exc:
            log.warning("backing entry %r: an xattr: %s", self._safe_path(node), exc.message)
            raise

    def setxattr(self, ino: int, name: bytes, value: bytes, caller: Caller) -> None:
        """Set an xattr; an ACL as ext4 sets it (the mode follows an access ACL).

        ``caller`` (who sets it) keeps a set-group-ID bit only if they are in the file's
        group or are root, as with ``chmod``.
        """
        if name in acl.NAMES:
            self._set_acl(self.inodes.node(ino), name, value, caller)
            return
        _check_user_name(name, encrypted=self.names.encrypted)
        stored = self.names.xattr_name(name)
        with self._entry_fd(self.inodes.node(ino)) as fd:
            os.setxattr(proc_path(fd), stored, self.names.seal_xattr(stored, value))

    def _set_acl(self, node: Node, kind: bytes, value: bytes, caller: Caller) -> None:
        store = self._acl_store()
        try:
            new = Acl.parse(value)
        except MalformedAcl:
            raise OSError(errno.EINVAL, "not a valid ACL") from None
        with self._entry_fd(node) as fd:
            st = os.fstat(fd)
            target = proc_path(fd)
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no ACLs")
            if kind == acl.DEFAULT:
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.EACCES, "only directories have a default ACL")
                store.write(target, kind, new)
                return
            mode = (stat.S_IMODE(st.st_mode) & ~0o777) | new.mode_bits()
            if caller.uid != 0 and st.st_gid != caller.gid and st.st_gid not in caller.groups:
                mode &= ~stat.S_ISGID
            # In this order a crash in between leaves no one more access than either.
            if new.is_minimal:
                os.chmod(target, mode)
                store.remove(target, kind)
            else:
                store.write(target, kind, new)
                os.chmod(target, mode)

    def listxattr(self, ino: int) -> list[bytes]:
        with self._entry_fd(self.inodes.node(ino)) as fd:
            names = os.listxattr(proc_path(fd))
            mode = os.fstat(fd).st_mode
        listed = []
        for stored in map(os.fsencode, names):  # envfs's own and planted ones are not shown
            try:
                name = self.names.view_xattr_name(stored)
            except IntegrityError as exc:
                node = self.inodes.node(ino)
                log.warning("backing entry %r: an xattr: %s", self._safe_path(node), exc.message)
                continue
            if name is not None:
                listed.append(name)
        return listed if self.acls is None else self.acls.listed(names, mode) + listed

    def removexattr(self, ino: int, name: bytes) -> None:
        if name in acl.NAMES:
            store = self._acl_store()
            with self._entry_fd(self.inodes.node(ino)) as fd:
                store.remove(proc_path(fd), name)
            return
        _check_user_name(name, encrypted=self.names.encrypted)
        with self._entry_fd(self.inodes.node(ino)) as fd:
            os.removexattr(proc_path(fd), self.names.xattr_name(name))

    # --- the ACLs of new nodes ---------------------------------------------------------

    def _store_inherited(
        self, dir_fd: int, name: bytes, fd: int, st: os.stat_result, new: NewMode
    ) -> None:
        """Store a new entry's ACLs, then give it its mode; if that fails, remove it."""
        assert self.acls is not None
        target = proc_path(fd)
        try:
            if new.access is not None:
                self.acls.write(target, acl.ACCESS, new.access)
            if new.default is not None:
                self.acls.write(target, acl.DEFAULT, new.default)
            os.chmod(target, (stat.S_IMODE(st.st_mode) & ~0o777) | (new.mode & 0o777))
        except OSError:
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(name, dir_fd=dir_fd)
                else:
                    os.unlink(name, dir_fd=dir_fd)
            raise

    def _inherited(self, parent: int, dir_fd: int, mode: int, umask: int) -> NewMode:
        """A new node's mode and ACLs, by ext4's rules: with a default ACL on the parent,
        its access ACL (and for a directory its default ACL) come from it and the umask
        plays no part; otherwise the mode is masked by the umask."""
        if self.acls is not None and not stat.S_ISLNK(mode):
            default = self._read_acl(proc_path(dir_fd), acl.DEFAULT, os.fstat(dir_fd), parent)
            if default is not None:
                access, new_mode = acl.inherit(default, mode)
                return NewMode(new_mode, access, default if stat.S_ISDIR(mode) else None)
        return NewMode(mode & ~(umask & 0o777))


def _check_user_name(name: bytes, *, encrypted: bool) -> None:
    """Refuse to set or remove an xattr other than a ``user.`` one, or (with plaintext
    names) envfs's private ones.

    Raises:
        OSError: EOPNOTSUPP (not ``user.``) or EPERM (reserved for envfs).
    """
    if not name.startswith(b"user."):
        raise OSError(errno.EOPNOTSUPP, "only user.* attributes are supported")
    if acl.is_private(name) and not encrypted:  # encrypted, a name is no longer envfs's
        raise OSError(errno.EPERM, "reserved attribute name")
