"""The key service's HTTP endpoint: AWS KMS's own protocol, for aws-cli, boto3 and fleets.

``envfs kms serve --listen-http HOST:PORT`` adds this transport beside the Unix socket,
for the same :class:`~envfs.kms.dispatch.Dispatcher` (the same worker, policies, limits
and audit). A request is an HTTP/1.1 ``POST`` in AWS's JSON 1.1 protocol
(:mod:`envfs.kms.awsjson`), signed with AWS Signature Version 4 (:mod:`envfs.kms.sigv4`)
by an access key of a Unix user (:mod:`envfs.kms.accesskeys`); it is then decided and
audited as that user, exactly as a call from the user's uid on the Unix socket would be,
with the access key and the client's address in its audit record. Nothing is answered
without a valid signature.

What keeps a client from stalling or flooding the service:

- TLS (from a certificate and key file) wherever the address is not a loopback one: the
  command line refuses plain HTTP elsewhere;
- at most ``max_connections`` connections at once: when all are taken, a new one closes
  the oldest that is not being answered, those that have not yet carried a validly
  signed request first (else it waits in the listen backlog); at most
  ``max_connections_per_address`` from one client address (an IPv6 /64 counts as one;
  more are closed as they are accepted); a new connection's TLS handshake and first
  request must start within ``request_timeout``, and a connection idle between requests
  is closed after ``idle_timeout``; a whole request (head and body) must arrive within
  ``request_timeout`` of its first byte, and an answer must be taken within it too;
- a request head of at most :data:`MAX_HEAD` bytes and a body of at most
  :data:`~envfs.kms.awsjson.MAX_BODY` (``413`` and the connection closed otherwise);
- requests whose signature fails are counted per client address: past
  ``failure_rate`` they are refused (``ThrottlingException``) before any signature is
  computed or key looked up;
- once signed, the per-uid call limits of :mod:`envfs.kms.limits` apply to the access
  key's user, as on the Unix socket;
- each signature is accepted once: a replay within the five minutes it is valid is
  refused, except within :data:`REPEAT_GRACE` seconds of its first use, since a client
  that sends the same request twice within one second signs it the same way (SigV4's
  time has whole seconds; boto3 and aws-cli, by default, sign nothing else that changes
  between calls). Behind TLS a replay needs the request itself, and then it must come
  within that grace of the original.

A request signed with an access key never acts *on behalf of* another user, and may not
create, activate, deactivate or delete access keys (:mod:`envfs.kms.accesskeys`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import email.utils
import errno
import ipaddress
import logging
import socket
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import h11
import trio

from envfs.errors import (
    AccessDeniedException,
    EnvfsError,
    KMSError,
    KMSInternalException,
    ThrottlingException,
    UsageError,
)
from envfs.identity import Caller
from envfs.kms import awsjson, sigv4
from envfs.kms.dispatch import Dispatcher, Request
from envfs.kms.limits import Rate, TokenBucket

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # request line and headers; botocore's are under 2 KiB
_RECEIVE_SIZE = 65536
_AUTH_TURN = -1  # the worker's turn for signature checks: done for nobody known yet
_ACCEPT_RETRY_DELAY = 0.1
_ACCEPT_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_MAX_SOURCES = 4096  # client addresses whose failed signatures are counted
_LAST_USED_INTERVAL = 60.0  # an access key's LastUsedDate is written at most this often
_LOG_INTERVAL = 60.0  # a refusal per client address is logged at most this often
REPEAT_GRACE = 2.0  # seconds in which a signature is accepted again (see the module's doc)
DEFAULT_FAILURE_RATE = Rate(5.0, 50.0)  # failed signatures a second per client address

SecretFor = Callable[[str], "tuple[bytes, int, str | None] | None"]
"""``secret_for(access_key_id) -> (secret, uid, user name) | None`` (run in the worker
thread); the name is the owner's when the key was made (None if the uid had none)."""


@dataclass(frozen=True)
class HttpEndpoint:
    """What :func:`serve_http` serves: a listening TCP socket and its settings.

    Args:
        sock: the listening socket (:func:`bind_tcp`); ``serve_http`` closes it.
        region: the region whose store this is; a signature's scope must name it.
        secret_for: an access key's secret, uid and owner's name, e.g.
            ``KeyService.signing_secret``.
        key_used: told that an access key signed a request (at most once a minute per
            key), e.g. ``KeyService.access_key_used``.
        tls: the server's TLS context (:func:`tls_context`); None for plain HTTP.
    """

    sock: socket.socket
    region: str
    secret_for: SecretFor
    key_used: Callable[[str], object]
    tls: ssl.SSLContext | None = None
    idle_timeout: float = 60.0
    request_timeout: float = 10.0
    max_connections: int = 256
    max_connections_per_address: int = 32
    failure_rate: Rate | None = DEFAULT_FAILURE_RATE

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"


