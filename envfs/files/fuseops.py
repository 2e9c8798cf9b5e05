"""The pyfuse3 adapter: converts FUSE requests to :class:`~envfs.files.vfs.Vfs` calls, and errors
to errno answers. Nothing else lives here.

Every handler goes through :func:`_errno_answers`: an ``OSError`` becomes its errno, an
``EnvfsError`` the errno its class names, and anything unexpected is logged with its
traceback and answered ``EIO``. No exception ever escapes a handler, because one that
did would stop the whole mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from envfs.errors import EnvfsError
from envfs.files.vfs import Stat, Vfs
from envfs.identity import Caller

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Attributes and entries may be cached this long by the kernel (PERFORMANCE.md: zero made
# `ls -lR` 50x slower; 1 s and 300 s measured the same). Every change goes through us.
ENTRY_TIMEOUT = 10.0
ATTR_TIMEOUT = 10.0


def _errno_answers(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except EnvfsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in %s; answered EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def entry_attributes(st: Stat) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = st.ino
    attr.generation = 0
    attr.entry_timeout = ENTRY_TIMEOUT
    attr.attr_timeout = ATTR_TIMEOUT
    attr.st_mode = st.mode
    attr.st_nlink = st.nlink
    attr.st_uid = st.uid
    attr.st_gid = st.gid
    attr.st_rdev = st.rdev
    attr.st_size = st.size
    attr.st_blksize = st.blksize
    attr.st_blocks = st.blocks
    attr.st_atime_ns = st.atime_ns
    attr.st_mtime_ns = st.mtime_ns
    attr.st_ctime_ns = st.ctime_ns
    return attr


class Operations(pyfuse3.Operations):
    """FUSE operations over a :class:`Vfs`."""

    supports_dot_lookup = True
    # Off: with the kernel's writeback cache, write() returns once the data is in the page
    # cache, so a stop (SIGTERM, lazy unmount) while a file is still open loses writes the
    # writer saw succeed (tests/integration/test_systemd_protocol.py). Measured gain on
    # untar: about 10 %, not worth that.
    enable_writeback_cache = False

    def __init__(self, vfs: Vfs, *, acl: bool = True) -> None:
        """``acl``: serve POSIX ACLs (``-o noacl``: not; the kernel then asks for no ACL
        before a permission check or an ``ls -l``, a round trip per file seen first)."""
        super().__init__()
        self.vfs = vfs
        self.want_acl = acl
        # POSIX ACLs only with a pyfuse3 that also asks for create modes unmasked
        # (scripts/build_pyfuse3.py): stock pyfuse3 would have the kernel mask them with
        # the umask before a default ACL could decide.
        self.enable_acl = acl and bool(getattr(pyfuse3, "_envfs_acl", 0))

    def init(self) -> None:
        # Called by pyfuse3 once the kernel's capabilities are negotiated, before any request.
        if self.enable_acl and getattr(pyfuse3, "_envfs_acl_granted", False):
            self.vfs.enable_acls()
            assert self.vfs.acls is not None
            log.info(
                "POSIX ACLs on, kept in the backing folder as %s*",
                os.fsdecode(self.vfs.acls.prefix),
            )
        elif self.enable_acl:
            log.warning("the kernel does not offer POSIX ACLs: setfacl gives EOPNOTSUPP")
        elif self.want_acl:
            log.warning(
                "this pyfuse3 cannot leave create modes unmasked: POSIX ACLs are off "
                "(install pyfuse3 with scripts/build_pyfuse3.py)"
            )
        else:
            log.info("POSIX ACLs off (-o noacl)")

    def _caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        return self.vfs.caller(ctx.uid, ctx.gid)

    def _unlock(self, ctx: pyfuse3.RequestContext) -> None:
        """Before a request that reads or makes names: a volume with encrypted names gets
        its name keys with the first request of a user who may use its key."""
        if not self.vfs.names.ready:
            self.vfs.unlock_names(self._caller(ctx))

    # --- names and attributes ----------------------------------------------------------

    @_errno_answers
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._unlock(ctx)
        try:
            return entry_attributes(self.vfs.lookup(parent_inode, name))
        except FileNotFoundError:
            # A negative entry the kernel may cache like a positive one (st_ino 0): tools
            # probe for names before creating them. Our own creates replace it at once.
            missing = pyfuse3.EntryAttributes()
            missing.st_ino = 0
            missing.entry_timeout = ENTRY_TIMEOUT
            return missing

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            try:
                self.vfs.forget(inode, count)
            except Exception:
                log.exception("unexpected error in forget")

    @_errno_answers
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.vfs.getattr(inode))

    @_errno_answers
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        st = self.vfs.setattr(
            inode,
            self._caller(ctx) if fields.update_size else None,  # only a size is decided
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return entry_attributes(st)

    @_errno_answers
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self._unlock(ctx)
        return self.vfs.readlink(inode)

    @_errno_answers
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self.vfs.statfs()
        data = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, name, getattr(sv, name))
        return data

    # --- directories -------------------------------------------------------------------

    @_errno_answers
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._unlock(ctx)
        return self.vfs.opendir(inode)

    @_errno_answers
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, st, next_id in self.vfs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, entry_attributes(st), next_id):
                self.vfs.forget(st.ino, 0)
                break
            self.vfs.add_lookup(st.ino)

    @_errno_answers
    async def releasedir(self, fh: int) -> None:
        self.vfs.releasedir(fh)

    @_errno_answers
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._unlock(ctx)
        st = self.vfs.mkdir(parent_inode, name, mode, self._caller(ctx), umask=ctx.umask)
        return entry_attributes(st)

    @_errno_answers
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._unlock(ctx)
        self.vfs.rmdir(parent_inode, name)

    @_errno_answers
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._unlock(ctx)
        return entry_attributes(self.vfs.symlink(parent_inode, name, target, self._caller(ctx)))

    @_errno_answers
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._unlock(ctx)
        st = self.vfs.mknod(parent_inode, name, mode, rdev, self._caller(ctx), umask=ctx.umask)
        return entry_attributes(st)

    @_errno_answers
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._unlock(ctx)
        self.vfs.unlink(parent_inode, name)

    @_errno_answers
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._unlock(ctx)
        return entry_attributes(self.vfs.link(inode, new_parent_inode, new_name))

    @_errno_answers
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._unlock(ctx)
        self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # --- extended attributes -----------------------------------------------------------

    @_errno_answers
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._unlock(ctx)
        return self.vfs.getxattr(inode, name)

    @_errno_answers
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self._unlock(ctx)
        self.vfs.setxattr(inode, name, value, self._caller(ctx))

    @_errno_answers
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._unlock(ctx)
        return self.vfs.listxattr(inode)

    @_errno_answers
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._unlock(ctx)
        self.vfs.removexattr(inode, name)

    # --- files -------------------------------------------------------------------------

    @_errno_answers
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._unlock(ctx)
        fh, st = self.vfs.create(
            parent_inode, name, mode, flags, self._caller(ctx), umask=ctx.umask
        )
        return pyfuse3.FileInfo(fh=fh), entry_attributes(st)

    @_errno_answers
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=self.vfs.open(inode, flags, self._caller(ctx)))

    @_errno_answers
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.vfs.read(fh, off, size)

    @_errno_answers
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.vfs.write(fh, off, buf)

    @_errno_answers
    async def flush(self, fh: int) -> None:
        # Writes reach the backing file at once, so a flush has nothing to do. ENOSYS tells
        # the kernel to stop sending one on every close (one round trip per file).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errno_answers
    async def fallocate(
        self, fh: int, mode: int, offset: int, length: int, ctx: pyfuse3.RequestContext
    ) -> None:
        # Called only by a pyfuse3 built with scripts/build_pyfuse3.py (stock pyfuse3 has
        # no fallocate handler: the kernel then answers EOPNOTSUPP by itself).
        self.vfs.fallocate(fh, mode, offset, length, self._caller(ctx))

    @_errno_answers
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.vfs.fsync(fh, datasync)

    @_errno_answers
    async def release(self, fh: int) -> None:
        self.vfs.release(fh)
