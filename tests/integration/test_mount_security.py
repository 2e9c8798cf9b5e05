"""Security of a real mount: tampered backing files, volume checks, per-user access, crashes.

Every test here mounts for real (root and ``/dev/fuse`` needed) and cleans up after itself,
failing or not: mounts are unmounted (lazily if the daemon is gone), daemons stopped, and
users made with ``useradd`` deleted.

Backing file offsets follow ``docs/format.md``: a 512-byte header, then blocks of
``16384 + 28`` bytes (nonce, ciphertext, tag); the files here are 3.5 blocks long.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import json
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from envfs.cli import build_parser
from envfs.cli import main as cli_main
from envfs.errors import EnvfsError
from envfs.files.mount import pid_file_for
from envfs.identity import Caller
from envfs.kms.paths import region_store_dir
from envfs.kms.policy import default_policy
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore
from tests.integration.conftest import (
    ENVFS,
    Env,
    Mount,
    backing_of,
    golden_copy,
    is_mounted,
    live,
    view_name,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting for other users needs root"),
]

HEADER = 512
BLOCK = 16384
STRIDE = BLOCK + 28
MULTI_BLOCK = BLOCK * 3 + BLOCK // 2  # 3.5 blocks: three whole ones and a half one


def block_at(i: int) -> int:
    return HEADER + i * STRIDE


# --- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _environ_of(env: Env) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.pop("CREDENTIALS_DIRECTORY", None)
    os.environ.update({k: v for k, v in env.env.items() if k.startswith("ENVFS_")})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def envfs(env: Env, *args: str, check: bool = True) -> tuple[int, str, str]:
    """Run ``envfs ARGS`` in this process (no interpreter start-up): (exit code, out, err).

    Only for commands that do not mount: those run as real processes.
    """
    out, err = io.StringIO(), io.StringIO()
    with _environ_of(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    if check and code != 0:
        raise AssertionError(f"envfs {' '.join(args)} exited {code}:\n{err.getvalue()}")
    return code, out.getvalue(), err.getvalue()


def kms(env: Env, *args: str) -> Any:
    out = envfs(env, "kms", *args, "--embedded")[1]
    return json.loads(out) if out.strip() else {}


def create_key(env: Env, alias: str, *extra: str) -> str:
    """A new key with ``alias/<alias>``; returns its ARN."""
    meta = kms(env, "create-key", "--description", alias, *extra)["KeyMetadata"]
    kms(env, "create-alias", "--alias-name", f"alias/{alias}", "--target-key-id", meta["KeyId"])
    return str(meta["Arn"])


def new_volume(env: Env, name: str, key_alias: str = "vol", *extra: str) -> Mount:
    """A new volume ``name`` under ``alias/<key_alias>``, not mounted yet."""
    backing = env.root / f"{name}-backing"
    mnt = env.root / f"{name}-mnt"
    mnt.mkdir()
    envfs(env, "init", str(backing), "--key-id", f"alias/{key_alias}")
    return Mount(env, backing, mnt, env.root / f"{name}.log", extra)


def read_errno(path: Path) -> tuple[str, int]:
    """Open and read ``path`` whole: where it failed and with which errno ("ok" if it did not)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return "open", exc.errno or 0
    try:
        while os.read(fd, 1 << 20):
            pass
    except OSError as exc:
        return "read", exc.errno or 0
    finally:
        os.close(fd)
    return "ok", 0


def warnings_naming(m: Mount, path: Path) -> list[str]:
    return [line for line in m.log_text().splitlines() if "WARNING" in line and str(path) in line]


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def header_fields(path: Path) -> tuple[int, int]:
    """Offsets of the key ARN and of the wrapped key in a backing file's header."""
    raw = path.read_bytes()[:HEADER]
    arn_len = int.from_bytes(raw[33:35], "big")
    return 35, 35 + arn_len + 2


# --- 1. tampered, truncated and foreign backing files ---------------------------------------


