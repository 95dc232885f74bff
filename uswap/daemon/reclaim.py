"""Reclaim: keep resident pages under the budget by writing cold pages out (kswapd).

Victims come from one CLOCK over every resident page of every region, in
the order the pages became resident, with a second chance for pages whose
referenced bit is set.  uswap only sees accesses that fault (first touch,
swap-in, first write to a clean page), so those set the bit; the hand clears
it.  Readahead pages start unreferenced, like the kernel's.

Writeback of a batch (the kernel's shrink_folio_list → swap_writepage →
end_page_writeback → __remove_mapping):
  1. clean victims (their slot still holds their data) are dropped at once;
  2. dirty victims are write-protected (WRITEBACK), read through the memfd
     into an aligned buffer, and written, contiguous pages in one I/O of up
     to ``batch`` slots allocated as one cluster; all-zero pages need no slot;
  3. when the write ends, each page that no writer waited on is punched out
     of the memfd (SWAPPED); a page whose writer waited stays, CLEAN.
A failed write keeps the pages resident and dirty, frees their slots, and
pauses reclaim with exponential backoff (the kernel's redirty on a failed
swap write).  Nothing here awaits between a check of a page's state and the
action that depends on it, except the write itself, after which every
decision is made again.
"""

from __future__ import annotations

import collections
import errno
import logging
import time

import trio

from uswap._core import lib
from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.daemon.region import ABSENT, CLEAN, DIRTY, SWAPPED, WRITEBACK, Region, RegionGone
from uswap.daemon.slots import NoSlots

log = logging.getLogger("uswap.reclaim")

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0


