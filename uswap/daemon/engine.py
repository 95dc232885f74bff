"""A region's fault engine: the C threads that serve its common faults (csrc/daemon/uswap_engine.c).

The engine's fault threads (``threads``, daemon --fault-threads) read the
region's userfaultfd (they are its only readers; each fault goes to one of
them), serve swap-ins from a local store, zero-fills and first writes to
clean pages in C, and hand everything else to Python as FORWARD messages:
faults on pages Python holds, WRITEBACK and POISONED pages, read errors and
checksum mismatches, faults above the hard budget, and every fault of a
store Python serves (NFS).  What they did goes to Python through one ring
(INSTALLED, ZEROED: resident spans for the CLOCK; DIRTIED: a clean page
written), in each thread's order, with an eventfd to wait on.  What Python
may rely on in that order is written at ``post`` in csrc/daemon/uswap_engine.c: a
page's INSTALLED/ZEROED stay in order, and its forwarded faults may arrive
in any order (each is served from the map as it is then).  The slots of pages it makes writable it frees itself, in
the daemon's allocator (uswap.daemon.slots).
"""

from __future__ import annotations

from dataclasses import dataclass

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, check
from uswap.daemon.swapmap import SwapMap

INSTALLED, ZEROED, DIRTIED, FORWARD = (lib.USWAP_MSG_INSTALLED, lib.USWAP_MSG_ZEROED, lib.USWAP_MSG_DIRTIED,
                                       lib.USWAP_MSG_FORWARD)
DRAIN_BATCH = 256


@dataclass(frozen=True, slots=True)
class EngineStats:
    engine_faults: int
    forwarded: int
    pswpin: int
    zero_fills: int
    wp_faults: int
    read_ios: int
    readahead: int


class Engine:
    """Started at construction; :meth:`stop` quiesces it (every thread has returned), :meth:`close` frees it."""

    def __init__(self, swapmap: SwapMap, *, uffd: int, memfd: int, addr: int, store_fd: int, codec, slots,
                 readahead: int, threads: int = 1):
        out = ffi.new("struct uswap_engine **")
        self._codec = codec   # a struct uswap_codec * (or NULL); kept alive as long as the engine
        check(lib.uswap_engine_start(swapmap.c, uffd, memfd, addr, PAGE_SIZE, store_fd,
                                     codec if codec is not None else ffi.NULL, slots.c, readahead, threads, out))
        self.c = out[0]
        self.notify_fd = lib.uswap_engine_notify_fd(self.c)
        self._msgs = ffi.new("struct uswap_engine_msg[]", DRAIN_BATCH)
        self._stats = ffi.new("struct uswap_engine_stats *")

    def drain(self) -> list:
        """Every queued message, oldest first (cffi structs copied into tuples)."""
        out = []
        while True:
            n = lib.uswap_engine_drain(self.c, self._msgs, DRAIN_BATCH)
            for i in range(n):
                m = self._msgs[i]
                out.append((m.kind, m.first, m.count, m.faulting, m.slot, m.address, m.flags))
            if n < DRAIN_BATCH:
                return out

    def stats(self) -> EngineStats:
        lib.uswap_engine_stats(self.c, self._stats)
        s = self._stats
        return EngineStats(s.engine_faults, s.forwarded, s.pswpin, s.zero_fills, s.wp_faults, s.read_ios, s.readahead)

    def set_install_dirty(self, on: bool) -> None:
        """Swap-ins go in writable, their slots freed (no write fault comes back), or clean."""
        lib.uswap_engine_set_install_dirty(self.c, int(on))

    def stop(self) -> None:
        if self.c is not None:
            lib.uswap_engine_stop(self.c)

    def close(self) -> None:
        if self.c is not None:
            lib.uswap_engine_free(self.c)
            self.c = None
