"""A tiny key-service endpoint for the HTTP client's unit tests: a threaded ``http.server``
on 127.0.0.1 that checks signatures with ``envfs.kms.sigv4.verify`` and answers through
``envfs.kms.awsjson`` from a real ``KeyService`` (optionally over TLS), recording what it
received, or answering canned bodies first."""

from __future__ import annotations

import http.server
import shutil
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from envfs import errors
from envfs.identity import Caller
from envfs.kms import awsjson, sigv4
from envfs.kms.httpclient import Credentials
from envfs.kms.service import KeyService
from envfs.kms.store import KeyStore

ROOT = Caller(0, 0, frozenset({0}), "root", frozenset({"root"}))
REGION = "local-1"


def make_service(template: Path, tmp_path: Path) -> KeyService:
    """A key service over a copy of the session's template store, in ``tmp_path``."""
    directory = tmp_path / "local-1"
    shutil.copytree(template, directory)
    return KeyService(KeyStore.open(directory, REGION))


@dataclass
class Endpointd:
    """What the test server saw and how it is to answer."""

    service: KeyService
    url: str = ""
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    # Answers to give instead of the service's, first in first out: (status, body).
    canned: list[tuple[int, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    replays: sigv4.ReplayCache = field(default_factory=sigv4.ReplayCache)

    def answer(self, path: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, bytes]:
        with self.lock:
            self.requests.append((path, {k.lower(): v for k, v in headers}))
            if self.canned:
                return self.canned.pop(0)
            try:
                signed = sigv4.SignedRequest("POST", path, "", headers, body)
                owner: list[int] = []

                def secret(access_key_id: str) -> bytes | None:
                    found = self.service.signing_secret(access_key_id)
                    if found is None:
                        return None
                    owner.append(found[1])
                    return found[0]

                key_id = sigv4.verify(signed, secret, region=REGION, replay_cache=self.replays)
                caller = replace(Caller.from_ids(owner[0], 0), access_key_id=key_id)
                target = next((v for k, v in headers if k.lower() == "x-amz-target"), None)
                operation, params = awsjson.parse_request(target, body)
                return 200, awsjson.encode_result(self.service.handle(caller, operation, params))
            except sigv4.SignatureAuthError as exc:
                return exc.status, awsjson.encode_error(exc)[1]
            except (errors.KMSError, awsjson.WireError) as exc:
                return awsjson.encode_error(exc)


def handler(state: Endpointd) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, answer = state.answer(self.path, list(self.headers.items()), body)
            self.send_response(status)
            self.send_header("Content-Type", awsjson.CONTENT_TYPE)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def serve(state: Endpointd, tls: ssl.SSLContext | None = None) -> Iterator[Endpointd]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    port = server.server_address[1]
    state.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# Fixtures, for ``from tests.unit.endpointd import ...``; named apart from the fixture names so
# that a test's parameters do not shadow the imports.


@pytest.fixture(name="service")
def service_fixture(template: Path, tmp_path: Path) -> Iterator[KeyService]:
    svc = make_service(template, tmp_path)
    yield svc
    svc.close()


@pytest.fixture(name="root_key")
def root_key_fixture(service: KeyService) -> Credentials:
    """An access key of root's."""
    made = service.handle(ROOT, "CreateAccessKey", {"UserName": "root"})["AccessKey"]
    return Credentials(made["AccessKeyId"], made["SecretAccessKey"])


@pytest.fixture(name="server")
def server_fixture(service: KeyService) -> Iterator[Endpointd]:
    yield from serve(Endpointd(service))
