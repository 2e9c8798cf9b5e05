"""Mounts whose master key lives in AWS KMS: moto's server mode on loopback stands in for
AWS (KMS, IAM), enforcing IAM policies; each user's opens are decided with that user's AWS
identity from the credential mapping. No test needs the internet.

Users are bare uids (no account needed: the mapping names ``uid:N``); every mount is
unmounted and the moto server stopped even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Env, Mount, live
from tests.unit.motokms import Moto, Outage, moto_server, no_home_aws, write_mapping

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting for other users needs root"),
]

WRITER = 4242  # mapped to the IAM user "writer"
READER = 4244  # mapped to the IAM user "reader"
STRANGER = 4343  # no mapping at all
DENIED = 4345  # mapped to an IAM user without any KMS permission


def as_user(uid: int, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            "--reuid",
            str(uid),
            "--regid",
            str(uid),
            "--clear-groups",
            "sh",
            "-c",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def aws_setup() -> Iterator[tuple[Path, Moto, Path, str]]:
    """A world-traversable folder, a moto server with a key and four IAM users, and a
    credential mapping (root, WRITER, READER, DENIED; not STRANGER)."""
    base = Path(tempfile.mkdtemp(prefix="envfs-aws-", dir="/tmp"))
    base.chmod(0o755)
    try:
        with no_home_aws(base), moto_server() as moto:
            key = moto.create_key()
            for name in ("admin", "writer", "reader"):
                moto.create_user(name)
            moto.create_user("denied", policy=None)
            secrets = base / "secrets"
            secrets.mkdir(mode=0o700)
            creds = moto.write_credentials(secrets, {u: u for u in moto.users})
            mapping = write_mapping(
                secrets,
                creds,
                "".join(
                    f'[[map]]\nprincipal = "uid:{uid}"\nprofile = "{name}"\n'
                    for uid, name in (
                        (0, "admin"),
                        (WRITER, "writer"),
                        (READER, "reader"),
                        (DENIED, "denied"),
                    )
                ),
            )
            moto.enforce_iam()
            yield base, moto, mapping, key
    finally:
        shutil.rmtree(base, ignore_errors=True)


def env_for(base: Path) -> Env:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVFS_", "AWS_"))}
    env.update(ENVFS_KMS_DIR=str(base / "no-kms"), ENVFS_DEBUG="1")  # DEBUG: no secret either
    return Env(base, env)


def test_a_volume_on_an_aws_kms_key(tmp_path: Path) -> None:
    with aws_setup() as (base, moto, mapping, key):
        env = env_for(base)
        kms = ("--kms", moto.url, "--kms-credentials", str(mapping))
        backing = base / "backing"
        out = env.run("init", str(backing), "--key-id", key, *kms).stdout
        assert f"key:    {key}\n" in out
        info = json.loads(env.run("info", str(backing)).stdout)
        assert (info["KeyArn"], info["Region"]) == (key, "eu-west-1")
        assert info["KeyService"] == "AWS KMS (partition aws)"

        mnt = base / "mnt"
        mnt.mkdir()
        m = Mount(env, backing, mnt, base / "mount.log", ("--allow-other", *kms))
        with live(m):
            mnt.chmod(0o777)
            wrote = as_user(WRITER, f"echo from-writer > {mnt}/a.txt && chmod 666 {mnt}/a.txt")
            assert wrote.returncode == 0, wrote.stderr
            both = as_user(READER, f"cat {mnt}/a.txt && echo from-reader > {mnt}/b.txt")
            assert (both.returncode, both.stdout) == (0, "from-writer\n"), both.stderr
            assert (mnt / "b.txt").stat().st_uid == READER
            # Mode bits allow it; the key service does not: no mapping, no AWS permission.
            for uid in (STRANGER, DENIED):
                refused = as_user(uid, f"cat {mnt}/a.txt")
                assert refused.returncode != 0 and refused.stdout == ""
                assert "Permission denied" in refused.stderr, refused.stderr
            assert as_user(STRANGER, f"echo x > {mnt}/c.txt").returncode != 0
        info = json.loads(env.run("info", str(backing)).stdout)
        assert (info["Files"], info["Problems"]) == (2, [])
        assert "from-writer" not in "".join(p.name for p in backing.rglob("*"))

        # A second machine: a copy of the backing folder, mounted on its own, reaching the
        # service through a link that can fail; every open asks AWS (no key cache), so an
        # outage shows at once.
        copy, mnt2 = base / "copy", base / "mnt2"
        subprocess.run(["cp", "-a", str(backing), str(copy)], check=True)
        mnt2.mkdir()
        link = Outage(moto.port)
        link.up()
        m2 = Mount(
            env, copy, mnt2, base / "mount2.log",
            ("--allow-other", "--kms", link.url, "--kms-credentials", str(mapping),
             "--key-cache-seconds", "0", "--kms-timeout", "2"),
        )  # fmt: skip
        try:
            with live(m2):
                mnt2.chmod(0o777)
                read = as_user(READER, f"cat {mnt2}/a.txt {mnt2}/b.txt")
                assert read.stdout == "from-writer\nfrom-reader\n", read.stderr
                link.down()
                start = time.monotonic()
                down = as_user(READER, f"cat {mnt2}/a.txt")
                assert time.monotonic() - start < 20  # bounded: timeouts and retries
                assert down.returncode != 0 and "Host is down" in down.stderr, down.stderr
                assert as_user(READER, f"cat {mnt2}/b.txt").returncode != 0  # failing fast
                link.up()
                deadline = time.monotonic() + 15
                while True:  # back once the backoff has passed
                    again = as_user(READER, f"cat {mnt2}/a.txt")
                    if again.returncode == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert again.stdout == "from-writer\n", again.stderr
        finally:
            link.down()
        log = m2.log_text()
        assert "key service unavailable" in log and "reachable again" in log
        for text in (m.log_text(), log):
            for _access, secret in moto.users.values():
                assert secret not in text


def test_init_refuses_without_a_mapping_for_the_user(tmp_path: Path) -> None:
    with aws_setup() as (base, moto, mapping, key):
        env = env_for(base)
        backing = base / "backing"
        result = env.run("init", str(backing), "--key-id", key, "--kms", moto.url, check=False)
        assert result.returncode == 2
        assert "needs a credential mapping: --kms-credentials FILE" in result.stderr
        mapping.chmod(0o666)
        result = env.run(
            "init", str(backing), "--key-id", key, "--kms", moto.url,
            "--kms-credentials", str(mapping), check=False,
        )  # fmt: skip
        assert result.returncode == 62 and "not trusted" in result.stderr, result.stderr
        assert not backing.exists()
        assert "Traceback" not in result.stderr
