"""POSIX behaviour of the plaintext view (issue 3, section 3), through a real mount.

Plain Python file calls on one module-wide mount; each test works in its own folder.
Contents are checked against the backing file sizes of ``docs/format.md`` where that
proves the bytes reached the backing folder, and after a remount where it matters.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.files import fileformat
from tests.integration.conftest import Mount, backing_of, make_env, mounted

pytestmark = pytest.mark.integration

SHIFT = fileformat.DEFAULT_BLOCK_SHIFT
BLOCK = 1 << SHIFT
MIB = 1 << 20
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def vol_m(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mounted volume for the whole module (tests do not share files)."""
    env = make_env(tmp_path_factory.mktemp("posix"))
    env.create_key("vol")
    with mounted(env) as m:
        yield m


@pytest.fixture
def d(vol_m: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh folder in the mount for this test."""
    path: Path = vol_m.mnt / str(request.node.name)
    path.mkdir()
    return path


def errno_of(excinfo: pytest.ExceptionInfo[OSError]) -> str:
    return errno.errorcode.get(excinfo.value.errno or 0, str(excinfo.value.errno))


def pread_all(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        offset = 0
        while chunk := os.pread(fd, MIB, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def renameat2(old: Path, new: Path, flags: int) -> None:
    result = _libc.renameat2(
        AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


# --- lookup, getattr, setattr -----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 13, BLOCK - 1, BLOCK, BLOCK + 1, 8 * BLOCK, 1_000_003])
def test_stat_size_is_plaintext_size(vol_m: Mount, d: Path, size: int) -> None:
    f = d / "f"
    f.write_bytes(os.urandom(size))
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == size
    assert st.st_nlink == 1
    assert os.lstat(backing_of(vol_m, f)).st_size == fileformat.backing_size(size, SHIFT)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)


def test_lookup_of_missing_names(d: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        os.stat(d / "missing")
    assert exc.value.errno == errno.ENOENT
    (d / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError) as exc2:
        os.stat(d / "file" / "below")
    assert exc2.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as exc3:
        os.stat(d / ("n" * 300))
    assert exc3.value.errno == errno.ENAMETOOLONG, errno_of(exc3)


def test_chmod(vol_m: Mount, d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"data")
    for mode in (0o600, 0o640, 0o755, 0o4711, 0o000):
        os.chmod(f, mode)
        assert stat.S_IMODE(os.stat(f).st_mode) == mode
        assert stat.S_IMODE(os.lstat(backing_of(vol_m, f)).st_mode) == mode
    os.chmod(d, 0o711)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o711
    os.chmod(f, 0o644)
    assert f.read_bytes() == b"data"


def test_chown_to_another_user(vol_m: Mount, d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"data")
    os.chown(f, 4321, 8765)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (4321, 8765)
    os.chown(f, -1, 1111)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (4321, 1111)
    b = os.lstat(backing_of(vol_m, f))
    assert (b.st_uid, b.st_gid) == (4321, 1111)
    link = d / "link"
    os.symlink("f", link)
    os.chown(link, 2222, 3333, follow_symlinks=False)
    assert (os.lstat(link).st_uid, os.lstat(link).st_gid) == (2222, 3333)
    assert os.stat(f).st_uid == 4321  # the target kept its owner
    assert f.read_bytes() == b"data"  # root still reads it


def test_utimens(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"data")
    atime, mtime = 1_000_000_123_456_789, 1_234_567_890_987_654_321
    os.utime(f, ns=(atime, mtime))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)

    date, date_ns = "2001-02-03 04:05:06 UTC", 981173106 * 10**9
    subprocess.run(["touch", "-d", date, str(f)], check=True)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (date_ns, date_ns)
    subprocess.run(["touch", "-a", "-d", "2002-01-01 00:00:00 UTC", str(f)], check=True)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1009843200 * 10**9, date_ns)  # mtime kept
    # (touch -m keeps the access time too, but opening a file reads its header, and the
    # backing folder's relatime then refreshes an access time older than the ctime.)
    subprocess.run(["touch", "-m", "-d", "2003-01-01 00:00:00 UTC", str(f)], check=True)
    st = os.stat(f)
    assert st.st_mtime_ns == 1041379200 * 10**9
    assert st.st_atime_ns != 1041379200 * 10**9

    before = time.time_ns()
    os.utime(f)  # "now"
    st = os.stat(f)
    assert st.st_mtime_ns >= before - 10**9
    assert abs(st.st_atime_ns - st.st_mtime_ns) < 10**9

    os.symlink("f", d / "link")
    os.utime(d / "link", ns=(5 * 10**9, 6 * 10**9), follow_symlinks=False)
    assert os.lstat(d / "link").st_mtime_ns == 6 * 10**9
    assert os.stat(f).st_mtime_ns >= before - 10**9  # the target is untouched


def test_truncate_up_and_down(vol_m: Mount, d: Path) -> None:
    f = d / "f"
    model = bytearray(os.urandom(40_000))
    f.write_bytes(model)
    steps = [100_000, 2 * BLOCK, BLOCK, 20_000, 3 * BLOCK, 5, 0, BLOCK - 1, 7 * BLOCK + 3]
    fd = os.open(f, os.O_RDWR)
    try:
        for i, size in enumerate(steps):
            if i % 2:
                os.ftruncate(fd, size)  # setattr with a file handle
            else:
                os.truncate(f, size)  # setattr by path
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
            assert os.stat(f).st_size == size
            assert os.lstat(backing_of(vol_m, f)).st_size == fileformat.backing_size(size, SHIFT)
            assert pread_all(f) == model, f"after truncate to {size}"
            # a write after the truncation lands in the right block
            os.pwrite(fd, b"W", size // 2)
            if size:
                model[size // 2] = ord("W")
            else:
                model.extend(b"W")
        assert pread_all(f) == model
    finally:
        os.close(fd)
    with pytest.raises(IsADirectoryError):
        os.truncate(d, 0)


# --- directories ------------------------------------------------------------------------


def test_readdir_listdir_and_scandir(vol_m: Mount, d: Path) -> None:
    (d / "a").write_bytes(b"a")
    (d / "sub").mkdir()
    os.symlink("a", d / "ln")
    os.mkfifo(d / "fifo")
    names = {f"entry-{i:04d}-{'x' * 40}" for i in range(300)}  # several readdir rounds
    for name in names:
        os.symlink("a", d / name)  # cheaper to make than encrypted files
    assert set(os.listdir(d)) == names | {"a", "sub", "ln", "fifo"}
    with os.scandir(d) as it:
        entries = {e.name: e for e in it}
    assert entries["a"].is_file(follow_symlinks=False)
    assert entries["sub"].is_dir(follow_symlinks=False)
    assert entries["ln"].is_symlink()
    assert stat.S_ISFIFO(entries["fifo"].stat(follow_symlinks=False).st_mode)
    assert entries["a"].inode() == os.stat(d / "a").st_ino
    assert os.listdir(d / "sub") == []
    shutil.rmtree(d)  # removes entries while it reads the folder
    assert not d.exists()


def test_volume_file_is_never_shown(vol_m: Mount) -> None:
    """With encrypted names, envfs's own files (the volume file, the root's id) are never
    shown, and their names are free in the view: a file named so is stored encrypted,
    beside them."""
    own = (".envfs-volume.json", ".envfs-dir")
    volume_file = (vol_m.backing / own[0]).read_bytes()
    dir_file = (vol_m.backing / own[1]).read_bytes()
    with os.scandir(vol_m.mnt) as it:
        assert not set(own) & {e.name for e in it}
    for name in own:
        with pytest.raises(FileNotFoundError):
            os.stat(vol_m.mnt / name)
        with pytest.raises(FileNotFoundError):
            os.unlink(vol_m.mnt / name)
        (vol_m.mnt / name).write_bytes(b"a user's file " + name.encode())
        assert name in os.listdir(vol_m.mnt)
        assert (vol_m.mnt / name).read_bytes() == b"a user's file " + name.encode()
        behind = backing_of(vol_m, vol_m.mnt / name)
        assert behind.parent == vol_m.backing and not behind.name.startswith(".")
        assert behind.stat().st_size == fileformat.backing_size(14 + len(name), SHIFT)
        os.unlink(vol_m.mnt / name)
        assert not behind.exists()
    assert (vol_m.backing / own[0]).read_bytes() == volume_file
    assert (vol_m.backing / own[1]).read_bytes() == dir_file


def test_volume_file_is_never_shown_with_plaintext_names(tmp_path: Path) -> None:
    """With plaintext names, the volume file's name is reserved at the root."""
    env = make_env(tmp_path)
    env.create_key("vol")
    hidden = ".envfs-volume.json"
    with mounted(env, "plain", init=("--plaintext-names",)) as m:
        assert (m.backing / hidden).exists()
        assert not (m.backing / ".envfs-dir").exists()
        assert hidden not in os.listdir(m.mnt)
        with os.scandir(m.mnt) as it:
            assert hidden not in {e.name for e in it}
        with pytest.raises(FileNotFoundError):
            os.stat(m.mnt / hidden)
        with pytest.raises(OSError) as exc:
            os.open(m.mnt / hidden, os.O_WRONLY | os.O_CREAT, 0o644)
        assert exc.value.errno in (errno.ENOENT, errno.EACCES, errno.EPERM), errno_of(exc)
        with pytest.raises(FileNotFoundError):
            os.unlink(m.mnt / hidden)
        assert (m.backing / hidden).exists()
        (m.mnt / "sub").mkdir()  # reserved at the root only
        (m.mnt / "sub" / hidden).write_bytes(b"mine")
        assert (m.backing / "sub" / hidden).stat().st_size == fileformat.backing_size(4, SHIFT)


