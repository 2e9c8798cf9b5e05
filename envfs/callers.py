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
  checked cheaply from their ``stat`` (and those of ``/etc/nsswitch.conf`` and of the
  userdb folders ``/etc/userdb``, ``/run/userdb``); with any other source (LDAP, SSSD...)
  nothing is cached and every open reads the group database.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from envfs.kms.model import Caller

# Sources of the user and group databases whose state is the stat of these files.
_FILE_SOURCES = frozenset({"files", "compat", "systemd"})
_WATCHED = (
    "/etc/passwd",
    "/etc/group",
    "/etc/userdb",  # systemd's user and group records (nss-systemd)
    "/run/userdb",
)
_MAX_ENTRIES = 4096

Fingerprint = tuple[tuple[int, int, int, int] | None, ...]


class GroupDatabase:
    """Tells cheaply whether the user and group databases may have changed."""

    def __init__(
        self, nsswitch: str = "/etc/nsswitch.conf", watched: tuple[str, ...] = _WATCHED
    ) -> None:
        self.nsswitch = nsswitch
        self.watched = watched
        self._files_only: tuple[Fingerprint, bool] | None = None  # (state seen, verdict)

    def state(self) -> Fingerprint | None:
        """A value that changes whenever the databases may have changed, or None when that
        cannot be told from files (a source other than files)."""
        state = tuple(_stat_of(path) for path in (self.nsswitch, *self.watched))
        if self._files_only is None or self._files_only[0] != state:
            self._files_only = (state, _sources_are_files(self.nsswitch))
        return state if self._files_only[1] else None


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
        state: Callable[[], Fingerprint | None] | None = None,
    ) -> None:
        self.max_age = max_age
        self._clock = clock
        self._build = build
        self._state = state if state is not None else GroupDatabase().state
        self._entries: dict[tuple[int, int], tuple[float, Fingerprint | None, Caller]] = {}

    def get(self, uid: int, gid: int) -> Caller:
        """The caller ``uid``/``gid`` with its groups as the databases say now."""
        now = self._clock()
        if self.max_age:
            state: Fingerprint | None = None
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
