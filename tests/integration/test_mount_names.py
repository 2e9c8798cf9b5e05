"""Encrypted names (issue 12, format version 2) through a real mount, with real tools.

A ``git clone`` and a ``tar`` extract leave a backing folder in which every name, symlink
target and ``user.`` xattr is envfs's ciphertext (each one is decrypted back, nothing of
the plaintext appears), while the view is the source, exactly. Names of 160 to 255 bytes
go through cp, mv, ln, rm and find; an entry moved to another backing folder is dropped
with a warning; directory modes are kept exactly; a directory replaces an empty one; a
root-run mount whose key root may not use keeps its names locked until a key user asks;
a volume of format 1 keeps its plaintext names.

Every test mounts for real (root and ``/dev/fuse``), and every mount is unmounted whatever
happens (``conftest.live``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from envfs import crypto
from envfs.files import names
from envfs.kms.policy import default_policy
from tests.integration.conftest import (
    Env,
    Mount,
    backing_of,
    golden_copy,
    live,
    long_name_file,
    mounted,
    name_keys,
    view_name,
)
from tests.integration.test_mount_security import (
    User,
    audit_records,
    create_key,
    envfs,
    kms,
    new_volume,
    users,
    warnings_naming,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting for other users needs root"),
]
__all__ = ["users"]  # a fixture, used by name

MARKER = "PLAINTEXT-MARKER"
OWN_NAMES = {".envfs-dir", ".envfs-volume.json"}
REPO = Path(__file__).resolve().parents[2]
GOLDEN_V1 = REPO / "tests" / "golden" / "volume-v1"


@pytest.fixture
def vol(kms_env: Env) -> Iterator[Mount]:
    """A mounted volume with encrypted names (``envfs init``'s default)."""
    kms_env.create_key("vol")
    with mounted(kms_env) as m:
        yield m


def errno_of(call: Any, *args: Any) -> int:
    """The errno ``call(*args)`` fails with (0 if it does not)."""
    try:
        call(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


# --- the view compared with its source, and the backing folder searched for plaintext -----


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything of a tree a copy must keep, by relative path: kind, mode, content hash or
    link target, ``user.`` xattrs, and which hard links share a file (the first name)."""
    found: dict[str, tuple[object, ...]] = {}
    by_inode: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            xattrs: list[tuple[str, bytes]] = []
            if stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            else:
                xattrs = sorted(
                    (x, os.getxattr(path, x, follow_symlinks=False))
                    for x in os.listxattr(path, follow_symlinks=False)
                    if x.startswith("user.")
                )
                detail = ""
                if stat.S_ISREG(st.st_mode):
                    detail = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                    by_inode.setdefault(st.st_ino, []).append(rel)
            found[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), detail, xattrs)
    for paths in by_inode.values():
        for rel in paths:
            found[rel] += (min(paths), len(paths))
    return found


@dataclass
class Secrets:
    """What of a plaintext tree must never be seen in a backing folder."""

    names: set[str] = field(default_factory=set)
    targets: set[str] = field(default_factory=set)
    xattr_names: set[str] = field(default_factory=set)
    xattr_values: set[bytes] = field(default_factory=set)

    def add_tree(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                self.names.add(name)
                if os.path.islink(path):
                    self.targets.add(os.readlink(path))
                    continue
                for x in os.listxattr(path, follow_symlinks=False):
                    if x.startswith("user."):
                        self.xattr_names.add(x)
                        self.xattr_values.add(os.getxattr(path, x, follow_symlinks=False))

    def findable(self) -> list[bytes]:
        """The secrets long enough to be searched for as substrings (8 bytes and more:
        shorter ones turn up in base64 by chance), as bytes."""
        texts = [*self.names, *self.targets, *(x[len("user.") :] for x in self.xattr_names)]
        found = {os.fsencode(t) for t in texts} | self.xattr_values
        return sorted(s for s in found if len(s) >= 8)


def assert_backing_holds_no_plaintext(m: Mount, secrets: Secrets) -> int:
    """Walk ``m``'s backing folder: every name is envfs's own or decrypts in its folder,
    every symlink target and ``user.`` xattr decrypts, and none of ``secrets`` appears in
    a name, a target, an xattr name or value, or a small file. Returns the entries seen."""
    keys = name_keys(m.env, m.backing)
    siv, meta = crypto.Siv(keys.name_key), crypto.Aead(keys.meta_key)
    findable = secrets.findable()
    assert findable, "nothing to look for"
    plain_names = {os.fsencode(n) for n in secrets.names}
    seen = 0

    def clean(what: str, data: bytes) -> None:
        hits = [s for s in findable if s in data]
        assert not hits, f"{what} holds plaintext {hits[:3]}"

    for dirpath, dirnames, filenames in os.walk(m.backing):
        if Path(dirpath) == m.backing and ".envfs-journal" in dirnames:
            dirnames.remove(".envfs-journal")  # records of changes in progress: ciphertext
            for record in (m.backing / ".envfs-journal").iterdir():
                clean(f"the journal record {record}", record.read_bytes())
        assert ".envfs-dir" in filenames, f"{dirpath} has no directory id file"
        here = set(dirnames) | set(filenames)
        for name in sorted(here):
            path = Path(dirpath) / name
            raw_name = os.fsencode(name)
            seen += 1
            assert raw_name not in plain_names or name in OWN_NAMES, path
            clean(f"the backing name {path}", raw_name)
            long_entry = name[: -len(".name")] if name.endswith(".name") else None
            if name in OWN_NAMES or (long_entry is not None and long_entry in here):
                if name != ".envfs-volume.json":
                    clean(f"envfs's file {path}", path.read_bytes())
                continue
            view_name(m, path)  # raises unless an encrypted name of this folder
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = os.fsencode(os.readlink(path))
                clean(f"the target of {path}", target)
                assert os.fsdecode(names.decrypt_target(meta, target)) in secrets.targets
                continue
            for x in os.listxattr(path, follow_symlinks=False):
                assert x.startswith("user.envfs.x."), (path, x)
                clean(f"an xattr name of {path}", os.fsencode(x))
                assert os.fsdecode(names.decrypt_xattr_name(siv, os.fsencode(x))) in (
                    secrets.xattr_names
                )
                clean(f"the xattr {x} of {path}", os.getxattr(path, x, follow_symlinks=False))
            if stat.S_ISREG(st.st_mode):
                raw = path.read_bytes()
                assert raw.startswith(b"\x89envfs\r\n"), path
                clean(f"the content of {path}", raw)
                assert MARKER.encode() not in raw
    return seen


# --- a git clone and a tar extract --------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "envfs test",
    "GIT_AUTHOR_EMAIL": "test@envfs.invalid",
    "GIT_COMMITTER_NAME": "envfs test",
    "GIT_COMMITTER_EMAIL": "test@envfs.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str, home: Path) -> str:
    env = {**os.environ, **GIT_ENV, "HOME": str(home), "GIT_CONFIG_GLOBAL": "/dev/null"}
    return run("git", "-C", repo, *args, env=env)


def make_repository(src: Path, home: Path) -> None:
    """A small repository with a few commits: nested folders, a symlink, an executable,
    names with spaces, unicode and leading dots."""
    files = {
        "README.md": f"{MARKER} the readme\n",
        "src/envfs_sample/module_one.py": "def one() -> int:\n    return 1\n",
        "docs/a folder with spaces/notes on names.txt": "spaces in names\n",
        "docs/ünïcødé-ファイル名.txt": "unicode in names\n",
        ".hidden-settings.toml": "hidden = true\n",
        ".github/workflows/continuous.yml": "on: push\n",
        "deep/level-a/level-b/level-c/level-d/leaf-file.txt": "deep\n",
        "bin/run-something.sh": "#!/bin/sh\necho run\n",
    }
    run("git", "init", "-q", "-b", "main", src)
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    (src / "bin/run-something.sh").chmod(0o755)
    os.symlink("docs/a folder with spaces/notes on names.txt", src / "latest-notes-link")
    git(src, "add", "-A", home=home)
    git(src, "commit", "-q", "-m", "first", home=home)
    (src / "README.md").write_text(f"{MARKER} the readme, second version\n" * 50)
    (src / "src/envfs_sample/module_two_with_longer_name.py").write_text("TWO = 2\n")
    git(src, "add", "-A", home=home)
    git(src, "commit", "-q", "-m", "second", home=home)
    git(src, "mv", "docs/ünïcødé-ファイル名.txt", "docs/renamed ünïcødé.txt", home=home)
    git(src, "rm", "-q", ".github/workflows/continuous.yml", home=home)
    git(src, "commit", "-q", "-m", "third: a rename and a removal", home=home)


def make_tar_source(src: Path) -> None:
    """Long names (200-255 bytes), deep paths, symlinks, hard links, xattrs and modes."""
    src.mkdir()
    long_dir = src / ("d" * 230)
    long_dir.mkdir(mode=0o750)
    files = {
        "L" * 200: b"two hundred\n",
        "m" * 255: b"the longest name\n",
        "ü" * 127: b"254 bytes of unicode\n",
        f"{'x' * 150} with spaces and ümlauts.txt": os.urandom(40_000),
        ".leading-dot-name": b"dot\n",
        "name\nwith a newline": b"newline\n",
        f"{'d' * 230}/{'inner' * 50}": f"{MARKER} inside a long folder\n".encode(),
        f"{'d' * 230}/short": b"short\n",
    }
    deep = Path(*(f"level-{i:02d}-{'q' * 180}" for i in range(15)))  # ~2.9 KB deep
    files[str(deep / "bottom-of-the-tree.txt")] = b"the bottom\n"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / ("m" * 255)).chmod(0o600)
    (src / ".leading-dot-name").chmod(0o444)
    (src / "executable-file").write_bytes(b"#!/bin/sh\n")
    (src / "executable-file").chmod(0o755)
    (src / "private-folder").mkdir(mode=0o700)
    os.symlink("L" * 200, src / "link-to-a-long-name")
    os.symlink("m" * 255, src / ("s" * 240))  # a long name to a long target
    os.symlink("/nonexistent/" + "t" * 300, src / "dangling-long-target")
    os.symlink(str(deep), src / "link-to-the-deep-folder")
    os.link(src / ("L" * 200), long_dir / ("h" * 255))
    os.link(src / ("L" * 200), src / "private-folder" / "second-hard-link")
    os.setxattr(src / ("L" * 200), "user.comment", f"{MARKER} an xattr value".encode())
    os.setxattr(src / ("L" * 200), "user." + "n" * 100, b"\x00\x01binary\xff" * 10)
    os.setxattr(long_dir, "user.folder-attribute", b"on a folder")
    os.setxattr(src / ("ü" * 127), "user.ünïcødé-attribute", "värde".encode())
    os.setxattr(src / ".leading-dot-name", "user.empty-value-attribute", b"")


def test_git_clone_and_tar_leave_no_plaintext_behind_and_the_view_is_the_source(
    vol: Mount, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "repository"
    make_repository(src, home)
    reference = tmp_path / "reference-clone"
    git(tmp_path, "clone", "-q", f"file://{src}", str(reference), home=home)
    clone = vol.mnt / "clone"
    git(vol.mnt, "clone", "-q", f"file://{src}", str(clone), home=home)

    tar_src = tmp_path / "tar-source"
    make_tar_source(tar_src)
    archive = tmp_path / "archive.tar"
    run("tar", "--xattrs", "--format=posix", "-cf", archive, "-C", tar_src, ".")
    extracted = vol.mnt / "extracted"
    extracted.mkdir()
    run("tar", "--xattrs", "--xattrs-include=user.*", "-xpf", archive, "-C", extracted)

    def check_view() -> None:
        work_tree = {k: v for k, v in snapshot(clone).items() if not k.startswith(".git/")}
        reference_tree = snapshot(reference)
        assert work_tree.pop(".git")[0] == stat.S_IFDIR
        assert work_tree == {k: v for k, v in reference_tree.items() if not k.startswith(".git")}
        assert snapshot(extracted) == snapshot(tar_src)
        assert git(clone, "status", "--porcelain", home=home) == ""
        git(clone, "fsck", "--full", "--strict", "--no-progress", home=home)
        log = ["log", "--format=%H %s", "--name-status"]
        assert git(clone, *log, home=home) == git(src, *log, home=home)

    check_view()
    # More of git's own work through the mount: a commit, then packing and pruning.
    (clone / "docs" / "a folder with spaces" / "added in the clone.txt").write_text("new\n")
    git(clone, "add", "-A", home=home)
    git(clone, "commit", "-q", "-m", "fourth, in the clone", home=home)
    git(clone, "gc", "-q", "--prune=now", home=home)
    git(clone, "fsck", "--full", "--strict", "--no-progress", home=home)
    assert git(clone, "status", "--porcelain", home=home) == ""
    git(clone, "reset", "-q", "--hard", "HEAD~1", home=home)
    git(clone, "clean", "-q", "-fdx", home=home)

    vol.remount()  # a fresh mount reads every name back
    check_view()
    secrets = Secrets()
    for tree in (clone, extracted):
        secrets.add_tree(tree)
    secrets.names |= {"clone", "extracted"}
    assert {"README.md", "ü" * 127, "m" * 255, "user.comment"} <= (
        secrets.names | secrets.xattr_names
    )
    seen = assert_backing_holds_no_plaintext(vol, secrets)
    assert seen > len(secrets.names)  # every entry, its id files and long names' name files
    log = vol.log_text().encode()
    assert not [s for s in secrets.findable() if s in log]  # nor in the daemon's log
    assert "WARNING" not in vol.log_text()
    assert "Traceback" not in vol.log_text()


# --- long names with plain tools ----------------------------------------------------------


def long_name(length: int, tag: str) -> str:
    """A name of exactly ``length`` bytes starting with ``tag``."""
    return (tag + "-" + "n" * length)[:length]


def assert_stored(m: Mount, path: Path) -> None:
    """``path``'s backing entry exists in the form its length calls for: names of 160
    bytes and more as a long name beside its name file; shorter ones as themselves."""
    behind = backing_of(m, path)
    assert os.path.lexists(behind), path.name
    long = len(os.fsencode(path.name)) >= 160
    assert names.is_long(os.fsencode(behind.name)) == long, path.name
    assert long_name_file(behind).exists() == long, path.name
    assert view_name(m, behind) == path.name  # the name file checked against its entry


def assert_gone(m: Mount, path: Path) -> None:
    behind = backing_of(m, path)
    assert not os.path.lexists(behind), path.name
    assert not long_name_file(behind).exists(), path.name


def test_long_names_with_cp_mv_ln_rm_and_find(vol: Mount, tmp_path: Path) -> None:
    d = vol.mnt / "long"
    d.mkdir()
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(50_000))
    lengths = [159, 160, 161, 191, 192, 200, 223, 224, 254, 255]
    for n in lengths:
        run("cp", source, d / long_name(n, f"c{n}"))
    assert sorted(os.listdir(d)) == sorted(long_name(n, f"c{n}") for n in lengths)
    for n in lengths:
        path = d / long_name(n, f"c{n}")
        assert path.read_bytes() == source.read_bytes()
        assert_stored(vol, path)
    # mv: renamed to another long name (and a short one); the old entry and name file go.
    for n in lengths:
        old, new = d / long_name(n, f"c{n}"), d / long_name(414 - n, f"m{n}")
        run("mv", old, new)
        assert_gone(vol, old)
        assert_stored(vol, new)
    run("mv", d / long_name(414 - 200, "m200"), d / "short")
    assert_stored(vol, d / "short")
    run("mv", d / "short", d / long_name(250, "back"))
    assert_stored(vol, d / long_name(250, "back"))
    # ln: hard links (each link its own name file) and symlinks to long targets.
    target = d / long_name(255, "m159")
    hard, soft = d / long_name(255, "hard"), d / long_name(240, "soft")
    run("ln", target, hard)
    run("ln", "-s", target.name, soft)
    assert_stored(vol, hard)
    assert_stored(vol, soft)
    assert os.stat(hard).st_nlink == 2 and os.stat(hard).st_ino == os.stat(target).st_ino
    assert backing_of(vol, hard).stat().st_ino == backing_of(vol, target).stat().st_ino
    assert os.readlink(soft) == target.name
    assert soft.read_bytes() == source.read_bytes()
    # A folder with a long name, and a long name inside it, moved whole.
    folder = d / long_name(230, "folder")
    folder.mkdir()
    run("cp", source, folder / long_name(210, "inner"))
    moved = d / long_name(220, "moved-folder")
    run("mv", folder, moved)
    assert_gone(vol, folder)
    assert_stored(vol, moved)
    assert_stored(vol, moved / long_name(210, "inner"))
    assert (moved / long_name(210, "inner")).read_bytes() == source.read_bytes()
    # find sees every one of them, by name.
    found = run("find", d, "-mindepth", "1", "-name", "*nnnn*").splitlines()
    assert sorted(found) == sorted(str(p) for p in d.rglob("*"))
    assert run("find", d, "-name", long_name(255, "hard")).strip() == str(hard)
    # rm: entries and name files all go; the folder is empty behind too.
    before = set(os.listdir(d))
    run("rm", "-r", *(str(d / n) for n in before))
    assert os.listdir(d) == []
    assert os.listdir(backing_of(vol, d)) == [".envfs-dir"]
    # One byte more than 255: ENAMETOOLONG everywhere, and nothing made.
    too_long = d / long_name(256, "over")
    too_long_unicode = d / ("é" * 128)  # 256 bytes
    source_in = d / "present"
    source_in.write_bytes(b"x")
    for path in (too_long, too_long_unicode):
        refused = subprocess.run(["touch", str(path)], capture_output=True, text=True)
        assert refused.returncode == 1 and "File name too long" in refused.stderr
        assert errno_of(os.open, path, os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENAMETOOLONG
        assert errno_of(os.mkdir, path) == errno.ENAMETOOLONG
        assert errno_of(os.symlink, "present", path) == errno.ENAMETOOLONG
        assert errno_of(os.link, source_in, path) == errno.ENAMETOOLONG
        assert errno_of(os.rename, source_in, path) == errno.ENAMETOOLONG
        assert errno_of(os.stat, path) == errno.ENAMETOOLONG
    (d / ("é" * 127)).write_bytes(b"254 bytes")  # the longest unicode name that fits
    assert_stored(vol, d / ("é" * 127))
    assert sorted(os.listdir(d)) == ["present", "é" * 127]
    assert "WARNING" not in vol.log_text()


# --- an entry moved to another backing folder ---------------------------------------------


def test_an_entry_moved_to_another_backing_folder_is_dropped_with_a_warning(vol: Mount) -> None:
    one, two = vol.mnt / "one", vol.mnt / "two"
    one.mkdir()
    two.mkdir()
    moving = {"a": b"file a\n", long_name(200, "long"): b"a long name\n"}
    for name, data in moving.items():
        (one / name).write_bytes(data)
    (one / "sub").mkdir()
    (one / "sub" / "inner").write_bytes(b"inner\n")
    (one / "stays").write_bytes(b"stays in one\n")
    (two / "c").write_bytes(b"file c\n")
    b_one, b_two = backing_of(vol, one), backing_of(vol, two)
    moved = [backing_of(vol, one / name) for name in [*moving, "sub"]]
    for behind in moved:
        run("mv", behind, b_two)  # the entry keeps its encrypted name
        if long_name_file(behind).exists():
            run("mv", long_name_file(behind), b_two)  # and a long name its name file

    def check(live_mount: bool) -> None:
        assert sorted(os.listdir(one)) == ["stays"]
        assert sorted(os.listdir(two)) == ["c"]
        assert (one / "stays").read_bytes() == b"stays in one\n"
        assert (two / "c").read_bytes() == b"file c\n"
        if not live_mount:  # the kernel may remember names it looked up before the move
            for name in [*moving, "sub"]:
                for folder in (one, two):
                    assert errno_of(os.lstat, folder / name) == errno.ENOENT, (folder, name)

    check(live_mount=True)
    vol.remount()
    check(live_mount=False)
    for behind in moved:
        lines = warnings_naming(vol, b_two / behind.name)
        assert lines and all("not listed" in line for line in lines), vol.log_text()
    assert long_name(200, "long") not in vol.log_text()  # backing paths, never plaintext
    assert not [line for line in vol.log_text().splitlines() if str(b_one) in line]
    # The names are free again in both folders, for new entries.
    for folder in (one, two):
        (folder / "a").write_bytes(b"a new a\n")
        assert (folder / "a").read_bytes() == b"a new a\n"
    assert sorted(os.listdir(two)) == ["a", "c"]


# --- directory modes ----------------------------------------------------------------------


def test_directory_modes_are_kept_exactly(vol: Mount, tmp_path: Path) -> None:
    # mkdir(2) itself: the modes ext4 gives (no set-group-ID or set-user-ID asked for).
    ext4 = tmp_path / "on-ext4"
    ext4.mkdir()
    for mode in (0o000, 0o500, 0o1777, 0o2750, 0o4755, 0o6777):
        os.mkdir(ext4 / f"{mode:o}", mode)
        os.mkdir(vol.mnt / f"{mode:o}", mode)
        want = stat.S_IMODE(os.stat(ext4 / f"{mode:o}").st_mode)
        assert stat.S_IMODE(os.stat(vol.mnt / f"{mode:o}").st_mode) == want, f"{mode:o}"
        assert stat.S_IMODE(backing_of(vol, f"{mode:o}").stat().st_mode) == want, f"{mode:o}"
        os.rmdir(vol.mnt / f"{mode:o}")
    # mkdir -m: the mode asked for, exactly (with a chmod for the special bits).
    modes = {"m000": 0o000, "m500": 0o500, "m1777": 0o1777, "m2750": 0o2750, "m0755": 0o755}
    for name, mode in modes.items():
        run("mkdir", "-m", f"{mode:o}", vol.mnt / name)

    def check() -> None:
        for name, mode in modes.items():
            behind = backing_of(vol, name)
            assert stat.S_IMODE(os.stat(vol.mnt / name).st_mode) == mode, name
            assert stat.S_IMODE(behind.stat().st_mode) == mode, name
            assert os.listdir(behind) == [".envfs-dir"], name
            assert os.listdir(vol.mnt / name) == [], name  # root may read even 000

    check()
    vol.remount()
    check()
    # Root may still make and remove entries in them; the modes do not change.
    for name in modes:
        (vol.mnt / name / "f").write_bytes(b"x")
        (vol.mnt / name / "sub").mkdir(mode=0o700)
        sub_mode = 0o700 | (modes[name] & stat.S_ISGID)  # setgid folders pass it on
        assert stat.S_IMODE(os.stat(vol.mnt / name / "sub").st_mode) == sub_mode
        assert stat.S_IMODE(backing_of(vol, f"{name}/sub").stat().st_mode) == sub_mode
        os.unlink(vol.mnt / name / "f")
        os.rmdir(vol.mnt / name / "sub")
    check()
    for name in modes:
        run("rmdir", vol.mnt / name)
        assert not backing_of(vol, name).exists()
    assert os.listdir(vol.mnt) == []
    assert sorted(os.listdir(vol.backing)) == sorted(OWN_NAMES)


# --- a directory renamed onto another -----------------------------------------------------


def test_a_directory_replaces_an_empty_one_never_a_full_one(vol: Mount) -> None:
    src, empty, full = vol.mnt / "src", vol.mnt / "empty", vol.mnt / "full"
    src.mkdir()
    (src / "file").write_bytes(b"in src\n")
    (src / long_name(200, "long")).write_bytes(b"long name in src\n")
    (src / "sub").mkdir()
    empty.mkdir()
    full.mkdir()
    (full / "f").write_bytes(b"in full\n")
    src_id = (backing_of(vol, src) / ".envfs-dir").read_bytes()
    full_id = (backing_of(vol, full) / ".envfs-dir").read_bytes()
    os.listdir(empty)  # known to the kernel, and listed, before the rename

    os.rename(src, empty)
    assert not src.exists()
    assert sorted(os.listdir(empty)) == sorted(["file", long_name(200, "long"), "sub"])
    assert (empty / long_name(200, "long")).read_bytes() == b"long name in src\n"
    # The moved directory keeps its id, to which the names in it are bound.
    assert (backing_of(vol, empty) / ".envfs-dir").read_bytes() == src_id
    assert not backing_of(vol, src).exists()
    assert_stored(vol, empty / long_name(200, "long"))

    (vol.mnt / "empty2").mkdir()
    run("mv", "-T", empty, vol.mnt / "empty2")  # the same through mv
    assert (vol.mnt / "empty2" / "file").read_bytes() == b"in src\n"

    for how in ("rename", "mv"):
        if how == "rename":
            assert errno_of(os.rename, vol.mnt / "empty2", full) == errno.ENOTEMPTY
        else:
            refused = subprocess.run(
                ["mv", "-T", str(vol.mnt / "empty2"), str(full)], capture_output=True, text=True
            )
            assert refused.returncode == 1 and "Directory not empty" in refused.stderr
        assert os.listdir(full) == ["f"]
        assert (full / "f").read_bytes() == b"in full\n"
        assert (backing_of(vol, full) / ".envfs-dir").read_bytes() == full_id
        assert (vol.mnt / "empty2" / "file").read_bytes() == b"in src\n"
    vol.remount()
    assert sorted(os.listdir(vol.mnt)) == ["empty2", "full"]
    assert (vol.mnt / "empty2" / long_name(200, "long")).read_bytes() == b"long name in src\n"
    assert "WARNING" not in vol.log_text()


# --- names locked until a key user asks ---------------------------------------------------


def test_names_are_locked_until_a_key_user_asks_then_the_mounts(
    kms_env: Env, users: dict[str, User]
) -> None:
    """Root-run, ``--allow-other``, root the key's administrator only: no name can be read
    or made until a user of the key has made a request; then the names belong to the
    mount (root and a stranger list them), while contents stay each user's."""
    usr, stranger = users["usr"], users["str"]
    arn = create_key(kms_env, "shared")
    m = new_volume(kms_env, "shared", "shared", "--allow-other")
    kms(kms_env, "put-key-policy", "--key-id", arn,
        "--policy", default_policy(["uid:0"], [f"user:{usr.name}"]))  # fmt: skip
    outside = Path(tempfile.mkdtemp(prefix="envfs-names-", dir="/tmp"))
    try:
        outside.chmod(0o755)
        m.mnt = outside / "mnt"
        m.mnt.mkdir()
        with live(m):
            m.mnt.chmod(0o777)  # a change of the root's mode needs no name
            for attempt in (
                lambda: os.listdir(m.mnt),
                lambda: os.stat(m.mnt / "anything"),
                lambda: os.mkdir(m.mnt / "folder"),
                lambda: (m.mnt / "file").write_bytes(b"x"),
            ):
                assert errno_of(attempt) == errno.EACCES
            refused = stranger.sh(f"ls {m.mnt}")
            assert refused.returncode != 0 and "Permission denied" in refused.stderr
            assert sorted(os.listdir(m.backing)) == sorted(OWN_NAMES)

            # The key user's first request unlocks the names, for the whole mount.
            made = usr.sh(
                f"ls -A {m.mnt} && mkdir {m.mnt}/shared && echo mine > {m.mnt}/shared/doc"
            )
            assert made.returncode == 0 and made.stdout == "", made.stderr
            assert os.listdir(m.mnt) == ["shared"]
            assert os.listdir(m.mnt / "shared") == ["doc"]
            (m.mnt / "by-root").mkdir()  # root makes names now (no content, no key)
            assert stranger.sh(f"ls {m.mnt}/shared").stdout == "doc\n"
            # Contents stay the key user's.
            assert usr.sh(f"cat {m.mnt}/shared/doc").stdout == "mine\n"
            assert errno_of((m.mnt / "shared" / "doc").read_bytes) == errno.EACCES
            denied = stranger.sh(f"cat {m.mnt}/shared/doc")
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
            assert errno_of((m.mnt / "by-root" / "file").write_bytes, b"x") == errno.EACCES

        # Every attempt to unlock was a decision of the key service, audited.
        volume_decisions = {
            (r["caller"]["uid"], r["outcome"])
            for r in audit_records(kms_env, arn)
            if r["operation"] == "Decrypt"
            and r.get("encryption_context", {}).get("envfs:purpose") == "volume"
        }
        assert volume_decisions >= {
            (0, "AccessDeniedException"),
            (stranger.uid, "AccessDeniedException"),
            (usr.uid, "Success"),
        }, volume_decisions

        # A new mount starts locked again.
        with live(m):
            assert errno_of(os.listdir, m.mnt) == errno.EACCES
            assert usr.sh(f"cat {m.mnt}/shared/doc").stdout == "mine\n"
            assert sorted(os.listdir(m.mnt)) == ["by-root", "shared"]
    finally:
        shutil.rmtree(outside, ignore_errors=True)


# --- format 1 keeps plaintext names -------------------------------------------------------


def test_a_format_1_volume_keeps_plaintext_names(tmp_path: Path) -> None:
    """The golden volume of format 1 (``test_mount_security`` checks it reads whole) gets
    new entries under their plaintext names, and stays of format 1."""
    expected = json.loads((GOLDEN_V1 / "expected.json").read_text())
    copy, golden_env = golden_copy(GOLDEN_V1, tmp_path)
    backing = copy / "backing"
    before = json.loads((backing / ".envfs-volume.json").read_text())
    assert (before["format_version"], before["features"]) == (1, [])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(golden_env, backing, mnt, tmp_path / "golden.log")
    with live(m):
        assert (mnt / "hello.txt").stat().st_size == expected["files"]["hello.txt"]["size"]
        (mnt / "new folder").mkdir()
        (mnt / "new folder" / "new file.txt").write_text("written by this version\n")
        os.symlink("new folder/new file.txt", mnt / "new link")
        os.setxattr(mnt / "new folder" / "new file.txt", "user.note", b"plain")
        assert (mnt / "new link").read_text() == "written by this version\n"
    assert (backing / "new folder" / "new file.txt").read_bytes().startswith(b"\x89envfs\r\n")
    assert os.readlink(backing / "new link") == "new folder/new file.txt"
    assert os.getxattr(backing / "new folder" / "new file.txt", "user.note") == b"plain"
    assert not list(backing.rglob(".envfs-dir"))
    assert json.loads((backing / ".envfs-volume.json").read_text()) == before
    code, out, err = envfs(golden_env, "info", str(backing), check=False)
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["FormatVersion"], answer["Features"], answer["FileNames"]) == (
        1,
        [],
        "plaintext",
    )
    assert "WARNING" not in m.log_text()
