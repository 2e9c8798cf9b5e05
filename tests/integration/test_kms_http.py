"""The origin document's walkthrough with the real ``aws`` CLI (awscli from PyPI) against
``envfs kms serve --listen-http``.

Root runs the key service over a temporary store whose key creators group is made for the
test (the origin document's myKMSGroup) and gives three users made for the test an access
key each (``envfs kms create-access-key --user``). Then, as in the document, ``aws
configure`` stores each key in a profile, and ``aws --endpoint-url ... kms`` does the rest:

- MyKeyManager (in the group) creates a key whose policy names it key administrator and
  MyKeyUser key user, gives it an alias and a tag, enables its rotation, and is refused
  Encrypt;
- MyKeyUser encrypts ``myfile.txt``, decrypts it, re-encrypts it, makes an envelope data key
  and is refused DisableKey and ScheduleKeyDeletion;
- a stranger is refused Encrypt, Decrypt and CreateKey.

Each request is signed by a profile's access key and nothing else: every ``aws`` runs as
root, and the key service decides it as the key's user. The audit log then shows every call
under that user's uid with the access key that signed it. A second daemon serves TLS
(certificate made here) to ``aws --ca-bundle``; ``serve`` refuses plain HTTP off loopback.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_kms_scenario import Account, accounts  # noqa: F401 (a fixture)
from tests.tlscert import make_certificate

pytestmark = [pytest.mark.integration]

ENVFS = str(Path(sys.executable).with_name("envfs"))
AWS = str(Path(sys.executable).with_name("aws"))
REGION = "local-1"
PLAINTEXT = b"Some text\n"
TIMEOUT = 60
_URL = re.compile(r"HTTP endpoint listening on (https?://\S+)")


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _env(kms_dir: Path, sock: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVFS_", "AWS_"))}
    env.update(ENVFS_KMS_DIR=str(kms_dir), ENVFS_REGION=REGION, ENVFS_KMS_SOCKET=str(sock))
    return env


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path, *args: str) -> Iterator[Service]:
    """``envfs kms serve`` with ``args``, until the block ends (stopped even on failure)."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [ENVFS, "kms", "serve", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while not (found := _URL.search(log.read_text(errors="replace"))):
            if process.poll() is not None:
                raise AssertionError(f"serve exited {process.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not listen on HTTP: {log.read_text()}")
            time.sleep(0.05)
        yield Service(process, found.group(1), log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def envfs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ENVFS, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@dataclass
class Aws:
    """The ``aws`` CLI with a home of its own (``~/.aws`` written by ``aws configure``)."""

    home: Path
    url: str
    cwd: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVFS_", "AWS_"))}
        env["HOME"] = str(self.home)
        return env

    def configure(self, profile: str, access_key: dict[str, Any]) -> None:
        # `aws configure`, as the origin document has it, without the questions.
        for name, value in (
            ("aws_access_key_id", access_key["AccessKeyId"]),
            ("aws_secret_access_key", access_key["SecretAccessKey"]),
            ("region", REGION),
            ("output", "json"),
        ):
            self.run(profile, "configure", "set", name, value, check=True, endpoint=False)

    def run(
        self, profile: str, *args: str, check: bool = False, endpoint: bool = True
    ) -> subprocess.CompletedProcess[str]:
        where = ["--endpoint-url", self.url] if endpoint else []
        proc = subprocess.run(
            [AWS, *where, "--profile", profile, *args],
            env=self.env(),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        if check:
            assert proc.returncode == 0, f"aws {' '.join(args)}: {proc.stderr}"
        return proc

    def ok(self, profile: str, *args: str) -> Any:
        out = self.run(profile, *args, check=True).stdout
        return json.loads(out) if out.strip() else None

    def denied(self, profile: str, *args: str) -> str:
        proc = self.run(profile, *args)
        assert proc.returncode != 0, proc.stdout
        assert "(AccessDeniedException)" in proc.stderr, proc.stderr
        return proc.stderr

    def shell(self, profile: str, script: str) -> str:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            env={**self.env(), "AWS_PROFILE": profile, "AWS": f"{AWS} --endpoint-url {self.url}"},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
        return proc.stdout


def _policy(manager: Account, user: Account) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "Allow access for Key Administrators",
                    "Effect": "Allow",
                    "Principal": {"Unix": [f"user:{manager.name}"]},
                    "Action": [
                        "kms:Create*",
                        "kms:Describe*",
                        "kms:Enable*",
                        "kms:List*",
                        "kms:Put*",
                        "kms:Update*",
                        "kms:Disable*",
                        "kms:Get*",
                        "kms:Delete*",
                        "kms:TagResource",
                        "kms:UntagResource",
                        "kms:ScheduleKeyDeletion",
                        "kms:CancelKeyDeletion",
                    ],
                    "Resource": "*",
                },
                {
                    "Sid": "Allow use of the key",
                    "Effect": "Allow",
                    "Principal": {"Unix": [f"user:{user.name}"]},
                    "Action": [
                        "kms:Encrypt",
                        "kms:Decrypt",
                        "kms:ReEncrypt*",
                        "kms:GenerateDataKey*",
                        "kms:DescribeKey",
                    ],
                    "Resource": "*",
                },
            ],
        }
    )