class Reclaimer:
    def __init__(self, daemon, budget_pages: int, *, batch: int = 32, clock=time.monotonic):
        self.daemon = daemon
        self.budget = budget_pages
        self.low = max(1, budget_pages - max(batch, budget_pages // 32))  # stop here
        self.hard = budget_pages + max(2 * batch, budget_pages // 8)      # faults wait above this
        self.batch = batch
        self.clock = clock
        self.lru: collections.OrderedDict[tuple[Region, int], bool] = collections.OrderedDict()
        self.resident = 0                # pages resident in all regions (Region.set_state keeps it)
        self.writeback = 0               # pages under writeback now
        self.paused_until = 0.0
        self.pause_reason = ""
        self._backoff = BACKOFF_FIRST
        self._kick = trio.Event()
        self._progress = trio.Event()
        self._buf = AlignedBuffer(batch * PAGE_SIZE)

    # -- bookkeeping, called by regions -----------------------------------------

    def add(self, region: Region, page: int, *, referenced: bool) -> None:
        """Put a page that just became resident on the CLOCK."""
        self.lru[(region, page)] = referenced
        if self.resident > self.budget:
            self._kick.set()

    def touch(self, region: Region, page: int) -> None:
        key = (region, page)
        if key in self.lru:
            self.lru[key] = True

    def forget(self, region: Region, page: int) -> None:
        self.lru.pop((region, page), None)

    @property
    def paused(self) -> bool:
        return self.clock() < self.paused_until

    async def throttle(self) -> None:
        """Make a fault wait while far over budget (direct reclaim's throttling).

        Not while reclaim is paused by store errors: then resident memory grows
        past the budget instead of deadlocking the client.
        """
        while self.resident >= self.hard and not self.paused:
            self._kick.set()
            await self._progress.wait()

    # -- the reclaim task ---------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            while self.resident > self.low:
                if self.paused:
                    await trio.sleep_until(self.paused_until)
                    continue
                progressed = await self.reclaim_batch()
                self._progress.set()
                self._progress = trio.Event()
                if not progressed:
                    await trio.sleep(0.01)  # everything is in flight or referenced right now

    def pick_victims(self) -> list[tuple[Region, int]]:
        """Up to ``batch`` unreferenced pages from the CLOCK, each taken off it."""
        victims = []
        scans = 2 * len(self.lru)
        while self.lru and len(victims) < self.batch and scans > 0:
            scans -= 1
            key, referenced = self.lru.popitem(last=False)
            region, page = key
            if region.closed:
                continue
            if referenced or region.state[page] == WRITEBACK:
                self.lru[key] = False  # second chance: to the tail, bit cleared
                continue
            victims.append(key)
        return victims

    async def reclaim_batch(self) -> bool:
        victims = self.pick_victims()
        by_region: dict[Region, list[int]] = collections.defaultdict(list)
        for region, page in victims:
            by_region[region].append(page)
        for region, pages in by_region.items():
            for first, count in runs(sorted(pages)):
                try:
                    await self.evict_run(region, first, count)
                except RegionGone:
                    pass
        return bool(victims)

    async def evict_run(self, region: Region, first: int, count: int) -> None:
        """Evict pages first..first+count-1 of ``region`` (all resident, off the CLOCK)."""
        dirty = []
        for page in range(first, first + count):
            if region.state[page] == CLEAN:
                # The slot already holds this data: drop the page (no I/O).
                region.punch(page, 1)
                region.set_state(page, SWAPPED)
            else:
                dirty.append(page)
        for run_first, run_count in runs(dirty):
            if region.closed:  # released while an earlier run was being written
                return
            await self.write_run(region, run_first, run_count)

    async def write_run(self, region: Region, first: int, count: int) -> None:
        region._ioctl(region.uffd.write_protect, region.address(first), count * PAGE_SIZE, True)
        for page in range(first, first + count):
            region.set_state(page, WRITEBACK)
        self.writeback += count
        try:
            region.read_pages(first, count, self._buf)
            written = await self._write_slots(region, first, count)
        except OSError as e:
            self.writeback -= count
            self._write_failed(region, first, count, e)
            return
        self.writeback -= count
        self._end_writeback(region, first, count, written)

    async def _write_slots(self, region: Region, first: int, count: int) -> dict[int, int]:
        """Give every non-zero page a slot and write them; returns {page: slot}."""
        written: dict[int, int] = {}
        nonzero = [p for p in range(first, first + count)
                   if not lib.uswap_is_zero(self._buf.ptr + (p - first) * PAGE_SIZE, PAGE_SIZE)]
        try:
            for run_first, run_count in runs(nonzero):
                page = run_first
                while page < run_first + run_count:
                    slot, got = self.daemon.slots.allocate(run_first + run_count - page)
                    for i in range(got):
                        written[page + i] = slot + i
                    await self.daemon.io.write(slot, got, self._buf, page - first)
                    page += got
        except BaseException:
            for slot in written.values():
                self.daemon.release_slot(slot)
            raise
        return written

    def _end_writeback(self, region: Region, first: int, count: int, written: dict[int, int]) -> None:
        """end_page_writeback: drop the pages nobody wanted meanwhile."""
        if region.closed:
            for slot in written.values():
                self.daemon.release_slot(slot)
            return
        punch_from = None
        for page in range(first, first + count + 1):
            keep = page == first + count or page in region.wp_waiters
            if page < first + count:
                slot = written.get(page, -1)
                if keep:
                    if slot < 0:     # an all-zero page wanted again: keep it, dirty
                        region.set_state(page, DIRTY)
                        region._ioctl(region.uffd.write_protect, region.address(page), PAGE_SIZE, False)
                    else:
                        region.swap_map[page] = slot
                        region.set_state(page, CLEAN)
                    self.lru[(region, page)] = True
                    region.wp_waiters.pop(page).set()
                else:
                    region.swap_map[page] = slot
                    region.set_state(page, SWAPPED if slot >= 0 else ABSENT)
                    if slot >= 0:
                        region.stats.pswpout += 1
                        self.daemon.stats.pswpout += 1
                    if punch_from is None:
                        punch_from = page
            if keep and punch_from is not None:
                region.punch(punch_from, page - punch_from)
                punch_from = None
        self._backoff = BACKOFF_FIRST
        self.pause_reason = ""

    def _write_failed(self, region: Region, first: int, count: int, error: OSError) -> None:
        """The kernel's policy: the page stays resident and dirty; try later."""
        region.stats.write_errors += count
        self.daemon.stats.write_errors += count
        self.paused_until = self.clock() + self._backoff
        what = "no free slot" if isinstance(error, NoSlots) else f"errno {error.errno} ({error.strerror})"
        self.pause_reason = f"writeback failed: {what}; retrying in {self._backoff:.2f}s"
        self.daemon.log_limited("write", logging.ERROR, "region %d: writeback of %d page(s) at %#x failed: %s",
                                region.id, count, region.address(first), what)
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        if region.closed:
            return
        for page in range(first, first + count):
            region.set_state(page, DIRTY)
            self.lru[(region, page)] = True
            event = region.wp_waiters.pop(page, None)
            if event:
                event.set()
        try:
            region._ioctl(region.uffd.write_protect, region.address(first), count * PAGE_SIZE, False)
        except RegionGone:
            pass
        if error.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EBADMSG):
            log.error("unexpected writeback error", exc_info=error)


def runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs of consecutive pages."""
    out: list[tuple[int, int]] = []
    for page in pages:
        if out and out[-1][0] + out[-1][1] == page:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((page, 1))
    return out
