"""The AWS KMS key provider against a real HTTP endpoint on loopback: moto's server mode
standing in for AWS KMS, IAM and STS. No test needs the internet."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.errors import (
    AccessDeniedException,
    DependencyTimeoutException,
    IncorrectKeyException,
    IntegrityError,
    InvalidCiphertextException,
    KMSInternalException,
    KMSUnavailableException,
    NotFoundException,
    VolumeError,
)
from envfs.files import fileformat
from envfs.files.inodes import ROOT_INODE
from envfs.files.vfs import Vfs
from envfs.files.volume import VOLUME_FILE, Volume
from envfs.identity import Caller
from envfs.keys.awscreds import load_mapping
from envfs.keys.awskms import AwsKmsProvider
from tests.unit.motokms import REGION, Moto, free_port, moto_server, no_home_aws, write_mapping

ALICE = Caller(5001, 5001, frozenset({5001, 6000}), "alice", frozenset({"alice", "staff"}))
BOB = Caller(5002, 5002, frozenset({5002, 6000}), "bob", frozenset({"bob", "staff"}))
CAROL = Caller(5003, 5003, frozenset({5003}), "carol", frozenset({"carol"}))
CONTEXT = {"envfs:volume": "v", "envfs:file": "00" * 16}


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[Moto]:
    with no_home_aws(tmp_path), moto_server() as server:
        yield server


def provider_for(moto: Moto, tmp_path: Path, entries: str, **kwargs: object) -> AwsKmsProvider:
    creds = moto.write_credentials(tmp_path, {name: name for name in moto.users})
    mapping = load_mapping(
        write_mapping(tmp_path, creds, entries, f'sts_endpoint_url = "{moto.url}"')
    )
    return AwsKmsProvider(REGION, mapping, endpoint_url=moto.url, **kwargs)  # type: ignore[arg-type]


ALICE_ONLY = '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n'
TWO_USERS = """
[[map]]
principal = "user:alice"
profile = "alice"

