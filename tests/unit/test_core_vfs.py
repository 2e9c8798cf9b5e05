"""``Vfs`` called as the FUSE adapter calls it, over a fake key service, without a mount.

What the mount tests check through real files, checked here at the level of calls: names
(lookup, create, rename, link, unlink, folders, symlinks, listings), contents (read, write,
truncate), attributes and xattrs, the key decision of every open and content change for
the calling user, and the errno each failure is answered with (``OSError.errno`` or the
``EnvfsError`` class's, as :mod:`envfs.files.fuseops` maps them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envfs.errors import (
    AccessDeniedException,
    DisabledException,
    EnvfsError,
    IntegrityError,
    InvalidCiphertextException,
)
from envfs.files import fileformat
from envfs.files.backing import TEMP_PREFIX
from envfs.files.cryptfile import CryptFile
from envfs.files.inodes import ROOT_INODE
from envfs.files.vfs import RENAME_EXCHANGE, RENAME_NOREPLACE, Vfs
from envfs.files.volume import VOLUME_FILE, Volume
from envfs.identity import Caller
from tests.unit.fakekeys import KEY_USER, ROOT, STRANGER, FakeKeyProvider

BLOCK = 1 << fileformat.DEFAULT_BLOCK_SHIFT


def errno_of(call: Callable[[], object]) -> int:
    """The errno the FUSE adapter would answer ``call``'s failure with."""
    try:
        call()
    except (OSError, EnvfsError) as exc:
        assert exc.errno is not None
        return exc.errno
    raise AssertionError("no error")


def write_file(
    vfs: Vfs, name: bytes, data: bytes, *, parent: int = ROOT_INODE, caller: Caller = KEY_USER
) -> int:
    """Create ``name`` with ``data`` in it; its inode."""
    fh, st = vfs.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, caller)
    try:
        assert vfs.write(fh, 0, data) == len(data)
    finally:
        vfs.release(fh)
    return st.ino


def read_file(vfs: Vfs, ino: int, caller: Caller = KEY_USER) -> bytes:
    fh = vfs.open(ino, os.O_RDONLY, caller)
    try:
        return vfs.read(fh, 0, vfs.file_size(fh) + 1)
    finally:
        vfs.release(fh)


