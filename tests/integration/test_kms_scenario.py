"""The origin document's scenario, played by three real Unix users through ``envfs kms serve``.

Root starts the daemon on a temporary socket over a temporary store whose key creators group
is a group made for the test (the origin document's myKMSGroup). Three users made for the
test call it with the ``envfs`` command line, each as its own uid (``setpriv --reuid N
--regid N --clear-groups``):

- the key manager (MyKeyManager, a member of the group) creates a key with a description, a
  tag, an alias, itself as key administrator and the key user as key user, enables rotation,
  and is denied Encrypt and Decrypt;
- the key user (MyKeyUser) encrypts a file (the aws-cli ``--output text --query
  CiphertextBlob | base64 -d`` way), decrypts it, re-encrypts it, and is denied DisableKey and
  ScheduleKeyDeletion;
- a stranger is denied Encrypt, Decrypt, DisableKey and CreateKey.

Then root reads the audit log: every one of those calls is there, with its caller, action and
outcome; ``audit --verify`` passes, and fails (exit 40) once one record is edited with sqlite3.

How the other uids run ``envfs``: the test's virtualenv may be out of their reach (here its
interpreter lives under ``/root``, mode 0700). The test copies what the command line imports,
the ``envfs`` package and the third-party modules it loads (found by importing ``envfs.cli`` in
a child of the test's interpreter), into a world-readable temporary folder, and runs it with the
first interpreter of the same Python version that the stranger's uid may execute
(``sys.executable``, else ``/usr/bin/python3``) through a small ``envfs`` wrapper on ``PATH``.
The users thus run the real command line, the same code as root, and the store itself
stays unreadable to them: everything they do goes through the daemon.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from envfs.kms.store import DB_NAME

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: useradd, setpriv"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("setpriv", "useradd", "userdel", "groupadd", "sqlite3")),
        reason="needs setpriv, useradd, userdel, groupadd and sqlite3",
    ),
]

ENVFS = str(Path(sys.executable).with_name("envfs"))
REPO = Path(__file__).resolve().parents[2]
REGION = "local-1"
PLAINTEXT = b"Some text\n"
TIMEOUT = 20

# The modules the command line loads beyond a bare interpreter's, as "name path" lines.
_LIST_IMPORTS = r"""
import sys
before = set(sys.modules)
import envfs.cli, envfs.kms.client
for name in sorted(set(sys.modules) - before):
    module = sys.modules[name]
    path = getattr(module, "__file__", None)
    if path and "." not in name:
        print(name, path)