[[map]]
principal = "uid:5002"
profile = "bob"
"""


def alice_credentials(folder: Path) -> Path:
    """A credentials file (0600) in ``folder`` with one profile, ``alice``: the one
    ``ALICE_ONLY`` maps alice to."""
    creds = folder / "credentials"
    creds.write_text("[alice]\naws_access_key_id = AKIAALICE\naws_secret_access_key = s\n")
    creds.chmod(0o600)
    return creds


def test_data_key_round_trip_with_the_context_bound(moto: Moto, tmp_path: Path) -> None:
    key = moto.create_key()
    moto.create_user("alice")
    moto.create_user("bob")
    provider = provider_for(moto, tmp_path, TWO_USERS)
    made = provider.generate_data_key(key, CONTEXT, ALICE, "note")
    assert made.key_arn == key and len(made.plaintext) == 32
    assert provider.decrypt(made.wrapped, key, CONTEXT, BOB, "n") == made.plaintext
    with pytest.raises(InvalidCiphertextException):
        provider.decrypt(made.wrapped, key, {**CONTEXT, "envfs:file": "11" * 16}, ALICE, "n")
    assert provider.describe_key(key, ALICE) == key
    # AWS's blobs are opaque: never parsed, and the volume's early check is left to Decrypt.
    assert provider.read_wrapped(made.wrapped) is None and provider.reads_wrapped is False
    provider.close()


def test_an_unmapped_user_is_refused_without_a_call(moto: Moto, tmp_path: Path) -> None:
    key = moto.create_key()
    moto.create_user("alice")
    provider = provider_for(
        moto, tmp_path, '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n'
    )
    with pytest.raises(
        AccessDeniedException,
        match=r"^carol\(5003\) has no AWS identity in '.*aws-users.toml': not allowed to use"
        r" the key service$",
    ):
        provider.generate_data_key(key, CONTEXT, CAROL, "n")
    assert provider._clients.keys() == set()  # no client, so no request, for carol


def test_iam_decides_per_user(moto: Moto, tmp_path: Path) -> None:
    """Two users, two AWS identities: IAM allows one and refuses the other (moto enforcing
    IAM policies, as AWS does)."""
    key = moto.create_key()
    moto.create_user("alice")
    moto.create_user("bob", policy=None)  # no permission at all
    provider = provider_for(moto, tmp_path, TWO_USERS)
    moto.enforce_iam()
    made = provider.generate_data_key(key, CONTEXT, ALICE, "n")
    with pytest.raises(
        AccessDeniedException,
        match=r"^Decrypt refused for mapping 'uid:5002' \(profile 'bob'\): User:"
        r" arn:aws:iam::[0-9]+:user/bob is not authorized to perform: kms:Decrypt",
    ):
        provider.decrypt(made.wrapped, key, CONTEXT, BOB, "n")
    assert provider.decrypt(made.wrapped, key, CONTEXT, ALICE, "n") == made.plaintext
    assert set(provider._clients) == {0, 1}  # one client per mapping entry, reused


def test_a_role_assumed_from_a_profile(moto: Moto, tmp_path: Path) -> None:
    key = moto.create_key()
    moto.create_user("base", policy={"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]})  # fmt: skip
    role = moto.create_role("envfs-staff")
    provider = provider_for(
        moto,
        tmp_path,
        f'[[map]]\nprincipal = "group:staff"\nprofile = "base"\nrole_arn = "{role}"\n'
        'role_session_name = "envfs-test"\n',
    )
    moto.enforce_iam()
    made = provider.generate_data_key(key, CONTEXT, BOB, "n")  # as the role, not as "base"
    assert provider.decrypt(made.wrapped, key, CONTEXT, ALICE, "n") == made.plaintext
    # "base" itself may not use KMS: the role's permission is what allowed it.
    access, secret = moto.users["base"]
    kms = moto.client("kms", aws_access_key_id=access, aws_secret_access_key=secret)
    with pytest.raises(Exception, match="not authorized"):
        kms.describe_key(KeyId=key)


def test_user_entries_come_before_group_entries(moto: Moto, tmp_path: Path) -> None:
    key = moto.create_key()
    moto.create_user("team")
    moto.create_user("alice", policy=None)
    provider = provider_for(
        moto,
        tmp_path,
        '[[map]]\nprincipal = "group:staff"\nprofile = "team"\n'
        '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n',
    )
    assert provider.mapping.source_for(ALICE).profile == "alice"  # type: ignore[union-attr]
    assert provider.mapping.source_for(BOB).profile == "team"  # type: ignore[union-attr]
    moto.enforce_iam()
    provider.generate_data_key(key, CONTEXT, BOB, "n")
    with pytest.raises(AccessDeniedException):  # alice's own entry wins: no KMS for her
        provider.generate_data_key(key, CONTEXT, ALICE, "n")


def test_decrypt_requires_the_named_key(moto: Moto, tmp_path: Path) -> None:
    key, other = moto.create_key(), moto.create_key()
    moto.create_user("alice")
    moto.create_user("bob")
    provider = provider_for(moto, tmp_path, TWO_USERS)
    made = provider.generate_data_key(key, CONTEXT, ALICE, "n")
    # AWS answers IncorrectKeyException, moto AccessDeniedException: either way, refused.
    with pytest.raises((AccessDeniedException, InvalidCiphertextException)):
        provider.decrypt(made.wrapped, other, CONTEXT, ALICE, "n")
    with pytest.raises(NotFoundException):
        provider.describe_key(
            key.rsplit("/", 1)[0] + "/" + "0" * 8 + "-0000-0000-0000-" + "0" * 12, ALICE
        )


def test_an_unreachable_endpoint_fails_fast_then_recovers(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet
    with no_home_aws(tmp_path):
        creds = alice_credentials(tmp_path)
        mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
        provider = AwsKmsProvider(
            REGION, mapping, endpoint_url=f"http://127.0.0.1:{port}", timeout=2, max_backoff=0.5
        )
        start = time.monotonic()
        with pytest.raises(
            KMSUnavailableException,
            match=r"^the key service at 'http://127.0.0.1:[0-9]+' cannot be reached: ",
        ):
            provider.describe_key("alias/x", ALICE)
        assert time.monotonic() - start < 5  # bounded retries, no hang
        with pytest.raises(
            KMSUnavailableException, match=r"unavailable \(next try in 0\.[0-9] s\)$"
        ):
            provider.describe_key("alias/x", ALICE)  # failing fast, no attempt
        with moto_server(port) as moto:
            key = moto.create_key()
            moto.create_user("alice")
            creds.write_text(
                f"[alice]\naws_access_key_id = {moto.users['alice'][0]}\n"
                f"aws_secret_access_key = {moto.users['alice'][1]}\n"
            )
            provider._clients.clear()  # keys read again (a new client)
            time.sleep(0.2)
            assert provider.describe_key(key, ALICE) == key


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_a_silent_endpoint_times_out(tmp_path: Path) -> None:
    with no_home_aws(tmp_path), silent_server() as port:
        creds = alice_credentials(tmp_path)
        mapping = load_mapping(
            write_mapping(tmp_path, creds, '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n')
        )
        provider = AwsKmsProvider(
            REGION, mapping, endpoint_url=f"http://127.0.0.1:{port}", timeout=0.5, max_attempts=2
        )
        start = time.monotonic()
        with pytest.raises(DependencyTimeoutException, match=r"did not answer in time"):
            provider.describe_key("alias/x", ALICE)
        assert time.monotonic() - start < 4  # two attempts of 0.5 s and a backoff


def test_the_log_holds_no_secret(
    moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore logs bodies and headers at DEBUG: the provider keeps them out even when the
    daemon logs at DEBUG (ENVFS_DEBUG=1)."""
    key = moto.create_key()
    moto.create_user("alice")
    moto.create_user("bob")
    caplog.set_level(logging.DEBUG)
    logging.getLogger("botocore").setLevel(logging.NOTSET)  # as a fresh daemon has it
    provider = provider_for(moto, tmp_path, TWO_USERS)
    made = provider.generate_data_key(key, CONTEXT, ALICE, "n")
    provider.decrypt(made.wrapped, key, CONTEXT, ALICE, "n")
    secret = moto.users["alice"][1]
    text = caplog.text
    assert "AWS KMS client made for mapping 'user:alice' (profile 'alice')" in text
    for forbidden in (secret, base64.b64encode(made.plaintext).decode(), made.plaintext.hex()):
        assert forbidden not in text
    assert secret not in repr(provider.mapping.static_keys(provider.mapping.entries[0]))


