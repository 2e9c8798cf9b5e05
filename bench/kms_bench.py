"""Key-service throughput: GenerateDataKey and Decrypt calls per second.

Measured on a temporary key store, four ways: embedded (a ``KeyService`` in this process),
through the daemon (``envfs kms serve`` on a temporary socket, called with ``KMSClient``),
and through the same daemon's HTTP endpoint on loopback (``--listen-http``, AWS's protocol
signed with an access key), called with envfs's own client (``HTTPKMSClient``, as
``envfs kms --endpoint-url``) and with boto3 (as the mount's provider for a remote envfs
key service, and aws-cli).
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
from envfs.kms.httpclient import Credentials, Endpoint, HTTPKMSClient
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

REGION = "bench-1"
OPERATIONS = ("GenerateDataKey", "Decrypt")
MODES = ("embedded", "daemon", "http", "http-boto3")
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
    """``envfs kms serve`` on ``socket_path`` (and HTTP on loopback), and a client connected
    to the socket."""
    command = [sys.executable, "-m", "envfs", "kms", "serve", "--region", REGION]
    command += ["--kms-dir", str(kms_dir), "--socket", str(socket_path)]
    command += ["--uid-call-rate", "off"]  # the service's speed, not its per-uid limit
    command += ["--listen-http", "127.0.0.1:0"]
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


def http_url(log_path: Path) -> str:
    """The HTTP endpoint's URL, from the daemon's log."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "HTTP endpoint listening on " in line:
            return line.rsplit(" ", 1)[1]
    raise SystemExit("kms_bench: the daemon did not say where its HTTP endpoint listens")


def boto3_call(url: str, key: dict[str, str]) -> Call:
    import boto3
    import botocore.config

    session = boto3.session.Session(
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
        region_name=REGION,
    )
    kms = session.client(
        "kms", endpoint_url=url, config=botocore.config.Config(retries={"max_attempts": 1})
    )

    def call(operation: str, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = getattr(kms, botocore.xform_name(operation))(**params)
        return out

    return call


def run(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="envfs-bench-") as tmp:
        base = Path(tmp)
        kms_dir = base / "kms"
        # The current user's own group may create keys, so the benchmark runs as anyone.
        group = grp.getgrgid(os.getegid()).gr_name
        KeyStore.init(kms_dir / REGION, REGION, key_creators_group=group).close()
        embedded = measure_embedded(kms_dir, seconds)
        service = KeyService(KeyStore.open(kms_dir / REGION, REGION))
        try:
            key = service.handle(Caller.current(), "CreateAccessKey", {})["AccessKey"]
        finally:
            service.close()
        log_path = base / "daemon.log"
        with running_daemon(kms_dir, base / "kms.sock", log_path) as client:
            daemon = measure(client.call, seconds)
            url = http_url(log_path)
            credentials = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
            http = HTTPKMSClient(Endpoint.parse(url), credentials, REGION)
            over_http = measure(http.call, seconds)
            over_boto3 = measure(boto3_call(url, key), seconds)
    measured = (embedded, daemon, over_http, over_boto3)
    rounded = {
        mode: {op: round(rate, 1) for op, rate in rates.items()}
        for mode, rates in zip(MODES, measured, strict=True)
    }
    return {"seconds": seconds, **rounded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print the key service's GenerateDataKey and Decrypt calls per second,"
        " embedded, through the daemon's socket and through its HTTP endpoint (envfs's"
        " client and boto3), measured on a temporary store."
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
    print(f"{'mode':<12}{'operation':<18}{'calls/s':>10}")
    for mode in MODES:
        for operation in OPERATIONS:
            print(f"{mode:<12}{operation:<18}{results[mode][operation]:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