def test_tampered_backing_files_give_eio_and_the_mount_serves_the_rest(
    kms_env: Env,
) -> None:
    create_key(kms_env, "vol")
    create_key(kms_env, "other")
    contents: dict[str, bytes] = {}

    # Files of two other volumes (one under the same key, one under another key).
    foreign: dict[str, Path] = {}
    for name, alias in (("same-key", "vol"), ("other-key", "other")):
        with live(new_volume(kms_env, name, alias)) as other:
            (other.mnt / "f").write_bytes(os.urandom(MULTI_BLOCK))
        foreign[name] = backing_of(other, "f")

    m = new_volume(kms_env, "vol")
    victims = [
        "hdr-magic",
        "hdr-version",
        "hdr-file-id",
        "hdr-key-arn",
        "hdr-wrapped-key",
        "hdr-padding",
        "hdr-mac",
        "block0-nonce",
        "block0-data",
        "last-block",
        "swapped-blocks",
        "duplicated-block",
        "header-a",
        "header-b",
        "cut-at-boundary",
        "cut-to-header",
        "appended",
        "spliced",
    ]
    healthy = ["good", "donor", "empty", "small"]
    with live(m):
        for name in [*victims, "good", "donor"]:
            contents[name] = os.urandom(MULTI_BLOCK)
        contents["empty"] = b""
        contents["small"] = b"small file\n"
        for name, data in contents.items():
            (m.mnt / name).write_bytes(data)
        (m.mnt / "dir").mkdir()
        (m.mnt / "dir" / "nested").write_bytes(b"nested\n")

    def b(name: str) -> Path:
        """The backing path of a name at the root of the volume."""
        return backing_of(m, name)

    arn_at, wrapped_at = header_fields(b("hdr-key-arn"))
    for name, offset in (
        ("hdr-magic", 0),
        ("hdr-version", 9),
        ("hdr-file-id", 20),
        ("hdr-key-arn", arn_at + 30),
        ("hdr-wrapped-key", wrapped_at + 40),
        ("hdr-padding", 470),
        ("hdr-mac", 500),
        ("block0-nonce", block_at(0) + 3),
        ("block0-data", block_at(0) + 12 + 100),
        ("last-block", b("last-block").stat().st_size - 1),
    ):
        flip(b(name), offset)

    def blocks(path: Path) -> list[bytes]:
        raw = path.read_bytes()
        return [raw[block_at(i) : block_at(i + 1)] for i in range(4)]

    def write_blocks(path: Path, header: bytes, parts: list[bytes]) -> None:
        path.write_bytes(header + b"".join(parts))

    parts = blocks(b("swapped-blocks"))
    header = b("swapped-blocks").read_bytes()[:HEADER]
    write_blocks(b("swapped-blocks"), header, [parts[1], parts[0], parts[2], parts[3]])
    parts = blocks(b("duplicated-block"))
    header = b("duplicated-block").read_bytes()[:HEADER]
    write_blocks(b("duplicated-block"), header, [parts[0], parts[0], parts[2], parts[3]])
    raw_a, raw_b = b("header-a").read_bytes(), b("header-b").read_bytes()
    b("header-a").write_bytes(raw_b[:HEADER] + raw_a[HEADER:])
    b("header-b").write_bytes(raw_a[:HEADER] + raw_b[HEADER:])
    os.truncate(b("cut-at-boundary"), block_at(2))
    os.truncate(b("cut-to-header"), HEADER)
    with b("appended").open("ab") as appended:
        appended.write(bytes(28))
    donor = b("donor").read_bytes()
    with b("spliced").open("r+b") as spliced:
        spliced.seek(block_at(1))
        spliced.write(donor[block_at(1) : block_at(2)])

    # Files that are not envfs files, and files of other volumes.
    b("plain-small.txt").write_text("PLAINTEXT-MARKER dropped into the backing folder\n")
    b("plain-large.txt").write_text("PLAINTEXT-MARKER line\n" * 1000)
    b("zero-bytes").write_bytes(b"")
    shutil.copyfile(foreign["same-key"], b("foreign-same-key"))
    shutil.copyfile(foreign["other-key"], b("foreign-other-key"))
    bad = [
        *victims,
        "plain-small.txt",
        "plain-large.txt",
        "zero-bytes",
        "foreign-same-key",
        "foreign-other-key",
    ]

    outcomes: dict[str, tuple[str, int]] = {}
    with live(m):
        for name in bad:
            outcomes[name] = read_errno(m.mnt / name)
            # Every other file is still served, right after each failure.
            assert (m.mnt / "good").read_bytes() == contents["good"]
        wrong = {name: got for name, got in outcomes.items() if got[1] != errno.EIO}
        assert not wrong, f"expected EIO at open or read, got {wrong}"
        silent = [name for name in bad if not warnings_naming(m, b(name))]
        assert not silent, f"no WARNING naming the backing path of {silent}:\n{m.log_text()}"
        # A header of another volume under the same key: the key service refused to unwrap
        # (the context names another volume). Under another key: refused before any call,
        # since the volume file does not accept that key.
        assert "its data key does not unwrap" in warnings_naming(m, b("foreign-same-key"))[0]
        assert "which the volume does not accept" in warnings_naming(m, b("foreign-other-key"))[0]
        for name in healthy:
            assert (m.mnt / name).read_bytes() == contents[name]
        assert (m.mnt / "dir" / "nested").read_bytes() == b"nested\n"
        (m.mnt / "after").write_bytes(b"still writable\n")
        assert (m.mnt / "after").read_bytes() == b"still writable\n"
        assert is_mounted(m.mnt)


