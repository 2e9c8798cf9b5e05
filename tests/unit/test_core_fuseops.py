"""The pyfuse3 adapter without a mount: ``Operations`` handlers awaited directly under trio.

The adapter converts a request's arguments to a ``Vfs`` call with the request's user as
the caller, and every failure to ``pyfuse3.FUSEError`` with the right errno; an unexpected
exception is logged and answered ``EIO``, never let out (it would stop the mount).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import pyfuse3
import pytest

from envfs.files import fileformat, fuseops
from envfs.files.fuseops import ATTR_TIMEOUT, ENTRY_TIMEOUT, Operations
from envfs.files.inodes import ROOT_INODE
from envfs.files.vfs import RENAME_NOREPLACE, Vfs
from envfs.files.volume import Volume
from envfs.identity import Caller
from tests.unit.fakekeys import KEY_USER, STRANGER, FakeKeyProvider


@dataclass
class Context:
    """What the adapter reads of a ``pyfuse3.RequestContext`` (whose attributes only
    pyfuse3 can set)."""

    uid: int
    gid: int
    pid: int = 4242
    umask: int = 0o022


@dataclass
class Fields:
    """A ``pyfuse3.SetattrFields``: which attributes a setattr request changes."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def ctx(caller: Caller, umask: int = 0o022) -> pyfuse3.RequestContext:
    return cast(pyfuse3.RequestContext, Context(caller.uid, caller.gid, umask=umask))


def fields(**changed: bool) -> pyfuse3.SetattrFields:
    return cast(pyfuse3.SetattrFields, Fields(**changed))


# The kernel's readdir buffer; only pyfuse3.readdir_reply (replaced where it is used) reads it.
NO_TOKEN = cast(pyfuse3.ReaddirToken, None)


USER_CTX = ctx(KEY_USER)
STRANGER_CTX = ctx(STRANGER)


@pytest.fixture
def ops(vfs: Vfs) -> Operations:
    return Operations(vfs)


async def fuse_errno(request: Awaitable[object]) -> int:
    """The errno a request is answered with; it must fail with a ``FUSEError``."""
    with pytest.raises(pyfuse3.FUSEError) as answer:
        await request
    return answer.value.errno


async def new_file(ops: Operations, name: bytes, data: bytes, caller: Caller = KEY_USER) -> int:
    info, attr = await ops.create(ROOT_INODE, name, 0o644, os.O_WRONLY, ctx(caller))
    assert await ops.write(info.fh, 0, data) == len(data)
    await ops.release(info.fh)
    return attr.st_ino


# --- answers -----------------------------------------------------------------------------


async def test_create_write_open_read_round_trip(ops: Operations, volume: Volume) -> None:
    info, attr = await ops.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, USER_CTX)
    assert (stat.S_ISREG(attr.st_mode), attr.st_size) == (True, 0)
    assert await ops.write(info.fh, 0, b"hello world") == 11
    await ops.release(info.fh)
    opened = await ops.open(attr.st_ino, os.O_RDONLY, USER_CTX)
    assert await ops.read(opened.fh, 6, 100) == b"world"
    await ops.release(opened.fh)
    assert b"hello" not in (volume.backing / "f").read_bytes()


async def test_lookup_answers_attributes_the_kernel_may_cache(ops: Operations) -> None:
    ino = await new_file(ops, b"f", b"x" * 100)
    attr = await ops.lookup(ROOT_INODE, b"f", USER_CTX)
    assert (attr.st_ino, attr.st_size, attr.st_nlink) == (ino, 100, 1)
    assert (attr.entry_timeout, attr.attr_timeout) == (ENTRY_TIMEOUT, ATTR_TIMEOUT)
    assert (await ops.getattr(ino, USER_CTX)).st_size == 100


async def test_a_missing_name_is_a_negative_entry_not_an_error(ops: Operations) -> None:
    missing = await ops.lookup(ROOT_INODE, b"missing", USER_CTX)
    assert (missing.st_ino, missing.entry_timeout) == (0, ENTRY_TIMEOUT)