def test_mkdir_rmdir(d: Path) -> None:
    sub = d / "sub"
    os.mkdir(sub, 0o750)
    st = os.stat(sub)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    with pytest.raises(FileExistsError):
        os.mkdir(sub)
    os.makedirs(sub / "x" / "y" / "z")
    assert os.stat(sub).st_nlink == 3  # ".", its entry, and x's ".."
    (sub / "x" / "y" / "z" / "f").write_bytes(b"deep")
    with pytest.raises(OSError) as exc:
        os.rmdir(sub / "x")
    assert exc.value.errno == errno.ENOTEMPTY, errno_of(exc)
    with pytest.raises(NotADirectoryError):
        os.rmdir(sub / "x" / "y" / "z" / "f")
    os.unlink(sub / "x" / "y" / "z" / "f")
    os.removedirs(sub / "x" / "y" / "z")
    assert not d.exists()  # removedirs climbs while folders are empty
    d.mkdir()
    with pytest.raises(FileNotFoundError):
        os.rmdir(d / "never")


# --- create, open flags -----------------------------------------------------------------


def test_create_excl_and_trunc(vol_m: Mount, d: Path) -> None:
    f = d / "f"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"first content")
    os.close(fd)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    with pytest.raises(FileExistsError) as exc:
        os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    assert exc.value.errno == errno.EEXIST
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o600)  # existing: no truncation
    os.close(fd)
    assert f.read_bytes() == b"first content"

    fd = os.open(f, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.pread(fd, 100, 0) == b""
        assert os.lstat(backing_of(vol_m, f)).st_size == fileformat.backing_size(0, SHIFT)
        os.write(fd, b"second")
    finally:
        os.close(fd)
    assert f.read_bytes() == b"second"
    fd = os.open(f, os.O_RDONLY | os.O_TRUNC)  # truncates too, as Linux does
    try:
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    assert os.stat(f).st_size == 0
    assert os.lstat(backing_of(vol_m, f)).st_size == fileformat.backing_size(0, SHIFT)

    with pytest.raises(FileNotFoundError):
        os.open(d / "missing", os.O_RDONLY)
    with pytest.raises(IsADirectoryError):
        os.open(d, os.O_WRONLY)
    fd = os.open(d / "ro", os.O_RDONLY | os.O_CREAT, 0o444)  # create read-only: allowed
    os.close(fd)
    assert os.stat(d / "ro").st_size == 0


def test_o_append_two_appenders(d: Path) -> None:
    f = d / "log"
    f.write_bytes(b"start\n")
    fd1 = os.open(f, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(f, os.O_WRONLY | os.O_APPEND)
    expected = bytearray(b"start\n")
    try:
        for i in range(40):
            for fd, name in ((fd1, b"one"), (fd2, b"two")):
                line = name + b" %d " % i + b"." * (i * 997 % 20000) + b"\n"
                os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores the position
                assert os.write(fd, line) == len(line)
                expected += line
    finally:
        os.close(fd1)
        os.close(fd2)
    assert f.read_bytes() == expected

    # Two processes appending at the same time: every line lands whole, none is lost.
    script = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\n"
        "who = sys.argv[2].encode()\n"
        "for i in range(300):\n"
        "    os.write(fd, b'%s %d ' % (who, i) + b'.' * (i * 131 % 9000) + b'\\n')\n"
    )
    f.write_bytes(b"")
    procs = [subprocess.Popen([sys.executable, "-c", script, f, who]) for who in ("one", "two")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    lines = f.read_bytes().splitlines()
    assert len(lines) == 600
    for who in (b"one", b"two"):
        mine = [line for line in lines if line.startswith(who + b" ")]
        assert mine == [b"%s %d " % (who, i) + b"." * (i * 131 % 9000) for i in range(300)]


# --- read and write ---------------------------------------------------------------------


def test_random_reads_and_writes_against_a_model(d: Path) -> None:
    rng = random.Random(20240603)
    f = d / "f"
    sizes = [1, 7, 100, 4095, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 50_000, 200_000, MIB + 5]
    model = bytearray()
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for step in range(250):
            offset = rng.randrange(0, len(model) + 3 * BLOCK)
            if rng.random() < 0.3:
                offset = (offset >> SHIFT) << SHIFT  # on a block boundary
            data = rng.randbytes(rng.choice(sizes))
            assert os.pwrite(fd, data, offset) == len(data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + len(data)] = data
            if step % 5 == 0:
                at = rng.randrange(0, len(model) + 10)
                length = rng.choice(sizes)
                assert os.pread(fd, length, at) == model[at : at + length], f"step {step}"
            assert os.fstat(fd).st_size == len(model)
        # A big write in one call, across many blocks, from an unaligned offset.
        big = rng.randbytes(3 * MIB + 5)
        assert os.pwrite(fd, big, 12_345) == len(big)
        model[12_345 : 12_345 + len(big)] = big
    finally:
        os.close(fd)
    assert os.stat(f).st_size == len(model)
    assert pread_all(f) == model


def test_writes_past_eof_leave_zeros(vol_m: Mount, d: Path) -> None:
    f = d / "f"
    with open(f, "wb") as out:
        out.write(b"head")
        out.seek(100_000)
        out.write(b"tail")
    data = f.read_bytes()
    assert len(data) == 100_004
    assert data[:4] == b"head" and data[-4:] == b"tail"
    assert data[4:100_000] == bytes(99_996)
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, b"far", 5 * MIB + 3)  # a gap of several megabytes
    finally:
        os.close(fd)
    data = pread_all(f)
    assert len(data) == 5 * MIB + 6
    assert data[100_004 : 5 * MIB + 3] == bytes(5 * MIB + 3 - 100_004)
    assert data[-3:] == b"far"
    assert os.lstat(backing_of(vol_m, f)).st_size == fileformat.backing_size(5 * MIB + 6, SHIFT)


def test_flush_fsync_fdatasync_release(vol_m: Mount, d: Path) -> None:
    f = d / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 70_000)
        os.fsync(fd)
        assert os.lstat(backing_of(vol_m, f)).st_size == fileformat.backing_size(70_000, SHIFT)
        os.pwrite(fd, b"y" * 10, 69_995)
        os.fdatasync(fd)
        dup = os.dup(fd)
        os.close(dup)  # a flush without a release
        assert os.pread(fd, 20, 69_990) == b"xxxxx" + b"y" * 10
    finally:
        os.close(fd)  # flush and release
    ro = os.open(f, os.O_RDONLY)
    try:
        os.fsync(ro)
    finally:
        os.close(ro)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # fsyncdir
    finally:
        os.close(dfd)
    assert f.read_bytes() == b"x" * 69_995 + b"y" * 10 + b"x" * 0


