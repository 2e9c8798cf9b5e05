"""What a volume holds, read without any key: the library side of ``envfs info BACKING``.

Nothing is decrypted and the key service is not asked. The volume file gives the volume's
id, region, keys, format version, block size and features (read, *not authenticated*:
that takes the key service, at mount); the walk of the backing folder gives the counts,
and each file's header (its structure only) and backing size give its plaintext size,
its flags and the master key version its data key was wrapped with.

A file that can be seen to be unusable without its key — no envfs header, an unknown
version or flag, an impossible size, a key the volume file does not accept, a block size
other than the volume's — is counted and listed in :attr:`VolumeSummary.problems`, never
fatal. A file whose header is well formed but whose content was tampered with is not:
finding that needs the data key (the mount finds it at the first read).

The backing folder may be written by someone hostile while it is read: the walk goes
through directory descriptors, one name at a time, following no symlink
(``O_NOFOLLOW``, files opened through ``O_PATH`` and only if regular, as the mount does),
and never leaves the folder. It holds one descriptor per level of the folder being read.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from envfs.errors import IntegrityError
from envfs.files import fileformat, names, tree
from envfs.files.backing import TEMP_PREFIX
from envfs.files.journal import JOURNAL_DIR
from envfs.files.volume import VOLUME_FILE, Volume
from envfs.keys.provider import WrappedKey

# Names the plaintext view hides at the root of the volume.
_HIDDEN_AT_ROOT = frozenset({VOLUME_FILE, VOLUME_FILE + ".tmp"})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_PROBLEMS = 100  # listed; all are counted


@dataclass(frozen=True)
class Problem:
    """One entry of the backing folder that cannot be used, and why."""

    path: str  # relative to the backing folder
    problem: str


@dataclass
class VolumeSummary:
    """A volume's settings (from its volume file) and what its backing folder holds."""

    volume: Volume
    # None: the key service's wrapped keys are opaque (AWS KMS), their key is not checked
    read_wrapped: Callable[[bytes], WrappedKey | None] | None = field(repr=False, compare=False)
    files: int = 0  # regular files the plaintext view shows, usable or not
    directories: int = 0  # below the root
    symlinks: int = 0
    special_files: int = 0  # FIFOs, sockets, device nodes
    plaintext_size: int = 0  # of the files whose size is known
    backing_size: int = 0  # of all the files, as stored
    sparse_files: int = 0  # files whose header has FLAG_SPARSE
    leftovers: int = 0  # .envfs-tmp-* files of interrupted creates (removed at mount)
    unreadable_files: int = 0
    unreadable_directories: int = 0
    key_versions: Counter[tuple[str, int | None]] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    def _problem(self, path: str, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(path, problem))


