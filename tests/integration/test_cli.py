"""The ``envfs`` command line, end to end: real processes on an embedded store in tmp_path.

Most tests run the installed ``envfs`` executable (the one beside ``sys.executable``) with
``ENVFS_KMS_DIR`` pointing into tmp_path and ``ENVFS_KMS_SOCKET`` at a path that does not
exist, so no system store or daemon is ever touched. Parsing and formatting details are
checked in-process through ``envfs.cli.main`` and the ``output``/``params`` helpers.
Creating keys needs root (or the key creators group): those tests run as root in CI.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

from envfs.cli import build_parser, main
from envfs.cli.params import (
    ArgumentError,
    build_request,
    decode_base64,
    parse_blob,
    parse_context,
    parse_string_list,
    parse_tags,
)
from envfs.kms.operations import OPERATIONS

BIN = Path(sys.executable).parent
ENVFS = BIN / "envfs"
REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "kms-walkthrough.sh"
VERBS = [
    op.verb for op in OPERATIONS.values() if op.name not in ("ListAuditRecords", "VerifyAudit")
]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating keys needs root")


def cli_env(kms_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVFS_")}
    env["ENVFS_KMS_DIR"] = str(kms_dir)
    env["ENVFS_KMS_SOCKET"] = str(kms_dir / "none.sock")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def envfs(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(ENVFS), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def cli(env: dict[str, str], *args: str) -> Result:
    """``envfs ARGS`` in this process (``main`` is what the console script runs): fast."""
    out, err = StringIO(), StringIO()
    with environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return Result(code, out.getvalue(), err.getvalue())


def ok(env: dict[str, str], *args: str) -> str:
    result = cli(env, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def shell(env: dict[str, str], script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


class Store:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = cli_env(directory)
        ok(self.env, "kms", "init")

    def new_key(self, *args: str) -> str:
        out = ok(self.env, "kms", "create-key", *args, "--query", "KeyMetadata.KeyId")
        key_id = json.loads(out)
        assert isinstance(key_id, str)
        return key_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    if os.geteuid() != 0:
        pytest.skip("creating keys needs root")
    st = Store(tmp_path_factory.mktemp("kms"))
    key_id = st.new_key("--description", "cli tests")
    ok(st.env, "kms", "create-alias", "--alias-name", "alias/test", "--target-key-id", key_id)
    return st


# --- the aws-cli pipelines ----------------------------------------------------------------


@needs_root
def test_encrypt_pipeline_and_decrypt_back(store: Store, tmp_path: Path) -> None:
    plain = tmp_path / "myfile.txt"
    plain.write_bytes(b"Some text\n\x00\xff binary too")
    proc = shell(
        store.env,
        "envfs kms encrypt --key-id alias/test --plaintext fileb://myfile.txt"
        " --output text --query CiphertextBlob | base64 -d > myfile.txt.enc\n"
        "envfs kms decrypt --ciphertext-blob fileb://myfile.txt.enc"
        " --output text --query Plaintext | base64 -d > myfile.txt.dec",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    blob = (tmp_path / "myfile.txt.enc").read_bytes()
    assert plain.read_bytes() not in blob
    assert (tmp_path / "myfile.txt.dec").read_bytes() == plain.read_bytes()

    # JSON output carries the same bytes as base64; a plain blob value is read as base64.
    answer = json.loads(
        ok(store.env, "kms", "decrypt", "--ciphertext-blob", base64.b64encode(blob).decode())
    )
    assert base64.b64decode(answer["Plaintext"]) == plain.read_bytes()
    assert answer["KeyId"].startswith("arn:envfs:kms:local-1:")


@needs_root
def test_encryption_context_forms(store: Store, tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"hello")
    (tmp_path / "ctx.json").write_text('{"b": "2", "a": "1"}')
    blob = ok(
        store.env,
        *("kms", "encrypt", "--key-id", "alias/test", "--plaintext", f"fileb://{tmp_path}/p"),
        *("--encryption-context", "a=1,b=2", "--output", "text", "--query", "CiphertextBlob"),
    ).strip()
    forms = (["a=1,b=2"], ["b=2", "a=1"], ['{"a": "1", "b": "2"}'], [f"file://{tmp_path}/ctx.json"])
    for form in forms:
        out = ok(
            store.env,
            *("kms", "decrypt", "--ciphertext-blob", blob, "--encryption-context", *form),
            *("--output", "text", "--query", "Plaintext"),
        )
        assert base64.b64decode(out) == b"hello", form
    for wrong in (["a=1"], ["a=1,b=3"], []):
        args = ["--encryption-context", *wrong] if wrong else []
        result = cli(store.env, "kms", "decrypt", "--ciphertext-blob", blob, *args)
        assert result.returncode == 15, (wrong, result.stderr)
        assert result.stderr.startswith("envfs: error: InvalidCiphertextException: ")


@needs_root
def test_tags_forms(store: Store) -> None:
    key_id = store.new_key("--tags", "TagKey=a,TagValue=1", "TagKey=b,TagValue=")
    tags_json = '[{"TagKey": "c", "TagValue": "x,y=z"}]'
    ok(store.env, "kms", "tag-resource", "--key-id", key_id, "--tags", tags_json)
    listed = json.loads(ok(store.env, "kms", "list-resource-tags", "--key-id", key_id))
    assert sorted((t["TagKey"], t["TagValue"]) for t in listed["Tags"]) == [
        ("a", "1"),
        ("b", ""),
        ("c", "x,y=z"),
    ]
    ok(store.env, "kms", "untag-resource", "--key-id", key_id, "--tag-keys", "a", "b,c")
    listed = json.loads(ok(store.env, "kms", "list-resource-tags", "--key-id", key_id))
    assert listed["Tags"] == []


@needs_root
def test_query_and_text_output(store: Store) -> None:
    assert ok(store.env, "kms", "list-aliases", "--query", "Aliases[*].AliasName") == (
        '[\n    "alias/test"\n]\n'
    )
    text = ok(
        store.env, "kms", "list-aliases", "--query", "Aliases[*].AliasName", "--output", "text"
    )
    assert text == "alias/test\n"
    pair = json.loads(
        ok(
            store.env,
            "kms",
            "describe-key",
            "--key-id",
            "alias/test",
            "--query",
            "[KeyMetadata.KeyState, KeyMetadata.Enabled, KeyMetadata.Missing]",
        )
    )
    assert pair == ["Enabled", True, None]
    described = json.loads(ok(store.env, "kms", "describe-key", "--key-id", "alias/test"))
    created = described["KeyMetadata"]["CreationDate"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$", created)
    rows = ok(store.env, "kms", "describe-key", "--key-id", "alias/test", "--output", "text")
    first, second = rows.splitlines()[:2]
    assert first.startswith("KEYMETADATA\t") and "\tEnabled\t" in first
    assert second == "ENCRYPTIONALGORITHMS\tSYMMETRIC_DEFAULT"
    # An operation with an empty answer prints nothing.
    assert ok(store.env, "kms", "enable-key", "--key-id", "alias/test") == ""


# --- errors -------------------------------------------------------------------------------


ERROR_CASES = [
    (["kms", "describe-key", "--key-id", "alias/nope"], 11, r"NotFoundException: "),
    (["kms", "generate-random", "--number-of-bytes", "5000"], 18, r"ValidationException: "),
    (["kms", "decrypt", "--ciphertext-blob", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"], 15, r"Invalid"),
    (["kms", "encrypt", "--key-id", "alias/test", "--plaintext", "#!"], 2, r"argument --plai"),
    (["kms", "encrypt", "--key-id", "alias/test"], 2, r"the following arguments are req"),
    (["kms", "encrypt", "--key-id", "k", "--plaintext", "fileb://nope"], 2, r"cannot read 'n"),
    (["kms", "create-key", "--tags", "Key=a,Value=b"], 2, r"argument --tags: expected Tag"),
    (["kms", "create-key", "--tags", "[1]"], 2, r"argument --tags: expected"),
    (["kms", "list-keys", "--limit", "ten"], 2, r"argument --limit: expected an integer"),
    (["kms", "list-keys", "--query", "Keys[?x"], 2, r"argument --query: the expression 'K"),
    (["kms", "list-keys", "--output", "text", "--query", "length(`1`)"], 2, r"--query: func"),
    (["kms", "list-keys", "--output", "yaml"], 2, r"argument --output: invalid choice"),
    (["kms", "list-keys", "--region", "Bad_Region"], 2, r"argument --region: region 'Bad_R"),
    (["kms", "list-keys", "--frobnicate"], 2, r"unrecognized arguments: --frobnicate"),
    (["kms", "frobnicate"], 2, r"argument VERB: invalid choice: 'frobnicate'$"),
    (["kms"], 2, r"the following arguments are required: VERB"),
    ([], 2, r"the following arguments are required: COMMAND"),
    (
        ["kms", "encrypt", "--key-id", "k", "--plaintext", "aGk=", "--encryption-context", "x"],
        2,
        "KEY=",
    ),
    (["kms", "audit", "--verify", "--key-id", "alias/test"], 2, r"argument --verify: not allowed"),
    (["kms", "list-keys", "--region", "eu-west-9"], 32, r"no key store for region 'eu-west-9'"),
]


def check_error(code: int, pattern: str, returncode: int, stdout: str, stderr: str) -> None:
    assert returncode == code, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    first, *rest = stderr.splitlines()
    assert re.search(r"^envfs: error: .*" + pattern, first), first
    for line in rest:
        assert line.startswith("envfs: hint: "), stderr


@needs_root
@pytest.mark.parametrize(("args", "code", "pattern"), ERROR_CASES)
def test_error_paths(store: Store, args: list[str], code: int, pattern: str) -> None:
    result = cli(store.env, *args)
    check_error(code, pattern, result.returncode, result.stdout, result.stderr)


@needs_root
@pytest.mark.parametrize(("args", "code", "pattern"), [ERROR_CASES[i] for i in (0, 3, 12, 18)])
def test_error_paths_of_the_executable(
    store: Store, args: list[str], code: int, pattern: str
) -> None:
    proc = envfs(store.env, *args)
    check_error(code, pattern, proc.returncode, proc.stdout, proc.stderr)


def test_errors_reach_the_journal_as_errors(tmp_path: Path) -> None:
    """Issue 10: under systemd the error line went to the journal at priority 6 (info), so
    ``journalctl -p warning`` hid why a unit failed. With stderr the journal (as
    ``$JOURNAL_STREAM`` names it) error lines start ``<3>`` and hints ``<5>``; elsewhere
    they carry no prefix."""
    env = cli_env(tmp_path / "kms")
    command = [str(ENVFS), "kms", "encrypt", "--key-id", "alias/x", "--plaintext", "a b"]
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    try:
        journal_env = dict(env, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.run(command, env=journal_env, stderr=write_end, check=False)
        os.close(write_end)
        with os.fdopen(read_end) as journal:
            lines = journal.read().splitlines()
    finally:
        for fd in (read_end, write_end):
            with contextlib.suppress(OSError):
                os.close(fd)
    assert proc.returncode == 2
    assert lines[0].startswith("<3>envfs: error: "), lines
    assert lines[1:] and all(line.startswith("<5>envfs: hint: ") for line in lines[1:]), lines
    # Not the journal: a pipe that $JOURNAL_STREAM does not name.
    elsewhere = subprocess.run(
        command, env=dict(env, JOURNAL_STREAM="1:2"), capture_output=True, text=True, check=False
    )
    assert elsewhere.stderr.startswith("envfs: error: "), elsewhere.stderr


PLAIN_HINT = (
    "envfs: hint: a plain value is read as base64; use fileb://PATH to pass a file's raw bytes\n"
)
ALPHABET = "outside the standard base64 alphabet (A-Z, a-z, 0-9, +, /, and = to pad)"
BAD_BLOBS = [
    # (verb, flag, value, what the error says after "is not valid base64: ")
    ("encrypt", "--plaintext", "Some text", "character 5 is a space, which base64 does not use"),
    ("encrypt", "--plaintext", "secret!", f"character 7 is {ALPHABET}"),
    ("encrypt", "--plaintext", "two\tparts=", "character 4 is a tab, which base64 does not use"),
    ("encrypt", "--plaintext", "ab-_", f"character 3 is {ALPHABET}"),
    (
        "encrypt",
        "--plaintext",
        "aGl=",
        "its last character has bits set that an encoder leaves zero",
    ),
    (
        "decrypt",
        "--ciphertext-blob",
        "aGk",
        "it has 3 characters (line breaks aside), not a multiple of 4",
    ),
    ("decrypt", "--ciphertext-blob", "aGk=aGk=", "'=' pads only the end, once or twice"),
    (
        "re-encrypt",
        "--ciphertext-blob",
        "aG===",
        "it has 5 characters (line breaks aside), not a multiple of 4",
    ),
    ("re-encrypt", "--ciphertext-blob", "a===", "'=' pads only the end, once or twice"),
]


@pytest.mark.parametrize(("verb", "flag", "value", "problem"), BAD_BLOBS)
def test_a_blob_value_that_is_not_base64_is_refused(
    tmp_path: Path, verb: str, flag: str, value: str, problem: str
) -> None:
    """Issue 9: ``--plaintext 'Some text'`` encrypted 6 bytes of garbage and exited 0.

    Refused before any store is opened (there is none here: opening one would exit 32),
    with the flag named and the value never echoed.
    """
    extra = ["--destination-key-id", "k"] if verb == "re-encrypt" else ["--key-id", "k"]
    proc = cli(cli_env(tmp_path), "kms", verb, *extra, flag, value)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        f"envfs: error: argument {flag}: the value is not valid base64: {problem}\n{PLAIN_HINT}"
    )
    assert value not in proc.stderr


def test_a_blob_file_that_is_not_base64_is_refused(tmp_path: Path) -> None:
    (tmp_path / "text.txt").write_text("Some text\n")
    (tmp_path / "binary.enc").write_bytes(b"\x01\xff\xfe")
    env = cli_env(tmp_path)
    proc = cli(env, "kms", "decrypt", "--ciphertext-blob", f"file://{tmp_path}/text.txt")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        f"envfs: error: argument --ciphertext-blob: '{tmp_path}/text.txt' is not valid base64:"
        " character 5 is a space, which base64 does not use\n"
        "envfs: hint: file:// reads base64 text; use fileb://PATH to pass a file's raw bytes\n"
    )
    assert "Some text" not in proc.stderr
    proc = cli(env, "kms", "decrypt", "--ciphertext-blob", f"file://{tmp_path}/binary.enc")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        f"envfs: error: argument --ciphertext-blob: '{tmp_path}/binary.enc' is not UTF-8 text\n"
        "envfs: hint: use fileb://PATH for binary data\n"
    )


@needs_root
def test_refused_plaintext_reaches_no_key(store: Store) -> None:
    """The issue's own command: refused on a real key, and nothing is encrypted or audited."""
    before = json.loads(ok(store.env, "kms", "audit", "--query", "length(Records)"))
    proc = envfs(store.env, "kms", "encrypt", "--key-id", "alias/test", "--plaintext", "Some text")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("envfs: error: argument --plaintext: the value is not valid")
    since = json.loads(ok(store.env, "kms", "audit", "--query", f"Records[{before}:].operation"))
    assert since and set(since) == {"ListAuditRecords"}  # the audit listings, no Encrypt


