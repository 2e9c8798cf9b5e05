"""``envfs kms serve`` under abuse, over a real store: denied calls are cheap, throttled, seen.

A spammer (uid 65534, a raw socket client: the store is out of its reach) sends denied
PutKeyPolicy calls and denied Encrypt calls with 8 KiB encryption contexts as fast as the
daemon answers, while root uses its key. Root's calls must all succeed; the spammer must
be throttled once over its rate of failed calls; every denied call must leave a record of
at most 4 KiB; the throttled ones must show in the audit log as summary records.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.kms.client import KMSClient
from envfs.kms.core import FAILED_RECORD_CHARS
from envfs.kms.store import DB_NAME
from tests.integration import test_mount_daemon
from tests.integration.conftest import Env, make_env
from tests.integration.flood import as_uid, python_for
from tests.integration.test_mount_daemon import Daemon

pytestmark = pytest.mark.integration

NOBODY = 65534
short_dir = test_mount_daemon.short_dir

# Sends COUNT requests on one connection, alternating a PutKeyPolicy and an Encrypt with an
# 8 KiB context, each answered before the next; prints the answers' outcomes as JSON.
SPAM = r"""
import json, socket, struct, sys
path, key, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
statement = {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}
policy = json.dumps({"Statement": [statement]})
context = {"k%02d" % n: "v" * 500 for n in range(16)}
requests = [
    {"op": "PutKeyPolicy", "params": {"KeyId": key, "Policy": policy}},
    {"op": "Encrypt", "params": {"KeyId": key, "Plaintext": {"$b": "eA=="},
                                 "EncryptionContext": context}},
]
frames = []
for request in requests:
    body = json.dumps({"v": 1, **request}).encode()
    frames.append(struct.pack(">I", len(body)) + body)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
answers = s.makefile("rb")
outcomes = {}
for n in range(count):
    s.sendall(frames[n % 2])
    (length,) = struct.unpack(">I", answers.read(4))
    answer = json.loads(answers.read(length))
    kind = answer["error"]["type"] if "error" in answer else "ok"
    outcomes[kind] = outcomes.get(kind, 0) + 1
print(json.dumps(outcomes))
"""


@pytest.fixture
def kms(short_dir: Path) -> Iterator[tuple[Env, Daemon, str]]:
    """A store, its daemon (default limits) and a key that only root may use."""
    env = make_env(short_dir)
    sock = short_dir / "kms.sock"
    env.env["ENVFS_KMS_SOCKET"] = str(sock)
    daemon = Daemon(env, sock)
    daemon.start()
    try:
        key = env.kms("create-key", "--description", "root's")
        yield env, daemon, str(key["KeyMetadata"]["KeyId"])  # type: ignore[index]
    finally:
        daemon.stop()


def stored_records(env: Env) -> list[str]:
    db = Path(env.env["ENVFS_KMS_DIR"]) / "local-1" / DB_NAME
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT record FROM audit ORDER BY seq")]


def test_a_spam_of_denied_calls_is_throttled_and_others_are_served(
    kms: tuple[Env, Daemon, str],
) -> None:
    env, daemon, key = kms
    spam_calls = 600
    command = [*as_uid(NOBODY), python_for(NOBODY), "-I", "-c", SPAM, str(daemon.sock), key]
    served: list[bytes] = []
    errors: list[BaseException] = []

    def root_uses_its_key() -> None:
        try:
            with KMSClient(daemon.sock) as client:
                for _ in range(50):
                    out = client.call("GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"})
                    served.append(out["CiphertextBlob"])
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    spammer = subprocess.Popen([*command, str(spam_calls)], stdout=subprocess.PIPE, text=True)
    try:
        root = threading.Thread(target=root_uses_its_key)
        root.start()
        root.join(60)
        out, _ = spammer.communicate(timeout=60)
    finally:
        if spammer.poll() is None:
            spammer.kill()
            spammer.wait()
    elapsed = time.monotonic() - started
    daemon.stop()  # the last summary of refused calls is written as the daemon stops

    assert not errors and len(served) == 50  # every one of root's calls was served
    assert spammer.returncode == 0
    outcomes: dict[str, int] = json.loads(out)
    denied, throttled = outcomes["AccessDeniedException"], outcomes["ThrottlingException"]
    assert denied + throttled == spam_calls
    # Failed calls: 10 a second with bursts of 100 (the defaults), then throttled.
    assert 100 <= denied <= 100 + 10 * elapsed + 1
    assert throttled > 0

    records = [json.loads(text) for text in stored_records(env)]
    spam_records = [r for r in records if r["caller"]["uid"] == NOBODY]
    assert sum(r["outcome"] == "AccessDeniedException" for r in spam_records) == denied
    summaries = [r for r in spam_records if r["operation"] == "ThrottleSummary"]
    assert sum(r["throttled"]["calls"] for r in summaries) == throttled
    assert all(r["outcome"] == "ThrottlingException" for r in summaries)
    spam_texts = [t for t in stored_records(env) if json.loads(t)["caller"]["uid"] == NOBODY]
    assert max(map(len, spam_texts)) <= FAILED_RECORD_CHARS  # not the 8.6 KB of a context
    encrypts = [r for r in spam_records if r["operation"] == "Encrypt"]
    assert encrypts and all("encryption_context" in r["omitted"] for r in encrypts)
    assert env.run("kms", "audit", "--verify", "--embedded").stdout.startswith(
        "audit log verified:"
    )


def test_the_command_line_exits_29_when_throttled(short_dir: Path) -> None:
    env = make_env(short_dir)
    sock = short_dir / "kms.sock"
    env.env["ENVFS_KMS_SOCKET"] = str(sock)
    daemon = Daemon(env, sock, "--uid-call-rate", "0.001:1")
    daemon.start()
    try:
        assert env.kms("generate-random", "--number-of-bytes", "8")
        refused = env.run("kms", "generate-random", "--number-of-bytes", "8", check=False)
    finally:
        daemon.stop()
    assert refused.returncode == 29
    assert refused.stderr == (
        f"envfs: error: ThrottlingException: too many calls from uid {os.geteuid()} (at most"
        " 0.001 a second, 1 at once); reduce the frequency of your calls\n"
    )
    assert refused.stdout == ""
    summary = [
        r
        for r in json.loads(env.run("kms", "audit", "--embedded").stdout)["Records"]
        if r["operation"] == "ThrottleSummary"
    ]
    assert [(r["caller"]["uid"], r["throttled"]["calls"]) for r in summary] == [(os.geteuid(), 1)]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--uid-call-rate", "fast", "'fast' is not RATE[:BURST]"),
        ("--uid-failure-rate", "10:0", "'10:0' is not RATE[:BURST]"),
        ("--uid-connection-rate", "-5", "'-5' is not RATE[:BURST]"),
        ("--max-connections-per-uid", "0", "'0' is not a whole number of at least 1"),
        ("--idle-timeout", "never", "'never' is not a number of seconds above 0"),
    ],
)
def test_serve_refuses_bad_limits(kms_env: Env, flag: str, value: str, message: str) -> None:
    result = kms_env.run("kms", "serve", flag, value, check=False)
    assert result.returncode == 2
    assert f"argument {flag}: {message}" in result.stderr
    assert "Traceback" not in result.stderr