def test_the_origin_walkthrough_with_the_aws_cli(
    tmp_path: Path,
    accounts: tuple[str, dict[str, Account]],  # noqa: F811
) -> None:
    group, people = accounts
    mgr, usr, oth = people["mgr"], people["usr"], people["oth"]
    env = _env(tmp_path / "kms", tmp_path / "kms.sock")
    assert envfs(env, "kms", "init", "--key-creators-group", group).returncode == 0

    with serving(env, tmp_path / "serve.log", "--listen-http", "127.0.0.1:0") as service:
        assert service.url.startswith("http://127.0.0.1:")
        keys = {}
        for who in (mgr, usr, oth):
            proc = envfs(env, "kms", "create-access-key", "--user", who.name, "--output", "json")
            assert proc.returncode == 0, proc.stderr
            keys[who.role] = json.loads(proc.stdout)["AccessKey"]
        home = tmp_path / "home"
        home.mkdir()
        aws = Aws(home, service.url, tmp_path)
        for role, profile in (("mgr", "MyKeyManager"), ("usr", "MyKeyUser"), ("oth", "Other")):
            aws.configure(profile, keys[role])
        credentials = (home / ".aws" / "credentials").read_text()
        assert keys["usr"]["SecretAccessKey"] in credentials

        # --- MyKeyManager: manages the key, cannot use it. ---------------------------------
        (tmp_path / "policy.json").write_text(_policy(mgr, usr))
        created = aws.ok(
            "MyKeyManager",
            "kms", "create-key", "--description", "MyKey",
            "--tags", "TagKey=Owner,TagValue=MyKeyUser", "--policy", "file://policy.json",
        )["KeyMetadata"]  # fmt: skip
        key_id, arn = created["KeyId"], created["Arn"]
        assert arn.startswith(f"arn:envfs:kms:{REGION}:")
        aws.ok(
            "MyKeyManager",
            "kms", "create-alias", "--alias-name", "alias/MyKey", "--target-key-id", key_id,
        )  # fmt: skip
        aws.ok("MyKeyManager", "kms", "enable-key-rotation", "--key-id", key_id)
        status = aws.ok("MyKeyManager", "kms", "get-key-rotation-status", "--key-id", key_id)
        assert status["KeyRotationEnabled"] is True
        table = aws.run(
            "MyKeyManager", "kms", "describe-key", "--key-id", "alias/MyKey", "--output", "table"
        )
        assert table.returncode == 0 and "DescribeKey" in table.stdout and key_id in table.stdout
        text = aws.run("MyKeyManager", "kms", "list-aliases", "--output", "text", check=True)
        line = next(ln for ln in text.stdout.splitlines() if "\talias/MyKey\t" in ln)
        assert line.startswith("ALIASES\t") and line.endswith(f"\t{key_id}")
        (tmp_path / "myfile.txt").write_bytes(PLAINTEXT)  # echo "Some text" > myfile.txt
        aws.denied(
            "MyKeyManager",
            "kms", "encrypt", "--key-id", "alias/MyKey", "--plaintext", "fileb://myfile.txt",
        )  # fmt: skip

        # --- MyKeyUser: uses the key, cannot manage it. --------------------------------------
        aws.shell(
            "MyKeyUser",
            "$AWS kms encrypt --key-id alias/MyKey --plaintext fileb://myfile.txt"
            " --output text --query CiphertextBlob | base64 -d > myfile.enc",
        )
        blob = (tmp_path / "myfile.enc").read_bytes()
        assert PLAINTEXT.strip() not in blob and len(blob) > len(PLAINTEXT)
        out = aws.shell(
            "MyKeyUser",
            "$AWS kms decrypt --ciphertext-blob fileb://myfile.enc"
            " --output text --query Plaintext | base64 -d",
        )
        assert out.encode() == PLAINTEXT
        aws.shell(
            "MyKeyUser",
            "$AWS kms re-encrypt --ciphertext-blob fileb://myfile.enc"
            " --destination-key-id alias/MyKey --output text --query CiphertextBlob"
            " | base64 -d > myfile.reenc",
        )
        out = aws.shell(
            "MyKeyUser",
            "$AWS kms decrypt --ciphertext-blob fileb://myfile.reenc"
            " --output text --query Plaintext | base64 -d",
        )
        assert out.encode() == PLAINTEXT
        # The envelope: a data key, its wrapped copy decrypting to it.
        data_key = aws.ok(
            "MyKeyUser",
            "kms",
            "generate-data-key",
            "--key-id",
            "alias/MyKey",
            "--key-spec",
            "AES_256",
        )
        (tmp_path / "data-key.enc").write_bytes(base64.b64decode(data_key["CiphertextBlob"]))
        unwrapped = aws.ok(
            "MyKeyUser", "kms", "decrypt", "--ciphertext-blob", "fileb://data-key.enc"
        )
        assert unwrapped["Plaintext"] == data_key["Plaintext"]
        assert len(base64.b64decode(unwrapped["Plaintext"])) == 32
        aws.denied("MyKeyUser", "kms", "disable-key", "--key-id", key_id)
        aws.denied(
            "MyKeyUser",
            "kms", "schedule-key-deletion", "--key-id", key_id, "--pending-window-in-days", "7",
        )  # fmt: skip

        # --- A stranger: neither uses nor manages the key, nor creates one. -------------------
        aws.denied(
            "Other", "kms", "encrypt", "--key-id", key_id, "--plaintext", "fileb://myfile.txt"
        )
        aws.denied("Other", "kms", "decrypt", "--ciphertext-blob", "fileb://myfile.enc")
        aws.denied("Other", "kms", "create-key")

        # --- A wrong secret is no one. -------------------------------------------------------
        aws.configure("Forged", {**keys["usr"], "SecretAccessKey": "A" * 40})
        forged = aws.run("Forged", "kms", "decrypt", "--ciphertext-blob", "fileb://myfile.enc")
        assert forged.returncode != 0 and "(InvalidSignatureException)" in forged.stderr

        # --- The audit log: every call under the key's user, with the key that signed it. -----
        proc = envfs(env, "kms", "audit", "--output", "json")
        assert proc.returncode == 0, proc.stderr
        records = [r for r in json.loads(proc.stdout)["Records"] if "signed_with" in r]
        seen = {(r["caller"]["uid"], r["operation"], r["outcome"]) for r in records}
        denied = "AccessDeniedException"
        for expected in (
            (mgr.uid, "CreateKey", "Success"),
            (mgr.uid, "CreateAlias", "Success"),
            (mgr.uid, "EnableKeyRotation", "Success"),
            (mgr.uid, "Encrypt", denied),
            (usr.uid, "Encrypt", "Success"),
            (usr.uid, "Decrypt", "Success"),
            (usr.uid, "ReEncrypt", "Success"),
            (usr.uid, "GenerateDataKey", "Success"),
            (usr.uid, "DisableKey", denied),
            (usr.uid, "ScheduleKeyDeletion", denied),
            (oth.uid, "Encrypt", denied),
            (oth.uid, "Decrypt", denied),
            (oth.uid, "CreateKey", denied),
        ):
            assert expected in seen, (expected, sorted(seen))
        by_uid = {mgr.uid: keys["mgr"], usr.uid: keys["usr"], oth.uid: keys["oth"]}
        for record in records:
            signer = record["signed_with"]
            assert signer["access_key_id"] == by_uid[record["caller"]["uid"]]["AccessKeyId"]
            assert signer["source"].startswith("127.0.0.1:")
        assert envfs(env, "kms", "audit", "--verify").returncode == 0
        # No secret in the daemon's log.
        log = service.output()
        for key in keys.values():
            assert key["SecretAccessKey"] not in log


