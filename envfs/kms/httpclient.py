"""A client of the key service's HTTP endpoint: AWS KMS's JSON 1.1, signed with SigV4.

The same operations as the Unix-socket client (:mod:`envfs.kms.client`), every one of
:data:`envfs.kms.operations.OPERATIONS` including envfs's own (access keys, the audit log):
bodies are made by :mod:`envfs.kms.awsjson` from the operation table, not from AWS's
service model, and results come back as the socket client returns them (blobs as bytes).
The caller is whoever the access key belongs to; the service decides as that Unix user.

A request is ``POST`` to the endpoint's path with ``X-Amz-Target: TrentService.<Op>``,
signed with Signature Version 4 (service ``kms``, the store's region) by the helpers the
service verifies with (:mod:`envfs.kms.sigv4`; the tests hold them to botocore's signer).
Each call carries a random ``amz-sdk-invocation-id`` and its attempt number, signed, as
botocore sends them: two identical calls in one second, or a retry, never make the same
signature, which the service would refuse as a replay.

Transport: :mod:`http.client`, one connection per attempt. ``https`` verifies the server's
certificate and name (the system's CAs, or ``ca_bundle``); there is no way to turn that
off, and the session keys are never logged (``SSLKEYLOGFILE`` is not read). Plain
``http`` only to a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``), checked
again on the connected socket, whose listener must run as a trusted uid (root, ours,
``$ENVFS_KMS_SERVER_UID``) as the Unix-socket client requires. Connecting is bounded by
``connect_timeout``, the whole answer by ``read_timeout`` (``None``: no bound, as
aws-cli's ``0``), not only each wait for a part of it (as aws-cli), which a server
sending a byte at a time defeats.

Retries, at most ``max_attempts`` attempts in all, the n-th retry after a random
``0..2**(n-1)`` seconds (botocore's standard mode; capped at :data:`MAX_BACKOFF`), only
when a repeat cannot do harm:

- a connection that could not be made (nothing was sent): any operation;
- ``ThrottlingException`` (the service refused before doing anything): any operation;
- a 5xx answer, a lost connection or a timeout after the request was sent (the call may
  have been done): only operations in :data:`REPEATABLE`, whose repeat changes nothing
  or only makes one more random value. ``CreateKey``, ``CreateAccessKey``, aliases,
  deletions and ``RotateKeyOnDemand`` are not repeated: a second ``CreateKey`` would make
  a second key, a second ``CreateAccessKey`` would lose the first secret. (aws-cli repeats
  every operation; envfs prefers an error that says the outcome is unknown.)

Nothing here logs or raises with a secret access key, a signature, a request body or a
result: log lines name the operation, the endpoint, the status and the attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import socket
import ssl
import sys
import threading
import time
import types
import unicodedata
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import SplitResult, urlsplit

from envfs.errors import (
    DependencyTimeoutException,
    InvalidRequestException,
    KMSError,
    KMSInternalException,
    KMSUnavailableException,
    ThrottlingException,
)
from envfs.kms import awsjson, sigv4
from envfs.kms.core import AUDIT_ONLY_OPERATIONS
from envfs.kms.loopback import is_loopback_host, loopback_server_uid, trusted_uids

log = logging.getLogger(__name__)

SERVICE = "kms"
MAX_ANSWER = 16 << 20  # bytes; a page of audit records is far smaller
MAX_BACKOFF = 20.0  # seconds, as botocore's standard retry mode caps it
DEFAULT_ATTEMPTS = 3  # botocore's standard retry mode
_TIME = "%Y%m%dT%H%M%SZ"
_NAME_SHAPE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

# Operations whose repeat, when an attempt's outcome is unknown, changes nothing or only
# makes one more random value (and one more audit record): those that change no key (the
# service's own list), and changes that set a state rather than add one. Not here, so never
# repeated once sent: CreateKey, CreateAccessKey, CreateAlias, DeleteAlias, DeleteAccessKey,
# ScheduleKeyDeletion, CancelKeyDeletion, RotateKeyOnDemand, and any operation added later.
REPEATABLE = AUDIT_ONLY_OPERATIONS | frozenset(
    {
        "EnableKey",
        "DisableKey",
        "EnableKeyRotation",
        "DisableKeyRotation",
        "UpdateKeyDescription",
        "UpdateAlias",
        "TagResource",
        "UntagResource",
        "PutKeyPolicy",
        "UpdateAccessKey",
    }
)


# --- errors ------------------------------------------------------------------------------


class EndpointUnavailableException(KMSUnavailableException, wire=False):
    """The endpoint cannot be reached (refused, no such host, TLS failure, connection lost):
    ``KMSUnavailableException`` with a hint of what to check instead of the daemon's."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


