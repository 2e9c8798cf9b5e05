"""Install pyfuse3 with envfs's two changes into the running Python environment.

pyfuse3 3.5.0 is the newest release. Two things envfs needs cannot be done from Python, so
this script builds pyfuse3 from its source release with them added:

1. **A fallocate handler.** pyfuse3 gives libfuse no ``fallocate`` operation, so the
   kernel answers every ``fallocate(2)`` on a pyfuse3 mount with EOPNOTSUPP; its table
   of operations is a private C global that libfuse copies when the session is made.
   The added ``fuse_fallocate`` passes the request to ``Operations.fallocate(fh, mode,
   offset, length, ctx)`` (``ctx``: the request's context, so the caller is known) if the
   file system defines that method, and answers ENOSYS if not
   (the kernel then stops sending it, exactly as without the handler).
2. **A faster loop for a single worker.** With ``main(max_tasks=1)`` (how envfs runs it,
   since its handlers never await), the session loop watches the FUSE fd for up to
   100 µs after each answer (``poll`` with a zero timeout, again and again) and takes a
   request that arrives meanwhile at once; otherwise it waits through trio as before.
   A program working through files sends its next request within microseconds of the
   last answer; going to sleep in between costs the wake-up latency of a virtual CPU
   plus a trip through trio's scheduler, which was most of a request's cost on these
   VMs (a null pyfuse3 file system: about 110 µs a request before, 35 µs after). Every
   32nd request still goes through trio, so signals and other tasks are served under
   load. With several workers the loop is unchanged (another reader could block).
3. **Create modes unmasked with POSIX ACLs.** With ``FUSE_CAP_POSIX_ACL`` the kernel
   leaves ACL inheritance to the file system: a new file's mode is masked by the parent's
   default ACL when there is one, by the umask otherwise. pyfuse3 asks for POSIX ACLs
   (``Operations.enable_acl``) but not for ``FUSE_CAP_DONT_MASK``, so the kernel masks
   the mode with the umask before the file system sees it, and a default ACL can no
   longer give back what the umask took. The change asks for both together (ACLs not at
   all where the kernel cannot leave the mode unmasked) and records the outcome in
   ``pyfuse3._envfs_acl_granted`` before ``Operations.init()`` is called.

Steps: download the pinned source release with pip and check its SHA-256; insert the
code below at three anchors, failing if the anchors are not as expected; build and install
the tree as version ``3.5.0+envfs4``, which satisfies envfs's requirement on pyfuse3, so
installing envfs afterwards keeps it. The module gains ``_envfs_fallocate = 2``,
``_envfs_fast_path = 1`` and ``_envfs_acl = 1`` so that envfs can tell the build apart.
Nothing else in pyfuse3 changes.

Run by ``make setup`` before envfs is installed; does nothing if the running environment
already has this build. Needs what building stock pyfuse3 needs (gcc, python3-dev,
libfuse3-dev, pkg-config) and access to PyPI.

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
LOCAL_VERSION = f"{VERSION}+envfs4"
SDIST = f"pyfuse3-{VERSION}.tar.gz"
SDIST_SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"

# The handler, appended to src/pyfuse3/handlers.pxi (which __init__.pyx includes). Modelled
# on the module's other handlers: the C callback packs its arguments into a _Container and
# hands a coroutine to save_retval; the coroutine runs in the session loop and replies.
HANDLER = """

# --- FUSE_FALLOCATE, added by envfs (scripts/build_pyfuse3.py) ---------------------------

_envfs_fallocate = 2  # 2: the handler is given the request's context (the caller)

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
        ctx = get_request_context(c.req)
        try:
            await method(c.fh, c.flags, c.off, c.size, ctx)
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

# The single-worker fast path (change 2), also appended to handlers.pxi, and its use in
# _session_loop (internal.pxi): the wait for the fd is skipped when a request is there.
SPIN_SECONDS = 100e-6
FAST_PATH = f"""

# --- single-worker fast path, added by envfs (scripts/build_pyfuse3.py) ------------------

_envfs_fast_path = 1

from time import perf_counter as _envfs_clock

cdef int _envfs_fast_count = 0
cdef int _envfs_poll_fd = -1
_envfs_poller = None

cdef int _envfs_request_waiting() except -1:
    # 1 if a request is readable within the spin time, without yielding to trio.
    global _envfs_fast_count, _envfs_poll_fd, _envfs_poller
    if _envfs_fast_count >= 32 or fuse_session_exited(session):
        _envfs_fast_count = 0
        return 0
    if _envfs_poll_fd != session_fd:
        import select
        _envfs_poller = select.poll()
        _envfs_poller.register(session_fd, select.POLLIN)
        _envfs_poll_fd = session_fd
    poll = _envfs_poller.poll
    deadline = _envfs_clock() + {SPIN_SECONDS!r}
    while True:
        if poll(0):
            _envfs_fast_count += 1
            return 1
        if _envfs_clock() > deadline:
            _envfs_fast_count = 0
            return 0
"""
WAIT_CALL = "        if not await _wait_fuse_readable():\n"
FAST_WAIT_CALL = (
    "        if not (max_tasks == 1 and _envfs_request_waiting())"
    " and not await _wait_fuse_readable():\n"
)


