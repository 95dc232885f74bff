"""One client region: its swap map, its fault engine, and the faults Python serves.

The region's C fault threads (uswap.daemon.engine) read every fault of the
region and serve the common ones: swap-in from a local store with a
readahead window, zero-fill of first touches, the first write to a clean
page.  They tell this object what they did through one ring (resident runs
for the CLOCK, slots to free) and forward everything else, a page's forwarded
faults in any order (each is served from the map as it is when served: see
``post`` in csrc/daemon/uswap_engine.c).  The forwarded faults are served here, reading top to bottom like the kernel's fault path:
``handle_fault`` decides (do_swap_page / do_wp_page), ``swap_in`` does the
I/O with a readahead window (swap_readpage) and installs the pages clean and
write-protected, so they keep their slots until first written.

Page states and the swap map: uswap.daemon.swapmap.  Python changes a page
only after claiming its BUSY bit (``claim``), and only from the trio thread;
``held`` is the set of pages this region's Python code holds, so a fault on
one of them waits for ``released`` while a fault on a page the engine holds
(for the length of one install) just retries.  Pages are read through
``pread`` on the memfd, never through a mapping (touching a punched page
through a mapping would allocate it).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

import trio

from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.daemon.engine import DIRTIED, FORWARD, INSTALLED, ZEROED, Engine
from uswap.daemon.swapmap import (ABSENT, BUSY, CLEAN, DIRTY, POISONED, SWAPPED, WRITEBACK, SwapMap, slot_of,
                                  state_of)
from uswap.uffd import CopyMode, FaultFlag, Pagefault, PartialFill, Userfaultfd

log = logging.getLogger("uswap.region")

READ_RETRIES = 3      # reads of a window that fail (EIO), with a backoff between them
# A slot that fails verification (crc32c or seal: EBADMSG; ENODATA: not written since the store opened) is not
# read again as it was: the faulting page alone is read once more (a neighbour in the window may be the bad
# one), and if that fails too the page is poisoned at once.  Waiting does not mend a corrupted slot.
CORRUPT_ERRNOS = (errno.EBADMSG, errno.ENODATA)
PROBE_PAGES = 512     # clean swap-ins over which the install-dirty policy measures writes
DIRTY_SHARE = 0.75    # written share of them above which swap-ins go in writable
DIRTY_SPAN = 8192     # writable swap-ins before measuring again
ENGINE_HOLD_POLL = 0.0002   # a page the engine holds is free again within one install
# The client's memory is gone (exit, munmap, kill): stop serving, quietly.
GONE_ERRNOS = (errno.ESRCH, errno.ENOENT, errno.EFAULT, errno.EINVAL)


class RegionGone(Exception):
    """The client's memory is gone (its process exited or was killed)."""


@dataclass
class RegionStats:
    zero_fills: int = 0
    wp_faults: int = 0
    writeback_waits: int = 0   # writes that had to wait for their page's writeback to end
    throttled: int = 0         # faults held at the hard budget line, then handed back to the engine
    pswpin: int = 0
    pswpout: int = 0
    read_errors: int = 0
    write_errors: int = 0
    poisoned: int = 0


