"""Leftovers of creates a crash interrupted, removed at mount.

- A new file gets its name only once its header is written (:func:`.backing.open_unnamed`);
  where ``O_TMPFILE`` is missing it is written under a ``.envfs-tmp-*`` name first. Such a
  file left by a crash holds no data anyone was told was written.
- With encrypted names, a new directory is made under a ``.envfs-tmp-*`` name and holds
  only its id file until it is renamed into place (:meth:`.vfs.Vfs._make_dir`).
- A long name's name file is written before its entry is made, and removed after it goes:
  a name file whose entry is missing is a leftover.
"""

from __future__ import annotations

import contextlib
import logging
import os

from envfs.files import names
from envfs.files.backing import TEMP_PREFIX

log = logging.getLogger(__name__)


def remove_stale_temporaries(root_fd: int, root_path: bytes, *, encrypted_names: bool) -> None:
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
            present = {name for name, _ in listed}
            for name, is_dir in listed:
                if name.startswith(TEMP_PREFIX) and is_dir:
                    path = os.path.join(root_path, where, name)
                    if remove_new_dir(fd, name):
                        log.info("removed the leftover of an interrupted mkdir: %r", path)
                    else:
                        log.warning("leftover directory %r is not empty: left as it is", path)
                elif (
                    encrypted_names  # else a user's own name
                    and name.startswith(names.LONG_PREFIX)
                    and name.endswith(names.LONG_NAME_SUFFIX)
                    and not is_dir
                    and name[: -len(names.LONG_NAME_SUFFIX)] not in present
                ):
                    log.info(
                        "removing the name file of a long name that has no entry: %r",
                        os.path.join(root_path, where, name),
                    )
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
                elif name.startswith(TEMP_PREFIX) and not is_dir:
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


def remove_new_dir(dir_fd: int, name: bytes) -> bool:
    """Remove the directory ``name`` of ``dir_fd`` that a ``mkdir`` made under a temporary
    name (:meth:`.vfs.Vfs._make_dir`), with its id file, if it holds nothing else; False
    if it holds something else (it is then left as it is). Never follows a symlink."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return True  # gone, or not a directory: nothing of a mkdir's left
    try:
        if any(os.fsencode(n) != names.DIR_FILE for n in os.listdir(fd)):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(names.DIR_FILE, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=dir_fd)
    return True
