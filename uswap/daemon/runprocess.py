"""A process of a run (`uswap run -- CMD`, issue 12): the daemon swaps an unmodified process through its own uffd.

Each process has a fault thread (csrc/daemon/uswap_runeng.c, uswap.daemon.runengine), the only reader of its
uffd: swap-ins (with readahead of the swapped pages after the faulting one whose slots follow its slot),
zero-fills and first writes are served in C from the process's page table (csrc/daemon/uswap_pt.c); the rest
comes to Python in order through a ring: faults the thread does not serve, and every event, which the thread
waits on until the process's trio task has applied it to the table.  That task (``RunProcess.serve``) handles
those, counts and evicts (address order from where the last pass stopped, not a CLOCK).  What runs share with
memfd regions is the store, its slot allocator and codec, the daemon's counters and the budget.

``RunProcess`` is one object (every concern reads its table, uffd, run and counters); its methods live in a
module per concern:
- here: its lifetime (made by the handshake or a fork, the serve loop with its tick's rescan and count, swapoff
  at a graceful stop, release) and its share of the run's budget;
- uswap.daemon.runfaults (``RunFaults``): the fault thread's ring, the faults it hands over, slot references;
- uswap.daemon.runevents (``RunEvents``): REMOVE, UNMAP, REMAP, FORK, and fork children nobody serves;
- uswap.daemon.runreclaim (``RunReclaim``): counting present pages and eviction (claim, slot write, DROP).
Its run (the process tree, its budget line, slot references shared since a fork) is uswap.daemon.runtree, the
handshake that makes it uswap.daemon.runaccept, the wire messages uswap.daemon.runproto.

Page state, per process, in its table: SWAPPED (out of the process, its data in the slot), CLAIMED
(chosen by eviction, no slot yet), INFLIGHT (written to its slot, still resident and write-protected,
not yet dropped by the agent), SHARED (the agent's MOVE refused it), CLEAN (swapped in by a read or by
readahead: resident, write-protected, equal to the slot it keeps, as the kernel's swap cache).  An address
with no entry is resident or never touched.  The invariants are DESIGN.md's R1-R7 ("Runs"), cited by
number where the code relies on them.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import trio

from uswap._core import lib
from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.daemon.procimage import ImageChanged, ProcessImage
from uswap.daemon.runengine import CLEAN, FREED, HOLD_SLOT, SHARED, SWAPPED, PageTable, RunEngine, slot_of
from uswap.daemon.runevents import RunEvents
from uswap.daemon.runfaults import SLOW_READAHEAD, RunFaults
from uswap.daemon.runproto import message
from uswap.daemon.runreclaim import RunReclaim
from uswap.daemon.runwatch import POLL, RssWatch
from uswap.protocol import ProtocolError
from uswap.uffd import Fork, RegisterMode, Userfaultfd

if TYPE_CHECKING:
    from uswap.daemon.runtree import Run

log = logging.getLogger("uswap.daemon")

PS = PAGE_SIZE
READAHEAD = 32                 # pages read per swap-in at most (the fault thread's window adapts up to it)
TICK = 0.01                    # rescan and budget check
COUNT_EVERY = 0.1              # a whole pagemap count at least this often (between: the estimate, reclaim)
RECOUNT = 0.002                # between two pagemap counts at least
IDLE_POLLS = 10                # an idle process wakes every IDLE_POLLS * POLL (= TICK): its RSS, its EOF
_MAPS = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)[ \t]*(.*)$", re.M)


@dataclass
class RunStats:
    pswpin: int = 0
    pswpout: int = 0               # pages written to slots
    dropped: int = 0               # pages the agent moved out (written for it, or CLEAN: no write)
    clean_written: int = 0         # CLEAN pages written (their slots freed); the fault thread's added in counts()
    zero_fills: int = 0
    wp_faults: int = 0
    poisoned: int = 0
    registered: int = 0
    remove: int = 0
    unmap: int = 0
    remap: int = 0
    fork: int = 0
    eagain: int = 0
    ebusy: int = 0
    enoent: int = 0
    cancelled: int = 0
    drops: int = 0
    other_refusals: int = 0
    readahead_pages: int = 0       # swapped in without a fault of their own (in pswpin too)
    no_room: int = 0               # eviction batches cut short: no store room (regions' reservations, uid limit)
    overwrites: int = 0            # a REMAP onto a swapped page (an invariant broke: counted, never leaked)
    forks_refused: int = 0         # fork children not served (over a bound: runpolicy; refuse_fork)
    max_resident_pages: int = 0
    growth_counts: int = 0         # counts started by unexplained RSS growth (runwatch), not the tick


class RunProcess(RunFaults, RunEvents, RunReclaim):
    """One process image of a run: on its own connection (exec gives a new one: a process is never keyed by
    pid), or a fork child, known first by the uffd fork made (its pid comes with its first fault).  Whole at
    construction: every attribute its parts (RunFaults, RunEvents, RunReclaim) use is set here."""

    def __init__(self, id: int, image: ProcessImage | None, sock, uffd: Userfaultfd, *, tree: Run,
                 excluded: tuple = (), doorbell: int = 0, proof: int = 0, nonce: bytes = b"",
                 parent: int | None = None):
        self.id, self.pid, self.uid = id, None, tree.uid
        self.tree = tree
        self.parent = parent                       # pid of the process it was forked from
        self.sock = sock                           # None: a fork child before its HELLO (or a raw fork's)
        self.uffd = uffd
        self.excluded = excluded                   # never registered: the agent's own memory
        self.doorbell = doorbell
        self.proof, self.nonce = proof, nonce      # the proof page and the nonce it holds (procimage, rule 3)
        self.daemon = tree.daemon
        self.image: ProcessImage | None = None     # every read of the process goes through it (procimage)
        self.image_gone = False                    # its mm is gone or it may not be read any more: stop
        self.watch: RssWatch | None = None         # growth behind our back: rescan before the tick
        # The pages that are not plainly resident (swapped, chosen by eviction, in flight, shared), and
        # the thread that serves the process's faults from it (uswap.daemon.runengine).  A fork child
        # (pid unknown) has its faults forwarded until its first one names it.
        self.table = PageTable()
        d = self.daemon
        try:
            self.engine = RunEngine(self.table, tree.budget, uffd=uffd.fd, store_fd=d.store_fd, codec=d.codec_c,
                                    readahead=READAHEAD, forward_all=image is None)
        except OSError:                            # no thread or fd for it (the caller refuses the process)
            self.table.close()
            raise
        if image is not None:
            try:
                self.attach(image)
            except OSError:
                self.engine.close()
                self.table.close()
                raise
        self.ranges: list[tuple[int, int]] = []    # registered, as /proc/PID/maps showed them at the last rescan
        self.idle = False                          # the last tick found nothing to do: poll less often
        self.evicted = 0                           # pages the agent moved out in the last reclaim pass
        self.stuck_until = 0.0                     # a pass evicted nothing: no more passes before this
        tree.members.append(self)                  # before any reference it takes (slots_held)
        self.resident = 0                          # registered present pages at the last pagemap count
        self.counted = 0.0                         # when (trio clock)
        self.cursor = 0                            # where the next reclaim pass starts (runreclaim)
        self.stats = RunStats()
        self.ra = AlignedBuffer(SLOW_READAHEAD * PS)   # the swap-ins Python serves read here (runfaults)
        self.detach = False                        # the daemon is stopping: read everything back, unregister
        self.agent_gone = False                    # a DROP went unanswered: stop serving (see drop)
        self.done = trio.Event()
        self.fork_refusal: str | None = None       # why the last fork child was not served (refuse_fork)

    def attach(self, image: ProcessImage) -> None:
        """Take the verified image: eviction, counting and rescans read through it only."""
        self.watch = RssWatch(image.pid)
        self.image, self.pid = image, image.pid

    def readable(self) -> bool:
        """Before a batch of reads of the process (procimage, rule 4): whether it is still the image verified.
        If not, nothing more is read: a process that may not be read any more gets its pages back and goes on
        unbudgeted (detach); one whose mm is gone (exec, exit) is no longer served."""
        if self.image is None or self.image_gone or self.detach:
            return False
        try:
            self.image.check()
        except ImageChanged as e:
            gone = e.errno != errno.EPERM
            log.warning("run %d (pid %d): %s; %s", self.id, self.pid, e.strerror,
                        "no longer served" if gone else "nothing more is read: its pages go back, it runs unbudgeted")
            self.image_gone, self.detach = gone, not gone
            return False
        return True

    # -- the budget ---------------------------------------------------------------

    def over_line(self) -> int:
        """Pages this process should give up: its share of what the run holds above its line."""
        total, line = self.tree.resident, self.tree.line()
        if total <= line:
            return 0
        mine = self.resident + self.filled
        return -(-(total - line * 7 // 8) * mine // total)

    def slot_room(self) -> int:
        """Slots this process may still take: the store is not overcommitted (memfd regions reserve their
        whole size, runs take what is left), and a limited uid's runs and regions together stay within
        --user-max-size."""
        d = self.daemon
        room = d.store.slot_count - d.mapped_pages - d.run_slots_held()
        limits = d.ledger.limits
        if self.uid != limits.exempt_uid:
            mapped = d.ledger.usage[self.uid].pages if self.uid in d.ledger.usage else 0
            room = min(room, limits.max_pages - mapped - d.run_slots_held(self.uid))
        return room

    @property
    def slots_held(self) -> int:
        return sum(self.table.count(s) for s in HOLD_SLOT)

    @property
    def filled(self) -> int:
        """Pages faulted in since the last count (by the fault thread and by Python)."""
        return self.engine.filled

    # -- serving -----------------------------------------------------------------

    async def serve(self) -> None:
        """Faults and events until the process is gone (its connection closes: exit or exec)."""
        next_tick = next_count = trio.current_time()
        while True:
            poll = POLL * (IDLE_POLLS if self.idle else 1)
            with trio.move_on_at(min(next_tick, trio.current_time() + poll)) as waited:
                await trio.lowlevel.wait_readable(self.engine.notify_fd)
            stuck = trio.current_time() < self.stuck_until
            if not waited.cancelled_caught:     # woken: a forwarded fault or event, or the run crossed its line
                self.idle = False
            await self.drain(to_line=not stuck)  # and what the thread did meanwhile (FREED does not wake us)
            now = trio.current_time()
            # Over the line, reclaim now rather than at the tick, but count at most every RECOUNT: pages
            # it cannot take (no store room, shared) must not make every fault a pagemap walk.  A pass
            # that evicted nothing (every page pinned, shared or refused) waits for the tick: otherwise
            # each fault paid a whole pass (3 ms a fault while a child's process_vm_readv pinned pages).
            over = (self.tree.resident > self.tree.line() and now >= self.counted + RECOUNT
                    and now >= self.stuck_until)
            # Memory filled unregistered (a fresh mmap) shows only in the RSS: count now (runwatch).
            grew = (not over and now < next_tick and now >= self.counted + RECOUNT
                    and self.watch is not None and self.watch.grew(self.filled))
            self.stats.growth_counts += grew
            if now >= next_tick or over or grew:
                # The rescan each tick; the whole count every COUNT_EVERY and on unexplained growth; other
                # passes go from the estimate (reclaim).  The estimate is exact for what faults brought in and
                # drops took out, and high by what the program freed itself: a count every 10 ms of a 256 MiB
                # program was a fifth of the daemon's time.
                tick = now >= next_tick
                full = grew or now >= next_count
                if tick:
                    next_tick = now + TICK
                if full:
                    next_count = now + COUNT_EVERY
                self.counted = now
                if self.detach:
                    await self.swapoff()
                    break
                if self.gone():
                    break
                # Nothing faulted, nothing grew, nothing over the line since the last count: the rescan
                # and the count would find what they found.  Skip them and poll less often until
                # something happens (a sleeping program cost the daemon 19% of a CPU in them and in
                # 1 ms polls).
                self.idle = (not over and self.filled == 0 and self.watch is not None
                             and self.watch.anon() == self.watch.anon_at
                             and self.tree.resident <= self.tree.line())
                if self.idle:
                    continue
                if self.sock is not None and (tick or full):   # its HELLO said what is the agent's (a child's: later)
                    full |= self.rescan()      # a new range's pages are in no count yet
                if self.pid is not None:
                    self.evicted = 0
                    await self.reclaim(count=full)
                    self.watch.settle(self.filled)
                    if not self.evicted and self.tree.resident > self.tree.line():
                        self.stuck_until = now + TICK
                        self.tree.recount()
            if self.agent_gone or self.image_gone:
                break

    def gone(self) -> bool:
        """Exit or exec.  The connection is readable only at EOF (the agent speaks only when asked); a child
        without one (before its HELLO, or a raw fork's) is gone when ioctls through its uffd fail with ESRCH
        (its mm is: a dead process's uffd shows nothing else)."""
        if self.sock is not None:
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLIN | select.POLLHUP)
            return bool(p.poll(0))
        try:
            self.uffd.write_protect(self.doorbell, PS, protect=False)   # never protected: changes nothing
        except OSError as e:
            return e.errno == errno.ESRCH
        return False


    # -- registration --------------------------------------------------------------

    def rescan(self) -> bool:
        """Register every anonymous private writable VMA (and [heap]; not [stack] yet, not the agent's
        memory).  brk and mmap make new VMAs, madvise/mprotect split them without an event: the range
        list is only a walk order for reclaim; registration is the kernel's.  Whether a range is new."""
        if not self.readable():
            return False
        try:
            text = self.image.read_maps()
        except OSError:
            return False
        known = set(self.ranges)
        ranges = []
        for m in _MAPS.finditer(text):
            a, b = int(m[1], 16), int(m[2], 16)
            name = m[5].strip()
            if m[3] != b"rw-p" or m[4] != b"0" or (name and name != b"[heap]"):
                continue
            if any(a < s + n and s < b for s, n in self.excluded):
                continue
            ranges.append((a, b))
            if (a, b) in known:
                continue
            try:
                self.uffd.register(a, b - a, RegisterMode.MISSING | RegisterMode.WP)
                self.stats.registered += 1
            except OSError:
                pass                       # gone meanwhile, or not registrable (e.g. VM_DONTEXPAND)
        new = set(ranges) != known
        self.ranges = ranges
        return new

    # -- the end ----------------------------------------------------------------------

    async def swapoff(self) -> None:
        """The daemon stops: put every swapped page back (UFFDIO_COPY needs no fault) and unregister, so
        that the process goes on without us, all data in place."""
        await self.drain()
        lost = 0
        for a, _ in self.table.walk(states=(SWAPPED,)):
            e = self.table.claim(a)
            if e < 0:
                continue                   # the fault thread has it in hand, and puts it back
            slot = slot_of(e)
            try:
                await self.daemon.io.read(slot, 1, self.ra)
                self.uffd.copy(a, self.ra.address, PS)
            except OSError as err:
                if err.errno != errno.EEXIST:
                    lost += 1
                    self._unclaim(a, slot, 1)
                    continue
            self._installed(a, slot, 1)
        for a, b in self.ranges:
            try:
                self.uffd.unregister(a, b - a)
            except OSError:
                pass
        if lost:
            log.error("run %d (pid %d): %d page(s) not read back: the process gets SIGBUS there", self.id,
                      self.pid, lost)
        elif self.sock is not None:        # the agent: nothing is registered, fork() may go on
            try:
                await self.sock.send(message(lib.USWAP_RUN_DETACH))
            except OSError:
                pass

    def leave(self) -> bool:
        """Released, and out of its run (the run out of the daemon if this was its last process); whether
        the run ended."""
        self.release()
        self.tree.members.remove(self)
        if self.tree.members:
            self.tree.recount()
            return False
        del self.daemon.run_trees[self.tree.id]
        return True

    def release(self) -> None:
        """Drop every slot reference this process holds and close what we opened (no fd outlives it).

        A slot reference is in exactly one place: an entry of the table (SWAPPED, INFLIGHT, CLEAN), or a FREED in the
        engine's ring (a swap-in cleared the entries, Python has not read it yet; the thread never drops one,
        not even once stop began: runeng.c post).  So the ring is read to its end after the thread is gone, then
        the table taken: every reference goes exactly once.  A FORK still in the ring is a child nobody will
        serve, running already (the kernel let it go when the thread read the event): refused like one over a
        bound (refuse_fork), its pages swapped out here poisoned, never read as zeros."""
        if self.engine.c is not None:
            trio.lowlevel.notify_closing(self.engine.notify_fd)
            self.engine.stop()
            unserved = []
            for kind, slot, count, ev in self.engine.drain():   # what the thread did last
                if kind == FREED:
                    self._freed(slot, count, ev)
                elif isinstance(ev, Fork):
                    unserved.append(ev.uffd)
            for fd in unserved:            # the table as the fork saw it (SWAPPED entries), FREED applied
                os.set_blocking(fd, False)
                self.refuse_fork(Userfaultfd.from_fd(fd), ProtocolError("its parent is no longer served",
                                                                       errno.ESRCH))
            self.engine.take_filled()      # out of the run's count
            self.engine.close()
        if self.table.c is not None:
            for _, e in self.table.walk(take=True):
                self._forget(e)
            self.table.close()
        if self.uffd.fd >= 0:
            trio.lowlevel.notify_closing(self.uffd.fd)
            self.uffd.close()
        if self.image is not None:
            self.image.close()
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    def status(self) -> dict:
        return {"id": self.id, "run": self.tree.id, "pid": self.pid, "parent": self.parent, "uid": self.uid,
                "budget_pages": self.tree.budget_pages, "line_pages": self.tree.line(),
                "agent": self.sock is not None, "resident_pages": self.resident,
                "cow_shared_pages": self.table.count(SHARED) if self.table.c is not None else 0,
                "swapped_pages": self.table.count(SWAPPED) if self.table.c is not None else 0,
                "clean_pages": self.table.count(CLEAN) if self.table.c is not None else 0,
                "registered_ranges": len(self.ranges), **self.counts()}

    def counts(self) -> dict:
        """Python's counters with the fault thread's added in.  The thread reads every fault and serves it in
        C (engine_faults) or hands it to Python (slow_path_faults): faults is their sum (events apart)."""
        out = asdict(self.stats)
        e = self.engine.stats()
        out["pswpin"] += e.pswpin
        out["readahead_pages"] += e.readahead
        out["zero_fills"] += e.zero_fills
        out["wp_faults"] += e.wp_faults
        out["clean_written"] += e.clean_written
        out["engine_faults"] = e.engine_faults
        out["slow_path_faults"] = e.forwarded
        out["faults"] = e.engine_faults + e.forwarded
        out["throttled"] = e.throttled
        return out

