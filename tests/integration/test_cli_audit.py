"""``envfs kms audit`` end to end: verify, repair, archive and verify archives, embedded and
through the daemon, on stores in tmp_path (docs/kms.md §8, §10, §11).

The stores are made with the current user's primary group as key creators group, so the
caller holds the account-level right (reading, archiving, repairing the log) as root or
not; the records come from GenerateRandom, which any caller may call.
"""

from __future__ import annotations

import grp
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.cli import main

ENVFS = Path(sys.executable).parent / "envfs"
REGION = "local-1"


def forged_problem(seq: int) -> str:
    return (
        f"record {seq} follows the audit head (record {seq - 1}) and was not written by this"
        " key service (its MAC does not verify)"
    )


class Store:
    """An embedded store in tmp_path, and how to run ``envfs`` against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "kms" / REGION
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ENVFS_")}
        self.env.pop("CREDENTIALS_DIRECTORY", None)
        self.env.update(
            ENVFS_KMS_DIR=str(root / "kms"),
            ENVFS_KMS_SOCKET=str(root / "none.sock"),
            ENVFS_REGION=REGION,
        )
        group = grp.getgrgid(os.getegid()).gr_name
        self.run("kms", "init", "--key-creators-group", group)

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(ENVFS), *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args: str) -> str:
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def calls(self, n: int) -> None:
        for _ in range(n):
            self.ok("kms", "generate-random", "--number-of-bytes", "8")

    def sql(self, statement: str, *args: object) -> None:
        conn = sqlite3.connect(self.dir / "keys.db", isolation_level=None)
        try:
            conn.execute(statement, args)
        finally:
            conn.close()

    def plant_forged_row(self, seq: int) -> None:
        record = json.dumps({"operation": "Forged", "seq": seq})
        self.sql("INSERT INTO audit VALUES (?, ?, randomblob(32))", seq, record)


@pytest.fixture
def st(tmp_path: Path) -> Store:
    store = Store(tmp_path)
    store.calls(3)
    return store


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a failing command prints (no traceback, no other output)."""
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- issue 9 §4.3: a forged row after the head ---------------------------------------------


def test_a_forged_row_is_named_refused_and_repaired(st: Store) -> None:
    assert st.ok("kms", "audit", "--verify") == "audit log verified: 3 records\n"
    st.plant_forged_row(5)  # the head is record 4, the VerifyAudit
    problem = forged_problem(5)

    verify = st.run("kms", "audit", "--verify")
    assert verify.returncode == 40
    assert error_line(verify) == (
        f"envfs: error: audit log verification failed: {problem}; 'envfs kms audit"
        " --repair --archive FILE', run as the store's owner, moves it aside (until then no"
        " call can be audited)"
    )
    damaged = (
        f"envfs: error: the audit log is damaged: {problem}; no call can be audited,"
        " so none is served until it is repaired: see 'envfs kms audit --verify', then run"
        " 'envfs kms audit --repair --archive FILE' as the store's owner to move the damage"
        " aside"
    )
    for args in (["generate-random", "--number-of-bytes", "8"], ["audit"], ["list-keys"]):
        proc = st.run("kms", *args)
        assert proc.returncode == 35, proc.stderr
        assert error_line(proc) == damaged

    quarantine = st.root / "quarantine.jsonl"
    repaired = st.ok("kms", "audit", "--repair", "--archive", str(quarantine))
    lines = repaired.splitlines()
    assert lines[0] == f"repaired: {problem}"
    moved = rf"moved 1 row to {re.escape(str(quarantine))} \(sha256 [0-9a-f]{{64}}\)"
    assert re.fullmatch(moved, lines[1]), lines[1]
    assert lines[2:] == [
        "the audit head is record 4; record 5 tells of this repair",
        "audit log verified: 5 records",
    ]
    st.calls(1)
    assert st.ok("kms", "audit", "--verify") == "audit log verified: 6 records\n"
    assert st.ok("kms", "audit", "--verify-archive", str(quarantine)) == (
        f"{quarantine}: 1 row moved aside by a repair of the log at record 4: 0 continue the"
        " chain, 1 were not written by this key service or are out of place\n"
    )
    operations = json.loads(st.ok("kms", "audit", "--query", "Records[*].operation"))
    assert operations == [
        *["GenerateRandom"] * 3,
        "VerifyAudit",  # the failed verifications and calls left no record
        "RepairAudit",
        "GenerateRandom",
        "VerifyAudit",
        "VerifyAuditArchives",
    ]


def test_a_repair_of_an_intact_log_says_so(st: Store) -> None:
    out = st.ok("kms", "audit", "--repair", "--archive", str(st.root / "q.jsonl"))
    assert (
        out == "nothing to repair: the audit log can take records\naudit log verified: 4 records\n"
    )
    assert not (st.root / "q.jsonl").exists()


def test_an_altered_record_is_named_and_calls_go_on(st: Store) -> None:
    st.sql("UPDATE audit SET record=replace(record, 'GenerateRandom', 'Decrypt') WHERE seq=2")
    proc = st.run("kms", "audit", "--verify")
    assert proc.returncode == 40
    assert error_line(proc) == "envfs: error: audit log verification failed: record 2 was altered"
    st.calls(1)  # the log still takes records: the damage stays as evidence


