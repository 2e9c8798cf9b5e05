"""The key-service daemon's Unix-socket transport: frames in, dispatched calls, frames out.

The protocol is specified in :mod:`envfs.kms.protocol`; what is done with a request, once
its peer is known (trust, per-uid call limits, the worker thread taken in turns by uid),
in :mod:`envfs.kms.dispatch`. This module adds the transport: a Unix stream socket anyone
may connect to, the caller's identity taken from the kernel (``SO_PEERCRED``,
``SO_PEERGROUPS``), and the rules that keep one client from stalling or crashing the
service:

- every connection is served by its own task; its calls go to the dispatcher, which runs
  them in the worker thread one at a time;
- a connection idle between requests is closed, and a frame must arrive (and an answer
  be taken) within a time limit once it started;
- at most ``max_connections`` connections are served at once; further ones wait in the
  kernel's listen backlog (``SOMAXCONN`` long) until one closes (the client's connect and
  call timeouts bound that wait);
- per-uid limits (:mod:`envfs.kms.limits`) are checked before any costly work: a
  connection over its uid's limits is answered (``LimitExceededException`` or
  ``ThrottlingException``) and closed by the accepting task, without a task, a thread or
  a lookup of the user; a call over them is refused by the dispatcher before it reaches
  the worker thread or the store;
- an exception from the handler becomes an error answer and never ends the service.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from envfs.errors import (
    EnvfsError,
    InvalidRequestException,
    KMSError,
)
from envfs.identity import Caller
from envfs.kms import protocol
from envfs.kms.dispatch import Dispatcher, Handler, Request
from envfs.kms.httpserver import HttpEndpoint, serve_http
from envfs.kms.limits import Limits, UidLimiter

logger = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
NGROUPS_MAX = 65536  # Linux
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PYTHON_BUFLEN_MAX = 1024  # socket.getsockopt refuses larger buffers
_RECEIVE_SIZE = 65536
_ACCEPT_RETRY_DELAY = 0.1
_ACCEPT_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BATCH = 64  # connections accepted between two yields to the other tasks
_SEND_NOW = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_FINAL_SUMMARY_TIMEOUT = 5.0
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the terminating NUL


# --- the listening socket ----------------------------------------------------------------


def bind_unix_socket(
    path: str | os.PathLike[str], *, backlog: int = socket.SOMAXCONN
) -> socket.socket:
    """Create, bind and listen on the daemon's Unix socket; return the (blocking) socket.

    The backlog defaults to ``SOMAXCONN`` (the kernel caps it at
    ``net.core.somaxconn``), so that a burst of connections waits instead of failing.
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


# --- serving -----------------------------------------------------------------------------


