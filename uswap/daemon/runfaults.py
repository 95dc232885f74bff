"""A run process's faults (part of uswap.daemon.runprocess.RunProcess): what its fault thread hands to Python.

The thread (csrc/daemon/uswap_runeng.c) reads every message of the process's uffd and serves most faults in C;
through its ring (uswap.daemon.runengine) come, in order, the faults it does not serve (a page eviction holds,
a read error, EAGAIN, above the run's hard line, a fork child's first fault), every event (handled by
uswap.daemon.runevents while the thread waits) and FREED: the slot references its swap-ins dropped.  A fault
served here reads top to bottom like the kernel's do_swap_page: claim, read the slot (and the swapped pages
after it whose slots follow), install, publish.  The slot-reference bookkeeping every part of the process uses
(``_installed``, ``_unclaim``, ``_forget``) is here too.
"""

from __future__ import annotations

import errno
import logging

import trio

from uswap.core import PAGE_SIZE
from uswap.daemon.runengine import (BUSY, CLEAN, EVENT, FREED, HOLD_SLOT, INFLIGHT, SHARED, SWAPPED, entry, slot_of,
                                     state_of)
from uswap.uffd import CopyMode, Pagefault, PartialFill

PS = PAGE_SIZE
SLOW_READAHEAD = 8             # pages read per swap-in Python serves at most (fixed; the fault thread's adapts)