@pytest.fixture
def daemon(st: Store) -> Iterator[dict[str, str]]:
    """``envfs kms serve`` on the store; yields the environment of its clients."""
    sock = st.root / "kms.sock"
    env = dict(st.env, ENVFS_KMS_SOCKET=str(sock))
    proc = subprocess.Popen(
        [str(ENVFS), "kms", "serve"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the daemon did not create its socket"
            time.sleep(0.05)
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        assert "Traceback" not in err, err


def test_through_the_daemon(st: Store, daemon: dict[str, str]) -> None:
    st.plant_forged_row(4)
    problem = forged_problem(4)
    verify = st.run("kms", "audit", "--verify", env=daemon)
    assert verify.returncode == 40
    assert error_line(verify).startswith(
        f"envfs: error: audit log verification failed: {problem}; "
    )
    call = st.run("kms", "generate-random", "--number-of-bytes", "8", env=daemon)
    assert call.returncode == 10  # a store error through the daemon (docs/kms.md §11)
    assert error_line(call).startswith(
        f"envfs: error: KMSInternalException: the audit log is damaged: {problem}; "
    )
    # The owner repairs the store beside the running daemon, which then serves again.
    st.ok("kms", "audit", "--repair", "--archive", str(st.root / "q.jsonl"))
    assert st.run("kms", "generate-random", "--number-of-bytes", "8", env=daemon).returncode == 0
    verified = st.run("kms", "audit", "--verify", env=daemon)
    assert verified.stdout == "audit log verified: 5 records\n", verified.stderr


# --- archiving -----------------------------------------------------------------------------


def test_archive_prune_verify_and_chain(st: Store) -> None:
    first, second = st.root / "first.jsonl", st.root / "second.jsonl"
    out = st.ok("kms", "audit", "--archive", str(first), "--keep", "1")
    lines = out.splitlines()
    assert lines[0] == f"archived records 1 to 2 (2 records) to {first}"
    assert re.fullmatch(r"sha256 [0-9a-f]{64}", lines[1])
    assert lines[2] == "the log now holds records 3 to 4, from the checkpoint at record 2"
    assert (first.stat().st_mode & 0o777) == 0o600
    assert st.ok("kms", "audit", "--verify") == (
        "audit log verified: 2 records (3 to 4; records up to 2 are archived)\n"
    )
    assert st.ok("kms", "audit", "--archive", str(second), "--before", "2000-01-01") == (
        "nothing to archive: the log holds records 3 to 6\n"
    )
    st.ok("kms", "audit", "--archive", str(second), "--before", str(time.time() + 3600))
    assert st.ok("kms", "audit", "--verify-archive", str(second), str(first)) == (
        f"{second}: records 3 to 6 (4 records) verify\n"
        f"{first}: records 1 to 2 (2 records) verify\n"
        "the log goes on from record 7\n"
    )
    records = json.loads(st.ok("kms", "audit"))["Records"]
    assert [r["seq"] for r in records] == [7, 8]
    assert records[0]["archive"]["file"] == str(second)

    text = first.read_text().replace("GenerateRandom", "GenerateRandoM", 1)
    tampered = st.root / "tampered.jsonl"
    tampered.write_text(text)
    proc = st.run("kms", "audit", "--verify-archive", str(tampered))
    assert proc.returncode == 40
    assert proc.stdout == f"{tampered}: record 1 was altered\n"
    assert proc.stderr == (
        f"envfs: error: audit archive verification failed: {tampered}: record 1 was altered\n"
    )
    refused = st.run("kms", "audit", "--archive", str(first), "--keep", "0")
    assert refused.returncode == 2
    assert "is not an unfinished archive of this audit log" in error_line(refused)


USAGE = [
    (["--before", "2025-01-01"], "argument --before: needs --archive FILE"),
    (["--keep", "3"], "argument --keep: needs --archive FILE"),
    (["--archive", "a.jsonl"], "argument --archive: needs one of --before TIME and --keep N"),
    (
        ["--archive", "a.jsonl", "--keep", "1", "--before", "2025-01-01"],
        "argument --archive: needs one of --before TIME and --keep N",
    ),
    (["--archive", "a.jsonl", "--keep", "-1"], "argument --keep: expected a whole number"),
    (["--repair"], r"argument --repair: needs --archive FILE \(where moved rows go\)"),
    (["--repair", "--archive", "q", "--keep", "1"], "argument --repair: not allowed with --keep"),
    (["--verify", "--archive", "a.jsonl"], "argument --verify: not allowed with --archive"),
    (["--verify", "--since", "0"], "argument --verify: not allowed with --since$"),
    (["--verify-archive", "a", "--key-id", "k"], "argument --verify-archive: not allowed with"),
    (["--archive", "a.jsonl", "--keep", "1", "--key-id", "k"], "argument --archive: not allowed"),
]


@pytest.mark.parametrize(("args", "pattern"), USAGE)
def test_usage_errors(
    tmp_path: Path,
    args: list[str],
    pattern: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENVFS_KMS_DIR", str(tmp_path))  # refused before anything is opened
    assert main(["kms", "audit", *args]) == 2
    err = capsys.readouterr().err
    assert re.match(rf"^envfs: error: {pattern}", err), err
    assert list(tmp_path.iterdir()) == []


def test_help_explains_retention_and_repair(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kms", "audit", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in (
        "--archive FILE",
        "--before TIME",
        "--keep N",
        "--repair",
        "--verify-archive FILE [FILE ...]",
        "signed checkpoint",
        "never through the daemon",
        "exit 40",
        "envfs kms audit --repair --archive audit-quarantine.jsonl",
    ):
        assert text in out, text
