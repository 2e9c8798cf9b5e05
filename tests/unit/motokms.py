"""moto's server mode on loopback standing in for AWS KMS (and IAM and STS), for the AWS key
provider's tests; and credential mapping files for it.

Nothing here reaches the internet: every client is given the server's loopback URL, and
``~/.aws`` is kept out of every session (``AWS_CONFIG_FILE``/``AWS_SHARED_CREDENTIALS_FILE``
point at empty temporary files while a server runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

REGION = "eu-west-1"
# Access key of moto's setup calls (made while moto checks no signature).
SETUP_KEYS = {"aws_access_key_id": "AKIASETUPSETUPSETUP0", "aws_secret_access_key": "setup"}
ALLOW_KMS = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Moto:
    """A running moto server and helpers to give it keys, users and roles."""

    url: str
    port: int
    users: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> keys
    server: ThreadedMotoServer | None = None

    def start(self) -> None:
        """Serve on the port (again: moto's state is kept in this process)."""
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        """Close the port; the state stays."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self, service: str, **keys: str) -> Any:
        return boto3.client(
            service, endpoint_url=self.url, region_name=REGION, **(keys or SETUP_KEYS)
        )

    def create_key(self) -> str:
        arn: str = self.client("kms").create_key()["KeyMetadata"]["Arn"]
        return arn

    def create_user(self, name: str, policy: dict[str, Any] | None = ALLOW_KMS) -> None:
        iam = self.client("iam")
        iam.create_user(UserName=name)
        if policy is not None:
            iam.put_user_policy(UserName=name, PolicyName="kms", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        self.users[name] = (key["AccessKeyId"], key["SecretAccessKey"])

    def create_role(self, name: str, policy: dict[str, Any] = ALLOW_KMS) -> str:
        iam = self.client("iam")
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}
            ],
        }
        arn: str = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))[
            "Role"
        ]["Arn"]
        iam.put_role_policy(RoleName=name, PolicyName="kms", PolicyDocument=json.dumps(policy))
        return arn

    def post(self, path: str, body: bytes = b"") -> None:
        request = urllib.request.Request(
            self.url + path, data=body, headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:  # loopback only
            answer.read()

    def enforce_iam(self, on: bool = True) -> None:
        """From now on every call must be signed by a known access key and allowed by its
        IAM policies (moto's ``INITIAL_NO_AUTH_ACTION_COUNT``), or not."""
        self.post("/moto-api/reset-auth", b"0" if on else b"inf")

    def write_credentials(self, directory: Path, profiles: dict[str, str]) -> Path:
        """An AWS shared credentials file (mode 0600) with ``profile -> user``'s keys."""
        path = directory / "credentials"
        lines = []
        for profile, user in profiles.items():
            access, secret = self.users[user]
            lines += [f"[{profile}]", f"aws_access_key_id = {access}"]
            lines += [f"aws_secret_access_key = {secret}", ""]
        path.write_text("\n".join(lines))
        path.chmod(0o600)
        return path


def write_mapping(directory: Path, credentials: Path, entries: str, extra: str = "") -> Path:
    """A credential mapping file (mode 0600) naming ``credentials``."""
    path = directory / "aws-users.toml"
    path.write_text(f'shared_credentials_file = "{credentials}"\n{extra}\n{entries}')
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def moto_server(port: int | None = None) -> Iterator[Moto]:
    """moto on 127.0.0.1 (a free port unless given), stopped however the block ends; IAM
    is not enforced until :meth:`Moto.enforce_iam`."""
    port = port or free_port()
    moto = Moto(f"http://127.0.0.1:{port}", port)
    moto.start()
    try:
        moto.post("/moto-api/reset")  # moto's state is the process's, shared by servers
        yield moto
    finally:
        if moto.server is None:
            moto.start()
        with contextlib.suppress(OSError):
            moto.enforce_iam(False)
            moto.post("/moto-api/reset")
        moto.stop()


@contextlib.contextmanager
def no_home_aws(directory: Path) -> Iterator[None]:
    """Keep ``~/.aws`` and any AWS variables of the environment out of the block."""
    empty = directory / "empty-aws-file"
    empty.write_text("")
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for name in saved:
        del os.environ[name]
    os.environ["AWS_CONFIG_FILE"] = str(empty)
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(empty)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)


class Outage:
    """A TCP relay to ``target_port`` on loopback, which can be taken down (its port closed
    and every open connection cut, as when the service's machine goes away) and brought up
    again on the same port. A stopped moto server would keep serving its open keep-alive
    connections, so tests cut them here."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(1 << 16):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
