"""Names in the backing folder: the plaintext view's names as the backing folder stores them.

A volume stores its names one of two ways, chosen when it is made (its ``names`` feature):

- :class:`PlainNames`: a backing entry has the name it has in the plaintext view (format
  version 1, or ``envfs init --plaintext-names``). envfs's own entries (``.envfs-*``) are
  reserved names.
- :class:`EncryptedNames`: names, symlink targets and ``user.`` xattr names and values are
  encrypted (``docs/format.md``, *Version 2: names*; the primitives are :mod:`.names`).
  Every directory has a ``.envfs-dir`` file holding its id, which binds the names in it;
  names too long for the backing folder get a name file beside their entry. No backing
  name of a user's entry starts with ``.`` but a long name's, so everything else starting
  with ``.`` is envfs's own and never shown.

The namespace (:mod:`.vfs`) keeps the inode table and every backing system call on backing
names and asks this module only at the edges: a name from a request becomes a backing name
(:meth:`EncryptedNames.entry`), a listed backing name becomes a name of the view
(:meth:`EncryptedNames.plain`).

Encrypted names need the volume's name keys, which come with the volume file's
authentication (:meth:`.keyaccess.KeyAccess.verify_volume`): until a user whom the key
policy lets use the volume's key has made a request, no name can be read or made
(``EACCES``).

Safe to cache, and cached: a directory's id by its backing inode (an id never changes),
and names in both directions by directory id.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import NamedTuple

from envfs import crypto
from envfs.errors import IntegrityError
from envfs.files import acl, names
from envfs.files.backing import TEMP_PREFIX, renameat2
from envfs.files.names import NameKeys

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
CACHE_SIZE = 65536  # names per direction, and directory ids, kept decrypted
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OWN_FILE_MODE = 0o440  # .envfs-dir and name files: the daemon's, written once


class Entry(NamedTuple):
    """A name of the view as the backing folder stores it: the backing name, and for a
    long name the encoded name its name file holds (None otherwise)."""

    backing: bytes
    long_encoded: bytes | None = None


class PlainNames:
    """Names stored as they are (format version 1, or ``--plaintext-names``)."""

    encrypted = False
    ready = True

    def __init__(self, hidden_at_root: frozenset[bytes]) -> None:
        self.hidden_at_root = hidden_at_root

    def entry(self, dir_fd: int, dir_key: tuple[int, int], name: bytes, at_root: bool) -> Entry:
        """The backing entry of ``name`` in a directory.

        Raises:
            OSError: EINVAL (not a name), ENAMETOOLONG, ENOENT (one of envfs's own).
        """
        names.check_name(name)
        if name.startswith(TEMP_PREFIX) or (at_root and name in self.hidden_at_root):
            raise OSError(errno.ENOENT, "reserved name")
        return Entry(name)

    def plain(
        self, dir_fd: int, dir_key: tuple[int, int], backing: bytes, at_root: bool
    ) -> bytes | None:
        """The view's name of a listed backing entry; None for envfs's own."""
        if backing.startswith(TEMP_PREFIX) or (at_root and backing in self.hidden_at_root):
            return None
        return backing

    def add_name_file(self, dir_fd: int, entry: Entry) -> None:
        """Nothing to do: plaintext names have no name files."""

    def remove_name_file(self, dir_fd: int, entry: Entry) -> None:
        """Nothing to do: plaintext names have no name files."""

    def seal_target(self, target: bytes) -> bytes:
        return target

    def open_target(self, stored: bytes) -> bytes:
        return stored

    def forget_dir(self, dir_key: tuple[int, int]) -> None:
        """Nothing cached."""

    def xattr_name(self, name: bytes) -> bytes:
        return name

    def view_xattr_name(self, stored: bytes) -> bytes | None:
        """The view's name of a backing xattr: ``user.`` ones but envfs's private names."""
        if stored.startswith(b"user.") and not acl.is_private(stored):
            return stored
        return None

    def seal_xattr(self, stored: bytes, value: bytes) -> bytes:
        return value

    def open_xattr(self, stored: bytes, sealed: bytes) -> bytes:
        return sealed


class EncryptedNames:
    """Encrypted names of one volume (format version 2 with the ``names`` feature).

    Args:
        volume_id: the volume's id, which the directory id files are bound to.
        key_source: gives the name keys once the volume is authenticated (None before).
    """

    encrypted = True

    def __init__(self, volume_id: str, key_source: Callable[[], NameKeys | None]) -> None:
        self.volume_id = volume_id
        self._key_source = key_source
        self._keys: NameKeys | None = None
        self._siv: crypto.Siv | None = None
        self._meta: crypto.Aead | None = None
        self._dir_ids: dict[tuple[int, int], bytes] = {}
        self._to_backing: dict[tuple[bytes, bytes], Entry] = {}
        self._to_plain: dict[tuple[bytes, bytes], bytes] = {}

    @property
    def ready(self) -> bool:
        """Whether the name keys are here (the volume was authenticated)."""
        if self._keys is None:
            keys = self._key_source()
            if keys is not None:
                self._keys = keys
                self._siv = crypto.Siv(keys.name_key)
                self._meta = crypto.Aead(keys.meta_key)
        return self._keys is not None

    def _unlocked(self) -> tuple[NameKeys, crypto.Siv, crypto.Aead]:
        if not self.ready or self._keys is None or self._siv is None or self._meta is None:
            raise OSError(
                errno.EACCES,
                "the volume's names are locked until a user of its key makes a request",
            )
        return self._keys, self._siv, self._meta

    # --- directory ids -----------------------------------------------------------------

    def dir_id(self, dir_fd: int, dir_key: tuple[int, int]) -> bytes:
        """The id of the directory open as ``dir_fd`` (backing inode ``dir_key``).

        Raises:
            IntegrityError: its ``.envfs-dir`` is missing, malformed or not authentic.
        """
        found = self._dir_ids.get(dir_key)
        if found is not None:
            return found
        keys, _, _ = self._unlocked()
        try:
            fd = os.open(names.DIR_FILE, _READ_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            raise IntegrityError("the directory has no directory id file") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IntegrityError("the directory id file is a symlink") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IntegrityError("the directory id file is not a regular file")
            data = os.read(fd, names.DIR_FILE_SIZE + 1)
        finally:
            os.close(fd)
        found = names.parse_dir_file(keys, data, self.volume_id)
        if len(self._dir_ids) >= CACHE_SIZE:
            self._dir_ids.clear()
        self._dir_ids[dir_key] = found
        return found

    def write_dir_file(self, dir_fd: int, dir_id: bytes) -> None:
        """Write the ``.envfs-dir`` file of a new directory (which has none yet)."""
        keys, _, _ = self._unlocked()
        _write_new(dir_fd, names.DIR_FILE, names.encode_dir_file(keys, dir_id, self.volume_id))

    def forget_dir(self, dir_key: tuple[int, int]) -> None:
        """Forget a removed directory's id (its inode number may be used again)."""
        self._dir_ids.pop(dir_key, None)

    # --- names -------------------------------------------------------------------------

    def entry(self, dir_fd: int, dir_key: tuple[int, int], name: bytes, at_root: bool) -> Entry:
        """The backing entry of ``name`` in a directory.

        Raises:
            OSError: EINVAL (not a name), ENAMETOOLONG (over 255 bytes), EACCES (locked).
            IntegrityError: the directory's id file is damaged.
        """
        names.check_name(name)
        dir_id = self.dir_id(dir_fd, dir_key)
        found = self._to_backing.get((dir_id, name))
        if found is not None:
            return found
        _, siv, _ = self._unlocked()
        encoded = names.encrypt_name(siv, dir_id, name)
        backing = names.backing_name(encoded)
        entry = Entry(backing, encoded if backing != encoded else None)
        if len(self._to_backing) >= CACHE_SIZE:
            self._to_backing.clear()
        self._to_backing[(dir_id, name)] = entry
        return entry

    def plain(
        self, dir_fd: int, dir_key: tuple[int, int], backing: bytes, at_root: bool
    ) -> bytes | None:
        """The view's name of a listed backing entry; None for envfs's own entries.

        Raises:
            IntegrityError: the name does not decrypt in this directory (moved from
                another, edited, or not envfs's), a long name's name file is missing or
                not its own, or the directory's id file is damaged.
        """
        is_long = names.is_long(backing)
        if backing.startswith(b".") and not is_long:
            return None
        dir_id = self.dir_id(dir_fd, dir_key)
        found = self._to_plain.get((dir_id, backing))
        if found is not None:
            return found
        _, siv, _ = self._unlocked()
        encoded = backing
        if is_long:
            encoded = _read_name_file(dir_fd, names.name_file(backing))
            names.check_long(backing, encoded)
        name = names.decrypt_name(siv, dir_id, encoded)
        if len(self._to_plain) >= CACHE_SIZE:
            self._to_plain.clear()
        self._to_plain[(dir_id, backing)] = name
        # A name just listed is usually looked up next (ls -l, cp -r, cat *).
        if len(self._to_backing) >= CACHE_SIZE:
            self._to_backing.clear()
        self._to_backing[(dir_id, name)] = Entry(backing, encoded if is_long else None)
        return name

    def add_name_file(self, dir_fd: int, entry: Entry) -> None:
        """Write a long name's name file before its entry is made or named (atomically:
        a temporary file renamed over any name file already there, which can only hold
        the same bytes or be damaged)."""
        if entry.long_encoded is None:
            return
        temp = TEMP_PREFIX + crypto.random_bytes(8).hex().encode()
        _write_new(dir_fd, temp, entry.long_encoded)
        try:
            renameat2(dir_fd, temp, dir_fd, names.name_file(entry.backing), 0)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise

    def remove_name_file(self, dir_fd: int, entry: Entry) -> None:
        """Remove a long name's name file if its entry is gone (a rename onto a hard link
        of itself leaves it)."""
        if entry.long_encoded is None:
            return
        try:
            os.stat(entry.backing, dir_fd=dir_fd, follow_symlinks=False)
            return
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(names.name_file(entry.backing), dir_fd=dir_fd)

    # --- symlink targets ---------------------------------------------------------------

    def seal_target(self, target: bytes) -> bytes:
        _, _, meta = self._unlocked()
        return names.encrypt_target(meta, target)

    def open_target(self, stored: bytes) -> bytes:
        """The plaintext of a backing symlink's target.

        Raises:
            IntegrityError: not a target envfs wrote for this volume.
        """
        _, _, meta = self._unlocked()
        return names.decrypt_target(meta, stored)

    # --- xattrs ------------------------------------------------------------------------

    def xattr_name(self, name: bytes) -> bytes:
        _, siv, _ = self._unlocked()
        return names.encrypt_xattr_name(siv, name)

    def view_xattr_name(self, stored: bytes) -> bytes | None:
        """The view's name of a backing xattr: only envfs's encrypted ones have one.

        Raises:
            IntegrityError: one of envfs's names that does not decrypt.
        """
        if not stored.startswith(names.XATTR_PREFIX):
            return None
        _, siv, _ = self._unlocked()
        return names.decrypt_xattr_name(siv, stored)

    def seal_xattr(self, backing_name: bytes, value: bytes) -> bytes:
        _, _, meta = self._unlocked()
        return names.encrypt_xattr_value(meta, backing_name, value)

    def open_xattr(self, backing_name: bytes, sealed: bytes) -> bytes:
        _, _, meta = self._unlocked()
        return names.decrypt_xattr_value(meta, backing_name, sealed)


Names = PlainNames | EncryptedNames


def _write_new(dir_fd: int, name: bytes, data: bytes) -> None:
    """Create ``name`` in ``dir_fd`` (never over anything there, never through a symlink)
    holding ``data``; removed again if writing fails."""
    fd = os.open(name, _NEW_FLAGS, _OWN_FILE_MODE, dir_fd=dir_fd)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.EIO, "short write")
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)


def _read_name_file(dir_fd: int, name: bytes) -> bytes:
    """The content of a long name's name file (at most 1 KiB, the most one holds).

    Raises:
        IntegrityError: missing, not a regular file, or too long.
    """
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) or exc.errno == errno.ELOOP:
            raise IntegrityError("a long name's name file is missing") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IntegrityError("a long name's name file is not a regular file")
        data = os.read(fd, 1025)
    finally:
        os.close(fd)
    if len(data) > 1024:
        raise IntegrityError("a long name's name file is too long")
    return data
