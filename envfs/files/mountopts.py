"""The ``-o`` mount options envfs knows: its own, and the FUSE options it passes on.

One list for every way a mount is asked for: ``envfs mount -o``, the ``options`` of a
volume configuration, and an ``/etc/fstab`` line (``envfs/cli/fstab.py``). An option in
none of them is refused before any daemon starts, with the option named, instead of
libfuse's "fuse_session_new() failed" from a daemon whose stderr nobody reads.
"""

from __future__ import annotations

from collections.abc import Iterable

from envfs.errors import UsageError

# How long the mount's request loop polls for the next request after each answer, in µs
# (``envfs mount --busy-poll``; docs/mount.md, "Busy polling", has the measurements).
BUSY_POLL_DEFAULT_US = 50
BUSY_POLL_MAX_US = 10_000

# envfs's own: never passed to FUSE (libfuse 3 refuses "nonempty"; "acl"/"noacl" choose
# whether the mount serves POSIX ACLs, see fuseops.Operations).
ENVFS_ONLY = frozenset({"nonempty", "acl", "noacl"})

# FUSE mount options that make sense for envfs (fuse(8)'s general mount options and those
# of libfuse's low-level API). Those libfuse sets itself (fd=, rootmode=, user_id=,
# group_id=), those envfs sets (fsname=, subtype=) and those of libfuse's high-level API,
# which pyfuse3 does not use, are not among them. "allow_other" is --allow-other.
FUSE_FLAGS = frozenset({"ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime",
                        "noatime", "diratime", "nodiratime", "relatime", "norelatime",
                        "strictatime", "nostrictatime", "lazytime", "nolazytime", "sync",
                        "async", "dirsync", "default_permissions", "auto_unmount",
                        "allow_root"})  # fmt: skip
FUSE_VALUED = frozenset({"max_read", "context", "fscontext", "defcontext", "rootcontext"})


def items(groups: Iterable[str]) -> list[str]:
    """``["noatime,nonempty", "ro"]`` -> ``["noatime", "nonempty", "ro"]``."""
    return [item for group in groups for item in group.split(",") if item]


def is_known(item: str) -> bool:
    """Whether ``item`` (``name`` or ``name=value``) is an option envfs or FUSE takes."""
    name, has_value, value = item.partition("=")
    if has_value:
        return name in FUSE_VALUED and bool(value)
    return name in ENVFS_ONLY or name in FUSE_FLAGS or name == "allow_other"


def check(groups: Iterable[str]) -> None:
    """Refuse any ``-o`` option that is neither envfs's nor a FUSE mount option.

    Raises:
        UsageError: naming the option.
    """
    for item in items(groups):
        if not is_known(item):
            raise UsageError(
                f"unknown mount option {item!r}: envfs takes {', '.join(sorted(ENVFS_ONLY))}"
                " and the FUSE mount options of fuse(8)"
                f" ({', '.join(sorted(FUSE_FLAGS))}, {'=, '.join(sorted(FUSE_VALUED))}=)"
            )