# --- the listening socket and TLS --------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` to ``(host, port)``.

    Raises:
        ValueError: not of that form, or a port outside 0..65535.
    """
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdecimal() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8443 or [::1]:8443)")
    return host, int(port)


def bind_tcp(host: str, port: int, *, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """Bind and listen on ``host:port`` (the first address ``host`` resolves to).

    Raises:
        UsageError: the host does not resolve, or the address cannot be bound (in use,
            not this machine's, a privileged port).
    """
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host!r}: {exc.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def is_loopback(sock: socket.socket) -> bool:
    """True if ``sock`` is bound to a loopback address (only this machine can connect)."""
    host = sock.getsockname()[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context of TLS 1.2 or later with the PEM certificate chain and key.

    Raises:
        UsageError: a file cannot be read, or is not a PEM certificate or key, or the
            key is not the certificate's (the message says which, and no key material).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except FileNotFoundError as exc:
        raise UsageError(f"TLS: cannot read '{exc.filename}': no such file") from None
    except PermissionError as exc:
        raise UsageError(f"TLS: cannot read '{exc.filename}': permission denied") from None
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        raise UsageError(
            f"TLS: cannot load the certificate '{cert_file}' with the key '{key_file}':"
            f" {reason} (expected PEM files, the key matching the certificate)"
        ) from None
    except OSError as exc:
        raise UsageError(f"TLS: cannot read a certificate or key: {exc.strerror}") from None
    return context


# --- serving -----------------------------------------------------------------------------


async def serve_http(
    dispatcher: Dispatcher,
    endpoint: HttpEndpoint,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``endpoint`` until cancelled; ``task_status`` is given its URL."""
    sock = endpoint.sock
    sock.setblocking(False)
    server = _HttpServer(dispatcher, endpoint)
    url = endpoint.url
    try:
        async with trio.open_nursery() as nursery:
            logger.info("key service HTTP endpoint listening on %s", url)
            task_status.started(url)
            await server.accept_forever(sock, nursery)
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        logger.info("key service HTTP endpoint on %s stopped", url)


@dataclass(frozen=True)
class _Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


class _Refused(Exception):
    """A request answered with ``status`` and the connection then closed."""

    def __init__(self, status: int, error: awsjson.WireError) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error


@dataclass(eq=False)
class _Connection:
    """An open connection, as :meth:`_HttpServer._make_room` sees it: ``scope`` closes it;
    ``signed`` once it carried a validly signed request; ``answering`` while a request
    received whole is being answered."""

    scope: trio.CancelScope
    signed: bool = False
    answering: bool = False


class _HttpServer:
    def __init__(self, dispatcher: Dispatcher, endpoint: HttpEndpoint) -> None:
        self._dispatcher = dispatcher
        self._endpoint = endpoint
        self._slots = trio.Semaphore(endpoint.max_connections)
        self._replays = sigv4.ReplayCache(repeat_grace=REPEAT_GRACE)
        self._failures: OrderedDict[str, TokenBucket] = OrderedDict()
        self._failure_logged: dict[str, float] = {}
        self._last_used: dict[str, float] = {}
        self._per_address: dict[str, int] = {}
        self._cap_logged: dict[str, float] = {}
        self._open: OrderedDict[_Connection, None] = OrderedDict()  # oldest first

    # --- connections -----------------------------------------------------------------

    async def accept_forever(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            # Accepted (within its address's bound) before a slot is found for it, so that
            # only a connection that will be served makes another give way.
            conn, source = await self._accept(sock)
            try:
                if self._slots.value == 0:
                    self._make_room()
                await self._slots.acquire()
            except BaseException:
                conn.close()
                self._release(source)
                raise
            nursery.start_soon(self._run_connection, conn, source)

    def _make_room(self) -> None:
        """Close the oldest connection that is not answering a request, for a new one
        waiting while every slot is taken: the oldest that has not yet carried a validly
        signed request, else the oldest signed one (idle or still sending a request).

        Otherwise clients without an access key could hold every slot from a few
        addresses, each connection kept by a refused request a minute or a slow one, and
        a user with a key by idle connections. A request received whole is answered; a
        client whose idle connection was closed connects again, as HTTP clients do.
        """
        waiting = [conn for conn in self._open if not conn.answering]
        victim = next((conn for conn in waiting if not conn.signed), None)
        if victim is None and waiting:
            victim = waiting[0]
        if victim is not None:
            del self._open[victim]
            victim.scope.cancel()

    def _admit(self, conn: socket.socket) -> str | None:
        """The client address of a new connection, or None (and the connection closed)
        if that address holds as many connections as it may."""
        source = _source(conn)
        host = _host(source)
        held = self._per_address.get(host, 0)
        if held < self._endpoint.max_connections_per_address:
            self._per_address[host] = held + 1
            return source
        conn.close()
        now = time.monotonic()
        if now - self._cap_logged.get(host, -_LOG_INTERVAL) >= _LOG_INTERVAL:
            if len(self._cap_logged) >= _MAX_SOURCES:
                self._cap_logged.clear()
            self._cap_logged[host] = now
            logger.warning("closing connections from %s: it holds %d already", host, held)
        return None

    def _release(self, source: str) -> None:
        host = _host(source)
        held = self._per_address.pop(host, 1) - 1
        if held > 0:
            self._per_address[host] = held

    async def _accept(self, sock: socket.socket) -> tuple[socket.socket, str]:
        while True:
            try:
                conn, _address = sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_RESOURCE_ERRNOS:
                    raise
                logger.error("cannot accept an HTTP connection: %s; retrying", exc.strerror)
                await trio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            source = self._admit(conn)
            if source is not None:
                return conn, source
            await trio.lowlevel.checkpoint()

    async def _run_connection(self, conn: socket.socket, source: str) -> None:
        stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        # The handshake and the first request's first bytes share one request_timeout: a
        # client must not hold its slot twice as long by handshaking late.
        first_by = trio.current_time() + self._endpoint.request_timeout
        scope = trio.CancelScope()
        connection = _Connection(scope)
        self._open[connection] = None
        try:
            with scope:
                if self._endpoint.tls is not None:
                    tls_stream = trio.SSLStream(
                        stream, self._endpoint.tls, server_side=True, https_compatible=True
                    )
                    stream = tls_stream
                    with trio.move_on_after(self._endpoint.request_timeout) as handshake:
                        await tls_stream.do_handshake()
                    if handshake.cancelled_caught:
                        logger.debug("TLS handshake with %s timed out", source)
                        return
                await self._converse(stream, source, first_by, connection)
            if scope.cancelled_caught:
                logger.debug("closed HTTP connection from %s to make room", source)
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLError):
                logger.info("TLS with %s failed: %s", source, cause.reason or cause)
            else:
                logger.debug("HTTP connection from %s lost", source)
        except trio.ClosedResourceError:
            logger.debug("HTTP connection from %s lost", source)
        except Exception:
            logger.exception("HTTP connection from %s failed", source)
        finally:
            self._open.pop(connection, None)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            self._release(source)
            self._slots.release()

    async def _converse(
        self, stream: trio.abc.Stream, source: str, first_by: float, connection: _Connection
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        wait = max(0.0, first_by - trio.current_time())  # for the first request
        while True:
            try:
                received = await self._read_request(conn, stream, wait)
            except _Refused as refused:
                body = awsjson.encode_error(refused.error)[1]
                await self._send(conn, stream, refused.status, body, close=True)
                return
            if received is None:
                return
            connection.answering = True
            status, body = await self._answer(received, source, connection)
            if not await self._send(conn, stream, status, body, close=False):
                return
            connection.answering = False
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
            wait = self._endpoint.idle_timeout

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.Stream, wait: float
    ) -> _Received | None:
        """The next whole request, or None when the client closed or sent nothing for
        ``wait`` seconds.

        Raises:
            _Refused: a request that is not well-formed HTTP/1.1, too large, or too slow.
        """
        if not conn.trailing_data[0]:
            data = b""
            with trio.move_on_after(wait):
                data = bytes(await stream.receive_some(_RECEIVE_SIZE))
            if not data:
                return None  # closed by the client, or idle for too long
            conn.receive_data(data)
        with trio.move_on_after(self._endpoint.request_timeout):
            try:
                return await self._read_events(conn, stream)
            except h11.RemoteProtocolError as exc:
                raise _Refused(
                    exc.error_status_hint,
                    awsjson.WireError("SerializationException", f"malformed HTTP request: {exc}"),
                ) from None
        raise _Refused(
            408,
            awsjson.WireError(
                "RequestTimeout",
                f"the request did not arrive within {self._endpoint.request_timeout:g} seconds",
            ),
        )

    async def _read_events(self, conn: h11.Connection, stream: trio.abc.Stream) -> _Received | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                conn.receive_data(bytes(await stream.receive_some(_RECEIVE_SIZE)))
                continue
            if isinstance(event, h11.Request):
                request = event
                _check_head(event)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > awsjson.MAX_BODY:
                    raise _Refused(413, _too_large())
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                return _Received(
                    request.method.decode("ascii", "replace"),
                    request.target.decode("ascii", "replace"),
                    [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers],
                    bytes(body),
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        status: int,
        body: bytes,
        *,
        close: bool,
    ) -> bool:
        headers = [
            ("Content-Type", awsjson.CONTENT_TYPE),
            ("Content-Length", str(len(body))),
            ("x-amzn-RequestId", str(uuid.uuid4())),
            ("Date", email.utils.formatdate(usegmt=True)),
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers))
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return False  # the client's side of the exchange made an answer impossible
        with trio.move_on_after(self._endpoint.request_timeout):
            await stream.send_all(data)
            return True
        logger.debug("closing an HTTP connection that does not take its answer")
        return False

    # --- requests --------------------------------------------------------------------

    async def _answer(
        self, received: _Received, source: str, connection: _Connection
    ) -> tuple[int, bytes]:
        """The status and body answering one request received on ``connection``."""
        if received.method != "POST":
            error = awsjson.WireError(
                "UnknownOperationException",
                "the key service takes POST requests of AWS's JSON 1.1 protocol only",
            )
            return 405, awsjson.encode_error(error)[1]
        try:
            caller = await self._authenticate(received, source)
        except KMSError as exc:
            return _error(exc)
        connection.signed = True  # it keeps its place when the slots run out
        try:
            admitted = self._dispatcher.admit(caller)
            operation, params = awsjson.parse_request(
                _header(received.headers, "x-amz-target"), received.body
            )
        except (KMSError, awsjson.WireError) as exc:
            return _error(exc)
        try:
            result = await self._dispatcher.call(admitted, Request(operation, params))
        except KMSError as exc:
            return _error(exc)
        except EnvfsError as exc:
            logger.error("%s for %s failed: %s", operation, caller.describe(), exc.message)
            return _error(KMSInternalException(exc.message))
        except Exception:
            logger.exception("%s for %s failed unexpectedly", operation, caller.describe())
            return _error(KMSInternalException("internal error"))
        await self._note_use(caller)
        return 200, awsjson.encode_result(result)

    async def _authenticate(self, received: _Received, source: str) -> Caller:
        """The caller a request's signature names (with its access key and address).

        Raises:
            ThrottlingException: too many failed signatures from ``source`` lately.
            SignatureAuthError: the signature is missing, malformed, wrong, stale,
                replayed, or made with an unknown or inactive key.
            AccessDeniedException: the key's user no longer exists, or its uid is now
                another user's.
            KMSInternalException: the store could not be read.
        """
        endpoint = self._endpoint
        bucket = self._failure_bucket(source)
        now = time.monotonic()
        if bucket is not None and not bucket.has_token(now):
            raise ThrottlingException(
                "too many requests with failed signatures from this address; slow down"
            )
        signed = _signed(received)
        owner: list[tuple[int, str | None]] = []

        def check() -> str:
            def secret(access_key_id: str) -> bytes | None:
                found = endpoint.secret_for(access_key_id)
                if found is None:
                    return None
                owner.append((found[1], found[2]))
                return found[0]

            return sigv4.verify(
                signed,
                secret,
                region=endpoint.region,
                now=_dt.datetime.now(_dt.UTC),
                replay_cache=self._replays,
            )

        try:
            access_key_id = await self._dispatcher.in_worker(_AUTH_TURN, check)
        except sigv4.SignatureAuthError as exc:
            if bucket is not None:
                bucket.take(now)
            self._log_failure(source, exc)
            raise
        except EnvfsError as exc:
            logger.error("cannot check a signature from %s: %s", source, exc.message)
            raise KMSInternalException("the key service cannot check signatures now") from None
        uid, user_name = owner[0]
        caller = await trio.to_thread.run_sync(_caller_of, uid)
        if caller is not None and caller.user_name == user_name:
            return replace(caller, access_key_id=access_key_id, source=source)
        if caller is None:
            message = f"access key {access_key_id} belongs to uid {uid}, which is no user here"
        else:
            # The uid was freed and given to someone else (or the user renamed): the key
            # was issued to the old name, and acting as the uid's new user would be theirs.
            message = (
                f"access key {access_key_id} belongs to user {user_name!r}, who is no longer"
                f" uid {uid} here"
            )
        refusal = AccessDeniedException(message)
        if bucket is not None:  # counted and logged as a failed signature: no one to audit
            bucket.take(now)
        self._log_failure(source, refusal)
        raise refusal

    def _failure_bucket(self, source: str) -> TokenBucket | None:
        rate = self._endpoint.failure_rate
        if rate is None:
            return None
        host = _host(source)
        bucket = self._failures.get(host)
        if bucket is None:
            if len(self._failures) >= _MAX_SOURCES:
                self._failures.popitem(last=False)
            bucket = self._failures[host] = TokenBucket(rate, time.monotonic())
        else:
            self._failures.move_to_end(host)
        return bucket

    def _log_failure(self, source: str, exc: KMSError) -> None:
        """Log a refused signature, at most once a minute per address."""
        host = _host(source)
        now = time.monotonic()
        if now - self._failure_logged.get(host, -_LOG_INTERVAL) < _LOG_INTERVAL:
            return
        if len(self._failure_logged) >= _MAX_SOURCES:
            self._failure_logged.clear()
        self._failure_logged[host] = now
        logger.warning("refused a request from %s: %s: %s", source, exc.aws_name, exc.message)

    async def _note_use(self, caller: Caller) -> None:
        access_key_id = caller.access_key_id
        if access_key_id is None:
            return
        now = time.monotonic()
        last = self._last_used.get(access_key_id)
        if last is not None and now - last < _LAST_USED_INTERVAL:
            return
        self._last_used[access_key_id] = now
        try:
            await self._dispatcher.in_worker(caller.uid, self._endpoint.key_used, access_key_id)
        except Exception:
            logger.exception("cannot record the use of access key %s", access_key_id)