def test_unlink_an_open_file(vol_m: Mount, d: Path) -> None:
    f = d / "f"
    content = os.urandom(3 * BLOCK + 11)
    f.write_bytes(content)
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert not f.exists()
        assert "f" not in os.listdir(d)
        assert not backing_of(vol_m, f).exists()
        assert os.pread(fd, len(content) + 10, 0) == content
        st = os.fstat(fd)
        assert st.st_size == len(content)
        assert st.st_nlink == 0
        os.pwrite(fd, b"more", len(content))
        assert os.fstat(fd).st_size == len(content) + 4
        assert os.pread(fd, 100, len(content) - 2) == content[-2:] + b"more"
        os.ftruncate(fd, 10)
        assert os.pread(fd, 100, 0) == content[:10]
        os.fchmod(fd, 0o640)  # setattr of a node without a name
        os.utime(fd, ns=(10**9, 2 * 10**9))
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size) == (0o640, 2 * 10**9, 10)
        os.setxattr(fd, "user.gone", b"still here")
        assert os.getxattr(fd, "user.gone") == b"still here"
        assert os.listxattr(fd) == ["user.gone"]
        os.removexattr(fd, "user.gone")
        # the name is free again for a new file
        f.write_bytes(b"new file")
        assert os.pread(fd, 100, 0) == content[:10]
    finally:
        os.close(fd)
    assert f.read_bytes() == b"new file"
    with pytest.raises(FileNotFoundError):
        os.unlink(d / "missing")
    with pytest.raises(IsADirectoryError):
        os.unlink(d)