class Region:
    def __init__(self, rid: int, uffd: Userfaultfd, memfd: int, addr: int, length: int, *,
                 pid: int, uid: int, memfd_id: tuple[int, int], conn, connection: trio.CancelScope,
                 nursery: trio.Nursery, daemon):
        self.id = rid
        self.uffd = uffd
        self.memfd = memfd
        self.addr = addr
        self.length = length
        self.pages = length // PAGE_SIZE
        self.pid = pid
        self.uid = uid
        self.memfd_id = memfd_id  # (st_dev, st_ino): one region per memfd
        self.daemon = daemon      # store, slot I/O, allocator, reclaimer, readahead
        self.conn = conn          # its connection's socket (DETACH goes there)
        self.connection = connection  # cancelling it ends the connection, and so the region
        self.nursery = nursery    # the connection's: tasks that wait die with it
        self.stats = RegionStats()
        self.closed = False
        self.quiesced = False     # engine stopped for swapoff: Python serves nothing more either
        self.serve_scope = trio.CancelScope()
        self.map = SwapMap(self.pages, daemon.reclaimer.budget)
        self.held: set[int] = set()
        self.released = trio.Event()   # set (and replaced) whenever Python publishes a page it held
        self.wp_waiters: dict[int, trio.Event] = {}  # pages whose writer waits for writeback to end
        self._bufs: list[AlignedBuffer] = []   # free read buffers: one per swap-in in flight, never shared
        self.install_dirty = False      # the install-dirty policy's state (_installed)
        self._since_decision = 0
        self._dirtied = 0
        self._last_fault = -(1 << 40)   # readahead state of the Python path: previous fault, window size
        self._ra_size = 1
        self.engine = Engine(self.map, uffd=uffd.fd, memfd=memfd, addr=addr, store_fd=daemon.store_fd,
                             codec=daemon.codec_c, slots=daemon.slots,
                             readahead=daemon.readahead, threads=daemon.fault_threads)

    # -- accounting -------------------------------------------------------

    @property
    def resident(self) -> int:
        return self.map.resident

    def swapped_pages(self) -> int:
        return self.map.count(SWAPPED)

    def address(self, page: int) -> int:
        return self.addr + page * PAGE_SIZE

    def engine_stats(self) -> dict:
        """The fault counts: every fault of the region is read by its engine, which serves it in C
        (engine_faults) or forwards it to Python (slow_path_faults), so faults is their sum."""
        s = self.engine.stats() if self.engine.c is not None else None
        engine, forwarded = (s.engine_faults, s.forwarded) if s else (0, 0)
        return {"faults": engine + forwarded, "engine_faults": engine, "slow_path_faults": forwarded,
                "readahead_pages": s.readahead if s else 0}

    # -- claims (Python's side of the BUSY bit) ----------------------------------

    def claim(self, page: int) -> int | None:
        entry = self.map.claim(page)
        if entry is not None:
            self.held.add(page)
        return entry

    def publish(self, page: int, state: int, slot: int = -1, *, referenced: int = -1) -> None:
        self.map.publish(page, state, slot, referenced=referenced)
        self.end_claims((page,))

    def end_claims(self, pages) -> None:
        """Pages Python held were published (here, or by a C call): wake who waits for them."""
        self.held.difference_update(pages)
        self.released.set()
        self.released = trio.Event()

    def unclaim(self, page: int) -> None:
        entry = self.map.entry(page)
        self.publish(page, state_of(entry), slot_of(entry))

    async def wait_unclaimed(self, page: int) -> int:
        """The page's entry once nobody holds it (Python's holds end with ``released``)."""
        while True:
            if self.closed:
                raise RegionGone()
            entry = self.map.entry(page)
            if not entry & BUSY:
                return entry
            if page in self.held:
                await self.released.wait()
            else:
                await trio.sleep(ENGINE_HOLD_POLL)

    # -- what the engine did --------------------------------------------------------

    async def serve(self) -> None:
        """Take the engine's messages until cancelled or the client is gone."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self.engine.notify_fd)
                if self.closed:
                    return     # released while this task was scheduled to run
                try:
                    os.read(self.engine.notify_fd, 8)
                except BlockingIOError:
                    pass
                self.take_messages()
        except trio.ClosedResourceError:
            pass  # released under us (unmap, client exit): nothing left to serve

    def take_messages(self) -> None:
        """Account what the engine did and start a task for each fault it forwarded.
        The reclaimer calls this too, before it picks victims and allocates slots
        (so it never waits here: a forwarded fault may wait for reclaim)."""
        if self.closed:
            return
        for kind, first, count, faulting, slot, address, flags in self.engine.drain():
            if kind == FORWARD:   # slot: why the engine did not serve it (-errno)
                if not self.connection.cancel_called:   # else the connection is ending: nothing to serve
                    self.nursery.start_soon(self.serve_forwarded, Pagefault(address, FaultFlag(flags), 0), -slot)
            elif self._account(kind, count):
                self.daemon.reclaimer.add_span(self, first, count)

    def _account(self, kind: int, count: int) -> bool:
        """Counters for one message; True if it made a span resident."""
        if kind == INSTALLED:
            self.stats.pswpin += count
            self.daemon.stats.pswpin += count
            self._installed(count)
            return True
        if kind == ZEROED:
            self.stats.zero_fills += count
            return True
        if kind == DIRTIED:
            self.stats.wp_faults += 1
            self._dirtied += 1
        return False

    def _installed(self, count: int) -> None:
        """The install-dirty policy (do_swap_page's choice of a writable PTE, per region):
        when nearly every page swapped in clean is written soon after, a write fault per
        page costs more than rewriting the few that were not, so swap-ins go in writable.
        Measured over PROBE_PAGES clean installs; after DIRTY_SPAN writable ones, measure again."""
        self._since_decision += count
        if self.install_dirty:
            if self._since_decision >= DIRTY_SPAN:
                self._set_install_dirty(False)
        elif self._since_decision >= PROBE_PAGES:
            self._set_install_dirty(self._dirtied >= DIRTY_SHARE * self._since_decision)

    def _set_install_dirty(self, on: bool) -> None:
        self.install_dirty = on
        self._since_decision = self._dirtied = 0
        self.engine.set_install_dirty(on)

    async def serve_forwarded(self, event: Pagefault, why: int) -> None:
        """A task per forwarded fault (it may wait: throttling, a writeback, a read).
        Every await below is followed by a look at ``closed``: the region may be
        released meanwhile, and then its map and fds are gone.

        A fault the engine refused only for the hard budget line (ENOMEM) is
        throttled here and then handed back: the thread is woken, faults again
        and the engine serves it, unless resident memory is still at the line
        (reclaim paused by store errors), when Python serves it itself."""
        try:
            if self.closed:
                return
            if why == errno.ENOMEM:
                reclaimer = self.daemon.reclaimer
                await reclaimer.throttle()
                if self.closed:
                    return
                if reclaimer.resident < reclaimer.budget.hard:
                    self.stats.throttled += 1
                    self.daemon.stats.throttled += 1
                    return self._ioctl(self.uffd.wake, event.address & ~(PAGE_SIZE - 1), PAGE_SIZE)
            # The engine's read did not verify (that was the first read), or its store (nfs://) did not answer
            # for all of its timeout (a second wait would double the faulting thread's).
            failed = why if why in CORRUPT_ERRNOS or why == errno.ETIMEDOUT else 0
            if failed:
                self.stats.read_errors += 1
                self.daemon.stats.read_errors += 1
            await self.handle_fault(event, read_failed=failed)
        except RegionGone:
            self.daemon.end_region(self, "its client's memory is gone", level=logging.INFO)

    # -- the faults Python serves -----------------------------------------------------

    async def handle_fault(self, event: Pagefault, *, read_failed: int = 0) -> None:
        """``read_failed``: the errno of the engine's failed read for this fault, or 0 (swap_in)."""
        page = (event.address - self.addr) // PAGE_SIZE
        if not 0 <= page < self.pages:
            self.daemon.log_limited(f"outside {self.id}", logging.WARNING, "region %d: fault at %#x outside the "
                                    "region", self.id, event.address)
            return
        entry = self.map.entry(page)
        if event.is_wp and state_of(entry) == WRITEBACK or entry & BUSY:
            await self._handle_when_unclaimed(event, page, read_failed)   # a writeback or another holder first
        else:
            await self._handle(event, page, read_failed)

    async def _handle_when_unclaimed(self, event: Pagefault, page: int, read_failed: int = 0) -> None:
        if event.is_wp and self.map.state(page) == WRITEBACK:
            await self.wait_for_writeback(page)
            if self.closed:
                raise RegionGone()
        await self.wait_unclaimed(page)
        await self._handle(event, page, read_failed)

    async def _handle(self, event: Pagefault, page: int, read_failed: int = 0) -> None:
        if self.quiesced or self.closed:
            return   # swapoff: the pages go back into the memfd, the client unregisters
        state = self.map.state(page)
        if event.is_wp:
            self.stats.wp_faults += 1
            await self.write_fault(page)
        elif state == SWAPPED:
            await self.swap_in(page, write=event.is_write, read_failed=read_failed)
        elif state == ABSENT:
            await self.zero_fill(page)
        elif state == POISONED:
            self._install_poison(page)  # the marker was not there yet: the thread retried
        else:
            # Already resident (another thread's fault got there first): let the thread retry.
            self._ioctl(self.uffd.wake, self.address(page), PAGE_SIZE)

    def _ioctl(self, op, *args):
        """Run a uffd ioctl; the client's memory vanishing ends the region."""
        try:
            return op(*args)
        except OSError as e:
            if e.errno in GONE_ERRNOS:
                raise RegionGone() from None
            raise

    def _claim_run(self, page: int, want: int, ok) -> tuple[int, int] | None:
        """Claim page and the pages after it (up to ``want``) whose entries satisfy ``ok(entry, k)``.

        (first, count), or None if the page itself is held or no longer ok."""
        entry = self.claim(page)
        if entry is None:
            return None
        if not ok(entry, 0):
            self.unclaim(page)
            return None
        count = 1
        while count < want and page + count < self.pages:
            entry = self.claim(page + count)
            if entry is None:
                break
            if not ok(entry, count):
                self.unclaim(page + count)
                break
            count += 1
        return page, count

    async def zero_fill(self, page: int) -> None:
        """First touch: zero pages, for the faulting page and, when faults walk
        forward, the never-touched pages after it (one ioctl)."""
        await self.daemon.reclaimer.throttle()
        if self.closed:
            return
        run = self._claim_run(page, self._window(page), lambda e, k: state_of(e) == ABSENT)
        if run is None:
            return self._ioctl(self.uffd.wake, self.address(page), PAGE_SIZE)
        first, count = run
        try:
            self._fill(self.uffd.zeropage, first, count)
        except BaseException:
            for p in range(first, first + count):
                self.unclaim(p)
            raise
        for p in range(first, first + count):
            self.publish(p, DIRTY, referenced=int(p == page))
        self.stats.zero_fills += count
        self.daemon.reclaimer.add_span(self, first, count)

    # -- swap-in ------------------------------------------------------------------

    def _window(self, page: int) -> int:
        """Adapt and return the fault-ahead window size for a fault at ``page``."""
        near = abs(page - self._last_fault) <= max(2, self._ra_size)
        self._ra_size = min(self.daemon.readahead, self._ra_size * 2) if near else max(1, self._ra_size // 2)
        self._last_fault = page
        return self._ra_size

    async def swap_in(self, page: int, *, write: bool = False, read_failed: int = 0) -> None:
        """do_swap_page for a page the engine did not serve: claim the readahead
        run (SWAPPED pages whose slots continue the faulting page's), read it
        (with retries for I/O errors), else the faulting page alone, install it;
        an unreadable faulting page is poisoned.  ``read_failed``: the errno of
        the engine's read of its window: one that did not verify (CORRUPT_ERRNOS)
        means the faulting page alone is read, once; ETIMEDOUT (a remote store
        that did not answer for its whole timeout) poisons it at once, unless the
        window may have waited for another server than the page's (a store set:
        ``timeout_fails_every_slot``): then the window's slots on the page's
        server are read, and only a timeout of that read poisons it at once."""
        await self.daemon.reclaimer.throttle()
        if self.closed:
            return
        slot = slot_of(self.map.entry(page))
        store = self.daemon.store
        # A store set's window that timed out may have waited for another server: this slot's part of it is read.
        elsewhere = read_failed == errno.ETIMEDOUT and not store.timeout_fails_every_slot
        window = store.slots_on_one_server(slot, self._window(page)) if elsewhere else \
            1 if read_failed else self._window(page)
        run = self._claim_run(page, window, lambda e, k: state_of(e) == SWAPPED and slot_of(e) == slot + k)
        if run is None:
            return self._ioctl(self.uffd.wake, self.address(page), PAGE_SIZE)
        first, count = run
        if read_failed == errno.ETIMEDOUT and not elsewhere:   # count is 1: the faulting page alone was claimed
            return self._poison(page, slot, OSError(errno.ETIMEDOUT, "the store did not answer the fault engine's "
                                                                     "read within its timeout", self.daemon.store.path))
        # Invariant: a buffer belongs to one swap-in from here to the install; other
        # swap-ins of this region run while this one awaits its read.
        buf = self._bufs.pop() if self._bufs else AlignedBuffer(max(1, self.daemon.readahead) * PAGE_SIZE)
        try:
            error = await self._read_with_retries(slot, count, buf)
            if self.closed:
                return
            if error and not read_failed:
                for p in range(first + 1, first + count):
                    self.unclaim(p)   # a bad neighbour must not take the faulting page down
                count = 1
                error = await self._read_with_retries(slot, 1, buf)
                if self.closed:
                    return
            elif error and count > 1:     # elsewhere: this server's part of the window failed too
                for p in range(first + 1, first + count):
                    self.unclaim(p)
                count = 1
                if error.errno != errno.ETIMEDOUT:      # a timeout is the page's own server's: no second wait
                    error = await self._read_with_retries(slot, 1, buf)
                    if self.closed:
                        return
            if error:
                return self._poison(page, slot, error)
            self._install(first, count, page, slot, buf, dirty=write)
        except BaseException:
            if not self.closed:
                for p in range(first, first + count):
                    if p in self.held:
                        self.unclaim(p)
            raise
        finally:
            self._bufs.append(buf)

    async def _read_with_retries(self, slot: int, count: int, buf: AlignedBuffer) -> OSError | None:
        """Read slots slot.. into buf: None, or the last error once retrying is pointless."""
        for attempt in range(1, READ_RETRIES + 1):
            try:
                await self.daemon.io.read(slot, count, buf)
                return None
            except OSError as e:
                error = e
                self.stats.read_errors += 1
                self.daemon.note_read_error(self, e, slot, attempt)
                if e.errno == errno.ETIMEDOUT or e.errno in CORRUPT_ERRNOS:
                    return e   # the store already waited its timeout (an NFS server that stays down); a bad slot
                if attempt < READ_RETRIES:
                    await trio.sleep(0.01 * attempt)
            if self.closed:
                return error
        return error

    def _install(self, first: int, count: int, faulting: int, slot: int, buf: AlignedBuffer, *, dirty: bool) -> None:
        """UFFDIO_COPY the run in.

        After a read fault the pages go in write-protected and keep their
        slots (clean, like the kernel's swap cache): evicting them again costs
        no write.  After a write fault they go in writable and their slots are
        freed at once (the engine does the same).  The run is ours (claimed):
        still SWAPPED, slots unchanged.
        """
        src = buf.address
        self._fill(lambda at, length: self.uffd.copy(at, src + (at - self.address(first)), length,
                                                      CopyMode.NONE if dirty else CopyMode.WP), first, count)
        for k, p in enumerate(range(first, first + count)):
            if dirty:
                self.daemon.release_slot(slot + k)
            self.publish(p, DIRTY if dirty else CLEAN, -1 if dirty else slot + k, referenced=int(p == faulting))
        self.stats.pswpin += count
        self.daemon.stats.pswpin += count
        self.daemon.reclaimer.add_span(self, first, count)

    def _fill(self, op, page: int, count: int) -> None:
        """Run a fill ioctl (COPY, ZEROPAGE) over pages, finishing what it stops short of.

        EAGAIN (PartialFill) continues after the bytes done; EEXIST means a page
        is already there: skip it.
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

    def _poison(self, page: int, slot: int, error: OSError) -> None:
        """The kernel's answer to an unreadable swap slot: SIGBUS for whoever touches it."""
        self.daemon.release_slot(slot)
        self.publish(page, POISONED)
        self.stats.poisoned += 1
        self.daemon.note_poisoned(f"region {self.id} (pid {self.pid})", self.address(page), slot, error)
        self._install_poison(page)

    def _install_poison(self, page: int) -> None:
        try:
            self._ioctl(self.uffd.poison_evicted, self.address(page), PAGE_SIZE)
        except FileExistsError:
            self.uffd.wake(self.address(page), PAGE_SIZE)  # the marker is already there

    # -- first write to a clean page --------------------------------------------------

    async def wait_for_writeback(self, page: int) -> None:
        """wait_on_page_writeback: the reclaimer keeps the page resident for us."""
        event = self.wp_waiters.setdefault(page, trio.Event())
        self.stats.writeback_waits += 1
        self.daemon.stats.writeback_waits += 1
        await event.wait()

    async def write_fault(self, page: int) -> None:
        entry = self.claim(page)
        if entry is None:   # claimed since we looked: try again once it is free
            return await self._handle_when_unclaimed(Pagefault(self.address(page), FaultFlag.WP, 0), page)
        state = state_of(entry)
        if state == CLEAN:
            return self.make_dirty(page, slot_of(entry))
        self.unclaim(page)
        if state == DIRTY:
            # Writable by definition: lift a WP bit left on it (as the engine does).
            self._ioctl(self.uffd.write_protect, self.address(page), PAGE_SIZE, False)
        else:
            # ABSENT/SWAPPED: evicted after the fault was queued; the retry will be a
            # MISSING fault.  POISONED: the retry gets SIGBUS.
            self._ioctl(self.uffd.wake, self.address(page), PAGE_SIZE)

    def make_dirty(self, page: int, slot: int) -> None:
        """The claimed clean page is about to change: its slot is stale (swap_slot_free_notify)."""
        try:
            self._ioctl(self.uffd.write_protect, self.address(page), PAGE_SIZE, False)
        except BaseException:
            self.unclaim(page)
            raise
        self.daemon.release_slot(slot)
        self.publish(page, DIRTY, referenced=1)

    # -- teardown -------------------------------------------------------------------

    def quiesce(self) -> None:
        """Stop the engine's threads (all have returned when this returns); the fault
        loop must be cancelled already.  Faults then wait in the kernel."""
        self.quiesced = True
        self.engine.stop()

    def release(self) -> None:
        """Free every slot and fd (after the region's tasks have stopped).

        The engine is stopped first, so no thread touches the map or the fds
        below.  Slots of pages under writeback are freed by the reclaimer when
        their write ends (it checks ``closed`` after every await).
        """
        self.closed = True
        self.engine.stop()
        for kind, first, count, faulting, slot, address, flags in self.engine.drain():
            self._account(kind, count)
        for event in self.wp_waiters.values():
            event.set()
        for page in range(self.pages):
            entry = self.map.entry(page)
            if state_of(entry) in (SWAPPED, CLEAN):
                self.daemon.release_slot(slot_of(entry))
        trio.lowlevel.notify_closing(self.engine.notify_fd)   # the serve task may be waiting on it
        self.engine.close()
        self.map.close()
        self.released.set()
        trio.lowlevel.notify_closing(self.uffd.fd)
        self.uffd.close()
        fd, self.memfd = self.memfd, -1
        os.close(fd)