async def test_the_caller_is_the_request_s_user(
    ops: Operations, fake_keys: FakeKeyProvider
) -> None:
    ino = await new_file(ops, b"f", b"x")
    assert await fuse_errno(ops.open(ino, os.O_RDONLY, STRANGER_CTX)) == errno.EACCES
    assert await fuse_errno(ops.create(ROOT_INODE, b"g", 0o644, 0, STRANGER_CTX)) == errno.EACCES
    assert fake_keys.decisions()[-2:] == [
        ("Decrypt", STRANGER.uid, "AccessDeniedException"),
        ("GenerateDataKey", STRANGER.uid, "AccessDeniedException"),
    ]


async def test_setattr_asks_for_a_decision_only_for_a_new_size(
    ops: Operations, fake_keys: FakeKeyProvider
) -> None:
    ino = await new_file(ops, b"f", b"0123456789")
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o600
    attr.st_size = 4
    asked = len(fake_keys.calls)
    changed = await ops.setattr(ino, attr, fields(update_mode=True), None, STRANGER_CTX)
    assert (stat.S_IMODE(changed.st_mode), changed.st_size) == (0o600, 10)
    assert len(fake_keys.calls) == asked
    resize = fields(update_size=True)
    assert await fuse_errno(ops.setattr(ino, attr, resize, None, STRANGER_CTX)) == errno.EACCES
    assert (await ops.setattr(ino, attr, resize, None, USER_CTX)).st_size == 4
    assert [
        (c.uid, c.outcome, c.note.endswith(" (truncate)")) for c in fake_keys.calls[asked:]
    ] == [
        (STRANGER.uid, "AccessDeniedException", True),
        (KEY_USER.uid, "ok", True),
    ]


async def test_the_request_s_umask_shapes_new_nodes(ops: Operations, volume: Volume) -> None:
    folder = await ops.mkdir(ROOT_INODE, b"d", 0o777, ctx(KEY_USER, umask=0o027))
    assert stat.S_IMODE(folder.st_mode) == 0o750
    info, attr = await ops.create(ROOT_INODE, b"f", 0o666, os.O_WRONLY, ctx(KEY_USER, 0o077))
    await ops.release(info.fh)
    assert stat.S_IMODE(attr.st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(volume.backing / "f").st_mode) == 0o600


async def test_names_links_and_xattrs_through_the_adapter(ops: Operations) -> None:
    ino = await new_file(ops, b"f", b"content")
    link = await ops.symlink(ROOT_INODE, b"l", b"f", USER_CTX)
    assert await ops.readlink(link.st_ino, USER_CTX) == b"f"
    assert (await ops.link(ino, ROOT_INODE, b"hard", USER_CTX)).st_nlink == 2
    await ops.rename(ROOT_INODE, b"hard", ROOT_INODE, b"moved", 0, USER_CTX)
    assert (await ops.lookup(ROOT_INODE, b"moved", USER_CTX)).st_ino == ino
    await ops.unlink(ROOT_INODE, b"moved", USER_CTX)
    assert (await ops.getattr(ino, USER_CTX)).st_nlink == 1
    await ops.setxattr(ino, b"user.k", b"v", USER_CTX)
    assert await ops.getxattr(ino, b"user.k", USER_CTX) == b"v"
    assert await ops.listxattr(ino, USER_CTX) == [b"user.k"]
    await ops.removexattr(ino, b"user.k", USER_CTX)
    assert await ops.listxattr(ino, USER_CTX) == []
    folder = await ops.mkdir(ROOT_INODE, b"d", 0o755, USER_CTX)
    await ops.rmdir(ROOT_INODE, b"d", USER_CTX)
    assert (await ops.lookup(ROOT_INODE, b"d", USER_CTX)).st_ino == 0
    assert folder.st_ino != 0


