"""The run protocol's messages (csrc/preload/uswap_run.h, read through the cdef): what the daemon and the preload
(libuswaprun.so) of `uswap run` send each other on a process's SOCK_SEQPACKET connection.

The handshake that uses them is uswap.daemon.runaccept; eviction's DROP and its DROPPED answer,
uswap.daemon.runreclaim.  One message type for every op (``struct uswap_run_msg``); a DROP names up to
MAX_SPANS spans of pages (address, length) for the agent to move out.
"""

from __future__ import annotations

import errno

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE
from uswap.protocol import ProtocolError

PS = PAGE_SIZE
MSG_SIZE = ffi.sizeof("struct uswap_run_msg")
MAGIC = lib.USWAP_RUN_MAGIC.to_bytes(4, "little")
MAX_SPANS = lib.USWAP_RUN_MAX_SPANS   # spans of pages one DROP names at most


def is_run_connection(head: bytes) -> bool:
    """Whether a connection's first bytes are a run's CONNECT (the preload's), not a region's request."""
    return head[:4] == MAGIC


def message(op: int, **fields) -> bytes:
    m = ffi.new("struct uswap_run_msg *")
    m.magic, m.version, m.op = lib.USWAP_RUN_MAGIC, lib.USWAP_RUN_VERSION, op
    for key, value in fields.items():
        setattr(m, key, value)
    return bytes(ffi.buffer(m))


def parse(data: bytes, op: int):
    """A received message of kind ``op``; ProtocolError otherwise."""
    if len(data) != MSG_SIZE:
        raise ProtocolError(f"run message of {len(data)} bytes, expected {MSG_SIZE}", errno.EPROTO)
    m = ffi.new("struct uswap_run_msg *")
    ffi.memmove(m, ffi.from_buffer(data), MSG_SIZE)
    if m.magic != lib.USWAP_RUN_MAGIC or m.version != lib.USWAP_RUN_VERSION or m.op != op:
        raise ProtocolError(f"run message op {m.op} version {m.version}, expected op {op} version "
                            f"{lib.USWAP_RUN_VERSION}", errno.EPROTO)
    return m


def check_dropped(reply, addrs: list[int], lens: list[int]):
    """A DROPPED that answers the DROP of ``addrs``/``lens``, or ProtocolError.

    What the agent says is trusted only within what was asked: the spans asked for, in order, no more bytes
    than asked, whole pages, an errno or 0 (0 only if the whole span moved).  Within that, a lie hurts only
    the liar's own process: a page claimed moved but still there is write-protected with its data in its
    slot, so the process reads its own page and a write lifts the protection (the slot stays counted against
    the liar's room until the page is evicted again, ``drop``, invalidated or the run ends; not freed at the WP
    fault: a write to a page moved out also raises one, on its uffd-wp marker); a page moved but claimed not is
    a missing page without a slot: zeros, in the liar's memory."""
    if reply.count != len(addrs):
        raise ProtocolError(f"DROPPED answers {reply.count} spans, {len(addrs)} were asked", errno.EPROTO)
    for k, (a, n) in enumerate(zip(addrs, lens)):
        moved, err = reply.len[k], reply.err[k]
        if reply.addr[k] != a or moved > n or moved % PS or not 0 <= err < 4096 or (err == 0 and moved != n):
            raise ProtocolError(f"DROPPED span {k}: {moved} bytes at {reply.addr[k]:#x}, errno {err}; asked "
                                f"{n} bytes at {a:#x}", errno.EPROTO)
    return reply

