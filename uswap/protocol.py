"""The client ↔ daemon protocol (version 1), shared with csrc/client/uswap_client.c.

Transport: a Unix SOCK_SEQPACKET socket, so every message is one packet and
file descriptors travel with it (SCM_RIGHTS).  One connection is one region:
the region lives exactly as long as the connection, so a client that dies,
however it dies, frees its region when the kernel closes its socket.

Request (32 bytes, little-endian):  magic "USWP", u16 version, u16 op,
                                   u64 a, u64 b, u64 c
    MAP     a = address, b = length, c = flags (0); SCM_RIGHTS [uffd, memfd]
    UNMAP   (no arguments): the region of this connection
    STATUS  (no arguments): reply text is JSON (see docs/DESIGN.md)
    DETACH  sent by the daemon, unasked, when it stops: every page of the
            region is back in the memfd; unregister the userfaultfd range
Reply (24 bytes + text):           magic "USWP", u16 version, u16 op,
                                   i32 status (0 or an errno), u32 0, u64 value
    followed by UTF-8 text: an error message, or the STATUS JSON.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

MAGIC = b"USWP"
VERSION = 1

OP_MAP = 1
OP_UNMAP = 2
OP_STATUS = 3
OP_DETACH = 4
OPS = {OP_MAP: "MAP", OP_UNMAP: "UNMAP", OP_STATUS: "STATUS", OP_DETACH: "DETACH"}

# File descriptors each request carries (SCM_RIGHTS); a packet with more is refused.
OP_FDS = {OP_MAP: 2}
MAX_REQUEST_FDS = max(OP_FDS.values())

REQUEST = struct.Struct("<4sHHQQQ")
REPLY = struct.Struct("<4sHHiIQ")
MAX_PACKET = 1 << 20  # STATUS replies can be long


class ProtocolError(Exception):
    """A packet that is not a valid request; the text goes back to the peer."""

    def __init__(self, text: str, err: int = errno.EPROTO):
        super().__init__(text)
        self.errno = err


@dataclass(frozen=True)
class Request:
    op: int
    a: int = 0
    b: int = 0
    c: int = 0

    def pack(self) -> bytes:
        return REQUEST.pack(MAGIC, VERSION, self.op, self.a, self.b, self.c)

    @classmethod
    def unpack(cls, packet: bytes) -> "Request":
        if len(packet) != REQUEST.size:
            raise ProtocolError(f"request of {len(packet)} bytes, expected {REQUEST.size}")
        magic, version, op, a, b, c = REQUEST.unpack(packet)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r}")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version} not supported (daemon speaks {VERSION})",
                                errno.EPROTONOSUPPORT)
        if op not in OPS:
            raise ProtocolError(f"unknown operation {op}", errno.EOPNOTSUPP)
        return cls(op, a, b, c)


@dataclass(frozen=True)
class Reply:
    op: int
    status: int = 0
    value: int = 0
    text: str = ""

    def pack(self) -> bytes:
        return REPLY.pack(MAGIC, VERSION, self.op, self.status, 0, self.value) + self.text.encode()

    @classmethod
    def unpack(cls, packet: bytes) -> "Reply":
        if len(packet) < REPLY.size:
            raise ProtocolError(f"reply of {len(packet)} bytes, shorter than {REPLY.size}")
        magic, version, op, status, _, value = REPLY.unpack_from(packet)
        if magic != MAGIC or version != VERSION:
            raise ProtocolError(f"bad reply header {magic!r} v{version}")
        return cls(op, status, value, packet[REPLY.size:].decode(errors="replace"))


def default_socket_path() -> str:
    """Where clients find the daemon: the C client's one rule (uswap_default_socket in
    csrc/client/uswap_client.c; never /tmp)."""
    from uswap._core import ffi, lib
    buf = ffi.new("char[]", 108)  # sizeof(sockaddr_un.sun_path)
    if lib.uswap_default_socket(buf, len(buf)) < 0:
        raise OSError(errno.ENAMETOOLONG, "the socket path from USWAP_SOCKET or XDG_RUNTIME_DIR is too long")
    return os.fsdecode(ffi.string(buf))


def daemon_socket_path() -> str:
    """Where `uswap daemon` listens without --socket: the system socket
    (/run/uswap/uswap.sock) for root, $XDG_RUNTIME_DIR/uswap.sock for others (a directory
    only they can write); never /tmp."""
    from uswap._core import ffi, lib
    if os.geteuid() == 0:
        return os.fsdecode(ffi.string(lib.USWAP_SYSTEM_SOCKET))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        raise OSError(errno.ENOENT, "XDG_RUNTIME_DIR is not set, so there is no directory of yours for the "
                                    "socket: say --socket PATH (in a directory only you can write)")
    return os.path.join(runtime, "uswap.sock")
