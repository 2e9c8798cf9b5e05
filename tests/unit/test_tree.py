"""The backing folder through directory descriptors: long paths, symlink swaps, identity."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.files import backing
from envfs.files.inodes import ROOT_INODE, InodeTable
from envfs.files.tree import BackingTree, open_regular


@pytest.fixture(params=["openat2", "openat"])
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with openat2 and with the one-name-at-a-time fallback."""
    if request.param == "openat":
        monkeypatch.setattr(backing, "openat2_works", False)
    else:
        assert backing.openat2_works, "this kernel has openat2 (Linux 5.6 and later)"
    return str(request.param)


class Tree:
    """A backing folder, its inode table and tree; nodes made as the filesystem makes them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        st = os.lstat(root)
        self.inodes = InodeTable(os.fsencode(root), (st.st_dev, st.st_ino))
        self.tree = BackingTree(os.fsencode(root), self.inodes)

    def node(self, parent: int, name: bytes) -> int:
        with self.tree.dir(parent) as fd:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        return self.inodes.remember(parent, name, (st.st_dev, st.st_ino), 1).ino

    def chain(self, names: list[bytes]) -> int:
        ino = ROOT_INODE
        for name in names:
            ino = self.node(ino, name)
        return ino


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    root = tmp_path / "backing"
    root.mkdir()
    t = Tree(root)
    yield t
    t.tree.close()


def same(fd: int, path: Path) -> bool:
    a, b = os.fstat(fd), os.lstat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def make_deep(root: Path, names: list[bytes]) -> None:
    """mkdir -p of a path longer than PATH_MAX, one name at a time."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        os.mkdir(name, dir_fd=fd)
        step = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = step
    with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "wb") as f:
        f.write(b"deep")
    os.close(fd)


def test_paths_longer_than_path_max_resolve(tree: Tree, walk: str) -> None:
    names = [bytes([ord("a") + i % 26]) * 200 for i in range(45)]  # 9045 bytes of path
    make_deep(tree.root, names)
    ino = tree.chain(names)
    assert len(tree.inodes.path(ino)) > 4096 * 2
    with tree.tree.dir(ino) as fd:
        fd_file = open_regular(fd, b"bottom", os.O_RDONLY)
        try:
            assert os.read(fd_file, 10) == b"deep"
        finally:
            os.close(fd_file)


def test_a_folder_swapped_for_a_symlink_leads_nowhere(
    tree: Tree, tmp_path: Path, walk: str
) -> None:
    outside = tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    (tree.root / "a" / "inner").mkdir(parents=True)
    inner = tree.chain([b"a", b"inner"])
    a = tree.inodes.entry(inner)[0]
    # Someone with write access to the backing folder swaps a for a symlink to outside.
    os.rename(tree.root / "a", tmp_path / "a-moved")
    os.symlink(outside, tree.root / "a")
    for ino in (a, inner):
        with pytest.raises(OSError) as info:
            tree.tree.dir(ino).__enter__()
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    # The same with a symlink deeper down, and with the symlink pointing inside.
    os.unlink(tree.root / "a")
    os.rename(tmp_path / "a-moved", tree.root / "a")
    os.rename(tree.root / "a" / "inner", tree.root / "a" / "inner-moved")
    os.symlink("inner-moved", tree.root / "a" / "inner")
    with pytest.raises(OSError) as info:
        tree.tree.dir(inner).__enter__()
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_another_folder_under_the_same_name_is_estale(tree: Tree, walk: str) -> None:
    (tree.root / "a" / "b").mkdir(parents=True)
    b = tree.chain([b"a", b"b"])
    os.rename(tree.root / "a" / "b", tree.root / "a" / "old-b")
    (tree.root / "a" / "b").mkdir()
    with pytest.raises(OSError) as info:
        tree.tree.dir(b).__enter__()
    assert info.value.errno == errno.ESTALE


def test_found_folders_are_the_nodes_and_descriptors_are_closed(tree: Tree, walk: str) -> None:
    (tree.root / "x" / "y" / "z").mkdir(parents=True)
    z = tree.chain([b"x", b"y", b"z"])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with tree.tree.dir(z) as fd:
            assert same(fd, tree.root / "x" / "y" / "z")
        with tree.tree.dir(ROOT_INODE) as fd:
            assert fd == tree.tree.root_fd
    assert len(os.listdir("/proc/self/fd")) == before


def test_open_regular_opens_nothing_but_regular_files(tree: Tree) -> None:
    root = tree.root
    (root / "file").write_bytes(b"x")
    os.mkfifo(root / "fifo")
    (root / "dir").mkdir()
    os.symlink("file", root / "link")
    os.mknod(root / "null", 0o600 | 0o020000, os.makedev(1, 3))
    fd = tree.tree.root_fd
    got = open_regular(fd, b"file", os.O_RDWR)
    os.close(got)
    expected = {b"fifo": errno.EINVAL, b"dir": errno.EISDIR, b"link": errno.ELOOP}
    expected[b"null"] = errno.EINVAL
    for name, err in expected.items():
        with pytest.raises(OSError) as info:
            open_regular(fd, name, os.O_RDONLY)
        assert info.value.errno == err, name
    st = os.stat(root / "dir")
    with pytest.raises(OSError) as info:
        open_regular(fd, b"file", os.O_RDONLY, key=(st.st_dev, st.st_ino))
    assert info.value.errno == errno.ESTALE


def test_openat2_refuses_symlinks_and_dotdot(tree: Tree, tmp_path: Path) -> None:
    (tree.root / "d").mkdir()
    os.symlink(tmp_path, tree.root / "d" / "up")
    flags = os.O_PATH | os.O_DIRECTORY
    for path, err in ((b"d/up", errno.ELOOP), (b"d/../..", errno.EXDEV)):
        with pytest.raises(OSError) as info:
            backing.openat2(tree.tree.root_fd, path, flags)
        assert info.value.errno == err, path
    fd = backing.openat2(tree.tree.root_fd, b"d", flags)
    assert same(fd, tree.root / "d")
    os.close(fd)
