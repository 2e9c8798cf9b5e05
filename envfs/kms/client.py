"""The key-service daemon's client: the same operations as ``KeyService``, over a socket.

Synchronous and thread-safe: one connection, one call at a time (a lock), opened on the
first call and again on the next call after a failure. Every call is bounded in time:
connecting takes at most ``connect_timeout`` seconds and a whole call (waiting for the
lock included) at most ``timeout`` seconds. The protocol is in :mod:`envfs.kms.protocol`.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from envfs.errors import (
    DependencyTimeoutException,
    InvalidRequestException,
    KMSError,
    KMSInternalException,
    KMSUnavailableException,
)
from envfs.kms import protocol


class KMSClient:
    """A connection to the key-service daemon listening on ``socket_path``."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        trusted_server_uids: frozenset[int] | None = None,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        if trusted_server_uids is None:
            trusted_server_uids = frozenset({0, os.geteuid(), *_env_server_uids()})
        self.trusted_server_uids = trusted_server_uids
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def call(
        self,
        operation: str,
        params: Mapping[str, Any],
        *,
        on_behalf_of: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Run ``operation`` with ``params`` in the service, as the calling process's user,
        or on behalf of the user ``(uid, gid)`` if the service trusts this process for that.

        Raises:
            KMSError: the error the service answered with (its own subclass).
            KMSUnavailableException: the socket is missing, refuses connections, or the
                connection was lost during the call.
            DependencyTimeoutException: no answer within ``timeout`` seconds.
            KMSInternalException: the service answered something that is not an answer.
            InvalidRequestException: ``params`` cannot be sent (a value JSON cannot
                carry, or a request over 1 MiB); nothing was sent.
        """
        frame = protocol.encode_frame(protocol.build_request(operation, params, on_behalf_of))
        deadline = time.monotonic() + self.timeout
        if not self._lock.acquire(timeout=self.timeout):
            raise DependencyTimeoutException(
                f"the key service at '{self.socket_path}' did not answer within"
                f" {self.timeout:g} seconds (waiting for this client's previous call)"
            )
        try:
            sock = self._connected(deadline)
            try:
                outcome = self._exchange(sock, frame, deadline)
            except BaseException:
                # The answer may still arrive later and would be read as the next one.
                self._disconnect()
                raise
        finally:
            self._lock.release()
        if isinstance(outcome, KMSError):
            raise outcome
        return outcome

    def close(self) -> None:
        """Close the connection; a later call opens a new one."""
        with self._lock:
            self._disconnect()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals (called with the lock held) --------------------------------------------

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connected(self, deadline: float) -> socket.socket:
        if self._sock is not None and not self._still_open(self._sock):
            self._disconnect()
        if self._sock is None:
            self._sock = self._connect(deadline)
        return self._sock

    @staticmethod
    def _still_open(sock: socket.socket) -> bool:
        # The daemon closes idle connections; notice that before sending, not after.
        sock.settimeout(0.0)  # with a timeout, recv would first wait for data to arrive
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        # EOF, or bytes that answer no request of ours: either way, start afresh.
        del data
        return False

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.0, min(self.connect_timeout, deadline - time.monotonic())))
        try:
            sock.connect(self.socket_path)
        except TimeoutError:
            sock.close()
            raise DependencyTimeoutException(
                f"the key service at '{self.socket_path}' did not accept a connection within"
                f" {self.connect_timeout:g} seconds"
            ) from None
        except OSError as exc:
            sock.close()
            raise KMSUnavailableException(
                f"cannot reach the key service at '{self.socket_path}': {exc.strerror or exc}"
            ) from None
        self._check_server(sock)
        return sock

    def _check_server(self, sock: socket.socket) -> None:
        """Talk only to a daemon run by root, by ourselves or by a uid we were told to trust.

        Anyone who could replace the socket file could otherwise read every plaintext we
        send (Encrypt) and answer with keys of their choosing.
        """
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in self.trusted_server_uids:
            sock.close()
            raise KMSUnavailableException(
                f"the process listening on '{self.socket_path}' runs as uid {uid}, which is not"
                " trusted to be the key service (root, yourself, or $ENVFS_KMS_SERVER_UID)"
            )

    def _exchange(
        self, sock: socket.socket, frame: bytes, deadline: float
    ) -> dict[str, Any] | KMSError:
        try:
            sock.settimeout(self._remaining(deadline))
            sock.sendall(frame)
            header = self._receive_exactly(sock, protocol.HEADER_SIZE, deadline)
            payload = self._receive_exactly(sock, protocol.frame_length(header), deadline)
            return protocol.parse_response(protocol.decode_payload(payload))
        except TimeoutError:
            raise DependencyTimeoutException(
                f"the key service at '{self.socket_path}' did not answer within"
                f" {self.timeout:g} seconds"
            ) from None
        except InvalidRequestException as exc:
            raise KMSInternalException(
                f"the key service at '{self.socket_path}' sent a malformed answer: {exc}"
            ) from None
        except OSError as exc:
            raise KMSUnavailableException(
                f"lost the connection to the key service at '{self.socket_path}':"
                f" {exc.strerror or exc}"
            ) from None

    def _receive_exactly(self, sock: socket.socket, size: int, deadline: float) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            sock.settimeout(self._remaining(deadline))
            data = sock.recv(min(size - len(chunks), 1 << 20))
            if not data:
                raise ConnectionResetError(0, "the service closed the connection")
            chunks += data
        return bytes(chunks)

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining


def _env_server_uids() -> list[int]:
    """Extra daemon uids to trust: ``$ENVFS_KMS_SERVER_UID`` (comma-separated)."""
    text = os.environ.get("ENVFS_KMS_SERVER_UID", "")
    return [int(part) for part in text.split(",") if part.strip().isdigit()]
