"""``envfs kms <verb> --endpoint-url URL`` (``envfs.cli.endpoint``): the verbs against an HTTP
endpoint, with credentials found as aws-cli finds them, printing what the other paths print.

The endpoint is the test server of ``test_httpclient`` (signatures checked by
``envfs.kms.sigv4``, answers by a real ``KeyService``); the integration tests use the real
listener (``envfs kms serve --listen-http``).
"""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from envfs import cli
from envfs.kms.httpclient import Credentials
from envfs.kms.service import KeyService
from tests.unit.endpointd import (  # noqa: F401 (fixtures)
    ROOT,
    Endpointd,
    root_key_fixture,
    server_fixture,
    service_fixture,
)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS configuration but what a test writes: empty config and credentials files in
    ``tmp_path / "aws"``, no AWS variables, no instance metadata."""
    directory = tmp_path / "aws"
    directory.mkdir()
    for name in list(__import__("os").environ):
        if name.startswith(("AWS_", "ENVFS_")):
            monkeypatch.delenv(name)
    (directory / "config").write_text("")
    (directory / "credentials").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(directory / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(directory / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return directory


@pytest.fixture
def env_key(aws_env: Path, root_key: Credentials, monkeypatch: pytest.MonkeyPatch) -> Credentials:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", root_key.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", root_key.secret_access_key)
    return root_key


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["kms", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_the_answer_prints_as_the_embedded_store_s(
    server: Endpointd,
    env_key: Credentials,
    service: KeyService,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key_id = service.handle(ROOT, "CreateKey", {"Description": "same"})["KeyMetadata"]["KeyId"]
    for output in ("json", "text", "table"):
        argv = ("describe-key", "--key-id", key_id, "--output", output)
        code, over_http, err = run(capsys, *argv, "--endpoint-url", server.url)
        assert (code, err) == (0, "")
        code, embedded, err = run(capsys, *argv, "--embedded", "--kms-dir", str(tmp_path))
        assert (code, err) == (0, "")
        assert over_http == embedded


def test_encrypt_and_decrypt_with_blobs_and_queries(
    server: Endpointd,
    env_key: Credentials,
    service: KeyService,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key_id = service.handle(ROOT, "CreateKey", {})["KeyMetadata"]["KeyId"]
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00\xffsecret")
    url = ("--endpoint-url", server.url)
    code, out, _ = run(
        capsys, "encrypt", "--key-id", key_id, "--plaintext", f"fileb://{secret}",
        "--encryption-context", "a=b", "--output", "text", "--query", "CiphertextBlob", *url,
    )  # fmt: skip
    assert code == 0
    sealed = tmp_path / "secret.enc"
    sealed.write_bytes(base64.b64decode(out))
    code, out, _ = run(
        capsys, "decrypt", "--ciphertext-blob", f"fileb://{sealed}", "--encryption-context",
        "a=b", "--output", "text", "--query", "Plaintext", *url,
    )  # fmt: skip
    assert (code, base64.b64decode(out)) == (0, b"\x00\xffsecret")
    code, out, _ = run(capsys, "list-keys", "--query", "length(Keys)", *url)
    assert (code, out) == (0, "1\n")


def test_audit_listing_through_the_endpoint_shows_the_access_key(
    server: Endpointd, env_key: Credentials, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run(capsys, "list-keys", "--endpoint-url", server.url)
    code, out, err = run(capsys, "audit", "--endpoint-url", server.url, "--output", "json")
    assert (code, err) == (0, "")
    records = json.loads(out)["Records"]
    assert records[-1]["operation"] == "ListKeys"
    assert env_key.access_key_id in json.dumps(records[-1])


def test_credentials_from_a_profile_of_the_shared_credentials_file(
    server: Endpointd,
    aws_env: Path,
    root_key: Credentials,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (aws_env / "credentials").write_text(
        f"[envfs]\naws_access_key_id = {root_key.access_key_id}\n"
        f"aws_secret_access_key = {root_key.secret_access_key}\n"
    )
    code, out, err = run(capsys, "list-keys", "--endpoint-url", server.url, "--profile", "envfs")
    assert (code, err) == (0, "") and "Keys" in json.loads(out)
    monkeypatch.setenv("AWS_PROFILE", "envfs")
    monkeypatch.setenv("ENVFS_KMS_ENDPOINT_URL", server.url)
    code, out, err = run(capsys, "list-keys")
    assert (code, err) == (0, "") and "Keys" in json.loads(out)


def test_a_profile_from_aws_profile_with_a_key_in_the_environment_too_is_refused(
    server: Endpointd,
    aws_env: Path,
    root_key: Credentials,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # botocore signs with the variables' key: AWS_PROFILE=alice would have acted as root.
    (aws_env / "credentials").write_text(
        "[alice]\naws_access_key_id = EKIAALICEALICEALICE1\naws_secret_access_key = a\n"
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", root_key.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", root_key.secret_access_key)
    monkeypatch.setenv("AWS_PROFILE", "alice")
    code, out, err = run(capsys, "list-keys", "--endpoint-url", server.url)
    assert (code, out) == (2, "")
    assert err.startswith(
        "envfs: error: AWS_PROFILE names profile 'alice' and AWS_ACCESS_KEY_ID is set too"
    ), err
    assert server.requests == []
    # --profile says whose key it is: the profile's, as botocore takes it.
    code, out, err = run(capsys, "list-keys", "--endpoint-url", server.url, "--profile", "alice")
    assert code == 12 and "UnrecognizedClientException" in err
    assert server.requests[-1][1]["authorization"].split("Credential=")[1].startswith("EKIAALICE")


def test_a_wrong_secret_exits_as_an_auth_failure_with_aws_s_name(
    server: Endpointd,
    aws_env: Path,
    root_key: Credentials,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", root_key.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "B" * 40)
    code, out, err = run(capsys, "list-keys", "--endpoint-url", server.url)
    assert (code, out) == (12, "")
    assert err.startswith("envfs: error: InvalidSignatureException: The request signature")
    assert "B" * 40 not in err


def test_a_stopped_endpoint_is_a_clear_error(
    env_key: Credentials, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("envfs.kms.httpclient.random.random", lambda: 0.0)  # no backoff
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run(capsys, "list-keys", "--endpoint-url", f"http://127.0.0.1:{port}")
    assert (code, out) == (27, "")
    assert err == (
        f"envfs: error: KMSUnavailableException: cannot reach the key service at"
        f" 'http://127.0.0.1:{port}': connection refused\n"
        "envfs: hint: check the URL, and that 'envfs kms serve --listen-http' runs there\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("--endpoint-url", "http://kms.example.org:8080"),
            "argument --endpoint-url: 'http://kms.example.org:8080' is plain http to a host",
        ),
        (("--endpoint-url", "kms.example.org"), "is not an https:// URL"),
        (("--endpoint-url", "https://h:99999"), "is not a URL: Port out of range"),
        (
            ("--endpoint-url", "https://127.0.0.1:1", "--embedded"),
            "argument --embedded: not allowed with --endpoint-url",
        ),
        (
            ("--endpoint-url", "https://127.0.0.1:1", "--socket", "/run/envfs/kms.sock"),
            "argument --socket: not allowed with --endpoint-url (the local key service or",
        ),
        (
            ("--endpoint-url", "https://127.0.0.1:1", "--kms-dir", "/var/lib/envfs/kms"),
            "argument --kms-dir: not allowed with --endpoint-url",
        ),
        (
            ("--endpoint-url", "https://127.0.0.1:1", "--passphrase-file", "/etc/pass"),
            "argument --passphrase-file: not allowed with --endpoint-url",
        ),
        (("--profile", "x"), "argument --profile: only with --endpoint-url URL"),
        (("--ca-bundle", "x"), "argument --ca-bundle: only with --endpoint-url URL"),
        (
            ("--endpoint-url", "https://127.0.0.1:1", "--profile", "nope"),
            "argument --profile: The config profile (nope) could not be found",
        ),
        (("--endpoint-url", "https://127.0.0.1:1", "--cli-read-timeout", "-1"), "-1"),
        (
            ("--endpoint-url", "https://127.0.0.1:1", "--ca-bundle", "/nonexistent"),
            "argument --ca-bundle: '/nonexistent' cannot be used: no such file or directory",
        ),
        (
            ("--endpoint-url", "https://127.0.0.1:1", "--ca-bundle", __file__),
            f"argument --ca-bundle: {__file__!r} cannot be used: not PEM",
        ),
        (
            ("--endpoint-url", "https://127.0.0.1:1"),
            "--endpoint-url needs AWS credentials and the environment or the default profile"
            " has none",
        ),
    ],
)
def test_usage_errors_before_any_call(
    aws_env: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    code, out, err = run(capsys, "list-keys", *argv)
    assert (code, out) == (2, "")
    assert err.startswith("envfs: error: ") and message in err, err


def test_an_unknown_profile_from_the_environment_is_named_so(
    aws_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "nope")
    code, _, err = run(capsys, "list-keys", "--endpoint-url", "https://127.0.0.1:1")
    assert code == 2
    assert err.startswith("envfs: error: AWS_PROFILE: The config profile (nope) could not")


def test_the_environment_s_url_conflicts_with_embedded_by_name(
    aws_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENVFS_KMS_ENDPOINT_URL", "https://127.0.0.1:1")
    code, _, err = run(capsys, "list-keys", "--embedded")
    assert code == 2
    assert "argument --embedded: not allowed with ENVFS_KMS_ENDPOINT_URL" in err


def test_a_socket_flag_is_not_silently_left_for_the_environment_s_url(
    server: Endpointd,
    env_key: Credentials,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # With ENVFS_KMS_ENDPOINT_URL exported, a verb the user aimed at a local socket once
    # went to the remote endpoint (a schedule-key-deletion on the wrong service).
    monkeypatch.setenv("ENVFS_KMS_ENDPOINT_URL", server.url)
    argv = ("schedule-key-deletion", "--key-id", "alias/x", "--socket", str(tmp_path / "s"))
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith(
        "envfs: error: argument --socket: not allowed with ENVFS_KMS_ENDPOINT_URL"
    ), err
    assert server.requests == []
    # The local options' own variables, set for other commands, are no conflict.
    monkeypatch.setenv("ENVFS_KMS_SOCKET", str(tmp_path / "s"))
    monkeypatch.setenv("ENVFS_KMS_DIR", str(tmp_path))
    code, out, err = run(capsys, "list-keys", "--socket", str(tmp_path / "s"))
    assert (code, err) == (0, "")
    assert len(server.requests) == 1


def test_aws_s_endpoint_variables_are_not_read(
    aws_env: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://kms.example.org")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "http://kms.example.org")
    code, _, err = run(capsys, "list-keys", "--embedded", "--kms-dir", str(tmp_path / "none"))
    assert code == 32, err  # the store was looked for: no endpoint was used


def test_aws_max_attempts_bounds_the_attempts(
    env_key: Credentials, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[float] = []
    monkeypatch.setattr("envfs.kms.httpclient.random.random", lambda: 0.0)
    monkeypatch.setattr("time.sleep", attempts.append)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    import envfs.kms.httpclient as httpclient

    real_init = httpclient.HTTPKMSClient.__init__

    def no_real_sleep(self: httpclient.HTTPKMSClient, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **{**kwargs, "sleep": attempts.append})

    monkeypatch.setattr(httpclient.HTTPKMSClient, "__init__", no_real_sleep)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    assert run(capsys, "list-keys", "--endpoint-url", url)[0] == 27
    assert len(attempts) == 4
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert run(capsys, "list-keys", "--endpoint-url", url)[0] == 27
    assert len(attempts) == 4
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "abc")
    code, _, err = run(capsys, "list-keys", "--endpoint-url", url)
    assert code == 2 and "max_attempts (AWS_MAX_ATTEMPTS or the profile's) is not" in err
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "0")
    code, _, err = run(capsys, "list-keys", "--endpoint-url", url)
    assert (
        code == 2
        and "max_attempts (AWS_MAX_ATTEMPTS or the profile) must be 1 or more, not 0" in err
    )


@pytest.mark.parametrize(("text", "seconds"), [("0", None), ("2.5", 2.5), ("30", 30.0)])
def test_timeouts_as_aws_cli_reads_them(text: str, seconds: float | None) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        ["kms", "list-keys", "--cli-connect-timeout", text, "--cli-read-timeout", text]
    )
    assert args.cli_connect_timeout == seconds and args.cli_read_timeout == seconds


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "1e10", "86401"])
def test_a_timeout_python_cannot_wait_is_a_usage_error(
    env_key: Credentials, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    # 1e10 once went on to an OverflowError ("internal error") at the first wait.
    for flag in ("--cli-connect-timeout", "--cli-read-timeout"):
        code, out, err = run(
            capsys, "list-keys", "--endpoint-url", "http://127.0.0.1:1", flag, text
        )
        assert (code, out) == (2, "")
        assert (
            f"argument {flag}: {text!r} is not a number of seconds from 0 (no limit) to 86400"
            in err
        )


def test_a_user_is_the_endpoint_s_to_know(
    server: Endpointd, env_key: Credentials, capsys: pytest.CaptureFixture[str]
) -> None:
    """The endpoint's machine has its own users: no local check of --user first."""
    argv = ("list-access-keys", "--user", "no-such-user-here", "--endpoint-url", server.url)
    code, out, err = run(capsys, *argv)
    assert (code, out) == (18, "")
    assert err.startswith("envfs: error: ValidationException: ")
    code, _, err = run(capsys, "list-access-keys", "--user", "no-such-user-here", "--embedded")
    assert code == 2 and "no such user 'no-such-user-here'" in err