# --- rename -----------------------------------------------------------------------------


def test_rename_files(vol_m: Mount, d: Path) -> None:
    (d / "a").write_bytes(b"content a")
    os.rename(d / "a", d / "b")
    assert not (d / "a").exists()
    assert (d / "b").read_bytes() == b"content a"
    (d / "c").write_bytes(b"content c")
    os.rename(d / "c", d / "b")  # over an existing file
    assert (d / "b").read_bytes() == b"content c"
    assert sorted(os.listdir(d)) == ["b"]
    (d / "sub").mkdir()
    os.rename(d / "b", d / "sub" / "b2")  # to another folder
    assert (d / "sub" / "b2").read_bytes() == b"content c"
    # the moved file stays writable under its new name
    with open(d / "sub" / "b2", "ab") as out:
        out.write(b" and more")
    assert (d / "sub" / "b2").read_bytes() == b"content c and more"
    # the old names are gone from the backing folder too: only "sub" and the folder's id
    assert sorted(os.listdir(backing_of(vol_m, d))) == sorted(
        [".envfs-dir", backing_of(vol_m, d / "sub").name]
    )
    with pytest.raises(FileNotFoundError):
        os.rename(d / "missing", d / "x")
    (d / "folder").mkdir()
    with pytest.raises(IsADirectoryError):
        os.rename(d / "sub" / "b2", d / "folder")


def test_rename_over_an_open_file(d: Path) -> None:
    old, new = os.urandom(BLOCK + 100), os.urandom(2 * BLOCK + 5)
    (d / "target").write_bytes(old)
    (d / "source").write_bytes(new)
    fd = os.open(d / "target", os.O_RDWR)
    try:
        os.rename(d / "source", d / "target")
        assert (d / "target").read_bytes() == new
        assert os.pread(fd, 3 * BLOCK, 0) == old  # the replaced file lives on
        assert os.fstat(fd).st_size == len(old)
        os.pwrite(fd, b"ZZ", 0)
        assert os.pread(fd, 2, 0) == b"ZZ"
    finally:
        os.close(fd)
    assert (d / "target").read_bytes() == new  # the write went to the old file
    assert sorted(os.listdir(d)) == ["target"]


def test_rename_directories_with_contents(d: Path) -> None:
    tree = d / "tree"
    (tree / "x" / "y").mkdir(parents=True)
    (tree / "top").write_bytes(b"top")
    (tree / "x" / "y" / "deep").write_bytes(b"deep" * 5000)
    os.stat(tree / "x" / "y" / "deep")  # known to the kernel before the move
    os.rename(tree, d / "moved")
    assert not tree.exists()
    assert (d / "moved" / "top").read_bytes() == b"top"
    assert (d / "moved" / "x" / "y" / "deep").read_bytes() == b"deep" * 5000
    with open(d / "moved" / "x" / "y" / "deep", "r+b") as f:
        f.write(b"DEEP")
    assert (d / "moved" / "x" / "y" / "deep").read_bytes()[:8] == b"DEEPdeep"
    (d / "empty").mkdir()
    os.rename(d / "moved", d / "empty")  # over an empty folder
    assert (d / "empty" / "top").read_bytes() == b"top"
    (d / "full").mkdir()
    (d / "full" / "f").touch()
    with pytest.raises(OSError) as exc:
        os.rename(d / "empty", d / "full")
    assert exc.value.errno == errno.ENOTEMPTY, errno_of(exc)
    with pytest.raises(OSError) as exc2:
        os.rename(d / "empty", d / "empty" / "x" / "inside")
    assert exc2.value.errno == errno.EINVAL, errno_of(exc2)
    with pytest.raises(NotADirectoryError):
        os.rename(d / "empty", d / "full" / "f")


