"""A throw-away Debian machine booted by systemd-nspawn, for testing the units for real.

The container's root is an overlay: the host's root file system (read through, never
written) under an upper layer in a tmpfs of the test's own. The upper layer outlives the
container, so booting again on it is a reboot: what the container wrote (/etc, /var/lib,
/srv, /opt) is still there. ``/dev/fuse`` is bound in. Only the root file system shows
through (not the host's other mounts): a test copies in what else it needs.

Commands run inside with ``nsenter`` on the container's PID 1 (no systemd-machined is
needed: PID 1 of the host need not be systemd), in a clean environment (PATH as a root
login shell has it on Debian), never the test's.

Clean-up, even when a test fails or the boot does not finish: the container's PID 1 is
killed (which ends every process of the container, FUSE daemons included, and with its
mount namespace every mount made inside), then nspawn; the overlay and the tmpfs are
unmounted and the folder removed; the cgroups made for nspawn and the leftovers nspawn
leaves under /run/systemd/nspawn are removed. On a host run by systemd, nspawn runs in a
transient scope of its own (``envfs-ct-NAME.scope``), stopped and reset at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOTS = tuple(Path("/sys/fs/cgroup", sub) for sub in ("unified", "systemd", ""))
BOOT_TIMEOUT = 60.0


class ContainerError(AssertionError):
    """The container did not boot, or a command in it failed."""


def _host_has_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def _cgroup_hierarchies() -> list[Path]:
    """The cgroup hierarchies nspawn places itself in: the unified one (cgroup2) and, on a
    hybrid host, the named v1 hierarchy of systemd."""
    found = []
    for root in CGROUP_ROOTS:
        if (root / "cgroup.procs").exists() and root.is_mount():
            found.append(root)
    return found


def _remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


class Container:
    """One booted container; see the module docstring."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder
        self.merged = folder / "merged"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.cgroups: list[Path] = []
        self.boots = 0
        self.pids: list[int] = []  # every nspawn and PID 1 there was

    # --- life ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Start the container and wait until its system is up (``is-system-running``)."""
        log = (self.folder / f"nspawn-{self.boots}.log").open("wb")
        self.boots += 1
        nspawn = [
            "systemd-nspawn",
            f"--directory={self.merged}",
            f"--machine={self.name}",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            "--link-journal=no",
            "--bind=/dev/fuse",
        ]
        env = {"PATH": PATH, "SYSTEMD_LOG_COLOR": "0"}
        if _host_has_systemd():
            # --keep-unit: nspawn uses the unit it runs in; give it one of its own.
            args = [
                "systemd-run",
                "--scope",
                "--quiet",
                f"--unit=envfs-ct-{self.name}",
                "--property=Delegate=yes",
                *nspawn,
            ]
            preexec = None
        else:
            # No systemd to make a unit: a cgroup of our own, in which nspawn makes its
            # "supervisor" and "payload" groups (else it makes them in ours).
            self.cgroups = []
            for hierarchy in _cgroup_hierarchies():
                group = hierarchy / f"envfs-ct-{self.name}"
                group.mkdir(exist_ok=True)
                self.cgroups.append(group)
            groups = list(self.cgroups)

            def preexec() -> None:
                for group in groups:
                    (group / "cgroup.procs").write_text("0\n")

            args = nspawn
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=preexec,  # only writes our pid to a cgroup
            start_new_session=True,
        )
        log.close()
        self.pids.append(self.proc.pid)
        self.leader = self._find_leader()
        self.pids.append(self.leader)
        self.wait_running()

    def _find_leader(self) -> int:
        """The container's PID 1, as the host sees it: nspawn's child that is PID 1 of a
        PID namespace of its own."""
        assert self.proc is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.log()}")
            for child in _children(self.proc.pid):
                if _ns_pid(child) == 1:
                    return child
            time.sleep(0.05)
        raise ContainerError(f"no systemd started in the container:\n{self.log()}")

    def wait_running(self) -> None:
        """Until the system has booted: ``running``, or ``degraded`` (a unit of the host's
        own set-up that fails in a container is no concern of the tests)."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            # Before PID 1 has set up its private bus, systemctl fails: try again.
            result = self.run(
                "systemctl is-system-running --wait", check=False, timeout=BOOT_TIMEOUT
            )
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise ContainerError(f"the container's system is {state!r}:\n{self.log()}")
            time.sleep(0.1)

    def reboot(self) -> int:
        """``systemctl reboot`` inside, then boot again on the same upper layer; the
        status systemd-nspawn exited with (133: the container asked for a reboot)."""
        assert self.proc is not None
        self.run("systemctl reboot", check=False)
        try:
            status = self.proc.wait(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"no reboot within {BOOT_TIMEOUT:g} s") from None
        self.proc = None
        self.leader = None
        self.boot()
        return status

    def stop(self) -> None:
        """End the container now, whatever its state (clean-up: no clean shutdown)."""
        leaders = [self.leader] if self.leader is not None else []
        if self.proc is not None and not leaders:  # the boot did not get that far
            leaders = [pid for pid in _children(self.proc.pid) if _ns_pid(pid) == 1]
        for pid in leaders:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # PID 1: the whole namespace goes with it
        self.leader = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            self.proc = None

    def log(self) -> str:
        logs = sorted(self.folder.glob("nspawn-*.log"))
        return "".join(p.read_text(errors="replace")[-4000:] for p in logs[-1:])

    # --- commands --------------------------------------------------------------------------

    def run(
        self,
        script: str,
        *,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with bash (``-e -u -o pipefail``) inside, as root or ``user``."""
        assert self.leader is not None, "the container is not running"
        shell = ["bash", "-euo", "pipefail", "-c", script]
        if user is not None:
            shell = ["runuser", "-u", user, "--", *shell]
        env = ["env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb"]
        if user is not None:
            env[3] = f"HOME=/home/{user}"
        args = ["nsenter", f"--target={self.leader}", "--all", "--", *env, *shell]
        try:
            result = subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                input=input,
                stdin=subprocess.DEVNULL if input is None else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"timed out after {timeout:g} s inside:\n{script}") from exc
        if check and result.returncode != 0:
            raise ContainerError(
                f"exit {result.returncode} in the container"
                f"{' as ' + user if user else ''}:\n{script}\n--- stdout:\n{result.stdout}"
                f"--- stderr:\n{result.stderr}"
            )
        return result

    def out(self, script: str, **kw: object) -> str:
        return self.run(script, **kw).stdout.strip()  # type: ignore[arg-type]

    def popen(self, script: str, *, user: str = "root") -> subprocess.Popen[str]:
        """``script`` started inside and left running, stdin and stdout piped to it.

        It runs as a transient service of the container's systemd (``systemd-run
        --pipe``), as a user's program would run in a session: at shutdown systemd stops
        it as it stops everything else. (A process entered with nsenter is no unit's.)
        """
        assert self.leader is not None
        run = ["systemd-run", "--pipe", "--quiet", "--collect", f"--uid={user}"]
        run += ["--setenv=LANG=C.UTF-8", "--", "bash", "-euo", "pipefail", "-c", script]
        args = ["nsenter", f"--target={self.leader}", "--all", "--"]
        args += ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", *run]
        return subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def wait_for(self, script: str, *, timeout: float = 30.0, what: str = "") -> str:
        """Run ``script`` until it succeeds; its output."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run(script, check=False)
            if result.returncode == 0:
                return result.stdout.strip()
            if time.monotonic() > deadline:
                raise ContainerError(
                    f"not within {timeout:g} s: {what or script}\n{result.stdout}{result.stderr}"
                )
            time.sleep(0.2)

    def path(self, inside: str) -> Path:
        """A path inside the container, seen from the host (through the overlay)."""
        return self.merged / inside.lstrip("/")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _ns_pid(pid: int) -> int:
    """``pid``'s number in its own PID namespace (0: gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return 0