def test_owner_only_audit_jobs_are_refused_with_an_endpoint(
    env_key: Credentials, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "audit", "--archive", str(tmp_path / "a"), "--keep", "1",
        "--endpoint-url", "https://127.0.0.1:1",
    )  # fmt: skip
    assert code == 2 and "not with --endpoint-url" in err


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"AWS_ACCESS_KEY_ID": "EKIAAAAAAAAAAAAAAAAA\r"},  # $(cat key.txt) of a CRLF file
            "the AWS access key id or session token of the environment or the default"
            " profile has spaces, control or non-ASCII characters",
        ),
        (
            {"AWS_ACCESS_KEY_ID": "EKIAAAAAAAAAAAAAAAAA", "AWS_SESSION_TOKEN": "TOKEN-MARK\r"},
            "the AWS credentials found carry a session token",
        ),
    ],
)
def test_credentials_with_a_carriage_return_are_a_usage_error_that_does_not_quote_them(
    server: Endpointd,
    aws_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variables: dict[str, str],
    message: str,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "B" * 40)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, "list-keys", "--endpoint-url", server.url)
    assert (code, out) == (2, "")
    assert err.startswith(f"envfs: error: {message}"), err
    assert "Signature=" not in err and "TOKEN-MARK" not in err and "internal" not in err
    assert server.requests == []