def test_tls_for_the_aws_cli_and_no_plain_http_off_loopback(tmp_path: Path) -> None:
    env = _env(tmp_path / "kms", tmp_path / "kms.sock")
    assert envfs(env, "kms", "init").returncode == 0
    cert_file, key_file = make_certificate(tmp_path)

    refused = envfs(env, "kms", "serve", "--listen-http", "0.0.0.0:0")
    assert refused.returncode == 2
    assert "not a loopback address" in refused.stderr and "--tls-cert" in refused.stderr
    half = envfs(env, "kms", "serve", "--listen-http", "127.0.0.1:0", "--tls-cert", str(cert_file))
    assert half.returncode == 2 and "go together" in half.stderr
    bad = envfs(env, "kms", "serve", "--listen-http", "nowhere")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    unknown = envfs(env, "kms", "serve", "--listen-http", "nowhere.invalid:0")
    assert unknown.returncode == 2 and "cannot listen on 'nowhere.invalid'" in unknown.stderr
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    wrong = envfs(
        env, "kms", "serve", "--listen-http", "127.0.0.1:0", "--tls-cert", str(junk),
        "--tls-key", str(key_file),
    )  # fmt: skip
    assert wrong.returncode == 2 and "cannot load the certificate" in wrong.stderr

    key = envfs(env, "kms", "create-access-key", "--user", "root", "--embedded", "--output", "json")
    access_key = json.loads(key.stdout)["AccessKey"]
    tls = ("--tls-cert", str(cert_file), "--tls-key", str(key_file))
    with serving(env, tmp_path / "serve.log", "--listen-http", "127.0.0.1:0", *tls) as service:
        assert service.url.startswith("https://127.0.0.1:")
        home = tmp_path / "home"
        home.mkdir()
        aws = Aws(home, service.url, tmp_path)
        aws.configure("root", access_key)
        untrusted = aws.run("root", "kms", "list-keys")
        assert untrusted.returncode != 0 and "SSL" in untrusted.stderr
        trusted = aws.run("root", "--ca-bundle", str(cert_file), "kms", "list-keys", check=True)
        assert json.loads(trusted.stdout)["Keys"] == []