@needs_root
def test_wrapped_base64_from_the_shell_round_trips(store: Store, tmp_path: Path) -> None:
    """``$(base64 FILE)`` wraps at 76 columns: line breaks are part of valid base64 input."""
    data = bytes(range(256)) * 2
    (tmp_path / "data").write_bytes(data)
    proc = shell(
        store.env,
        'envfs kms encrypt --key-id alias/test --plaintext "$(base64 data)"'
        " --output text --query CiphertextBlob > blob.b64\n"
        "envfs kms decrypt --ciphertext-blob file://blob.b64 --output text --query Plaintext"
        " | base64 -d > back",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "\n"
        in subprocess.run(
            ["base64", "data"], cwd=tmp_path, capture_output=True, text=True
        ).stdout.strip()
    )
    assert (tmp_path / "back").read_bytes() == data


@needs_root
def test_key_state_errors(store: Store) -> None:
    key_id = store.new_key()
    ok(store.env, "kms", "disable-key", "--key-id", key_id)
    proc = cli(store.env, "kms", "encrypt", "--key-id", key_id, "--plaintext", "aGk=")
    assert proc.returncode == 13
    assert proc.stderr.startswith("envfs: error: DisabledException: ")
    ok(
        store.env,
        "kms",
        "schedule-key-deletion",
        "--key-id",
        key_id,
        "--pending-window-in-days",
        "7",
    )
    proc = cli(store.env, "kms", "enable-key", "--key-id", key_id)
    assert proc.returncode == 14
    assert proc.stderr.startswith("envfs: error: KMSInvalidStateException: ")