def require_tools() -> None:
    """Fail (never skip) when the machine cannot run the containers: CI installs
    systemd-container itself (the Makefile's APT_PACKAGES). Only a run without root is
    skipped, as every test that mounts is."""
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    missing = [tool for tool in ("systemd-nspawn", "nsenter", "runuser") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)} (apt-get install systemd-container util-linux)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        pytest.fail(f"/dev/fuse is unusable: {exc}")


@contextlib.contextmanager
def container(prefix: str = "envfs") -> Iterator[Container]:
    """A booted container on a fresh overlay; everything removed at the end."""
    require_tools()
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
    mounts: list[Path] = []
    box = Container(name, folder)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", folder], check=True)
        mounts.append(folder)
        for sub in ("upper", "work", "merged"):
            (folder / sub).mkdir()
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir=/,upperdir={folder}/upper,workdir={folder}/work",
                str(box.merged),
            ],
            check=True,
        )
        mounts.append(box.merged)
        box.boot()
        yield box
    finally:
        try:
            box.stop()
        finally:
            _clean_up(box, mounts, folder)


def _clean_up(box: Container, mounts: list[Path], folder: Path) -> None:
    problems = []
    for mount in reversed(mounts):
        result = subprocess.run(["umount", "--lazy", str(mount)], capture_output=True, text=True)
        if result.returncode != 0:
            problems.append(f"umount {mount}: {result.stderr.strip()}")
    with contextlib.suppress(OSError):
        folder.rmdir()
    for group in box.cgroups:
        _remove_cgroup_tree(group)
    for leftover in (
        Path("/run/systemd/nspawn/propagate") / box.name,
        Path("/run/systemd/nspawn/unix-export") / box.name,
    ):
        with contextlib.suppress(OSError):
            leftover.rmdir()
    if _host_has_systemd():
        scope = f"envfs-ct-{box.name}.scope"
        subprocess.run(["systemctl", "stop", scope], capture_output=True, check=False)
        subprocess.run(["systemctl", "reset-failed", scope], capture_output=True, check=False)
    if problems:
        raise ContainerError("; ".join(problems))


def leftovers(box: Container) -> list[str]:
    """What the container ``box`` (stopped) could have left on the host."""
    name = box.name
    found = [f"pid {pid}" for pid in box.pids if _ns_pid(pid)]
    with open("/proc/self/mounts") as mounts:
        found += [line.split()[1] for line in mounts if name in line.split()[1]]
    for hierarchy in _cgroup_hierarchies():
        found += [str(p) for p in hierarchy.glob(f"envfs-ct-{name}")]
    found += [str(p) for p in Path("/tmp").glob(f"{name}-*")]
    found += [str(p) for p in Path("/run/systemd/nspawn/propagate").glob(name)]
    if _host_has_systemd():
        units = subprocess.run(
            ["systemctl", "list-units", "--all", "--plain", "--no-legend", f"*{name}*"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        found += units.split()
    return found
