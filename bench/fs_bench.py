"""envfs beside gocryptfs on the same disk, in one run: the numbers behind issue 3's aim.

Three systems: envfs as ``envfs init`` makes it (encrypted names, format 2), envfs with
``--plaintext-names`` (``envfs-plain``: what encrypted names cost) and gocryptfs (which
encrypts names too). Workloads, each run on every system that takes it, rotating which goes
first, ``--reps`` times; the table quotes medians (``../shared/PERFORMANCE.md``: these VMs
are noisy, so warm up, alternate and take medians). ``envfs-plain`` runs the workloads of
the tree only (untar, ``ls -lR``, ``cat``): those of one big file use one name.

- ``seq write``: ``dd if=/dev/zero bs=1M conv=fsync`` of ``--size-mb`` MiB (default 512);
- ``seq read``: ``dd`` of that file to ``/dev/null``, cold;
- ``rand 4K read``: ``--rand-reads`` ``pread``s of 4 KiB at seeded random 4 KiB-aligned offsets
  in that file (the same offsets on both systems), readahead off (``POSIX_FADV_RANDOM``), cold;
- ``untar``: ``tar -xf`` of a deterministic tree of ``--files`` files of 1-20 KiB in nested
  directories (generated once per run, outside the mounts);
- ``ls -lR``: of that tree, cold;
- ``cat all``: ``find -type f -exec cat {} +`` of that tree, cold.

"Cold" means: the system is unmounted and mounted again (FUSE's caches are gone) and the
kernel's caches are dropped (``echo 3 > /proc/sys/vm/drop_caches``) just before the timed
command. Preparation (remounts, syncs, deleting the previous big file) is never timed.

``--requests`` also counts the FUSE requests each timed command sends to each mount (the
kernel's ``fuse_request_send`` tracepoint, in a private tracefs instance; tracefs is mounted
for the run if it is not): the usual explanation of a ratio.

Everything lives in one temporary folder (``--workdir``, by default a new one under
/var/tmp: a real disk, not tmpfs), with its own key store; every mount is unmounted and the
folder removed at the end, even on failure. Needs root (drop_caches) and gocryptfs.

Usage: bench/fs.sh [--reps N] [--size-mb MB] [--files N] [--rand-reads N] [--requests] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENVFS = str(Path(sys.executable).with_name("envfs"))
MiB = 1 << 20
SEED = 20240229
GOCRYPTFS_PASSWORD = "envfs-bench-password\n"
WORKLOADS = ("seq write", "seq read", "rand 4K read", "untar", "ls -lR", "cat all")
TREE_WORKLOADS = ("untar", "ls -lR", "cat all")  # many names: where encrypting them shows
SYSTEM_NAMES = ("envfs", "envfs-plain", "gocryptfs")


class BenchError(Exception):
    """A set-up step failed; the message says which."""


def run(cmd: list[str], *, env: dict[str, str] | None = None, stdout: Any = None) -> None:
    result = subprocess.run(
        cmd,
        env=env,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        output = ((result.stdout or "") + (result.stderr or "")).strip()
        raise BenchError(f"{' '.join(cmd)} exited {result.returncode}: {output}")


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --- the two systems ---------------------------------------------------------------------


@dataclass
class System:
    name: str
    base: Path
    workloads: tuple[str, ...] = WORKLOADS  # those this system runs
    mnt: Path = field(init=False)

    def __post_init__(self) -> None:
        self.mnt = self.base / "mnt"

    def create(self) -> None:
        raise NotImplementedError

    def mount(self) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        raise NotImplementedError

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def force_unmount(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], check=False)
            time.sleep(0.2)


@dataclass
class Envfs(System):
    init_args: tuple[str, ...] = ()  # for envfs init: "--plaintext-names"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.backing = self.base / "backing"
        self.log = self.base / "envfs.log"
        self.env = dict(os.environ)
        self.env.update(
            ENVFS_KMS_DIR=str(self.base / "kms"),
            ENVFS_KMS_SOCKET=str(self.base / "no-daemon.sock"),
            ENVFS_REGION="local-1",
        )
        self.env.pop("CREDENTIALS_DIRECTORY", None)

    def envfs(self, *args: str) -> str:
        result = subprocess.run(
            [ENVFS, *args], env=self.env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise BenchError(f"envfs {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result.stdout

    def create(self) -> None:
        self.mnt.mkdir(parents=True)
        self.envfs("kms", "init")
        key = json.loads(self.envfs("kms", "create-key", "--description", "fs_bench"))
        key_id = key["KeyMetadata"]["KeyId"]
        self.envfs("kms", "create-alias", "--alias-name", "alias/bench", "--target-key-id", key_id)
        self.envfs("init", str(self.backing), "--key-id", "alias/bench", *self.init_args)

    def mount(self) -> None:
        self.envfs("mount", str(self.backing), str(self.mnt), "--log-file", str(self.log))

    def unmount(self) -> None:
        self.envfs("umount", str(self.mnt))


class Gocryptfs(System):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.cipher = self.base / "cipher"
        self.passfile = self.base / "passfile"

    def create(self) -> None:
        self.mnt.mkdir(parents=True)
        self.cipher.mkdir()
        self.passfile.write_text(GOCRYPTFS_PASSWORD)
        self.passfile.chmod(0o600)
        run(["gocryptfs", "-init", "-q", "-passfile", str(self.passfile), str(self.cipher)])

    def mount(self) -> None:
        run(["gocryptfs", "-q", "-passfile", str(self.passfile), str(self.cipher), str(self.mnt)])

    def unmount(self) -> None:
        run(["fusermount3", "-u", str(self.mnt)])
        deadline = time.monotonic() + 10
        while is_mounted(self.mnt) and time.monotonic() < deadline:
            time.sleep(0.02)


# --- workloads -----------------------------------------------------------------------------


def make_tree_tar(path: Path, files: int) -> int:
    """A deterministic tar of ``files`` files of 1-20 KiB in nested directories; its bytes."""
    rng = random.Random(SEED)
    dirs = [""]
    for i in range(max(1, files // 40)):  # about 40 files a directory, up to 3 levels deep
        parent = rng.choice([d for d in dirs if d.count("/") < 3])
        dirs.append(f"{parent}d{i:03d}/")
    total = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:

        def add_dir(name: str) -> None:
            info = tarfile.TarInfo("tree/" + name.rstrip("/") if name else "tree")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)

        for d in dirs:
            add_dir(d)
        for i in range(files):
            size = rng.randint(1024, 20 * 1024)
            info = tarfile.TarInfo(f"tree/{rng.choice(dirs)}f{i:05d}.dat")
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000 + i
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
            total += size
    return total


def rand_offsets(size_bytes: int, count: int) -> list[int]:
    rng = random.Random(SEED + 1)
    pages = size_bytes // 4096
    return [rng.randrange(pages) * 4096 for _ in range(count)]


def rand_reads(fd: int, offsets: list[int]) -> None:
    for off in offsets:
        if len(os.pread(fd, 4096, off)) != 4096:
            raise BenchError(f"short read at offset {off}")


class RequestCounter:
    """Counts FUSE requests per opcode and mount with the kernel's ``fuse_request_send``
    tracepoint, in a private tracefs instance (removed again by :meth:`close`)."""

    LINE = re.compile(rb"connection (\d+) req \d+ opcode \d+ \((\w+)\)")

    def __init__(self) -> None:
        self.root = Path("/sys/kernel/tracing")
        self.mounted_tracefs = False
        if not (self.root / "events").is_dir():
            run(["mount", "-t", "tracefs", "nodev", str(self.root)])
            self.mounted_tracefs = True
        self.instance = self.root / "instances" / f"envfs-fs-bench-{os.getpid()}"
        try:
            if not (self.root / "events/fuse/fuse_request_send").is_dir():
                raise BenchError("--requests: this kernel has no fuse_request_send tracepoint")
            self.instance.mkdir()
            self._set("buffer_size_kb", "32768")
            self._set("tracing_on", "0")
            self._set("events/fuse/fuse_request_send/enable", "1")
        except BaseException:
            self.close()
            raise

    def _set(self, name: str, value: str) -> None:
        (self.instance / name).write_text(value + "\n")

    def start(self) -> None:
        self._set("trace", "")
        self._set("tracing_on", "1")

    def stop(self, mnt: Path) -> dict[str, int]:
        """Requests sent to the mount on ``mnt`` since :meth:`start`, per opcode."""
        self._set("tracing_on", "0")
        dev = os.stat(mnt).st_dev
        connection = (os.major(dev) << 20) | os.minor(dev)
        text = (self.instance / "trace").read_bytes()
        if b"LOST" in text:
            raise BenchError("--requests: the trace buffer overflowed")
        counts: dict[str, int] = {}
        for conn, op in self.LINE.findall(text):
            if int(conn) == connection:
                name = op.decode().removeprefix("FUSE_")
                counts[name] = counts.get(name, 0) + 1
        return counts

    def close(self) -> None:
        if self.instance.is_dir():
            with contextlib.suppress(OSError):
                self._set("events/fuse/fuse_request_send/enable", "0")
            with contextlib.suppress(OSError):
                self.instance.rmdir()
        if self.mounted_tracefs:
            subprocess.run(["umount", str(self.root)], check=False)


@dataclass
class Bench:
    work: Path
    size_mb: int
    files: int
    rand_count: int
    counter: RequestCounter | None = None
    last_requests: dict[str, int] = field(default_factory=dict)
    tar: Path = field(init=False)
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.tar = self.work / "tree.tar"
        self.offsets = rand_offsets(self.size_mb * MiB, self.rand_count)

    def timed(self, system: System, fn: Callable[[], object]) -> float:
        """Seconds ``fn`` takes; its FUSE requests go to :attr:`last_requests` if counted."""
        if self.counter is not None:
            self.counter.start()
        start = time.perf_counter()
        try:
            fn()
        finally:
            seconds = time.perf_counter() - start
            if self.counter is not None:
                self.last_requests = self.counter.stop(system.mnt)
        return seconds

    def cold(self, system: System) -> None:
        system.remount()
        drop_caches()

    def big(self, system: System) -> Path:
        return system.mnt / "big"

    def write_big(self, system: System) -> float:
        target = self.big(system)
        target.unlink(missing_ok=True)
        drop_caches()
        cmd = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={self.size_mb}"]
        return self.timed(system, lambda: run([*cmd, "conv=fsync", "status=none"]))

    def read_big(self, system: System) -> float:
        self.cold(system)
        cmd = ["dd", f"if={self.big(system)}", "of=/dev/null", "bs=1M", "status=none"]
        return self.timed(system, lambda: run(cmd))

    def read_random(self, system: System) -> float:
        self.cold(system)
        fd = os.open(self.big(system), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: 4 KiB requests
            return self.timed(system, lambda: rand_reads(fd, self.offsets))
        finally:
            os.close(fd)

    def untar(self, system: System, rep: int) -> float:
        dest = system.mnt / f"r{rep}"
        dest.mkdir()
        drop_caches()
        seconds = self.timed(system, lambda: run(["tar", "-xf", str(self.tar), "-C", str(dest)]))
        os.sync()
        return seconds

    def ls(self, system: System, rep: int) -> float:
        self.cold(system)
        with open(os.devnull, "w") as null:
            cmd = ["ls", "-lR", str(system.mnt / f"r{rep}")]
            return self.timed(system, lambda: run(cmd, stdout=null))

    def cat(self, system: System, rep: int) -> float:
        self.cold(system)
        tree = str(system.mnt / f"r{rep}")
        with open(os.devnull, "w") as null:
            cmd = ["find", tree, "-type", "f", "-exec", "cat", "{}", "+"]
            return self.timed(system, lambda: run(cmd, stdout=null))

    def warm_up(self, system: System) -> None:
        """One untimed write and read of the big file (if it runs those), and an untar
        (fresh memory is slow)."""
        if "seq write" in system.workloads:
            self.write_big(system)
            self.read_big(system)
            self.big(system).unlink()
        dest = system.mnt / "warm-up"
        dest.mkdir()
        run(["tar", "-xf", str(self.tar), "-C", str(dest)])
        os.sync()

    def workload(self, name: str, system: System, rep: int) -> float:
        if name == "seq write":
            return self.write_big(system)
        if name == "seq read":
            return self.read_big(system)
        if name == "rand 4K read":
            return self.read_random(system)
        if name == "untar":
            return self.untar(system, rep)
        if name == "ls -lR":
            return self.ls(system, rep)
        if name == "cat all":
            return self.cat(system, rep)
        raise ValueError(name)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_bench(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(work, args.size_mb, args.files, args.rand_reads)
    tree_bytes = make_tree_tar(bench.tar, args.files)
    systems: list[System] = [
        Envfs("envfs", work / "envfs"),
        Envfs(
            "envfs-plain",
            work / "envfs-plain",
            workloads=TREE_WORKLOADS,
            init_args=("--plaintext-names",),
        ),
        Gocryptfs("gocryptfs", work / "goc"),
    ]
    times: dict[str, dict[str, list[float]]] = {
        w: {s.name: [] for s in systems if w in s.workloads} for w in WORKLOADS
    }
    requests: dict[str, dict[str, list[dict[str, int]]]] = {
        w: {s.name: [] for s in systems if w in s.workloads} for w in WORKLOADS
    }
    load_before = os.getloadavg()[0]
    try:
        if args.requests:
            bench.counter = RequestCounter()
        for system in systems:
            system.create()
            system.mount()
        for system in systems:
            progress(f"warming up {system.name}")
            bench.warm_up(system)
        for rep in range(args.reps):
            first = rep % len(systems)
            order = systems[first:] + systems[:first]
            for name in WORKLOADS:
                for system in order:
                    if name not in system.workloads:
                        continue
                    seconds = bench.workload(name, system, rep)
                    times[name][system.name].append(seconds)
                    if bench.counter is not None:
                        requests[name][system.name].append(bench.last_requests)
                    progress(
                        f"rep {rep + 1}/{args.reps}  {name:<13} {system.name:<12} {seconds:8.3f} s"
                    )
    finally:
        if bench.counter is not None:
            bench.counter.close()
        for system in systems:
            try:
                if is_mounted(system.mnt):
                    system.unmount()
            except BenchError as exc:
                progress(f"warning: {exc}")
            finally:
                system.force_unmount()
    results = summarize(times, requests, args, tree_bytes)
    results["config"]["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return results


def summarize(
    times: dict[str, dict[str, list[float]]],
    requests: dict[str, dict[str, list[dict[str, int]]]],
    args: argparse.Namespace,
    tree_bytes: int,
) -> dict[str, Any]:
    size_bytes = args.size_mb * MiB
    results: dict[str, Any] = {
        "config": {
            "reps": args.reps,
            "size_mb": args.size_mb,
            "files": args.files,
            "tree_bytes": tree_bytes,
            "rand_reads": args.rand_reads,
            "kernel": platform.release(),
            "gocryptfs": gocryptfs_version(),
        },
        "workloads": {},
    }
    for name, per_system in times.items():
        entry: dict[str, Any] = {}
        for system, samples in per_system.items():
            median = statistics.median(samples)
            item: dict[str, Any] = {"seconds": [round(s, 4) for s in samples]}
            item["median_s"] = round(median, 4)
            if name in ("seq write", "seq read"):
                item["MB_per_s"] = round(size_bytes / 1e6 / median, 1)
            elif name == "rand 4K read":
                item["reads_per_s"] = round(args.rand_reads / median, 1)
            elif name in ("untar", "cat all"):
                item["MB_per_s"] = round(tree_bytes / 1e6 / median, 1)
            counted = requests[name][system]
            if counted:
                item["requests"] = int(statistics.median(sum(c.values()) for c in counted))
                last = sorted(counted[-1].items(), key=lambda kv: -kv[1])
                item["requests_by_op_last_rep"] = dict(last)
            entry[system] = item
        goc = entry["gocryptfs"]["median_s"]
        entry["ratio"] = round(entry["envfs"]["median_s"] / goc, 2)
        if "envfs-plain" in entry:
            plain = entry["envfs-plain"]["median_s"]
            entry["ratio_plaintext_names"] = round(plain / goc, 2)
            entry["names_cost"] = round(entry["envfs"]["median_s"] / plain, 2)
        results["workloads"][name] = entry
    return results


def gocryptfs_version() -> str:
    out = subprocess.run(["gocryptfs", "-version"], capture_output=True, text=True, check=False)
    return out.stdout.split(";")[0].strip()


def describe(name: str, item: dict[str, Any]) -> str:
    seconds = f"{item['median_s']:.2f} s"
    if "reads_per_s" in item:
        return f"{item['reads_per_s']:.0f}/s ({seconds})"
    if "MB_per_s" in item and name.startswith("seq"):
        return f"{item['MB_per_s']:.0f} MB/s ({seconds})"
    return seconds


def ratio(entry: dict[str, Any], key: str) -> str:
    return f"{entry[key]:.2f}" if key in entry else "-"


def print_table(results: dict[str, Any]) -> None:
    cfg = results["config"]
    print(
        f"envfs vs {cfg['gocryptfs']}, kernel {cfg['kernel']}: medians of {cfg['reps']} rep(s);"
        f" big file {cfg['size_mb']} MiB, tree {cfg['files']} files"
        f" ({cfg['tree_bytes'] / 1e6:.1f} MB), {cfg['rand_reads']} random 4 KiB reads"
    )
    before, after = cfg["loadavg_1min"]
    note = "  (other work on the machine: expect noise)" if max(before, after) > 0.7 else ""
    print(f"1-minute load average before/after: {before:.2f}/{after:.2f}{note}")
    print(
        "envfs: encrypted names (the default); envfs-plain: --plaintext-names\n"
        "ratio = envfs time / gocryptfs time (>1: envfs slower; aim <= 1.5);"
        " plain = envfs-plain's ratio; names = envfs time / envfs-plain time"
    )
    counted = "requests" in results["workloads"]["seq write"]["envfs"]
    extra = f"{'FUSE requests e/p/g':>24}" if counted else ""
    print(
        f"{'workload':<14}{'envfs':>20}{'envfs-plain':>20}{'gocryptfs':>20}"
        f"{'ratio':>7}{'plain':>7}{'names':>7}{extra}"
    )
    for name, entry in results["workloads"].items():
        flag = "  <-- over 1.5x" if entry["ratio"] > 1.5 else ""
        plain = entry.get("envfs-plain")
        if counted:
            counts = [entry[s]["requests"] if s in entry else "-" for s in SYSTEM_NAMES]
            flag = f"{'/'.join(map(str, counts)):>24}{flag}"
        print(
            f"{name:<14}{describe(name, entry['envfs']):>20}"
            f"{describe(name, plain) if plain else '-':>20}"
            f"{describe(name, entry['gocryptfs']):>20}{entry['ratio']:>7.2f}"
            f"{ratio(entry, 'ratio_plaintext_names'):>7}{ratio(entry, 'names_cost'):>7}{flag}"
        )
    if counted:
        print("requests by opcode (last rep):")
        for name, entry in results["workloads"].items():
            for system in SYSTEM_NAMES:
                if system not in entry:
                    continue
                ops = entry[system]["requests_by_op_last_rep"]
                top = " ".join(f"{op}={n}" for op, n in list(ops.items())[:6])
                print(f"  {name:<13} {system:<12} {top}")


@contextlib.contextmanager
def workdir(given: str | None) -> Iterator[Path]:
    if given:
        yield Path(given)
        return
    path = Path(tempfile.mkdtemp(prefix="envfs-fs-bench.", dir="/var/tmp"))
    try:
        yield path
    finally:
        for mnt in (path / "envfs" / "mnt", path / "envfs-plain" / "mnt", path / "goc" / "mnt"):
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time envfs (encrypted and plaintext names) beside gocryptfs on the same"
        " disk (medians of alternated reps)."
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--size-mb", type=int, default=512, help="big file MiB (default 512)")
    parser.add_argument("--files", type=int, default=5000, help="files in the tree (default 5000)")
    parser.add_argument(
        "--rand-reads", type=int, default=10000, help="random 4 KiB reads (default 10000)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--requests",
        action="store_true",
        help="also count FUSE requests per workload (kernel tracepoint fuse_request_send)",
    )
    parser.add_argument("--workdir", help="an empty folder on the disk to test (default: new)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.size_mb < 1 or args.files < 1 or args.rand_reads < 1:
        parser.error("--reps, --size-mb, --files and --rand-reads must be positive")
    if os.geteuid() != 0:
        print("fs_bench: run as root (it drops the kernel's caches)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("gocryptfs", "fusermount3", "dd", "tar") if not shutil.which(tool)]
    if not Path(ENVFS).exists():
        missing.append(ENVFS)
    if missing:
        print(
            f"fs_bench: missing: {' '.join(missing)} (apt-get install gocryptfs fuse3; make setup)",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        with workdir(args.workdir) as work:
            results = run_bench(work, args)
    except BenchError as exc:
        print(f"fs_bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
