"""One client region: its page states, its swap map, and the swap-in path.

Reads top to bottom like the kernel's fault path: ``handle_fault`` decides
(do_swap_page / do_wp_page), ``swap_in`` does the I/O with a readahead window
(swap_readpage, swap_vma_readahead) and installs the pages clean and
write-protected, so they keep their slots until first written.

Page states (``Region.state``), with what the kernel would call them:

    ABSENT     never touched, or evicted while all zeros: the next touch gets a zero page
    SWAPPED    swapped out: the data is in slot ``swap_map[page]``; not in the memfd
    DIRTY      resident and writable; owns no slot
    CLEAN      resident, write-protected, identical to its slot (a swap-cache page)
    WRITEBACK  resident, write-protected, being written to its slot (PG_writeback)
    POISONED   its slot could not be read back: the toucher gets SIGBUS

Invariant: ``swap_map[page] >= 0`` exactly when the state is SWAPPED, CLEAN or
WRITEBACK.  Pages are read through ``pread`` on the memfd, never through a
mapping (touching a punched page through a mapping would allocate it).
"""

from __future__ import annotations

import array
import errno
import logging
import os
from dataclasses import dataclass

import trio

from uswap._core import lib
from uswap.core import PAGE_SIZE, AlignedBuffer, check
from uswap.uffd import CopyMode, Pagefault, PartialFill, Userfaultfd

log = logging.getLogger("uswap.region")

ABSENT, SWAPPED, DIRTY, CLEAN, WRITEBACK, POISONED = range(6)
RESIDENT = (DIRTY, CLEAN, WRITEBACK)
IS_RESIDENT = tuple(s in RESIDENT for s in range(6))

READ_RETRIES = 3
# The client's memory is gone (exit, munmap, kill): stop serving, quietly.
GONE_ERRNOS = (errno.ESRCH, errno.ENOENT, errno.EFAULT, errno.EINVAL)


class RegionGone(Exception):
    pass


@dataclass
class RegionStats:
    faults: int = 0
    zero_fills: int = 0
    wp_faults: int = 0
    writeback_waits: int = 0   # writes that had to wait for their page's writeback to end
    pswpin: int = 0
    pswpout: int = 0
    read_errors: int = 0
    write_errors: int = 0
    poisoned: int = 0


