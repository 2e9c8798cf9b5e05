"""What ``envfs mount --busy-poll`` buys and what it costs: the numbers behind its default.

One envfs volume, mounted again with each busy-poll time (``--values``, µs), alternating the
order each repetition; the table quotes medians and ratios to ``--busy-poll 0`` (the stock
pyfuse3 loop). Workloads, each on a fresh mount of that value:

- ``lookups``: ``os.stat`` of ``--lookups`` names not seen before, back to back (a lookup
  request each: attributes and entries are cached by the kernel, new names are not): the
  time and the daemon's CPU time per request;
- ``untar``: ``tar -xf`` of ``--files`` files of 1-20 KiB (bench/fs_bench.py's tree);
- ``ls -lR`` and ``cat all`` of that tree, cold (remounted, kernel caches dropped);
- ``rand 4K read``: ``--rand-reads`` 4 KiB ``pread``s of a 64 MiB file, cold;
- ``paced``: an idle-ish server: one ``os.stat`` of a new name every millisecond for
  ``--paced-seconds``; the daemon's CPU time above what it spends when nothing at all comes
  (measured just before, as long), per request.

The daemon's CPU time is ``utime + stime`` of ``/proc/PID/stat`` (all its threads), read
before and after; its pid comes from the mount's pid file.

Needs root (drop_caches). Everything lives in one new folder under /var/tmp (a real disk),
unmounted and removed at the end, even on failure.

Usage: .venv/bin/python bench/busy_poll_bench.py [--values 0,25,50,100,200] [--reps 5]
       [--files 2000] [--lookups 20000] [--rand-reads 3000] [--paced-seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fs_bench import (
    ENVFS,
    BenchError,
    Envfs,
    MiB,
    drop_caches,
    is_mounted,
    make_tree_tar,
    progress,
    rand_offsets,
    rand_reads,
    run,
)

from envfs.files.mount import pid_file_for

TICK = os.sysconf("SC_CLK_TCK")
BIG_MB = 64
WORKLOADS = ("lookups", "untar", "ls -lR", "cat all", "rand 4K read", "paced")


@dataclass
class PolledEnvfs(Envfs):
    """An envfs mount whose ``--busy-poll`` is set before each (re)mount."""

    busy_poll: int = 0
    pid: int = 0

    def mount(self) -> None:
        self.envfs(
            "mount",
            str(self.backing),
            str(self.mnt),
            "--log-file",
            str(self.log),
            "--busy-poll",
            str(self.busy_poll),
        )
        # Read now: a daemon that outlived its unmount (see below) removes the file later.
        self.pid = int(pid_file_for(self.mnt).read_text())

    def unmount(self) -> None:
        try:
            super().unmount()
        except BenchError as exc:
            # A copy of the mount in another mount namespace (made by a process that ran
            # `unshare --mount` meanwhile) keeps the daemon alive after our unmount; go on.
            if is_mounted(self.mnt):
                raise
            progress(f"warning: {exc}")

    def daemon_cpu(self) -> float:
        """CPU seconds the mount daemon has used so far."""
        raw = Path(f"/proc/{self.pid}/stat").read_bytes()
        fields = raw[raw.rfind(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


@dataclass
class Sample:
    seconds: float
    cpu: float  # daemon CPU seconds during the workload
    requests: int = 0  # for per-request figures; 0 when not counted


class Bench:
    def __init__(self, work: Path, system: PolledEnvfs, args: argparse.Namespace) -> None:
        self.work = work
        self.system = system
        self.args = args
        self.tar = work / "tree.tar"
        self.offsets = rand_offsets(BIG_MB * MiB, args.rand_reads)
        self.serial = 0

    def measured(self, fn: Callable[[], int]) -> Sample:
        cpu = self.system.daemon_cpu()
        start = time.perf_counter()
        requests = fn()
        seconds = time.perf_counter() - start
        return Sample(seconds, self.system.daemon_cpu() - cpu, requests)

    def cold(self) -> None:
        self.system.remount()
        drop_caches()

    def new_names(self, count: int) -> list[Path]:
        self.serial += 1
        folder = self.system.mnt / "names"
        return [folder / f"n{self.serial}-{i}" for i in range(count)]

    def lookups(self) -> Sample:
        names = self.new_names(self.args.lookups)
        return self.measured(lambda: stat_all(names))

    def untar(self, rep: int) -> Sample:
        dest = self.system.mnt / f"r{rep}"
        dest.mkdir()
        drop_caches()
        sample = self.measured(lambda: run(["tar", "-xf", str(self.tar), "-C", str(dest)]) or 0)
        os.sync()
        return sample

    def ls(self, rep: int) -> Sample:
        self.cold()
        with open(os.devnull, "w") as null:
            cmd = ["ls", "-lR", str(self.system.mnt / f"r{rep}")]
            return self.measured(lambda: run(cmd, stdout=null) or 0)

    def cat(self, rep: int) -> Sample:
        self.cold()
        with open(os.devnull, "w") as null:
            cmd = [
                "find",
                str(self.system.mnt / f"r{rep}"),
                "-type",
                "f",
                "-exec",
                "cat",
                "{}",
                "+",
            ]
            return self.measured(lambda: run(cmd, stdout=null) or 0)

    def read_random(self) -> Sample:
        self.cold()
        fd = os.open(self.system.mnt / "big", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return self.measured(lambda: rand_reads(fd, self.offsets) or len(self.offsets))
        finally:
            os.close(fd)

    def paced(self) -> Sample:
        """Daemon CPU for one lookup a millisecond, above its CPU with no requests at all."""
        seconds = self.args.paced_seconds
        idle = self.measured(lambda: time.sleep(seconds) or 0)
        names = self.new_names(int(seconds * 1000))
        busy = self.measured(lambda: stat_paced(names, 0.001))
        return Sample(busy.seconds, busy.cpu - idle.cpu * busy.seconds / idle.seconds, len(names))

    def workload(self, name: str, rep: int) -> Sample:
        if name == "lookups":
            return self.lookups()
        if name == "untar":
            return self.untar(rep)
        if name == "ls -lR":
            return self.ls(rep)
        if name == "cat all":
            return self.cat(rep)
        if name == "rand 4K read":
            return self.read_random()
        if name == "paced":
            return self.paced()
        raise ValueError(name)


def stat_all(names: list[Path]) -> int:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.stat(name)
    return len(names)


def stat_paced(names: list[Path], interval: float) -> int:
    start = time.monotonic()
    for i, name in enumerate(names):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with contextlib.suppress(FileNotFoundError):
            os.stat(name)
    return len(names)


def run_bench(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    system = PolledEnvfs("envfs", work / "envfs")
    bench = Bench(work, system, args)
    make_tree_tar(bench.tar, args.files)
    samples: dict[str, dict[int, list[Sample]]] = {
        w: {v: [] for v in args.values} for w in WORKLOADS
    }
    try:
        system.create()
        system.mount()
        (system.mnt / "names").mkdir()
        run(["dd", "if=/dev/urandom", f"of={system.mnt / 'big'}", "bs=1M", f"count={BIG_MB}",
             "conv=fsync", "status=none"])  # fmt: skip
        progress("warming up")
        stat_all(bench.new_names(args.lookups))
        for rep in range(args.reps):
            order = args.values if rep % 2 == 0 else args.values[::-1]
            for value in order:
                system.busy_poll = value
                system.remount()
                for name in WORKLOADS:
                    sample = bench.workload(name, rep * 1000 + value)
                    samples[name][value].append(sample)
                    progress(
                        f"rep {rep + 1}/{args.reps}  busy-poll {value:>4} µs  {name:<12}"
                        f" {sample.seconds:8.3f} s  daemon CPU {sample.cpu:7.3f} s"
                    )
    finally:
        try:
            if is_mounted(system.mnt):
                system.unmount()
        except BenchError as exc:
            progress(f"warning: {exc}")
        finally:
            system.force_unmount()
    return summarize(samples, args)


def summarize(
    samples: dict[str, dict[int, list[Sample]]], args: argparse.Namespace
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": {
            "values_us": args.values,
            "reps": args.reps,
            "files": args.files,
            "lookups": args.lookups,
            "rand_reads": args.rand_reads,
            "paced_seconds": args.paced_seconds,
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
        },
        "workloads": {},
    }
    for name, by_value in samples.items():
        entry: dict[str, Any] = {}
        base = statistics.median(s.seconds for s in by_value[args.values[0]])
        base_cpu = statistics.median(s.cpu for s in by_value[args.values[0]])
        for value, runs in by_value.items():
            seconds = statistics.median(s.seconds for s in runs)
            cpu = statistics.median(s.cpu for s in runs)
            item = {
                "seconds": round(seconds, 4),
                "cpu_seconds": round(cpu, 4),
                "time_ratio": round(seconds / base, 3),
                "cpu_ratio": round(cpu / base_cpu, 3) if base_cpu > 0 else None,
            }
            requests = runs[0].requests
            if requests:
                item["us_per_request"] = round(seconds / requests * 1e6, 1)
                item["cpu_us_per_request"] = round(cpu / requests * 1e6, 1)
            entry[str(value)] = item
        results["workloads"][name] = entry
    return results


def print_table(results: dict[str, Any]) -> None:
    values = results["config"]["values_us"]
    print(f"busy poll (µs): {', '.join(map(str, values))}; medians of {results['config']['reps']}")
    print("time, and in brackets the ratio to the first value:")
    print(f"{'workload':<14}" + "".join(f"{v:>16}" for v in values))
    for name, entry in results["workloads"].items():
        cells = []
        for v in values:
            item = entry[str(v)]
            if "us_per_request" in item and name != "paced":
                cells.append(f"{item['us_per_request']:.1f}µs ({item['time_ratio']:.2f})")
            else:
                cells.append(f"{item['seconds']:.3f}s ({item['time_ratio']:.2f})")
        print(f"{name:<14}" + "".join(f"{c:>16}" for c in cells))
    print("daemon CPU, and in brackets the ratio to the first value:")
    for name, entry in results["workloads"].items():
        cells = []
        for v in values:
            item = entry[str(v)]
            ratio = "-" if item["cpu_ratio"] is None else f"{item['cpu_ratio']:.2f}"
            if "cpu_us_per_request" in item:
                cells.append(f"{item['cpu_us_per_request']:.1f}µs ({ratio})")
            else:
                cells.append(f"{item['cpu_seconds']:.2f}s ({ratio})")
        print(f"{name:<14}" + "".join(f"{c:>16}" for c in cells))
    print("(lookups, paced and rand 4K read: per request; paced CPU: above the idle daemon's)")


def parse_values(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 0,25,50") from None
    if not values or any(v < 0 or v > 10_000 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each value must be 0 to 10000")
    return values


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time envfs with each --busy-poll value.")
    parser.add_argument("--values", type=parse_values, default=[0, 25, 50, 100, 200])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--files", type=int, default=2000, help="files in the tree (default 2000)")
    parser.add_argument("--lookups", type=int, default=20000, help="back to back (default 20000)")
    parser.add_argument("--rand-reads", type=int, default=3000, help="4 KiB reads (default 3000)")
    parser.add_argument("--paced-seconds", type=float, default=10.0, help="(default 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if min(args.reps, args.files, args.lookups, args.rand_reads) < 1 or args.paced_seconds <= 0:
        parser.error(
            "--reps, --files, --lookups, --rand-reads and --paced-seconds must be positive"
        )
    if os.geteuid() != 0:
        print("busy_poll_bench: run as root (it drops the kernel's caches)", file=sys.stderr)
        return 2
    if not Path(ENVFS).exists() or not shutil.which("fusermount3"):
        print("busy_poll_bench: needs fuse3 and envfs (make setup)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    work = Path(tempfile.mkdtemp(prefix="envfs-busy-poll-bench.", dir="/var/tmp"))
    try:
        results = run_bench(work, args)
    except BenchError as exc:
        print(f"busy_poll_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        mnt = work / "envfs" / "mnt"
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
