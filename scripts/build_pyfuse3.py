"""Install pyfuse3 with a FUSE_FALLOCATE handler into the running Python environment.

pyfuse3 3.5.0 (the newest release) gives libfuse no ``fallocate`` operation, so the kernel
answers every ``fallocate(2)`` on a pyfuse3 mount with EOPNOTSUPP, and pyfuse3 offers no way
to add one from Python: its table of operations is a private C global that libfuse copies
when the session is made. This script therefore builds pyfuse3 from its source release with
one handler added:

- it downloads the pinned source release with pip and checks its SHA-256;
- it adds ``fuse_fallocate``: the request goes to ``Operations.fallocate(fh, mode, offset,
  length)`` if the file system defines that method, and is answered ENOSYS if not (the kernel
  then stops sending it, exactly as without the handler). The module gains
  ``_envfs_fallocate = 1`` so that envfs can tell the build apart;
- it builds and installs that tree as version ``3.5.0+envfs1``, which satisfies envfs's
  requirement on pyfuse3, so installing envfs afterwards keeps it.

Nothing else in pyfuse3 changes. Run by ``make setup`` before envfs is installed; does
nothing if the running environment already has the handler. Needs what building stock
pyfuse3 needs (gcc, python3-dev, libfuse3-dev, pkg-config) and access to PyPI.

Usage: python scripts/build_pyfuse3.py [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.5.0"
LOCAL_VERSION = f"{VERSION}+envfs1"
SDIST = f"pyfuse3-{VERSION}.tar.gz"
SDIST_SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"

# The handler, appended to src/pyfuse3/handlers.pxi (which __init__.pyx includes). Modelled
# on the module's other handlers: the C callback packs its arguments into a _Container and
# hands a coroutine to save_retval; the coroutine runs in the session loop and replies.
HANDLER = """

# --- FUSE_FALLOCATE, added by envfs (scripts/build_pyfuse3.py) ---------------------------

_envfs_fallocate = 1

cdef void fuse_fallocate (fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                          off_t length, fuse_file_info *fi):
    cdef _Container c = _Container()
    c.req = req
    c.ino = ino
    c.flags = mode
    c.off = offset
    c.size = <size_t> length
    c.fh = fi.fh
    save_retval(fuse_fallocate_async(c))

async def fuse_fallocate_async (_Container c):
    cdef int ret
    method = getattr(operations, 'fallocate', None)
    if method is None:
        ret = fuse_reply_err(c.req, errno.ENOSYS)
    else:
        try:
            await method(c.fh, c.flags, c.off, c.size)
        except FUSEError as e:
            ret = fuse_reply_err(c.req, e.errno)
        else:
            ret = fuse_reply_err(c.req, 0)
    if ret != 0:
        log.error('fuse_fallocate(): fuse_reply_* failed with %s', strerror(-ret))
"""

# Registered in init_fuse_ops (src/pyfuse3/internal.pxi), after the last assignment there.
REGISTER_AFTER = "    fuse_ops.poll = fuse_poll\n"
REGISTER = "    fuse_ops.fallocate = fuse_fallocate\n"


class BuildError(Exception):
    """A step failed; the message says which."""


def installed_has_handler() -> bool:
    probe = "import pyfuse3, sys; sys.exit(0 if getattr(pyfuse3, '_envfs_fallocate', 0) else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], env=env, check=False)
    if result.returncode != 0:
        raise BuildError(f"pip {' '.join(args)} exited {result.returncode}")


def download(dest: Path) -> Path:
    pip(
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(dest),
        f"pyfuse3=={VERSION}",
    )
    archive = dest / SDIST
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise BuildError(f"{SDIST}: SHA-256 {digest}, expected {SDIST_SHA256}")
    return archive


def extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    tree = dest / f"pyfuse3-{VERSION}"
    if not (tree / "src/pyfuse3/handlers.pxi").is_file():
        raise BuildError(f"{SDIST}: no src/pyfuse3/handlers.pxi")
    return tree


def add_handler(tree: Path) -> None:
    handlers = tree / "src/pyfuse3/handlers.pxi"
    internal = tree / "src/pyfuse3/internal.pxi"
    text = internal.read_text()
    if text.count(REGISTER_AFTER) != 1 or "fuse_ops.fallocate" in text:
        raise BuildError(f"{internal}: init_fuse_ops is not as expected for {VERSION}")
    internal.write_text(text.replace(REGISTER_AFTER, REGISTER_AFTER + REGISTER))
    if "fuse_fallocate" in handlers.read_text():
        raise BuildError(f"{handlers}: already has a fallocate handler")
    with handlers.open("a") as out:
        out.write(HANDLER)


def build_and_install(tree: Path) -> None:
    env = dict(os.environ, SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=LOCAL_VERSION)
    pip("install", "--quiet", str(tree), env=env)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Install pyfuse3 with a FUSE_FALLOCATE handler (see the module docstring)."
    )
    parser.add_argument(
        "--force", action="store_true", help="build even if the handler is already installed"
    )
    args = parser.parse_args()
    if not args.force and installed_has_handler():
        return 0
    print(f"building pyfuse3 {LOCAL_VERSION} (pyfuse3 {VERSION} + fallocate handler)", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="envfs-pyfuse3-") as tmp:
            tree = extract(download(Path(tmp)), Path(tmp))
            add_handler(tree)
            build_and_install(tree)
        if not installed_has_handler():
            raise BuildError("the installed pyfuse3 has no fallocate handler")
    except (BuildError, OSError, tarfile.TarError) as exc:
        print(f"build_pyfuse3: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