# Names an envfs endpoint or AWS may answer that envfs has no class for, read as the
# class whose exit code fits (the Unix socket answers the same faults with that class).
_PARENTS: dict[str, type[KMSError]] = {
    "SerializationException": InvalidRequestException,
    "UnknownOperationException": InvalidRequestException,
    "ThrottledException": ThrottlingException,
    "TooManyRequestsException": ThrottlingException,
    "RequestLimitExceeded": ThrottlingException,
}


def error_from_answer(aws_name: str, message: str) -> KMSError:
    """The exception for an error the endpoint named ``aws_name``: envfs's own class for
    a name it knows (with the SigV4 refusals of :mod:`envfs.kms.sigv4`), else a class made
    for the name, a :class:`KMSError` (exit 10) unless :data:`_PARENTS` names its kind.
    """
    known = KMSError.registry.get(aws_name)
    if known is not None:
        return known(message)
    parent = _PARENTS.get(aws_name, KMSError)
    made = types.new_class(
        aws_name,
        (parent,),
        {"wire": False},
        lambda namespace: namespace.update(
            {"aws_name": aws_name, "__module__": __name__, "__doc__": "an error envfs lacks"}
        ),
    )
    return cast("type[KMSError]", made)(message)


def _error_name(raw: object) -> str | None:
    """``__type`` as AWS writes it (``NotFoundException``, ``com.amazonaws.kms#Name``,
    ``Name:http://...``) reduced to the name; None if it is no name."""
    if not isinstance(raw, str):
        return None
    name = raw.rsplit("#", 1)[-1].split(":", 1)[0]
    if not 0 < len(name) <= 128 or not set(name) <= _NAME_SHAPE or not name[0].isalpha():
        return None
    return name


# --- the endpoint ------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the key service's HTTP endpoint is: ``http(s)://HOST[:PORT][/PATH]``."""

    scheme: str
    host: str  # a name, or an IP address without brackets
    port: int
    path: str  # where to POST, ``/`` when the URL has none

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Read an endpoint URL.

        Raises:
            ValueError: not an ``https://`` URL of a host (``http://`` only to a loopback
                address), or one with credentials, a query or a fragment. The message
                quotes the URL without any credentials it held.
        """
        if not url or any(not " " < char <= "~" for char in url):
            raise ValueError(
                f"{_shown(url)} is not a URL: it is empty or has spaces, control or non-ASCII"
                " characters"
            )
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{_shown(url)} is not a URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(
                f"{_shown(url)} is not an https:// URL (e.g. https://kms.example.org:8443)"
            )
        host = parts.hostname
        if not host:
            raise ValueError(f"{_shown(url)} names no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"{_shown(url)} holds credentials: give them as AWS credentials"
                " (AWS_ACCESS_KEY_ID, a profile), never in the URL"
            )
        if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
            raise ValueError(f"{_shown(url)} has a query or fragment; the endpoint takes none")
        if port == 0:
            raise ValueError(f"{_shown(url)} has port 0")
        endpoint = cls(
            scheme=scheme,
            host=host,
            port=port if port is not None else (443 if scheme == "https" else 80),
            path=parts.path or "/",
        )
        if scheme == "http" and not is_loopback_host(host):
            raise ValueError(
                f"{_shown(url)} is plain http to a host that is not this machine: requests"
                " and answers (plaintexts, data keys) would cross the network unencrypted;"
                " use https://, or http:// only to 127.0.0.1, [::1] or localhost"
            )
        return endpoint

    @property
    def netloc(self) -> str:
        """``HOST[:PORT]`` as the ``Host`` header has it (the port left out when default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}{'' if self.path == '/' else self.path}"


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The client's TLS: the server's certificate and name verified against ``ca_bundle``
    (PEM), else the system's CAs. As ``ssl.create_default_context``, but never writing the
    session keys to ``$SSLKEYLOGFILE``, which it does when that is set: a debugging setting
    left in a shell's profile would log what decrypts every plaintext and data key sent.

    Raises:
        OSError: ``ca_bundle`` cannot be read, or is not PEM (``ssl.SSLError``).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname check, CERT_REQUIRED
    if sys.version_info >= (3, 13):  # what create_default_context adds there
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    if ca_bundle is not None:
        context.load_verify_locations(cafile=ca_bundle)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def header_safe(text: str) -> bool:
    """Whether ``text`` is a credential an HTTP header carries as is: visible ASCII only."""
    return bool(text) and all(" " < char <= "~" for char in text)


