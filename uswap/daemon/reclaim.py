"""Reclaim: keep resident pages under the budget by writing cold pages out (kswapd).

Victims come from one CLOCK over every resident page of every region, in
the order the pages became resident, with a second chance for pages whose
referenced bit is set.  uswap only sees accesses that fault (first touch,
swap-in, first write to a clean page), so those set the bit; the hand clears
it.  Readahead pages start unreferenced, like the kernel's.

Writeback of a batch (the kernel's shrink_folio_list → swap_writepage →
end_page_writeback → __remove_mapping):
  1. clean victims (their slot still holds their data) are dropped at once;
  2. dirty victims are write-protected (WRITEBACK) and read through the memfd
     into an aligned buffer, in any order; their slots are allocated as one
     cluster, so up to ``batch`` scattered pages become one sequential write
     (the kernel's swap_iocb); all-zero pages need no slot;
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
        dirty = []
        for region, pages in by_region(victims):
            try:
                dirty += [(region, p) for p in self.drop_clean(region, pages)]
            except RegionGone:
                pass
        if dirty:
            await self.write_batch(dirty)
        return bool(victims)

    def drop_clean(self, region: Region, pages: list[int]) -> list[int]:
        """Drop the clean pages (their slots hold their data: no I/O); return the dirty ones."""
        clean = [p for p in pages if region.state[p] == CLEAN]
        for first, count in runs(clean):
            region.punch(first, count)
            for page in range(first, first + count):
                region.set_state(page, SWAPPED)
        return [p for p in pages if region.state[p] != SWAPPED]

    async def write_batch(self, victims: list[tuple[Region, int]]) -> None:
        """swap_writepage for a batch: one write per cluster of contiguous slots.

        The pages may be scattered over regions and addresses; their slots are
        allocated as one cluster, so the batch is (usually) a single
        sequential write, like the kernel's swap_iocb plugging.
        """
        batch: list[tuple[Region, int]] = []   # buffer order
        for region, pages in by_region(victims):
            try:
                for first, count in runs(pages):
                    region._ioctl(region.uffd.write_protect, region.address(first), count * PAGE_SIZE, True)
                    for page in range(first, first + count):
                        region.set_state(page, WRITEBACK)
                    region.read_pages(first, count, self._buf, len(batch))
                    batch += [(region, p) for p in range(first, first + count)]
            except RegionGone:
                continue
        self.writeback += len(batch)
        try:
            slots = await self._write_slots(len(batch))
        except OSError as e:
            self._write_failed(batch, e)
            return
        finally:
            self.writeback -= len(batch)
        self._end_writeback(batch, slots)

    async def _write_slots(self, count: int) -> list[int]:
        """Give every non-zero buffer page a slot and write them; returns each page's slot (-1: zero)."""
        slots = [-1] * count
        nonzero = [i for i in range(count) if not lib.uswap_is_zero(self._buf.ptr + i * PAGE_SIZE, PAGE_SIZE)]
        try:
            for run_first, run_count in runs(nonzero):
                i = run_first
                while i < run_first + run_count:
                    slot, got = self.daemon.slots.allocate(run_first + run_count - i)
                    slots[i:i + got] = range(slot, slot + got)
                    await self.daemon.io.write(slot, got, self._buf, i)
                    i += got
        except BaseException:
            for slot in slots:
                self.daemon.release_slot(slot)
            raise
        return slots

    def _end_writeback(self, batch: list[tuple[Region, int]], slots: list[int]) -> None:
        """end_page_writeback, then drop the pages nobody wanted meanwhile."""
        dropped: dict[Region, list[int]] = collections.defaultdict(list)
        for (region, page), slot in zip(batch, slots):
            if region.closed:
                self.daemon.release_slot(slot)
            elif page in region.wp_waiters:
                # A writer waits: the page stays (clean if it got a slot).
                region.swap_map[page] = slot
                region.set_state(page, CLEAN if slot >= 0 else DIRTY)
                if slot < 0:
                    region._ioctl(region.uffd.write_protect, region.address(page), PAGE_SIZE, False)
                self.lru[(region, page)] = True
                region.wp_waiters.pop(page).set()
            else:
                region.swap_map[page] = slot
                region.set_state(page, SWAPPED if slot >= 0 else ABSENT)
                if slot >= 0:
                    region.stats.pswpout += 1
                    self.daemon.stats.pswpout += 1
                dropped[region].append(page)
        for region, pages in dropped.items():
            for first, count in runs(pages):
                region.punch(first, count)
        self._backoff = BACKOFF_FIRST
        self.pause_reason = ""

    def _write_failed(self, batch: list[tuple[Region, int]], error: OSError) -> None:
        """The kernel's policy: the pages stay resident and dirty; try later."""
        self.paused_until = self.clock() + self._backoff
        what = "no free slot" if isinstance(error, NoSlots) else f"errno {error.errno} ({error.strerror})"
        self.pause_reason = f"writeback failed: {what}; retrying in {self._backoff:.2f}s"
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        self.daemon.stats.write_errors += len(batch)
        self.daemon.log_limited("write", logging.ERROR, "writeback of %d page(s) failed: %s", len(batch), what)
        if error.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EBADMSG, errno.ETIMEDOUT):
            log.error("unexpected writeback error", exc_info=error)
        for region, pages in by_region(batch):
            if region.closed:
                continue
            region.stats.write_errors += len(pages)
            for page in pages:
                region.set_state(page, DIRTY)
                self.lru[(region, page)] = True
                event = region.wp_waiters.pop(page, None)
                if event:
                    event.set()
            try:
                for first, count in runs(pages):
                    region._ioctl(region.uffd.write_protect, region.address(first), count * PAGE_SIZE, False)
            except RegionGone:
                pass


def by_region(pairs: list[tuple[Region, int]]) -> list[tuple[Region, list[int]]]:
    """(region, page) pairs grouped per region, pages sorted."""
    grouped: dict[Region, list[int]] = collections.defaultdict(list)
    for region, page in pairs:
        grouped[region].append(page)
    return [(region, sorted(pages)) for region, pages in grouped.items()]


def runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs of consecutive pages."""
    out: list[tuple[int, int]] = []
    for page in pages:
        if out and out[-1][0] + out[-1][1] == page:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((page, 1))
    return out
