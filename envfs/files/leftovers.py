"""Leftovers of creates a crash interrupted: temporary backing files, removed at mount.

A new file gets its name only once its header is written (:func:`.backing.open_unnamed`);
where ``O_TMPFILE`` is missing it is written under a ``.envfs-tmp-*`` name first. Such a
file left by a crash holds no data anyone was told was written.
"""

from __future__ import annotations

import contextlib
import logging
import os

from envfs.files.backing import TEMP_PREFIX

log = logging.getLogger(__name__)


def remove_stale_temporaries(root_fd: int, root_path: bytes) -> None:
    """Remove every temporary file under the backing folder open as ``root_fd``
    (``root_path`` only for messages).

    The walk opens each folder by name from its parent's descriptor with
    ``O_DIRECTORY | O_NOFOLLOW`` (``os.fwalk`` would open a symlink swapped in between
    its check and its open, a device perhaps), so nothing outside the backing folder is
    opened or removed, whatever is done to the folder meanwhile.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    stack = [(b"", os.open(".", flags, dir_fd=root_fd))]
    while stack:
        where, fd = stack.pop()
        try:
            with os.scandir(fd) as entries:
                listed = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in entries]
            for name, is_dir in listed:
                if name.startswith(TEMP_PREFIX) and not is_dir:
                    log.info(
                        "removing the leftover of an interrupted create: %r",
                        os.path.join(root_path, where, name),
                    )
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
                elif is_dir:
                    try:
                        child = os.open(name, flags, dir_fd=fd)
                    except OSError:
                        continue  # gone, or no longer a folder
                    stack.append((os.path.join(where, name), child))
        finally:
            os.close(fd)