def test_a_volume_on_an_aws_key(moto: Moto, tmp_path: Path) -> None:
    """The volume file's checks hold with an AWS key ARN (whose blobs envfs cannot read):
    authentic, an edited or re-keyed volume file refused, a header naming another key
    refused without asking AWS."""
    key, other = moto.create_key(), moto.create_key()
    moto.create_user("alice")
    moto.create_user("bob")
    provider = provider_for(moto, tmp_path, TWO_USERS)
    backing = tmp_path / "backing"
    volume = Volume.create(backing, key, provider, ALICE, format_version=1, encrypted_names=False)
    assert (volume.key_arn, volume.region) == (key, REGION)
    loaded = Volume.load(backing)
    loaded.check_region(provider)
    vfs = Vfs(loaded, provider, chown_new=False)
    try:
        fh, st = vfs.create(ROOT_INODE, b"f", 0o644, os.O_WRONLY, ALICE)
        vfs.write(fh, 0, b"under AWS")
        vfs.release(fh)
        fh = vfs.open(st.ino, os.O_RDONLY, BOB)
        assert vfs.read(fh, 0, 100) == b"under AWS"
        vfs.release(fh)
        # A file planted by someone who may use another key: refused, AWS not asked.
        file_id = os.urandom(16)
        planted = provider.generate_data_key(other, loaded.file_context(file_id), ALICE, "x")
        header = fileformat.FileHeader(file_id, loaded.block_shift, other, planted.wrapped)
        keys = fileformat.FileKeys.derive(planted.plaintext, file_id)
        (backing / "planted").write_bytes(fileformat.encrypt_file(header, keys, b"bait"))
        ino = vfs.lookup(ROOT_INODE, b"planted").ino
        with pytest.raises(IntegrityError, match=r"^the header names a key the volume does not"):
            vfs.open(ino, os.O_RDONLY, BOB)
    finally:
        vfs.close()
    doc = json.loads((backing / VOLUME_FILE).read_text())
    for field, value in (("key_arn", other), ("block_shift", 13)):
        (backing / VOLUME_FILE).write_text(json.dumps({**doc, field: value}))
        with pytest.raises((VolumeError, AccessDeniedException)):  # AWS: IncorrectKey
            Volume.load(backing).verify(provider, ALICE)


def test_a_volume_made_through_an_alias_arn_records_the_key(moto: Moto, tmp_path: Path) -> None:
    key = moto.create_key()
    moto.client("kms").create_alias(AliasName="alias/vol", TargetKeyId=key)
    moto.create_user("alice")
    moto.create_user("bob")
    provider = provider_for(moto, tmp_path, TWO_USERS)
    alias_arn = key.split(":key/")[0] + ":alias/vol"
    volume = Volume.create(tmp_path / "backing", alias_arn, provider, ALICE)
    assert volume.key_arn == key  # the key the alias named then, not the alias
    Volume.load(tmp_path / "backing").verify(provider, BOB)


