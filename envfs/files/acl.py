"""POSIX ACLs: their xattr form, checked strictly, and the mode rules ext4 follows.

With POSIX ACLs negotiated, the kernel checks every access against a node's ACL itself
and asks the file system for it as the xattr ``system.posix_acl_access`` (and, for a
directory, ``system.posix_acl_default``). What the file system must do is what ext4 does
in ``fs/posix_acl.c``: keep the mode and the access ACL in step (:meth:`Acl.mode_bits`,
:meth:`Acl.with_mode`), and give a new node the ACL and mode its parent's default ACL
says (:func:`inherit`), or its mode masked by the umask when the parent has none.

Byte layout (Linux's xattr form of an ACL; all integers little-endian)::

    0     4   version: 2
    4+8i  2   tag of entry i: USER_OBJ 0x01, USER 0x02, GROUP_OBJ 0x04, GROUP 0x08,
              MASK 0x10, OTHER 0x20
    6+8i  2   permissions: read 4, write 2, execute 1 (no other bit)
    8+8i  4   uid (USER), gid (GROUP), 0xFFFFFFFF for every other tag

A valid ACL (:meth:`Acl.parse`) has its entries in tag order, the named ones of each tag
in increasing id order with no id twice, exactly one USER_OBJ, GROUP_OBJ and OTHER, at
most one MASK, which it must have if it has named entries, and at most
:data:`MAX_ENTRIES` entries. Anything else is refused, never repaired: a value read from
the backing folder may have been planted by whoever may write it.

Where a mount keeps the ACLs in the backing folder is :class:`AclStore`'s business.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass, replace

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_TAG_ORDER = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)
_NAMED = (USER, GROUP)
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
# The kernel sends no ACL larger than a page (fs/fuse/acl.c refuses with E2BIG).
MAX_ENTRIES = (4096 - _HEADER.size) // _ENTRY.size

# Where the ACLs are kept in the backing folder, by who runs the mount: names that only
# CAP_SYS_ADMIN may read or write when the mount runs as root; otherwise in the user
# namespace, which the plaintext view then hides (see docs/format.md, "ACLs").
TRUSTED_PREFIX = b"trusted.envfs."
USER_PREFIX = b"user.envfs."


class MalformedAcl(ValueError):
    """Bytes that are not a valid ACL; the message says what is wrong, in general terms."""


@dataclass(frozen=True)
class Entry:
    tag: int
    perm: int
    id: int = UNDEFINED_ID


@dataclass(frozen=True)
class Acl:
    """A valid POSIX ACL (build one with :meth:`parse`)."""

    entries: tuple[Entry, ...]

    @classmethod
    def parse(cls, raw: bytes) -> Acl:
        """Check and decode the xattr form of an ACL.

        Raises:
            MalformedAcl: the bytes are not exactly a valid ACL in canonical form.
        """
        if len(raw) < _HEADER.size or (len(raw) - _HEADER.size) % _ENTRY.size:
            raise MalformedAcl(f"impossible ACL size {len(raw)}")
        (version,) = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise MalformedAcl(f"unsupported ACL version {version}")
        count = (len(raw) - _HEADER.size) // _ENTRY.size
        if count > MAX_ENTRIES:
            raise MalformedAcl(f"too many ACL entries ({count}, at most {MAX_ENTRIES})")
        entries = tuple(
            Entry(*_ENTRY.unpack_from(raw, _HEADER.size + i * _ENTRY.size)) for i in range(count)
        )
        last: tuple[int, int] | None = None
        for entry in entries:
            if entry.tag not in _TAG_ORDER:
                raise MalformedAcl(f"unknown ACL tag {entry.tag:#x}")
            if entry.perm & ~0o7:
                raise MalformedAcl(f"ACL permissions {entry.perm:#x} beyond read, write, execute")
            if (entry.tag in _NAMED) == (entry.id == UNDEFINED_ID):
                raise MalformedAcl(f"ACL entry {entry.tag:#x} with id {entry.id:#x}")
            key = (_TAG_ORDER.index(entry.tag), entry.id)
            if last is not None and key <= last:
                raise MalformedAcl("ACL entries out of order or repeated")
            last = key
        tags = [entry.tag for entry in entries]
        for single in (USER_OBJ, GROUP_OBJ, OTHER):
            if tags.count(single) != 1:
                raise MalformedAcl(f"ACL without exactly one entry of tag {single:#x}")
        if MASK not in tags and any(tag in _NAMED for tag in tags):
            raise MalformedAcl("ACL with named entries and no mask")
        return cls(entries)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(VERSION) + b"".join(
            _ENTRY.pack(e.tag, e.perm, e.id) for e in self.entries
        )

    def _entry(self, tag: int) -> Entry | None:
        return next((e for e in self.entries if e.tag == tag), None)

    def _group_class(self) -> int:
        """The tag the mode's group bits stand for: the mask if there is one."""
        return MASK if self._entry(MASK) is not None else GROUP_OBJ

    @property
    def is_minimal(self) -> bool:
        """Whether the mode bits say all this ACL says (owner, group, other only)."""
        return len(self.entries) == 3

    def mode_bits(self) -> int:
        """The permission bits of the mode this ACL implies (owner, group class, other)."""
        bits = {e.tag: e.perm for e in self.entries}
        return bits[USER_OBJ] << 6 | bits[self._group_class()] << 3 | bits[OTHER]

    def with_mode(self, mode: int) -> Acl:
        """This ACL after a ``chmod(mode)``: the owner, the group class (the mask if there
        is one) and other take the mode's bits; named entries and, under a mask, the
        owning group keep theirs."""
        group_class = self._group_class()
        shift = {USER_OBJ: 6, group_class: 3, OTHER: 0}
        return Acl(
            tuple(
                replace(e, perm=(mode >> shift[e.tag]) & 0o7) if e.tag in shift else e
                for e in self.entries
            )
        )


