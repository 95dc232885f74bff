"""A run: the process tree of one `uswap run` (issue 12), and the lookups over the daemon's runs.

A ``Run`` is a client of the daemon's budget (uswap.daemon.budget) with one line for all its processes, like a
memory cgroup's limit; it holds the slot references its processes share since a fork (the kernel's swap_map
count, DESIGN.md R5) and the eviction buffer they take turns with.  Its processes are
uswap.daemon.runprocess.RunProcess; the handshake (uswap.daemon.runaccept) finds the run a new image joins
(``find_run``) and the bounds (uswap.daemon.runpolicy) count processes with ``run_count``.
"""

from __future__ import annotations

import collections
import errno
from typing import TYPE_CHECKING

import trio

from uswap._core import ffi
from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.daemon.budget import MIN_LINE, Demand, Share
from uswap.daemon.runpolicy import RunCount
from uswap.daemon.runreclaim import BATCH_PAGES
from uswap.uffd import Userfaultfd

if TYPE_CHECKING:
    from uswap.daemon.runprocess import RunProcess

PS = PAGE_SIZE
HARD_SLACK = 256               # pages above the line (and 1/32 of it) the fault threads fill; then they wait


class Run:
    """The process tree of one `uswap run`: one budget over all its processes (like a memory cgroup's limit),
    inside the daemon's (a client of uswap.daemon.budget: its line and hard line are its share of the
    daemon's); exec and fork keep a process in its run.  A new run is one of the daemon's at once.

    Slots are counted per process, as the kernel's swap_map counts references: a fork gives the child a
    reference to every slot the parent's SWAPPED pages hold (``refs`` counts the references beyond the
    first), and a slot is freed when its last reference goes (``unref``: R5).  A page is in a slot only
    while the slot has a reference, so a child that reads its swapped pages while the parent frees its own
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
        # First-touch windows (the fault thread) stop at the hard line, and at the line while it is lifted: a
        # run that sits at its line gets windows, one that nothing throttles grows no faster than a page a fault.
        self.budget.fill_line = share.line if self.stuck else share.hard

    def line(self) -> int:
        """Resident pages the run may hold: its own budget, within its share of the daemon's (floored at
        MIN_LINE: a run always makes progress)."""
        return self.share.line

    def member(self, pid: int) -> "RunProcess | None":
        return next((p for p in self.members if p.pid == pid), None)


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