def test_init_refuses_a_key_of_another_region_than_region(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from envfs import cli

    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    code = cli.main(["init", str(tmp_path / "b"), "--key-id", key, "--region", "us-east-1"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"envfs: error: --key-id {key!r} is in region 'eu-west-1', not --region 'us-east-1'\n"
    )
    code = cli.main(["init", str(tmp_path / "b"), "--key-id", key, "--kms", "aws"])
    assert code == 2
    assert "needs a credential mapping: --kms-credentials FILE" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_mount_by_an_unmapped_root_waits_for_a_mapped_user(moto: Moto, tmp_path: Path) -> None:
    from envfs.files import mount

    key = moto.create_key()
    moto.create_user("alice")
    moto.create_user("bob")
    provider = provider_for(moto, tmp_path, TWO_USERS)
    Volume.create(tmp_path / "backing", key, provider, ALICE)
    root = Caller(0, 0, frozenset({0}), "root", frozenset({"root"}))
    vfs = mount.prepare(Volume.load(tmp_path / "backing"), provider, root, multi_user=True)
    try:
        assert not vfs.access.volume_verified  # root has no AWS identity: deferred
        vfs.access.decide(BOB)
        assert vfs.access.volume_verified and vfs.access.name_keys is not None
    finally:
        vfs.close()


def test_a_profile_gone_after_the_start_is_a_refusal(moto: Moto, tmp_path: Path) -> None:
    key = moto.create_key()
    moto.create_user("alice")
    moto.create_user("bob")
    provider = provider_for(moto, tmp_path, TWO_USERS)
    (tmp_path / "credentials").write_text("[alice]\naws_access_key_id = A\n")
    with pytest.raises(
        AccessDeniedException,
        match=r"^mapping 'user:alice' \(profile 'alice'\) has no usable AWS credentials: .*"
        r"lacks aws_access_key_id or aws_secret_access_key",
    ):
        provider.generate_data_key(key, CONTEXT, ALICE, "n")


@contextlib.contextmanager
def lying_endpoint(
    answer: dict[str, object] | bytes,
    failures: int = 0,
    tls: tuple[Path, Path] | None = None,
    status: int = 200,
    host: str = "127.0.0.1",
) -> Iterator[list[int]]:
    """An HTTP endpoint on ``host`` (HTTPS with the certificate and key ``tls``) that
    answers its first ``failures`` calls with HTTP 503, then every call with ``answer``
    (JSON; or XML, given as bytes) and HTTP ``status``; yields [port, calls so far]."""
    import http.server
    import ssl

    seen = [0, 0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            seen[1] += 1
            failing = seen[1] <= failures
            if isinstance(answer, bytes) and not failing:
                body = answer
            else:
                body = json.dumps({"__type": "ServiceUnavailable"} if failing else answer).encode()
            self.send_response(503 if failing else status)
            self.send_header(
                "Content-Type",
                "text/xml" if isinstance(answer, bytes) else "application/x-amz-json-1.1",
            )
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    seen[0] = server.server_address[1]
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_answers_that_do_not_hold_are_refused(tmp_path: Path) -> None:
    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    other = key[:-1] + "c"
    creds = alice_credentials(tmp_path)
    mapping = load_mapping(
        write_mapping(tmp_path, creds, '[[map]]\nprincipal = "user:alice"\nprofile = "alice"\n')
    )
    with no_home_aws(tmp_path), lying_endpoint(
        {"Plaintext": base64.b64encode(bytes(32)).decode(), "KeyId": other,
         "CiphertextBlob": base64.b64encode(b"x").decode()}
    ) as seen:  # fmt: skip
        provider = AwsKmsProvider(REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}")
        with pytest.raises(IncorrectKeyException, match=r"^the key service decrypted under"):
            provider.decrypt(b"blob", key, CONTEXT, ALICE, "n")
    with no_home_aws(tmp_path), lying_endpoint(
        {"Plaintext": base64.b64encode(bytes(16)).decode(), "KeyId": key,
         "CiphertextBlob": base64.b64encode(b"x").decode()}
    ) as seen:  # fmt: skip
        provider = AwsKmsProvider(REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}")
        with pytest.raises(KMSInternalException, match=r"without a 256-bit key$"):
            provider.generate_data_key(key, CONTEXT, ALICE, "n")


def test_transient_failures_are_retried_a_bounded_number_of_times(tmp_path: Path) -> None:
    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    creds = alice_credentials(tmp_path)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    answer = {"KeyMetadata": {"Arn": key, "KeyId": key.rsplit("/", 1)[1]}}
    with no_home_aws(tmp_path), lying_endpoint(answer, failures=2) as seen:
        provider = AwsKmsProvider(REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}")
        assert provider.describe_key(key, ALICE) == key
        assert seen[1] == 3  # two 503s retried, with backoff
    with no_home_aws(tmp_path), lying_endpoint(answer, failures=5) as seen:
        provider = AwsKmsProvider(REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}")
        with pytest.raises(
            KMSUnavailableException,
            match=r" is failing \(HTTP 503\): DescribeKey failed: ServiceUnavailable",
        ):
            provider.describe_key(key, ALICE)
        assert seen[1] == 3  # three attempts in all, then the error
        # An outage like an unreachable service: the next open fails at once, no call made.
        with pytest.raises(KMSUnavailableException, match=r"is unavailable \(next try in"):
            provider.describe_key(key, ALICE)
        assert seen[1] == 3


def test_no_proxy_of_the_environment_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy named in the daemon's environment would see every signed request, and to an
    http:// endpoint on loopback every answer's plaintext data key: none is used."""
    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    creds = alice_credentials(tmp_path)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    answer = {"KeyMetadata": {"Arn": key, "KeyId": key.rsplit("/", 1)[1]}}
    with no_home_aws(tmp_path), lying_endpoint(answer) as proxy, lying_endpoint(answer) as seen:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy[0]}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        provider = AwsKmsProvider(REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}")
        assert provider.describe_key(key, ALICE) == key
        assert (proxy[1], seen[1]) == (0, 1)


def test_the_ca_bundle_is_read_once(tmp_path: Path) -> None:
    """The CA bundle is used as it was when checked: botocore, given its path, would read it
    again for each new connection, whatever has been put there since."""
    from envfs.keys.choice import KeyServiceChoice, connect
    from tests.tlscert import make_certificate

    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    creds = alice_credentials(tmp_path)
    mapping = write_mapping(tmp_path, creds, ALICE_ONLY)
    (tmp_path / "real").mkdir()
    (tmp_path / "forged").mkdir()
    real, forged = make_certificate(tmp_path / "real"), make_certificate(tmp_path / "forged")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(real[0].read_bytes())
    answer = {"KeyMetadata": {"Arn": key, "KeyId": key.rsplit("/", 1)[1]}}
    with no_home_aws(tmp_path), lying_endpoint(answer, tls=forged) as seen:
        choice = KeyServiceChoice.parse(f"https://127.0.0.1:{seen[0]}")
        with connect(
            choice, REGION, open_store=lambda: None,  # type: ignore[arg-type,return-value]
            credentials=mapping, ca_bundle=bundle, timeout=2,
        ) as kms:  # fmt: skip
            bundle.write_bytes(forged[0].read_bytes())  # after the check, before any call
            with pytest.raises(KMSUnavailableException, match=r"CERTIFICATE_VERIFY_FAILED"):
                kms.provider.describe_key(key, ALICE)
            assert seen[1] == 0
        with connect(
            choice, REGION, open_store=lambda: None,  # type: ignore[arg-type,return-value]
            credentials=mapping, ca_bundle=bundle, timeout=2,
        ) as kms:  # fmt: skip
            bundle.write_bytes(real[0].read_bytes())
            assert kms.provider.describe_key(key, ALICE) == key  # the copy as it was read
            assert seen[1] == 1


def test_a_data_key_generated_under_another_key_is_refused(tmp_path: Path) -> None:
    """A new file's header names the key GenerateDataKey answers with: under any other key
    than the one asked for (the volume's), the file could never be read back."""
    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    other = key[:-1] + "c"
    creds = alice_credentials(tmp_path)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    answer = {"Plaintext": base64.b64encode(bytes(32)).decode(), "KeyId": other,
              "CiphertextBlob": base64.b64encode(b"x").decode()}  # fmt: skip
    with no_home_aws(tmp_path), lying_endpoint(answer) as seen:
        provider = AwsKmsProvider(REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}")
        with pytest.raises(
            IncorrectKeyException,
            match=rf"^the key service generated the data key under '{other}', not '{key}'$",
        ):
            provider.generate_data_key(key, CONTEXT, ALICE, "n")
        alias = "arn:aws:kms:eu-west-1:111122223333:alias/team"  # init: the key it names
        assert provider.generate_data_key(alias, CONTEXT, ALICE, "n").key_arn == other


def test_botocore_stays_quiet_when_debug_logging_starts_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore's bodies (plaintext data keys) stay out of the log also when the daemon's
    log level is lowered to DEBUG after the provider was made."""
    creds = alice_credentials(tmp_path)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    for name in ("botocore", "urllib3"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # as a fresh daemon has them
    caplog.set_level(logging.WARNING)
    AwsKmsProvider(REGION, mapping, endpoint_url="http://127.0.0.1:1").close()
    caplog.set_level(logging.DEBUG)  # ENVFS_DEBUG=1, configured afterwards
    for name in ("botocore.endpoint", "botocore.parsers", "urllib3.connectionpool"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name


def test_no_aws_variable_of_the_environment_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's environment does not choose the endpoint (FIPS, dual-stack), the
    defaults mode ("auto" asks instance metadata) or where the API's models are read."""
    from envfs.keys.awskms import _clean_session

    creds = alice_credentials(tmp_path)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    with no_home_aws(tmp_path):
        for name, value in (
            ("AWS_USE_FIPS_ENDPOINT", "true"),
            ("AWS_USE_DUALSTACK_ENDPOINT", "true"),
            ("AWS_DEFAULTS_MODE", "auto"),
            ("AWS_DATA_PATH", str(tmp_path)),
            ("AWS_CA_BUNDLE", str(tmp_path / "nothing.pem")),
        ):
            monkeypatch.setenv(name, value)
        provider = AwsKmsProvider(REGION, mapping)
        client = provider._client(mapping.entries[0])
        assert client.meta.endpoint_url == f"https://kms.{REGION}.amazonaws.com"
        session = _clean_session()
        for name in ("defaults_mode", "data_path", "ca_bundle", "use_fips_endpoint"):
            assert session.get_config_variable(name) in ("legacy", None), name
        provider.close()


def test_a_decrypted_data_key_must_be_256_bits(tmp_path: Path) -> None:
    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    creds = alice_credentials(tmp_path)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    answer = {"KeyId": key}
    with no_home_aws(tmp_path), lying_endpoint(answer) as seen:
        provider = AwsKmsProvider(REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}")
        for size in (0, 16, 33):
            answer["Plaintext"] = base64.b64encode(bytes(size)).decode()  # read per answer
            with pytest.raises(KMSInternalException, match=r"^the key service answered Decrypt"):
                provider.decrypt(b"blob", key, CONTEXT, ALICE, "n")
        answer["Plaintext"] = base64.b64encode(bytes(32)).decode()
        assert provider.decrypt(b"blob", key, CONTEXT, ALICE, "n") == bytes(32)


def test_an_endpoints_error_message_reaches_the_log_as_one_short_line(tmp_path: Path) -> None:
    """An error's message is the endpoint's text: kept to one line and 300 characters, so
    that it cannot forge log lines or flood the log."""
    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    creds = alice_credentials(tmp_path)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    text = "no\nINFO envfs.files.keyaccess: volume authenticated\r" + "x" * 5000
    answer = {"__type": "AccessDeniedException", "message": text}
    with no_home_aws(tmp_path), lying_endpoint(answer, status=400) as seen:
        provider = AwsKmsProvider(REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}")
        with pytest.raises(AccessDeniedException) as refused:
            provider.decrypt(b"blob", key, CONTEXT, ALICE, "n")
        answer["__type"] = "NotFoundException"
        with pytest.raises(NotFoundException) as missing:
            provider.decrypt(b"blob", key, CONTEXT, ALICE, "n")
    for exc in (refused.value, missing.value):
        assert "\n" not in exc.message and "\r" not in exc.message, exc.message[:100]
        assert len(exc.message) < 400


def test_without_a_ca_bundle_the_systems_cas_are_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system's CAs (where OpenSSL finds them: here SSL_CERT_FILE stands in for the
    system's store), not the certifi package's copy of Mozilla's list."""
    from tests.tlscert import make_certificate

    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    creds = alice_credentials(tmp_path)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    tls = make_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    answer = {"KeyMetadata": {"Arn": key, "KeyId": key.rsplit("/", 1)[1]}}
    with no_home_aws(tmp_path), lying_endpoint(answer, tls=tls) as seen:
        provider = AwsKmsProvider(REGION, mapping, endpoint_url=f"https://127.0.0.1:{seen[0]}")
        assert provider.describe_key(key, ALICE) == key


def test_only_the_apis_operations_can_be_called(tmp_path: Path) -> None:
    from envfs.errors import UnsupportedOperationException

    creds = alice_credentials(tmp_path)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    with no_home_aws(tmp_path):
        provider = AwsKmsProvider(REGION, mapping, endpoint_url="http://127.0.0.1:1")
        for name in ("close", "_make_api_call", "get_paginator", "GetPaginator", "Close"):
            with pytest.raises(UnsupportedOperationException, match=r"is not in AWS KMS's API$"):
                provider.call_as(ALICE, name, {})
        assert provider._clients[0]._endpoint is not None  # not closed by "close"
        provider.close()


def test_an_unreachable_sts_is_an_outage_not_a_refusal(tmp_path: Path) -> None:
    """A role's credentials come from STS: STS not answering is an outage (EHOSTDOWN), never
    a refusal (EACCES), and nothing is sent to the key service without them."""
    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    creds = alice_credentials(tmp_path)
    entry = ALICE_ONLY + 'role_arn = "arn:aws:iam::111122223333:role/envfs"\n'
    mapping = load_mapping(
        write_mapping(
            tmp_path, creds, entry, f'sts_endpoint_url = "http://127.0.0.1:{free_port()}"'
        )
    )
    answer = {"KeyMetadata": {"Arn": key, "KeyId": key.rsplit("/", 1)[1]}}
    with no_home_aws(tmp_path), lying_endpoint(answer) as seen:
        provider = AwsKmsProvider(
            REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}", max_attempts=1
        )
        with pytest.raises(KMSUnavailableException, match=r"cannot be reached"):
            provider.describe_key(key, ALICE)
        assert seen[1] == 0


# A listener of its own uid, in a child process: prints its port, then, once its stdin
# closes, how many connections it accepted and how many bytes they carried.
_LISTENER = """
import select, socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conns, accepted, received = [], 0, 0
while True:
    ready = select.select([listener, sys.stdin, *conns], [], [], 10)[0]
    if listener in ready:
        conns.append(listener.accept()[0])
        accepted += 1
    for sock in [r for r in ready if r in conns]:
        data = sock.recv(1 << 16)
        received += len(data)
        if not data:
            conns.remove(sock)
    if sys.stdin in ready or not ready:
        break
for sock in conns:
    sock.settimeout(0.2)
    try:
        while data := sock.recv(1 << 16):
            received += len(data)
    except OSError:
        pass
print(accepted, received, flush=True)
"""


@contextlib.contextmanager
def listener_of_another_user(uid: int = 65534) -> Iterator[list[int]]:
    """A loopback port listened on by ``uid``; yields [port], then [port, connections
    accepted, bytes received] once the block ends."""
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _LISTENER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        user=uid,
        group=uid,
        extra_groups=[],
    )
    assert child.stdout is not None
    seen = [int(child.stdout.readline())]
    try:
        yield seen
    finally:
        out, _ = child.communicate("", timeout=5)
        seen += [int(n) for n in out.split()]


