"""Which key service a command talks to, chosen once, at the top.

A volume names its key service as ``embedded`` (the region's store, opened in this process),
``unix:/PATH`` (an envfs key-service daemon's socket), ``aws`` (AWS KMS at the region's own
endpoint) or ``https://HOST[:PORT]`` (an endpoint speaking AWS KMS's API: another machine's
envfs key service; ``http://`` only on loopback, since answers carry plaintext data keys):
``envfs mount --kms``, ``envfs init --kms``, ``service =`` in a volume configuration file.
The last two call with each user's mapped AWS identity (:mod:`envfs.keys.awscreds`).
``envfs kms <verb>`` chooses for itself: the daemon if its socket exists, else the store.
:func:`connect` opens the chosen one as a :class:`KeyServiceConnection`: a key provider for
the file side, and calls as the current user for the command line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envfs.errors import UsageError
from envfs.keys.awscreds import endpoint_url
from envfs.keys.provider import KeyProvider

if TYPE_CHECKING:
    from envfs.kms.client import KMSClient
    from envfs.kms.service import KeyService
    from envfs.kms.store import KeyStore

EMBEDDED = "embedded"
UNIX_PREFIX = "unix:"
AWS = "aws"


@dataclass(frozen=True)
class KeyServiceChoice:
    """``embedded`` (nothing set), a daemon's Unix ``socket``, or an AWS KMS API (``aws``
    true), at AWS's endpoint (``endpoint`` None) or at ``endpoint``."""

    socket: Path | None = None
    aws: bool = False
    endpoint: str | None = None

    @classmethod
    def parse(cls, text: str) -> KeyServiceChoice:
        """Read ``embedded``, ``unix:/ABSOLUTE/PATH``, ``aws``, ``https://HOST[:PORT]`` or
        ``http://LOOPBACK:PORT``.

        Raises:
            ValueError: anything else (the caller says where it was written).
        """
        if text == EMBEDDED:
            return cls()
        if text == AWS:
            return cls(aws=True)
        if text.startswith(("https://", "http://")):
            return cls(aws=True, endpoint=endpoint_url(text))
        path = text[len(UNIX_PREFIX) :] if text.startswith(UNIX_PREFIX) else ""
        if not os.path.isabs(path) or path == "/":
            raise ValueError(
                f"{text!r} is none of 'embedded', 'unix:/PATH/TO/SOCKET', 'aws' or"
                " 'https://HOST[:PORT]'"
            )
        return cls(Path(path))

    @property
    def daemon(self) -> bool:
        return self.socket is not None

    @property
    def remote(self) -> bool:
        """Every call is a round trip (a daemon or an AWS KMS API): worth caching."""
        return self.socket is not None or self.aws

    def __str__(self) -> str:
        if self.aws:
            return self.endpoint or AWS
        return EMBEDDED if self.socket is None else f"{UNIX_PREFIX}{self.socket}"


class KeyServiceConnection:
    """An open key service: :attr:`provider` for the file side, :meth:`call` for the command
    line (as the current user). Close it (or use it in a ``with``)."""

    def __init__(
        self,
        provider: KeyProvider,
        call: Callable[[str, Mapping[str, Any]], dict[str, Any]],
        close: Callable[[], None],
    ) -> None:
        self.provider = provider
        self.call = call
        self._close = close

    def close(self) -> None:
        self._close()

    def __enter__(self) -> KeyServiceConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    choice: KeyServiceChoice,
    region: str,
    *,
    open_store: Callable[[], KeyStore],
    timeout: float | None = None,
    batch_audit: bool = False,
    due_tasks: bool = True,
    credentials: Path | None = None,
    ca_bundle: Path | None = None,
    envfs_blobs: bool = False,
    backing: Path | None = None,
    mountpoint: Path | None = None,
) -> KeyServiceConnection:
    """Open the chosen key service of ``region``.

    Embedded: ``open_store()`` (which may ask for a passphrase) gives the store, in a
    service that batches its audit records if ``batch_audit`` (the mount) and carries out
    due rotations and deletions first if ``due_tasks``. A daemon: a client whose calls may
    take ``timeout`` seconds (None: the client's default); nothing is sent until the first
    call. An AWS KMS API: ``credentials`` (required) maps users to AWS identities,
    ``ca_bundle`` the CA certificates to trust (read once, trusted as the mapping is),
    ``envfs_blobs`` says the endpoint is an envfs key service (its blobs are readable), and
    neither the mapping's files nor the CA bundle may be in ``backing`` (the volume's
    backing folder) or under ``mountpoint`` (a mount's); nothing is sent until the first
    call.

    Raises:
        UsageError: an AWS KMS API without a credential mapping.
        ConfigError: the credential mapping or the CA bundle is not usable.
    """
    if choice.aws:
        away = {"backing": backing, "mountpoint": mountpoint}
        return _aws(choice, region, credentials, ca_bundle, timeout, envfs_blobs, away)
    if choice.socket is not None:
        return _daemon(choice.socket, region, timeout)
    return _embedded(open_store(), batch_audit=batch_audit, due_tasks=due_tasks)


def _aws(
    choice: KeyServiceChoice,
    region: str,
    credentials: Path | None,
    ca_bundle: Path | None,
    timeout: float | None,
    envfs_blobs: bool,
    away: dict[str, Path | None],
) -> KeyServiceConnection:
    from envfs.identity import Caller
    from envfs.keys.awscreds import load_mapping, read_ca_bundle
    from envfs.keys.awskms import AwsKmsProvider

    if credentials is None:
        raise UsageError(
            f"key service {str(choice)!r} needs a credential mapping: --kms-credentials FILE,"
            " or credentials = in the volume configuration's [kms] table"
        )
    mapping = load_mapping(credentials, **away)
    provider = AwsKmsProvider(
        region,
        mapping,
        endpoint_url=choice.endpoint,
        ca_bundle=None if ca_bundle is None else read_ca_bundle(ca_bundle, **away),
        timeout=10.0 if timeout is None else timeout,
        envfs_blobs=envfs_blobs,
    )
    caller = Caller.current()

    def call(operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return provider.call_as(caller, operation, params)

    return KeyServiceConnection(provider, call, provider.close)


def _daemon(socket: Path, region: str, timeout: float | None) -> KeyServiceConnection:
    from envfs.keys.daemon import DaemonKeyProvider
    from envfs.kms.client import KMSClient

    client: KMSClient = KMSClient(socket) if timeout is None else KMSClient(socket, timeout=timeout)
    return KeyServiceConnection(DaemonKeyProvider(client, region), client.call, client.close)


def _embedded(store: KeyStore, *, batch_audit: bool, due_tasks: bool) -> KeyServiceConnection:
    from envfs.identity import Caller
    from envfs.keys.embedded import EmbeddedKeyProvider
    from envfs.kms.service import KeyService

    try:
        service: KeyService = KeyService(store, batch_audit=batch_audit)
        caller = Caller.current()
        if due_tasks:
            service.run_due_tasks()
    except BaseException:
        store.close()
        raise

    def call(operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return service.handle(caller, operation, params)

    return KeyServiceConnection(EmbeddedKeyProvider(service), call, service.close)