async def serve(
    handler: Handler,
    listener: trio.SocketListener | trio.socket.SocketType | socket.socket,
    *,
    idle_timeout: float = 60.0,
    frame_timeout: float = 10.0,
    max_connections: int = 256,
    limits: Limits | None = None,
    periodic: Callable[[], object] | None = None,
    periodic_interval: float = 60.0,
    trusted_services: Mapping[int, str] | None = None,
    on_refused: Callable[[Caller, str, KMSError], object] | None = None,
    on_throttled: Callable[[Caller, int, int, float, float], object] | None = None,
    summary_interval: float = 10.0,
    http: HttpEndpoint | None = None,
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
        limits: the per-uid limits (connections at once, rates of new connections, of
            calls and of failed calls); ``Limits()`` if not given. A refused connection is
            answered and closed by the accepting task itself; a refused call is answered
            without being decoded (from a peer not trusted for on-behalf-of calls) and
            never reaches the worker thread.
        periodic: maintenance (due rotations and deletions) run in the worker thread,
            between handler calls, at start and then every ``periodic_interval`` seconds;
            its exceptions are logged.
        trusted_services: peer uids trusted to call *on behalf of* other users (the
            ``on_behalf_of`` request field, AWS's kms:ViaService idea), each with the
            service name that policies see as ``kms:ViaService`` and audit records as
            ``via``. A request on behalf of another user from any other peer is refused
            with AccessDeniedException. A request on behalf of the peer itself is a plain
            call. Limits apply to the user a call is made for.
        on_refused: told (in the worker thread) of each request refused for lack of
            trust, e.g. ``KeyService.record_refusal`` so that it is audited too.
        on_throttled: told (in the worker thread), every ``summary_interval`` seconds and
            when the service stops, of what was refused per uid for its limits:
            ``(caller, calls, connections, first, last)``, e.g.
            ``KeyService.record_throttled``.
        http: an HTTP endpoint (:mod:`envfs.kms.httpserver`) served beside the socket,
            by the same dispatcher: the same worker thread, limits and handler.
        task_status: ``started`` is given the socket's address, and the endpoint's URL
            after it (for ``nursery.start``).
    """
    if isinstance(listener, trio.SocketListener):
        listener = listener.socket
    sock = (
        listener if isinstance(listener, socket.socket) else socket.socket(fileno=listener.detach())
    )
    sock.setblocking(False)
    limiter = UidLimiter(limits if limits is not None else Limits())
    dispatcher = Dispatcher(
        handler,
        limiter=limiter,
        trusted_services=trusted_services or {},
        on_refused=on_refused,
        on_throttled=on_throttled,
    )
    server = _Server(
        dispatcher,
        idle_timeout=idle_timeout,
        frame_timeout=frame_timeout,
        max_connections=max_connections,
        limiter=limiter,
    )
    address = str(sock.getsockname())
    try:
        async with trio.open_nursery() as nursery:
            if periodic is not None:
                nursery.start_soon(dispatcher.run_periodic, periodic, periodic_interval)
            nursery.start_soon(dispatcher.run_summaries, summary_interval)
            logger.info("key service listening on %s", address)
            if http is not None:
                url = await nursery.start(serve_http, dispatcher, http)
                address = f"{address} and {url}"
            task_status.started(address)
            await server.accept_forever(sock, nursery)
    finally:
        with trio.CancelScope(shield=True):
            trio.lowlevel.notify_closing(sock)
            sock.close()
            if http is not None:
                http.sock.close()  # if it was never served
            with trio.move_on_after(_FINAL_SUMMARY_TIMEOUT):
                await dispatcher.report_throttled()
        logger.info("key service on %s stopped", address)


class _ConnectionClosed(Exception):
    """The peer closed the connection in the middle of a frame."""


class _Server:
    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        idle_timeout: float,
        frame_timeout: float,
        max_connections: int,
        limiter: UidLimiter,
    ) -> None:
        self._dispatcher = dispatcher
        self._idle_timeout = idle_timeout
        self._frame_timeout = frame_timeout
        self._limiter = limiter
        self._slots = trio.Semaphore(max_connections)

    # --- connections -----------------------------------------------------------------

    async def accept_forever(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            try:
                conn, uid, gid = await self._accept_admitted(sock)
            except BaseException:
                self._slots.release()
                raise
            nursery.start_soon(self._run_connection, conn, uid, gid)

    async def _accept_admitted(self, sock: socket.socket) -> tuple[socket.socket, int, int]:
        """The next connection within its uid's limits. Connections over them are answered
        and closed here, a few system calls each: a flood of connections from one uid
        drains from the listen backlog about as fast as it fills it."""
        accepted = 0
        while True:
            if accepted >= _ACCEPT_BATCH:
                accepted = 0
                await trio.lowlevel.checkpoint()
            try:
                conn, _address = sock.accept()
            except BlockingIOError:
                accepted = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_RESOURCE_ERRNOS:
                    raise
                logger.error("cannot accept a connection: %s; retrying", exc.strerror)
                await trio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            accepted += 1
            try:
                _pid, uid, gid = peer_credentials(conn)
            except OSError as exc:
                logger.error("cannot identify the caller of a connection: %s", exc)
                conn.close()
                continue
            refusal, first = self._limiter.admit_connection(uid, gid)
            if refusal is None:
                return conn, uid, gid
            if first:
                logger.warning("refusing connections of uid %d: %s", uid, refusal.message)
            _refuse_connection(conn, refusal)

    async def _run_connection(self, conn: socket.socket, uid: int, gid: int) -> None:
        try:
            async with trio.SocketStream(trio.socket.from_stdlib_socket(conn)) as stream:
                await self._converse(stream, uid, gid)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ConnectionClosed):
            logger.debug("connection lost")
        except Exception:
            logger.exception("connection handling failed")
        finally:
            self._limiter.connection_closed(uid)
            self._slots.release()

    async def _converse(self, stream: trio.SocketStream, uid: int, gid: int) -> None:
        try:
            caller = await trio.to_thread.run_sync(_identify, stream.socket, uid, gid)
        except OSError as exc:
            logger.error("cannot identify the caller of a connection: %s", exc)
            return
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

    async def _send(self, stream: trio.SocketStream, frame: bytes) -> bool:
        with trio.move_on_after(self._frame_timeout):
            await stream.send_all(frame)
            return True
        logger.debug("closing a connection that does not take its answer")
        return False

    # --- calls -----------------------------------------------------------------------

    async def _answer(self, peer: Caller, payload: bytes) -> bytes:
        try:
            admitted = self._dispatcher.admit(peer)
            request = _decode_request(payload)
        except KMSError as exc:
            return _error_frame(exc.aws_name, exc.message)
        try:
            result = await self._dispatcher.call(admitted, request)
        except KMSError as exc:
            return _error_frame(exc.aws_name, exc.message)
        except EnvfsError as exc:
            logger.error("%s for %s failed: %s", request.operation, peer.describe(), exc.message)
            error_type = getattr(exc, "aws_name", "KMSInternalException")
            return _error_frame(str(error_type), exc.message)
        except Exception:
            logger.exception("%s for %s failed unexpectedly", request.operation, peer.describe())
            return _error_frame("KMSInternalException", "internal error")
        try:
            return protocol.encode_frame(protocol.ok_response(result))
        except InvalidRequestException as exc:
            logger.error("%s for %s: cannot send the result: %s", request.operation, peer.uid, exc)
            return _error_frame("KMSInternalException", "internal error")


def _decode_request(payload: bytes) -> Request:
    """A request frame's payload as the dispatcher takes it.

    Raises:
        InvalidRequestException: not a well-formed request (``docs/kms.md`` §9).
    """
    message = protocol.decode_payload(payload)
    operation, params = protocol.parse_request(message)
    return Request(operation, params, protocol.parse_on_behalf_of(message))


def _identify(sock: trio.socket.SocketType, uid: int, gid: int) -> Caller:
    """The caller of an accepted connection (blocking: reads the user and group databases)."""
    return Caller.from_ids(uid, gid, peer_groups(sock))


def _refuse_connection(conn: socket.socket, error: KMSError) -> None:
    """Answer a connection over its uid's limits (if its buffer takes it) and close it."""
    with contextlib.suppress(OSError):
        conn.send(_error_frame(error.aws_name, error.message), _SEND_NOW)
    conn.close()


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