# --- 2. volume files, mount errors and inspect ----------------------------------------------


def mounts_on(path: Path) -> int:
    with open("/proc/self/mounts") as mounts:
        return sum(line.split()[1] == str(path) for line in mounts)


def refused(
    m: Mount,
    code: int,
    message: str,
    *,
    mnt: Path | None = None,
    busy: bool = False,
    daemon: bool = False,
) -> None:
    """``envfs mount`` fails with ``code`` and an ``envfs: error:`` line; nothing is mounted.

    ``--foreground`` runs the same checks as the daemon, in one process instead of two;
    ``daemon=True`` also checks that the daemon relays its error to ``envfs mount``.
    """
    target = m.mnt if mnt is None else mnt
    args = [ENVFS, "mount", str(m.backing), str(target), "--log-file", str(m.log)]
    if not daemon:
        args.append("--foreground")
    try:
        result = subprocess.run(args, env=m.env.env, capture_output=True, text=True, timeout=30)
    finally:
        if not busy:
            m.force_cleanup()
    assert (result.returncode, mounts_on(target)) == (code, int(busy)), result.stderr
    assert "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0] if result.stderr else ""
    assert re.match(r"^envfs: error: " + message, first), result.stderr


def test_volume_file_mount_errors_and_inspect(kms_env: Env) -> None:
    arn = create_key(kms_env, "vol")
    other_arn = create_key(kms_env, "other")
    m = new_volume(kms_env, "vol")
    volume_file = m.backing / ".envfs-volume.json"
    doc = json.loads(volume_file.read_text())
    assert set(doc) == {
        "envfs_volume", "volume_id", "region", "key_arn", "format_version", "block_shift",
        "features", "created", "auth_key", "mac",
    }  # fmt: skip
    assert (doc["envfs_volume"], doc["region"], doc["key_arn"]) == (1, "local-1", arn)
    assert (doc["format_version"], doc["block_shift"], doc["features"]) == (2, 14, ["names"])
    assert str(uuid.UUID(doc["volume_id"])) == doc["volume_id"]
    code, _, err = envfs(kms_env, "init", str(m.backing), "--key-id", "alias/vol", check=False)
    assert (code, err) == (60, f"envfs: error: {str(m.backing)!r} is already an envfs volume\n")
    nowhere = kms_env.root / "no-key-volume"
    code, _, err = envfs(kms_env, "init", str(nowhere), "--key-id", "alias/nope", check=False)
    assert (code, err) == (
        11,
        "envfs: error: NotFoundException: alias 'alias/nope' is not found in region 'local-1'\n",
    )
    assert not nowhere.exists()

    data = os.urandom(MULTI_BLOCK)
    with live(m):
        (m.mnt / "multi").write_bytes(data)
        (m.mnt / "empty").write_bytes(b"")
        busy = re.escape(f"mount point {str(m.mnt)!r} is busy")
        refused(m, 61, busy, busy=True, daemon=True)

    # inspect: the header, without decrypting (no key store is needed at all).
    for name, size in (("multi", MULTI_BLOCK), ("empty", 0)):
        path = backing_of(m, name)
        out = subprocess.run(
            [ENVFS, "inspect", str(path)],
            env={**kms_env.env, "ENVFS_KMS_DIR": str(kms_env.root / "nowhere")},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        info = json.loads(out)
        assert info["KeyArn"] == arn
        assert (info["KeyVersion"], info["FormatVersion"], info["BlockSize"]) == (1, 2, BLOCK)
        assert (info["PlaintextSize"], info["BackingSize"]) == (size, path.stat().st_size)
        assert re.fullmatch(r"[0-9a-f]{32}", info["FileId"])
    plain = kms_env.root / "plain.txt"
    plain.write_text("PLAINTEXT-MARKER, not an envfs file\n" * 40)
    code, out, err = envfs(kms_env, "inspect", str(plain), check=False)
    assert (code, err) == (50, f"envfs: error: {str(plain)!r}: not an envfs file (bad magic)\n")
    assert "PLAINTEXT-MARKER" not in out + err

    # Volume files that were tampered with are refused at mount.
    original = volume_file.read_text()

    def edit(**changes: object) -> None:
        volume_file.write_text(json.dumps({**json.loads(original), **changes}))

    not_authentic = re.escape(f"the volume file of {str(m.backing)!r} is not authentic: ")
    edit(key_arn=other_arn)
    refused(m, 60, not_authentic + re.escape(f"it names key {other_arn!r} but was made under"))
    edit(created="2000-01-01T00:00:00+00:00")
    refused(m, 60, not_authentic + "it was altered$")
    edit(region="local-2")
    refused(m, 60, re.escape(f"{str(volume_file)!r} is not consistent: its region is 'local-2'"))
    envfs(kms_env, "kms", "init", "--region", "local-2")
    edit(region="local-2", key_arn=arn.replace(":local-1:", ":local-2:"))
    cannot_use = "NotFoundException: " + re.escape(f"volume {str(m.backing)!r} cannot be used: ")
    refused(m, 11, cannot_use + ".* does not exist in region 'local-2'$")
    edit(key_arn=arn[:-12] + "000000000000")  # a key that never existed
    refused(m, 60, not_authentic + "it names key .* but was made under another key$")
    edit(features=["encrypted-names"])
    refused(m, 60, re.escape(f"{str(volume_file)!r} needs features this envfs does not have"))
    volume_file.write_text(original)

    # Folders and mount points that will not do.
    empty = kms_env.root / "not-a-volume"
    empty.mkdir()
    refused(Mount(kms_env, empty, m.mnt, m.log), 60, re.escape(f"{str(empty)!r} is not an envfs"))
    missing = kms_env.root / "no-such-mountpoint"
    refused(m, 61, re.escape(f"mount point {str(missing)!r} does not exist"), mnt=missing)

    # The key: an alias is only a name (the volume names its key by ARN); a disabled key and
    # one pending deletion are refused with the key service's errors and exit codes.
    kms(kms_env, "delete-alias", "--alias-name", "alias/vol")
    with live(m):
        assert (m.mnt / "multi").read_bytes() == data
    kms(kms_env, "disable-key", "--key-id", arn)
    refused(m, 13, re.escape(f"DisabledException: key {arn!r} is disabled"), daemon=True)
    kms(kms_env, "enable-key", "--key-id", arn)
    kms(kms_env, "schedule-key-deletion", "--key-id", arn, "--pending-window-in-days", "7")
    refused(m, 14, re.escape(f"KMSInvalidStateException: key {arn!r} is pending deletion"))
    kms(kms_env, "cancel-key-deletion", "--key-id", arn)
    kms(kms_env, "enable-key", "--key-id", arn)
    with live(m):
        assert (m.mnt / "multi").read_bytes() == data


# --- 3. per-user access, decided by the key policy at each open ------------------------------

# Real users (useradd), not bare uids: the key user is named as user:NAME, which the mount
# daemon resolves from the kernel's uid (with the user's groups, from getgrouplist) as any
# deployment would; the administrator is named as uid:N. They are removed again whatever
# happens. The other users cannot run the venv's interpreter (it lives under /root),
# so their probes run with the system /usr/bin/python3 -I and plain shell tools.
PROBE = r"""
import json, os, sys
os.umask(0)
out = []
for op, path, data in json.loads(sys.argv[1]):
    try:
        if op == "read":
            with open(path, "rb") as f:
                out.append(f.read().decode())
        elif op == "write":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.write(fd, data.encode())
            os.close(fd)
            out.append("ok")
        elif op == "append":
            with open(path, "a") as f:
                f.write(data)
            out.append("ok")
    except OSError as e:
        out.append(e.errno)
print(json.dumps(out))
"""

# Opens a file, reports, and uses it only after being told to (by then the key is disabled).
HOLDER = r"""
import json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("open", flush=True)
sys.stdin.readline()
before = os.pread(fd, 1 << 20, 0)
os.pwrite(fd, b"written after the key was disabled\n", len(before))
after = os.pread(fd, 1 << 20, 0)
print(json.dumps([before.decode(), after.decode()]), flush=True)
sys.stdin.readline()
os.close(fd)
"""


@dataclasses.dataclass
class User:
    name: str
    uid: int
    gid: int

    def cmd(self, *args: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *args]

    def probe(self, *ops: tuple[str, Path, str]) -> list[object]:
        spec = json.dumps([(op, str(path), data) for op, path, data in ops])
        result = subprocess.run(
            self.cmd("/usr/bin/python3", "-I", "-c", PROBE, spec),
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
            timeout=30,
        )
        answer: list[object] = json.loads(result.stdout)
        return answer

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd("sh", "-c", script), capture_output=True, text=True, cwd="/", timeout=30
        )


