"""Who calls: a Unix identity as the kernel reported it, and the principals it matches.

The key service decides every call for a :class:`Caller` (its key policies name Unix users
and groups), and the file side names the user behind each FUSE request with one; this module
is the vocabulary both share, and knows nothing of either.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Caller:
    """Who is calling: a Unix identity as the kernel reported it.

    ``groups`` holds every group id the caller is counted in (primary included).
    ``via`` names the trusted service acting on the caller's behalf, if any, and
    ``via_uid`` is that service's own uid. ``access_key_id`` is set when the caller was
    known by a signature made with one of their access keys (the key service's HTTP
    endpoint) rather than by the kernel, and ``source`` is then the address it came from.
    """

    uid: int
    gid: int
    groups: frozenset[int] = field(default_factory=frozenset)
    user_name: str | None = None
    group_names: frozenset[str] = field(default_factory=frozenset)
    via: str | None = None
    via_uid: int | None = None
    access_key_id: str | None = None
    source: str | None = None

    @classmethod
    def from_ids(
        cls,
        uid: int,
        gid: int,
        extra_groups: frozenset[int] = frozenset(),
        via: str | None = None,
        via_uid: int | None = None,
    ) -> Caller:
        """Build a caller from kernel ids, adding the user's groups from the group database.

        The groups are the union of the process's own (``extra_groups``, e.g. from
        ``SO_PEERGROUPS``) and the user's memberships (``getgrouplist``): key policies name
        users and their groups, not a process's momentary group set.
        """
        user_name: str | None
        try:
            user_name = pwd.getpwuid(uid).pw_name
        except KeyError:
            user_name = None
        gids = {gid, *extra_groups}
        if user_name is not None:
            with contextlib.suppress(OSError):
                gids.update(os.getgrouplist(user_name, gid))
        names = set()
        for g in gids:
            try:
                names.add(grp.getgrgid(g).gr_name)
            except KeyError:
                continue
        return cls(uid, gid, frozenset(gids), user_name, frozenset(names), via, via_uid)

    @classmethod
    def current(cls) -> Caller:
        """The calling process's own identity (for the embedded key store)."""
        return cls.from_ids(os.geteuid(), os.getegid(), frozenset(os.getgroups()))

    def principals(self) -> frozenset[str]:
        """Every principal string this caller matches in a key policy."""
        known: frozenset[str] | None = self.__dict__.get("_principals")
        if known is None:
            names = {f"uid:{self.uid}", f"gid:{self.gid}", *(f"gid:{g}" for g in self.groups)}
            if self.user_name is not None:
                names.add(f"user:{self.user_name}")
            names.update(f"group:{n}" for n in self.group_names)
            known = frozenset(names)
            object.__setattr__(self, "_principals", known)  # frozen: derived, never changes
        return known

    def describe(self) -> str:
        """``name(uid)`` for messages and the audit log."""
        return f"{self.user_name}({self.uid})" if self.user_name else f"uid {self.uid}"
