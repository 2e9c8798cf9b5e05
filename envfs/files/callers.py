"""The users behind FUSE requests, with their groups, kept no longer than a key decision.

A key policy names users and groups, so every decision needs the caller's groups from the
group database (``getgrouplist``, about 50 µs). :class:`CallerCache` keeps them per
``(uid, gid)`` exactly as long as the mount may reuse a key decision:

- with a data-key cache of ``max_age`` seconds (daemon-backed mounts), for ``max_age``
  seconds: a user removed from a group loses what the group gave within ``max_age``, as a
  policy change does;
- with no data-key cache (``max_age`` 0, the default of an embedded mount), only while the
  user and group databases are unchanged: removing a user from a group takes effect at the
  user's next open. Where the databases are files (``passwd`` and ``group`` sources in
  ``/etc/nsswitch.conf`` limited to ``files``, ``compat`` and ``systemd``), "unchanged" is
  told by inotify watches on ``/etc/passwd``, ``/etc/group``, ``/etc/nsswitch.conf`` and
  the userdb folders ``/etc/userdb``, ``/run/userdb`` (one non-blocking ``read`` per
  decision; the kernel queues an event before the change's system call returns), or, where
  inotify is not available, from their ``stat``; with any other source (LDAP, SSSD...)
  nothing is cached and every open reads the group database.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections.abc import Callable

from envfs.identity import Caller

# Sources of the user and group databases whose state is the stat of these files.
_FILE_SOURCES = frozenset({"files", "compat", "systemd"})
_FILES = ("/etc/passwd", "/etc/group")
_FOLDERS = ("/etc/userdb", "/run/userdb")  # systemd's user and group records (nss-systemd)
_MAX_ENTRIES = 4096


class GroupDatabase:
    """Tells cheaply whether the user and group databases may have changed."""

    def __init__(
        self,
        nsswitch: str = "/etc/nsswitch.conf",
        files: tuple[str, ...] = _FILES,
        folders: tuple[str, ...] = _FOLDERS,
    ) -> None:
        self.nsswitch = nsswitch
        self.watched = (*files, *folders)
        self._files_only: tuple[object, bool] | None = None  # (state seen, verdict)
        try:
            self._watch: _Watch | None = _Watch((nsswitch, *files), folders)
        except OSError:
            self._watch = None  # inotify refused (limits, seccomp): stat every time

    def state(self) -> object | None:
        """A value that changes whenever the databases may have changed, or None when that
        cannot be told from files (a source other than files)."""
        state: object
        if self._watch is not None:
            self._watch.poll()
            state = self._watch.generation
        else:
            state = tuple(_stat_of(path) for path in (self.nsswitch, *self.watched))
        if self._files_only is None or self._files_only[0] != state:
            self._files_only = (state, _sources_are_files(self.nsswitch))
        return state if self._files_only[1] else None

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()


_libc = ctypes.CDLL(None, use_errno=True)
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
# Anything that changes a file's content or a folder's entries, or the watch itself.
_IN_EVENTS = (
    0x002  # IN_MODIFY
    | 0x004  # IN_ATTRIB
    | 0x008  # IN_CLOSE_WRITE
    | 0x040  # IN_MOVED_FROM
    | 0x080  # IN_MOVED_TO
    | 0x100  # IN_CREATE
    | 0x200  # IN_DELETE
    | 0x400  # IN_DELETE_SELF
    | 0x800  # IN_MOVE_SELF
)
_IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name, len bytes)


class _Watch:
    """inotify watches on the folders holding some files, and on some folders (watched
    from when they exist): :attr:`generation` grows when one of the files, or anything in
    one of the folders, may have changed."""

    def __init__(self, files: tuple[str, ...], folders: tuple[str, ...]) -> None:
        self.generation = 0
        self._fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._names: dict[int, frozenset[str] | None] = {}  # wd -> names that matter
        self._folders = folders
        try:
            parents: dict[str, set[str]] = {}
            for path in (*files, *folders):  # a folder's parent tells when it is made
                parents.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
            for parent, names in parents.items():
                self._add(parent, frozenset(names))
            self._add_folders()
        except BaseException:
            os.close(self._fd)
            raise

    def _add(self, path: str, names: frozenset[str] | None) -> None:
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_EVENTS)
        if wd >= 0:
            self._names[wd] = names
        elif ctypes.get_errno() != errno.ENOENT:  # a folder that does not exist yet
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def _add_folders(self) -> None:
        for folder in self._folders:
            if os.path.isdir(folder):
                self._add(folder, None)  # watching a folder twice gives the same wd

    def poll(self) -> None:
        changed = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            at = 0
            while at + _EVENT.size <= len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size : at + _EVENT.size + size].rstrip(b"\0")
                at += _EVENT.size + size
                names = self._names.get(wd)
                if mask & _IN_Q_OVERFLOW or names is None or os.fsdecode(name) in names:
                    changed = True
        if changed:
            self.generation += 1
            self._add_folders()  # a userdb folder made since is watched from now on

    def close(self) -> None:
        os.close(self._fd)


def _stat_of(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _sources_are_files(nsswitch: str) -> bool:
    try:
        with open(nsswitch, encoding="utf-8", errors="replace") as conf:
            lines = conf.read().splitlines()
    except FileNotFoundError:
        return True  # glibc's default: files
    except OSError:
        return False
    for line in lines:
        database, _, sources = line.partition("#")[0].partition(":")
        if database.strip() in ("passwd", "group"):
            for source in sources.split():
                if not source.startswith("[") and source not in _FILE_SOURCES:
                    return False
    return True


class CallerCache:
    """Callers by ``(uid, gid)``, reused while a key decision could be (see module doc)."""

    def __init__(
        self,
        max_age: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        build: Callable[[int, int], Caller] = Caller.from_ids,
        state: Callable[[], object | None] | None = None,
    ) -> None:
        self.max_age = max_age
        self._clock = clock
        self._build = build
        self._database: GroupDatabase | None = None
        if state is None and not max_age:  # only then do the databases' changes matter
            self._database = GroupDatabase()
            state = self._database.state
        self._state = state if state is not None else lambda: None
        self._entries: dict[tuple[int, int], tuple[float, object | None, Caller]] = {}

    def get(self, uid: int, gid: int) -> Caller:
        """The caller ``uid``/``gid`` with its groups as the databases say now."""
        now = self._clock()
        if self.max_age:
            state: object | None = None
        else:
            state = self._state()
            if state is None:
                return self._build(uid, gid)
        entry = self._entries.get((uid, gid))
        if entry is not None and entry[0] > now and entry[1] == state:
            return entry[2]
        caller = self._build(uid, gid)
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        expires = now + self.max_age if self.max_age else float("inf")
        self._entries[(uid, gid)] = (expires, state, caller)
        return caller

    def close(self) -> None:
        """Stop watching the group database (the inotify descriptor)."""
        if self._database is not None:
            self._database.close()