async def test_statfs_answers_the_backing_folder_s(ops: Operations, volume: Volume) -> None:
    answer = await ops.statfs(USER_CTX)
    backing = os.statvfs(volume.backing)
    assert (answer.f_bsize, answer.f_blocks, answer.f_namemax) == (
        backing.f_bsize,
        backing.f_blocks,
        backing.f_namemax,
    )


async def test_flush_is_enosys_so_the_kernel_stops_sending_it(ops: Operations) -> None:
    ino = await new_file(ops, b"f", b"x")
    info = await ops.open(ino, os.O_RDONLY, USER_CTX)
    assert await fuse_errno(ops.flush(info.fh)) == errno.ENOSYS
    await ops.release(info.fh)


# --- errors to errno ---------------------------------------------------------------------


async def test_errors_of_the_core_become_their_errno(ops: Operations) -> None:
    ino = await new_file(ops, b"f", b"x")
    await new_file(ops, b"g", b"y")
    folder = (await ops.mkdir(ROOT_INODE, b"d", 0o755, USER_CTX)).st_ino
    await ops.mkdir(folder, b"inner", 0o755, USER_CTX)
    answers: dict[str, tuple[Callable[[], Awaitable[object]], int]] = {
        "lookup of a bad name": (lambda: ops.lookup(ROOT_INODE, b"a/b", USER_CTX), errno.EINVAL),
        "unknown inode": (lambda: ops.getattr(10_000, USER_CTX), errno.ESTALE),
        "mkdir of a name taken": (
            lambda: ops.mkdir(ROOT_INODE, b"f", 0o755, USER_CTX),
            errno.EEXIST,
        ),
        "rmdir of a full folder": (lambda: ops.rmdir(ROOT_INODE, b"d", USER_CTX), errno.ENOTEMPTY),
        "unlink of a folder": (lambda: ops.unlink(ROOT_INODE, b"d", USER_CTX), errno.EISDIR),
        "unlink of nothing": (lambda: ops.unlink(ROOT_INODE, b"none", USER_CTX), errno.ENOENT),
        "open of a folder": (lambda: ops.open(folder, os.O_RDONLY, USER_CTX), errno.EISDIR),
        "rename onto a name taken": (
            lambda: ops.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_NOREPLACE, USER_CTX),
            errno.EEXIST,
        ),
        "readlink of a file": (lambda: ops.readlink(ino, USER_CTX), errno.EINVAL),
        "a private xattr": (
            lambda: ops.getxattr(ino, b"user.envfs.acl_access", USER_CTX),
            errno.ENODATA,
        ),
        "a foreign xattr": (
            lambda: ops.setxattr(ino, b"trusted.k", b"v", USER_CTX),
            errno.EOPNOTSUPP,
        ),
        "read of no handle": (lambda: ops.read(999, 0, 10), errno.EBADF),
        "readdir of no handle": (lambda: ops.readdir(999, 0, NO_TOKEN), errno.EBADF),
    }
    got = {what: await fuse_errno(request()) for what, (request, _) in answers.items()}
    assert got == {what: code for what, (_, code) in answers.items()}


