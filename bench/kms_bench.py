"""Key-service throughput: GenerateDataKey and Decrypt calls per second.

Measured on a temporary key store, twice: embedded (a ``KeyService`` in this process) and
through the daemon (``envfs kms serve`` on a temporary socket, called with ``KMSClient``).
Every call is one durable SQLite transaction (its audit record at least), so the numbers
depend mostly on how fast the disk under the temporary folder syncs.

Usage: python bench/kms_bench.py [--seconds S] [--json]

Run it with the project's virtualenv (``.venv/bin/python``). It prints numbers only.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from envfs.errors import KMSError
from envfs.identity import Caller
from envfs.kms.client import KMSClient
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

REGION = "bench-1"
OPERATIONS = ("GenerateDataKey", "Decrypt")
DAEMON_START_TIMEOUT = 15.0

Call = Callable[[str, dict[str, Any]], dict[str, Any]]


def calls_per_second(call: Callable[[], object], seconds: float) -> float:
    """Call ``call`` again and again for ``seconds`` (after one warm-up call)."""
    call()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        call()
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def measure(call: Call, seconds: float) -> dict[str, float]:
    """GenerateDataKey and Decrypt rates through ``call(operation, params)``."""
    key_id = call("CreateKey", {"Description": "kms_bench"})["KeyMetadata"]["KeyId"]
    generate = {"KeyId": key_id, "KeySpec": "AES_256"}
    blob = call("GenerateDataKey", generate)["CiphertextBlob"]
    decrypt = {"CiphertextBlob": blob}
    return {
        "GenerateDataKey": calls_per_second(lambda: call("GenerateDataKey", generate), seconds),
        "Decrypt": calls_per_second(lambda: call("Decrypt", decrypt), seconds),
    }


def measure_embedded(kms_dir: Path, seconds: float) -> dict[str, float]:
    service = KeyService(KeyStore.open(kms_dir / REGION, REGION))
    caller = Caller.current()
    try:
        return measure(lambda op, params: service.handle(caller, op, params), seconds)
    finally:
        service.close()


@contextlib.contextmanager
def running_daemon(kms_dir: Path, socket_path: Path, log_path: Path) -> Iterator[KMSClient]:
    """``envfs kms serve`` on ``socket_path``, and a client connected to it."""
    command = [sys.executable, "-m", "envfs", "kms", "serve", "--region", REGION]
    command += ["--kms-dir", str(kms_dir), "--socket", str(socket_path)]
    command += ["--uid-call-rate", "off"]  # the service's speed, not its per-uid limit
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        with KMSClient(socket_path, timeout=10.0) as client:
            deadline = time.monotonic() + DAEMON_START_TIMEOUT
            while True:
                if daemon.poll() is not None:
                    raise SystemExit(
                        f"kms_bench: the daemon exited with {daemon.returncode}:\n"
                        + log_path.read_text(errors="replace")
                    )
                try:
                    if socket_path.exists():
                        client.call("ListKeys", {"Limit": 1})
                        break
                except KMSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("kms_bench: the daemon did not start in time")
                time.sleep(0.05)
            yield client
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def run(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="envfs-bench-") as tmp:
        base = Path(tmp)
        kms_dir = base / "kms"
        # The current user's own group may create keys, so the benchmark runs as anyone.
        group = grp.getgrgid(os.getegid()).gr_name
        KeyStore.init(kms_dir / REGION, REGION, key_creators_group=group).close()
        embedded = measure_embedded(kms_dir, seconds)
        with running_daemon(kms_dir, base / "kms.sock", base / "daemon.log") as client:
            daemon = measure(client.call, seconds)
    rounded = {
        mode: {op: round(rate, 1) for op, rate in rates.items()}
        for mode, rates in (("embedded", embedded), ("daemon", daemon))
    }
    return {"seconds": seconds, **rounded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print the key service's GenerateDataKey and Decrypt calls per second,"
        " embedded and through the daemon, measured on a temporary store."
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="length of each measurement (default 3)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    results = run(args.seconds)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'mode':<10}{'operation':<18}{'calls/s':>10}")
    for mode in ("embedded", "daemon"):
        for operation in OPERATIONS:
            print(f"{mode:<10}{operation:<18}{results[mode][operation]:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
