"""The mount's life: check, authenticate the volume, mount, serve, unmount.

``run_foreground`` mounts and serves until the filesystem is unmounted or the process is
told to stop (SIGTERM, SIGINT), then closes every open file and unmounts. ``on_ready``
is called once the mount is live, which is what ``envfs mount`` waits for before it
returns and what systemd's readiness notification reports.

A pid file per mount point (``pid_file_for``) lets ``envfs umount`` wait until the daemon
has really finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from envfs.errors import AccessDeniedException, EnvfsError, MountError
from envfs.files import mountopts
from envfs.files.fuseops import Operations
from envfs.files.keycache import DataKeyCache
from envfs.files.keypool import DataKeyPool
from envfs.files.mountopts import BUSY_POLL_DEFAULT_US
from envfs.files.vfs import Vfs
from envfs.files.volume import Volume
from envfs.identity import Caller
from envfs.keys.provider import KeyProvider

log = logging.getLogger(__name__)

FSTYPE = "fuse.envfs"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How often the mount offers a key provider's batched audit records to their chain.
AUDIT_FLUSH_INTERVAL = 0.05
# Dead mounts stacked on one mount point that check_mountpoint clears before giving up.
_MAX_DEAD_MOUNTS = 8


@dataclass
class MountOptions:
    allow_other: bool = False
    extra: list[str] = field(default_factory=list)  # -o options (comma lists allowed)

    def items(self) -> set[str]:
        """Every ``-o`` option given, comma lists split."""
        return set(mountopts.items(self.extra))

    @property
    def nonempty(self) -> bool:
        """``-o nonempty``: mount over a folder that holds files (hiding them)."""
        return "nonempty" in self.items()


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/envfs/mounts")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/envfs-{os.geteuid()}"
    return Path(base) / "envfs" / "mounts"


def pid_file_for(mountpoint: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(mountpoint.resolve())).hexdigest()[:24]
    return runtime_dir() / f"{digest}.pid"


def mounted_envfs(mountpoint: Path) -> bool:
    """Whether an envfs filesystem is mounted at ``mountpoint`` (per /proc/self/mounts)."""
    target = os.fsencode(mountpoint.resolve())
    with open("/proc/self/mounts", "rb") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and _unescape(fields[1]) == target and fields[2] == FSTYPE.encode():
                return True
    return False


def _unescape(path: bytes) -> bytes:
    for code, char in ((b"\\040", b" "), (b"\\011", b"\t"), (b"\\012", b"\n"), (b"\\134", b"\\")):
        path = path.replace(code, char)
    return path


def check_mountpoint(mountpoint: Path, *, nonempty: bool = False) -> None:
    """Refuse a missing mount point, a non-directory, one that is already mounted, or (unless
    ``nonempty``) one that holds files the mount would hide.

    A dead envfs mount there (its daemon was killed: every access gives ENOTCONN) is
    cleared first with a lazy unmount, so that a restart brings the volume back by itself.
    A dead FUSE mount of another file system is left alone and refused.

    Raises:
        MountError: with a message saying what is wrong.
    """
    remove_stale_pid_file(mountpoint)
    where = repr(str(mountpoint))
    for _ in range(_MAX_DEAD_MOUNTS):
        if not dead_envfs_mount(mountpoint):
            break
        clear_dead_mount(mountpoint)
    else:
        raise MountError(f"mount point {where} stays a dead mount after clearing it")
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mount point {where} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"mount point {where} is a dead FUSE mount of another file system;"
                f" clear it with 'fusermount3 -uz {mountpoint}'"
            ) from None
        raise MountError(f"cannot use mount point {where}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {where} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"mount point {where} is busy: something is mounted there")
    if not nonempty:
        try:
            with os.scandir(mountpoint) as entries:
                occupied = next(entries, None) is not None
        except OSError as exc:
            raise MountError(f"cannot read mount point {where}: {exc.strerror}") from None
        if occupied:
            raise MountError(
                f"mount point {where} is not empty: the mount would hide its files;"
                " use an empty folder, or pass -o nonempty"
            )


def dead_envfs_mount(mountpoint: Path) -> bool:
    """Whether an envfs mount on ``mountpoint`` has lost its daemon (killed: the kernel
    answers ENOTCONN). ``statfs`` always reaches the daemon; ``stat`` may be answered from
    the kernel's attribute cache for a while after the daemon died."""
    if not mounted_envfs(mountpoint):
        return False
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        # ECONNABORTED: this very request was in flight as the connection was aborted.
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def clear_dead_mount(mountpoint: Path) -> None:
    """Detach the dead envfs mount on ``mountpoint`` (lazily: programs still in it keep
    their ENOTCONN) and remove its daemon's stale pid file.

    Raises:
        MountError: fusermount3 refused (e.g. another user's mount).
    """
    result = subprocess.run(
        ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise MountError(f"cannot clear the dead mount on {str(mountpoint)!r}: {reason}")
    log.warning("cleared a dead envfs mount on %s (its daemon had stopped)", mountpoint)
    pid_file_for(mountpoint).unlink(missing_ok=True)


def remove_stale_pid_file(mountpoint: Path) -> None:
    """Remove the pid file of ``mountpoint`` if it names no running envfs mount daemon
    (left behind by a daemon killed with SIGKILL)."""
    path = pid_file_for(mountpoint)
    if path.exists() and _read_pid(path) is None:
        path.unlink(missing_ok=True)


def prepare(
    volume: Volume,
    provider: KeyProvider,
    caller: Caller,
    *,
    multi_user: bool,
    key_cache_seconds: float = 0.0,
    key_pool_size: int = 0,
) -> Vfs:
    """Check the volume against the key service and build the filesystem core.

    ``key_cache_seconds``: how long a user's unwrapped data key may be reused for that
    user's re-opens without asking the key service (0: every open asks).
    ``key_pool_size``: data keys made in advance per user for creates (0: none), each
    usable for ``key_cache_seconds``.

    The volume file is authenticated as the mounting user. If that user may not use the
    volume's key (a root-run mount shared by key users), authentication happens at the
    first open or create by a user who may; no file is served before it.
    """
    volume.check_region(provider)
    vfs = Vfs(
        volume,
        provider,
        chown_new=multi_user and os.geteuid() == 0,
        key_cache=DataKeyCache(key_cache_seconds),
        key_pool=(
            DataKeyPool(volume, provider, size=key_pool_size, max_age=key_cache_seconds)
            if key_pool_size and key_cache_seconds
            else None
        ),
    )
    try:
        vfs.verify_volume(caller)
    except AccessDeniedException:
        log.info(
            "the mounting user may not use key %s: the volume file will be authenticated at"
            " the first open by a key user",
            volume.key_arn,
        )
    return vfs


def fuse_options(volume: Volume, options: MountOptions) -> set[str]:
    """The FUSE mount options: ``default_permissions`` (the kernel checks mode bits),
    ``nodev`` and ``nosuid`` unless ``-o dev`` / ``-o suid`` ask otherwise (whoever may
    write the backing folder must not get a device node or a set-user-ID program
    honoured through the mount), and the ``-o`` options given."""
    opts = set(pyfuse3.default_options)
    opts.add("fsname=envfs")
    opts.add("subtype=envfs")
    if options.allow_other:
        opts.add("allow_other")
    extra = options.items() - mountopts.ENVFS_ONLY
    if "dev" not in extra:
        opts.add("nodev")
    if "suid" not in extra:
        opts.add("nosuid")
    return opts | extra


def run_foreground(
    vfs: Vfs,
    mountpoint: Path,
    options: MountOptions,
    on_ready: Callable[[], None] | None = None,
    on_stopping: Callable[[], None] | None = None,
    busy_poll_us: int = BUSY_POLL_DEFAULT_US,
) -> None:
    """Mount and serve until unmounted or signalled; always unmounts and closes files.

    ``on_ready`` is called once the mount is live, ``on_stopping`` when shutdown begins
    (before open files are flushed and closed and the filesystem unmounted).
    ``busy_poll_us``: how long the request loop polls for the next request after each
    answer (0: never; see :func:`_set_busy_poll`).

    Raises:
        MountError: FUSE could not mount.
    """
    # Resolve paths before mounting: once mounted, a stat of the mount point would wait
    # for this very process to answer.
    pid_file = pid_file_for(mountpoint)
    old_umask = os.umask(0)  # modes of new files are decided already (umask or default ACL)
    try:
        ops = Operations(vfs, acl="noacl" not in options.items())
        pyfuse3.init(ops, str(mountpoint), fuse_options(vfs.volume, options))
    except RuntimeError as exc:
        os.umask(old_umask)
        raise MountError(f"cannot mount on {str(mountpoint)!r}: {exc}") from None
    # From here on a stop signal must unmount, never kill: hold them until the loop that
    # handles them runs. (Not before pyfuse3.init: fusermount3 would inherit the mask.)
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    log.info("mounted %s on %s", vfs.volume.backing, mountpoint)
    if getattr(pyfuse3, "_envfs_fallocate", 0) < 2:
        log.warning(
            "this pyfuse3 has no fallocate handler: fallocate(2) gives EOPNOTSUPP "
            "(install pyfuse3 with scripts/build_pyfuse3.py)"
        )
    _set_busy_poll(busy_poll_us)
    try:
        _write_pid_file(pid_file)
        trio.run(_serve, vfs, on_ready)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if on_stopping is not None:
            on_stopping()
        vfs.close()
        pyfuse3.close(unmount=True)
        _remove_own_pid_file(pid_file)
        os.umask(old_umask)
        log.info("unmounted %s", mountpoint)


def _set_busy_poll(microseconds: int) -> None:
    """Tell pyfuse3 (built with scripts/pyfuse3/0002-single-worker-fast-path.patch) how long
    to poll for the next request after each answer; say so if it cannot."""
    setter = getattr(pyfuse3, "_envfs_set_busy_poll", None)
    getter = getattr(pyfuse3, "_envfs_get_busy_poll", None)
    if setter is None or getter is None:
        if getattr(pyfuse3, "_envfs_fast_path", 0):  # an older envfs build: 100 µs, fixed
            lacks = "this pyfuse3 polls for requests a fixed time"
        else:
            lacks = "this pyfuse3 lacks envfs's faster request loop: each request costs more"
        log.info(
            "%s, and --busy-poll has no effect (install pyfuse3 with scripts/build_pyfuse3.py)",
            lacks,
        )
        return
    setter(microseconds / 1e6)
    log.debug("busy poll: %d µs after each answer", round(getter() * 1e6))


async def _serve(vfs: Vfs, on_ready: Callable[[], None] | None) -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        # Handled from here on, including one that arrived since the mount was made.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, signals, nursery.cancel_scope)
            if vfs.access.key_pool is not None:
                nursery.start_soon(vfs.access.key_pool.run)
            if vfs.access.provider.batches_audit:
                nursery.start_soon(_flush_audit, vfs.access.provider)
            if on_ready is not None:
                on_ready()  # only now: a stop signal right after readiness unmounts cleanly
            # One worker task: every handler runs to completion without awaiting (the core
            # is synchronous), so more workers would only hand pyfuse3's read lock back
            # and forth through the scheduler on every request.
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            nursery.cancel_scope.cancel()


async def _flush_audit(provider: KeyProvider) -> None:
    """Put the key provider's batched audit records into its chain when due, so
    that they reach it within about 0.15 s also when no further call comes."""
    while True:
        await trio.sleep(AUDIT_FLUSH_INTERVAL)
        try:
            provider.flush_audit()
        except EnvfsError as exc:
            log.warning("audit records wait in the journal: %s", exc.message)
        except Exception as exc:
            # Anything (sqlite3's "database is locked" after its busy timeout...): this
            # task failing would stop the mount.
            log.warning("audit records wait in the journal: %s: %s", type(exc).__name__, exc)


async def _stop_on_signals(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("received %s: unmounting", signal.Signals(signum).name)
        scope.cancel()
        return


def _write_pid_file(path: Path) -> None:
    # Explicit modes: the daemon runs with umask 0, and /run/envfs also holds key sockets.
    for parent in reversed(path.parents):
        if not parent.exists():
            parent.mkdir(mode=0o755)
            os.chmod(parent, 0o755)  # noqa: S103 - readable run dir, like /run
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def unmount(mountpoint: Path, *, timeout: float = 30.0, lazy: bool = False) -> str:
    """Unmount an envfs mount and wait for its daemon to finish; say how it went.

    A dead envfs mount (its daemon was killed) is cleared. With ``lazy``, a busy mount is
    detached at once: new opens no longer reach it, files still open keep working, and
    its daemon ends when the last of them is closed (not waited for).

    Returns:
        ``"unmounted"``, ``"cleared"`` (a dead mount) or ``"detached"`` (lazy, busy).

    Raises:
        MountError: not an envfs mount, busy (without ``lazy``), or the daemon did not
            stop in time.
    """
    mountpoint = Path(mountpoint)
    if dead_envfs_mount(mountpoint):
        clear_dead_mount(mountpoint)
        return "cleared"
    try:
        os.lstat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mount point {str(mountpoint)!r} does not exist") from None
    except OSError as exc:
        raise MountError(f"cannot unmount {str(mountpoint)!r}: {exc.strerror}") from None
    if not mounted_envfs(mountpoint):
        remove_stale_pid_file(mountpoint)
        raise MountError(f"{str(mountpoint)!r} is not an envfs mount")
    pid = _read_pid(pid_file_for(mountpoint))
    with contextlib.suppress(OSError):
        os.sync()
    reason = _fusermount_u(mountpoint)
    if reason is not None and "busy" in reason.lower():
        if not lazy:
            raise MountError(
                f"{str(mountpoint)!r} is busy: close the files and shells that use it first"
                " (or detach it now with --lazy)"
            )
        reason = _fusermount_u(mountpoint, "-z")
        if reason is None:
            return "detached"
    if reason is not None:
        raise MountError(f"cannot unmount {str(mountpoint)!r}: {reason}")
    if pid is not None:
        _wait_for_exit(pid, timeout, mountpoint)
    return "unmounted"


def _fusermount_u(mountpoint: Path, *flags: str) -> str | None:
    """``fusermount3 -u``: None if it worked, else its reason."""
    result = subprocess.run(
        ["fusermount3", "-u", *flags, str(mountpoint)], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        return None
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"


def _remove_own_pid_file(path: Path) -> None:
    """Remove ``path`` if it still names this process. A daemon that outlived its mount
    (detached lazily while files were open) may end after a new daemon of the same mount
    point wrote its own pid there: that file is not ours to remove."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


def _read_pid(path: Path) -> int | None:
    """The mount daemon's pid from its pid file, if that process is still an envfs mount.

    A daemon killed with SIGKILL leaves its pid file behind, and the pid may have been
    reused since: such a file names no daemon to wait for.
    """
    try:
        pid = int(path.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"mount" in argv and any(b"envfs" in arg for arg in argv) else None


def _wait_for_exit(pid: int, timeout: float, mountpoint: Path) -> None:
    if not process_ended(pid, timeout):
        raise MountError(f"the daemon of {str(mountpoint)!r} (pid {pid}) did not stop in time")


def process_ended(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ends within ``timeout`` seconds (a zombie has ended; a
    process that is not ours to watch counts as ended)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return True  # not ours to watch
        if _is_zombie(pid):
            return True  # finished; its parent (often init, which may be slow) has yet to reap it
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return False
    # "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ")".
    fields = stat_line[stat_line.rfind(b")") + 1 :].split()
    return bool(fields) and fields[0] in (b"Z", b"X")
