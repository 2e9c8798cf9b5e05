"""Where the key service keeps its files, and the rule that they are private.

- Region stores live under one base directory: ``$ENVFS_KMS_DIR``, else
  ``/var/lib/envfs/kms`` for root, else ``$XDG_STATE_HOME/envfs/kms`` (or
  ``~/.local/state/envfs/kms``); a region's store is ``<base>/<region>/``.
- The daemon listens on ``$ENVFS_KMS_SOCKET``, else ``/run/envfs/kms-<region>.sock``.
- A store's directory and files are owned by the user who opens them, with no access for
  group or others (:func:`check_private`, at every open).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from envfs.arn import validate_region
from envfs.errors import StorePermissionError

SYSTEM_KMS_DIR = Path("/var/lib/envfs/kms")
SOCKET_DIR = Path("/run/envfs")


def default_kms_dir() -> Path:
    """Where region stores live: ``$ENVFS_KMS_DIR``, else a system or per-user state dir."""
    env = os.environ.get("ENVFS_KMS_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_KMS_DIR
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "envfs" / "kms"


def region_store_dir(base: Path, region: str) -> Path:
    """The store directory of ``region`` under ``base`` (the region checked first)."""
    return Path(base) / validate_region(region)


def default_socket_path(region: str) -> Path:
    """The key daemon's socket: ``$ENVFS_KMS_SOCKET``, else ``/run/envfs/kms-<region>.sock``."""
    env = os.environ.get("ENVFS_KMS_SOCKET")
    if env:
        return Path(env)
    return SOCKET_DIR / f"kms-{validate_region(region)}.sock"


def check_private(path: Path, what: str) -> None:
    """Refuse a store path that group or others may use, or that another user owns."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        raise StorePermissionError(
            f"{what} {str(path)!r} is owned by uid {st.st_uid}, not by uid {os.geteuid()}"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StorePermissionError(
            f"{what} {str(path)!r} has mode {stat.S_IMODE(st.st_mode):04o}: group and others"
            f" must have no access (chmod {'700' if stat.S_ISDIR(st.st_mode) else '600'})"
        )