def test_rename_noreplace_and_exchange(d: Path) -> None:
    (d / "a").write_bytes(b"content a")
    (d / "b").write_bytes(b"content b")
    with pytest.raises(FileExistsError) as exc:
        renameat2(d / "a", d / "b", RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    assert (d / "b").read_bytes() == b"content b"
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert (d / "c").read_bytes() == b"content a"
    assert not (d / "a").exists()

    ino_b, ino_c = os.stat(d / "b").st_ino, os.stat(d / "c").st_ino
    renameat2(d / "b", d / "c", RENAME_EXCHANGE)
    assert (d / "b").read_bytes() == b"content a"
    assert (d / "c").read_bytes() == b"content b"
    assert (os.stat(d / "b").st_ino, os.stat(d / "c").st_ino) == (ino_c, ino_b)
    with open(d / "b", "ab") as f:  # names and inodes still agree after the swap
        f.write(b"+b")
    with open(d / "c", "ab") as f:
        f.write(b"+c")
    assert (d / "b").read_bytes() == b"content a+b"
    assert (d / "c").read_bytes() == b"content b+c"

    (d / "dir").mkdir()
    (d / "dir" / "inner").write_bytes(b"inner")
    renameat2(d / "dir", d / "b", RENAME_EXCHANGE)  # a folder and a file
    assert (d / "b" / "inner").read_bytes() == b"inner"
    assert (d / "dir").read_bytes() == b"content a+b"
    with pytest.raises(FileNotFoundError):
        renameat2(d / "missing", d / "c", RENAME_EXCHANGE)
    with pytest.raises(OSError) as exc2:
        renameat2(d / "c", d / "dir", RENAME_NOREPLACE | RENAME_EXCHANGE)
    assert exc2.value.errno == errno.EINVAL, errno_of(exc2)


# --- links, symlinks, FIFOs -------------------------------------------------------------


def test_hard_links(vol_m: Mount, d: Path) -> None:
    a, b = d / "a", d / "sub" / "b"
    b.parent.mkdir()
    a.write_bytes(b"shared " * 5000)
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    ba, bb = os.lstat(backing_of(vol_m, a)), os.lstat(backing_of(vol_m, b))
    assert ba.st_ino == bb.st_ino
    with open(b, "r+b") as f:
        f.write(b"SHARED")
    assert a.read_bytes()[:13] == b"SHARED shared"
    fd = os.open(a, os.O_RDWR)
    try:
        os.pwrite(fd, b"tail", 35_000)
        assert b.read_bytes()[-4:] == b"tail"
        assert os.stat(b).st_size == 35_004
    finally:
        os.close(fd)
    with pytest.raises(FileExistsError):
        os.link(a, b)
    os.unlink(a)
    assert os.stat(b).st_nlink == 1
    assert b.read_bytes()[:6] == b"SHARED"
    with pytest.raises(PermissionError):
        os.link(d / "sub", d / "dirlink")  # no hard links to folders


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: drop_caches")
def test_hard_link_whose_other_folder_the_kernel_forgot(d: Path) -> None:
    """The kernel keeps a file through one link and forgets the other link's folder."""
    (d / "p1").mkdir()
    (d / "p2").mkdir()
    (d / "p1" / "a").write_bytes(b"hello")
    os.link(d / "p1" / "a", d / "p2" / "b")
    fd = os.open(d / "p2" / "b", os.O_RDONLY)  # pins the file, its p2 link and p2
    try:
        for _ in range(3):  # unused dentries and inodes only, not the page cache
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
        with open(d / "p2" / "b", "r+b") as f:
            assert f.read() == b"hello"
            f.write(b" world")
        os.chmod(d / "p2" / "b", 0o600)
        os.setxattr(d / "p2" / "b", "user.k", b"v")
    finally:
        os.close(fd)
    assert (d / "p1" / "a").read_bytes() == b"hello world"
    assert os.stat(d / "p1" / "a").st_nlink == 2
    assert stat.S_IMODE(os.stat(d / "p1" / "a").st_mode) == 0o600


def test_symlinks_and_readlink(d: Path) -> None:
    (d / "target").write_bytes(b"pointed at")
    os.symlink("target", d / "rel")
    os.symlink("../" + d.name + "/target", d / "up")
    os.symlink("/nonexistent/abs/path", d / "dangling")
    assert os.readlink(d / "rel") == "target"
    assert os.readlink(d / "dangling") == "/nonexistent/abs/path"
    assert stat.S_ISLNK(os.lstat(d / "rel").st_mode)
    assert os.lstat(d / "rel").st_size == len("target")
    assert (d / "rel").read_bytes() == b"pointed at"
    assert (d / "up").read_bytes() == b"pointed at"
    with pytest.raises(FileNotFoundError):
        os.stat(d / "dangling")
    with pytest.raises(FileExistsError):
        os.symlink("x", d / "rel")
    with pytest.raises(OSError) as exc:
        os.readlink(d / "target")
    assert exc.value.errno == errno.EINVAL, errno_of(exc)
    with open(d / "rel", "ab") as f:  # writing through the link writes the target
        f.write(b"!")
    assert (d / "target").read_bytes() == b"pointed at!"


def test_fifo_passes_bytes(d: Path) -> None:
    fifo = d / "fifo"
    os.mkfifo(fifo, 0o600)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    payload = os.urandom(200_000)  # more than a pipe buffer
    received: list[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as f:
            received.append(f.read())

    def writer() -> None:
        with open(fifo, "wb") as f:
            f.write(payload)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "FIFO reader or writer is stuck"
    assert received == [payload]


def test_mknod_kinds(vol_m: Mount, d: Path) -> None:
    os.mknod(d / "regular", 0o640 | stat.S_IFREG)  # an encrypted empty file
    assert os.stat(d / "regular").st_size == 0
    (d / "regular").write_bytes(b"written later")
    assert (d / "regular").read_bytes() == b"written later"
    os.mknod(d / "socket", 0o600 | stat.S_IFSOCK)
    assert stat.S_ISSOCK(os.lstat(d / "socket").st_mode)
    # Device nodes (root's, as on ext4): kind, numbers and mode kept, here and behind.
    os.mknod(d / "null", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(d / "loop", 0o640 | stat.S_IFBLK, os.makedev(7, 200))
    for name, kind, mode, dev in (
        ("null", stat.S_IFCHR, 0o644, os.makedev(1, 3)),
        ("loop", stat.S_IFBLK, 0o640, os.makedev(7, 200)),
    ):
        for st in (os.lstat(d / name), os.lstat(backing_of(vol_m, d / name))):
            assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)) == (kind, mode), name
            assert st.st_rdev == dev, name
    # The mount is nodev: a device node made or planted behind it is no device here.
    with pytest.raises(PermissionError):
        os.open(d / "null", os.O_RDONLY)
    assert "nodev" in mount_options(vol_m.mnt)
    os.unlink(d / "null")
    os.unlink(d / "loop")
    assert sorted(os.listdir(d)) == ["regular", "socket"]


def mount_options(mnt: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == str(mnt):
                return fields[3].split(",")
    raise AssertionError(f"{mnt} is not mounted")


def test_statfs(vol_m: Mount) -> None:
    sv, backing = os.statvfs(vol_m.mnt), os.statvfs(vol_m.backing)
    assert sv.f_bsize == backing.f_bsize > 0
    assert sv.f_blocks == backing.f_blocks > 0
    assert sv.f_files == backing.f_files
    assert 0 < sv.f_bavail <= sv.f_blocks
    assert sv.f_namemax == backing.f_namemax


# --- extended attributes ----------------------------------------------------------------


def test_user_xattrs(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"data")
    os.setxattr(f, "user.color", b"blue")
    os.setxattr(f, "user.big", os.urandom(3000))
    assert os.getxattr(f, "user.color") == b"blue"
    assert {"user.color", "user.big"} <= set(os.listxattr(f))
    os.setxattr(f, "user.color", b"green")
    assert os.getxattr(f, "user.color") == b"green"
    with pytest.raises(FileExistsError):
        os.setxattr(f, "user.color", b"red", os.XATTR_CREATE)
    with pytest.raises(OSError) as exc:
        os.setxattr(f, "user.absent", b"x", os.XATTR_REPLACE)
    assert exc.value.errno == errno.ENODATA, errno_of(exc)
    os.removexattr(f, "user.color")
    assert "user.color" not in os.listxattr(f)
    with pytest.raises(OSError) as exc2:
        os.getxattr(f, "user.color")
    assert exc2.value.errno == errno.ENODATA, errno_of(exc2)
    with pytest.raises(OSError) as exc3:
        os.removexattr(f, "user.color")
    assert exc3.value.errno == errno.ENODATA, errno_of(exc3)
    os.setxattr(d, "user.on-a-folder", b"yes")
    assert os.getxattr(d, "user.on-a-folder") == b"yes"
    assert f.read_bytes() == b"data"


def test_other_xattr_namespaces_are_refused(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"data")
    for name in ("trusted.x", "security.x"):
        with pytest.raises(OSError) as exc:
            os.setxattr(f, name, b"v")
        assert exc.value.errno in (errno.EOPNOTSUPP, errno.EPERM), (name, errno_of(exc))
    with pytest.raises(OSError) as exc2:
        os.getxattr(f, "trusted.x")
    assert exc2.value.errno == errno.EOPNOTSUPP, errno_of(exc2)
    assert os.listxattr(f) == []


# --- fallocate, mmap --------------------------------------------------------------------


def test_posix_fallocate_extends_with_zeros(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"kept")
    fd = os.open(f, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 100_000)
        assert os.fstat(fd).st_size == 100_000
        os.posix_fallocate(fd, 10, 20)  # inside the file: nothing changes
        assert os.fstat(fd).st_size == 100_000
        os.posix_fallocate(fd, 7 * BLOCK + 7, BLOCK)
        assert os.fstat(fd).st_size == 8 * BLOCK + 7
    finally:
        os.close(fd)
    data = f.read_bytes()
    assert data[:4] == b"kept"
    assert data[4:] == bytes(8 * BLOCK + 3)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """The fallocate(2) system call itself (not glibc's posix_fallocate, which writes zeros
    where the call is refused): 0, or the errno."""
    call = _libc.fallocate
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return 0 if call(fd, mode, offset, length) == 0 else ctypes.get_errno()


def test_fallocate_mode_0_extends_with_zeros(vol_m: Mount, d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"kept")
    fd = os.open(f, os.O_RDWR)
    try:
        assert fallocate(fd, 0, 0, 100_000) == 0
        assert os.fstat(fd).st_size == 100_000
        assert fallocate(fd, 0, 10, 20) == 0  # inside the file: nothing changes
        assert os.fstat(fd).st_size == 100_000
        assert fallocate(fd, 0, 7 * BLOCK + 7, BLOCK) == 0
        assert os.fstat(fd).st_size == 8 * BLOCK + 7
        os.pwrite(fd, b"end", 8 * BLOCK + 4)
    finally:
        os.close(fd)
    data = f.read_bytes()
    assert data == b"kept" + bytes(8 * BLOCK) + b"end"
    backing = backing_of(vol_m, f)
    assert backing.stat().st_size == fileformat.backing_size(8 * BLOCK + 7, SHIFT)
    assert bytes(BLOCK) not in backing.read_bytes()  # the zeros are encrypted too
    vol_m.remount()
    assert f.read_bytes() == data


def test_fallocate_command_line_tool(d: Path) -> None:
    f = d / "f"
    subprocess.run(["fallocate", "-l", "1MiB", str(f)], check=True)
    assert f.stat().st_size == MIB
    assert f.read_bytes() == bytes(MIB)


def test_fallocate_other_modes_are_not_supported(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"x" * (3 * BLOCK))
    fd = os.open(f, os.O_RDWR)
    try:
        for mode in (
            FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_ZERO_RANGE,
        ):
            assert fallocate(fd, mode, 0, 5 * BLOCK) == errno.EOPNOTSUPP, mode
        assert os.fstat(fd).st_size == 3 * BLOCK
    finally:
        os.close(fd)
    assert f.read_bytes() == b"x" * (3 * BLOCK)


def test_fallocate_needs_a_file_open_for_writing(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"kept")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert fallocate(fd, 0, 0, BLOCK) == errno.EBADF
    finally:
        os.close(fd)
    assert f.read_bytes() == b"kept"


def test_fallocate_without_space_changes_nothing(tmp_path: Path) -> None:
    """The backing space is reserved before the file grows: ENOSPC leaves it as it was."""
    env = make_env(tmp_path)
    env.create_key("vol")
    small = tmp_path / "small-backing"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(small)], check=True
    )
    try:
        with mounted(env, "small") as m:
            f = m.mnt / "f"
            f.write_bytes(b"kept" * 1000)
            fd = os.open(f, os.O_RDWR)
            try:
                assert fallocate(fd, 0, 0, 8 * MIB) == errno.ENOSPC
                assert os.fstat(fd).st_size == 4000
            finally:
                os.close(fd)
            assert f.read_bytes() == b"kept" * 1000
            assert backing_of(m, f).stat().st_size == fileformat.backing_size(4000, SHIFT)
            m.remount()
            assert f.read_bytes() == b"kept" * 1000
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_shared_writable_mmap(d: Path) -> None:
    f = d / "f"
    content = bytearray(os.urandom(3 * BLOCK + 1000))
    f.write_bytes(content)
    fd = os.open(f, os.O_RDWR)
    try:
        with mmap.mmap(fd, len(content), mmap.MAP_SHARED) as m:
            for offset, data in (
                (0, b"start"),
                (BLOCK - 3, b"straddle"),
                (len(content) - 4, b"end!"),
            ):
                m[offset : offset + len(data)] = data
                content[offset : offset + len(data)] = data
            m.flush()  # msync
            assert os.pread(fd, len(content), 0) == content
            assert m[: len(content)] == content
        os.fsync(fd)
    finally:
        os.close(fd)
    assert pread_all(f) == content
    reader = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())",
            f,
        ],
        capture_output=True,
        check=True,
    )
    assert reader.stdout == content