def listing(vfs: Vfs, ino: int = ROOT_INODE) -> list[bytes]:
    fh = vfs.opendir(ino)
    try:
        return [name for name, _, _ in vfs.readdir(fh, 0)]
    finally:
        vfs.releasedir(fh)


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``chattr +i``: a backing file that the daemon, root included, may read but not write
    (as a daemon run by a user may not write another user's files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_IMMUTABLE_FL))
        except OSError as exc:
            pytest.skip(f"the backing folder's file system has no immutable files: {exc}")
        try:
            yield
        finally:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    finally:
        os.close(fd)


# --- lookup and attributes ---------------------------------------------------------------


def test_lookup_finds_a_new_file_with_its_plaintext_size(vfs: Vfs, volume: Volume) -> None:
    ino = write_file(vfs, b"f", b"x" * 100)
    st = vfs.lookup(ROOT_INODE, b"f")
    assert (st.ino, stat.S_ISREG(st.mode), st.size, st.nlink) == (ino, True, 100, 1)
    assert vfs.getattr(ino).size == 100
    backing = os.lstat(volume.backing / "f")
    assert backing.st_size == fileformat.backing_size(100, volume.block_shift)
    assert (st.mtime_ns, st.uid) == (backing.st_mtime_ns, backing.st_uid)


def test_lookup_errors_are_those_of_the_backing_folder(vfs: Vfs) -> None:
    ino = write_file(vfs, b"file", b"x")
    assert errno_of(lambda: vfs.lookup(ROOT_INODE, b"missing")) == errno.ENOENT
    assert errno_of(lambda: vfs.lookup(ino, b"below")) == errno.ENOTDIR
    assert errno_of(lambda: vfs.lookup(ROOT_INODE, b"n" * 300)) == errno.ENAMETOOLONG
    assert errno_of(lambda: vfs.getattr(10_000)) == errno.ESTALE  # never handed out


@pytest.mark.parametrize("name", [b"a/b", b"", b"nul\0"])
def test_names_no_file_can_have_are_einval(vfs: Vfs, name: bytes) -> None:
    assert errno_of(lambda: vfs.lookup(ROOT_INODE, name)) == errno.EINVAL
    assert errno_of(lambda: vfs.mkdir(ROOT_INODE, name, 0o755, ROOT)) == errno.EINVAL


def test_envfs_s_own_names_are_out_of_the_view(vfs: Vfs, volume: Volume) -> None:
    temp = TEMP_PREFIX + b"0000000000000000"
    for name in (VOLUME_FILE.encode(), (VOLUME_FILE + ".tmp").encode(), temp):
        assert errno_of(lambda: vfs.lookup(ROOT_INODE, name)) == errno.ENOENT  # noqa: B023
        assert errno_of(lambda: write_file(vfs, name, b"x")) == errno.ENOENT  # noqa: B023
    (volume.backing / os.fsdecode(temp)).write_bytes(b"")  # a crash's leftover, say
    assert listing(vfs) == []
    sub = vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    (volume.backing / "d" / VOLUME_FILE).write_bytes(b"{}")  # hidden at the root only
    assert listing(vfs, sub) == [VOLUME_FILE.encode()]


def test_no_call_makes_or_moves_envfs_s_own_names(vfs: Vfs, volume: Volume) -> None:
    ino = write_file(vfs, b"f", b"x")
    volume_file = (volume.backing / VOLUME_FILE).read_bytes()
    for name in (VOLUME_FILE.encode(), TEMP_PREFIX + b"1"):
        calls: list[Callable[[], object]] = [
            lambda: vfs.rename(ROOT_INODE, b"f", ROOT_INODE, name, 0),  # noqa: B023
            lambda: vfs.rename(ROOT_INODE, b"f", ROOT_INODE, name, RENAME_EXCHANGE),  # noqa: B023
            lambda: vfs.rename(ROOT_INODE, name, ROOT_INODE, b"g", 0),  # noqa: B023
            lambda: vfs.link(ino, ROOT_INODE, name),  # noqa: B023
            lambda: vfs.symlink(ROOT_INODE, name, b"f", ROOT),  # noqa: B023
            lambda: vfs.mkdir(ROOT_INODE, name, 0o755, ROOT),  # noqa: B023
            lambda: vfs.mknod(ROOT_INODE, name, stat.S_IFIFO | 0o600, 0, ROOT),  # noqa: B023
            lambda: vfs.unlink(ROOT_INODE, name),  # noqa: B023
        ]
        assert [errno_of(call) for call in calls] == [errno.ENOENT] * len(calls)
    assert (volume.backing / VOLUME_FILE).read_bytes() == volume_file
    assert sorted(os.listdir(volume.backing)) == [VOLUME_FILE, "f"]


def test_dot_and_dot_dot_name_the_folder_and_its_parent(vfs: Vfs) -> None:
    top = vfs.mkdir(ROOT_INODE, b"top", 0o755, ROOT).ino
    sub = vfs.mkdir(top, b"sub", 0o755, ROOT).ino
    assert vfs.lookup(sub, b".").ino == sub
    assert vfs.lookup(sub, b"..").ino == top
    assert vfs.lookup(top, b"..").ino == ROOT_INODE


# --- create and open: a key decision for the caller ----------------------------------------


def test_create_makes_the_data_key_for_the_caller(
    vfs: Vfs, volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    before = len(fake_keys.calls)
    write_file(vfs, b"f", b"plain words")
    made = fake_keys.calls[before:]
    # The volume file is authenticated first, once, by the first user who needs it.
    assert [(c.operation, c.uid, c.outcome) for c in made] == [
        ("Decrypt", KEY_USER.uid, "ok"),
        ("GenerateDataKey", KEY_USER.uid, "ok"),
    ]
    assert made[0].note == f"envfs mount {volume.backing}"
    assert made[1].note == os.fsdecode(os.fsencode(volume.backing.resolve()) + b"/f")
    assert made[1].key == volume.key_arn
    raw = (volume.backing / "f").read_bytes()
    header = fileformat.FileHeader.parse(raw)
    assert header.key_arn == volume.key_arn
    assert fake_keys.read_wrapped(header.wrapped_key) is not None
    assert b"plain words" not in raw
    write_file(vfs, b"g", b"")
    assert fake_keys.decisions()[-1] == ("GenerateDataKey", KEY_USER.uid, "ok")
    assert len(fake_keys.calls) == before + 3  # no second look at the volume file


def test_create_by_a_user_the_key_refuses_leaves_nothing(
    vfs: Vfs, volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    vfs.verify_volume(ROOT)
    with pytest.raises(AccessDeniedException) as refused:
        vfs.create(ROOT_INODE, b"f", 0o644, os.O_WRONLY, STRANGER)
    assert refused.value.errno == errno.EACCES
    assert fake_keys.decisions()[-1] == ("GenerateDataKey", STRANGER.uid, "AccessDeniedException")
    assert sorted(os.listdir(volume.backing)) == [VOLUME_FILE]
    assert errno_of(lambda: vfs.lookup(ROOT_INODE, b"f")) == errno.ENOENT


def test_a_user_the_key_refuses_cannot_authenticate_the_volume(
    vfs: Vfs, fake_keys: FakeKeyProvider
) -> None:
    with pytest.raises(AccessDeniedException):
        vfs.create(ROOT_INODE, b"f", 0o644, os.O_WRONLY, STRANGER)
    assert fake_keys.decisions()[-1:] == [("Decrypt", STRANGER.uid, "AccessDeniedException")]
    assert not vfs.access.volume_verified  # left for the next user to do
    write_file(vfs, b"f", b"by a key user")
    assert vfs.access.volume_verified


def test_create_of_a_name_taken_is_eexist_and_leaves_the_file_alone(vfs: Vfs) -> None:
    ino = write_file(vfs, b"f", b"first")
    assert errno_of(lambda: write_file(vfs, b"f", b"second")) == errno.EEXIST
    assert read_file(vfs, ino) == b"first"
    assert listing(vfs) == [b"f"]


def test_every_open_is_a_decision_for_its_caller_even_while_open(
    vfs: Vfs, fake_keys: FakeKeyProvider
) -> None:
    ino = write_file(vfs, b"f", b"secret")
    before = len(fake_keys.calls)
    held = vfs.open(ino, os.O_RDONLY, KEY_USER)
    again = vfs.open(ino, os.O_RDONLY, KEY_USER)  # the keys are in memory: asked anyway
    with pytest.raises(AccessDeniedException) as refused:
        vfs.open(ino, os.O_RDONLY, STRANGER)
    assert refused.value.errno == errno.EACCES
    assert fake_keys.decisions()[before:] == [
        ("Decrypt", KEY_USER.uid, "ok"),
        ("Decrypt", KEY_USER.uid, "ok"),
        ("Decrypt", STRANGER.uid, "AccessDeniedException"),
    ]
    assert {c.key for c in fake_keys.calls[before:]} == {vfs.volume.key_arn}
    assert vfs.read(held, 0, 100) == vfs.read(again, 0, 100) == b"secret"
    vfs.release(held)
    vfs.release(again)


def test_a_disabled_key_refuses_opens_and_open_files_keep_working(
    vfs: Vfs, volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    ino = write_file(vfs, b"f", b"before")
    fh = vfs.open(ino, os.O_RDWR, KEY_USER)
    fake_keys.key(volume.key_arn).enabled = False
    with pytest.raises(DisabledException) as refused:
        vfs.open(ino, os.O_RDONLY, KEY_USER)
    assert refused.value.errno == errno.EKEYREVOKED
    assert errno_of(lambda: write_file(vfs, b"g", b"")) == errno.EKEYREVOKED
    vfs.write(fh, 6, b" and after")
    assert vfs.read(fh, 0, 100) == b"before and after"
    vfs.release(fh)


def test_opening_a_folder_is_eisdir(vfs: Vfs) -> None:
    sub = vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    assert errno_of(lambda: vfs.open(sub, os.O_RDONLY, KEY_USER)) == errno.EISDIR


# --- read and write ----------------------------------------------------------------------


def test_writes_and_reads_at_any_offset_agree_with_a_model(vfs: Vfs) -> None:
    fh, st = vfs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, KEY_USER)
    model = bytearray()
    for offset, length in ((0, 10), (BLOCK - 3, 7), (3 * BLOCK + 5, BLOCK), (5, 2 * BLOCK)):
        data = os.urandom(length)
        assert vfs.write(fh, offset, data) == length
        model[len(model) : offset] = bytes(max(0, offset - len(model)))  # a gap reads as zeros
        model[offset : offset + length] = data
        assert vfs.file_size(fh) == len(model)
    for offset, length in ((0, len(model) + 10), (BLOCK - 1, 2), (len(model) - 1, 5)):
        assert vfs.read(fh, offset, length) == model[offset : offset + length]
    assert vfs.read(fh, len(model) + 1, 10) == b""  # past the end: nothing
    vfs.release(fh)
    assert vfs.getattr(st.ino).size == len(model)
    assert read_file(vfs, st.ino) == model


def test_a_write_far_past_the_end_leaves_a_hole_that_reads_as_zeros(
    vfs: Vfs, volume: Volume
) -> None:
    far = 8 << 20
    fh, st = vfs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, KEY_USER)
    vfs.write(fh, 0, b"start")
    vfs.write(fh, far, b"end")
    assert vfs.read(fh, BLOCK * 100, 10) == bytes(10)
    vfs.release(fh)
    assert read_file(vfs, st.ino) == b"start" + bytes(far - 5) + b"end"
    raw = volume.backing / "f"
    assert fileformat.FileHeader.parse(raw.read_bytes()[: fileformat.HEADER_SIZE]).sparse
    assert os.stat(raw).st_blocks * 512 < far // 4  # the gap costs no disk space


def test_contents_survive_a_new_view_of_the_volume(
    vfs: Vfs, volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    write_file(vfs, b"f", b"kept" * 5000)
    again = Vfs(Volume.load(volume.backing), fake_keys, chown_new=False)
    try:
        assert read_file(again, again.lookup(ROOT_INODE, b"f").ino) == b"kept" * 5000
    finally:
        again.close()


def test_a_read_only_handle_takes_no_write(vfs: Vfs) -> None:
    ino = write_file(vfs, b"f", b"data")
    fh = vfs.open(ino, os.O_RDONLY, KEY_USER)
    assert errno_of(lambda: vfs.write(fh, 0, b"x")) == errno.EBADF
    assert errno_of(lambda: vfs.fallocate(fh, 0, 0, 10, KEY_USER)) == errno.EBADF
    vfs.release(fh)
    assert read_file(vfs, ino) == b"data"


def test_a_released_handle_is_ebadf(vfs: Vfs) -> None:
    ino = write_file(vfs, b"f", b"data")
    fh = vfs.open(ino, os.O_RDWR, KEY_USER)
    vfs.release(fh)
    assert errno_of(lambda: vfs.read(fh, 0, 1)) == errno.EBADF
    assert errno_of(lambda: vfs.write(fh, 0, b"x")) == errno.EBADF
    assert errno_of(lambda: vfs.fsync(fh, False)) == errno.EBADF
    vfs.release(fh)  # twice: nothing to do


def test_fallocate_modes_other_than_0_and_empty_ranges_are_refused(vfs: Vfs) -> None:
    ino = write_file(vfs, b"f", b"data")
    fh = vfs.open(ino, os.O_RDWR, KEY_USER)
    assert errno_of(lambda: vfs.fallocate(fh, 1, 0, 10, KEY_USER)) == errno.EOPNOTSUPP
    assert errno_of(lambda: vfs.fallocate(fh, 0, 0, 0, KEY_USER)) == errno.EINVAL
    assert errno_of(lambda: vfs.fallocate(fh, 0, -1, 10, KEY_USER)) == errno.EINVAL
    assert vfs.file_size(fh) == 4
    vfs.release(fh)


# --- truncate ----------------------------------------------------------------------------


def test_truncate_down_and_up_is_a_decision_noted_as_such(
    vfs: Vfs, fake_keys: FakeKeyProvider
) -> None:
    data = os.urandom(2 * BLOCK + 10)
    ino = write_file(vfs, b"f", data)
    before = len(fake_keys.calls)
    assert vfs.setattr(ino, KEY_USER, size=BLOCK + 1).size == BLOCK + 1
    assert vfs.setattr(ino, KEY_USER, size=3 * BLOCK).size == 3 * BLOCK
    assert read_file(vfs, ino) == data[: BLOCK + 1] + bytes(2 * BLOCK - 1)
    truncates = fake_keys.calls[before : before + 2]
    assert [(c.operation, c.uid, c.outcome) for c in truncates] == [
        ("Decrypt", KEY_USER.uid, "ok")
    ] * 2
    assert all(c.note.endswith("/f (truncate)") for c in truncates)


def test_truncate_by_a_user_the_key_refuses_changes_nothing(
    vfs: Vfs, fake_keys: FakeKeyProvider
) -> None:
    ino = write_file(vfs, b"f", b"x" * 100)
    held = vfs.open(ino, os.O_RDONLY, KEY_USER)  # open or not: decided all the same
    with pytest.raises(AccessDeniedException):
        vfs.setattr(ino, STRANGER, size=0)
    assert fake_keys.calls[-1].note.endswith("/f (truncate)")
    assert vfs.getattr(ino).size == 100
    vfs.release(held)
    with pytest.raises(AccessDeniedException):
        vfs.setattr(ino, STRANGER, size=0)
    assert read_file(vfs, ino) == b"x" * 100


def test_o_trunc_empties_the_file_at_the_open(vfs: Vfs) -> None:
    ino = write_file(vfs, b"f", b"x" * 100)
    fh = vfs.open(ino, os.O_WRONLY | os.O_TRUNC, KEY_USER)
    assert vfs.file_size(fh) == 0
    vfs.release(fh)
    assert vfs.getattr(ino).size == 0


def test_an_open_whose_o_trunc_fails_leaves_nothing_open(
    vfs: Vfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    ino = write_file(vfs, b"f", b"x" * 100)

    def failing(self: CryptFile, new_size: int) -> None:
        raise OSError(errno.EIO, "the disk failed")

    monkeypatch.setattr(CryptFile, "truncate", failing)
    assert errno_of(lambda: vfs.open(ino, os.O_WRONLY | os.O_TRUNC, KEY_USER)) == errno.EIO
    vfs.forget(ino, 1)  # the kernel forgets the name's lookup: nothing of the file is held
    assert errno_of(lambda: vfs.getattr(ino)) == errno.ESTALE


def test_a_file_the_daemon_may_only_read_refuses_writers_at_the_open(
    vfs: Vfs, volume: Volume
) -> None:
    ino = write_file(vfs, b"f", b"read only")
    with immutable(volume.backing / "f"):
        assert read_file(vfs, ino) == b"read only"  # readers are served
        assert errno_of(lambda: vfs.open(ino, os.O_RDWR, KEY_USER)) == errno.EPERM
        reader = vfs.open(ino, os.O_RDONLY, KEY_USER)  # the backing file open read-only
        assert errno_of(lambda: vfs.open(ino, os.O_WRONLY, KEY_USER)) == errno.EPERM
        assert errno_of(lambda: vfs.setattr(ino, KEY_USER, size=0)) == errno.EPERM
        assert errno_of(lambda: vfs.write(reader, 0, b"x")) == errno.EBADF  # not its mode
    writer = vfs.open(ino, os.O_WRONLY, KEY_USER)  # writable again: opened anew, read-write
    assert vfs.write(writer, 0, b"R") == 1
    vfs.release(writer)
    assert vfs.read(reader, 0, 100) == b"Read only"
    vfs.release(reader)


def test_a_size_change_needs_a_caller_and_a_regular_file(vfs: Vfs) -> None:
    ino = write_file(vfs, b"f", b"x")
    with pytest.raises(ValueError, match=r"^a change of size needs the caller$"):
        vfs.setattr(ino, None, size=0)
    sub = vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    assert errno_of(lambda: vfs.setattr(sub, KEY_USER, size=0)) == errno.EISDIR


# --- rename ------------------------------------------------------------------------------


def test_rename_moves_the_node_to_its_new_name(vfs: Vfs, volume: Volume) -> None:
    ino = write_file(vfs, b"a", b"content a")
    sub = vfs.mkdir(ROOT_INODE, b"sub", 0o755, ROOT).ino
    vfs.rename(ROOT_INODE, b"a", sub, b"b", 0)
    assert errno_of(lambda: vfs.lookup(ROOT_INODE, b"a")) == errno.ENOENT
    assert vfs.lookup(sub, b"b").ino == ino
    assert vfs.path(ino) == os.fsencode(volume.backing.resolve()) + b"/sub/b"
    fh = vfs.open(ino, os.O_RDWR, KEY_USER)  # reached under its new name
    vfs.write(fh, 9, b" moved")
    vfs.release(fh)
    assert (volume.backing / "sub" / "b").exists() and not (volume.backing / "a").exists()
    assert read_file(vfs, vfs.lookup(sub, b"b").ino) == b"content a moved"


def test_rename_over_a_file_replaces_it_and_its_handles_live_on(vfs: Vfs) -> None:
    target = write_file(vfs, b"target", b"old")
    source = write_file(vfs, b"source", b"new")
    held = vfs.open(target, os.O_RDWR, KEY_USER)
    vfs.rename(ROOT_INODE, b"source", ROOT_INODE, b"target", 0)
    assert vfs.lookup(ROOT_INODE, b"target").ino == source
    assert listing(vfs) == [b"target"]
    assert vfs.read(held, 0, 10) == b"old"  # the replaced file, without a name
    vfs.write(held, 0, b"OLD")
    assert vfs.getattr(target).nlink == 0
    vfs.release(held)
    assert read_file(vfs, source) == b"new"


def test_rename_noreplace_refuses_a_taken_name(vfs: Vfs) -> None:
    a = write_file(vfs, b"a", b"content a")
    write_file(vfs, b"b", b"content b")
    rename = vfs.rename
    assert errno_of(lambda: rename(ROOT_INODE, b"a", ROOT_INODE, b"b", RENAME_NOREPLACE)) == (
        errno.EEXIST
    )
    assert read_file(vfs, vfs.lookup(ROOT_INODE, b"b").ino) == b"content b"
    rename(ROOT_INODE, b"a", ROOT_INODE, b"c", RENAME_NOREPLACE)
    assert vfs.lookup(ROOT_INODE, b"c").ino == a


def test_rename_exchange_swaps_names_and_nodes(vfs: Vfs) -> None:
    a = write_file(vfs, b"a", b"content a")
    sub = vfs.mkdir(ROOT_INODE, b"sub", 0o755, ROOT).ino
    inner = write_file(vfs, b"inner", b"inner", parent=sub)
    vfs.rename(ROOT_INODE, b"a", ROOT_INODE, b"sub", RENAME_EXCHANGE)  # a file and a folder
    # Both nodes are reached under their new names before the kernel looks either up again.
    assert vfs.path(inner).endswith(b"/a/inner")  # the folder's children follow it
    assert read_file(vfs, inner) == b"inner"
    assert read_file(vfs, a) == b"content a"
    assert (vfs.lookup(ROOT_INODE, b"a").ino, vfs.lookup(ROOT_INODE, b"sub").ino) == (sub, a)
    both = RENAME_NOREPLACE | RENAME_EXCHANGE
    assert errno_of(lambda: vfs.rename(ROOT_INODE, b"a", ROOT_INODE, b"sub", both)) == (
        errno.EINVAL
    )
    assert errno_of(lambda: vfs.rename(ROOT_INODE, b"a", ROOT_INODE, b"sub", 4)) == errno.EINVAL
    assert errno_of(
        lambda: vfs.rename(ROOT_INODE, b"missing", ROOT_INODE, b"sub", RENAME_EXCHANGE)
    ) == (errno.ENOENT)


def test_rename_errors_are_those_of_the_backing_folder(vfs: Vfs) -> None:
    empty = vfs.mkdir(ROOT_INODE, b"empty", 0o755, ROOT).ino
    full = vfs.mkdir(ROOT_INODE, b"full", 0o755, ROOT).ino
    write_file(vfs, b"f", b"x", parent=full)

    def rename(old: tuple[int, bytes], new: tuple[int, bytes]) -> Callable[[], None]:
        return lambda: vfs.rename(*old, *new, 0)

    assert errno_of(rename((ROOT_INODE, b"empty"), (ROOT_INODE, b"full"))) == errno.ENOTEMPTY
    assert errno_of(rename((ROOT_INODE, b"full"), (full, b"inside"))) == errno.EINVAL
    assert errno_of(rename((full, b"f"), (ROOT_INODE, b"empty"))) == errno.EISDIR
    assert errno_of(rename((ROOT_INODE, b"empty"), (full, b"f"))) == errno.ENOTDIR
    assert errno_of(rename((ROOT_INODE, b"missing"), (ROOT_INODE, b"x"))) == errno.ENOENT
    vfs.rename(ROOT_INODE, b"full", ROOT_INODE, b"empty", 0)  # over an empty folder: fine
    assert vfs.lookup(ROOT_INODE, b"empty").ino == full
    assert errno_of(lambda: vfs.getattr(empty)) == errno.ESTALE  # replaced: no name left


# --- link and unlink ---------------------------------------------------------------------


def test_hard_links_are_one_node(vfs: Vfs, volume: Volume) -> None:
    ino = write_file(vfs, b"a", b"shared")
    sub = vfs.mkdir(ROOT_INODE, b"sub", 0o755, ROOT).ino
    st = vfs.link(ino, sub, b"b")
    assert (st.ino, st.nlink) == (ino, 2)
    assert vfs.lookup(sub, b"b").ino == ino
    fh = vfs.open(ino, os.O_RDWR, KEY_USER)
    vfs.write(fh, 0, b"SHARED")
    vfs.release(fh)
    assert os.lstat(volume.backing / "a").st_ino == os.lstat(volume.backing / "sub/b").st_ino
    vfs.unlink(ROOT_INODE, b"a")
    assert vfs.getattr(ino).nlink == 1
    assert vfs.path(ino).endswith(b"/sub/b")  # known by its other name now
    assert read_file(vfs, ino) == b"SHARED"


def test_an_open_file_is_linked_by_its_descriptor_whatever_its_name(vfs: Vfs) -> None:
    ino = write_file(vfs, b"a", b"open")
    fh = vfs.open(ino, os.O_RDWR, KEY_USER)
    vfs.rename(ROOT_INODE, b"a", ROOT_INODE, b"renamed", 0)
    st = vfs.link(ino, ROOT_INODE, b"b")
    vfs.release(fh)
    assert (st.ino, st.nlink) == (ino, 2)
    assert read_file(vfs, vfs.lookup(ROOT_INODE, b"b").ino) == b"open"


def test_link_errors(vfs: Vfs) -> None:
    ino = write_file(vfs, b"a", b"x")
    write_file(vfs, b"b", b"y")
    sub = vfs.mkdir(ROOT_INODE, b"sub", 0o755, ROOT).ino
    assert errno_of(lambda: vfs.link(ino, ROOT_INODE, b"b")) == errno.EEXIST
    assert errno_of(lambda: vfs.link(sub, ROOT_INODE, b"dirlink")) == errno.EPERM
    assert errno_of(lambda: vfs.link(ino, ROOT_INODE, VOLUME_FILE.encode())) == errno.ENOENT


def test_a_file_unlinked_while_open_is_served_through_its_handle(vfs: Vfs, volume: Volume) -> None:
    content = os.urandom(BLOCK + 11)
    ino = write_file(vfs, b"f", content)
    fh = vfs.open(ino, os.O_RDWR, KEY_USER)
    vfs.unlink(ROOT_INODE, b"f")
    assert not (volume.backing / "f").exists()
    assert errno_of(lambda: vfs.lookup(ROOT_INODE, b"f")) == errno.ENOENT
    assert vfs.read(fh, 0, 2 * BLOCK) == content
    vfs.write(fh, len(content), b"more")
    st = vfs.setattr(ino, None, mode=0o640)  # a node without a name
    assert (st.nlink, st.size, stat.S_IMODE(st.mode)) == (0, len(content) + 4, 0o640)
    vfs.setxattr(ino, b"user.gone", b"still here", KEY_USER)
    assert vfs.getxattr(ino, b"user.gone") == b"still here"
    new = write_file(vfs, b"f", b"new file")  # the name is free again
    assert new != ino
    assert vfs.read(fh, 0, 4) == content[:4]
    vfs.release(fh)
    assert errno_of(lambda: vfs.getattr(ino)) == errno.ESTALE  # no name, no handle: stale


def test_unlink_errors(vfs: Vfs) -> None:
    vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT)
    assert errno_of(lambda: vfs.unlink(ROOT_INODE, b"missing")) == errno.ENOENT
    assert errno_of(lambda: vfs.unlink(ROOT_INODE, b"d")) == errno.EISDIR
    assert errno_of(lambda: vfs.unlink(ROOT_INODE, VOLUME_FILE.encode())) == errno.ENOENT


# --- folders, symlinks, special files ----------------------------------------------------


def test_mkdir_and_rmdir(vfs: Vfs, volume: Volume) -> None:
    st = vfs.mkdir(ROOT_INODE, b"d", 0o777, ROOT, umask=0o022)
    assert stat.S_ISDIR(st.mode) and stat.S_IMODE(st.mode) == 0o755
    assert stat.S_IMODE(os.lstat(volume.backing / "d").st_mode) == 0o755
    assert errno_of(lambda: vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT)) == errno.EEXIST
    inner = write_file(vfs, b"f", b"in a folder", parent=st.ino)
    assert read_file(vfs, inner) == b"in a folder"
    assert errno_of(lambda: vfs.rmdir(ROOT_INODE, b"d")) == errno.ENOTEMPTY
    assert errno_of(lambda: vfs.rmdir(st.ino, b"f")) == errno.ENOTDIR
    vfs.unlink(st.ino, b"f")
    vfs.rmdir(ROOT_INODE, b"d")
    assert errno_of(lambda: vfs.lookup(ROOT_INODE, b"d")) == errno.ENOENT
    assert errno_of(lambda: vfs.rmdir(ROOT_INODE, b"d")) == errno.ENOENT
    assert not (volume.backing / "d").exists()


def test_symlinks_are_stored_as_they_are(vfs: Vfs, volume: Volume) -> None:
    file = write_file(vfs, b"target", b"x")
    st = vfs.symlink(ROOT_INODE, b"link", b"../somewhere/else", KEY_USER)
    assert stat.S_ISLNK(st.mode) and st.size == len(b"../somewhere/else")
    assert vfs.readlink(st.ino) == b"../somewhere/else"
    assert os.readlink(volume.backing / "link") == "../somewhere/else"
    assert vfs.lookup(ROOT_INODE, b"link").ino == st.ino
    assert errno_of(lambda: vfs.symlink(ROOT_INODE, b"link", b"t", KEY_USER)) == errno.EEXIST
    assert errno_of(lambda: vfs.readlink(file)) == errno.EINVAL
    assert errno_of(lambda: vfs.setattr(st.ino, None, mode=0o600)) == errno.EOPNOTSUPP
    assert errno_of(lambda: vfs.open(st.ino, os.O_RDONLY, KEY_USER)) == errno.ELOOP


def test_mknod_makes_fifos_and_encrypted_files_and_devices_for_root_only(
    vfs: Vfs, volume: Volume
) -> None:
    fifo = vfs.mknod(ROOT_INODE, b"p", stat.S_IFIFO | 0o600, 0, KEY_USER)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_ISFIFO(os.lstat(volume.backing / "p").st_mode)
    regular = vfs.mknod(ROOT_INODE, b"r", stat.S_IFREG | 0o600, 0, KEY_USER)
    assert regular.size == 0 and read_file(vfs, regular.ino) == b""
    assert (volume.backing / "r").read_bytes().startswith(fileformat.MAGIC)
    device = stat.S_IFCHR | 0o600
    assert errno_of(lambda: vfs.mknod(ROOT_INODE, b"c", device, 0, KEY_USER)) == errno.EPERM
    assert errno_of(lambda: vfs.mknod(ROOT_INODE, b"d", stat.S_IFDIR, 0, ROOT)) == errno.EINVAL
    assert listing(vfs) == [b"p", b"r"]


# --- listings ----------------------------------------------------------------------------


def test_readdir_lists_sorted_names_from_any_offset(vfs: Vfs) -> None:
    for name in (b"c", b"a", b"b"):
        write_file(vfs, name, name * 3)
    sub = vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT).ino
    fh = vfs.opendir(ROOT_INODE)
    entries = list(vfs.readdir(fh, 0))
    assert [(name, nxt) for name, _, nxt in entries] == [(b"a", 1), (b"b", 2), (b"c", 3), (b"d", 4)]
    assert [st.size for _, st, _ in entries[:3]] == [3, 3, 3]
    assert entries[3][1].ino == sub
    write_file(vfs, b"0-new", b"")  # the listing is taken when reading starts: stable offsets
    assert [name for name, _, _ in vfs.readdir(fh, 2)] == [b"c", b"d"]
    rewound = [name for name, _, _ in vfs.readdir(fh, 0)]  # rewinddir: the folder anew
    assert rewound == [b"0-new", b"a", b"b", b"c", b"d"]
    vfs.releasedir(fh)
    assert errno_of(lambda: list(vfs.readdir(fh, 0))) == errno.EBADF


def test_readdir_registers_nodes_without_a_lookup(vfs: Vfs, volume: Volume) -> None:
    (volume.backing / "made-behind").mkdir()
    fh = vfs.opendir(ROOT_INODE)
    ((name, st, _),) = list(vfs.readdir(fh, 0))
    vfs.releasedir(fh)
    assert name == b"made-behind"
    assert vfs.inodes.node(st.ino).lookups == 0  # the adapter adds one if the kernel took it
    vfs.add_lookup(st.ino)
    vfs.forget(st.ino, 1)
    assert errno_of(lambda: vfs.getattr(st.ino)) == errno.ESTALE


def test_opendir_of_a_file_is_enotdir(vfs: Vfs) -> None:
    ino = write_file(vfs, b"f", b"x")
    assert errno_of(lambda: vfs.opendir(ino)) == errno.ENOTDIR


# --- attributes and xattrs ---------------------------------------------------------------


def test_setattr_changes_mode_and_times_in_the_backing_folder(
    vfs: Vfs, volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    ino = write_file(vfs, b"f", b"data")
    asked = len(fake_keys.calls)
    for mode in (0o600, 0o4711, 0o000):
        assert stat.S_IMODE(vfs.setattr(ino, None, mode=mode).mode) == mode
        assert stat.S_IMODE(os.lstat(volume.backing / "f").st_mode) == mode
    st = vfs.setattr(ino, None, atime_ns=10**9, mtime_ns=2 * 10**9)
    assert (st.atime_ns, st.mtime_ns) == (10**9, 2 * 10**9)
    assert os.lstat(volume.backing / "f").st_mtime_ns == 2 * 10**9
    assert vfs.setattr(ino, None).size == 4  # nothing to change: the attributes
    assert len(fake_keys.calls) == asked  # no key decision for any of these


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_setattr_gives_a_node_to_another_user(vfs: Vfs, volume: Volume) -> None:
    ino = write_file(vfs, b"f", b"data")
    st = vfs.setattr(ino, None, uid=KEY_USER.uid, gid=KEY_USER.gid)
    assert (st.uid, st.gid) == (KEY_USER.uid, KEY_USER.gid)
    backing = os.lstat(volume.backing / "f")
    assert (backing.st_uid, backing.st_gid) == (KEY_USER.uid, KEY_USER.gid)
    link = vfs.symlink(ROOT_INODE, b"l", b"f", ROOT).ino
    vfs.setattr(link, None, uid=KEY_USER.uid)  # the symlink itself, not what it names
    assert os.lstat(volume.backing / "l").st_uid == KEY_USER.uid


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_a_multi_user_view_gives_new_nodes_to_their_creator(
    volume: Volume, fake_keys: FakeKeyProvider
) -> None:
    shared = Vfs(volume, fake_keys, chown_new=True)
    try:
        fh, file = shared.create(ROOT_INODE, b"f", 0o644, os.O_WRONLY, KEY_USER)
        shared.release(fh)
        folder = shared.mkdir(ROOT_INODE, b"d", 0o755, KEY_USER)
        link = shared.symlink(ROOT_INODE, b"l", b"f", KEY_USER)
        assert {(st.uid, st.gid) for st in (file, folder, link)} == {(KEY_USER.uid, KEY_USER.gid)}
        assert os.lstat(volume.backing / "f").st_uid == KEY_USER.uid
        os.chown(volume.backing / "d", 0, 4242)
        os.chmod(volume.backing / "d", 0o2775)
        inner = shared.mkdir(folder.ino, b"inner", 0o755, KEY_USER)
        assert (inner.uid, inner.gid) == (KEY_USER.uid, 4242)  # a setgid folder's group
    finally:
        shared.close()


def test_user_xattrs_are_the_backing_entry_s(vfs: Vfs, volume: Volume) -> None:
    ino = write_file(vfs, b"f", b"x")
    vfs.setxattr(ino, b"user.colour", b"blue", KEY_USER)
    assert vfs.getxattr(ino, b"user.colour") == b"blue"
    assert os.getxattr(volume.backing / "f", b"user.colour") == b"blue"
    assert vfs.listxattr(ino) == [b"user.colour"]
    vfs.removexattr(ino, b"user.colour")
    assert vfs.listxattr(ino) == []
    assert errno_of(lambda: vfs.getxattr(ino, b"user.colour")) == errno.ENODATA
    assert errno_of(lambda: vfs.removexattr(ino, b"user.colour")) == errno.ENODATA


def test_private_and_foreign_xattrs_are_refused(vfs: Vfs, volume: Volume) -> None:
    ino = write_file(vfs, b"f", b"x")
    os.setxattr(volume.backing / "f", b"user.envfs.acl_access", b"private")
    assert vfs.listxattr(ino) == []
    assert errno_of(lambda: vfs.getxattr(ino, b"user.envfs.acl_access")) == errno.ENODATA
    assert errno_of(lambda: vfs.setxattr(ino, b"user.envfs.x", b"v", ROOT)) == errno.EPERM
    assert errno_of(lambda: vfs.removexattr(ino, b"user.envfs.acl_access")) == errno.EPERM
    for name in (b"trusted.x", b"security.selinux"):
        assert errno_of(lambda: vfs.getxattr(ino, name)) == errno.EOPNOTSUPP  # noqa: B023
        assert errno_of(lambda: vfs.setxattr(ino, name, b"v", ROOT)) == errno.EOPNOTSUPP  # noqa: B023
    assert os.getxattr(volume.backing / "f", b"user.envfs.acl_access") == b"private"


# --- damaged backing files ---------------------------------------------------------------


def test_a_damaged_block_is_eio_at_its_read_and_the_rest_is_served(
    vfs: Vfs, volume: Volume, caplog: pytest.LogCaptureFixture
) -> None:
    content = os.urandom(3 * BLOCK)
    ino = write_file(vfs, b"f", content)
    good = write_file(vfs, b"good", b"untouched")
    flip(volume.backing / "f", fileformat.block_offset(1, volume.block_shift) + 20)
    fh = vfs.open(ino, os.O_RDONLY, KEY_USER)
    assert vfs.read(fh, 0, BLOCK) == content[:BLOCK]  # block 0 and the final block are sound
    with pytest.raises(IntegrityError) as damaged:
        vfs.read(fh, BLOCK, 10)
    assert damaged.value.errno == errno.EIO
    assert f"backing file {os.fsencode(volume.backing.resolve() / 'f')!r}" in caplog.text
    vfs.release(fh)
    assert read_file(vfs, good) == b"untouched"


@pytest.mark.parametrize(
    ("where", "refused_at"),
    [
        ("final block", "read"),
        ("empty file's final block", "open"),
        ("header MAC", "open"),
        ("wrapped key", "open"),
    ],
)
def test_a_damaged_header_or_final_block_serves_nothing(
    vfs: Vfs, volume: Volume, where: str, refused_at: str
) -> None:
    empty = where.startswith("empty")
    ino = write_file(vfs, b"f", b"" if empty else os.urandom(2 * BLOCK + 5))
    path = volume.backing / "f"
    raw = path.read_bytes()
    offset = {
        "final block": len(raw) - 1,
        "empty file's final block": len(raw) - 1,
        "header MAC": fileformat.MAC_OFFSET + 3,
        "wrapped key": raw.index(fileformat.FileHeader.parse(raw).wrapped_key) + 50,
    }[where]
    flip(path, offset)
    if refused_at == "open":
        assert errno_of(lambda: vfs.open(ino, os.O_RDONLY, KEY_USER)) == errno.EIO
        return
    fh = vfs.open(ino, os.O_RDONLY, KEY_USER)
    assert errno_of(lambda: vfs.read(fh, 0, 10)) == errno.EIO  # not even the first block
    vfs.release(fh)


def test_a_header_of_another_volume_under_the_same_key_does_not_unwrap(
    vfs: Vfs, volume: Volume, fake_keys: FakeKeyProvider, tmp_path: Path
) -> None:
    other = Volume.create(
        tmp_path / "other",
        volume.key_arn,
        fake_keys,
        ROOT,
        format_version=volume.format_version,
        encrypted_names=False,
    )
    other_vfs = Vfs(other, fake_keys, chown_new=False)
    try:
        write_file(other_vfs, b"f", b"of the other volume")
    finally:
        other_vfs.close()
    (volume.backing / "f").write_bytes((other.backing / "f").read_bytes())
    ino = vfs.lookup(ROOT_INODE, b"f").ino
    with pytest.raises(InvalidCiphertextException) as refused:
        vfs.open(ino, os.O_RDONLY, KEY_USER)
    assert refused.value.errno == errno.EIO
    assert fake_keys.decisions()[-1] == ("Decrypt", KEY_USER.uid, "InvalidCiphertextException")


def test_a_plaintext_file_dropped_into_the_backing_folder_is_eio(
    vfs: Vfs, volume: Volume, caplog: pytest.LogCaptureFixture
) -> None:
    (volume.backing / "dropped.txt").write_bytes(b"PLAINTEXT " * 100)
    ino = vfs.lookup(ROOT_INODE, b"dropped.txt").ino
    with caplog.at_level(logging.WARNING):
        assert errno_of(lambda: vfs.open(ino, os.O_RDONLY, KEY_USER)) == errno.EIO
    assert "dropped.txt" in caplog.text
