"""``envfs kms <verb> --endpoint-url URL`` against the real HTTP endpoint (``envfs kms serve
--listen-http``): requests signed with a Unix user's access key, decided and audited as
that user; credentials from ``AWS_*`` variables and from a shared credentials file; a wrong
secret, a stopped endpoint, TLS with and without the CA."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Env
from tests.integration.test_kms_http import Service
from tests.integration.test_kms_http import serving as http_serving
from tests.tlscert import make_certificate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="access keys of another user need root")

USER, UID = "nobody", 65534  # a key creator: the store's key creators group is its group


@contextlib.contextmanager
def serving(env: Env, *tls: str) -> Iterator[Service]:
    """``envfs kms serve`` on a Unix socket and on 127.0.0.1 (a port of its choosing)."""
    log = env.root / f"serve-{time.monotonic_ns()}.log"
    sock = env.root / "kms.sock"
    try:
        with http_serving(
            env.env, log, "--socket", str(sock), "--listen-http", "127.0.0.1:0", *tls
        ) as service:
            yield service
    finally:
        sock.unlink(missing_ok=True)


@pytest.fixture
def store(tmp_path: Path) -> Env:
    """A store whose key creators group is ``nobody``'s, and an AWS configuration that holds
    nothing but what a test writes (no variables, no instance metadata)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ENVFS_"))}
    aws = tmp_path / "aws"
    aws.mkdir()
    (aws / "config").write_text("")
    (aws / "credentials").write_text("")
    env.update(
        ENVFS_KMS_DIR=str(tmp_path / "kms"),
        ENVFS_KMS_SOCKET=str(tmp_path / "no-daemon.sock"),
        ENVFS_REGION="local-1",
        AWS_CONFIG_FILE=str(aws / "config"),
        AWS_SHARED_CREDENTIALS_FILE=str(aws / "credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.pop("CREDENTIALS_DIRECTORY", None)
    store = Env(tmp_path, env)
    store.run("kms", "init", "--key-creators-group", "nogroup")
    return store


def access_key(store: Env) -> tuple[str, str]:
    """A new access key of ``nobody``'s, made by root on the store."""
    made = json.loads(store.run("kms", "create-access-key", "--user", USER, "--embedded").stdout)[
        "AccessKey"
    ]
    return made["AccessKeyId"], made["SecretAccessKey"]


def with_env(store: Env, **extra: str) -> Env:
    return Env(store.root, {**store.env, **extra})


def test_the_verbs_over_the_endpoint_act_as_the_access_key_s_user(store: Env) -> None:
    key_id, secret = access_key(store)
    (store.root / "aws" / "credentials").write_text(
        f"[envfs]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
    )
    plaintext = store.root / "plain.bin"
    plaintext.write_bytes(b"\x00over http\xff")
    with serving(store) as endpoint:
        url = ("--endpoint-url", endpoint.url)
        by_env = with_env(store, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
        by_profile = with_env(store, AWS_PROFILE="envfs")
        by_flag = store
        made = by_env.kms("create-key", "--description", "over http", *url)
        arn = made["KeyMetadata"]["Arn"]  # type: ignore[index]
        assert arn.startswith("arn:envfs:kms:local-1:")
        sealed = by_profile.run(
            "kms", "encrypt", "--key-id", arn, "--plaintext", f"fileb://{plaintext}",
            "--encryption-context", "purpose=test", "--output", "text",
            "--query", "CiphertextBlob", *url,
        ).stdout  # fmt: skip
        blob = store.root / "sealed.b64"
        blob.write_text(sealed)
        opened = by_flag.run(
            "kms", "decrypt", "--ciphertext-blob", f"file://{blob}", "--encryption-context",
            "purpose=test", "--output", "text", "--query", "Plaintext", *url, "--profile", "envfs",
        ).stdout  # fmt: skip
        assert base64.b64decode(opened) == b"\x00over http\xff"
        listed = by_env.run(
            "kms", "list-keys", "--query", "Keys[*].KeyArn", "--output", "text", *url
        )
        assert listed.stdout.split() == [arn]
        # The same answers print the same through the socket.
        over_socket = with_env(store, ENVFS_KMS_SOCKET=str(store.root / "kms.sock"))
        assert (
            over_socket.run("kms", "list-keys").stdout
            == store.run("kms", "list-keys", *url, "--profile", "envfs").stdout
        )
        assert secret not in endpoint.output()
        records = json.loads(over_socket.run("kms", "audit", "--output", "json").stdout)["Records"]
    signed = [r for r in records if "signed_with" in r]
    assert [r["operation"] for r in signed] == ["CreateKey", "Encrypt", "Decrypt"] + [
        "ListKeys"
    ] * 2
    for record in signed:
        assert record["caller"] == {"uid": UID, "gid": UID, "user": USER}
        assert record["signed_with"]["access_key_id"] == key_id
        assert record["outcome"] == "Success"
        assert secret not in json.dumps(record)


def test_a_wrong_secret_is_refused_with_aws_s_name(store: Env) -> None:
    key_id, secret = access_key(store)
    wrong = with_env(store, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret[::-1])
    unknown = with_env(
        store, AWS_ACCESS_KEY_ID="EKIAAAAAAAAAAAAAAAAA", AWS_SECRET_ACCESS_KEY=secret
    )
    with serving(store) as endpoint:
        result = wrong.run("kms", "list-keys", "--endpoint-url", endpoint.url, check=False)
        assert result.returncode == 12 and result.stdout == ""
        assert result.stderr.startswith("envfs: error: InvalidSignatureException: ")
        result = unknown.run("kms", "list-keys", "--endpoint-url", endpoint.url, check=False)
        assert result.returncode == 12
        assert result.stderr.startswith("envfs: error: UnrecognizedClientException: ")
    for text in (result.stderr, endpoint.output()):
        assert secret not in text and secret[::-1] not in text


def test_a_stopped_endpoint_cannot_be_reached(store: Env) -> None:
    key_id, secret = access_key(store)
    caller = with_env(store, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    with serving(store) as endpoint:
        caller.run("kms", "list-keys", "--endpoint-url", endpoint.url)
    started = time.monotonic()
    result = caller.run("kms", "list-keys", "--endpoint-url", endpoint.url, check=False)
    assert time.monotonic() - started < 15
    assert result.returncode == 27 and result.stdout == ""
    assert result.stderr.startswith(
        f"envfs: error: KMSUnavailableException: cannot reach the key service at"
        f" '{endpoint.url}': connection refused\n"
    )
    assert "Traceback" not in result.stderr


def test_tls_with_and_without_the_ca(store: Env) -> None:
    cert, key = make_certificate(store.root)
    key_id, secret = access_key(store)
    caller = with_env(store, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    with serving(store, "--tls-cert", str(cert), "--tls-key", str(key)) as endpoint:
        assert endpoint.url.startswith("https://127.0.0.1:")
        url = ("--endpoint-url", endpoint.url)
        assert "Keys" in caller.kms("list-keys", *url, "--ca-bundle", str(cert))
        assert "Keys" in with_env(caller, AWS_CA_BUNDLE=str(cert)).kms("list-keys", *url)
        result = caller.run("kms", "list-keys", *url, check=False)
        assert result.returncode == 27 and result.stdout == ""
        assert result.stderr == (
            f"envfs: error: KMSUnavailableException: cannot reach the key service at"
            f" '{endpoint.url}' securely: its TLS certificate does not verify (self-signed"
            " certificate)\n"
            "envfs: hint: if it is signed by your own CA, give that CA's certificate with"
            " --ca-bundle FILE (or AWS_CA_BUNDLE)\n"
        )
        # Plain http to the TLS port is not an answer either.
        plain = endpoint.url.replace("https://", "http://")
        result = caller.run("kms", "list-keys", "--endpoint-url", plain, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.startswith("envfs: error: ")
