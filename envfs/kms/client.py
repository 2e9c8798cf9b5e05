"""The key-service daemon's client: the same operations as ``KeyService``, over a socket.

Synchronous and thread-safe: one connection, one call at a time (a lock), opened on the
first call and again on the next call after a failure. Every call is bounded in time:
connecting takes at most ``connect_timeout`` seconds and a whole call (waiting for the
lock included) at most ``timeout`` seconds. The protocol is in :mod:`envfs.kms.protocol`.

Connecting rides out a busy or restarting daemon within ``connect_timeout``: while the
daemon's listen backlog is full, ``connect`` waits in the kernel (a blocking connect
bounded by ``SO_SNDTIMEO``, woken as soon as the daemon accepts) instead of failing with
``EAGAIN``; while the socket file exists but refuses connections (a daemon between two
runs), it tries again after 10 ms, 20 ms, … up to 0.5 s apart. A missing socket file
fails at once. A throttled call (``ThrottlingException``) is not retried: it is the
caller's to slow down.
"""

from __future__ import annotations

import contextlib
import errno
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
from envfs.kms.loopback import trusted_uids

_REFUSED_FIRST_DELAY = 0.01  # seconds before connecting again to a socket that refused
_REFUSED_MAX_DELAY = 0.5
_BUSY_PAUSE = 0.005  # after a connect that found no room (when not waited out in the kernel)
_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds


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
            trusted_server_uids = trusted_uids()
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
        until = min(deadline, time.monotonic() + self.connect_timeout)
        delay = _REFUSED_FIRST_DELAY
        refused: OSError | None = None
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                if refused is not None:
                    raise self._unreachable(refused)
                raise DependencyTimeoutException(
                    f"the key service at '{self.socket_path}' did not accept a connection"
                    f" within {self.connect_timeout:g} seconds"
                )
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                # Blocking, so that a full backlog is waited for in the kernel, for at
                # most SO_SNDTIMEO (then EAGAIN).
                sock.setblocking(True)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(remaining))
                sock.connect(self.socket_path)
                sock.getpeername()  # ENOTCONN if a signal cut the connect short
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
            except OSError as exc:
                sock.close()
                if exc.errno in (errno.EAGAIN, errno.EINTR, errno.ENOTCONN):
                    refused = None  # the daemon listens: it is busy, not restarting
                    # (Normally the kernel waited until the deadline; never spin.)
                    time.sleep(max(0.0, min(_BUSY_PAUSE, until - time.monotonic())))
                    continue
                if exc.errno != errno.ECONNREFUSED or not os.path.exists(self.socket_path):
                    raise self._unreachable(exc) from None
                refused = exc  # a daemon (re)starting: its socket file is there already
                time.sleep(max(0.0, min(delay, until - time.monotonic())))
                delay = min(_REFUSED_MAX_DELAY, delay * 2)
                continue
            self._check_server(sock)
            return sock

    def _unreachable(self, exc: OSError) -> KMSUnavailableException:
        return KMSUnavailableException(
            f"cannot reach the key service at '{self.socket_path}': {exc.strerror or exc}"
        )

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
            # A refused connection is answered and closed before the request is read:
            # sending may fail, and the answer is there to read all the same.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
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


def _timeval(seconds: float) -> bytes:
    """``struct timeval`` for ``seconds`` (0 is no limit; anything else at least 1 µs)."""
    micros = max(1, round(seconds * 1e6)) if seconds > 0 else 0
    return _TIMEVAL.pack(micros // 1_000_000, micros % 1_000_000)