def _useradd(name: str) -> None:
    for attempt in range(20):  # another test may hold the password file's lock
        result = subprocess.run(
            ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0:
            return
        if "lock" not in result.stderr or attempt == 19:
            raise AssertionError(f"useradd {name} failed: {result.stderr}")
        time.sleep(0.1)


@pytest.fixture
def users() -> Iterator[dict[str, User]]:
    """Three fresh users: the key's manager, its user and a stranger; deleted afterwards."""
    tag = secrets.token_hex(3)
    made: dict[str, User] = {}
    try:
        for role in ("mgr", "usr", "str"):
            name = f"envfs-t-{role}-{tag}"
            _useradd(name)
            pw = pwd.getpwnam(name)
            made[role] = User(name, pw.pw_uid, pw.pw_gid)
        yield made
    finally:
        for user in made.values():
            for _attempt in range(20):
                result = subprocess.run(["userdel", user.name], capture_output=True, check=False)
                if result.returncode == 0 or b"lock" not in result.stderr:
                    break
                time.sleep(0.1)


def audit_records(env: Env, arn: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = kms(env, "audit", "--key-id", arn)["Records"]
    return records


def awaited_records(
    env: Env, arn: str, wanted: Callable[[dict[str, Any]], bool], enough: Callable[[Any], bool]
) -> list[dict[str, Any]]:
    """The records of ``arn`` that are ``wanted``, once they are ``enough`` (or after 5 s):
    a mount adds its records to the chain in batches, the last within about 0.15 s."""
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in audit_records(env, arn) if wanted(r)]
        if enough(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def as_key_admin(env: Env, admin: User, operation: str, arn: str) -> None:
    """Perform a key-management operation as the key administrator.

    The embedded store is root's, and the key's administrator cannot run envfs here, so the
    test makes the call in-process with the administrator as the caller, as the key-service
    daemon would after SO_PEERCRED.
    """
    store = KeyStore.open(region_store_dir(Path(env.env["ENVFS_KMS_DIR"]), "local-1"), "local-1")
    service = KeyService(store)
    try:
        service.handle(Caller.from_ids(admin.uid, admin.gid), operation, {"KeyId": arn})
    finally:
        service.close()


def test_per_user_access_is_decided_by_the_key_policy(
    kms_env: Env, users: dict[str, User], tmp_path: Path
) -> None:
    mgr, usr, stranger = users["mgr"], users["usr"], users["str"]
    arn = create_key(kms_env, "shared")
    m = new_volume(kms_env, "shared", "shared", "--allow-other")
    # Hand the key over: from now on root may neither manage nor use it.
    policy = default_policy([f"uid:{mgr.uid}"], [f"user:{usr.name}"])
    kms(kms_env, "put-key-policy", "--key-id", arn, "--policy", policy,
        "--bypass-policy-lockout-safety-check")  # fmt: skip

    # The mount point must be reachable for other users: not under pytest's 0700 tmp dir.
    outside = Path(tempfile.mkdtemp(prefix="envfs-test-", dir="/tmp"))
    holder: subprocess.Popen[str] | None = None
    try:
        outside.chmod(0o755)
        m.mnt = outside / "mnt"
        m.mnt.mkdir()
        with live(m):
            m.mnt.chmod(0o755)
            shared = m.mnt / "shared"
            # The names are locked until a user of the key has made a request: root (in no
            # statement of the policy) and the key's administrator can neither list nor
            # make one; the key user's first request unlocks them for the mount.
            for attempt in (lambda: os.listdir(m.mnt), shared.mkdir):
                with pytest.raises(PermissionError) as locked:
                    attempt()
                assert locked.value.errno == errno.EACCES
            assert mgr.sh(f"ls {m.mnt}").stderr.endswith(": Permission denied\n")
            assert usr.sh(f"ls -A {m.mnt}").stdout == ""
            assert os.listdir(m.mnt) == []
            shared.mkdir()
            shared.chmod(0o777)
            doc, other, held = shared / "doc.txt", shared / "other.txt", shared / "held.txt"

            # The key user reads and writes; files belong to them on both sides.
            assert usr.probe(
                ("write", doc, "the key user's document\n"),
                ("write", other, "another file\n"),
                ("write", held, "held open\n"),
                ("append", doc, "second line\n"),
                ("read", doc, ""),
            ) == ["ok", "ok", "ok", "ok", "the key user's document\nsecond line\n"]
            assert usr.sh(f"cat {doc}").stdout == "the key user's document\nsecond line\n"
            key_user = Caller.from_ids(usr.uid, usr.gid)
            doc_behind = backing_of(m, doc, key_user)
            for path in (doc, doc_behind):
                st = path.stat()
                assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (usr.uid, usr.gid, 0o666)

            # Everyone else is refused at open, although the mode bits allow them.
            for who in (mgr, stranger):
                assert (
                    who.probe(
                        ("read", doc, ""),
                        ("append", doc, "x"),
                        ("write", shared / f"{who.name}", "x"),
                    )
                    == [errno.EACCES] * 3
                ), who.name
                refused_cat = who.sh(f"cat {doc}")
                assert refused_cat.returncode == 1
                assert refused_cat.stderr == f"cat: {doc}: Permission denied\n"
            for attempt in (doc.read_bytes, lambda: (shared / "by-root").write_bytes(b"x")):
                with pytest.raises(PermissionError) as denied:
                    attempt()  # root, in no statement of the policy
                assert denied.value.errno == errno.EACCES
            assert sorted(os.listdir(shared)) == ["doc.txt", "held.txt", "other.txt"]

            # Each decision is audited with the file id and the backing path. The mount
            # adds its records to the chain in batches: the last within about 0.15 s.
            file_id = doc_behind.read_bytes()[16:32].hex()
            note = str(doc_behind)
            expected = {
                (usr.uid, "Success"),
                (mgr.uid, "AccessDeniedException"),
                (stranger.uid, "AccessDeniedException"),
                (0, "AccessDeniedException"),
            }
            found = awaited_records(
                kms_env,
                arn,
                lambda r: (
                    r["operation"] == "Decrypt"
                    and r.get("encryption_context", {}).get("envfs:file") == file_id
                    and r.get("request", {}).get("AuditNote") == note
                ),
                lambda rs: {(r["caller"]["uid"], r["outcome"]) for r in rs} >= expected,
            )
            decisions = {(r["caller"]["uid"], r["outcome"]) for r in found}
            assert decisions >= expected, decisions

            # A disabled key: new opens fail, a file already open keeps working until closed.
            holder = subprocess.Popen(
                usr.cmd("/usr/bin/python3", "-I", "-c", HOLDER, str(held)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd="/",
            )
            assert holder.stdin is not None and holder.stdout is not None
            assert holder.stdout.readline() == "open\n"
            as_key_admin(kms_env, mgr, "DisableKey", arn)
            assert (
                usr.probe(("read", doc, ""), ("read", held, ""), ("write", shared / "new", "x"))
                == [errno.EKEYREVOKED] * 3
            )
            assert usr.sh(f"cat {doc}").stderr == f"cat: {doc}: Key has been revoked\n"
            holder.stdin.write("go\n")
            holder.stdin.flush()
            extra = "written after the key was disabled\n"
            assert json.loads(holder.stdout.readline()) == ["held open\n", "held open\n" + extra]
            holder.stdin.write("close\n")
            holder.stdin.flush()
            assert holder.wait(timeout=30) == 0
            assert usr.probe(("read", held, "")) == [errno.EKEYREVOKED]
            as_key_admin(kms_env, mgr, "EnableKey", arn)

        # Unmount and mount again: everything is still there, for the key user only; the
        # names are locked again until the key user's first request.
        with live(m):
            with pytest.raises(PermissionError) as locked:
                os.listdir(shared)
            assert locked.value.errno == errno.EACCES
            assert usr.probe(("read", doc, ""), ("read", other, ""), ("read", held, "")) == [
                "the key user's document\nsecond line\n",
                "another file\n",
                "held open\n" + extra,
            ]
            assert mgr.probe(("read", doc, "")) == [errno.EACCES]
            with pytest.raises(PermissionError) as denied:
                doc.read_bytes()
            assert denied.value.errno == errno.EACCES
    finally:
        if holder is not None:
            if holder.poll() is None:
                holder.kill()
            holder.communicate()  # reaps it and closes its pipes
        m.force_cleanup()
        shutil.rmtree(outside, ignore_errors=True)


# --- 4. a crash in the middle of creates ------------------------------------------------------

CREATE_LOOP = r"""
import os, sys
d = sys.argv[1]
i = 0
try:
    while True:
        with open(os.path.join(d, "f%05d" % i), "wb") as f:
            f.write(b"content of file %d\n" % i)
        i += 1
        if i == 20:
            print("running", flush=True)
except OSError as e:
    print("stopped", i, e.errno, flush=True)
"""


@functools.cache
def _parser() -> argparse.ArgumentParser:
    return build_parser()


def inspect(path: Path) -> dict[str, Any]:
    """``envfs inspect PATH``'s answer, through the CLI's own parser and handler (built once:
    fast enough to run on every file while the daemon is frozen).

    Raises:
        EnvfsError: as ``envfs inspect`` would report it.
    """
    args = _parser().parse_args(["inspect", str(path)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.handler(args) == 0
    info: dict[str, Any] = json.loads(out.getvalue())
    return info


def content_size(name: str) -> int:
    return len(b"content of file %d\n" % int(name[1:]))


def test_killed_daemon_leaves_no_headerless_file(kms_env: Env) -> None:
    create_key(kms_env, "vol")
    m = new_volume(kms_env, "vol")
    verified: set[str] = set()  # names in the view

    def unverified_headers() -> list[str]:
        """Names in the backing folder whose header envfs inspect refuses (checks new ones)."""
        bad = []
        for behind in sorted(os.listdir(backing_dir)):
            if behind == ".envfs-dir" or behind.startswith(".envfs-tmp-"):
                continue
            name = view_name(m, backing_dir / behind)
            if name in verified:
                continue
            try:
                info = inspect(backing_dir / behind)
            except EnvfsError as exc:
                bad.append(f"{name}: {exc.message}")
                continue
            if info["PlaintextSize"] not in (0, content_size(name)):
                bad.append(f"{name}: {info}")
            else:
                verified.add(name)
        return bad

    with live(m):
        pid = int(pid_file_for(m.mnt).read_text())
        (m.mnt / "dir").mkdir()
        backing_dir = backing_of(m, "dir")
        with subprocess.Popen(
            [sys.executable, "-c", CREATE_LOOP, str(m.mnt / "dir")],
            stdout=subprocess.PIPE,
            text=True,
        ) as loop:
            assert loop.stdout is not None
            try:
                assert loop.stdout.readline() == "running\n"
                # Freeze the daemon at random moments and look at the backing folder: no
                # name may ever exist without its header. Then kill it outright.
                for _sample in range(25):
                    time.sleep(random.uniform(0.002, 0.02))
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        assert unverified_headers() == []
                    finally:
                        os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
                stopped = loop.stdout.readline().split()
            finally:
                loop.kill()
        # The request in flight is aborted, later ones find no daemon.
        assert stopped[0] == "stopped", stopped
        assert int(stopped[2]) in (errno.ECONNABORTED, errno.ENOTCONN), stopped
        subprocess.run(["fusermount3", "-uz", str(m.mnt)], check=True)
        assert not is_mounted(m.mnt)

    own = {".envfs-dir"}
    names = sorted(view_name(m, backing_dir / n) for n in os.listdir(backing_dir) if n not in own)
    assert len(names) >= int(stopped[1]) and names[0] == "f00000", names
    assert unverified_headers() == []
    assert verified == set(names)
    # What an interrupted create leaves where O_TMPFILE is missing: a temporary name.
    (backing_dir / ".envfs-tmp-0123456789abcdef").write_bytes(b"half a header")
    with live(m):
        listed = sorted(os.listdir(m.mnt / "dir"))
        assert listed == names
        assert not any(".envfs-tmp-" in name for name in listed)
        assert not (backing_dir / ".envfs-tmp-0123456789abcdef").exists()
        assert sorted(os.listdir(backing_dir)) == sorted(
            [".envfs-dir", *(backing_of(m, m.mnt / "dir" / name).name for name in names)]
        )
        for name in listed:
            data = (m.mnt / "dir" / name).read_bytes()
            assert data in (b"", b"content of file %d\n" % int(name[1:])), name
        (m.mnt / "dir" / "after").write_bytes(b"after the crash\n")
        assert (m.mnt / "dir" / "after").read_bytes() == b"after the crash\n"


# --- 5. the golden volume of format 1 keeps mounting ------------------------------------------

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "volume-v1"


def test_golden_volume_v1_mounts_and_reads(tmp_path: Path) -> None:
    expected = json.loads((GOLDEN / "expected.json").read_text())
    copy, golden_env = golden_copy(GOLDEN, tmp_path)
    for rel in expected["files"]:
        code, out, err = envfs(golden_env, "inspect", str(copy / "backing" / rel), check=False)
        assert code == 0, err
        assert json.loads(out)["KeyArn"] == expected["key_arn"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(golden_env, copy / "backing", mnt, tmp_path / "golden.log")
    with live(m):
        seen = {str(p.relative_to(mnt)) for p in mnt.rglob("*")}
        assert seen == {*expected["files"], *expected["symlinks"], *expected["directories"]}
        for rel, want in expected["files"].items():
            data = (mnt / rel).read_bytes()
            assert (mnt / rel).stat().st_size == want["size"], rel
            assert (len(data), hashlib.sha256(data).hexdigest()) == (want["size"], want["sha256"])
        for rel, target in expected["symlinks"].items():
            assert os.readlink(mnt / rel) == target
        for rel in expected["directories"]:
            assert (mnt / rel).is_dir() and not (mnt / rel).is_symlink()
        (mnt / "new-file").write_bytes(b"written by this version\n")
        assert (mnt / "new-file").read_bytes() == b"written by this version\n"
    assert "WARNING" not in m.log_text()
