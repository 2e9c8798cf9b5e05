"""The key-service daemon's server: frames in, handler calls, frames out.

The protocol is specified in :mod:`envfs.kms.protocol`. This module adds the transport: a
Unix stream socket anyone may connect to, the caller's identity taken from the kernel
(``SO_PEERCRED``, ``SO_PEERGROUPS``), and the rules that keep one client from stalling or
crashing the service:

- every connection is served by its own task; the handler (synchronous, may block on
  SQLite for seconds) runs in a worker thread, one call at a time for the whole service;
- a connection idle between requests is closed, and a frame must arrive (and an answer
  be taken) within a time limit once it started;
- at most ``max_connections`` connections are served at once; further ones wait in the
  kernel's listen backlog until one closes (the client's connect and call timeouts bound
  that wait). One uid may hold at most ``max_connections_per_uid`` of them; a connection
  over that limit is answered ``LimitExceededException`` and closed;
- an exception from the handler becomes an error answer and never ends the service.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from envfs.errors import AccessDeniedException, EnvfsError, InvalidRequestException, KMSError
from envfs.kms import protocol
from envfs.kms.model import Caller

logger = logging.getLogger(__name__)

Handler = Callable[[Caller, str, dict[str, Any]], Mapping[str, Any]]
"""``handler(caller, operation, params) -> result``, e.g. ``KeyService.handle``."""

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
NGROUPS_MAX = 65536  # Linux
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PYTHON_BUFLEN_MAX = 1024  # socket.getsockopt refuses larger buffers
_RECEIVE_SIZE = 65536
_ACCEPT_RETRY_DELAY = 0.1
_ACCEPT_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the terminating NUL


# --- the listening socket ----------------------------------------------------------------


def bind_unix_socket(path: str | os.PathLike[str], *, backlog: int = 128) -> socket.socket:
    """Create, bind and listen on the daemon's Unix socket; return the (blocking) socket.

    The parent directory is created (mode 0755) if missing. A socket file left by a
    daemon that is gone is replaced; one with a live listener is not. The socket is made
    mode 0666: anyone may connect, the kernel tells the service who they are.

    Raises:
        EnvfsError: the path is too long, exists and is not a socket, or another daemon
            is listening on it.
        OSError: the directory or socket cannot be created.
    """
    sock_path = Path(path)
    if len(os.fsencode(sock_path)) > _SUN_PATH_MAX:
        raise EnvfsError(f"socket path '{sock_path}' is longer than {_SUN_PATH_MAX} bytes")
    parent = sock_path.parent
    if not parent.exists():
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        parent.chmod(0o755)  # mkdir's mode is reduced by the umask
    _remove_stale_socket(sock_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(sock_path))
        sock_path.chmod(0o666)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise EnvfsError(f"'{path}' exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        logger.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except TimeoutError:
        pass  # a listener with a full backlog is still a listener
    except OSError as exc:
        raise EnvfsError(f"cannot check the socket '{path}': {exc.strerror}") from None
    finally:
        probe.close()
    raise EnvfsError(f"another key service is already listening on '{path}'")


# --- who is calling ----------------------------------------------------------------------


def peer_credentials(sock: trio.socket.SocketType | socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process that connected ``sock``, from ``SO_PEERCRED``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def peer_groups(sock: trio.socket.SocketType | socket.socket) -> frozenset[int]:
    """The supplementary groups of the connecting process, from ``SO_PEERGROUPS``.

    Empty where the kernel does not offer the option (before Linux 4.13).
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PYTHON_BUFLEN_MAX)
    except OSError as exc:
        if exc.errno == errno.ERANGE:
            return _peer_groups_large(sock.fileno())
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return frozenset()
        raise
    count = len(raw) // 4
    return frozenset(struct.unpack(f"={count}I", raw[: count * 4]))


