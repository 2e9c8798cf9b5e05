"""Who is at the other end of a plain connection within this machine.

Plain HTTP (no TLS) to a key service is allowed only to a loopback address; and since any
local user may listen on a free loopback port (the service stopped, say), the listener
must also run as a trusted uid before a byte is sent: root, ours, or one named in
``$ENVFS_KMS_SERVER_UID`` (comma-separated). The Unix-socket client trusts a daemon's
peer credentials by the same rule. Shared by the key service's clients
(:mod:`envfs.kms.client`, :mod:`envfs.kms.httpclient`) and the AWS KMS key provider.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any


def trusted_uids() -> frozenset[int]:
    """The uids a key service may run as: root, ours, and ``$ENVFS_KMS_SERVER_UID``'s."""
    return frozenset({0, os.geteuid(), *env_server_uids()})


def env_server_uids() -> list[int]:
    """Extra daemon uids to trust: ``$ENVFS_KMS_SERVER_UID`` (comma-separated)."""
    text = os.environ.get("ENVFS_KMS_SERVER_UID", "")
    return [int(part) for part in text.split(",") if part.strip().isdigit()]


def is_loopback_host(host: str) -> bool:
    """``localhost`` (and names under it), or an address of the loopback networks."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def loopback_server_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of ``sock``, a TCP connection within this machine: the
    row of ``/proc/net/tcp`` (``tcp6``) whose local address is our peer's and remote address
    ours (the kernel gives an accepted socket its listener's uid). None if not found."""
    family = sock.family
    mine, theirs = sock.getsockname(), sock.getpeername()
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    wanted = (_proc_address(family, theirs), _proc_address(family, mine))
    try:
        with open(table, encoding="ascii") as rows:
            next(rows, None)  # the header
            for row in rows:
                fields = row.split()
                if len(fields) > 7 and (fields[1], fields[2]) == wanted:
                    return int(fields[7])
    except (OSError, ValueError):
        pass
    return None


def _proc_address(family: int, address: tuple[Any, ...]) -> str:
    """``(host, port)`` as ``/proc/net/tcp*`` writes it: the address's 32-bit words each in
    the host's byte order, in hex, then the port."""
    packed = socket.inet_pton(family, str(address[0]).split("%", 1)[0])
    words = "".join(
        f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4)
    )
    return f"{words}:{int(address[1]):04X}"
