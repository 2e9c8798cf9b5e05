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

from tests.integration.conftest import Env, Mount, as_user, is_mounted, live
from tests.integration.test_kms_http import _env, envfs, serving
from tests.integration.test_kms_scenario import Account, accounts  # noqa: F401 (a fixture)
from tests.tlscert import make_certificate
from tests.unit.motokms import Moto, Outage, moto_server, no_home_aws, write_mapping

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting for other users needs root"),
]

WRITER = 4242  # mapped to the IAM user "writer"
READER = 4244  # mapped to the IAM user "reader"
STRANGER = 4343  # no mapping at all
DENIED = 4345  # mapped to an IAM user without any KMS permission


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
        assert f"mount it with: envfs mount {backing} MOUNTPOINT --key-arn {key}\n" in out
        info = json.loads(env.run("info", str(backing)).stdout)
        assert (info["KeyArn"], info["Region"]) == (key, "eu-west-1")
        assert info["KeyService"] == "AWS KMS (partition aws)"

        mnt = base / "mnt"
        mnt.mkdir()
        # Read at each entry's first use, a mapping under the mount point would be read
        # through the mount itself: refused before mounting (-o nonempty lets it be there).
        inside = mnt / "users.toml"
        shutil.copy2(mapping, inside)
        try:
            refused = env.run(
                "mount", str(backing), str(mnt), "--key-arn", key, "-o", "nonempty",
                "--kms", moto.url, "--kms-credentials", str(inside), check=False,
            )  # fmt: skip
            assert (refused.returncode, is_mounted(mnt)) == (62, False), refused.stderr
            assert "it is under the mount point" in refused.stderr
        finally:
            if is_mounted(mnt):  # the refusal failed: leave no mount behind
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        inside.unlink()
        m = Mount(env, backing, mnt, base / "mount.log", ("--allow-other", "--key-arn", key, *kms))
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
        link_kms = ("--kms", link.url, "--kms-credentials", str(mapping))
        unpinned = env.run("mount", str(copy), str(mnt2), *link_kms, check=False)
        assert unpinned.returncode == 2 and not is_mounted(mnt2)
        assert unpinned.stderr.startswith(
            f"envfs: error: --kms {link.url} needs --key-arn ARN: the volume file is"
            " authenticated by the key it names"
        ), unpinned.stderr
        m2 = Mount(
            env, copy, mnt2, base / "mount2.log",
            ("--allow-other", *link_kms, "--key-arn", key,
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


def test_a_volume_on_another_machines_envfs_key_service(
    accounts: tuple[str, dict[str, Account]],  # noqa: F811
) -> None:
    """The same provider pointed at envfs's own key service over HTTPS (``envfs kms serve
    --listen-http`` with TLS): each user's opens are signed with that user's access key
    and decided and audited by the key service as that user; mounted through a volume
    configuration."""
    _, people = accounts
    usr, oth = people["usr"], people["oth"]
    base = Path(tempfile.mkdtemp(prefix="envfs-fleet-", dir="/tmp"))
    base.chmod(0o755)
    try:
        env = _env(base / "kms", base / "kms.sock")
        assert envfs(env, "kms", "init").returncode == 0
        cert, tls_key = make_certificate(base)
        tls = ("--tls-cert", str(cert), "--tls-key", str(tls_key))
        with serving(env, base / "serve.log", "--listen-http", "127.0.0.1:0", *tls) as service:
            assert service.url.startswith("https://127.0.0.1:")
            made = envfs(env, "kms", "create-key", "--key-users", f"uid:0,user:{usr.name}")
            key_arn = json.loads(made.stdout)["KeyMetadata"]["Arn"]
            secrets = base / "secrets"
            secrets.mkdir(mode=0o700)
            lines, entries = [], []
            for profile, who in (("root", "root"), ("usr", usr.name), ("oth", oth.name)):
                out = envfs(env, "kms", "create-access-key", "--user", who, "--output", "json")
                access = json.loads(out.stdout)["AccessKey"]
                lines += [f"[{profile}]", f"aws_access_key_id = {access['AccessKeyId']}"]
                lines += [f"aws_secret_access_key = {access['SecretAccessKey']}"]
                uid = 0 if who == "root" else (usr.uid if profile == "usr" else oth.uid)
                entries.append(f'[[map]]\nprincipal = "uid:{uid}"\nprofile = "{profile}"\n')
            creds = secrets / "credentials"
            creds.write_text("\n".join(lines) + "\n")
            creds.chmod(0o600)
            mapping = write_mapping(secrets, creds, "".join(entries))
            kms = ("--kms", service.url, "--kms-credentials", str(mapping))
            mount_env = env_for(base)
            backing = base / "backing"
            untrusted = mount_env.run("init", str(backing), "--key-id", key_arn, *kms, check=False)
            assert untrusted.returncode == 27 and "cannot be reached" in untrusted.stderr
            assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr
            mount_env.run(
                "init", str(backing), "--key-id", key_arn, *kms, "--kms-ca-bundle", str(cert)
            )
            info = json.loads(mount_env.run("info", str(backing)).stdout)
            assert (info["KeyArn"], info["KeyService"]) == (key_arn, "envfs")

            mnt = base / "mnt"
            mnt.mkdir()
            volumes = base / "volumes"
            volumes.mkdir()
            (volumes / "fleet.toml").write_text(
                f'backing = "{backing}"\nmountpoint = "{mnt}"\nallow_other = true\n'
                f'log_file = "{base / "mount.log"}"\n'
                f'[kms]\nservice = "{service.url}"\ncredentials = "{mapping}"\n'
                f'ca_bundle = "{cert}"\nkey_arn = "{key_arn}"\n'
            )
            mount_env.run(  # every open a decision of the key service, for the audit
                "mount", "--config", "fleet", "--config-dir", str(volumes),
                "--key-cache-seconds", "0",
            )  # fmt: skip
            try:
                assert is_mounted(mnt)
                mnt.chmod(0o777)
                mine = as_user(usr.uid, f"echo fleet > {mnt}/f.txt && chmod 666 {mnt}/f.txt")
                assert mine.returncode == 0, mine.stderr
                assert as_user(usr.uid, f"cat {mnt}/f.txt").stdout == "fleet\n"
                for uid in (oth.uid, STRANGER):  # refused by the key policy; no mapping
                    refused = as_user(uid, f"cat {mnt}/f.txt")
                    assert "Permission denied" in refused.stderr, refused.stderr
            finally:
                if is_mounted(mnt):
                    mount_env.run("umount", str(mnt), check=False)
                if is_mounted(mnt):
                    subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
            audit = envfs(env, "kms", "audit", "--key-id", key_arn)
            records = json.loads(audit.stdout)["Records"]
            seen = {(r["operation"], r["caller"]["uid"], r["outcome"]) for r in records}
            assert ("Decrypt", usr.uid, "Success") in seen
            assert ("GenerateDataKey", usr.uid, "Success") in seen
            assert ("Decrypt", oth.uid, "AccessDeniedException") in seen
            assert not any(r["caller"]["uid"] == STRANGER for r in records)
            for secret_line in lines:
                if secret_line.startswith("aws_secret_access_key"):
                    assert secret_line.split(" = ")[1] not in (base / "mount.log").read_text()
    finally:
        shutil.rmtree(base, ignore_errors=True)
