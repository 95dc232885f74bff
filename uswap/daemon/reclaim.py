"""Reclaim: keep resident pages under the budget by writing cold pages out (kswapd).

Victims come from one CLOCK over spans of resident pages of every region, in
the order they became resident: a readahead or zero-fill span enters as one
unit, so a batch taken from it stays contiguous in memory and in the store
(the kernel keeps a folio together the same way).  uswap only sees accesses
that fault (first touch, swap-in, first write to a clean page); those set the
page's REFERENCED bit in the swap map, and the hand gives a span with any
referenced page a second chance, clearing the bits.

Writeback of a batch (the kernel's shrink_folio_list → swap_writepage →
end_page_writeback → __remove_mapping), every page claimed (BUSY) first:
  1. clean victims (their slot still holds their data) are punched out of the
     memfd, then published SWAPPED (punch before publish: no fault ever sees
     SWAPPED while the page is still there);
  2. dirty victims are write-protected (WRITEBACK) and copied from the memfd
     into an aligned buffer (C, uswap_wb_prepare); their slots are allocated
     as one cluster, so up to ``batch`` scattered pages become one sequential
     write (the kernel's swap_iocb); all-zero pages need no slot;
  3. the write (C: encode, pwrite per slot run; on a worker thread with
     ``--io async``), then end_page_writeback (C: uswap_wb_finish): each
     page that no writer waited on is punched and published SWAPPED; a page
     whose writer waited stays, CLEAN.
A failed write keeps the pages resident and dirty, frees their slots, and
pauses reclaim with exponential backoff (the kernel's redirty on a failed
swap write).  The per-page work is C; the choices (victims, slots, errors)
are made here.

A region's own memory failing under reclaim (its mapping gone, its memfd
refusing a read or punch) ends that region (``Daemon.end_region``), never
the reclaimer: one client cannot stop reclaim for the others.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import time

import trio

from uswap._core import ffi, lib
from uswap.backoff import Backoff
from uswap.core import PAGE_SIZE, AlignedBuffer, check
from uswap.daemon.budget import MIN_LINE, Demand, Share, hard_line
from uswap.daemon.region import Region, RegionGone
from uswap.daemon.slots import NoSlots
from uswap.daemon.swapmap import CLEAN, DIRTY, Budget

log = logging.getLogger("uswap.reclaim")

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
IDLE_LOOK = 0.05
REBUILD_AFTER = 50   # passes that found no victim while over the budget


class Reclaimer:
    """The regions' reclaimer, and the regions' client of the daemon's budget (uswap.daemon.budget): the
    regions together hold one share of it, ``line`` (reclaim runs above it, down to ``low``) and
    ``budget.hard`` (faults wait at it; both read by the engines in C), which ``shares`` (the daemon's
    budget; None: the regions alone, the whole budget theirs) keeps up to date."""

    kind = "regions"

    def __init__(self, daemon, budget_pages: int, *, batch: int = 32, in_flight: int = 1, clock=time.monotonic,
                 shares=None):
        self.daemon = daemon
        self.budget_pages = budget_pages
        self.shares = shares
        self.batch = batch
        self.budget = Budget(hard_line(budget_pages), soft=budget_pages)
        self.line = self.low = 0
        self._set_line(budget_pages)
        self.clock = clock
        self.spans: collections.deque[tuple[Region, int, int]] = collections.deque()  # the CLOCK
        self.writeback = 0               # pages under writeback now
        self.paused_until = 0.0
        self.pause_reason = ""
        self.punches = 0
        self._backoff = Backoff(BACKOFF_FIRST, BACKOFF_MAX)
        self._kick = trio.Event()
        self._progress = trio.Event()
        # Batches in flight: one with sync I/O (each write completes before the next
        # batch is chosen), IN_FLIGHT_ASYNC with async I/O (writes overlap the choice).
        self.in_flight = in_flight
        self._free = [WritebackBatch(batch) for _ in range(self.in_flight)]
        self._batch_returned = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._punches = ffi.new("uint64_t *")
        self._swapped = ffi.new("uint64_t *")

    @property
    def resident(self) -> int:
        return self.budget.resident

    # -- the regions' share of the daemon's budget (uswap.daemon.budget) --------------

    def _set_line(self, line: int) -> None:
        self.line = line
        self.low = max(1, line - max(self.batch, line // 32))   # reclaim stops here
        self.budget.c.soft = line                                # the engines wake us above it

    def budget_demand(self) -> Demand:
        return Demand(self.resident, self.budget_pages, min(MIN_LINE, self.budget_pages),
                      lambda line: max(2 * self.batch, line // 8), stuck=self.paused, hard=self.budget.hard)

    def set_share(self, share: Share) -> None:
        """The regions' new line and hard line: reclaim if over the line, throttled faults look again if the
        hard line rose."""
        raised = share.hard > self.budget.hard
        self._set_line(share.line)
        self.budget.c.hard = share.hard
        if raised:
            self.progressed()
        if self.resident > self.line:
            self._kick.set()

    def update_shares(self) -> None:
        """Share the daemon's budget out again (the other clients' counts move our lines)."""
        if self.shares is not None:
            self.shares.update()

    # -- bookkeeping, called by regions -----------------------------------------

    def add_span(self, region: Region, first: int, count: int) -> None:
        """Put a span of pages that just became resident on the CLOCK."""
        self.spans.append((region, first, count))
        if self.resident > self.line:
            self._kick.set()

    @contextlib.contextmanager
    def region_errors(self, region: Region):
        """What goes wrong with one region's memory ends that region, not reclaim."""
        try:
            yield
        except RegionGone:
            self.daemon.end_region(region, "its client's memory is gone", level=logging.INFO)
        except OSError as e:
            if e.errno == errno.ESRCH:     # the client's mm is gone: it exited or was killed
                self.daemon.end_region(region, "its client's memory is gone", level=logging.INFO)
            elif e.errno == errno.ENOENT:  # the range is no longer registered: munmap, mremap
                self.daemon.end_region(region, "its mapping is gone (unmapped or moved); its pages leave the "
                                               "budget")
            else:
                self.daemon.end_region(region, f"its memory failed under reclaim: {e}")

    @property
    def paused(self) -> bool:
        return self.clock() < self.paused_until

    async def throttle(self) -> None:
        """Make a fault wait while far over budget (direct reclaim's throttling).

        Not while reclaim is paused by store errors: then resident memory grows
        past the budget instead of deadlocking the client.
        """
        while self.resident >= self.budget.hard and not self.paused:
            self.update_shares()            # room another client freed since the last update
            if self.resident < self.budget.hard:
                break
            self._kick.set()
            await self._progress.wait()

    def progressed(self) -> None:
        """Resident memory went down (a batch written or dropped, a region released) or reclaim
        paused: throttled faults look again.  Every way resident memory falls must call this,
        or a fault throttled at the hard line waits forever."""
        self._progress.set()
        self._progress = trio.Event()

    # -- the reclaim task ---------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:   # batches in flight (async I/O) end with reclaim
            self._nursery = nursery
            while True:
                # Engines report new resident spans lazily (no syscall per fault while
                # under the budget line); looking every IDLE_LOOK keeps the CLOCK current
                # above it.  Under it nothing needs reclaim until an engine wakes Python
                # (resident memory crossed the line: add_span kicks) or a fault throttles.
                with trio.move_on_after(IDLE_LOOK if self.resident > self.line else math.inf):
                    await self._kick.wait()
                self._kick = trio.Event()
                self.take_messages()
                self.update_shares()
                idle = 0
                while self.resident - self.writeback > self.low:
                    if self.paused:
                        await trio.sleep_until(self.paused_until)
                        self.update_shares()
                        continue
                    progressed = await self.reclaim_batch()
                    self.update_shares()
                    self.progressed()
                    idle = 0 if progressed else idle + 1
                    if idle == REBUILD_AFTER:
                        self.rebuild_clock()
                    if not progressed:
                        await trio.sleep(0.01)  # everything is in flight or referenced right now

    def take_messages(self) -> None:
        """What the engines did since we last looked: freed slots, new spans for the CLOCK."""
        for region in list(self.daemon.regions.values()):
            region.take_messages()

    def pick_victims(self) -> list[tuple[Region, int, int, int]]:
        """Up to ``batch`` claimed pages from unreferenced spans of the CLOCK, as spans of one
        state: (region, first, count, state), in CLOCK order."""
        victims: list[tuple[Region, int, int, int]] = []
        pages = 0
        scans = 2 * len(self.spans)
        while self.spans and pages < self.batch and scans > 0:
            scans -= 1
            region, first, count = self.spans.popleft()
            if region.closed:
                continue
            if region.map.test_clear_referenced(first, count):
                self.spans.append((region, first, count))   # second chance: to the tail, bits cleared
                continue
            taken, held, end = region.map.claim_spans(first, count, self.batch - pages)
            for span_first, span_count, state in taken:
                region.held.update(range(span_first, span_first + span_count))
                victims.append((region, span_first, span_count, state))
                pages += span_count
            # Invariant M7 (DESIGN.md): every DIRTY or CLEAN page is in some span of the CLOCK.  Pages of
            # this span that were not taken stay: the unexamined rest (the batch filled up)
            # next in line, those held by someone right now at the tail.
            if end < first + count:
                self.spans.appendleft((region, end, first + count - end))
            self.spans.extend((region, held_first, held_count) for held_first, held_count in held)
        return victims

    def rebuild_clock(self) -> None:
        """A safety net, never needed while the CLOCK's invariant holds: rebuild it
        from the swap maps when reclaim finds nothing to take though resident memory
        is over the line (every resident page back on it, in page order)."""
        self.spans.clear()
        for region in self.daemon.regions.values():
            resident = [p for p in range(region.pages) if region.map.state(p) in (DIRTY, CLEAN)]
            self.spans.extend((region, first, count) for first, count in spans(resident))
        log.info("reclaim found nothing to take at %d resident pages: CLOCK rebuilt, %d spans", self.resident,
                 len(self.spans))

    async def reclaim_batch(self) -> bool:
        self.take_messages()
        victims = self.pick_victims()
        dirty: list[tuple[Region, int, int]] = []
        for region, first, count, state in victims:
            if state != CLEAN:
                dirty.append((region, first, count))
                continue
            with self.region_errors(region):
                self._finish_claims(region, first, count,
                                    lib.uswap_drop_clean(region.map.c, region.memfd, PAGE_SIZE, first, count))
                self.punches += 1
        if dirty:
            await self.write_batch(dirty)
        return bool(victims)

    @staticmethod
    def _finish_claims(region: Region, first: int, count: int, ret: int) -> None:
        """After a C call that published pages first..first+count-1: they are no longer held."""
        region.end_claims(range(first, first + count))
        check(ret)

    async def write_batch(self, victims: list[tuple[Region, int, int]]) -> None:
        """swap_writepage for a batch of claimed dirty spans (region, first, count): one write
        per cluster of contiguous slots.

        The spans may be scattered over regions and addresses; their slots are
        allocated as one cluster, so the batch is (usually) a single
        sequential write, like the kernel's swap_iocb plugging.  With one batch
        in flight (sync I/O) the write is awaited here; with more (async), it
        goes on in its own task while the next batch is chosen.
        """
        while not self._free:
            await self._batch_returned.wait()
        batch = self._free.pop()
        batch.clear()
        # Invariant: a batch goes back to the free list exactly once (``_write_done``, or
        # below), whatever happens, or reclaim would wait for it forever; and prepared pages
        # never stay WRITEBACK: a failure before the write puts them back dirty.
        handed = False
        try:
            for region, first, count in victims:
                if region.closed:
                    continue   # released while we waited for a batch: its pages went with it
                with self.region_errors(region):
                    try:
                        check(lib.uswap_wb_prepare(region.map.c, region.uffd.fd, region.memfd, region.addr,
                                                   PAGE_SIZE, first, count, batch.buf.ptr + batch.count * PAGE_SIZE,
                                                   batch.zero + batch.count))
                    except OSError:
                        for p in range(first, first + count):
                            region.unclaim(p)
                        raise
                    batch.spans.append((region, first, count, batch.count))
                    batch.count += count
            if not batch.count:
                return
            self.writeback += batch.count
            handed = True
            try:
                self._allocate_slots(batch)
            except NoSlots as e:
                return self._write_done(batch, e)
        except BaseException as e:
            if not handed and batch.count:
                self.writeback += batch.count
                handed = True
                self._write_done(batch, OSError(errno.EIO, f"writeback could not start: {e!r}"))
            raise
        finally:
            if not handed:
                self._give_back(batch)
        if self.in_flight == 1:
            await self._write(batch)
        else:
            self._nursery.start_soon(self._write, batch)

    async def _write(self, batch: "WritebackBatch") -> None:
        try:
            await self.daemon.io.write_batch(batch.buf, batch.slots, batch.count)
        except OSError as e:
            self._write_done(batch, e)
        else:
            self._write_done(batch, None)

    def _write_done(self, batch: "WritebackBatch", error: OSError | None) -> None:
        self.writeback -= batch.count
        if error is None:
            self._end_writeback(batch)
        else:
            self._write_failed(batch, error)
        self._give_back(batch)
        self.progressed()

    def _give_back(self, batch: "WritebackBatch") -> None:
        self._free.append(batch)
        self._batch_returned.set()
        self._batch_returned = trio.Event()

    def _allocate_slots(self, batch: "WritebackBatch") -> None:
        """Give every non-zero buffer page a slot, in clusters (-1: an all-zero page); NoSlots: none."""
        self.daemon.slots.assign(batch.zero, batch.slots, batch.count)

    def _release_slots(self, batch: "WritebackBatch") -> None:
        self.daemon.slots.free_list(batch.slots, batch.count)

    def _end_writeback(self, batch: "WritebackBatch") -> None:
        """end_page_writeback, then drop the pages nobody wanted meanwhile."""
        for region, first, count, index in batch.spans:
            if region.closed:
                self.daemon.slots.free_list(batch.slots + index, count)
                continue
            kept = [page for page in region.wp_waiters if first <= page < first + count]
            for page in kept:
                batch.keep[index + page - first] = 1
            self._punches[0] = self._swapped[0] = 0
            with self.region_errors(region):
                self._finish_claims(region, first, count, lib.uswap_wb_finish(
                    region.map.c, region.uffd.fd, region.memfd, region.addr, PAGE_SIZE, first, count,
                    batch.slots + index, batch.keep + index, 1, self._punches, self._swapped))
            self.punches += self._punches[0]
            region.stats.pswpout += self._swapped[0]
            self.daemon.stats.pswpout += self._swapped[0]
            for page in kept:
                self.spans.append((region, page, 1))   # wanted again: referenced, at the tail
                region.wp_waiters.pop(page).set()
        self._backoff.reset()
        self.pause_reason = ""

    def _write_failed(self, batch: "WritebackBatch", error: OSError) -> None:
        """The kernel's policy: the pages stay resident and dirty; try later."""
        delay = self._backoff.next()
        self.paused_until = self.clock() + delay
        what = "no free slot" if isinstance(error, NoSlots) else f"errno {error.errno} ({error.strerror})"
        self.pause_reason = f"writeback failed: {what}; retrying in {delay:.2f}s"
        self.daemon.stats.write_errors += batch.count
        self.daemon.log_limited("write", logging.ERROR, "writeback of %d page(s) failed: %s", batch.count, what)
        if error.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EBADMSG, errno.ETIMEDOUT):
            log.error("unexpected writeback error", exc_info=error)
        self._release_slots(batch)
        for region, first, count, index in batch.spans:
            if region.closed:
                continue
            region.stats.write_errors += count
            with self.region_errors(region):
                self._finish_claims(region, first, count, lib.uswap_wb_finish(
                    region.map.c, region.uffd.fd, region.memfd, region.addr, PAGE_SIZE, first, count,
                    batch.slots + index, batch.keep + index, 0, ffi.NULL, ffi.NULL))
            self.spans.append((region, first, count))
            for page in range(first, first + count):
                event = region.wp_waiters.pop(page, None)
                if event is not None:      # a trio.Event has no truth value
                    event.set()


class WritebackBatch:
    """One batch's buffer and per-page arrays (zero, slot, keep), and its spans: (region, first, count, index).
    A batch belongs to one writeback from ``write_batch`` until ``_give_back``."""

    def __init__(self, pages: int):
        self.buf = AlignedBuffer(pages * PAGE_SIZE)
        self.zero = ffi.new("uint8_t[]", pages)
        self.slots = ffi.new("int64_t[]", pages)
        self.keep = ffi.new("uint8_t[]", pages)
        self.spans: list[tuple[Region, int, int, int]] = []
        self.count = 0

    def clear(self) -> None:
        self.spans = []
        self.count = 0
        ffi.buffer(self.keep)[:] = bytes(len(self.keep))


def spans(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) spans of consecutive pages."""
    out: list[tuple[int, int]] = []
    for page in pages:
        if out and out[-1][0] + out[-1][1] == page:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((page, 1))
    return out
