"""A run process's page table and fault thread (csrc/daemon/uswap_pt.c, csrc/daemon/uswap_runeng.c).

The table holds, by address, the pages of the process that are not plainly resident: SWAPPED (out, in a
slot), CLAIMED (chosen by eviction, no slot yet), INFLIGHT (written to a slot, the agent's drop pending),
SHARED (the agent's MOVE refused it), CLEAN (swapped in by a read or readahead: resident, write-protected,
equal to the slot it keeps).  The thread is the only reader of the process's uffd: it serves swap-ins,
zero-fills and first writes in C, and hands Python, in order, the faults it does not serve (FORWARD) and
every event (EVENT: it serves nothing more until :meth:`RunEngine.resume`), and the slot references it
dropped with the pages its swap-ins brought in (FREED).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, check
from uswap.uffd import _decode

SWAPPED, CLAIMED, INFLIGHT, SHARED, CLEAN = (lib.USWAP_PT_SWAPPED, lib.USWAP_PT_CLAIMED, lib.USWAP_PT_INFLIGHT,
                                             lib.USWAP_PT_SHARED, lib.USWAP_PT_CLEAN)
HOLD_SLOT = (SWAPPED, INFLIGHT, CLEAN)     # the states whose entry holds a reference to its slot
BUSY = lib.USWAP_PT_BUSY
FORWARD, EVENT, FREED = lib.USWAP_RUNENG_FORWARD, lib.USWAP_RUNENG_EVENT, lib.USWAP_RUNENG_FREED
_SHIFT = lib.USWAP_PT_SLOT_SHIFT
_WALK = 512
DRAIN_BATCH = 256


def entry(state: int, slot: int = -1) -> int:
    return state | (slot + 1) << _SHIFT


def state_of(e: int) -> int:
    return e & lib.USWAP_PT_STATE_MASK


def slot_of(e: int) -> int:
    return (e >> _SHIFT) - 1


class PageTable:
    """The pages of one process that are not plainly resident (see the module's docstring)."""

    def __init__(self):
        out = ffi.new("struct uswap_pt **")
        check(lib.uswap_pt_new(out))
        self.c = out[0]
        self._old = ffi.new("uint64_t *")
        self._cursor = ffi.new("uint64_t *")
        self._addrs = ffi.new("uint64_t[]", _WALK)
        self._entries = ffi.new("uint64_t[]", _WALK)
        self._scratch = ffi.new("uint64_t[]", 64)

    def get(self, a: int) -> int:
        """The page's entry; 0 if it has none."""
        return lib.uswap_pt_get(self.c, a)

    def set(self, a: int, e: int) -> int:
        """Set the entry (0 removes it); what it replaced."""
        check(lib.uswap_pt_set(self.c, a, e, self._old))
        return self._old[0]

    def swap(self, a: int, expect: int, e: int) -> bool:
        """Set the entry if it is ``expect`` now."""
        return check(lib.uswap_pt_swap(self.c, a, expect, e)) == 1

    def claim(self, a: int) -> int:
        """A SWAPPED page for a swap-in (BUSY from now on): its entry; -ENOENT, -EBUSY."""
        ret = lib.uswap_pt_claim(self.c, a, self._old)
        return ret if ret < 0 else self._old[0]

    def walk(self, start: int = 0, end: int = 1 << 64, states: tuple = (SWAPPED, CLAIMED, INFLIGHT, SHARED, CLEAN),
             take: bool = False) -> list[tuple[int, int]]:
        """(address, entry) of the entries in [start, end) in ``states``; with ``take``, removed."""
        mask = sum(1 << s for s in states)
        out = []
        self._cursor[0] = 0
        end = min(end, (1 << 64) - 1)
        while True:
            n = lib.uswap_pt_walk(self.c, self._cursor, start, end, mask, int(take), self._addrs, self._entries,
                                  _WALK)
            out.extend((self._addrs[i], self._entries[i]) for i in range(n))
            if n < _WALK:
                return out

    def count(self, state: int) -> int:
        return lib.uswap_pt_count(self.c, state)

    # -- batches (eviction): one call, one lock, for a span of pages ---------------------------

    def claim_evict(self, a: int, n: int) -> bool:
        """Eviction's claim of pages a.. (n): if each has no entry or is CLEAN, those without one become
        CLAIMED and the CLEAN ones INFLIGHT (slot kept); else none changes."""
        return check(lib.uswap_pt_claim_evict(self.c, a, n)) == 1

    def change(self, a: int, n: int, states: tuple, to_state: int) -> list[int]:
        """Pages a.. (n) in ``states`` (0: no entry), not BUSY, change to ``to_state`` keeping their slot
        (0: removed); the entries changed, as they were."""
        old = self._buffer(n)
        lib.uswap_pt_change(self.c, a, n, sum(1 << s for s in states), to_state, old)
        return [old[i] for i in range(n) if old[i]]

    def assign(self, addrs: list[int], from_state: int, to_state: int, first_slot: int) -> list[bool]:
        """Page addrs[i] in ``from_state`` becomes ``to_state`` with slot first_slot + i: whether it did."""
        ok = ffi.new("uint8_t[]", len(addrs))
        lib.uswap_pt_assign(self.c, addrs, len(addrs), from_state, to_state, first_slot, ok)
        return [bool(x) for x in ok]

    def spans(self, a: int, n: int, state: int, most: int) -> list[tuple[int, int]]:
        """(first address, pages) of the spans of pages in ``state`` (not BUSY) in a.. (n), up to ``most``."""
        first, length = ffi.new("uint64_t[]", most), ffi.new("uint64_t[]", most)
        k = lib.uswap_pt_spans(self.c, a, n, state, first, length, most)
        return [(first[i], length[i]) for i in range(k)]

    def _buffer(self, n: int):
        if n > len(self._scratch):
            self._scratch = ffi.new("uint64_t[]", n)
        return self._scratch

    def close(self) -> None:
        if self.c is not None:
            lib.uswap_pt_free(self.c)
            self.c = None


@dataclass(frozen=True, slots=True)
class RunEngineStats:
    engine_faults: int
    forwarded: int
    pswpin: int
    readahead: int
    zero_fills: int
    wp_faults: int
    clean_written: int
    read_ios: int
    events: int
    throttled: int


class RunEngine:
    """Started at construction; :meth:`stop` quiesces it (the thread has returned), :meth:`close` frees it."""

    def __init__(self, table: PageTable, budget, *, uffd: int, store_fd: int, codec, readahead: int,
                 forward_all: bool):
        out = ffi.new("struct uswap_runeng **")
        self._codec = codec   # kept alive as long as the thread
        check(lib.uswap_runeng_start(table.c, budget, uffd, PAGE_SIZE, store_fd,
                                     codec if codec is not None else ffi.NULL, readahead, int(forward_all), out))
        self.c = out[0]
        self.notify_fd = lib.uswap_runeng_notify_fd(self.c)
        self._msgs = ffi.new("struct uswap_runeng_msg[]", DRAIN_BATCH)
        self._stats = ffi.new("struct uswap_runeng_stats *")
        self._final: RunEngineStats | None = None

    def drain(self) -> list:
        """Every queued message, oldest first: (kind, slot, count, event); for FREED the last is the pages
        the swap-in brought in (0: a CLEAN page written)."""
        try:
            os.read(self.notify_fd, 8)    # the wake-up is for everything queued until now
        except BlockingIOError:
            pass
        out = []
        while True:
            n = lib.uswap_runeng_drain(self.c, self._msgs, DRAIN_BATCH)
            for i in range(n):
                m = self._msgs[i]
                out.append((m.kind, m.slot, m.count, m.swapped_in if m.kind == FREED else _decode(m.ev)))
            if n < DRAIN_BATCH:
                return out

    def resume(self) -> None:
        lib.uswap_runeng_resume(self.c)

    def forward_all(self, on: bool) -> None:
        lib.uswap_runeng_forward_all(self.c, int(on))

    @property
    def filled(self) -> int:
        return lib.uswap_runeng_filled(self.c) if self.c is not None else 0

    def take_filled(self) -> int:
        return lib.uswap_runeng_take_filled(self.c)

    def add_filled(self, n: int) -> None:
        lib.uswap_runeng_add_filled(self.c, n)

    def stats(self) -> RunEngineStats:
        if self.c is None:
            return self._final
        lib.uswap_runeng_stats(self.c, self._stats)
        s = self._stats
        return RunEngineStats(s.engine_faults, s.forwarded, s.pswpin, s.readahead, s.zero_fills, s.wp_faults,
                              s.clean_written, s.read_ios, s.events, s.throttled)

    def stop(self) -> None:
        if self.c is not None:
            lib.uswap_runeng_stop(self.c)

    def close(self) -> None:
        if self.c is not None:
            self.stop()
            self._final = self.stats()
            lib.uswap_runeng_free(self.c)
            self.c = None
