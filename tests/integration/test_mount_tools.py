"""Ordinary tools on the plaintext view (issue 3, section 7), and no plaintext behind it.

``cp -a``, ``tar``, ``rsync -aX``, ``git``, ``sqlite3`` (WAL), ``sed -i`` and Python's
``tempfile`` run on one module-wide mount, each in its own folder. Every file they write
carries :data:`MARKER`; the last test greps every byte of the backing folder for it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Mount, make_env, mounted, view_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MARKER = f"PLAINTEXT-MARKER-{uuid.uuid4().hex}"
MARKER_BYTES = MARKER.encode()


def run(*args: str | Path, cwd: Path | None = None, input: str | None = None) -> str:
    """Run a tool; its stdout, or an assertion error with its stderr."""
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def tools_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tools")


@pytest.fixture(scope="module")
def vol_m(tools_root: Path) -> Iterator[Mount]:
    """One mounted volume for the whole module (tests use separate folders)."""
    env = make_env(tools_root / "env")
    env.create_key("vol")
    with mounted(env) as m:
        yield m


@pytest.fixture(scope="module")
def tree(tools_root: Path) -> Path:
    """A realistic source tree outside the mount: the repository's code and tests, binary
    files of odd sizes, hard links, symlinks, odd modes and times, a user xattr."""
    src = tools_root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "envfs", src / "envfs", ignore=ignore, symlinks=True)
    shutil.copytree(REPO / "tests", src / "tests", ignore=ignore, symlinks=True)
    binary = src / "binary"
    binary.mkdir()
    for size in (1, 4097, 16_383, 16_385, 100_003, 1_048_579):
        (binary / f"random-{size}.bin").write_bytes(os.urandom(size))
    (binary / "empty").touch()
    (binary / "empty-dir").mkdir()
    marked = src / "marked.txt"
    marked.write_text(f"{MARKER}\n" * 100)
    os.link(marked, src / "binary" / "marked-hardlink.txt")
    os.symlink("../marked.txt", binary / "marked-symlink")
    os.symlink("does/not/exist", binary / "dangling")
    (src / "script.sh").write_text(f"#!/bin/sh\necho {MARKER}\n")
    os.chmod(src / "script.sh", 0o751)
    (src / "secret").write_text(MARKER)
    os.chmod(src / "secret", 0o600)
    os.utime(src / "secret", ns=(1_500_000_000 * 10**9, 1_400_000_000 * 10**9))
    os.setxattr(marked, "user.origin", b"envfs tests")
    os.chown(binary / "random-1.bin", 1234, 4321)
    return src


def walk_stats(root: Path) -> dict[str, tuple[int, int, int, int, int]]:
    """(type and mode, uid, gid, size, mtime) of every entry under ``root``."""
    out: dict[str, tuple[int, int, int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size  # folder sizes differ
            out[str(path.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                size,
                st.st_mtime_ns,
            )
    return out


def test_cp_a_round_trip(vol_m: Mount, tree: Path, tools_root: Path) -> None:
    inside = vol_m.mnt / "cp"
    run("cp", "-a", tree, inside)
    run("diff", "-r", "--no-dereference", tree, inside)
    assert walk_stats(inside) == walk_stats(tree)
    assert os.getxattr(inside / "marked.txt", "user.origin") == b"envfs tests"
    linked = os.stat(inside / "binary" / "marked-hardlink.txt")
    assert linked.st_ino == os.stat(inside / "marked.txt").st_ino
    assert linked.st_nlink == 2

    out = tools_root / "cp-out"
    run("cp", "-a", inside, out)
    run("diff", "-r", "--no-dereference", tree, out)
    assert walk_stats(out) == walk_stats(tree)
    assert os.getxattr(out / "marked.txt", "user.origin") == b"envfs tests"


def test_tar_with_hard_links_and_symlinks(vol_m: Mount, tree: Path, tools_root: Path) -> None:
    archive = tools_root / "tree.tar"
    run("tar", "--xattrs", "-cf", archive, "-C", tree, ".")
    listing = run("tar", "-tvf", archive)
    assert "link to ./marked.txt" in listing  # the archive really holds a hard link
    assert "-> ../marked.txt" in listing
    inside = vol_m.mnt / "tar"
    inside.mkdir()
    run("tar", "--xattrs", "--same-owner", "-xpf", archive, "-C", inside)
    assert run("tar", "--xattrs", "-df", archive, "-C", inside) == ""
    assert os.stat(inside / "binary" / "marked-hardlink.txt").st_nlink == 2
    assert os.readlink(inside / "binary" / "marked-symlink") == "../marked.txt"
    run("diff", "-r", "--no-dereference", tree, inside)

    # A change behind tar's back is what --compare is there to find.
    with open(inside / "binary" / "random-4097.bin", "r+b") as f:
        f.seek(2000)
        f.write(b"changed")
    result = subprocess.run(
        ["tar", "-df", str(archive), "-C", str(inside)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "random-4097.bin: Contents differ" in result.stdout


def test_rsync_ax_then_nothing_left_to_do(vol_m: Mount, tree: Path) -> None:
    inside = vol_m.mnt / "rsync"
    run("rsync", "-aHX", f"{tree}/", f"{inside}/")
    assert os.getxattr(inside / "marked.txt", "user.origin") == b"envfs tests"
    again = run("rsync", "-aHX", "--checksum", "-n", "-i", f"{tree}/", f"{inside}/")
    assert again == "", again
    run("diff", "-r", "--no-dereference", tree, inside)

    (inside / "secret").write_text("edited")  # rsync must notice and restore it
    again = run("rsync", "-aHX", "--checksum", "-n", "-i", f"{tree}/", f"{inside}/")
    assert "secret" in again
    run("rsync", "-aHX", "--checksum", f"{tree}/", f"{inside}/")
    assert (inside / "secret").read_text() == MARKER


def test_git_commit_gc_fsck(vol_m: Mount) -> None:
    repo = vol_m.mnt / "git"
    repo.mkdir()
    git = ("git", "-c", "user.name=envfs", "-c", "user.email=envfs@example.invalid")
    run(*git, "init", "-q", "-b", "main", cwd=repo)
    for i in range(6):
        (repo / f"file{i}.txt").write_text(f"{MARKER} file {i}\n" * (i + 1) * 50)
        (repo / "changing.txt").write_text(f"{MARKER} version {i}\n" * 200)
        if i == 4:
            (repo / "file0.txt").unlink()
        run(*git, "add", "-A", cwd=repo)
        run(*git, "commit", "-q", "-m", f"commit {i}", cwd=repo)
    run(*git, "gc", "-q", "--aggressive", "--prune=now", cwd=repo)
    run(*git, "fsck", "--full", "--strict", cwd=repo)
    assert run(*git, "rev-list", "--count", "HEAD", cwd=repo).strip() == "6"
    assert run(*git, "status", "--porcelain", cwd=repo) == ""
    assert list((repo / ".git" / "objects" / "pack").glob("*.pack"))
    assert run(*git, "show", "HEAD~3:changing.txt", cwd=repo) == f"{MARKER} version 2\n" * 200


def test_sqlite_wal_thousand_transactions(vol_m: Mount) -> None:
    db = vol_m.mnt / "sqlite" / "test.db"
    db.parent.mkdir()
    script = ["PRAGMA journal_mode=WAL;", "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"]
    script += [
        f"BEGIN; INSERT INTO t (v) VALUES ('{MARKER} row {i}'); COMMIT;" for i in range(1000)
    ]
    script += ["PRAGMA integrity_check;", "SELECT count(*) FROM t;"]
    out = run("sqlite3", db, input="\n".join(script) + "\n").split()
    assert out == ["wal", "ok", "1000"]
    out = run("sqlite3", db, "PRAGMA journal_mode; PRAGMA integrity_check;"
              " SELECT count(*), max(v) FROM t;").split("\n")  # fmt: skip
    assert out[:3] == ["wal", "ok", f"1000|{MARKER} row 999"]


def test_sed_i_renames_over_the_file(vol_m: Mount) -> None:
    f = vol_m.mnt / "sed" / "config.txt"
    f.parent.mkdir()
    f.write_text("".join(f"{MARKER} line {i} old\n" for i in range(2000)))
    before = os.stat(f).st_ino
    run("sed", "-i", "s/ old$/ new/", f)
    assert f.read_text() == "".join(f"{MARKER} line {i} new\n" for i in range(2000))
    assert os.stat(f).st_ino != before  # sed wrote a new file and renamed it over
    assert os.listdir(f.parent) == ["config.txt"]


def test_tempfile_and_os_replace(vol_m: Mount) -> None:
    folder = vol_m.mnt / "tempfile"
    folder.mkdir()
    target = folder / "settings.json"
    target.write_text("old")
    for i in range(3):
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False) as tmp:
            tmp.write(f'{{"marker": "{MARKER}", "version": {i}}}')
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, target)
        assert target.read_text() == f'{{"marker": "{MARKER}", "version": {i}}}'
    assert os.listdir(folder) == ["settings.json"]
    # An unnamed temporary file: O_TMPFILE is not offered (EOPNOTSUPP), so Python falls
    # back to a named file it unlinks at once.
    with tempfile.TemporaryFile(dir=folder) as unnamed:
        unnamed.write(MARKER_BYTES * 1000)
        unnamed.seek(0)
        assert unnamed.read() == MARKER_BYTES * 1000
        assert os.listdir(folder) == ["settings.json"]


def test_backing_folder_holds_no_plaintext(vol_m: Mount) -> None:
    """Runs last: every byte every tool wrote is ciphertext behind the mount."""
    marked_in_view = 0
    for dirpath, _dirs, files in os.walk(vol_m.mnt):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink() and MARKER_BYTES in path.read_bytes():
                marked_in_view += 1
    assert marked_in_view >= 20  # the tests above really wrote the marker

    backing_files = 0
    for dirpath, _dirs, files in os.walk(vol_m.backing):
        for name in files:
            path = Path(dirpath) / name
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            backing_files += 1
            data = path.read_bytes()
            assert MARKER_BYTES not in data, f"plaintext marker in {path}"
            assert MARKER_BYTES.hex().encode() not in data
    assert backing_files >= marked_in_view

    # Nor a name: every backing entry is envfs's own or decrypts to a name of the view.
    view_names = {n for _, dirs, files in os.walk(vol_m.mnt) for n in dirs + files}
    decrypted = set()
    for dirpath, dirs, files in os.walk(vol_m.backing):
        if Path(dirpath) == vol_m.backing and ".envfs-journal" in dirs:
            dirs.remove(".envfs-journal")  # records of changes in progress: ciphertext only
        here = set(dirs) | set(files)
        assert ".envfs-dir" in here, dirpath
        for name in here - {".envfs-dir", ".envfs-volume.json", ".envfs-journal"}:
            if name.endswith(".name") and name[: -len(".name")] in here:
                continue  # a long name's name file
            assert name not in view_names, f"a plaintext name in {dirpath}"
            decrypted.add(view_name(vol_m, Path(dirpath) / name))
    assert decrypted == view_names
    assert "Traceback" not in vol_m.log_text()
    assert "unexpected error" not in vol_m.log_text()
