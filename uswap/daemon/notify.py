"""sd_notify(3) without libsystemd: tell whoever started us that we are ready, or stopping.

systemd (``Type=notify``) and uswap's own launchers (uswap.daemon.process)
set ``$NOTIFY_SOCKET`` to a datagram socket: a path, or ``@name`` for the
abstract namespace.  One datagram carries newline-separated ``KEY=VALUE``
fields: ``READY=1`` once the daemon's socket is bound and listening (a client
that connects then is served), ``STOPPING=1`` when a stop begins, ``STATUS=``
a line for ``systemctl status``.  No ``$NOTIFY_SOCKET``: nothing to do.

The environment variable is left in place: a daemon sends more than one
message, and it starts no children that could send in its name.
"""

from __future__ import annotations

import errno
import os
import socket

ENV = "NOTIFY_SOCKET"


def notify_address(value: str) -> str | bytes:
    """The socket address ``$NOTIFY_SOCKET`` names; OSError for kinds we do not speak (vsock:)."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    raise OSError(errno.EAFNOSUPPORT, "NOTIFY_SOCKET is neither a path nor an @abstract name", value)


def notify(*fields: str) -> bool:
    """Send ``fields`` ("READY=1", ...) as one datagram; False if no one asked
    (``$NOTIFY_SOCKET`` unset), OSError if it could not be sent."""
    value = os.environ.get(ENV)
    if not value:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), notify_address(value))
        except OSError as e:
            raise OSError(e.errno, f"sd_notify: {e.strerror}", value) from None
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def stopping(status: str) -> bool:
    return notify("STOPPING=1", f"STATUS={status}")