def _shown(url: str) -> str:
    """``url`` quoted for a message, without a user or password it may hold."""
    try:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            netloc = parts.netloc.rsplit("@", 1)[-1]
            url = SplitResult(parts.scheme, "***@" + netloc, parts.path, "", "").geturl()
    except ValueError:
        if "@" in url:
            return "the URL"
    return repr(url[:200])


# --- credentials and signing ------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """An access key (and a session token, which an envfs endpoint refuses). Neither the
    secret nor the token is in its ``repr``."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def sign(
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    path: str,
    credentials: Credentials,
    region: str,
    when: float,
) -> list[tuple[str, str]]:
    """``headers`` (which must hold ``Host``) with ``X-Amz-Date``, the session token if
    any, and ``Authorization`` added: a SigV4 signature of a ``POST`` over every header."""
    amz_date = time.strftime(_TIME, time.gmtime(when))
    signed = [*headers, ("X-Amz-Date", amz_date)]
    if credentials.session_token:
        signed.append(("X-Amz-Security-Token", credentials.session_token))
    names = sorted({name.lower() for name, _ in signed})
    request = sigv4.SignedRequest("POST", path, "", signed, body)
    payload_hash = hashlib.sha256(body).hexdigest()
    canonical = sigv4.canonical_request(request, names, payload_hash)
    scope = f"{amz_date[:8]}/{region}/{SERVICE}/{sigv4.TERMINATOR}"
    key = sigv4.signing_key(credentials.secret_access_key.encode(), amz_date[:8], region, SERVICE)
    signature = hmac.new(
        key, sigv4.string_to_sign(amz_date, scope, canonical).encode(), hashlib.sha256
    ).hexdigest()
    authorization = (
        f"{sigv4.ALGORITHM} Credential={credentials.access_key_id}/{scope},"
        f" SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return [*signed, ("Authorization", authorization)]


# --- the client --------------------------------------------------------------------------


class _Sent(Exception):
    """An attempt failed after its request may have reached the service."""

    def __init__(self, error: KMSError) -> None:
        super().__init__(error.message)
        self.error = error


class _NotSent(Exception):
    """An attempt failed before anything was sent."""

    def __init__(self, error: KMSError) -> None:
        super().__init__(error.message)
        self.error = error


class HTTPKMSClient:
    """Calls to the key service at ``endpoint`` with ``credentials``, signed for ``region``.

    Synchronous and thread-safe: each attempt opens its own connection and closes it.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        region: str,
        *,
        ca_bundle: str | None = None,
        connect_timeout: float | None = 10.0,
        read_timeout: float | None = 60.0,
        max_attempts: int = DEFAULT_ATTEMPTS,
        user_agent: str = "envfs",
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        trusted_server_uids: frozenset[int] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        self.endpoint = endpoint
        self.credentials = credentials
        self.region = region
        self.ca_bundle = ca_bundle
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self.user_agent = user_agent
        self._clock = clock
        self._sleep = sleep
        self._tls: ssl.SSLContext | None = None
        if trusted_server_uids is None:  # as the Unix-socket client's
            trusted_server_uids = trusted_uids()
        self.trusted_server_uids = trusted_server_uids

    def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Run ``operation`` with ``params`` as the access key's user.

        Raises:
            KMSError: the error the service answered with: envfs's own class for the name
                (a SigV4 refusal is one of :mod:`envfs.kms.sigv4`'s), else a class made for
                it (exit 10, or as :data:`_PARENTS` says).
            EndpointUnavailableException: no connection, a TLS failure (an unverified
                certificate), or the connection lost (``KMSUnavailableException``).
            DependencyTimeoutException: no answer within ``read_timeout``.
            KMSInternalException: an answer that is not one of the protocol's.
            InvalidRequestException: ``params`` cannot be sent, or the credentials cannot be
                put in a header; nothing was sent.
        """
        if not header_safe(self.credentials.access_key_id) or not header_safe(
            self.credentials.session_token or "-"
        ):
            # http.client would refuse the header quoting it: the signature or the token.
            raise InvalidRequestException(
                "the access key id or the session token has spaces, control or non-ASCII"
                " characters (a carriage return from a file?); nothing was sent"
            )
        body = awsjson.encode_request(operation, params)
        invocation = str(uuid.uuid4())
        attempt = 1
        while True:
            try:
                return self._attempt(operation, body, invocation, attempt)
            except _NotSent as failed:
                error, retry = failed.error, True
            except _Sent as failed:
                error, retry = failed.error, operation in REPEATABLE
            except ThrottlingException as exc:
                error, retry = exc, True
            if not retry or attempt >= self.max_attempts:
                raise error
            delay = min(MAX_BACKOFF, random.random() * 2 ** (attempt - 1))  # noqa: S311 (jitter)
            log.info(
                "%s to %s failed (%s), attempt %d of %d; again in %.1f s",
                operation,
                self.endpoint,
                error.aws_name,
                attempt,
                self.max_attempts,
                delay,
            )
            self._sleep(delay)
            attempt += 1

    # --- one attempt ---------------------------------------------------------------------

    def _attempt(
        self, operation: str, body: bytes, invocation: str, attempt: int
    ) -> dict[str, Any]:
        headers = [
            ("Host", self.endpoint.netloc),
            ("Content-Type", awsjson.CONTENT_TYPE),
            ("X-Amz-Target", awsjson.TARGET_PREFIX + operation),
            ("amz-sdk-invocation-id", invocation),
            ("amz-sdk-request", f"attempt={attempt}; max={self.max_attempts}"),
        ]
        signed = sign(
            headers,
            body,
            path=self.endpoint.path,
            credentials=self.credentials,
            region=self.region,
            when=self._clock(),
        )
        connection = self._connect()
        try:
            status, answer = self._exchange(connection, signed, body)
        finally:
            connection.close()
        log.debug("%s to %s: HTTP %d, attempt %d", operation, self.endpoint, status, attempt)
        if status == 200:
            try:
                return awsjson.decode_result(operation, answer)
            except KMSInternalException as exc:
                # Unreadable, but a success: a CreateKey made its key. Say so, lest the
                # user make a second one by trying again.
                raise KMSInternalException(
                    f"{exc.message} (the service answered 200 OK: the call was done)"
                ) from None
        error = self._error(status, answer)
        if status >= 500 and not isinstance(error, ThrottlingException):
            raise _Sent(error)
        raise error

    def _connect(self) -> http.client.HTTPConnection:
        endpoint = self.endpoint
        connection: http.client.HTTPConnection
        if endpoint.scheme == "https":
            connection = http.client.HTTPSConnection(
                endpoint.host, endpoint.port, timeout=self.connect_timeout, context=self._context()
            )
        else:
            connection = http.client.HTTPConnection(
                endpoint.host, endpoint.port, timeout=self.connect_timeout
            )
        try:
            connection.connect()
        except ssl.SSLCertVerificationError as exc:
            connection.close()
            raise EndpointUnavailableException(
                f"cannot reach the key service at '{endpoint}' securely: its TLS certificate"
                f" does not verify ({exc.verify_message or exc.reason})",
                "if it is signed by your own CA, give that CA's certificate with --ca-bundle"
                " FILE (or AWS_CA_BUNDLE)",
            ) from None
        except ssl.SSLError as exc:
            connection.close()
            raise EndpointUnavailableException(
                f"cannot reach the key service at '{endpoint}': the TLS handshake failed"
                f" ({exc.reason or exc})",
                "is it an https endpoint? (plain http is for loopback addresses only)",
            ) from None
        except TimeoutError:
            connection.close()
            raise _NotSent(
                EndpointUnavailableException(
                    f"cannot reach the key service at '{endpoint}': no connection"
                    f" {_within(self.connect_timeout)}",
                    "check the URL, and that 'envfs kms serve --listen-http' runs there"
                    " (--cli-connect-timeout SECONDS waits longer)",
                )
            ) from None
        except OSError as exc:
            connection.close()
            error = EndpointUnavailableException(
                f"cannot reach the key service at '{endpoint}': {_reason(exc)}",
                "check the URL, and that 'envfs kms serve --listen-http' runs there",
            )
            if isinstance(exc, socket.gaierror) and exc.errno != socket.EAI_AGAIN:
                raise error from None  # no such host: asking again will not make one
            raise _NotSent(error) from None
        sock = connection.sock
        if endpoint.scheme == "http" and sock is not None:
            # "localhost" is resolved by the system: never send plaintext off this machine.
            peer = sock.getpeername()[0]
            if not ipaddress.ip_address(str(peer).split("%", 1)[0]).is_loopback:
                connection.close()
                raise EndpointUnavailableException(
                    f"'{endpoint}' led to {peer}, which is not a loopback address: refusing"
                    " to send over plain http",
                    "use https://, or http://127.0.0.1:PORT",
                )
            # Any local user may listen on a free port (the service stopped, say): without
            # TLS, only the listener's uid tells the service from one who would read the
            # plaintexts and replay the signed requests to the service within 5 minutes.
            owner = loopback_server_uid(sock)
            if owner not in self.trusted_server_uids:
                connection.close()
                who = "an unknown uid" if owner is None else f"uid {owner}"
                raise EndpointUnavailableException(
                    f"the process listening at '{endpoint}' runs as {who}, which is not"
                    " trusted to be the key service (root, yourself, or"
                    " $ENVFS_KMS_SERVER_UID)",
                    "if the service runs as another user, set ENVFS_KMS_SERVER_UID to its"
                    " uid; or use https://",
                )
        if sock is not None:
            sock.settimeout(self.read_timeout)
        return connection

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            try:
                self._tls = tls_context(self.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise EndpointUnavailableException(
                    f"cannot use the CA bundle {self.ca_bundle!r}: {_reason(exc)}",
                    "--ca-bundle (or AWS_CA_BUNDLE) names a PEM file of CA certificates",
                ) from None
        return self._tls

    def _exchange(
        self, connection: http.client.HTTPConnection, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, bytes]:
        endpoint = self.endpoint
        # The socket's timeout bounds each wait; this bounds the whole answer, which a
        # server sending a byte at a time would otherwise stretch without end.
        phase = _Deadline(self.read_timeout, connection.sock)
        try:
            with phase:
                status, answer = self._send_and_read(connection, headers, body)
        except (OSError, http.client.HTTPException) as exc:
            if phase.expired or isinstance(exc, TimeoutError):
                raise self._no_answer() from None
            raise _Sent(
                EndpointUnavailableException(
                    f"lost the connection to the key service at '{endpoint}': {_reason(exc)}"
                    " (the call may have been done)",
                    "check that 'envfs kms serve --listen-http' runs there",
                )
            ) from None
        if phase.expired:  # the answer may have been cut short by the deadline
            raise self._no_answer()
        return status, answer

    def _no_answer(self) -> _Sent:
        return _Sent(
            DependencyTimeoutException(
                f"the key service at '{self.endpoint}' did not answer"
                f" {_within(self.read_timeout)} (the call may have been done)"
            )
        )

    def _send_and_read(
        self, connection: http.client.HTTPConnection, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, bytes]:
        endpoint = self.endpoint
        connection.putrequest("POST", endpoint.path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.putheader("User-Agent", self.user_agent)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        if _over_limit(response.getheader("Content-Length")):
            raise _Sent(
                KMSInternalException(
                    f"the key service at '{endpoint}' announced an answer over the limit"
                    f" of {MAX_ANSWER} bytes"
                )
            )
        answer = response.read(MAX_ANSWER + 1)
        if len(answer) > MAX_ANSWER:
            raise _Sent(
                KMSInternalException(
                    f"the key service at '{endpoint}' answered over {MAX_ANSWER} bytes"
                )
            )
        return response.status, answer

    def _error(self, status: int, answer: bytes) -> KMSError:
        try:
            doc = json.loads(answer)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            name = _error_name(doc.get("__type"))
            message = doc.get("message", doc.get("Message"))
            if name is not None:
                text = message if isinstance(message, str) else f"(HTTP {status}, no message)"
                return error_from_answer(name, _printable(text[:2000]))
        return KMSInternalException(
            f"the key service at '{self.endpoint}' answered HTTP {status} without an AWS"
            " error (is the URL a key service's endpoint?)"
        )


class _Deadline:
    """A bound on the whole of an answer: when ``seconds`` have passed, ``sock`` is shut
    down, which ends any wait on it at once. A socket's own timeout bounds each wait only,
    so a server that sends a byte now and then would hold the client for ever. (A TLS
    handshake needs none: the ssl module bounds it whole.) ``None``: no bound."""

    def __init__(self, seconds: float | None, sock: socket.socket | None) -> None:
        self.expired = False
        self._sock = sock
        self._lock = threading.Lock()
        self._timer = None if seconds is None else threading.Timer(seconds, self._expire)

    def __enter__(self) -> _Deadline:
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._sock = None  # over: a late expiry changes nothing
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            if self._sock is not None:
                self.expired = True
                _shut(self._sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS socket: ssl.SSLSocket's own drops its TLS
    # state under the reading thread's feet.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _printable(text: str) -> str:
    """The server's ``text`` as a terminal may show it: control characters (an escape
    sequence would retitle, recolour or rewrite the user's terminal) and format characters
    (a right-to-left override reorders what is read) written as ``\\uXXXX``."""
    return "".join(
        f"\\u{ord(char):04x}" if unicodedata.category(char) in ("Cc", "Cf") else char
        for char in text
    )


def _over_limit(length: str | None) -> bool:
    """Whether a ``Content-Length`` announces more than :data:`MAX_ANSWER` bytes. Only ASCII
    digits count (``str.isdigit`` takes ``²``, which ``int`` refuses), and a number is not
    parsed past the limit's length (``int`` refuses over 4300 digits)."""
    digits = (length or "").strip().lstrip("0")
    if not (digits.isascii() and digits.isdigit()):
        return False  # none, or not a number: http.client reads until the connection ends
    return len(digits) > len(str(MAX_ANSWER)) or int(digits) > MAX_ANSWER


def _within(timeout: float | None) -> str:
    """How long was waited: the bound, or, without one (0 given), the system's own
    (``ETIMEDOUT``, a ``TimeoutError`` too)."""
    if timeout is None:
        return "before the system's TCP timeout"
    return f"within {timeout:g} seconds"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):  # an OSError whose strerror is OpenSSL's whole line
        return str(exc.reason or "TLS error").lower().replace("_", " ")
    if isinstance(exc, socket.gaierror):
        return f"no such host ({exc.strerror})" if exc.strerror else "no such host"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    return str(exc) or type(exc).__name__