@pytest.mark.skipif(os.geteuid() != 0, reason="a listener of another uid needs root")
def test_plain_http_sends_nothing_to_a_listener_of_an_untrusted_uid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any local user may take a free loopback port (the key service stopped, say): it would
    read the signed requests and replay them to the service, and choose every new file's
    data key in its answers. Nothing is sent; the provider reports an outage, logged once."""
    monkeypatch.delenv("ENVFS_KMS_SERVER_UID", raising=False)
    creds = tmp_path / "credentials"
    creds.write_text(
        "[alice]\naws_access_key_id = AKIAALICEALICE\naws_secret_access_key = SECRETSECRET\n"
    )
    creds.chmod(0o600)
    mapping = load_mapping(write_mapping(tmp_path, creds, ALICE_ONLY))
    caplog.set_level(logging.DEBUG)
    with no_home_aws(tmp_path), listener_of_another_user() as seen:
        provider = AwsKmsProvider(
            REGION, mapping, endpoint_url=f"http://127.0.0.1:{seen[0]}", timeout=0.5
        )
        with pytest.raises(
            KMSUnavailableException,
            match=rf"^the key service at 'http://127\.0\.0\.1:{seen[0]}' cannot be used: the"
            rf" process listening on loopback port {seen[0]} runs as uid 65534, which is not"
            r" trusted to be the key service \(root, the mount's own uid or"
            r" \$ENVFS_KMS_SERVER_UID\): nothing sent over plain http$",
        ):
            provider.generate_data_key("alias/x", CONTEXT, ALICE, "n")
        provider.close()
    assert seen[1:] == [1, 0]  # one connection (not retried), not a byte on it
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "uid 65534" in warnings[0].getMessage()
    assert f"port {seen[0]}" in warnings[0].getMessage()
    for record in caplog.records:
        assert "SECRETSECRET" not in record.getMessage()
    monkeypatch.setenv("ENVFS_KMS_SERVER_UID", "4242,65534")  # the service's own uid
    with no_home_aws(tmp_path), listener_of_another_user() as seen:
        provider = AwsKmsProvider(
            REGION,
            mapping,
            endpoint_url=f"http://127.0.0.1:{seen[0]}",
            timeout=0.3,
            max_attempts=1,
        )
        with pytest.raises(DependencyTimeoutException):  # sent; this one never answers
            provider.generate_data_key("alias/x", CONTEXT, ALICE, "n")
        provider.close()
    assert seen[1] == 1 and seen[2] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a listener of another uid needs root")
def test_plain_http_sends_nothing_to_an_sts_listener_of_an_untrusted_uid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STS at a plain-http loopback endpoint is checked the same way: its listener would
    read signed AssumeRole requests (replayed, a role's credentials) and choose the
    credentials every later call is signed with."""
    monkeypatch.delenv("ENVFS_KMS_SERVER_UID", raising=False)
    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    creds = alice_credentials(tmp_path)
    entry = ALICE_ONLY + 'role_arn = "arn:aws:iam::111122223333:role/envfs"\n'
    answer = {"KeyMetadata": {"Arn": key, "KeyId": key.rsplit("/", 1)[1]}}
    with no_home_aws(tmp_path), listener_of_another_user() as sts, lying_endpoint(answer) as kms:
        mapping = load_mapping(
            write_mapping(tmp_path, creds, entry, f'sts_endpoint_url = "http://127.0.0.1:{sts[0]}"')
        )
        provider = AwsKmsProvider(
            REGION, mapping, endpoint_url=f"http://127.0.0.1:{kms[0]}", timeout=0.5
        )
        with pytest.raises(KMSUnavailableException, match=r"runs as uid 65534, which is not"):
            provider.describe_key(key, ALICE)
        assert kms[1] == 0
    assert sts[1:] == [1, 0]
    # Logged once, by the provider: not also by botocore, with a traceback.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["envfs.keys.failfast"]
    assert all(r.exc_info is None for r in caplog.records)