def inherit(default: Acl, mode: int) -> tuple[Acl | None, int]:
    """A new node's access ACL and mode under a parent with the ``default`` ACL, for the
    ``mode`` it was created with (the umask plays no part).

    The owner, the group class and other of the parent's default are limited to what
    ``mode`` grants, and the new mode's bits to what they then grant; the file type and
    the set-id and sticky bits of ``mode`` stay. The ACL is None when the mode says it
    all (no mask, no named entries), as ext4 then stores none.
    """
    perms = mode & 0o777
    narrowed = default.with_mode(default.mode_bits() & perms)
    new_mode = (mode & ~0o777) | narrowed.mode_bits()
    return (None if narrowed.is_minimal else narrowed), new_mode


# --- the backing folder ---------------------------------------------------------------------


def namespace_prefix(euid: int) -> bytes:
    """The prefix of the backing xattr names for a mount run by ``euid``."""
    return TRUSTED_PREFIX if euid == 0 else USER_PREFIX


def is_private(name: bytes) -> bool:
    """Whether ``name`` is one of envfs's own xattrs, never shown in the plaintext view."""
    return name.startswith(USER_PREFIX) or name.startswith(TRUSTED_PREFIX)


class AclStore:
    """A mount's ACLs in the backing folder: each node's as private xattrs of its entry.

    ``system.posix_acl_access`` is kept as ``<prefix>acl_access`` and
    ``system.posix_acl_default`` as ``<prefix>acl_default``, in the xattr form above.
    An access ACL is kept only when it says more than the mode bits (as on ext4); the
    owner, group class and other bits in it are stale by design: the backing entry's
    mode is the truth, and :meth:`read` puts its bits in.

    ``target``: an open descriptor of a regular file or directory, or the
    ``/proc/self/fd`` name of an ``O_PATH`` one (see :func:`envfs.files.backing.proc_path`).
    """

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.names = {ACCESS: prefix + b"acl_access", DEFAULT: prefix + b"acl_default"}

    def read(self, target: int | str, kind: bytes, mode: int) -> Acl | None:
        """The ACL ``kind`` of the entry whose mode is ``mode``; None if it has none (a
        default ACL on anything but a directory counts as none).

        Raises:
            MalformedAcl: the stored bytes are not a valid ACL.
        """
        if kind == DEFAULT and not stat.S_ISDIR(mode):
            return None
        try:
            raw = os.getxattr(target, self.names[kind])
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                return None
            raise
        acl = Acl.parse(raw)
        if kind == ACCESS:
            if acl.is_minimal:
                raise MalformedAcl("a stored access ACL that says no more than the mode")
            return acl.with_mode(mode)
        return acl

    def write(self, target: int | str, kind: bytes, acl: Acl) -> None:
        os.setxattr(target, self.names[kind], acl.to_bytes())

    def remove(self, target: int | str, kind: bytes) -> None:
        """Remove the ACL ``kind``; none there is no error (as on ext4)."""
        try:
            os.removexattr(target, self.names[kind])
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise

    def listed(self, backing_names: list[str], mode: int) -> list[bytes]:
        """The ACL names to list for an entry whose backing xattrs are ``backing_names``."""
        present = {os.fsencode(n) for n in backing_names}
        return [
            kind
            for kind in NAMES
            if self.names[kind] in present and (kind == ACCESS or stat.S_ISDIR(mode))
        ]


__all__ = [
    "ACCESS",
    "DEFAULT",
    "Acl",
    "AclStore",
    "Entry",
    "MalformedAcl",
    "inherit",
    "is_private",
    "namespace_prefix",
]
