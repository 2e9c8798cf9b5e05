"""``envfs kms *-access-key*`` end to end: the installed ``envfs`` on an embedded store."""

from __future__ import annotations

import json
import os
import re
import sqlite3

import pytest

from tests.integration.conftest import Env
from tests.integration.test_kms_scenario import running_daemon

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="managing others' keys needs root")


def kms_json(env: Env, *args: str) -> dict[str, object]:
    return json.loads(env.run("kms", *args, "--output", "json").stdout)  # type: ignore[no-any-return]


@needs_root
def test_create_list_update_delete_through_the_cli(kms_env: Env) -> None:
    created = kms_json(kms_env, "create-access-key", "--user", "nobody")["AccessKey"]
    assert isinstance(created, dict)
    kid, secret = created["AccessKeyId"], created["SecretAccessKey"]
    assert re.fullmatch(r"EKIA[A-Z2-7]{16}", kid)
    assert re.fullmatch(r"[A-Za-z0-9+/]{40}", secret)
    assert created["UserName"] == "nobody" and created["Status"] == "Active"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)", created["CreateDate"])

    listing = kms_env.run("kms", "list-access-keys", "--user", "65534", "--output", "text").stdout
    assert kid in listing and "Active" in listing and secret not in listing
    kms_env.run("kms", "update-access-key", "--access-key-id", kid, "--status", "Inactive")
    status = kms_env.run(
        "kms", "list-access-keys", "--query", "AccessKeyMetadata[0].Status", "--output", "text"
    ).stdout
    assert status.strip() == "Inactive"
    kms_env.run("kms", "delete-access-key", "--access-key-id", kid)
    assert kms_json(kms_env, "list-access-keys")["AccessKeyMetadata"] == []

    # the secret never reached the store's files, nor the audit log
    store = kms_env.root / "kms" / "local-1"
    for path in store.iterdir():
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    conn = sqlite3.connect(store / "keys.db")
    try:
        ops = [r[0] for r in conn.execute("SELECT record FROM audit ORDER BY seq")]
    finally:
        conn.close()
    assert sum('"operation":"CreateAccessKey"' in r for r in ops) == 1
    assert sum('"operation":"DeleteAccessKey"' in r for r in ops) == 1


def test_an_unknown_user_is_a_usage_error(kms_env: Env) -> None:
    result = kms_env.run("kms", "create-access-key", "--user", "no-such-user-envfs", check=False)
    assert result.returncode == 2
    assert "no such user 'no-such-user-envfs'" in result.stderr
    assert result.stdout == ""


def test_a_bad_status_is_a_validation_error(kms_env: Env) -> None:
    result = kms_env.run(
        "kms",
        "update-access-key",
        "--access-key-id",
        "EKIAAAAAAAAAAAAAAAAA",
        "--status",
        "Off",
        check=False,
    )
    assert result.returncode == 18
    assert "Status 'Off' is not valid" in result.stderr


def test_help_says_the_secret_is_shown_once(kms_env: Env) -> None:
    text = kms_env.run("kms", "create-access-key", "--help").stdout
    assert "--user USER_NAME" in text and "shown this once" in text


@needs_root
def test_the_operations_are_served_by_the_daemon(kms_env: Env) -> None:
    """Over the Unix socket the caller is the kernel's (root here), as for every call."""
    sock = kms_env.root / "kms.sock"
    env = {**kms_env.env, "ENVFS_KMS_SOCKET": str(sock)}
    with running_daemon(env, sock, kms_env.root / "daemon.log") as daemon:
        over_socket = Env(kms_env.root, env)
        created = kms_json(over_socket, "create-access-key", "--user", "nobody")["AccessKey"]
        assert isinstance(created, dict)
        listed = kms_json(over_socket, "list-access-keys", "--user", "nobody")
        assert listed["AccessKeyMetadata"][0]["AccessKeyId"] == created["AccessKeyId"]  # type: ignore[index]
        over_socket.run("kms", "delete-access-key", "--access-key-id", created["AccessKeyId"])
        assert daemon.process.poll() is None
        assert created["SecretAccessKey"] not in daemon.output()
    assert kms_json(kms_env, "list-access-keys", "--embedded")["AccessKeyMetadata"] == []
