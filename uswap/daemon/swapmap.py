"""The swap map: one atomic word per page, shared by Python and the region's C fault threads.

Each entry holds the page's state, a BUSY bit, a REFERENCED bit and the page's
slot (csrc/daemon/uswap_engine.h).  It is the only record of page state and slots;
it changes only through the named transitions below (and the engine's, in C,
which use the same CAS), and the resident counts follow every transition.

    state      what the kernel would call it
    ABSENT     never touched, or evicted while all zeros: the next touch gets a zero page
    SWAPPED    swapped out: the data is in the entry's slot; not in the memfd
    DIRTY      resident and writable; no slot
    CLEAN      resident, write-protected, identical to its slot (a swap-cache page)
    WRITEBACK  resident, write-protected, being written to the slot the writer chose (PG_writeback)
    POISONED   its slot could not be read back: the toucher gets SIGBUS

Invariants (docs/DESIGN.md M1; written where they are relied on, in uswap_engine.c):
  * a SWAPPED or CLEAN page has a slot; DIRTY, ABSENT and POISONED pages have
    none; a WRITEBACK page has none in its entry (the writer holds its slot
    until the write ends, then publishes it with the new state);
  * only the holder of a page's BUSY bit changes the page's PTE, memfd page or
    slot, and publishes its next state (which drops BUSY);
  * Python claims only from the trio thread, so Python-held pages are known
    to the region (``Region.held``); the engine holds a page only for the
    duration of one install, never across a wait on Python.
"""

from __future__ import annotations

import errno

from uswap._core import ffi, lib
from uswap.core import check

ABSENT, SWAPPED, DIRTY, CLEAN, WRITEBACK, POISONED = (lib.USWAP_ABSENT, lib.USWAP_SWAPPED, lib.USWAP_DIRTY,
                                                      lib.USWAP_CLEAN, lib.USWAP_WRITEBACK, lib.USWAP_POISONED)
STATE_MASK = lib.USWAP_STATE_MASK
BUSY = lib.USWAP_BUSY
REFERENCED = lib.USWAP_REFERENCED
SLOT_SHIFT = lib.USWAP_SLOT_SHIFT
CLAIM_SPANS = 64   # spans claim_spans returns at most (of each kind); it stops early when they are used up


def state_of(entry: int) -> int:
    return entry & STATE_MASK


def slot_of(entry: int) -> int:
    return (entry >> SLOT_SHIFT) - 1


class Budget:
    """Resident pages of every region (C-shared): above ``soft`` reclaim runs, above ``hard`` faults wait."""

    def __init__(self, hard: int, *, soft: int):
        self.c = ffi.new("struct uswap_budget *")
        self.c.hard = hard
        self.c.soft = soft

    @property
    def resident(self) -> int:
        return self.c.resident

    @property
    def hard(self) -> int:
        return self.c.hard


class SwapMap:
    """A region's page entries (owned here; freed by :meth:`close`)."""

    def __init__(self, pages: int, budget: Budget):
        out = ffi.new("struct uswap_swapmap **")
        check(lib.uswap_swapmap_new(pages, budget.c, out))
        self.c = out[0]
        self.pages = pages
        self.budget = budget
        self._spans = None   # claim_spans' arrays, made on first use

    def close(self) -> None:
        """Free the map; its resident pages leave the budget.  The engine must be stopped."""
        if self.c is not None:
            lib.uswap_swapmap_free(self.c)   # in C: the budget is shared with running engine threads
            self.c = None

    @property
    def resident(self) -> int:
        return self.c.resident if self.c is not None else 0

    def entry(self, page: int) -> int:
        return lib.uswap_map_entry(self.c, page)

    def state(self, page: int) -> int:
        return state_of(lib.uswap_map_entry(self.c, page))

    def count(self, state: int) -> int:
        return lib.uswap_map_count(self.c, state) if self.c is not None else 0

    # -- transitions ----------------------------------------------------------------

    def claim(self, page: int) -> int | None:
        """Take the page's BUSY bit: its entry, or None if someone holds it."""
        out = ffi.new("uint64_t *")
        ret = lib.uswap_map_claim(self.c, page, out)
        if ret == -errno.EBUSY:
            return None
        check(ret)
        return out[0]

    def publish(self, page: int, state: int, slot: int = -1, *, referenced: int = -1) -> None:
        """The claimed page's next state and slot; drops BUSY (referenced: 1 set, 0 clear, -1 keep)."""
        lib.uswap_map_publish(self.c, page, state, slot, referenced)

    def unclaim(self, page: int) -> None:
        """Give a claim back, the page unchanged."""
        entry = self.entry(page)
        self.publish(page, state_of(entry), slot_of(entry))

    def test_clear_referenced(self, first: int, count: int) -> bool:
        return bool(lib.uswap_map_test_clear_referenced(self.c, first, count))

    def set_referenced(self, page: int) -> None:
        lib.uswap_map_set_referenced(self.c, page)

    def claim_spans(self, first: int, count: int, most: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], int]:
        """Claim the DIRTY and CLEAN unclaimed pages of pages first..first+count-1, up to ``most``.

        ``(taken, held, end)``: the claimed pages as spans ``(first, count, state)`` of one state;
        the resident pages someone else holds as spans ``(first, count)``; the first page not
        looked at (the rest of the span, when ``most`` pages were taken)."""
        if self._spans is None:
            self._spans = (ffi.new("struct uswap_span[]", CLAIM_SPANS), ffi.new("struct uswap_span[]", CLAIM_SPANS),
                          ffi.new("struct uswap_claimed *"))
        taken, held, out = self._spans
        lib.uswap_map_claim_spans(self.c, first, count, most, taken, held, CLAIM_SPANS, out)
        return ([(r.first, r.count, r.state) for r in taken[0:out.taken]],
                [(r.first, r.count) for r in held[0:out.held]], out.end)
