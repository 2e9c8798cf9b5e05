"""The daemon side of systemd's protocols: readiness notification and socket activation.

Readiness (sd_notify(3)): a service of ``Type=notify`` is given ``$NOTIFY_SOCKET``, a Unix
datagram socket (a path, or a name in the abstract namespace when it starts with ``@``),
and sends it newline-separated ``KEY=VALUE`` lines: ``READY=1`` once it serves,
``STOPPING=1`` when it begins to shut down, ``STATUS=...`` for ``systemctl status``.
Without ``$NOTIFY_SOCKET`` every call does nothing, so daemons call these unconditionally.

Socket activation (sd_listen_fds(3)): systemd passes listening sockets as descriptors 3,
4, ... and says how many in ``$LISTEN_FDS``, for the process named by ``$LISTEN_PID``.

Only the standard library: no dependency on libsystemd or its Python bindings.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(*lines: str) -> bool:
    """Send ``lines`` (``KEY=VALUE`` each) as one datagram to ``$NOTIFY_SOCKET``.

    Returns:
        True if the message was sent; False if ``$NOTIFY_SOCKET`` is unset or empty (not
        run by systemd), or names an address this module cannot use, or the send failed
        (logged as a warning: a lost notification must not stop the daemon).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    elif not address.startswith("/"):
        log.warning("cannot notify systemd: unsupported NOTIFY_SOCKET %r", address)
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError as exc:
        log.warning("cannot notify systemd through %r: %s", address, exc.strerror or exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Tell systemd the service is ready (``READY=1``), with an optional status line."""
    return notify("READY=1", *_status_lines(status))


def stopping(status: str | None = None) -> bool:
    """Tell systemd the service is shutting down (``STOPPING=1``)."""
    return notify("STOPPING=1", *_status_lines(status))


def status(text: str) -> bool:
    """Set the free-form status ``systemctl status`` shows (``STATUS=...``)."""
    return notify(*_status_lines(text))


def _status_lines(text: str | None) -> list[str]:
    # One datagram is one message of lines: a newline would start a new assignment.
    return [] if text is None else ["STATUS=" + " ".join(text.splitlines())]


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed by socket activation, in order; empty when none.

    The ``LISTEN_*`` variables are removed from the environment in every case, so child
    processes do not take the sockets for theirs. The sockets are made close-on-exec.
    Nothing is returned when ``$LISTEN_PID`` names another process (the variables were
    inherited, not meant for us).

    Raises:
        ValueError: ``$LISTEN_FDS`` or ``$LISTEN_PID`` is not a number, or a passed
            descriptor is not an open socket.
    """
    values = {name: os.environ.pop(name, None) for name in _LISTEN_VARIABLES}
    pid_text, count_text = values["LISTEN_PID"], values["LISTEN_FDS"]
    if pid_text is None or count_text is None:
        return []
    if not pid_text.isdigit() or not count_text.isdigit():
        raise ValueError(f"LISTEN_PID={pid_text!r} and LISTEN_FDS={count_text!r} must be numbers")
    if int(pid_text) != os.getpid():
        return []
    sockets: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count_text)):
        try:
            os.set_inheritable(fd, False)
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            raise ValueError(
                f"descriptor {fd} passed by LISTEN_FDS is not an open socket: {exc.strerror or exc}"
            ) from None
    return sockets