def test_missing_store_and_unreachable_daemon(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    proc = cli(env, "kms", "list-keys")
    assert proc.returncode == 32
    assert proc.stderr.startswith("envfs: error: no key store for region 'local-1' at ")
    # A socket file nobody listens on: the CLI uses it (no --embedded) and cannot connect.
    import socket

    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    proc = cli(env, "kms", "list-keys", "--socket", str(path))
    assert proc.returncode == 27
    assert proc.stderr.startswith("envfs: error: KMSUnavailableException: ")
    assert "--embedded" in proc.stderr
    proc = cli(env, "kms", "list-keys", "--socket", str(path), "--embedded")
    assert proc.returncode == 32


def test_passphrase_store(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    (tmp_path / "pass").write_text("correct horse\n")
    (tmp_path / "wrong").write_text("battery staple\n")
    ok(env, "kms", "init", "--passphrase-file", str(tmp_path / "pass"))
    assert not (tmp_path / "local-1" / "root.key").exists()
    proc = subprocess.run(
        [str(ENVFS), "kms", "list-keys"], env=env, stdin=subprocess.DEVNULL, capture_output=True
    )
    assert proc.returncode == 33
    assert b"passphrase" in proc.stderr
    proc = cli(env, "kms", "list-keys", "--passphrase-file", str(tmp_path / "wrong"))
    assert proc.returncode == 33
    env["ENVFS_KMS_PASSPHRASE_FILE"] = str(tmp_path / "pass")
    assert json.loads(ok(env, "kms", "list-keys"))["Keys"] == []


def test_init_output_and_refusal(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    out = ok(env, "kms", "init", "--region", "eu-west-1", "--key-creators-group", "kmsadm")
    store_dir = tmp_path / "eu-west-1"
    assert f"in {store_dir}\n" in out
    assert str(store_dir / "root.key") in out
    assert "secret" in out and "back it up" in out
    assert "'kmsadm'" in out
    key_text = (store_dir / "root.key").read_text().strip()
    assert key_text not in out
    assert (store_dir / "root.key").stat().st_mode & 0o777 == 0o600
    proc = cli(env, "kms", "init", "--region", "eu-west-1")
    assert proc.returncode == 30
    assert proc.stderr.startswith("envfs: error: a key store already exists")


@needs_root
def test_audit_lists_and_verifies(tmp_path: Path) -> None:
    st = Store(tmp_path)
    key_id = st.new_key("--description", "audited")
    # Root created the key without --key-administrators/--key-users: it is both.
    ok(st.env, "kms", "encrypt", "--key-id", key_id, "--plaintext", "aGk=")
    ok(st.env, "kms", "describe-key", "--key-id", key_id)
    records = json.loads(ok(st.env, "kms", "audit", "--key-id", key_id))["Records"]
    assert [r["operation"] for r in records] == ["CreateKey", "Encrypt", "DescribeKey"]
    assert all(r["time"].endswith("+00:00") for r in records)
    operations = ok(
        st.env, "kms", "audit", "--output", "text", "--query", "Records[*].operation"
    ).split()
    assert operations[:2] == ["CreateKey", "Encrypt"]
    assert re.match(r"^audit log verified: \d+ records\n$", ok(st.env, "kms", "audit", "--verify"))
    # Given an output format, --verify prints the VerifyAudit answer.
    verified = json.loads(ok(st.env, "kms", "audit", "--verify", "--output", "json"))
    assert verified["Valid"] is True and verified["Records"] >= 3
    assert (
        ok(st.env, "kms", "audit", "--verify", "--output", "text", "--query", "Valid") == "True\n"
    )

    db = sqlite3.connect(tmp_path / "local-1" / "keys.db")
    with db:
        db.execute("UPDATE audit SET record = replace(record, 'Encrypt', 'Decrypt')")
    db.close()
    for output in ([], ["--output", "json"]):
        proc = cli(st.env, "kms", "audit", "--verify", *output)
        assert (proc.returncode, proc.stdout) == (40, "")
        assert proc.stderr.startswith("envfs: error: audit log verification failed: ")


# --- the daemon ---------------------------------------------------------------------------


@needs_root
def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    st = Store(tmp_path)
    sock = tmp_path / "kms.sock"
    env = dict(st.env, ENVFS_KMS_SOCKET=str(sock))
    daemon = subprocess.Popen(
        [str(ENVFS), "kms", "serve"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            assert time.monotonic() < deadline, "the daemon did not create its socket"
            time.sleep(0.05)
        # Through the daemon (its socket exists): the client's --kms-dir has no store, so an
        # embedded call would fail.
        via_daemon = dict(env, ENVFS_KMS_DIR=str(tmp_path / "elsewhere"))
        key_id = json.loads(ok(via_daemon, "kms", "create-key", "--query", "KeyMetadata.KeyId"))
        listed = envfs(via_daemon, "kms", "list-keys", "--query", "Keys[*].KeyId")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == [key_id]
        assert cli(via_daemon, "kms", "list-keys", "--embedded").returncode == 32
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert daemon.returncode == 0, err
    assert "Traceback" not in err
    assert "INFO" in err and "SIGTERM" in err
    assert not sock.exists()
    records = json.loads(ok(st.env, "kms", "audit", "--query", "Records[*].operation"))
    assert records[:2] == ["CreateKey", "ListKeys"]


# --- help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", [*VERBS, "init", "serve", "audit"])
def test_help_for_every_verb(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kms", verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: envfs kms {verb} ")
    for flag in ("--region", "--kms-dir"):
        assert flag in out
    op = next((o for o in OPERATIONS.values() if o.verb == verb), None)
    if op is not None:
        assert op.help.lower() in out.lower()
        for param in op.params:
            assert param.flag in out
        assert "--output {json,text,table}" in out
        for flag in ("--output", "--query", "--socket", "--embedded"):
            assert flag in out


def test_inspect_output_options() -> None:
    """``envfs inspect`` takes the same --output and --query as the kms verbs."""
    golden = str(REPO / "tests" / "golden" / "volume-v1" / "backing" / "one-block.bin")
    env = cli_env(Path("/nonexistent"))  # inspect needs no key store
    query = "[BlockSize, PlaintextSize]"
    assert ok(env, "inspect", golden, "--output", "text", "--query", query) == "16384\t16384\n"
    query = "{BlockSize: BlockSize, PlaintextSize: PlaintextSize}"
    assert ok(env, "inspect", golden, "--output", "table", "--query", query) == (
        "--------------------------------\n"
        "|            Inspect           |\n"
        "+------------+-----------------+\n"
        "|  BlockSize |  PlaintextSize  |\n"
        "+------------+-----------------+\n"
        "|  16384     |  16384          |\n"
        "+------------+-----------------+\n"
    )
    result = cli(env, "inspect", golden, "--query", "KeyArn[")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "envfs: error: argument --query: the expression 'KeyArn[' is incomplete\n"
        "envfs: hint: see 'envfs inspect --help'\n"
    )


def test_help_of_the_commands() -> None:
    for args in ([], ["kms"]):
        proc = envfs(cli_env(Path("/nonexistent")), *args, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith("usage: envfs")
    assert "encrypt" in proc.stdout and "create-key" in proc.stdout


# --- in-process: unexpected errors, parsing, formatting -----------------------------------


def test_internal_error_and_interrupt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import envfs.cli.kms as cli_kms

    def boom(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_kms, "build_request", boom)
    monkeypatch.delenv("ENVFS_DEBUG", raising=False)
    assert main(["kms", "list-keys"]) == 1
    err = capsys.readouterr().err
    assert err == "envfs: error: internal error: RuntimeError('boom')\n"
    monkeypatch.setenv("ENVFS_DEBUG", "1")
    assert main(["kms", "list-keys"]) == 1
    assert "Traceback" in capsys.readouterr().err

    def interrupt(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_kms, "build_request", interrupt)
    assert main(["kms", "list-keys"]) == 130
    assert capsys.readouterr().err == ""


def test_parse_context() -> None:
    assert parse_context("--c", ["a=1,b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    assert parse_context("--c", ['{"a": "1"}', "b=2"]) == {"a": "1", "b": "2"}
    for bad in (["a"], ["=1"], ["a=1,a=2"], ['{"a": 1}'], ["{nope"]):
        with pytest.raises(ArgumentError, match=r"^argument --c: "):
            parse_context("--c", bad)


def test_parse_tags_and_lists() -> None:
    assert parse_tags("--t", ["TagKey=k,TagValue=v=w"]) == [{"TagKey": "k", "TagValue": "v=w"}]
    for bad in (["TagKey=k"], ["TagKey=k,TagValue=v,Extra=1"], ['[{"TagKey": "k"}]'], ["k=v"]):
        with pytest.raises(ArgumentError, match=r"^argument --t: "):
            parse_tags("--t", bad)
    assert parse_string_list("--l", ["user:alice,group:kms-admins", "uid:7"]) == [
        "user:alice",
        "group:kms-admins",
        "uid:7",
    ]
    assert parse_string_list("--l", ['["a", "b"]', " c , "]) == ["a", "b", "c"]


def parsed_request(verb: str, *args: str) -> dict[str, Any]:
    namespace = build_parser().parse_args(["kms", verb, *args])
    operation = next(op for op in OPERATIONS.values() if op.verb == verb)
    return build_request(operation, vars(namespace))


def test_request_from_flags(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text('{"Version": "2012-10-17"}')
    assert parsed_request(
        "create-key",
        *("--key-administrators", "user:alice,group:kms-admins", "--key-users", "user:bob"),
        *("--tags", "TagKey=a,TagValue=1", "--tags", "TagKey=b,TagValue=2"),
        *("--policy", f"file://{tmp_path}/policy.json", "--bypass-policy-lockout-safety-check"),
    ) == {
        "KeyAdministrators": ["user:alice", "group:kms-admins"],
        "KeyUsers": ["user:bob"],
        "Tags": [{"TagKey": "a", "TagValue": "1"}, {"TagKey": "b", "TagValue": "2"}],
        "Policy": '{"Version": "2012-10-17"}',
        "BypassPolicyLockoutSafetyCheck": True,
    }
    assert parsed_request(
        "put-key-policy",
        "--key-id",
        "k",
        "--policy",
        "{}",
        "--no-bypass-policy-lockout-safety-check",
    ) == {"KeyId": "k", "Policy": "{}", "BypassPolicyLockoutSafetyCheck": False}
    assert parsed_request("list-keys", "--limit", "5") == {"Limit": 5}
    assert parsed_request("list-keys") == {}


def test_blob_forms(tmp_path: Path) -> None:
    (tmp_path / "raw").write_bytes(b"\x00raw\n")
    (tmp_path / "b64").write_text("AHJh\ndwo=\n")
    (tmp_path / "crlf").write_bytes(b"AHJh\r\ndwo=\r\n")
    assert parse_blob("--b", f"fileb://{tmp_path}/raw") == b"\x00raw\n"
    assert parse_blob("--b", f"file://{tmp_path}/b64") == b"\x00raw\n"
    assert parse_blob("--b", f"file://{tmp_path}/crlf") == b"\x00raw\n"
    assert parse_blob("--b", "AHJhdwo=") == b"\x00raw\n"
    assert parse_blob("--b", "AHJh\ndwo=\n") == b"\x00raw\n"
    assert parse_blob("--b", "") == b""  # the service then says how long a plaintext must be
    with pytest.raises(
        ArgumentError,
        match=r"^argument --b: the value is not valid base64: character 4 is a space, which"
        r" base64 does not use$",
    ) as e:
        parse_blob("--b", "raw text")
    assert (
        e.value.hint
        == "a plain value is read as base64; use fileb://PATH to pass a file's raw bytes"
    )
    with pytest.raises(ArgumentError, match=r"^argument --b: cannot read '/nonexistent/x': "):
        parse_blob("--b", "fileb:///nonexistent/x")


@pytest.mark.parametrize("length", range(0, 40))
def test_base64_accepts_exactly_what_an_encoder_writes(length: int) -> None:
    data = bytes((7 * i + length) % 256 for i in range(length))
    encoded = base64.b64encode(data).decode()
    assert decode_base64(encoded) == data
    wrapped = "\n".join(encoded[i : i + 8] for i in range(0, len(encoded), 8)) + "\n"
    assert decode_base64(wrapped) == data
    if encoded:
        for bad in (
            encoded + "=",
            encoded.rstrip("=") + ("" if encoded.endswith("=") else "A"),
            " " + encoded,
        ):
            with pytest.raises(ValueError):
                decode_base64(bad)


# --- the demo -----------------------------------------------------------------------------


@needs_root
def test_kms_walkthrough_runs_to_completion(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    env["ENVFS"] = str(ENVFS)
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "decrypted: Some text" in proc.stdout
    assert "re-encrypted copy decrypts too" in proc.stdout
    assert re.search(r"audit log verified: \d+ records", proc.stdout)
    assert list(tmp_path.iterdir()) == []  # the demo removed its temporary folder