_ASSUMED_ROLE = b"""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<AssumeRoleResult>
<AssumedRoleUser><AssumedRoleId>AROAENVFS:envfs</AssumedRoleId>
<Arn>arn:aws:sts::111122223333:assumed-role/envfs/envfs</Arn></AssumedRoleUser>
<Credentials><AccessKeyId>ASIAROLEROLEROLE</AccessKeyId><SecretAccessKey>role</SecretAccessKey>
<SessionToken>token</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration></Credentials>
</AssumeRoleResult>
<ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>
</AssumeRoleResponse>"""


@pytest.mark.parametrize("sts_host", ["127.0.0.2", "127.0.0.1"])
def test_sts_is_verified_with_the_ca_bundle_only_on_the_endpoints_host(
    sts_host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint's CA bundle is for the endpoint: an STS elsewhere (AWS's) is verified
    with the system's CAs, as it would not verify with the endpoint's private CA; an STS
    on the endpoint's own host, with the bundle."""
    from envfs.keys.choice import KeyServiceChoice, connect
    from tests.tlscert import make_certificate

    key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    creds = alice_credentials(tmp_path)
    (tmp_path / "endpoint").mkdir()
    (tmp_path / "system").mkdir()
    endpoint_tls = make_certificate(tmp_path / "endpoint")
    system_tls = make_certificate(tmp_path / "system", sts_host)
    monkeypatch.setenv("SSL_CERT_FILE", str(system_tls[0]))  # the system's CAs
    sts_tls = system_tls if sts_host != "127.0.0.1" else endpoint_tls
    entry = ALICE_ONLY + 'role_arn = "arn:aws:iam::111122223333:role/envfs"\n'
    answer = {"KeyMetadata": {"Arn": key, "KeyId": key.rsplit("/", 1)[1]}}
    with (
        no_home_aws(tmp_path),
        lying_endpoint(_ASSUMED_ROLE, tls=sts_tls, host=sts_host) as sts,
        lying_endpoint(answer, tls=endpoint_tls) as kms,
    ):
        mapping = write_mapping(
            tmp_path, creds, entry, f'sts_endpoint_url = "https://{sts_host}:{sts[0]}"'
        )
        with connect(
            KeyServiceChoice.parse(f"https://127.0.0.1:{kms[0]}"), REGION,
            open_store=lambda: None,  # type: ignore[arg-type,return-value]
            credentials=mapping, ca_bundle=endpoint_tls[0], timeout=2,
        ) as service:  # fmt: skip
            assert service.provider.describe_key(key, ALICE) == key
        assert (sts[1], kms[1]) == (1, 1)