def _peer_groups_large(fd: int) -> frozenset[int]:
    # More than 256 groups: Python's getsockopt caps its buffer at 1024 bytes, so call libc
    # with room for NGROUPS_MAX; the kernel reports the length it filled in.
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = (ctypes.c_uint32 * NGROUPS_MAX)()
    length = ctypes.c_uint32(ctypes.sizeof(buffer))
    result = libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buffer, ctypes.byref(length))
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"getsockopt(SO_PEERGROUPS): {os.strerror(code)}")
    return frozenset(buffer[: length.value // 4])


def identify_peer(sock: trio.socket.SocketType | socket.socket) -> Caller:
    """The caller on the other end of a connected Unix socket (blocking: reads NSS)."""
    _pid, uid, gid = peer_credentials(sock)
    return Caller.from_ids(uid, gid, peer_groups(sock))


# --- serving -----------------------------------------------------------------------------


async def serve(
    handler: Handler,
    listener: trio.SocketListener | trio.socket.SocketType | socket.socket,
    *,
    idle_timeout: float = 60.0,
    frame_timeout: float = 10.0,
    max_connections: int = 256,
    max_connections_per_uid: int = 128,
    periodic: Callable[[], object] | None = None,
    periodic_interval: float = 60.0,
    trusted_services: Mapping[int, str] | None = None,
    on_refused: Callable[[Caller, str, KMSError], object] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve key-service requests on ``listener`` until cancelled.

    Args:
        handler: called as ``handler(caller, operation, params)`` in a worker thread, one
            call at a time; returns the result object or raises an ``EnvfsError``.
        listener: a listening Unix stream socket (from :func:`bind_unix_socket`, or
            inherited from systemd) or a ``trio.SocketListener`` over one. ``serve``
            takes ownership and closes it when it returns.
        idle_timeout: seconds a connection may wait between requests before it is closed.
        frame_timeout: seconds a request frame may take from its first byte to its last,
            and an answer may take to be sent.
        max_connections: connections served at once; more wait in the listen backlog.
        max_connections_per_uid: connections one uid may hold at once; more are answered
            ``LimitExceededException`` and closed.
        periodic: maintenance (due rotations and deletions) run in the worker thread,
            between handler calls, at start and then every ``periodic_interval`` seconds;
            its exceptions are logged.
        trusted_services: peer uids trusted to call *on behalf of* other users (the
            ``on_behalf_of`` request field, AWS's kms:ViaService idea), each with the
            service name that policies see as ``kms:ViaService`` and audit records as
            ``via``. A request on behalf of another user from any other peer is refused
            with AccessDeniedException. A request on behalf of the peer itself is a plain
            call.
        on_refused: told (in the worker thread) of each request refused for lack of
            trust, e.g. ``KeyService.record_refusal`` so that it is audited too.
        task_status: ``started`` is given the socket's address (for ``nursery.start``).
    """
    if isinstance(listener, socket.socket):
        listener = trio.socket.from_stdlib_socket(listener)
    if not isinstance(listener, trio.SocketListener):
        listener = trio.SocketListener(listener)
    server = _Server(
        handler,
        idle_timeout=idle_timeout,
        frame_timeout=frame_timeout,
        max_connections=max_connections,
        max_connections_per_uid=max_connections_per_uid,
        trusted_services=dict(trusted_services or {}),
        on_refused=on_refused,
    )
    address = str(listener.socket.getsockname())
    try:
        async with trio.open_nursery() as nursery:
            if periodic is not None:
                nursery.start_soon(server.run_periodic, periodic, periodic_interval)
            logger.info("key service listening on %s", address)
            task_status.started(address)
            await server.accept_forever(listener, nursery)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        logger.info("key service on %s stopped", address)


class _ConnectionClosed(Exception):
    """The peer closed the connection in the middle of a frame."""


class _Server:
    def __init__(
        self,
        handler: Handler,
        *,
        idle_timeout: float,
        frame_timeout: float,
        max_connections: int,
        max_connections_per_uid: int,
        trusted_services: dict[int, str],
        on_refused: Callable[[Caller, str, KMSError], object] | None = None,
    ) -> None:
        self._handler = handler
        self._trusted = trusted_services
        self._on_refused = on_refused
        self._idle_timeout = idle_timeout
        self._frame_timeout = frame_timeout
        self._max_per_uid = max_connections_per_uid
        self._slots = trio.Semaphore(max_connections)
        self._per_uid: dict[int, int] = {}
        # One worker thread at a time: the handler is not re-entrant and SQLite serializes.
        self._worker = trio.CapacityLimiter(1)

    async def accept_forever(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                self._slots.release()
                if exc.errno not in _ACCEPT_RESOURCE_ERRNOS:
                    raise
                logger.error("cannot accept a connection: %s; retrying", exc.strerror)
                await trio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            except BaseException:
                self._slots.release()
                raise
            nursery.start_soon(self._run_connection, stream)

    async def run_periodic(self, periodic: Callable[[], object], interval: float) -> None:
        while True:
            try:
                await trio.to_thread.run_sync(periodic, limiter=self._worker)
            except Exception:
                logger.exception("periodic key maintenance failed")
            await trio.sleep(interval)

    async def _run_connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await self._converse(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ConnectionClosed):
            logger.debug("connection lost")
        except Exception:
            logger.exception("connection handling failed")
        finally:
            self._slots.release()

    async def _converse(self, stream: trio.SocketStream) -> None:
        try:
            caller = await trio.to_thread.run_sync(identify_peer, stream.socket)
        except OSError as exc:
            logger.error("cannot identify the caller of a connection: %s", exc)
            return
        uid = caller.uid
        if self._per_uid.get(uid, 0) >= self._max_per_uid:
            logger.warning("refusing a connection of %s: too many connections", caller.describe())
            message = f"too many connections from uid {uid} (at most {self._max_per_uid})"
            await self._send(stream, _error_frame("LimitExceededException", message))
            return
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        try:
            reader = _FrameReader(stream)
            while True:
                try:
                    payload = await reader.read(self._idle_timeout, self._frame_timeout)
                except InvalidRequestException as exc:
                    # The framing is lost: answer once, then hang up.
                    await self._send(stream, _error_frame(exc.aws_name, exc.message))
                    return
                if payload is None:
                    return
                answer = await self._answer(caller, payload)
                if not await self._send(stream, answer):
                    return
        finally:
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]

    async def _send(self, stream: trio.SocketStream, frame: bytes) -> bool:
        with trio.move_on_after(self._frame_timeout):
            await stream.send_all(frame)
            return True
        logger.debug("closing a connection that does not take its answer")
        return False

    async def _answer(self, caller: Caller, payload: bytes) -> bytes:
        try:
            message = protocol.decode_payload(payload)
            operation, params = protocol.parse_request(message)
            on_behalf_of = protocol.parse_on_behalf_of(message)
        except InvalidRequestException as exc:
            return _error_frame(exc.aws_name, exc.message)
        if on_behalf_of is not None and on_behalf_of[0] != caller.uid:
            service = self._trusted.get(caller.uid)
            if service is None:
                logger.warning(
                    "%s asked to call %s on behalf of uid %d but is not trusted for that",
                    caller.describe(),
                    operation,
                    on_behalf_of[0],
                )
                refusal = AccessDeniedException(
                    f"user {caller.describe()} is not trusted to call on behalf of other users"
                    f" (asked for uid {on_behalf_of[0]})"
                )
                if self._on_refused is not None:
                    try:
                        await trio.to_thread.run_sync(
                            self._on_refused, caller, operation, refusal, limiter=self._worker
                        )
                    except Exception:
                        logger.exception("recording a refused call failed")
                return _error_frame(refusal.aws_name, refusal.message)
        else:
            service = None

        def call() -> Mapping[str, Any]:
            effective = caller
            if service is not None and on_behalf_of is not None:
                uid, gid = on_behalf_of
                effective = Caller.from_ids(uid, gid, via=service, via_uid=caller.uid)
            return self._handler(effective, operation, params)

        try:
            result = await trio.to_thread.run_sync(call, limiter=self._worker)
        except KMSError as exc:
            return _error_frame(exc.aws_name, exc.message)
        except EnvfsError as exc:
            logger.error("%s for %s failed: %s", operation, caller.describe(), exc.message)
            error_type = getattr(exc, "aws_name", "KMSInternalException")
            return _error_frame(str(error_type), exc.message)
        except Exception:
            logger.exception("%s for %s failed unexpectedly", operation, caller.describe())
            return _error_frame("KMSInternalException", "internal error")
        try:
            return protocol.encode_frame(protocol.ok_response(result))
        except InvalidRequestException as exc:
            logger.error("%s for %s: cannot send the result: %s", operation, caller.uid, exc)
            return _error_frame("KMSInternalException", "internal error")


def _error_frame(error_type: str, message: str) -> bytes:
    try:
        return protocol.encode_frame(protocol.error_response(error_type, message))
    except InvalidRequestException:
        logger.error("cannot encode a %s answer", error_type)
        return protocol.encode_frame(
            protocol.error_response("KMSInternalException", "internal error")
        )


class _FrameReader:
    """Reads frames from a stream, keeping what arrived beyond the current frame."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self) -> bool:
        data = await self._stream.receive_some(_RECEIVE_SIZE)
        self._buffer += data
        return bool(data)

    async def read(self, idle_timeout: float, frame_timeout: float) -> bytes | None:
        """The next frame's payload, or ``None`` when the peer closed or stayed idle.

        Raises:
            InvalidRequestException: a bad length or a frame that did not arrive in time.
            _ConnectionClosed: the peer closed in the middle of a frame.
        """
        if not self._buffer:
            with trio.move_on_after(idle_timeout) as idle:
                if not await self._fill():
                    return None
            if idle.cancelled_caught:
                logger.debug("closing an idle connection")
                return None
        with trio.move_on_after(frame_timeout):
            while len(self._buffer) < protocol.HEADER_SIZE:
                await self._fill_or_raise()
            length = protocol.frame_length(bytes(self._buffer[: protocol.HEADER_SIZE]))
            end = protocol.HEADER_SIZE + length
            while len(self._buffer) < end:
                await self._fill_or_raise()
            payload = bytes(self._buffer[protocol.HEADER_SIZE : end])
            del self._buffer[:end]
            return payload
        raise InvalidRequestException(
            f"the request frame did not arrive within {frame_timeout:g} seconds"
        )

    async def _fill_or_raise(self) -> None:
        if not await self._fill():
            raise _ConnectionClosed