# Change 3: in fuse_init (handlers.pxi), right after pyfuse3 asks for POSIX ACLs.
ACL_AFTER = """    if (operations.enable_acl and
        conn.capable & FUSE_CAP_POSIX_ACL):
        conn.want |= FUSE_CAP_POSIX_ACL
"""
ACL_INIT = """    # envfs (scripts/build_pyfuse3.py): with POSIX ACLs the file system applies the
    # umask or the parent's default ACL to a new file's mode itself: it needs it unmasked.
    global _envfs_acl_granted
    if conn.want & FUSE_CAP_POSIX_ACL:
        if conn.capable & FUSE_CAP_DONT_MASK:
            conn.want |= FUSE_CAP_DONT_MASK
        else:
            conn.want &= ~(<unsigned> FUSE_CAP_POSIX_ACL)
    _envfs_acl_granted = bool(conn.want & FUSE_CAP_POSIX_ACL)
"""
ACL_MARKERS = """

# --- POSIX ACLs with unmasked create modes, added by envfs (scripts/build_pyfuse3.py) ------

_envfs_acl = 1
_envfs_acl_granted = False  # set by fuse_init: the kernel enforces ACLs, modes come unmasked
"""


class BuildError(Exception):
    """A step failed; the message says which."""


def installed_has_handler() -> bool:
    probe = (
        "import pyfuse3, sys; sys.exit(0 if getattr(pyfuse3, '_envfs_fallocate', 0) >= 2"
        " and getattr(pyfuse3, '_envfs_fast_path', 0) and getattr(pyfuse3, '_envfs_acl', 0)"
        " else 1)"
    )
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
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            tar.extractall(dest, filter="data")
        else:  # Debian 12's 3.11.2: the same refusals, made by hand
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not target.is_relative_to(
                    dest.resolve()
                ):
                    raise BuildError(f"{SDIST}: unexpected member {member.name!r}")
            tar.extractall(dest)  # noqa: S202 - every member checked above
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
    if text.count(WAIT_CALL) != 1:
        raise BuildError(f"{internal}: _session_loop is not as expected for {VERSION}")
    text = text.replace(REGISTER_AFTER, REGISTER_AFTER + REGISTER)
    internal.write_text(text.replace(WAIT_CALL, FAST_WAIT_CALL))
    text = handlers.read_text()
    if "fuse_fallocate" in text:
        raise BuildError(f"{handlers}: already has a fallocate handler")
    if text.count(ACL_AFTER) != 1 or "FUSE_CAP_DONT_MASK" in text:
        raise BuildError(f"{handlers}: fuse_init is not as expected for {VERSION}")
    handlers.write_text(
        text.replace(ACL_AFTER, ACL_AFTER + ACL_INIT) + HANDLER + FAST_PATH + ACL_MARKERS
    )


def build_and_install(tree: Path) -> None:
    env = dict(os.environ, SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=LOCAL_VERSION)
    pip("install", "--quiet", str(tree), env=env)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Install pyfuse3 with envfs's changes (see the module docstring)."
    )
    parser.add_argument(
        "--force", action="store_true", help="build even if this build is installed already"
    )
    args = parser.parse_args()
    if not args.force and installed_has_handler():
        return 0
    print(f"building pyfuse3 {LOCAL_VERSION} (pyfuse3 {VERSION} with envfs's changes)", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="envfs-pyfuse3-") as tmp:
            tree = extract(download(Path(tmp)), Path(tmp))
            add_handler(tree)
            build_and_install(tree)
        if not installed_has_handler():
            raise BuildError("the installed pyfuse3 lacks envfs's changes")
    except (BuildError, OSError, tarfile.TarError) as exc:
        print(f"build_pyfuse3: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