def test_aws_s_sts_is_verified_with_the_systems_cas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an sts_endpoint_url, a role is assumed at AWS's STS: with the system's CAs,
    not the endpoint's bundle (never reached here: the client is stopped once made)."""
    import botocore.exceptions

    from envfs.keys import awskms
    from tests.tlscert import make_certificate

    creds = alice_credentials(tmp_path)
    system = make_certificate(tmp_path)[0]
    monkeypatch.setenv("SSL_CERT_FILE", str(system))
    entry = ALICE_ONLY + 'role_arn = "arn:aws:iam::111122223333:role/envfs"\n'
    mapping = load_mapping(write_mapping(tmp_path, creds, entry))
    made: dict[str, object] = {}
    real_session = awskms._clean_session

    def recording_session() -> object:
        session = real_session()
        create = session.create_client

        def create_client(service: str, **kwargs: object) -> object:
            made[service] = kwargs["verify"]
            if service == "sts":
                raise botocore.exceptions.EndpointConnectionError(endpoint_url="sts")
            return create(service, **kwargs)

        session.create_client = create_client
        return session

    monkeypatch.setattr(awskms, "_clean_session", recording_session)
    with no_home_aws(tmp_path):
        provider = AwsKmsProvider(
            REGION,
            mapping,
            endpoint_url="https://127.0.0.1:1",
            ca_bundle=system.read_bytes(),
            max_attempts=1,
        )
        with pytest.raises(KMSUnavailableException):
            provider.describe_key("alias/x", ALICE)
        provider.close()
    assert made == {"kms": made["kms"], "sts": str(system)}
    assert made["kms"] != str(system)  # the bundle's private copy