# --- several processes ------------------------------------------------------------------

_WORKER = r"""
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "write":  # offset length byte
        off, n, b = map(int, args)
        os.pwrite(fd, bytes([b]) * n, off)
        print("ok", flush=True)
    elif cmd == "read":  # offset length -> hex
        off, n = map(int, args)
        print(os.pread(fd, n, off).hex() or "-", flush=True)
    elif cmd == "storm":  # start end chunk byte count seed
        start, end, chunk, b, count, seed = map(int, args)
        rng = random.Random(seed)
        for _ in range(count):
            off = rng.randrange(start, end - chunk + 1)
            os.pwrite(fd, bytes([b]) * chunk, off)
        print("ok", flush=True)
os.close(fd)
"""


class Worker:
    """A child process with the file open, driven line by line."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, *args: int | str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, args)) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def call(self, *args: int | str) -> str:
        self.send(*args)
        return self.answer()

    def read(self, offset: int, length: int) -> bytes:
        out = self.call("read", offset, length)
        return b"" if out == "-" else bytes.fromhex(out)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=20)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def workers(path: Path, count: int) -> Iterator[list[Worker]]:
    started = [Worker(path) for _ in range(count)]
    try:
        yield started
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.close()


def test_two_processes_write_one_file(d: Path) -> None:
    f = d / "shared"
    size = 8 * BLOCK
    f.write_bytes(bytes(size))
    with workers(f, 2) as (a, b):
        # Each sees the other's writes at once, both keeping the file open.
        assert a.call("write", 100, 50, ord("A")) == "ok"
        assert b.read(90, 70) == bytes(10) + b"A" * 50 + bytes(10)
        assert b.call("write", 120, 50, ord("B")) == "ok"
        assert a.read(90, 90) == bytes(10) + b"A" * 20 + b"B" * 50 + bytes(10)

        # Disjoint halves, written at the same time in chunks that straddle blocks.
        half = size // 2
        a.send("storm", 0, half, 5000, ord("a"), 200, 1)
        b.send("storm", half, size, 5000, ord("b"), 200, 2)
        assert (a.answer(), b.answer()) == ("ok", "ok")
        # Fill both halves fully, then each checks the other's half.
        assert a.call("write", 0, half, ord("a")) == "ok"
        assert b.call("write", half, half, ord("b")) == "ok"
        assert a.read(half, half) == b"b" * half
        assert b.read(0, half) == b"a" * half

        # Overlapping regions at the same time: every byte is one writer's, nothing else.
        a.send("storm", 0, size, 7000, ord("X"), 300, 3)
        b.send("storm", 0, size, 7000, ord("Y"), 300, 4)
        assert (a.answer(), b.answer()) == ("ok", "ok")
        seen_a, seen_b = a.read(0, size), b.read(0, size)
        assert seen_a == seen_b
    final = f.read_bytes()
    assert final == seen_a
    assert len(final) == size
    assert set(final) <= set(b"abXY")
    # Not both X and Y: under load one worker's storm may run wholly after the other's,
    # and its 300 chunks then cover all but a few hundred bytes, the other's among them.
    assert set(final) & set(b"XY")


def test_two_processes_extend_one_file(d: Path) -> None:
    f = d / "grow"
    f.touch()
    with workers(f, 2) as (a, b):
        for i in range(20):
            w = a if i % 2 else b
            assert w.call("write", i * 10_000, 10_000, ord("a") + i) == "ok"
        expected = b"".join(bytes([ord("a") + i]) * 10_000 for i in range(20))
        assert a.read(0, 300_000) == expected
        assert b.read(0, 300_000) == expected
    assert f.read_bytes() == expected


# --- a root-run mount shared by users -----------------------------------------------------

STRANGER_UID, STRANGER_GID, SHARED_GID = 4242, 4343, 5555


@pytest.fixture(scope="module")
def shared_vol() -> Iterator[Mount]:
    """A root-run ``--allow-other`` mount whose key uid 4242 may use, in a folder every uid
    can reach (pytest's own temporary folders are private to root)."""
    root = Path(tempfile.mkdtemp(prefix="envfs-posix-"))
    try:
        os.chmod(root, 0o755)
        env = make_env(root)
        env.create_key(
            "vol", "--key-administrators", "uid:0", "--key-users", "uid:0", f"uid:{STRANGER_UID}"
        )
        with mounted(env, "shared", ("--allow-other",)) as m:
            os.chmod(m.mnt, 0o755)
            yield m
    finally:
        shutil.rmtree(root, ignore_errors=True)


def as_stranger(script: str, cwd: Path) -> None:
    ids = ["--reuid", str(STRANGER_UID), "--regid", str(STRANGER_GID), "--clear-groups"]
    subprocess.run(
        ["setpriv", *ids, "/bin/sh", "-euc", script],
        cwd=cwd,
        check=True,
        timeout=30,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: setpriv")
def test_multi_user_mount_gives_new_entries_to_their_creator(shared_vol: Mount) -> None:
    public = shared_vol.mnt / "public"
    public.mkdir()
    os.chmod(public, 0o1777)
    group = shared_vol.mnt / "group"
    group.mkdir()
    os.chown(group, 0, SHARED_GID)
    os.chmod(group, 0o2777)  # setgid: new entries take the folder's group
    as_stranger(
        "echo mine > file; mkdir dir; ln -s file link; mkfifo fifo; cat file > copy;"
        " echo theirs > ../group/file; mkdir ../group/dir;"
        " if mknod dev c 1 3 2>/dev/null; then exit 1; fi",  # devices are root's
        cwd=public,
    )
    assert not os.path.lexists(public / "dev")
    for name in ("file", "dir", "link", "fifo", "copy"):
        st = os.lstat(public / name)
        assert (st.st_uid, st.st_gid) == (STRANGER_UID, STRANGER_GID), name
        b = os.lstat(backing_of(shared_vol, public / name))
        assert (b.st_uid, b.st_gid) == (STRANGER_UID, STRANGER_GID), name
    assert (public / "copy").read_text() == "mine\n"
    for name in ("file", "dir"):
        st = os.lstat(group / name)
        assert (st.st_uid, st.st_gid) == (STRANGER_UID, SHARED_GID), name
    assert os.lstat(group / "dir").st_mode & stat.S_ISGID
    assert (group / "file").read_text() == "theirs\n"
    assert "unexpected error" not in shared_vol.log_text()


# --- persistence ------------------------------------------------------------------------


def test_contents_survive_a_remount(vol_m: Mount, d: Path) -> None:
    rng = random.Random(7)
    files = {f"f{size}": rng.randbytes(size) for size in (0, 1, BLOCK, 3 * BLOCK + 5, 2 * MIB + 1)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    mapped = bytearray(rng.randbytes(2 * BLOCK + 10))
    (d / "mapped").write_bytes(mapped)
    fd = os.open(d / "mapped", os.O_RDWR)
    try:
        with mmap.mmap(fd, len(mapped), mmap.MAP_SHARED) as m:
            m[BLOCK - 2 : BLOCK + 2] = b"MMAP"
            m.flush()
        mapped[BLOCK - 2 : BLOCK + 2] = b"MMAP"
    finally:
        os.close(fd)
    (d / "gap").write_bytes(b"a")
    with open(d / "gap", "r+b") as g:
        g.seek(70_000)
        g.write(b"z")
    cut = f"f{3 * BLOCK + 5}"
    os.truncate(d / cut, 2 * BLOCK)
    files[cut] = files[cut][: 2 * BLOCK]
    os.link(d / "f1", d / "hard")
    os.symlink("f1", d / "soft")
    os.setxattr(d / "f1", "user.kept", b"yes")
    os.chmod(d / "f1", 0o604)
    os.utime(d / "f1", ns=(10**18, 2 * 10**18))
    os.mkfifo(d / "fifo")
    (d / "dir").mkdir()

    vol_m.remount()

    for name, data in files.items():  # sizes from the backing sizes, before any open
        assert os.stat(d / name).st_size == len(data), name
    assert os.stat(d / "gap").st_size == 70_001
    for name, data in files.items():
        assert (d / name).read_bytes() == data, name
    assert (d / "mapped").read_bytes() == mapped
    assert (d / "gap").read_bytes() == b"a" + bytes(69_999) + b"z"
    assert os.stat(d / "hard").st_ino == os.stat(d / "f1").st_ino
    assert os.stat(d / "f1").st_nlink == 2
    assert os.readlink(d / "soft") == "f1"
    assert os.getxattr(d / "f1", "user.kept") == b"yes"
    st = os.stat(d / "f1")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o604, 2 * 10**18)
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    assert os.path.isdir(d / "dir")


def test_the_mount_logged_no_unexpected_error(vol_m: Mount) -> None:
    """Runs last: no handler let an exception escape or answered EIO unexpectedly."""
    log = vol_m.log_text()
    assert "mounted" in log
    assert "unexpected error" not in log
    assert "Traceback" not in log
    assert "WARNING" not in log


# --- read-ahead across a folder ---------------------------------------------------------


def cached_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip() or 0)


def test_opening_files_in_name_order_reads_the_next_ones_ahead(vol_m: Mount, d: Path) -> None:
    """In the order readdir gives (tar c, cp -r, find, grep -r), which is the sorted order
    of the view's names (ls, shells), encrypted or not."""
    for i in range(12):
        (d / f"f{i:02d}").write_bytes(os.urandom(3 * BLOCK))
    in_order = os.listdir(d)
    assert in_order == sorted(in_order)
    vol_m.remount()  # closed everywhere; now push the backing files out of the page cache
    backing = [backing_of(vol_m, d / name) for name in in_order]
    os.sync()
    for path in backing:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    assert cached_bytes(backing[5]) == 0
    (d / in_order[0]).read_bytes()
    (d / in_order[1]).read_bytes()  # the second in order: the next files are asked for
    deadline = time.monotonic() + 5
    while cached_bytes(backing[5]) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cached_bytes(backing[5]) > 0
    assert cached_bytes(backing[11]) == 0  # beyond the read-ahead