class RunFaults:
    """The faults and ring messages of a RunProcess (its fault thread's ``engine``, its ``table``, ``uffd``,
    ``tree`` for slot references, ``ra``: the read buffer of the swap-ins served here)."""

    async def drain(self, to_line: bool = False) -> None:
        """Handle every message of the fault thread in order; faults refused with EAGAIN wait until the ring
        is empty (R4: the event that holds mmap_changing may be behind them: retrying in place waits for
        ourselves).  ``to_line``: return as soon as the run is over its line (nothing deferred), so that
        the caller counts and reclaims; what is left waits in the ring (the hard line's throttle)."""
        deferred: list[Pagefault] = []
        rounds = 0
        while True:
            msgs = self.engine.drain()
            for kind, slot, count, ev in msgs:
                if kind == FREED:
                    self._freed(slot, count, ev)
                elif kind == EVENT:        # the thread waits for us: the table must change first (R2)
                    await self.handle(ev)
                    self.engine.resume()
                elif not await self.fault(ev, timed_out=slot == -errno.ETIMEDOUT):   # slot: the thread's -errno
                    deferred.append(ev)
            if msgs:
                if to_line and not deferred and self.tree.resident > self.tree.line():
                    return
                continue
            deferred = [ev for ev in deferred if not await self.fault(ev)]
            if not deferred:
                return
            rounds += 1
            await trio.sleep(0 if rounds < 10 else 0.0005)   # a program thread is finishing its event

    async def fault(self, ev: Pagefault, *, timed_out: bool = False) -> bool:
        """A fault the thread did not serve (read error, a page eviction holds, EAGAIN, above the hard line,
        a store Python reads, a fork child's first); False if it must be retried after the ring is read."""
        a = ev.address & ~(PS - 1)
        t = self.table
        if self.pid is None:
            self.learn_pid(ev.thread_id)
        if ev.is_wp:
            e = t.get(a)
            clean = bool(e) and state_of(e) == CLEAN
            if e and state_of(e) != SWAPPED and not clean:   # R3: an eviction of a written page is cancelled
                t.set(a, 0)
                if state_of(e) == INFLIGHT:
                    self.tree.unref(slot_of(e))
                self.stats.cancelled += state_of(e) != SHARED
            try:
                self.uffd.write_protect(a, PS, protect=False)
            except OSError as err:
                if err.errno == errno.EAGAIN:   # still protected: a CLEAN page stays so
                    self.stats.eagain += 1
                    return False
                self._wake(a)
            # R7: no await since the un-protect; its slot is stale.  Unless the fault thread lifted it
            # first (another thread's write), under the table's lock, and dropped the reference itself (FREED).
            if clean and t.swap(a, e, 0):
                self.tree.unref(slot_of(e))
                self.stats.clean_written += 1
            self.stats.wp_faults += 1
            return True
        e = t.claim(a)
        if e == -errno.EBUSY:              # the thread is swapping it in: retried once it is in
            return False
        if e < 0:                          # not swapped: a zero page (R2: nothing holds a slot for it)
            return self._fill(a, lambda: self.uffd.zeropage(a, PS), "zero_fills")
        slot = slot_of(e)
        # A set of several servers: the thread's window may have waited for another server than this slot's;
        # the page is read alone, once, then (it is its own server) poisoned without another read.
        alone = timed_out and not self.daemon.store.timeout_fails_every_slot
        timed_out = timed_out and not alone
        n = 1                              # readahead: the swapped pages after it whose slots follow its slot
        while not alone and n < SLOW_READAHEAD and t.swap(a + n * PS, entry(SWAPPED, slot + n), entry(SWAPPED, slot + n) | BUSY):
            n += 1
        try:
            if timed_out:   # the thread's read waited all of the store's timeout (nfs://): no second wait
                raise OSError(errno.ETIMEDOUT, "the store did not answer the fault thread's read within its timeout")
            await self.daemon.io.read(slot, n, self.ra)
        except OSError as err:
            self._unclaim(a + PS, slot + 1, n - 1)
            n = 1
            try:
                if timed_out or alone:
                    raise
                await self.daemon.io.read(slot, 1, self.ra)
            except OSError:
                self.daemon.stats.read_errors += 1
                self.daemon.note_poisoned(f"run {self.id} (pid {self.pid})", a, slot, err)
                if self._fill(a, lambda: self.uffd.poison(a, PS), "poisoned"):
                    self._installed(a, slot, 1)
                    return True
                self._unclaim(a, slot, 1)
                return False
        # A read installs it write-protected and CLEAN (R7), a write writable, its slot freed.
        mode = CopyMode.NONE if ev.is_write else CopyMode.WP
        if not self._fill(a, lambda: self.uffd.copy(a, self.ra.address, PS, mode), "pswpin"):
            self._unclaim(a, slot, n)
            return False
        self._installed(a, slot, 1, clean=not ev.is_write)
        self.daemon.stats.pswpin += 1
        for i in range(1, n):              # no fault waits on these: EAGAIN or EEXIST ends the window
            try:
                self.uffd.copy(a + i * PS, self.ra.address + i * PS, PS, CopyMode.WP)
            except OSError:                # events pending (mmap_changing), or the range changed
                self._unclaim(a + i * PS, slot + i, n - i)
                break
            self._installed(a + i * PS, slot + i, 1, clean=True)
            self.stats.pswpin += 1
            self.stats.readahead_pages += 1
            self.daemon.stats.pswpin += 1
            self.engine.add_filled(1)
        return True

    def _fill(self, a: int, op, counter: str) -> bool:
        """Install page a (the op wakes the fault); False if it must be retried (EAGAIN)."""
        try:
            op()
        except PartialFill:
            self.stats.eagain += 1
            return False
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ESRCH):   # ESRCH: the process is gone; ENOENT: the range
                self.daemon.log_limited("runfill", logging.WARNING, "run %d (pid %d): fill of %#x: %s",
                                        self.id, self.pid, a, e.strerror)
            self._wake(a)
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.engine.add_filled(1)
        return True

    def _freed(self, slot: int, count: int, swapped_in: int) -> None:
        """The fault thread dropped this process's references to slots slot.. (count) and swapped in
        ``swapped_in`` pages."""
        for s in range(slot, slot + count):
            self.tree.unref(s)
        self.daemon.stats.pswpin += swapped_in

    def _installed(self, a: int, slot: int, n: int, clean: bool = False) -> None:
        """Pages a.. (claimed) are in: CLEAN with their slots if installed write-protected (``clean``), else
        their entries and this process's references to their slots go."""
        for i in range(n):
            if clean:
                self.table.set(a + i * PS, entry(CLEAN, slot + i))
            else:
                self.table.set(a + i * PS, 0)
                self.tree.unref(slot + i)

    def _unclaim(self, a: int, slot: int, n: int) -> None:
        for i in range(n):
            self.table.set(a + i * PS, entry(SWAPPED, slot + i))

    def _wake(self, a: int) -> None:
        try:
            self.uffd.wake(a, PS)
        except OSError:
            pass

    def _forget(self, e: int) -> None:
        """An entry taken out of the table: the reference its slot held (SWAPPED, INFLIGHT, CLEAN) goes."""
        if state_of(e) in HOLD_SLOT:
            self.tree.unref(slot_of(e))