def test_aws_s_temporary_credentials_are_never_sent_to_an_endpoint(
    server: Endpointd,
    aws_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An envfs endpoint refuses any token: a user's exported STS credentials would only
    # have shown their key id and token to whoever runs the endpoint.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAREALAWSKEYID0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "B" * 40)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    code, out, err = run(capsys, "list-keys", "--endpoint-url", server.url)
    assert (code, out) == (2, "")
    assert err.startswith("envfs: error: the AWS credentials found carry a session token")
    assert server.requests == []


@pytest.mark.parametrize("output", ["json", "text", "table"])
def test_an_answer_nested_too_deeply_is_the_service_s_fault_not_a_crash(
    server: Endpointd, env_key: Credentials, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    # Well within the size limit, and once a RecursionError in the printers (exit 1).
    server.canned.append((200, b'{"Keys": ' + b"[" * 900 + b"]" * 900 + b"}"))
    code, out, err = run(capsys, "list-keys", "--endpoint-url", server.url, "--output", output)
    assert (code, out) == (10, "")
    assert err == (
        "envfs: error: KMSInternalException: ListKeys: the answer is nested over 32 levels deep"
        " (the service answered 200 OK: the call was done)\n"
    )


@pytest.mark.parametrize("date", ["1e20", "-1e15", "123456789012345678901234567890"])
def test_a_date_out_of_the_calendar_s_range_prints_as_the_number_sent(
    server: Endpointd, env_key: Credentials, capsys: pytest.CaptureFixture[str], date: str
) -> None:
    # Once an OverflowError or ValueError from datetime: "internal error", exit 1.
    server.canned.append((200, f'{{"KeyMetadata": {{"CreationDate": {date}}}}}'.encode()))
    code, out, err = run(capsys, "describe-key", "--key-id", "x", "--endpoint-url", server.url)
    assert (code, err) == (0, "")
    assert json.loads(out) == {"KeyMetadata": {"CreationDate": json.loads(date)}}


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("SECRET-MARK is not JSON", "JSONDecodeError (details withheld"),
        (
            '{"Version": 1, "AccessKeyId": "EKIAAAAAAAAAAAAAAAAA",'
            ' "SecretAccessKey": "SECRET-MARK", "Expiration": "SECRET-MARK"}',
            "(details withheld",
        ),
        (
            '{"Version": 1, "AccessKeyId": "EKIAAAAAAAAAAAAAAAAA", "SecretAccessKey": 12345}',
            "the access key id, secret or session token is not a string",
        ),
        (
            '{"Version": 1, "AccessKeyId": ["EKIA"], "SecretAccessKey": "SECRET-MARK"}',
            "the access key id, secret or session token is not a string",
        ),
    ],
)
def test_a_credential_process_s_bad_output_is_a_usage_error_that_does_not_quote_it(
    aws_env: Path, capsys: pytest.CaptureFixture[str], output: str, reason: str
) -> None:
    # botocore raises ValueError (JSON, dates) for these, not one of its own errors; and
    # its numbers went on to an AttributeError in signing: "internal error", exit 1.
    script = aws_env / "credentials.sh"
    script.write_text(f"#!/bin/sh\ncat <<'END'\n{output}\nEND\n")
    script.chmod(0o755)
    (aws_env / "config").write_text(f"[profile p]\ncredential_process = {script}\n")
    code, out, err = run(
        capsys, "list-keys", "--endpoint-url", "https://127.0.0.1:1", "--profile", "p"
    )
    assert (code, out) == (2, ""), err
    assert err.startswith("envfs: error: cannot get AWS credentials: ") and reason in err, err
    assert "SECRET-MARK" not in err