class Region:
    def __init__(self, rid: int, uffd: Userfaultfd, memfd: int, addr: int, length: int, *,
                 pid: int, uid: int, daemon):
        self.id = rid
        self.uffd = uffd
        self.memfd = memfd
        self.addr = addr
        self.length = length
        self.pages = length // PAGE_SIZE
        self.pid = pid
        self.uid = uid
        self.daemon = daemon      # store, slot I/O, allocator, reclaimer, readahead
        self.state = bytearray(self.pages)
        self.swap_map = array.array("l", [-1]) * self.pages
        self.stats = RegionStats()
        self.resident = 0         # pages in RESIDENT states; kept by set_state
        self.closed = False
        self.conn = None          # its connection (set by the daemon)
        self.serve_scope = trio.CancelScope()
        self.wp_waiters: dict[int, trio.Event] = {}  # pages whose writer waits for writeback to end
        self._buf = AlignedBuffer(max(1, daemon.readahead) * PAGE_SIZE)
        self._last_fault = -(1 << 40)   # readahead state: previous swap-in fault, window size
        self._ra_size = 1

    # -- accounting -------------------------------------------------------

    def set_state(self, page: int, new: int) -> None:
        """Every state change goes through here: it keeps the resident counts."""
        delta = IS_RESIDENT[new] - IS_RESIDENT[self.state[page]]
        if delta:
            self.resident += delta
            self.daemon.reclaimer.resident += delta
        self.state[page] = new

    def swapped_pages(self) -> int:
        return self.state.count(SWAPPED)

    def address(self, page: int) -> int:
        return self.addr + page * PAGE_SIZE

    # -- the fault loop -------------------------------------------------------

    async def serve(self) -> None:
        """Read and serve this region's faults until cancelled or the client is gone."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self.uffd.fd)
                for event in self.uffd.read_events():
                    if isinstance(event, Pagefault):
                        await self.handle_fault(event)
        except RegionGone:
            log.info("region %d (pid %d): client memory gone", self.id, self.pid)
        except trio.ClosedResourceError:
            pass  # released under us (unmap, client exit): nothing left to serve

    async def handle_fault(self, event: Pagefault) -> None:
        page = (event.address - self.addr) // PAGE_SIZE
        if not 0 <= page < self.pages:
            log.warning("region %d: fault at %#x outside the region", self.id, event.address)
            return
        self.stats.faults += 1
        if event.is_wp:
            self.stats.wp_faults += 1
            await self.write_fault(page)
            return
        state = self.state[page]
        if state == SWAPPED:
            await self.swap_in(page, write=event.is_write)
        elif state == ABSENT:
            await self.zero_fill(page)
        elif state == POISONED:
            self._install_poison(page)  # the marker was not there yet: the thread retried
        else:
            # Already resident (another thread's fault got there first): let
            # the thread retry.
            self._ioctl(self.uffd.wake, self.address(page), PAGE_SIZE)

    def _ioctl(self, op, *args):
        """Run a uffd ioctl; the client's memory vanishing ends the region."""
        try:
            return op(*args)
        except OSError as e:
            if e.errno in GONE_ERRNOS:
                raise RegionGone() from None
            raise

    async def zero_fill(self, page: int) -> None:
        """First touch: zero pages, for the faulting page and, when faults
        walk forward, the never-touched pages after it (one ioctl: a round
        trip through the daemon costs far more than zeroing a page)."""
        await self.daemon.reclaimer.throttle()
        if self.closed or self.state[page] != ABSENT:
            return
        limit = self._window(page)
        count = 1
        while count < limit and page + count < self.pages and self.state[page + count] == ABSENT:
            count += 1
        self._fill(self.uffd.zeropage, page, count)
        for p in range(page, page + count):
            self.set_state(p, DIRTY)
            self.daemon.reclaimer.add(self, p, referenced=(p == page))
        self.stats.zero_fills += count

    # -- swap-in ------------------------------------------------------------------

    def _window(self, page: int) -> int:
        """Adapt and return the fault-ahead window size for a fault at ``page``."""
        near = abs(page - self._last_fault) <= max(2, self._ra_size)
        self._ra_size = min(self.daemon.readahead, self._ra_size * 2) if near else max(1, self._ra_size // 2)
        self._last_fault = page
        return self._ra_size

    def readahead_window(self, page: int) -> tuple[int, int]:
        """First page and count of the run to read (the kernel's swap readahead).

        The window adapts like file readahead: a fault near the previous one
        doubles it (up to ``readahead`` pages), a fault elsewhere halves it, so
        random access reads single pages and sequential access reads ahead.
        Within the window: swapped neighbours whose slots continue the faulting
        page's slot, mostly ahead of the fault.
        """
        limit = self._window(page)
        slot = self.swap_map[page]
        first, count = page, 1
        while count < limit and first > 0 and self.state[first - 1] == SWAPPED \
                and self.swap_map[first - 1] == slot - (page - first) - 1 and page - first < limit // 4:
            first -= 1
            count += 1
        last = page
        while count < limit and last + 1 < self.pages and self.state[last + 1] == SWAPPED \
                and self.swap_map[last + 1] == slot + (last + 1 - page):
            last += 1
            count += 1
        return first, count

    async def swap_in(self, page: int, *, write: bool = False) -> None:
        await self.daemon.reclaimer.throttle()
        if self.closed or self.state[page] != SWAPPED:
            return
        first, count = self.readahead_window(page)
        if not await self._read_with_retries(first, count):
            if count == 1 or not await self._read_with_retries(page, 1):
                return self._poison(page)  # (a bad neighbour must not take the faulting page down)
            first, count = page, 1
        self._install(first, count, page, dirty=write)

    async def _read_with_retries(self, first: int, count: int) -> bool:
        slot = self.swap_map[first]
        for attempt in range(1, READ_RETRIES + 1):
            try:
                await self.daemon.io.read(slot, count, self._buf)
                return True
            except OSError as e:
                self.stats.read_errors += 1
                self.daemon.note_read_error(self, e, slot, attempt)
                if e.errno == errno.ETIMEDOUT:
                    return False   # the store already waited its timeout (an NFS server that stays down)
                if attempt < READ_RETRIES:
                    await trio.sleep(0.01 * attempt)
            if self.closed:
                return False
        return False

    def _install(self, first: int, count: int, faulting: int, *, dirty: bool) -> None:
        """UFFDIO_COPY the run in.

        After a read fault the pages go in write-protected and keep their
        slots (clean, like the kernel's swap cache): evicting them again costs
        no write.  After a write fault they go in writable and their slots are
        freed at once, as the kernel does for the faulting page of a write
        fault; uswap extends that to the readahead pages, because a write
        fault here is a round trip through the daemon (tens of µs) where the
        kernel's is a page-table update, and a written neighbour is likely.

        Only this region's fault loop changes SWAPPED pages, and it was
        waiting on this very read: the run is still SWAPPED, slots unchanged.
        """
        if self.closed:
            return
        self._copy_run(first, count, 0, CopyMode.NONE if dirty else CopyMode.WP)
        for p in range(first, first + count):
            if dirty:
                self.daemon.release_slot(self.swap_map[p])
                self.swap_map[p] = -1
            self.set_state(p, DIRTY if dirty else CLEAN)
            self.daemon.reclaimer.add(self, p, referenced=(p == faulting))
        self.stats.pswpin += count
        self.daemon.stats.pswpin += count

    def _copy_run(self, page: int, count: int, buf_page: int, mode: CopyMode) -> None:
        src = self._buf.address + buf_page * PAGE_SIZE
        self._fill(lambda at, length: self.uffd.copy(at, src + (at - self.address(page)), length, mode), page, count)

    def _fill(self, op, page: int, count: int) -> None:
        """Run a fill ioctl (COPY, ZEROPAGE) over pages, finishing what it stops short of.

        EAGAIN (PartialFill) continues after the bytes done; EEXIST means a page
        is already there (a racing fault of another thread got it in): skip it.
        """
        at, end = self.address(page), self.address(page + count)
        while at < end:
            try:
                at += self._ioctl(op, at, end - at)
            except PartialFill as e:
                at += e.done
            except FileExistsError:
                self.uffd.wake(at, PAGE_SIZE)
                at += PAGE_SIZE

    def _poison(self, page: int) -> None:
        """The kernel's answer to an unreadable swap slot: SIGBUS for whoever touches it."""
        slot = self.swap_map[page]
        self.daemon.release_slot(slot)
        self.swap_map[page] = -1
        self.set_state(page, POISONED)
        self.stats.poisoned += 1
        log.error("region %d (pid %d): page %#x poisoned: slot %d unreadable", self.id, self.pid,
                  self.address(page), slot)
        self._install_poison(page)

    def _install_poison(self, page: int) -> None:
        try:
            self._ioctl(self.uffd.poison_evicted, self.address(page), PAGE_SIZE)
        except FileExistsError:
            self.uffd.wake(self.address(page), PAGE_SIZE)  # the marker is already there

    # -- first write to a clean page --------------------------------------------------

    async def write_fault(self, page: int) -> None:
        state = self.state[page]
        if state == WRITEBACK:
            # The writer waits for the write to end (wait_on_page_writeback);
            # the reclaimer then keeps the page resident.  Don't block the loop.
            self.wp_waiters.setdefault(page, trio.Event())
            self.stats.writeback_waits += 1
            self.daemon.stats.writeback_waits += 1
            self.daemon.nursery.start_soon(self._write_after_writeback, page)
        elif state == CLEAN:
            self.make_dirty(page)
        else:
            # DIRTY: already writable.  ABSENT/SWAPPED: evicted after the fault
            # was queued; the retry will be a MISSING fault.
            self._ioctl(self.uffd.wake, self.address(page), PAGE_SIZE)

    async def _write_after_writeback(self, page: int) -> None:
        event = self.wp_waiters.get(page)
        if event is not None:
            await event.wait()
        if self.closed:
            return
        try:
            await self.write_fault(page)
        except RegionGone:
            pass

    def make_dirty(self, page: int) -> None:
        """The page is about to change: its slot is stale (swap_slot_free_notify)."""
        self.daemon.release_slot(self.swap_map[page])
        self.swap_map[page] = -1
        self.set_state(page, DIRTY)
        self.daemon.reclaimer.touch(self, page)
        self._ioctl(self.uffd.write_protect, self.address(page), PAGE_SIZE, False)

    # -- teardown -------------------------------------------------------------------

    def release(self) -> None:
        """Free every slot and fd (after the region's tasks have stopped).

        Slots of pages under writeback are freed by the reclaimer when their
        write ends (it checks ``closed`` after every await).
        """
        self.closed = True
        for event in self.wp_waiters.values():
            event.set()
        for page in range(self.pages):
            state = self.state[page]
            if state in (SWAPPED, CLEAN):
                self.daemon.release_slot(self.swap_map[page])
                self.swap_map[page] = -1
            if IS_RESIDENT[state]:
                self.daemon.reclaimer.forget(self, page)
        self.daemon.reclaimer.resident -= self.resident
        self.resident = 0
        trio.lowlevel.notify_closing(self.uffd.fd)
        self.uffd.close()
        fd, self.memfd = self.memfd, -1
        os.close(fd)

    def read_pages(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """Snapshot resident pages through the memfd (never through a mapping)."""
        n = check(lib.uswap_pread_full(self.memfd, buf.ptr + buf_page * PAGE_SIZE, count * PAGE_SIZE,
                                       first * PAGE_SIZE))
        if n != count * PAGE_SIZE:
            raise OSError(errno.EIO, f"short read of the region's memfd: {n} bytes")

    def punch(self, first: int, count: int) -> None:
        check(lib.uswap_punch_hole(self.memfd, first * PAGE_SIZE, count * PAGE_SIZE))