async def test_a_disabled_key_is_ekeyrevoked(
    ops: Operations, volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    ino = await new_file(ops, b"f", b"x")
    fake_keys.key(volume.key_arn).enabled = False
    assert await fuse_errno(ops.open(ino, os.O_RDONLY, USER_CTX)) == errno.EKEYREVOKED


async def test_a_damaged_file_is_eio(ops: Operations, volume: Volume) -> None:
    ino = await new_file(ops, b"f", os.urandom(3 * fileformat.block_stride(14)))
    path = volume.backing / "f"
    raw = bytearray(path.read_bytes())
    raw[fileformat.block_offset(1, volume.block_shift) + 40] ^= 0x80
    path.write_bytes(bytes(raw))
    info = await ops.open(ino, os.O_RDONLY, USER_CTX)
    assert await fuse_errno(ops.read(info.fh, fileformat.block_stride(14), 10)) == errno.EIO
    await ops.release(info.fh)


async def test_an_unexpected_exception_is_logged_and_answered_eio(
    ops: Operations, vfs: Vfs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(ino: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(vfs, "getattr", broken)
    assert await fuse_errno(ops.getattr(ROOT_INODE, USER_CTX)) == errno.EIO
    (record,) = [r for r in caplog.records if r.name == "envfs.files.fuseops"]
    assert record.getMessage() == "unexpected error in getattr; answered EIO"
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])


async def test_forget_drops_nodes_and_never_raises(
    ops: Operations, vfs: Vfs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ino = await new_file(ops, b"f", b"x")  # one lookup, for the create
    await ops.lookup(ROOT_INODE, b"f", USER_CTX)
    await ops.forget([(ino, 1)])
    assert (await ops.getattr(ino, USER_CTX)).st_ino == ino
    await ops.forget([(ino, 1)])
    assert await fuse_errno(ops.getattr(ino, USER_CTX)) == errno.ESTALE

    def broken(ino: int, count: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(vfs, "forget", broken)
    with caplog.at_level(logging.ERROR):
        await ops.forget([(ino, 1), (ROOT_INODE, 1)])
    assert [r.getMessage() for r in caplog.records] == ["unexpected error in forget"] * 2


async def test_readdir_counts_a_lookup_for_each_entry_the_kernel_took(
    ops: Operations, vfs: Vfs, volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b", "c"):
        (volume.backing / name).mkdir()  # unknown to the view until listed
    replies: list[tuple[bytes, int, int]] = []

    def readdir_reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, nxt: int) -> bool:
        replies.append((name, attr.st_ino, nxt))
        return len(replies) < 3  # the kernel's buffer is full at the third

    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)
    fh = await ops.opendir(ROOT_INODE, USER_CTX)
    await ops.readdir(fh, 0, NO_TOKEN)
    await ops.releasedir(fh)
    assert [(name, nxt) for name, _, nxt in replies] == [(b"a", 1), (b"b", 2), (b"c", 3)]
    taken = [vfs.inodes.node(ino).lookups for _, ino, _ in replies[:2]]
    assert taken == [1, 1]
    assert await fuse_errno(ops.getattr(replies[2][1], USER_CTX)) == errno.ESTALE  # not taken


# --- init --------------------------------------------------------------------------------


async def test_acls_are_served_only_when_the_kernel_enforces_them(
    vfs: Vfs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pyfuse3, "_envfs_acl", 1, raising=False)
    monkeypatch.setattr(pyfuse3, "_envfs_acl_granted", False, raising=False)
    with caplog.at_level(logging.INFO, logger="envfs.files.fuseops"):
        Operations(vfs).init()
        assert vfs.acls is None
        Operations(vfs, acl=False).init()
        assert vfs.acls is None
        monkeypatch.setattr(pyfuse3, "_envfs_acl_granted", True)
        Operations(vfs).init()
    assert vfs.acls is not None
    assert caplog.messages[:2] == [
        "the kernel does not offer POSIX ACLs: setfacl gives EOPNOTSUPP",
        "POSIX ACLs off (-o noacl)",
    ]
    assert caplog.messages[2].startswith("POSIX ACLs on, kept in the backing folder as ")


def test_entry_attributes_carry_every_field_of_a_stat(vfs: Vfs) -> None:
    st = vfs.getattr(ROOT_INODE)
    attr = fuseops.entry_attributes(st)
    assert (attr.st_ino, attr.st_mode, attr.st_uid, attr.st_mtime_ns) == (
        ROOT_INODE,
        st.mode,
        st.uid,
        st.mtime_ns,
    )
    assert (attr.st_blksize, attr.st_blocks, attr.st_ctime_ns) == (
        st.blksize,
        st.blocks,
        st.ctime_ns,
    )
