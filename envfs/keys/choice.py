"""Which key service a command talks to, chosen once, at the top.

A volume names its key service as ``embedded`` (the region's store, opened in this process)
or ``unix:/PATH`` (an envfs key-service daemon's socket): ``envfs mount --kms``, ``envfs
init --kms``, ``service =`` in a volume configuration file. ``envfs kms <verb>`` chooses for
itself: the daemon if its socket exists, else the store. :func:`connect` opens the chosen
one as a :class:`KeyServiceConnection`: a key provider for the file side, and calls as the
current user for the command line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envfs.keys.provider import KeyProvider

if TYPE_CHECKING:
    from envfs.kms.client import KMSClient
    from envfs.kms.service import KeyService
    from envfs.kms.store import KeyStore

EMBEDDED = "embedded"
UNIX_PREFIX = "unix:"


@dataclass(frozen=True)
class KeyServiceChoice:
    """``embedded`` (``socket`` None) or a daemon's Unix socket."""

    socket: Path | None = None

    @classmethod
    def parse(cls, text: str) -> KeyServiceChoice:
        """Read ``embedded`` or ``unix:/ABSOLUTE/PATH``.

        Raises:
            ValueError: anything else (the caller says where it was written).
        """
        if text == EMBEDDED:
            return cls()
        path = text[len(UNIX_PREFIX) :] if text.startswith(UNIX_PREFIX) else ""
        if not os.path.isabs(path) or path == "/":
            raise ValueError(f"{text!r} is neither 'embedded' nor 'unix:/PATH/TO/SOCKET'")
        return cls(Path(path))

    @property
    def daemon(self) -> bool:
        return self.socket is not None

    def __str__(self) -> str:
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
) -> KeyServiceConnection:
    """Open the chosen key service of ``region``.

    Embedded: ``open_store()`` (which may ask for a passphrase) gives the store, in a
    service that batches its audit records if ``batch_audit`` (the mount) and carries out
    due rotations and deletions first if ``due_tasks``. A daemon: a client whose calls may
    take ``timeout`` seconds (None: the client's default); nothing is sent until the first
    call.
    """
    if choice.socket is not None:
        return _daemon(choice.socket, region, timeout)
    return _embedded(open_store(), batch_audit=batch_audit, due_tasks=due_tasks)


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
