"""``AwsKmsProvider``: master keys in AWS KMS, or behind any endpoint that speaks its API
(AWS's JSON 1.1 protocol signed with SigV4), such as another machine's envfs key service.

Each call is made *with the AWS identity of the calling Unix user*, as the credential
mapping (:mod:`.awscreds`) says; AWS (or the remote service) decides it with its own
policies and records it in its own audit trail. A user without a mapping gets
AccessDeniedException without any call. One botocore client per mapping entry, made at the
entry's first use and kept (so at most as many as the mapping has entries); clients are
thread-safe, so the key pool's worker threads share them.

Bounded in time: each attempt has a connect and a read timeout, botocore retries transient
failures (throttling, 5xx, lost connections) with exponential backoff and jitter up to a
fixed number of attempts; after the endpoint could not be reached the provider fails fast
(KMSUnavailableException) for a while, 0.1 s doubling up to ``max_backoff``, as
:class:`~envfs.keys.daemon.DaemonKeyProvider` does. AWS's error codes become envfs's
:class:`~envfs.errors.KMSError` of the same name.

Plain ``http://`` (on loopback only: moto in the tests, a key service on this machine) is
sent by the provider itself (:class:`_LoopbackSender`, in botocore's ``before-send`` hook):
any local user may listen on the port while the service is down, and would then read the
signed requests (and replay them to the service), and choose every new file's data key in
its answers. So each request gets its own connection, and nothing is sent on it unless its
other end is a loopback address whose listener runs as a trusted uid (root, the mount's
own, ``$ENVFS_KMS_SERVER_UID``), as envfs's own clients require
(:mod:`envfs.kms.loopback`); another listener is an outage. ``https://`` endpoints are
botocore's own business (the certificate tells the service).

Never logged: credentials, plaintext data keys, response bodies. botocore logs request and
response bodies at DEBUG, so its loggers are held at WARNING whatever the daemon's level.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import botocore
import botocore.awsrequest
import botocore.config
import botocore.configprovider
import botocore.credentials
import botocore.exceptions
import botocore.session

from envfs.arn import parse_arn
from envfs.errors import (
    AccessDeniedException,
    ConfigError,
    DependencyTimeoutException,
    IncorrectKeyException,
    KMSError,
    KMSInternalException,
    KMSUnavailableException,
    UnsupportedOperationException,
)
from envfs.identity import Caller
from envfs.keys import envfskms
from envfs.keys.awscreds import CredentialMapping, CredentialSource
from envfs.keys.failfast import FailFast
from envfs.keys.provider import DataKey, EncryptionContext, WrappedKey
from envfs.kms.loopback import loopback_server_uid, trusted_uids

log = logging.getLogger(__name__)

# Codes that mean "these credentials are not accepted": for the caller, a refusal (so is
# any other answer with HTTP status 401 or 403).
_REFUSED = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)
# Loggers that would show request or response bodies (plaintext keys) at DEBUG.
_QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")
# botocore logs a failed refresh of a role's credentials (STS unreachable, or its port
# held by an untrusted listener) as a WARNING with a traceback; the call that needed them
# fails, and the provider logs that itself, without one.
_CREDENTIALS_LOGGER = "botocore.credentials"
# envfs-only parameters the key service's own protocol has and AWS's has not.
_ENVFS_ONLY_PARAMS = ("AuditNote",)


class _Given(botocore.credentials.CredentialProvider):  # type: ignore[misc]
    """Exactly these credentials: no environment, no files, no instance metadata."""

    METHOD = "envfs-mapping"
    CANONICAL_NAME = "customEnvfsMapping"

    def __init__(self, credentials: botocore.credentials.Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> botocore.credentials.Credentials:
        return self._credentials


class AwsKmsProvider:
    """A :class:`~envfs.keys.provider.KeyProvider` over the AWS KMS API, calling with each
    user's mapped AWS identity.

    Args:
        region: the region of the volume's key (the SigV4 region).
        mapping: who acts as which AWS identity.
        endpoint_url: None for AWS's own endpoint of the region; else an endpoint speaking
            the same API (another envfs key service over HTTPS; moto in the tests).
        ca_bundle: the CA certificates (PEM) to trust for the endpoint (default: the
            system's, as OpenSSL finds them), as read once
            (:func:`~envfs.keys.awscreds.read_ca_bundle`): botocore reads a CA file at
            each new connection, so it is given a private copy that no one can replace.
            Also for the mapping's ``sts_endpoint_url`` if that is on the endpoint's host;
            any other STS (AWS's by default) is verified with the system's CAs.
        timeout: seconds an attempt may wait for an answer (connecting: at most 3 s).
        max_attempts: attempts per call, the first included (botocore's standard retries).
        envfs_blobs: the endpoint is an envfs key service, whose ciphertext blobs are
            documented (``docs/kms.md``) and so readable by :meth:`read_wrapped`; AWS's
            are not, and are never parsed.
        max_backoff: the longest fail-fast period after the endpoint could not be reached.
    """

    def __init__(
        self,
        region: str,
        mapping: CredentialMapping,
        *,
        endpoint_url: str | None = None,
        ca_bundle: bytes | None = None,
        timeout: float = 10.0,
        max_attempts: int = 3,
        envfs_blobs: bool = False,
        max_backoff: float = 5.0,
    ) -> None:
        for name in _QUIET_LOGGERS:
            # Its own level, not the effective one: the root's may be lowered afterwards
            # (logging configured after the provider is made).
            if logging.getLogger(name).level < logging.WARNING:
                logging.getLogger(name).setLevel(logging.WARNING)
        if logging.getLogger(_CREDENTIALS_LOGGER).level < logging.ERROR:
            logging.getLogger(_CREDENTIALS_LOGGER).setLevel(logging.ERROR)
        self._region = region
        self.mapping = mapping
        self.endpoint_url = endpoint_url
        self._ca_fd: int | None = None
        self._closed = False
        self._verify: str | bool = _system_cas()
        # STS (a role's credentials) is AWS's unless the mapping names another: the
        # endpoint's CA bundle is for the endpoint's host, and would not verify AWS's STS.
        self._sts_verify = self._verify
        if ca_bundle is not None:
            self._ca_fd = os.memfd_create("envfs-ca-bundle")
            written = 0
            while written < len(ca_bundle):
                written += os.write(self._ca_fd, ca_bundle[written:])
            self._verify = f"/proc/self/fd/{self._ca_fd}"
            if _same_host(mapping.sts_endpoint_url, endpoint_url):
                self._sts_verify = self._verify
        self._config = botocore.config.Config(
            connect_timeout=min(3.0, timeout),
            read_timeout=timeout,
            retries={"mode": "standard", "total_max_attempts": max(1, max_attempts)},
            user_agent_extra="envfs",
            # Not None: botocore would take HTTP(S)_PROXY from the daemon's environment and
            # send the signed requests (and, to an http:// endpoint on loopback, the answers'
            # plaintext data keys) through whatever proxy that names.
            proxies={},
        )
        self._plain_sender = _LoopbackSender(
            connect_timeout=min(3.0, timeout), read_timeout=timeout, trusted=trusted_uids()
        )
        self._envfs_blobs = envfs_blobs
        self._clients: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._fail_fast = FailFast(self.where(), max_backoff=max_backoff)

    # --- KeyProvider ----------------------------------------------------------------------

    @property
    def region(self) -> str:
        return self._region

    @property
    def batches_audit(self) -> bool:
        return False  # AWS (or the remote service) keeps its own audit trail

    @property
    def reads_wrapped(self) -> bool:
        return self._envfs_blobs

    def flush_audit(self) -> None:
        pass

    def read_wrapped(self, wrapped: bytes) -> WrappedKey | None:
        """An envfs key service's blob, read as such; None for AWS's, whose format is not
        documented (Decrypt requiring the named key is then the only check)."""
        return envfskms.read_wrapped(wrapped) if self._envfs_blobs else None

    def generate_data_key(
        self, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> DataKey:
        out = self._call(
            "GenerateDataKey",
            {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context},
            caller,
        )
        plaintext, wrapped, arn = out.get("Plaintext"), out.get("CiphertextBlob"), out.get("KeyId")
        if not (isinstance(plaintext, bytes) and len(plaintext) == 32):
            raise KMSInternalException(
                "the key service answered GenerateDataKey without a 256-bit key"
            )
        if not (isinstance(wrapped, bytes) and wrapped and isinstance(arn, str) and arn):
            raise KMSInternalException(
                "the key service answered GenerateDataKey without a blob or key ARN"
            )
        if _is_key_arn(key_id) and arn != key_id:
            # The new file's header would name that key, which the volume does not accept:
            # data written to it could never be read back.
            raise IncorrectKeyException(
                f"the key service generated the data key under {_one_line(arn)!r}, not {key_id!r}"
            )
        return DataKey(plaintext, wrapped, arn)

    def decrypt(
        self, wrapped: bytes, key_id: str, context: EncryptionContext, caller: Caller, note: str
    ) -> bytes:
        out = self._call(
            "Decrypt",
            {"CiphertextBlob": wrapped, "KeyId": key_id, "EncryptionContext": context},
            caller,
        )
        plaintext = out.get("Plaintext")
        if not (isinstance(plaintext, bytes) and len(plaintext) == 32):
            # Every blob this provider unwraps holds a 256-bit data key; anything else would
            # be used as one (an empty key derives file keys anyone can compute).
            raise KMSInternalException("the key service answered Decrypt without a 256-bit key")
        if key_id.startswith("arn:") and out.get("KeyId") != key_id:
            # AWS refuses this itself (KeyId is required to match); an endpoint that does
            # not is not trusted with it.
            raise IncorrectKeyException(
                f"the key service decrypted under {_one_line(str(out.get('KeyId')), 300)!r},"
                f" not {key_id!r}"
            )
        return plaintext

    def describe_key(self, key_id: str, caller: Caller) -> str:
        out = self._call("DescribeKey", {"KeyId": key_id}, caller)
        arn = out.get("KeyMetadata", {}).get("Arn")
        if not isinstance(arn, str):
            raise KMSInternalException("the key service answered DescribeKey without an ARN")
        return arn

    # --- calls ----------------------------------------------------------------------------

    def call_as(self, caller: Caller, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Any KMS operation for ``caller`` (the command line's calls); envfs-only
        parameters are left out."""
        return self._call(
            operation, {k: v for k, v in params.items() if k not in _ENVFS_ONLY_PARAMS}, caller
        )

    def where(self) -> str:
        return self.endpoint_url or f"AWS KMS in {self._region}"

    def _call(self, operation: str, params: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        entry = self.mapping.source_for(caller)
        if entry is None:
            raise AccessDeniedException(
                f"{caller.describe()} has no AWS identity in {str(self.mapping.source)!r}:"
                " not allowed to use the key service"
            )
        self._fail_fast.check()
        client = self._client(entry)
        # Only the API's operations: the client has other methods (close, get_paginator...)
        # that a name could otherwise reach.
        if operation not in client.meta.service_model.operation_names:
            raise UnsupportedOperationException(f"operation {operation!r} is not in AWS KMS's API")
        method = getattr(client, botocore.xform_name(operation))
        try:
            out: dict[str, Any] = method(**params)
        except botocore.exceptions.ClientError as exc:
            error = _from_client_error(exc, operation, entry)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int) and status >= 500:
                # Still failing after botocore's retries: the service is down for now, as
                # when it cannot be reached. Say so, and fail fast for a while rather than
                # make every open wait out the retries again.
                if not isinstance(error, DependencyTimeoutException):
                    error = KMSUnavailableException(
                        f"the key service at {self.where()!r} is failing (HTTP {status}):"
                        f" {error.message}"
                    )
                raise self._fail_fast.failed(error) from None
            raise error from None
        except _UntrustedListener as exc:  # the key service's or STS's port
            raise self._fail_fast.failed(
                KMSUnavailableException(
                    f"the key service at {self.where()!r} cannot be used: {exc}"
                )
            ) from None
        except (
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectTimeoutError,
        ) as exc:
            raise self._fail_fast.failed(
                DependencyTimeoutException(
                    f"the key service at {self.where()!r} did not answer in time: {_short(exc)}"
                )
            ) from None
        except (
            botocore.exceptions.ConnectionError,
            botocore.exceptions.HTTPClientError,
        ) as exc:
            raise self._fail_fast.failed(
                KMSUnavailableException(
                    f"the key service at {self.where()!r} cannot be reached: {_short(exc)}"
                )
            ) from None
        except (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.CredentialRetrievalError,
        ):
            raise AccessDeniedException(
                f"{entry.describe()} has no usable AWS credentials"
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise KMSInternalException(f"{operation} failed: {_short(exc)}") from None
        self._fail_fast.succeeded()
        return out

    def _client(self, entry: CredentialSource) -> Any:
        with self._lock:
            client = self._clients.get(entry.index)
            if client is None:
                if self._closed:  # the CA copy's descriptor number may be another file's now
                    raise KMSUnavailableException(f"the connection to {self.where()} is closed")
                try:
                    credentials = self._credentials(entry)
                except ConfigError as exc:  # the files changed since the mount started
                    log.error("%s", exc.message)
                    raise AccessDeniedException(
                        f"{entry.describe()} has no usable AWS credentials: {exc.message}"
                    ) from None
                client = self._new_client("kms", credentials, self.endpoint_url)
                self._clients[entry.index] = client
                log.info("AWS KMS client made for %s", entry.describe())
            return client

    def _credentials(self, entry: CredentialSource) -> botocore.credentials.Credentials:
        keys = self.mapping.static_keys(entry)
        base = botocore.credentials.Credentials(keys.access_key, keys.secret_key, keys.token)
        if entry.role_arn is None:
            return base

        def sts_client(service: str, **kwargs: Any) -> Any:
            # botocore's fetcher passes the source credentials as keyword arguments.
            session = _clean_session()
            client = session.create_client(
                service,
                region_name=self._region,
                endpoint_url=self.mapping.sts_endpoint_url,
                verify=self._sts_verify,
                config=self._config,
                **kwargs,
            )
            return self._guarded(client, self.mapping.sts_endpoint_url)

        fetcher = botocore.credentials.AssumeRoleCredentialFetcher(
            sts_client,
            base,
            entry.role_arn,
            extra_args={"RoleSessionName": entry.role_session_name},
        )
        return botocore.credentials.DeferredRefreshableCredentials(
            refresh_using=fetcher.fetch_credentials, method="assume-role"
        )

    def _new_client(
        self, service: str, credentials: botocore.credentials.Credentials, endpoint_url: str | None
    ) -> Any:
        session = _clean_session()
        session.register_component(
            "credential_provider", botocore.credentials.CredentialResolver([_Given(credentials)])
        )
        client = session.create_client(
            service,
            region_name=self._region,
            endpoint_url=endpoint_url,
            verify=self._verify,
            config=self._config,
        )
        return self._guarded(client, endpoint_url)

    def _guarded(self, client: Any, endpoint_url: str | None) -> Any:
        """``client``, sending to a plain-http ``endpoint_url`` through the provider's own
        checked connections (the event covers every operation of the client's service)."""
        if endpoint_url is not None and urllib.parse.urlsplit(endpoint_url).scheme == "http":
            client.meta.events.register("before-send", self._plain_sender)
        return client

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for client in self._clients.values():
                client.close()
            self._clients.clear()
            if self._ca_fd is not None:
                os.close(self._ca_fd)
                self._ca_fd = None


class _UntrustedListener(Exception):
    """A plain-http endpoint's connection led elsewhere than to a trusted listener on this
    machine; nothing was sent. Not one of botocore's errors, so not retried."""


class _LoopbackSender:
    """Sends a botocore request to a plain-http endpoint on loopback (a ``before-send``
    handler: what it returns is botocore's answer), on a connection of its own, checked
    after connecting and before the first byte is sent: its other end must be a loopback
    address whose listener runs as one of ``trusted`` (checked once made, not before: a
    port may change hands between a check and a connect, never within a connection).

    Failures are botocore's own errors, so its retries and the provider's outage handling
    apply as to its own transport: EndpointConnectionError (no connection),
    ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError (lost after sending).
    """

    # Times to look for the listener's row again: the kernel may add the accepted
    # connection's row a moment after connect() returned.
    _LOOKUPS = 5

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, trusted: frozenset[int]
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._trusted = trusted

    def __call__(self, request: Any, **kwargs: Any) -> botocore.awsrequest.AWSResponse | None:
        url = urllib.parse.urlsplit(request.url)
        if url.scheme != "http":
            return None  # https: botocore's own transport
        port = url.port or 80
        connection = http.client.HTTPConnection(
            url.hostname or "", port, timeout=self._connect_timeout
        )
        try:
            try:
                connection.connect()
            except TimeoutError as exc:
                raise botocore.exceptions.ConnectTimeoutError(
                    endpoint_url=request.url, error=exc
                ) from None
            except OSError as exc:
                raise botocore.exceptions.EndpointConnectionError(
                    endpoint_url=request.url, error=exc
                ) from None
            sock = connection.sock
            assert sock is not None  # connected
            self._check(sock, port)
            sock.settimeout(self._read_timeout)
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            try:
                connection.request(
                    request.method, target, body=request.body, headers=dict(request.headers)
                )
                answer = connection.getresponse()
                body = answer.read()
            except TimeoutError as exc:
                raise botocore.exceptions.ReadTimeoutError(
                    endpoint_url=request.url, error=exc
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise botocore.exceptions.ConnectionClosedError(
                    endpoint_url=request.url, error=exc, request=request
                ) from None
            return botocore.awsrequest.AWSResponse(
                request.url, answer.status, answer.getheaders(), _ReadAnswer(body)
            )
        finally:
            connection.close()

    def _check(self, sock: Any, port: int) -> None:
        peer = str(sock.getpeername()[0])
        if not ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback:
            # "localhost" is resolved by the system: never send in plain off this machine.
            raise _UntrustedListener(
                f"the connection to port {port} led to {peer}, which is not a loopback"
                " address: nothing sent over plain http"
            )
        owner = loopback_server_uid(sock)
        for _ in range(self._LOOKUPS):
            if owner is not None:
                break
            time.sleep(0.001)
            owner = loopback_server_uid(sock)
        if owner not in self._trusted:
            who = "an unknown uid" if owner is None else f"uid {owner}"
            raise _UntrustedListener(
                f"the process listening on loopback port {port} runs as {who}, which is not"
                " trusted to be the key service (root, the mount's own uid or"
                " $ENVFS_KMS_SERVER_UID): nothing sent over plain http"
            )


class _ReadAnswer:
    """An answer's body, read whole, as botocore reads a response's ``raw``."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._body


def _same_host(url: str | None, other: str | None) -> bool:
    """Whether two endpoint URLs (both given) name the same host, whatever their ports."""
    if url is None or other is None:
        return False
    host = urllib.parse.urlsplit(url).hostname
    return host is not None and host == urllib.parse.urlsplit(other).hostname


def _system_cas() -> str | bool:
    """The system's CA certificates, where OpenSSL (and so envfs's own HTTPS client) finds
    them; botocore's default is the copy of Mozilla's list that came with the ``certifi``
    package, which the system's updates (a CA distrusted, one added) never reach."""
    paths = ssl.get_default_verify_paths()
    for found in (paths.cafile, paths.capath):
        if found and os.path.exists(found):
            return found
    return True  # no system store: botocore's own


def _clean_session() -> Any:
    """A botocore session that reads nothing of the environment it runs in: no config or
    credentials file of whoever started the daemon, no endpoint override, no ``AWS_*``
    variable (``AWS_USE_FIPS_ENDPOINT`` and ``AWS_USE_DUALSTACK_ENDPOINT`` would change
    the endpoint, ``AWS_DEFAULTS_MODE=auto`` asks instance metadata, ``AWS_DATA_PATH``
    names where the API's models, endpoint rules included, are read from)."""
    session = botocore.session.Session()
    chains = botocore.configprovider.ConfigChainFactory(session=session, environ={})
    store = session.get_component("config_store")
    for name, (
        in_file,
        _variable,
        default,
        convert,
    ) in botocore.configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.items():
        store.set_config_provider(
            name,
            chains.create_config_chain(
                instance_name=name,
                config_property_names=in_file,
                default=default,
                conversion_func=convert,
            ),
        )
    session.set_config_variable("config_file", "/dev/null")
    session.set_config_variable("credentials_file", "/dev/null")
    session.set_config_variable("profile", None)  # not AWS_PROFILE's
    session.set_config_variable("ignore_configured_endpoint_urls", True)
    return session


def _from_client_error(
    exc: botocore.exceptions.ClientError, operation: str, entry: CredentialSource
) -> KMSError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", "")) or code
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if message.lstrip().startswith("<"):  # an XML error body (an IAM refusal, from moto)
        found = re.search(r"<Message>([^<]{1,500})</Message>", message)
        message = found.group(1) if found else f"HTTP status {status}"
    # The endpoint's own text, for the log: one line, bounded (no forged lines, no flood).
    message = _one_line(message)
    code = _one_line(code, 100)
    if code in _REFUSED or (code not in KMSError.registry and status in (401, 403)):
        return AccessDeniedException(f"{operation} refused for {entry.describe()}: {message}")
    kind = KMSError.registry.get(code)
    if kind is None:
        return KMSInternalException(f"{operation} failed: {code or 'unknown error'}: {message}")
    return kind(message)


def _is_key_arn(key_id: str) -> bool:
    """Whether ``key_id`` names one key by its ARN (not an alias, not a bare id)."""
    try:
        return parse_arn(key_id).resource.startswith("key/")
    except KMSError:
        return False


def _short(exc: Exception) -> str:
    return _one_line(str(exc)) if str(exc) else type(exc).__name__


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` up to its first line break (any of Unicode's), at most ``limit`` characters."""
    lines = text.splitlines()
    return lines[0][:limit] if lines else ""