def test_the_aws_cli_reaches_every_operation_envfs_shares_with_aws(tmp_path: Path) -> None:
    """Each ``aws kms`` verb of an operation envfs has, once, against the endpoint."""
    import botocore.session

    from envfs.kms.operations import OPERATIONS

    env = _env(tmp_path / "kms", tmp_path / "kms.sock")
    assert envfs(env, "kms", "init").returncode == 0
    key = envfs(env, "kms", "create-access-key", "--user", "root", "--embedded", "--output", "json")
    access_key = json.loads(key.stdout)["AccessKey"]
    model = botocore.session.get_session().get_service_model("kms")
    shared = set(OPERATIONS) & set(model.operation_names)
    with serving(env, tmp_path / "serve.log", "--listen-http", "127.0.0.1:0") as service:
        home = tmp_path / "home"
        home.mkdir()
        aws = Aws(home, service.url, tmp_path)
        aws.configure("root", access_key)
        key_id = aws.ok("root", "kms", "create-key")["KeyMetadata"]["KeyId"]
        other = aws.ok("root", "kms", "create-key")["KeyMetadata"]["KeyId"]
        (tmp_path / "p.txt").write_bytes(PLAINTEXT)
        aws.shell(
            "root",
            f"$AWS kms encrypt --key-id {key_id} --plaintext fileb://p.txt"
            " --output text --query CiphertextBlob | base64 -d > p.enc",
        )
        policy = aws.ok("root", "kms", "get-key-policy", "--key-id", key_id)["Policy"]
        (tmp_path / "policy.json").write_text(policy)
        k, o = ("--key-id", key_id), ("--key-id", other)
        verbs: list[tuple[str, tuple[str, ...]]] = [
            ("CreateKey", ("create-key", "--description", "d")),
            ("DescribeKey", ("describe-key", *k)),
            ("ListKeys", ("list-keys", "--limit", "5")),
            ("DisableKey", ("disable-key", *o)),
            ("EnableKey", ("enable-key", *o)),
            ("ScheduleKeyDeletion", ("schedule-key-deletion", *o, "--pending-window-in-days", "7")),
            ("CancelKeyDeletion", ("cancel-key-deletion", *o)),
            ("EnableKey", ("enable-key", *o)),  # a cancelled deletion leaves it disabled
            ("UpdateKeyDescription", ("update-key-description", *k, "--description", "n")),
            ("CreateAlias", ("create-alias", "--alias-name", "alias/x", "--target-key-id", key_id)),
            ("UpdateAlias", ("update-alias", "--alias-name", "alias/x", "--target-key-id", other)),
            ("ListAliases", ("list-aliases",)),
            ("DeleteAlias", ("delete-alias", "--alias-name", "alias/x")),
            ("TagResource", ("tag-resource", *k, "--tags", "TagKey=a,TagValue=b")),
            ("ListResourceTags", ("list-resource-tags", *k)),
            ("UntagResource", ("untag-resource", *k, "--tag-keys", "a")),
            ("Encrypt", ("encrypt", *k, "--plaintext", "fileb://p.txt")),
            ("Decrypt", ("decrypt", "--ciphertext-blob", "fileb://p.enc")),
            ("ReEncrypt", ("re-encrypt", "--ciphertext-blob", "fileb://p.enc",
                           "--destination-key-id", other)),
            ("GenerateDataKey", ("generate-data-key", *k, "--key-spec", "AES_256")),
            ("GenerateDataKeyWithoutPlaintext",
             ("generate-data-key-without-plaintext", *k, "--number-of-bytes", "16")),
            ("GenerateRandom", ("generate-random", "--number-of-bytes", "8")),
            ("EnableKeyRotation", ("enable-key-rotation", *k)),
            ("GetKeyRotationStatus", ("get-key-rotation-status", *k)),
            ("DisableKeyRotation", ("disable-key-rotation", *k)),
            ("RotateKeyOnDemand", ("rotate-key-on-demand", *k)),
            ("ListKeyRotations", ("list-key-rotations", *k)),
            ("GetKeyPolicy", ("get-key-policy", *k)),
            ("ListKeyPolicies", ("list-key-policies", *k)),
            ("PutKeyPolicy", ("put-key-policy", *k, "--policy", "file://policy.json")),
        ]  # fmt: skip
        assert {name for name, _ in verbs} == shared
        for name, args in verbs:
            proc = aws.run("root", "kms", *args)
            assert proc.returncode == 0, f"{name}: {proc.stderr}"
        # aws-cli's own output formats, on one of them.
        text = aws.run("root", "kms", "list-key-policies", *k, "--output", "text", check=True)
        assert text.stdout.split() == ["POLICYNAMES", "default"]  # aws-cli pages for itself
        table = aws.run("root", "kms", "list-key-policies", *k, "--output", "table", check=True)
        assert "ListKeyPolicies" in table.stdout and "default" in table.stdout