def test_the_metadata_services_are_never_asked_for_credentials(
    server: Endpointd,
    aws_env: Path,
    root_key: Credentials,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whoever answers 169.254.169.254 (or the ECS address) on the link would choose the key.
    import botocore.utils

    asked: list[str] = []

    def instance(self: object) -> dict[str, str]:
        asked.append("instance")
        return {
            "role_name": "r",
            "access_key": root_key.access_key_id,
            "secret_key": root_key.secret_access_key,
            "token": "",
            "expiry_time": "2099-01-01T00:00:00Z",
        }

    def container(self: object, full_url: str, headers: object = None) -> dict[str, str]:
        asked.append("container")
        return {
            "AccessKeyId": root_key.access_key_id,
            "SecretAccessKey": root_key.secret_access_key,
            "Token": "",
            "Expiration": "2099-01-01T00:00:00Z",
        }

    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setattr(
        botocore.utils.InstanceMetadataFetcher, "retrieve_iam_role_credentials", instance
    )
    monkeypatch.setattr(botocore.utils.ContainerMetadataFetcher, "retrieve_full_uri", container)
    code, out, err = run(capsys, "list-keys", "--endpoint-url", server.url)
    assert (code, out) == (2, "") and "needs AWS credentials" in err
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/creds")
    code, out, err = run(capsys, "list-keys", "--endpoint-url", server.url)
    assert (code, out) == (2, "") and "needs AWS credentials" in err
    assert asked == [] and server.requests == []
