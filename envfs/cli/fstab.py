"""``envfs BACKING MOUNTPOINT -o OPTIONS``: the form ``mount -t fuse.envfs`` and ``/etc/fstab`` use.

``mount(8)`` hands a ``fuse.TYPE`` mount to ``mount.fuse3``, which runs ``TYPE SOURCE
MOUNTPOINT -o OPTIONS`` through ``/bin/sh`` (so ``envfs`` is looked up in the shell's
search path: ``mount(8)`` removes ``$PATH`` from the environment, leaving dash's default
``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``). By then the options
have been through two hands:

- ``mount(8)`` drops ``defaults``, ``x-*`` and ``comment=*`` and puts ``rw`` or ``ro``
  first;
- ``mount.fuse3`` drops ``user``, ``users``, ``nouser``, ``auto``, ``noauto``, ``nofail``
  and ``_netdev``, acts on ``setuid=USER`` and ``drop_privileges`` itself, and appends
  ``dev`` unless ``nodev`` was given and ``suid`` unless ``nosuid`` was.

:func:`translate` turns such a command line into ``envfs mount BACKING MOUNTPOINT ...``:
an option that names a long option of ``envfs mount`` (``-`` and ``_`` alike:
``key_cache_seconds=60`` is ``--key-cache-seconds 60``, ``allow_other`` is
``--allow-other``) becomes that option, read from the mount parser itself so that a new
mount option needs no change here; the options of ``mount(8)``, systemd and
``mount.fuse3`` listed above are dropped wherever they come from; every other known FUSE
mount option is passed on with ``-o``; anything else is a usage error (exit 2), before any
daemon starts. The trailing ``dev``/``suid`` that ``mount.fuse3`` appends are not taken as
a request: the mount stays ``nodev,nosuid`` unless the line itself says ``dev`` or
``suid``.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence

from envfs.errors import UsageError
from envfs.files import mountopts

# Options of mount(8), systemd and mount.fuse3 that FUSE must not see.
_DROPPED = frozenset({"", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users",
                      "nouser", "owner", "group", "rw"})  # fmt: skip
_DROPPED_PREFIXES = ("x-", "comment=", "user=")

# Long options of ``envfs mount`` that an fstab line cannot use, and why.
_REFUSED = {
    "foreground": "mount(8) waits for the mount command to return; the daemon always runs"
    " in the background here",
    "config": "an fstab line names BACKING and MOUNTPOINT itself; put the other settings"
    " on the line",
    "config_dir": "an fstab line names BACKING and MOUNTPOINT itself; put the other settings"
    " on the line",
    "help": "not a mount option",
}

_DEV_FD = re.compile(r"/dev/fd/\d+")


def is_helper_form(argv: Sequence[str], commands: Sequence[str]) -> bool:
    """Whether ``argv`` (without the program name) is ``BACKING MOUNTPOINT [-o OPTS]...``.

    Only when the first word is no command name and no option, names a path (it contains
    a ``/`` or exists), the second is no option, and every later word is an ``-o OPTS``
    pair. Anything else is left to the normal parser, so a mistyped command is still
    reported as one.
    """
    if len(argv) < 2 or argv[0] in commands or argv[0].startswith("-"):
        return False
    if argv[1].startswith("-") or not ("/" in argv[0] or os.path.lexists(argv[0])):
        return False
    rest = list(argv[2:])
    return len(rest) % 2 == 0 and all(word == "-o" for word in rest[::2])


def translate(argv: Sequence[str], mount_parser: argparse.ArgumentParser) -> list[str]:
    """``BACKING MOUNTPOINT -o OPTS`` to the arguments of ``envfs mount``.

    Raises:
        UsageError: an option envfs does not know, a flag given a value, a valued option
            given none, an option an fstab line cannot use, or ``drop_privileges``.
    """
    backing, mountpoint = argv[0], argv[1]
    if _DEV_FD.fullmatch(mountpoint):
        raise UsageError(
            "mount option 'drop_privileges' is not supported: envfs mounts by itself, as"
            " the user that runs it (use setuid=USER to run it as another user)"
        )
    items = [item for value in argv[3::2] for item in value.split(",")]
    items = _without_helper_defaults(items)
    envfs_options = _long_options(mount_parser)
    mapped: list[str] = []
    fuse: list[str] = []
    for item in items:
        name, has_value, value = item.partition("=")
        if name in _DROPPED or item.startswith(_DROPPED_PREFIXES):
            continue
        key = name.replace("-", "_")
        if key in _REFUSED:
            raise UsageError(f"mount option {name!r} cannot be used here: {_REFUSED[key]}")
        action = envfs_options.get(key)
        if action is not None:
            flag = next(opt for opt in action.option_strings if opt.startswith("--"))
            if action.nargs == 0:
                if has_value:
                    raise UsageError(f"mount option {name!r} takes no value, got {item!r}")
                mapped.append(flag)
            else:
                if not has_value or not value:
                    raise UsageError(f"mount option {name!r} needs a value: {name}=...")
                mapped.append(f"{flag}={value}")
        elif mountopts.is_known(item):
            fuse.append(item)
        else:
            known = ", ".join(
                key + ("" if action.nargs == 0 else "=")
                for key, action in sorted(envfs_options.items())
            )
            raise UsageError(
                f"mount option {item!r} is neither an envfs option ({known}) nor a FUSE"
                " mount option (see fuse(8))"
            )
    command = ["mount", backing, mountpoint, *mapped]
    if fuse:
        command += ["-o", ",".join(fuse)]
    return command


def _without_helper_defaults(items: list[str]) -> list[str]:
    """Remove the ``dev`` and ``suid`` that ``mount.fuse3`` appends when the line says
    neither ``nodev`` nor ``nosuid``: envfs mounts ``nodev,nosuid`` unless asked."""
    items = list(items)
    if "nosuid" not in items and items and items[-1] == "suid":
        items.pop()
    if "nodev" not in items and items and items[-1] == "dev":
        items.pop()
    return items


def _long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The long options of ``parser`` by name with ``_`` for ``-`` (hidden ones left out)."""
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                key = opt[2:].replace("-", "_")
                if key not in _REFUSED:
                    options[key] = action
    return options