def _error(error: KMSError | awsjson.WireError) -> tuple[int, bytes]:
    status, body = awsjson.encode_error(error)
    if isinstance(error, sigv4.SignatureAuthError):
        status = error.status
    return status, body


def _too_large() -> awsjson.WireError:
    return awsjson.WireError(
        "SerializationException", f"the body is larger than {awsjson.MAX_BODY} bytes"
    )


def _check_head(request: h11.Request) -> None:
    """Refuse a head over :data:`MAX_HEAD` (h11 bounds only one that arrives in parts) or
    a declared body over the limit."""
    size = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)
    if size > MAX_HEAD:
        raise _Refused(
            431,
            awsjson.WireError(
                "SerializationException", f"the request head is larger than {MAX_HEAD} bytes"
            ),
        )
    for name, value in request.headers:
        if name == b"content-length" and int(value) > awsjson.MAX_BODY:
            raise _Refused(413, _too_large())


def _signed(received: _Received) -> sigv4.SignedRequest:
    path, _, query = received.target.partition("?")
    return sigv4.SignedRequest(received.method, path, query, received.headers, received.body)


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    values = [v for n, v in headers if n.lower() == name]
    return values[0] if len(values) == 1 else None


def _source(conn: socket.socket) -> str:
    with contextlib.suppress(OSError):
        host, port = conn.getpeername()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "an unknown address"


def _host(source: str) -> str:
    return client_network(source.rpartition(":")[0])


def client_network(host: str) -> str:
    """What the limits per client address count ``host`` (as :func:`_source` writes it) as.

    An IPv4 address is itself; an IPv6 address counts as its /64, the block one machine or
    site is given: a client holds a whole /64 and could otherwise take every connection
    and escape its failed-signature rate by moving from one of its addresses to the next.
    """
    if host.startswith("[") and host.endswith("]"):
        with contextlib.suppress(ValueError):
            network = ipaddress.IPv6Network((host[1:-1], 64), strict=False)
            return f"[{network}]"
    return host


def _caller_of(uid: int) -> Caller | None:
    """The caller an access key's uid is, with the user's groups; None if no such user
    (blocking: reads the user and group databases)."""
    import pwd

    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return None
    return Caller.from_ids(uid, entry.pw_gid)