"""


# --- accounts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    role: str
    name: str
    uid: int
    gid: int


def _run_root(*command: str) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr}")


@pytest.fixture
def accounts() -> Iterator[tuple[str, dict[str, Account]]]:
    """The key creators group and three users: manager (in the group), user, stranger."""
    tag = secrets.token_hex(3)
    group = f"envfs-t-grp-{tag}"
    names = {role: f"envfs-t-{role}-{tag}" for role in ("mgr", "usr", "oth")}
    made_users: list[str] = []
    made_group = False
    try:
        _run_root("groupadd", group)
        made_group = True
        for role, name in names.items():
            extra = ["--groups", group] if role == "mgr" else []
            _run_root(
                "useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                *extra, name,
            )  # fmt: skip
            made_users.append(name)
        people = {}
        for role, name in names.items():
            entry = pwd.getpwnam(name)
            people[role] = Account(role, name, entry.pw_uid, entry.pw_gid)
        yield group, people
    finally:
        problems = []
        for name in made_users:
            proc = subprocess.run(["userdel", name], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                problems.append(f"userdel {name}: {proc.stderr.strip()}")
            # userdel removes the user's own group unless the system is set up otherwise.
            subprocess.run(["groupdel", name], capture_output=True, check=False)
        if made_group:
            proc = subprocess.run(["groupdel", group], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                problems.append(f"groupdel {group}: {proc.stderr.strip()}")
        if problems:
            raise AssertionError("cleanup failed: " + "; ".join(problems))


# --- a command line other uids can run -----------------------------------------------------


def _copy_client(target: Path) -> None:
    """Copy ``envfs`` and the third-party modules its command line imports into ``target``."""
    listing = subprocess.run(
        [sys.executable, "-c", _LIST_IMPORTS],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT,
    ).stdout
    stdlib = Path(os.__file__).resolve().parent
    ignore = shutil.ignore_patterns("__pycache__")
    for line in listing.splitlines():
        name, path_text = line.split(" ", 1)
        path = Path(path_text).resolve()
        if stdlib in path.parents and "site-packages" not in path.parts:
            continue  # the other interpreter brings its own standard library
        if name == "envfs":
            shutil.copytree(REPO / "envfs", target / "envfs", ignore=ignore)
        elif path.name == "__init__.py":
            shutil.copytree(path.parent, target / name, ignore=ignore)
        else:
            shutil.copy2(path, target / path.name)  # a module or extension of its own


def _python_for(account: Account, packages: Path) -> str:
    """An interpreter of this Python version that ``account`` can run ``envfs`` with."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    probe = (
        "import sys, envfs, envfs.cli, envfs.kms.client;"
        f"assert '{version}' == '%d.%d' % sys.version_info[:2], sys.version;"
        f"assert envfs.__file__.startswith('{packages}/'), envfs.__file__"
    )
    tried = []
    for candidate in dict.fromkeys((sys.executable, "/usr/bin/python3")):
        # Through a shell, as the wrapper runs it: setpriv keeps its capabilities until its
        # own execve, so a program it starts directly may lie beyond the uid's reach.
        proc = subprocess.run(
            [*as_uid(account), "/bin/sh", "-c", 'exec "$0" -s -c "$1"', candidate, probe],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(packages)},
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
            timeout=TIMEOUT,
        )
        if proc.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {proc.stderr.strip().splitlines()[-1:]}")
    pytest.skip(f"no Python {version} that uid {account.uid} may run envfs with: {tried}")


def as_uid(account: Account) -> list[str]:
    return [
        "setpriv",
        "--reuid",
        str(account.uid),
        "--regid",
        str(account.gid),
        "--clear-groups",
    ]


# --- the daemon ----------------------------------------------------------------------------


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