def summarize(
    backing: Path, read_wrapped: Callable[[bytes], WrappedKey | None] | None
) -> VolumeSummary:
    """Read ``backing``'s volume file and walk its folder, decrypting nothing;
    ``read_wrapped`` reads a wrapped data key's master key id and version (the key
    provider's format: :meth:`~envfs.keys.provider.KeyProvider.read_wrapped`), None where
    the key service's wrapped keys are opaque (AWS KMS: versions unknown, not checked).

    Raises:
        VolumeError: ``backing`` is not a volume (no volume file, or a malformed one, or
            one of a version or with features this envfs does not know).
    """
    volume = Volume.load(backing)
    summary = VolumeSummary(volume, read_wrapped)
    try:
        root_fd = os.open(volume.backing, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError as exc:
        summary.unreadable_directories += 1
        summary._problem(".", f"folder not read: {exc.strerror}")
        return summary
    _walk(root_fd, summary)
    return summary


def _walk(root_fd: int, summary: VolumeSummary) -> None:
    """Depth first, one open descriptor per level; each folder's names read at once."""
    stack: list[tuple[str, int, list[os.DirEntry[str]]]] = []
    try:
        stack.append(("", root_fd, _listing(root_fd)))
    except OSError as exc:
        os.close(root_fd)
        summary.unreadable_directories += 1
        summary._problem(".", f"folder not read: {exc.strerror}")
        return
    try:
        while stack:
            where, dir_fd, entries = stack[-1]
            if not entries:
                os.close(dir_fd)
                stack.pop()
                continue
            entry = entries.pop()
            path = os.path.join(where, entry.name)
            try:
                kind = _kind(entry)
            except OSError:
                continue  # gone since the folder was listed
            if kind == "symlink":
                summary.symlinks += 1
            elif kind == "dir":
                if not where and entry.name == JOURNAL_DIR:
                    continue  # envfs's own: records of changes in progress, not files
                summary.directories += 1
                try:
                    child = _open_dir(dir_fd, entry)
                    try:
                        listed = _listing(child)
                    except BaseException:
                        os.close(child)
                        raise
                except OSError as exc:
                    # Gone, swapped for something else, not ours to read: said, not fatal.
                    summary.unreadable_directories += 1
                    summary._problem(path, f"folder not read: {exc.strerror}")
                    continue
                stack.append((path, child, listed))
            elif kind == "file":
                if not where and entry.name in _HIDDEN_AT_ROOT:
                    continue
                name = os.fsencode(entry.name)
                if name.startswith(TEMP_PREFIX):
                    summary.leftovers += 1
                    continue
                if summary.volume.encrypted_names and _own_file(name):
                    continue
                summary.files += 1
                _read_file(dir_fd, entry.name, path, summary)
            else:
                summary.special_files += 1
    finally:
        for _, dir_fd, _ in stack:
            os.close(dir_fd)


def _own_file(name: bytes) -> bool:
    """With encrypted names: one of envfs's own files (a directory id file, a long name's
    name file), which no user entry's name can be (they never start with ``.``)."""
    return name.startswith(b".") and not names.is_long(name)


def _kind(entry: os.DirEntry[str]) -> str:
    """``symlink``, ``dir``, ``file`` or ``other``, never following a symlink."""
    if entry.is_symlink():
        return "symlink"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    if entry.is_file(follow_symlinks=False):
        return "file"
    return "other"


def _listing(dir_fd: int) -> list[os.DirEntry[str]]:
    """The entries of ``dir_fd``, last name first (popped in name order)."""
    with os.scandir(dir_fd) as entries:
        return sorted(entries, key=lambda e: os.fsencode(e.name), reverse=True)


def _open_dir(dir_fd: int, entry: os.DirEntry[str]) -> int:
    """The folder ``entry`` names, if it is still the one listed (no symlink followed)."""
    listed = entry.stat(follow_symlinks=False)  # not d_ino: overlayfs may differ there
    fd = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino):
        os.close(fd)
        raise OSError(errno.ESTALE, "it changed while it was read")
    return fd


def _read_file(dir_fd: int, name: str, path: str, summary: VolumeSummary) -> None:
    """Count one regular file: its header's structure and its size, nothing decrypted."""
    try:
        fd = tree.open_regular(dir_fd, os.fsencode(name), os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        summary.unreadable_files += 1
        summary._problem(path, f"not read: {exc.strerror}")
        return
    try:
        raw = os.pread(fd, fileformat.HEADER_SIZE, 0)
        size = os.fstat(fd).st_size
    except OSError as exc:
        summary.unreadable_files += 1
        summary._problem(path, f"not read: {exc.strerror}")
        return
    finally:
        os.close(fd)
    summary.backing_size += size
    problem = _file_problem(raw, size, summary)
    if problem is not None:
        summary.unreadable_files += 1
        summary._problem(path, problem)


def _file_problem(raw: bytes, size: int, summary: VolumeSummary) -> str | None:
    volume = summary.volume
    try:
        header = fileformat.FileHeader.parse(raw)
    except IntegrityError as exc:
        return exc.message
    if header.sparse:
        summary.sparse_files += 1
    wrapped = None if summary.read_wrapped is None else summary.read_wrapped(header.wrapped_key)
    summary.key_versions[header.key_arn, None if wrapped is None else wrapped.key_version] += 1
    if header.version != volume.format_version:
        return f"its format version {header.version} is not the volume's {volume.format_version}"
    if not volume.accepts_key(header.key_arn):
        return f"its header names key {header.key_arn!r}, which the volume does not accept"
    if summary.read_wrapped is not None and (
        wrapped is None or not header.key_arn.endswith(f":key/{wrapped.key_id}")
    ):
        return "its wrapped data key was made under another key than its header names"
    if header.block_shift != volume.block_shift:
        return f"its block size {header.block_size} is not the volume's {volume.block_size}"
    try:
        summary.plaintext_size += fileformat.plaintext_size(size, header.block_shift)
    except IntegrityError as exc:
        return exc.message
    return None
