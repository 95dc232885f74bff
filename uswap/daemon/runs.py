"""Runs (`uswap run -- CMD`, issue 12): the daemon swaps an unmodified process through its own uffd.

Each process has a fault thread (csrc/daemon/uswap_runeng.c, uswap.daemon.runengine), the only reader of its
uffd: swap-ins (with readahead of the swapped pages after the faulting one whose slots follow its slot),
zero-fills and first writes are served in C from the process's page table (csrc/daemon/uswap_pt.c); the rest
comes here in order through a ring: faults the thread does not serve, and every event, which the thread
waits on until this task has applied it to the table.  One trio task per process handles those, counts
and evicts (address order from where the last pass stopped, not a CLOCK).  What runs share with memfd
regions is the store, its slot allocator and codec, the daemon's counters and the budget.

The wire protocol is csrc/preload/uswap_run.h (read through the cdef).  A connection is a run's process when its
first packet is CONNECT: the daemon hands over a /dev/userfaultfd fd, the preload (libuswaprun.so) makes
its uffd from it and sends it back with HELLO, the daemon negotiates the events (it holds CAP_SYS_PTRACE,
needed for EVENT_FORK), registers the process's anonymous private writable ranges (rescanned every tick)
and answers READY before the program's main() runs.

Page state, per process, in its table: SWAPPED (out of the process, its data in the slot), CLAIMED
(chosen by eviction, no slot yet), INFLIGHT (written to its slot, still resident and write-protected,
not yet dropped by the agent), SHARED (the agent's MOVE refused it), CLEAN (swapped in by a read or by
readahead: resident, write-protected, equal to the slot it keeps, as the kernel's swap cache).  An address
with no entry is resident or never touched.  Invariants (RUN-DESIGN; DESIGN.md "Runs"):

1. A page leaves the process only by the agent's move, only after its slot write completed, only while
   write-protected: ``evict`` claims, protects, reads /proc/PID/mem, writes slots, *then* sends DROP.
2. A missing page with a slot is filled from that slot, never with zeros; REMOVE/UNMAP forget the slot
   while the thread waits (it reads them, hands them over and serves nothing until they are applied),
   so a fault after them zero-fills.  A slot that cannot be read back poisons the page (SIGBUS).
3. A WP fault on a CLAIMED or INFLIGHT page cancels its eviction (the slot is freed, the page stays):
   nothing is ever dropped after the program wrote it.  The thread never lifts the protection of such a
   page (it hands the fault here), and this task handles it only between evictions; there is no await
   between taking a DROP reply and publishing SWAPPED.
4. EAGAIN (events pending: mmap_changing) is never retried in place: the fault waits on a deferred list
   until the ring has been read, the eviction drains it before asking again.
5. A CLEAN page is write-protected and equal to its slot: it is installed protected before its entry says
   CLEAN, and its protection is lifted only together with the entry's removal (the fault thread under the
   table's lock, or ``fault`` here), which frees the slot.  So eviction may drop it without a write: its
   claim turns CLEAN into INFLIGHT under the same lock, after which a write is a WP fault on an INFLIGHT
   page (invariant 3: cancelled, never dropped).  A page still INFLIGHT after its drop is again CLEAN.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import logging
import os
import re
import select
import signal
import socket
from dataclasses import asdict, dataclass

import trio

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.daemon.budget import MIN_LINE, Demand, Share
from uswap.daemon.mapcheck import check_uffd
from uswap.daemon.procimage import ImageChanged, ProcessImage
from uswap.daemon.runpolicy import RunCount
from uswap.daemon.runengine import (BUSY, CLAIMED, CLEAN, EVENT, FREED, HOLD_SLOT, INFLIGHT, SHARED, SWAPPED,
                                     PageTable, RunEngine, entry, slot_of, state_of)
from uswap.daemon.runwatch import POLL, RssWatch
from uswap.daemon.slots import NoSlots
from uswap.protocol import ProtocolError
from uswap.uffd import CopyMode, Fork, Pagefault, PartialFill, Remap, Remove, RegisterMode, Unmap, Userfaultfd

log = logging.getLogger("uswap.daemon")

PS = PAGE_SIZE
MSG_SIZE = ffi.sizeof("struct uswap_run_msg")
MAGIC = lib.USWAP_RUN_MAGIC.to_bytes(4, "little")
MAX_SPANS = lib.USWAP_RUN_MAX_SPANS   # spans of pages one DROP names at most
SPAN_PAGES = 32                # pages per eviction span (one MOVE)
BATCH_PAGES = 1024             # pages per eviction batch at most (one slot write, one DROP of up to MAX_SPANS spans)
SCAN_CHUNK = 4096              # pages of pagemap read at a time (counts and passes): held at once at most
SCAN_REGIONS = 64              # spans of present pages found per PAGEMAP_SCAN; a checkpoint after each
SCAN_CAP = 1 << 18             # pages of pagemap one reclaim pass reads at most; the next goes on from there
COUNT_CHUNK = 1 << 16          # present pages counted in one call into C (well under a millisecond); a checkpoint after
READAHEAD = 32                 # pages read per swap-in at most (the fault thread's window adapts up to it)
SLOW_READAHEAD = 8             # the same for the faults Python serves (fixed)
HARD_SLACK = 256               # pages above the line (and 1/32 of it) the fault threads fill; then they wait
TICK = 0.01                    # rescan and budget check
COUNT_EVERY = 0.1              # a whole pagemap count at least this often (between: the estimate, reclaim)
RECOUNT = 0.002                # between two pagemap counts at least
IDLE_POLLS = 10                # an idle process wakes every IDLE_POLLS * POLL (= TICK): its RSS, its EOF
DRAIN_ROUNDS = 100             # eviction: drains before a refused (EAGAIN) drop is given up
FEATURES = (lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP | lib.UFFD_FEATURE_EVENT_FORK | lib.UFFD_FEATURE_EVENT_REMAP
            | lib.UFFD_FEATURE_EVENT_REMOVE | lib.UFFD_FEATURE_EVENT_UNMAP | lib.UFFD_FEATURE_THREAD_ID
            | lib.UFFD_FEATURE_POISON | lib.UFFD_FEATURE_MOVE)
# /proc/PID/pagemap, top byte of an entry: bit 7 present, bit 0 exclusively mapped (bit 56)
_PRESENT = bytes(range(0x80))                                   # translate(None, _PRESENT): present bytes
_NOT_EXCLUSIVE = bytes(b for b in range(256) if b & 0x81 != 0x81)  # translate(None, ...): present and exclusive
_EVICTABLE = bytes(1 if b & 0x81 == 0x81 else 0 for b in range(256))
_MAPS = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)[ \t]*(.*)$", re.M)


def is_run_connection(head: bytes) -> bool:
    """Whether a connection's first bytes are a run's CONNECT (the preload's), not a region's request."""
    return head[:4] == MAGIC


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


def peer_alive(sock) -> bool:
    """Whether the process that connected ``sock`` (SO_PEERCRED's pid) is still alive: its pidfd (SO_PEERPIDFD,
    Linux 6.5) takes signal 0.  A pidfd names the process, so a pid reused since connect cannot pass."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        return e.errno not in (errno.ESRCH, errno.ENOENT)   # an older kernel (ENOPROTOOPT): not checkable here
    try:
        signal.pidfd_send_signal(fd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                      # alive, another uid's (a daemon without CAP_KILL)
    finally:
        os.close(fd)
    return True


def message(op: int, **fields) -> bytes:
    m = ffi.new("struct uswap_run_msg *")
    m.magic, m.version, m.op = lib.USWAP_RUN_MAGIC, lib.USWAP_RUN_VERSION, op
    for key, value in fields.items():
        setattr(m, key, value)
    return bytes(ffi.buffer(m))


def parse(data: bytes, op: int):
    """A received message of kind ``op``; ProtocolError otherwise."""
    if len(data) != MSG_SIZE:
        raise ProtocolError(f"run message of {len(data)} bytes, expected {MSG_SIZE}", errno.EPROTO)
    m = ffi.new("struct uswap_run_msg *")
    ffi.memmove(m, ffi.from_buffer(data), MSG_SIZE)
    if m.magic != lib.USWAP_RUN_MAGIC or m.version != lib.USWAP_RUN_VERSION or m.op != op:
        raise ProtocolError(f"run message op {m.op} version {m.version}, expected op {op} version "
                            f"{lib.USWAP_RUN_VERSION}", errno.EPROTO)
    return m


def check_dropped(reply, addrs: list[int], lens: list[int]):
    """A DROPPED that answers the DROP of ``addrs``/``lens``, or ProtocolError.

    What the agent says is trusted only within what was asked: the spans asked for, in order, no more bytes
    than asked, whole pages, an errno or 0 (0 only if the whole span moved).  Within that, a lie hurts only
    the liar's own process: a page claimed moved but still there is write-protected with its data in its
    slot, so the process reads its own page and a write lifts the protection (the slot stays counted against
    the liar's room until the page is evicted again, ``drop``, invalidated or the run ends; not freed at the WP
    fault: a write to a page moved out also raises one, on its uffd-wp marker); a page moved but claimed not is
    a missing page without a slot: zeros, in the liar's memory."""
    if reply.count != len(addrs):
        raise ProtocolError(f"DROPPED answers {reply.count} spans, {len(addrs)} were asked", errno.EPROTO)
    for k, (a, n) in enumerate(zip(addrs, lens)):
        moved, err = reply.len[k], reply.err[k]
        if reply.addr[k] != a or moved > n or moved % PS or not 0 <= err < 4096 or (err == 0 and moved != n):
            raise ProtocolError(f"DROPPED span {k}: {moved} bytes at {reply.addr[k]:#x}, errno {err}; asked "
                                f"{n} bytes at {a:#x}", errno.EPROTO)
    return reply


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


class Run:
    """The process tree of one `uswap run`: one budget over all its processes (like a memory cgroup's limit),
    inside the daemon's (a client of uswap.daemon.budget: its line and hard line are its share of the
    daemon's); exec and fork keep a process in its run.  A new run is one of the daemon's at once.

    Slots are counted per process, as the kernel's swap_map counts references: a fork gives the child a
    reference to every slot the parent's SWAPPED pages hold (``refs`` counts the references beyond the
    first), and a slot is freed when its last reference goes (``unref``).  A page is in a slot only while
    the slot has a reference, so a child that reads its swapped pages while the parent frees its own
    reads the data the parent had at the fork."""

    kind = "runs"   # of the daemon's budget's clients

    def __init__(self, id: int, uid: int, gid: int, budget_pages: int, daemon):
        self.id, self.uid, self.budget_pages = id, uid, budget_pages
        self.gid = gid                # with uid, the connection's (SO_PEERCRED): every read is checked for them
        self.daemon = daemon
        self.members: list[RunProcess] = []
        self.refs: dict[int, int] = {}
        self.max_resident_pages = 0   # the tree's largest count (``resident`` after any member's pagemap count)
        self.budget = ffi.new("struct uswap_run_budget *")   # read by the members' fault threads
        self.share = Share(budget_pages, budget_pages, budget_pages)   # until the daemon's budget is shared out
        daemon.run_trees[id] = self
        self.recount()
        # Eviction's page buffer, one per run (the daemon is mlockall'd: 4 MiB per process added up), taken
        # from the /proc/PID/mem read to the end of the slot write; never held across a DROP (a stopped
        # process would hold every other member's eviction).
        self.evict_lock = trio.Lock()
        self._evict_buf: AlignedBuffer | None = None

    @property
    def evict_buf(self) -> AlignedBuffer:
        if self._evict_buf is None:
            self._evict_buf = AlignedBuffer(BATCH_PAGES * PS)
        return self._evict_buf

    def ref(self, slot: int) -> None:
        self.refs[slot] = self.refs.get(slot, 0) + 1

    def unref(self, slot: int) -> None:
        n = self.refs.get(slot)
        if n is None:
            self.daemon.release_slot(slot)
        elif n == 1:
            del self.refs[slot]
        else:
            self.refs[slot] = n - 1

    @property
    def slots_held(self) -> int:
        return sum(p.slots_held for p in self.members) - sum(self.refs.values())

    @property
    def resident(self) -> int:
        """The members' resident pages at their last counts, and what they faulted in since."""
        return self.budget.counted + self.budget.filled

    def recount(self) -> None:
        """After a member's count (or its exit): the counted total, and the daemon's budget shared out again
        (``set_share``: the lines the fault threads check: above the line they wake Python to reclaim,
        above the hard line they hand faults to Python, which serves them between reclaims)."""
        self.budget.counted = sum(p.resident for p in self.members)
        self.daemon.shares.update()

    @property
    def stuck(self) -> bool:
        """No member that can evict (it has an agent) evicted anything in its last pass.  One member with
        nothing to give (a parent that only waits for its children) must not unthrottle the others."""
        now = trio.current_time()
        return all(p.stuck_until > now for p in self.members if p.sock is not None)

    def budget_demand(self) -> Demand:
        return Demand(self.resident, self.budget_pages, MIN_LINE, lambda line: line // 32 + HARD_SLACK,
                      stuck=self.stuck, hard=self.budget.hard)

    def set_share(self, share: Share) -> None:
        self.share = share
        self.budget.soft = share.line
        # A run reclaim cannot bring down (no store room; every page shared, pinned or refused) is not
        # throttled: waiting would only slow every fault (a run over its line for want of store room paid
        # 5 ms a fault).  Its next pass that evicts something brings the line back.
        self.budget.hard = (1 << 62) if self.stuck else share.hard

    def line(self) -> int:
        """Resident pages the run may hold: its own budget, within its share of the daemon's (floored at
        MIN_LINE: a run always makes progress)."""
        return self.share.line

    def member(self, pid: int) -> "RunProcess | None":
        return next((p for p in self.members if p.pid == pid), None)


class RunProcess:
    """One process image of a run: on its own connection (exec gives a new one: a process is never keyed by
    pid), or a fork child, known first by the uffd fork made (its pid comes with its first fault)."""

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
        self.cursor = 0
        self.stats = RunStats()
        self.ra = AlignedBuffer(SLOW_READAHEAD * PS)
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

    async def drain(self, to_line: bool = False) -> None:
        """Handle every message of the fault thread in order; faults refused with EAGAIN wait until the ring
        is empty (the event that holds mmap_changing may be behind them: retrying in place waits for
        ourselves).  ``to_line``: return as soon as the run is over its line (nothing deferred), so that
        the caller counts and reclaims; what is left waits in the ring (the hard line's throttle)."""
        deferred: list[Pagefault] = []
        rounds = 0
        while True:
            msgs = self.engine.drain()
            for kind, slot, count, ev in msgs:
                if kind == FREED:
                    self._freed(slot, count, ev)
                elif kind == EVENT:        # the thread waits for us: the table must change first
                    await self.handle(ev)
                    self.engine.resume()
                elif not await self.fault(ev):
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

    async def handle(self, ev) -> None:
        """One event (the fault thread forwards every one, and waits)."""
        if isinstance(ev, (Remove, Unmap)):
            if isinstance(ev, Remove):
                self.stats.remove += 1
            else:
                self.stats.unmap += 1
            self.invalidate(ev.start, ev.end)
        elif isinstance(ev, Remap):
            self.stats.remap += 1
            self.remap(ev.old, ev.new, ev.length)
        elif isinstance(ev, Fork):
            self.stats.fork += 1
            self.fork(ev.uffd)

    async def fault(self, ev: Pagefault) -> bool:
        """A fault the thread did not serve (read error, a page eviction holds, EAGAIN, above the hard line,
        a store Python reads, a fork child's first); False if it must be retried after the ring is read."""
        a = ev.address & ~(PS - 1)
        t = self.table
        if self.pid is None:
            self.learn_pid(ev.thread_id)
        if ev.is_wp:
            e = t.get(a)
            clean = bool(e) and state_of(e) == CLEAN
            if e and state_of(e) != SWAPPED and not clean:   # invariant 3: an eviction of a written page is cancelled
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
            # Invariant 5: no await since the un-protect; its slot is stale.  Unless the fault thread lifted it
            # first (another thread's write), under the table's lock, and dropped the reference itself (FREED).
            if clean and t.swap(a, e, 0):
                self.tree.unref(slot_of(e))
                self.stats.clean_written += 1
            self.stats.wp_faults += 1
            return True
        e = t.claim(a)
        if e == -errno.EBUSY:              # the thread is swapping it in: retried once it is in
            return False
        if e < 0:                          # not swapped: a zero page (invariant 2: nothing holds a slot for it)
            return self._fill(a, lambda: self.uffd.zeropage(a, PS), "zero_fills")
        slot = slot_of(e)
        n = 1                              # readahead: the swapped pages after it whose slots follow its slot
        while n < SLOW_READAHEAD and t.swap(a + n * PS, entry(SWAPPED, slot + n), entry(SWAPPED, slot + n) | BUSY):
            n += 1
        try:
            await self.daemon.io.read(slot, n, self.ra)
        except OSError as err:
            self._unclaim(a + PS, slot + 1, n - 1)
            n = 1
            try:
                await self.daemon.io.read(slot, 1, self.ra)
            except OSError:
                self.daemon.stats.read_errors += 1
                self.daemon.note_poisoned(f"run {self.id} (pid {self.pid})", a, slot, err)
                if self._fill(a, lambda: self.uffd.poison(a, PS), "poisoned"):
                    self._installed(a, slot, 1)
                    return True
                self._unclaim(a, slot, 1)
                return False
        # A read installs it write-protected and CLEAN (invariant 5), a write writable, its slot freed.
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

    def invalidate(self, start: int, end: int) -> None:
        """REMOVE/UNMAP: the contents of [start, end) are gone, and so are their slots; an eviction of a
        page there is cancelled, a SHARED mark forgotten, a CLEAN page's slot freed."""
        for _, e in self.table.walk(start, end, take=True):
            self._forget(e)

    def remap(self, old: int, new: int, length: int) -> None:
        """REMAP: swapped pages move with their range; a pending eviction of a moved page is cancelled, a
        CLEAN one's slot freed (it moved resident; a write to it, still protected, finds no entry)."""
        moved = []
        for a, e in self.table.walk(old, old + length, take=True):
            if state_of(e) == SWAPPED:
                moved.append((a - old + new, slot_of(e)))
                continue
            self._forget(e)
            self.stats.cancelled += state_of(e) in (CLAIMED, INFLIGHT)
        for b, slot in moved:
            was = self.table.set(b, entry(SWAPPED, slot))
            if was:                        # cannot happen: the destination was unmapped (UNMAP) first
                self._forget(was)
                self.stats.overwrites += 1

    def fork(self, fd: int) -> None:
        """EVENT_FORK, read while the parent still waits in fork() and before the child runs: the child's
        registered memory is served through ``fd``; its missing pages that are swapped here are filled from
        the same slots (one more reference each).  Pages in flight or CLEAN here are resident at the fork: the
        child has its own copy (write-protected, as here; its write finds no entry in its table and lifts it),
        and their slots stay ours.  Which process the child is
        comes with its first fault (THREAD_ID; the preload's atfork handler makes one at once)."""
        child_uffd = Userfaultfd.from_fd(fd)
        os.set_blocking(fd, False)         # not inherited from the parent's fcntl (RUN-DESIGN)
        # The bounds first (runpolicy): nothing is made for a child over one.  No await from the count to
        # RunProcess(), which makes it a member: the count stays true.
        refused = self.daemon.run_policy.process_refusal(self.uid, run_count(self.daemon, self.uid))
        if refused is None:
            try:
                child = RunProcess(self.daemon.next_id(), None, None, child_uffd, tree=self.tree,
                                   doorbell=self.doorbell, proof=self.proof, nonce=self.nonce, parent=self.pid)
            except OSError as e:
                refused = e
        if refused is not None:
            self.refuse_fork(child_uffd, refused)
            return
        child.ranges = list(self.ranges)   # registration is inherited
        for a, e in self.table.walk(states=(SWAPPED,)):   # this thread waits: nothing is BUSY
            child.table.set(a, entry(SWAPPED, slot_of(e)))
            self.tree.ref(slot_of(e))
        self.daemon.nursery.start_soon(self.daemon.serve_run_process, child)

    def refuse_fork(self, uffd: Userfaultfd, why: Exception) -> None:
        """A fork child the daemon does not serve (over a bound, or no thread or fd for it): it runs on
        unbudgeted with what it has (resident and copy-on-write pages; zeros where nothing was ever
        written), and every page swapped out here is poisoned in it (SIGBUS if touched: its data is in a
        slot nobody will read for it; never zeros).  Its CONNECT, if its preload makes one, is refused
        (READY -EAGAIN, refused_fork).  Logged once a second per uid."""
        self.stats.forks_refused += 1
        self.fork_refusal = str(why)
        pages = sorted(a for a, _ in self.table.walk(states=(SWAPPED,)))
        self.daemon.log_limited(f"fork {self.uid}", logging.WARNING, "run %d (pid %s) uid %d: a fork child is "
                                "not served (%s): it runs unbudgeted, and its %d page(s) swapped out at the fork "
                                "give SIGBUS if touched", self.tree.id, self.pid, self.uid, why, len(pages))
        if not release_unserved(uffd, pages):
            log.error("run %d (pid %s): a refused fork child's pages could not all be poisoned; its uffd is kept "
                      "(a fault there waits) until it exits", self.tree.id, self.pid)
            self.daemon.parked_forks.append(uffd)

    def learn_pid(self, tid: int) -> None:
        """A fork child's first fault names it: the faulting thread's process, verified as the image the fork
        made (procimage, rules 2 and 3: a thread that exec'd since names another image, which is not read)."""
        try:
            with open(f"/proc/{tid}/status", "rb") as f:
                tgid = int(re.search(rb"^Tgid:\s*(\d+)", f.read(), re.M)[1])
            image = ProcessImage(tgid, self.tree.uid, self.tree.gid)
        except (OSError, TypeError):
            return                         # gone already; gone() sees it
        except ProtocolError as e:
            self.daemon.log_limited(f"runfork {self.tree.uid}", logging.WARNING, "run %d: fork child %d: %s; "
                                    "it is served, never read", self.tree.id, tgid, e)
            return
        try:
            image.prove_inherited(self.proof, self.nonce)
            self.attach(image)
        except (OSError, ProtocolError) as e:
            image.close()
            self.daemon.log_limited(f"runfork {self.tree.uid}", logging.WARNING, "run %d: fork child %d: %s; "
                                    "it is served, never read", self.tree.id, tgid, e)
            return
        self.engine.forward_all(False)     # the thread serves it from now on

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

    # -- eviction ------------------------------------------------------------------

    def _tops(self, a: int, b: int) -> bytes:
        """The top byte of each pagemap entry of [a, b)."""
        data = os.pread(self.image.pagemap, (b - a) // PS * 8, a // PS * 8)
        return data[7::8]

    def _present(self, a: int, b: int):
        """[start, end) spans of present pages in [a, b), each at most SCAN_CHUNK pages, and how far the walk
        got (holes skipped by PAGEMAP_SCAN: a sparse 128 GiB range is as cheap as its present pages)."""
        spans, walked = self.image.present(a, b, SCAN_REGIONS)
        out = []
        for s, e in spans:
            out.extend((x, min(e, x + SCAN_CHUNK * PS)) for x in range(s, e, SCAN_CHUNK * PS))
        return out, walked

    async def _count(self) -> int | None:
        """Present pages of the registered ranges charged to this process (None: it may not be read any more).
        In chunks, a checkpoint between them: the trio loop serves every other client meanwhile.  The process
        the run started with is counted in C, up to COUNT_CHUNK present pages a call (PAGEMAP_SCAN skips holes;
        the spans of a fragmented range cost no Python); a fork child reads the pagemap of at most SCAN_REGIONS
        spans of SCAN_CHUNK pages a chunk (it needs each page's exclusive bit)."""
        # A page a fork shares is charged once, to the process the run started with (or the oldest one
        # still sharing it: a child counts only the pages it has alone).  Counting it in every process
        # (summed RSS) put a 2-worker pool permanently over its line with pages nobody can evict (a fork
        # shares them), and reclaim thrashed the rest.  Pages only siblings still share are charged to
        # none (a limit, RUN-DESIGN).
        own = _PRESENT if self.parent is None else _NOT_EXCLUSIVE
        present = 0
        for a, b in list(self.ranges):
            pos = a
            while pos < b:
                try:
                    if own is _PRESENT:
                        pages, pos = self.image.count_present(pos, b, COUNT_CHUNK)
                        present += pages
                    else:
                        spans, pos = self._present(pos, b)
                        present += sum(len(self._tops(s, e).translate(None, own)) for s, e in spans)
                except OSError:
                    break                   # gone meanwhile
                await trio.sleep(0)
                if not self.readable():     # awaited: again (procimage, rule 4)
                    return None
        return present

    async def reclaim(self, count: bool = True) -> None:
        """Above the line, evict spans in address order from where the last pass stopped (a FIFO, not a
        CLOCK).  ``count``: count the registered resident pages first (pagemap, each tick).  Between ticks
        (a pass because the run went over its line) the last count, less what was evicted since and plus
        what came in, stands for it, and pagemap is read only from the cursor on, as far as the pass goes:
        a whole count of a 256 MiB program every 2 ms was a fifth of the daemon's time."""
        if not self.readable():
            return
        shared = [a for a, _ in self.table.walk(states=(SHARED,))] if self.table.count(SHARED) else []
        if count:
            self.engine.take_filled()      # before the count: a page filled meanwhile is counted twice, not never
            present = await self._count()
            if present is None:
                return
            # Pages MOVE refused (SHARED) stay until written, like mlocked pages: they are shown
            # (cow_shared_pages) but not held against the line, or the rest of the run thrashes under them
            # (a parent that read its pages after a child exited kept 4,868 such pages over a 4,096-page line).
            self.resident = max(0, present - len(shared))
            self.stats.max_resident_pages = max(self.stats.max_resident_pages, present)
        else:
            self.resident += self.engine.take_filled()
        self.tree.recount()
        self.tree.max_resident_pages = max(self.tree.max_resident_pages, self.tree.resident)
        want = self.over_line()
        if want <= 0 or self.sock is None:  # no agent (a raw fork's child): counted, served, never evicted
            return
        room = self.slot_room()
        if room < want and self.table.count(CLEAN):
            # Short of store room: CLEAN pages give their slots back first, as the kernel frees swap cache
            # when swap runs full.  They stay resident and protected; a write finds no entry and lifts it.
            for _, e in self.table.walk(states=(CLEAN,), take=True):
                self._forget(e)
            room = self.slot_room()
        if room < want:
            self.stats.no_room += 1
            self.daemon.log_limited(f"runroom {self.id}", logging.WARNING, "run %d (pid %d): no store room "
                                    "left for it (%d slot(s)): it stays above its budget", self.id, self.pid,
                                    max(room, 0))
            want = room
            if want <= 0:
                return
        batch: list[tuple[int, int]] = []
        pages = read = 0
        for start, evictable in self._candidates(shared):
            if start is None:               # the pass read SCAN_CAP pages of pagemap: the next one goes on from here
                self.cursor = evictable
                break
            for m in re.finditer(b"\x01+", evictable):
                first = start + m.start() * PS
                count = min(m.end() - m.start(), want)
                for off in range(0, count, SPAN_PAGES):
                    n = min(SPAN_PAGES, count - off)
                    batch.append((first + off * PS, n))
                    pages += n
                    if len(batch) == MAX_SPANS or pages > BATCH_PAGES - SPAN_PAGES:   # the next span may not fit
                        await self.evict(batch)
                        batch, pages = [], 0
                        if self.agent_gone:
                            return
                want -= count
                self.cursor = first + count * PS
                if want <= 0:
                    break
            if want <= 0:
                break
            read += len(evictable) + 64     # a pread costs as much as a few pages more
            if read >= SCAN_CHUNK:          # a checkpoint: the other clients.  (The candidates read before may be
                read = 0                    # stale after it: evict claims each page, and skips what has an entry.)
                await trio.sleep(0)
        else:
            self.cursor = 0
        if batch:
            await self.evict(batch)

    def _candidates(self, shared: list[int]):
        """(address, one byte per page from there: 1 evictable) over the registered ranges from the cursor
        on, read in chunks (at most SCAN_CHUNK pages of present pages, holes skipped) as the pass asks for
        them; SHARED pages are cut out (MOVE refused them).  A pass reads at most SCAN_CAP pages of pagemap:
        then (None, where to go on from)."""
        order = sorted(range(len(self.ranges)), key=lambda k: (self.ranges[k][1] <= self.cursor, self.ranges[k][0]))
        scanned = 0
        for k in order:
            a0, b0 = self.ranges[k]
            start = max(a0, self.cursor) if a0 < self.cursor < b0 else a0
            while start < b0:
                if scanned >= SCAN_CAP:
                    yield None, start
                    return
                try:
                    spans, walked = self._present(start, b0)
                except OSError:
                    break                       # gone meanwhile
                for s, end in spans:
                    try:
                        t = self._tops(s, end)
                    except OSError:
                        return                  # gone meanwhile
                    scanned += len(t)
                    evictable = t.translate(_EVICTABLE)
                    cut = [(a - s) // PS for a in shared if s <= a < end]
                    if cut:
                        evictable = bytearray(evictable)
                        for i in cut:
                            if i < len(evictable):
                                evictable[i] = 0
                    yield s, evictable
                scanned += 1                    # a walk that found nothing still costs
                start = walked

    async def evict(self, spans: list[tuple[int, int]]) -> None:
        """Invariant 1, in this order: claim (the fault thread then hands a write to these pages to
        Python, which cancels), write-protect, read through /proc/PID/mem, write slots, agent drop,
        publish SWAPPED.  A CLEAN page is claimed straight into INFLIGHT (invariant 5): its slot holds it
        already, so it is neither read nor written, only dropped.  Whatever is still in flight at the end
        stays resident as CLEAN (protected, equal to its slot); what is still claimed stays resident."""
        t = self.table
        claimed, kept = [], []
        for a, n in spans:
            if not t.claim_evict(a, n):
                continue                        # a page of it has another entry (SHARED since the count)
            claimed.append((a, n))
            for _ in range(DRAIN_ROUNDS):
                try:
                    self.uffd.write_protect(a, n * PS)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        self.stats.eagain += 1
                        await self.drain()      # nothing of ours is in flight yet
                        continue
                    break                       # gone meanwhile
                kept.append((a, n))
                break
        async with self.tree.evict_lock:       # the buffer, from the read to the end of the write
            buf = self.tree.evict_buf
            room = self.slot_room()       # other runs may have taken slots since reclaim looked
            pos = 0
            read = []
            if not self.readable():             # awaited since reclaim's check: again
                kept = []                       # nothing is dropped either: the CLEAN pages stay so
            for a, n in kept:
                for f, k in t.spans(a, n, CLAIMED, n):   # the pages without a slot (CLEAN ones, INFLIGHT, have theirs)
                    if pos + k > room:
                        continue                    # write-protected but kept: a WP fault lifts the protection
                    try:
                        got = os.preadv(self.image.mem, [buf.view[pos * PS:(pos + k) * PS]], f)
                    except OSError:
                        got = 0
                    if got != k * PS:
                        continue                    # unmapped meanwhile; a WP fault lifts the protection
                    read.append((f, k, pos))
                    pos += k
            # One slot write for the batch (split only where the allocator gives a shorter range): slots follow
            # the buffer, so the pages of a span get consecutive slots (what swap-in readahead looks for).
            pages = [a + i * PS for a, n, _ in read for i in range(n)]
            done = 0
            while done < len(pages):
                try:
                    first, got = self.daemon.slots.allocate(len(pages) - done)
                except NoSlots:
                    self.daemon.log_limited("runslots", logging.ERROR, "run %d: the store is full", self.id)
                    break
                try:
                    await self.daemon.io.write(first, got, buf, done)
                except OSError as e:
                    self.daemon.slots.free(first, got)
                    self.daemon.stats.write_errors += 1
                    self.daemon.log_limited("runwrite", logging.ERROR, "run %d: slot write failed: %s", self.id, e)
                    break
                # the slots are complete; a page is still here unless written meanwhile (its claim cancelled)
                written = 0
                for i, ok in enumerate(t.assign(pages[done:done + got], CLAIMED, INFLIGHT, first)):
                    written += ok
                    if not ok:
                        self.tree.unref(first + i)
                self.stats.pswpout += written
                self.daemon.stats.pswpout += written
                done += got
        await self.drop(kept)
        for a, n in claimed:
            # Not moved.  Still in flight: protected and equal to its slot since its claim (a write would have
            # cancelled it, invariant 3): CLEAN, its slot kept.  Still claimed: no slot; the page stays.
            t.change(a, n, (INFLIGHT,), CLEAN)
            for e in t.change(a, n, (CLAIMED,), 0):
                self._forget(e)
        self.tree.recount()                     # a fault thread waiting above the hard line sees the room

    async def drop(self, spans: list[tuple[int, int]]) -> None:
        """Ask the agent to move the INFLIGHT pages of ``spans`` out; what it moved is SWAPPED."""
        t = self.table
        for _ in range(DRAIN_ROUNDS):
            addrs, lens = [], []
            for a, n in spans:
                for first, k in t.spans(a, n, INFLIGHT, MAX_SPANS - len(addrs)):
                    addrs.append(first)
                    lens.append(k * PS)
                if len(addrs) == MAX_SPANS:
                    break
            if not addrs:
                return
            # No timeout: a stopped process (SIGSTOP) answers when it runs again, and faults nothing meanwhile.
            try:
                await self.sock.send(message(lib.USWAP_RUN_DROP, count=len(addrs), addr=addrs, len=lens))
                reply = check_dropped(parse(await self.sock.recv(MSG_SIZE + 1), lib.USWAP_RUN_DROPPED), addrs, lens)
            except (OSError, ProtocolError) as e:
                # Gone (exit, exec: EOF), or an answer that cannot be trusted: which pages moved is
                # unknown, so no slot may be dropped as if its page were still there.  Serving ends;
                # the agent, if alive, sees the connection close and answers faults with SIGBUS.
                log.info("run %d (pid %d): no answer to DROP (%s); ending the run", self.id, self.pid, e)
                self.agent_gone = True
                return
            self.stats.drops += 1
            again = refused = False
            # No await from here to the end of the loop body (invariant 3): the pages asked for were
            # INFLIGHT when asked, and only Python changes an INFLIGHT entry.
            for k in range(reply.count):
                moved = reply.len[k] // PS
                t.change(reply.addr[k], moved, (INFLIGHT,), SWAPPED)
                self.stats.dropped += moved
                self.evicted += moved
                self.resident = max(0, self.resident - moved)   # until the next count
                err = reply.err[k]
                if not err:
                    continue
                if err == errno.EAGAIN:
                    again = True
                    continue
                self.stats.ebusy += err == errno.EBUSY
                self.stats.enoent += err == errno.ENOENT
                if err not in (errno.EBUSY, errno.ENOENT) and not self.stats.other_refusals:
                    log.warning("run %d (pid %d): the agent could not move a page: %s (first of its kind; "
                                "counted)", self.id, self.pid, os.strerror(err))
                self.stats.other_refusals += err not in (errno.EBUSY, errno.ENOENT)
                b = reply.addr[k] + moved * PS     # the page MOVE refused stays resident
                e = t.get(b)
                if state_of(e) == INFLIGHT:
                    t.set(b, entry(SHARED) if err == errno.EBUSY else 0)
                    self._forget(e)
                refused = True
            if not again and not refused:
                return
            if again:
                self.stats.eagain += 1
                await self.drain()

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


CHILD_WAIT = 2.0                 # s: a child's HELLO waits this long for the doorbell fault that names it
POISON_ROUNDS = 100              # release_unserved: event reads before a page that stays EAGAIN is given up


def _page_spans(pages: list[int]):
    """(first, count) of each span of consecutive pages in sorted ``pages``."""
    i = 0
    while i < len(pages):
        j = i + 1
        while j < len(pages) and pages[j] == pages[j - 1] + PS:
            j += 1
        yield pages[i], j - i
        i = j


def release_unserved(uffd: Userfaultfd, pages: list[int]) -> bool:
    """Poison ``pages`` (sorted) in the fork child behind ``uffd``, which nobody will serve, then close ``uffd``
    (the kernel unregisters the child's memory, lifts the write protection it inherited, and wakes its faults:
    a page never swapped out is then its own or a zero page, as it would be without uswap).

    The child may be running already: the kernel completes EVENT_FORK when the event is read, so it went on
    before this runs.  Its events since (mmap_changing: the poison gets EAGAIN) are read here in order and
    applied to ``pages`` first: REMOVE and UNMAP drop theirs (the child expects zeros or nothing there), REMAP
    moves them, a FORK of its own gets the same treatment; a fault of its waits until the poison or the close
    wakes it.  False (``uffd`` left open: a fault there waits rather than read zeros) if a page could not be
    poisoned; then the caller keeps ``uffd`` until the child is gone."""
    todo = [(uffd, pages)]
    ok = True
    while todo:
        u, left = todo.pop()
        for _ in range(POISON_ROUNDS):
            again = []
            for first, n in _page_spans(left):
                try:
                    u.poison(first, n * PS)
                except PartialFill as e:   # an event of the child's is pending: read it, then the rest
                    again.extend(range(first + e.done, first + n * PS, PS))
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        again = []         # the child is gone (exit, exec): nothing of it to protect
                        break
                    # EEXIST/ENOENT: some page is there, or not mapped: poison the others one by one
                    for a in range(first, first + n * PS, PS):
                        try:
                            u.poison(a, PS)
                        except PartialFill:
                            again.append(a)
                        except OSError as err:
                            if err.errno not in (errno.EEXIST, errno.ENOENT):
                                again.append(a)
            left = again
            if not left:
                break
            try:
                events = u.read_events()
            except OSError:
                events = []
            for ev in events:
                if isinstance(ev, (Remove, Unmap)):
                    left = [a for a in left if not ev.start <= a < ev.end]
                elif isinstance(ev, Remap):
                    left = sorted(a - ev.old + ev.new if ev.old <= a < ev.old + ev.length else a for a in left)
                elif isinstance(ev, Fork):
                    grandchild = Userfaultfd.from_fd(ev.uffd)
                    os.set_blocking(ev.uffd, False)
                    todo.append((grandchild, list(left)))
        if left:
            ok = False
            if u is uffd:
                continue           # the caller keeps it
        u.close()
    return ok


def parked_gone(uffd: Userfaultfd) -> bool:
    """Whether the process behind a kept uffd of a refused fork child is gone (ioctls fail with ESRCH)."""
    try:
        uffd.wake(0, PS)
    except OSError as e:
        return e.errno == errno.ESRCH
    return False


def run_count(daemon, uid: int, *, asking: bool = False) -> RunCount:
    """What the bounds count (runpolicy): the processes of the daemon's runs, of ``uid`` and of every uid, that it
    serves (members) or is shaking hands with (run connections that are no member's yet; ``asking``: less
    the one asking), and of those the ones that have not exited (RunProcess.gone, asked only near a bound).
    Kept uffds of refused fork children whose process is gone are closed here."""
    for u in [u for u in daemon.parked_forks if parked_gone(u)]:
        daemon.parked_forks.remove(u)
        u.close()
    members = [p for t in daemon.run_trees.values() for p in t.members]
    # A connection is a member's (its agent's, or a fork child's in its handshake: its pid is known since
    # its doorbell fault) or a new process's handshake.
    connected = collections.Counter(p.uid for p in members
                                    if p.sock is not None or (p.pid is not None and p.pid in daemon.run_peers))
    uid_held = sum(p.uid == uid for p in members) + max(0, daemon.run_connections[uid] - asking - connected[uid])
    held = len(members) + max(0, sum(daemon.run_connections.values()) - asking - sum(connected.values()))
    policy = daemon.run_policy
    uid_live, live = uid_held, held
    if uid_held >= policy.max_runs or held >= policy.max_processes:
        gone = [p for p in members if p.gone()]
        uid_live -= sum(p.uid == uid for p in gone)
        live -= len(gone)
    return RunCount(uid_live=uid_live, uid_held=uid_held, live=live, held=held)


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (/proc/PID/stat); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def refused_fork(daemon, pid: int, uid: int) -> ProtocolError | None:
    """A child's CONNECT whose fork was refused (refuse_fork: its uffd is closed, so its doorbell fault named it
    to nobody), told at once rather than after CHILD_WAIT; None if it is served (or unknown: fork_child_of)."""
    trees = [t for t in daemon.run_trees.values() if t.uid == uid]
    if any(t.member(pid) is not None for t in trees):
        return None
    ppid = parent_pid(pid)
    parent = next((p for t in trees for p in t.members if p.pid == ppid), None) if ppid else None
    if parent is None or not parent.stats.forks_refused:
        return None
    return ProtocolError(f"pid {pid}: its fork was not served ({parent.fork_refusal})", errno.EAGAIN)


def find_run(daemon, pid: int, uid: int) -> Run | None:
    """The run a new image joins: the one its pid (exec) or nearest ancestor (posix_spawn, vfork) is in,
    among runs of the same uid; None for a new run."""
    trees = [t for t in daemon.run_trees.values() if t.uid == uid]
    for _ in range(16):
        for t in trees:
            if t.member(pid) is not None:
                return t
        pid = parent_pid(pid)
        if pid is None or pid <= 1:
            return None
    return None


async def fork_child_of(daemon, pid: int, uid: int) -> RunProcess:
    """The fork child ``pid`` whose HELLO this is, once its doorbell fault has named it."""
    with trio.move_on_after(CHILD_WAIT):
        while True:
            for t in daemon.run_trees.values():
                p = t.member(pid) if t.uid == uid else None
                if p is not None and p.sock is None:     # only fork children are without a connection
                    return p
            await trio.sleep(0.002)
    raise ProtocolError(f"pid {pid}: no fork of a run names it (no doorbell fault within {CHILD_WAIT:g}s)",
                        errno.ESRCH)


def bind_image(client, sock, uffd: Userfaultfd, proof: int) -> ProcessImage:
    """The peer's image, verified (uswap.daemon.procimage, rules 1-3): opened, readable for the connecting uid,
    still the peer, and the mm ``uffd`` serves.  ProtocolError (``uffd`` closed) if not."""
    try:
        image = ProcessImage(client.pid, client.uid, client.gid)
    except OSError as e:
        uffd.close()
        raise ProtocolError(f"pid {client.pid}: /proc/PID: {e.strerror}", e.errno) from None
    except ProtocolError:
        uffd.close()
        raise
    try:
        # /proc/PID/* name a pid, not a process: opened after the peer died, they may be another process's
        # (pid reuse).  Alive now (its pidfd) means alive since connect, so they are the peer's.
        if not peer_alive(sock):
            raise ProtocolError(f"pid {client.pid} exited during the handshake", errno.ESRCH)
        image.prove(uffd, proof)
    except ProtocolError:
        image.close()
        uffd.close()
        raise
    return image


async def accept_run(daemon, client) -> tuple[RunProcess, bool]:
    """CONNECT, DEVFD, HELLO: negotiate on the process's uffd, register, READY.  A fork child's uffd is the
    one its parent's FORK event gave; it goes back to the child with READY.  Returns the process and
    whether it is new (a child is served already).  ProtocolError if refused."""
    sock = client.sock
    try:
        connect = parse(await sock.recv(MSG_SIZE + 1), lib.USWAP_RUN_CONNECT)
        child = bool(connect.flags & lib.USWAP_RUN_CHILD)
        # Policy first: the fd below gives kernel-mode userfaultfds (uswap.daemon.runpolicy).  A fork child is
        # counted since its fork, or was refused there.
        if child:
            refused = daemon.run_policy.refusal(client.uid) or refused_fork(daemon, client.pid, client.uid)
        else:
            refused = daemon.run_policy.refusal(client.uid, run_count(daemon, client.uid, asking=True))
        if refused:
            raise refused
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:      # e.g. a service with PrivateDevices=yes: no /dev/userfaultfd in its /dev
            raise ProtocolError(f"the daemon cannot open /dev/userfaultfd: {e.strerror}", e.errno) from None
    except ProtocolError as e:
        with contextlib.suppress(OSError):
            await sock.send(message(lib.USWAP_RUN_READY, status=-e.errno))
        raise
    try:
        await sock.sendmsg([message(lib.USWAP_RUN_DEVFD)],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dev]))])
    finally:
        os.close(dev)
    data, ancdata, flags, _ = await sock.recvmsg(MSG_SIZE + 1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
    fds = [fd for level, kind, payload in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for fd in array.array("i", payload[:len(payload) - len(payload) % 4])]
    try:
        hello = parse(data, lib.USWAP_RUN_HELLO)
        if len(fds) != (0 if child else 1) or flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"HELLO takes {0 if child else 1} userfaultfd, got {len(fds)} fds", errno.EINVAL)
        if hello.pid != client.pid:
            raise ProtocolError(f"HELLO names pid {hello.pid}, the connection is pid {client.pid}", errno.EPERM)
        excluded = ((hello.staging, hello.staging_len), (hello.agent_stack, hello.agent_stack_len))
        if child:
            proc = await fork_child_of(daemon, client.pid, client.uid)
            await sock.sendmsg([message(lib.USWAP_RUN_READY, status=0)],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [proc.uffd.fd]))])
            proc.excluded, proc.sock = excluded + ((proc.proof, PS),), sock    # now it rescans and evicts
            return proc, False
        # The bounds again, exactly: other handshakes may have made processes since the CONNECT.  No await from
        # here to RunProcess(), which makes it a member: the count stays true.
        refused = daemon.run_policy.process_refusal(client.uid, run_count(daemon, client.uid, asking=True))
        if refused:
            raise refused
        check_uffd(fds[0], [])
        got, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        ret = lib.uswap_uffd_api(fds[0], FEATURES, got, ioctls)
        if ret < 0:
            raise ProtocolError(f"UFFDIO_API with fork/remap/remove/unmap/move events: {os.strerror(-ret)}", -ret)
        uffd = Userfaultfd.from_fd(fds[0])
        fds = []
        os.set_blocking(uffd.fd, False)
        image = bind_image(client, sock, uffd, hello.proof)
        tree = find_run(daemon, client.pid, client.uid)
        if tree is None:
            asked = connect.resident // PS
            tree = Run(daemon.next_id(), client.uid, client.gid, min(asked, daemon.budget // PS) if asked
                       else daemon.budget // PS, daemon)
        try:
            run = RunProcess(daemon.next_id(), image, sock, uffd, tree=tree, excluded=excluded + ((hello.proof, PS),),
                             doorbell=hello.doorbell, proof=hello.proof, nonce=image.nonce)
        except OSError as e:
            image.close()
            uffd.close()
            if not tree.members:              # a new run whose first process could not be opened
                del daemon.run_trees[tree.id]
            raise ProtocolError(f"pid {client.pid}: /proc/PID/statm: {e.strerror}", e.errno) from None
    except ProtocolError as e:
        for fd in fds:
            os.close(fd)
        try:
            await sock.send(message(lib.USWAP_RUN_READY, status=-e.errno))
        except OSError:
            pass
        raise
    try:
        run.rescan()
        await sock.send(message(lib.USWAP_RUN_READY, status=0))
    except BaseException:          # gone, or the handshake's deadline: nothing opened here outlives it
        run.leave()
        raise
    return run, True