@contextlib.contextmanager
def running_daemon(env: dict[str, str], sock: Path, log: Path) -> Iterator[Daemon]:
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [ENVFS, "kms", "serve", "--socket", str(sock)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    daemon = Daemon(process, sock, log)
    try:
        deadline = time.monotonic() + 10
        while not (sock.exists() and _connectable(sock)):
            if process.poll() is not None:
                raise AssertionError(f"the daemon exited {process.returncode}:\n{daemon.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not listen on {sock}:\n{daemon.output()}")
            time.sleep(0.05)
        yield daemon
    finally:
        daemon.stop()
        sock.unlink(missing_ok=True)


# --- the scenario's bookkeeping ------------------------------------------------------------

# The policy action each call is checked (and audited) against.
ACTIONS = {
    "CreateKey": "kms:CreateKey",
    "CreateAlias": "kms:CreateAlias",
    "EnableKeyRotation": "kms:EnableKeyRotation",
    "GetKeyRotationStatus": "kms:GetKeyRotationStatus",
    "ListResourceTags": "kms:ListResourceTags",
    "DescribeKey": "kms:DescribeKey",
    "Encrypt": "kms:Encrypt",
    "Decrypt": "kms:Decrypt",
    "ReEncrypt": "kms:ReEncrypt*",  # ReEncryptFrom and ReEncryptTo: one record
    "DisableKey": "kms:DisableKey",
    "ScheduleKeyDeletion": "kms:ScheduleKeyDeletion",
}
DENIED = "AccessDeniedException"


@dataclass(frozen=True)
class Call:
    """One call of the scenario, as its audit record must tell it."""

    uid: int
    user: str
    operation: str
    action: str
    outcome: str
    key_arn: str | None


@dataclass
class Scenario:
    bin_dir: Path
    packages: Path
    sock: Path
    homes: dict[str, Path]
    calls: list[tuple[Account, str, str, bool]] = field(default_factory=list)

    def sh(self, who: Account, script: str) -> subprocess.CompletedProcess[str]:
        """Run a bash script as ``who`` (its own uid and gid, no other groups) in its home."""
        home = self.homes[who.role]
        env = {
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "PYTHONPATH": str(self.packages),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "ENVFS_KMS_SOCKET": str(self.sock),
            "ENVFS_REGION": REGION,
        }
        proc = subprocess.run(
            [*as_uid(who), "bash", "-euo", "pipefail", "-c", script],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ok(self, who: Account, operation: str, script: str) -> str:
        """``script`` makes one call of ``operation``, which succeeds; its stdout."""
        proc = self.sh(who, script)
        assert proc.returncode == 0, f"{who.role}: {script}\nexit {proc.returncode}: {proc.stderr}"
        self.calls.append((who, operation, "Success", True))
        return proc.stdout

    def denied(self, who: Account, operation: str, script: str, *, on_key: bool = True) -> None:
        """``script`` makes one call of ``operation``, refused with AccessDeniedException."""
        proc = self.sh(who, script)
        assert proc.returncode == 12, (
            f"{who.role}: {script}\nexpected exit 12 (AccessDeniedException), got"
            f" {proc.returncode}: {proc.stdout}{proc.stderr}"
        )
        assert proc.stderr.startswith(f"envfs: error: {DENIED}: "), proc.stderr
        assert f"{who.name}({who.uid})" in proc.stderr, proc.stderr  # the kernel's word
        assert proc.stdout == ""
        self.calls.append((who, operation, DENIED, on_key))

    def expected(self, arn: str) -> list[Call]:
        return [
            Call(who.uid, who.name, op, ACTIONS[op], outcome, arn if on_key else None)
            for who, op, outcome, on_key in self.calls
        ]


def root_envfs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ENVFS, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def audit_records(env: dict[str, str]) -> list[dict[str, Any]]:
    proc = root_envfs(env, "kms", "audit")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)["Records"]
    assert isinstance(records, list)
    return records


# --- the test ------------------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # Short (sun_path holds 107 bytes) and reachable by every uid, unlike pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="envfs-kms-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_origin_document_scenario_with_three_uids(
    tmp_path: Path, shared_dir: Path, accounts: tuple[str, dict[str, Account]]
) -> None:
    group, people = accounts
    mgr, usr, oth = people["mgr"], people["usr"], people["oth"]

    # Root's store, in pytest's tmp_path.
    kms_dir = tmp_path / "kms"
    root_env = {k: v for k, v in os.environ.items() if not k.startswith("ENVFS_")}
    root_env.update(ENVFS_KMS_DIR=str(kms_dir), ENVFS_REGION=REGION)
    init = root_envfs(root_env, "kms", "init", "--key-creators-group", group)
    assert init.returncode == 0, init.stderr
    assert f"members of group {group!r}" in init.stdout

    # What the users run: a world-readable copy of the command line and a wrapper on PATH.
    packages = shared_dir / "packages"
    packages.mkdir()
    _copy_client(packages)
    python = _python_for(oth, packages)
    bin_dir = shared_dir / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "envfs"
    wrapper.write_text(f'#!/bin/sh\nexec {python} -s -m envfs "$@"\n')
    for path in (shared_dir, *shared_dir.rglob("*")):
        path.chmod(0o755 if path.is_dir() or path == wrapper else 0o644)
    homes = {}
    for account in people.values():
        home = shared_dir / f"home-{account.role}"
        home.mkdir(mode=0o700)
        os.chown(home, account.uid, account.gid)
        homes[account.role] = home
    usr_home = homes["usr"]

    def hand(src: Path, to: Account, name: str) -> None:
        """Root copies a file into ``to``'s home, as its owner."""
        shutil.copy(src, homes[to.role] / name)
        os.chown(homes[to.role] / name, to.uid, to.gid)

    sock = shared_dir / "kms.sock"
    root_env["ENVFS_KMS_SOCKET"] = str(sock)
    sc = Scenario(bin_dir, packages, sock, homes)
    alias = f"alias/payroll-{secrets.token_hex(2)}"
    db = kms_dir / REGION / DB_NAME
    assert db.is_file()
    for account in people.values():  # so whatever they do goes through the daemon
        assert sc.sh(account, f"cat {db} > /dev/null").returncode != 0

    with running_daemon(root_env, sock, tmp_path / "daemon.log") as daemon:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o666

        # --- MyKeyManager (in the key creators group): manages the key, cannot use it. ----
        out = sc.ok(
            mgr,
            "CreateKey",
            "envfs kms create-key --description 'payroll master key'"
            f" --tags TagKey=Owner,TagValue={usr.name}"
            f" --key-administrators user:{mgr.name} --key-users user:{usr.name}",
        )
        created = json.loads(out)["KeyMetadata"]
        arn, key_id = created["Arn"], created["KeyId"]
        assert arn == f"arn:envfs:kms:{REGION}:{created['AWSAccountId']}:key/{key_id}"
        assert created["Description"] == "payroll master key"
        assert created["KeyState"] == "Enabled"
        assert created["Origin"] == "ENVFS_KMS"

        create_alias = f"envfs kms create-alias --alias-name {alias} --target-key-id {key_id}"
        sc.ok(mgr, "CreateAlias", create_alias)
        sc.ok(mgr, "EnableKeyRotation", f"envfs kms enable-key-rotation --key-id {alias}")
        out = sc.ok(
            mgr, "GetKeyRotationStatus", f"envfs kms get-key-rotation-status --key-id {alias}"
        )
        assert json.loads(out)["KeyRotationEnabled"] is True
        out = sc.ok(
            mgr,
            "ListResourceTags",
            f"envfs kms list-resource-tags --key-id {key_id} --output text --query Tags",
        )
        assert out.split() == ["Owner", usr.name]
        sc.denied(
            mgr,
            "Encrypt",
            "printf 'manager data' > m.txt;"
            f" envfs kms encrypt --key-id {alias} --plaintext fileb://m.txt",
        )

        # --- MyKeyUser: uses the key, cannot manage it. -------------------------------------
        assert sc.sh(usr, 'echo "Some text" > myfile.txt').returncode == 0
        assert (usr_home / "myfile.txt").read_bytes() == PLAINTEXT
        sc.ok(
            usr,
            "Encrypt",
            f"envfs kms encrypt --key-id {alias} --plaintext fileb://myfile.txt"
            " --output text --query CiphertextBlob | base64 -d > myfile.txt.enc",
        )
        blob = (usr_home / "myfile.txt.enc").read_bytes()
        # A version-1 blob of the key's first version (layout: envfs/kms/blob.py).
        assert len(blob) == 65 + len(PLAINTEXT)
        assert blob[0] == 1
        assert blob[1:17] == uuid.UUID(key_id).bytes
        assert int.from_bytes(blob[17:21], "big") == 1
        assert PLAINTEXT.strip() not in blob

        sc.ok(
            usr,
            "Decrypt",
            "envfs kms decrypt --ciphertext-blob fileb://myfile.txt.enc"
            " --output text --query Plaintext | base64 -d > myfile.txt.dec",
        )
        assert (usr_home / "myfile.txt.dec").read_bytes() == PLAINTEXT

        sc.ok(
            usr,
            "ReEncrypt",
            f"envfs kms re-encrypt --ciphertext-blob fileb://myfile.txt.enc"
            f" --destination-key-id {alias}"
            " --output text --query CiphertextBlob | base64 -d > myfile.txt.reenc",
        )
        reblob = (usr_home / "myfile.txt.reenc").read_bytes()
        assert len(reblob) == len(blob)
        assert reblob[:21] == blob[:21]  # same key and version, fresh salt and nonce
        assert reblob[21:] != blob[21:]
        sc.ok(
            usr,
            "Decrypt",
            "envfs kms decrypt --ciphertext-blob fileb://myfile.txt.reenc"
            " --output text --query Plaintext | base64 -d > myfile.txt.redec",
        )
        assert (usr_home / "myfile.txt.redec").read_bytes() == PLAINTEXT

        sc.denied(usr, "DisableKey", f"envfs kms disable-key --key-id {alias}")
        sc.denied(
            usr,
            "ScheduleKeyDeletion",
            f"envfs kms schedule-key-deletion --key-id {alias} --pending-window-in-days 7",
        )

        # --- A stranger: can neither use nor manage the key, nor create one. ----------------
        hand(usr_home / "myfile.txt.enc", oth, "stolen.enc")
        sc.denied(
            oth,
            "Encrypt",
            f"printf 'my data' > o.txt; envfs kms encrypt --key-id {alias} --plaintext fileb://o.txt",
        )
        sc.denied(oth, "Decrypt", "envfs kms decrypt --ciphertext-blob fileb://stolen.enc")
        sc.denied(oth, "DisableKey", f"envfs kms disable-key --key-id {key_id}")
        sc.denied(oth, "CreateKey", "envfs kms create-key --description mine", on_key=False)

        # --- The manager again: the key is untouched, and its data still out of reach. -----
        out = sc.ok(
            mgr,
            "DescribeKey",
            f"envfs kms describe-key --key-id {alias} --output text --query KeyMetadata.KeyState",
        )
        assert out.strip() == "Enabled"
        hand(usr_home / "myfile.txt.enc", mgr, "payroll.enc")
        sc.denied(mgr, "Decrypt", "envfs kms decrypt --ciphertext-blob fileb://payroll.enc")

        # --- Root reads the audit log: every call above, in order, and nothing else. -------
        records = audit_records(root_env)
        ours = {mgr.uid, usr.uid, oth.uid}
        seen = [
            Call(
                r["caller"]["uid"],
                r["caller"]["user"],
                r["operation"],
                r["action"],
                r["outcome"],
                r.get("key_arn"),
            )
            for r in records
            if r["caller"]["uid"] in ours
        ]
        assert seen == sc.expected(arn)
        assert len(seen) == 18
        audit_text = json.dumps(records)
        for secret in (PLAINTEXT.strip(), b"manager data", b"my data"):
            assert secret.decode() not in audit_text
            assert base64.b64encode(secret).decode() not in audit_text

        verified = root_envfs(root_env, "kms", "audit", "--verify")
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout.startswith("audit log verified: ")
        assert int(verified.stdout.split()[3]) >= len(seen)

        # Edit one record: the stranger's refused Decrypt now claims to have succeeded.
        [target] = [
            r for r in records if r["caller"]["uid"] == oth.uid and r["operation"] == "Decrypt"
        ]
        edit = subprocess.run(
            [
                "sqlite3",
                str(db),
                "UPDATE audit SET record = json_set(record, '$.outcome', 'Success')"
                f" WHERE seq = {int(target['seq'])}; SELECT changes();",
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert edit.returncode == 0, edit.stderr
        assert edit.stdout.strip() == "1"
        [edited] = [r for r in audit_records(root_env) if r["seq"] == target["seq"]]
        assert edited["outcome"] == "Success"

        tampered = root_envfs(root_env, "kms", "audit", "--verify")
        assert tampered.returncode == 40, tampered.stdout + tampered.stderr
        assert tampered.stderr.startswith("envfs: error: audit log verification failed")
        assert tampered.stdout == ""

        # The daemon stops cleanly on SIGTERM and takes its socket with it.
        assert daemon.process.poll() is None, daemon.output()
        assert daemon.stop() == 0, daemon.output()
        assert not sock.exists()
