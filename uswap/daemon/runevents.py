"""A run process's events (part of uswap.daemon.runprocess.RunProcess): REMOVE, UNMAP, REMAP and FORK.

The fault thread reads each event in order with the faults, hands it over through its ring and serves nothing
until ``handle`` has applied it to the process's table (R2: a fault after a REMOVE or UNMAP zero-fills, never
reads the slot the range had).  A FORK makes the child a RunProcess of the same run, with a reference to
every slot of the parent's swapped pages (R5); a child over a bound, or whose parent is no longer served,
is not served (``refuse_fork``: its swapped pages are poisoned in it, ``release_unserved``).
"""

from __future__ import annotations

import errno
import logging
import os
import re

from uswap.core import PAGE_SIZE
from uswap.daemon.procimage import ProcessImage
from uswap.daemon.runengine import CLAIMED, INFLIGHT, SWAPPED, entry, slot_of, state_of
from uswap.daemon.runtree import run_count
from uswap.protocol import ProtocolError
from uswap.uffd import Fork, PartialFill, Remap, Remove, Unmap, Userfaultfd

log = logging.getLogger("uswap.daemon")

PS = PAGE_SIZE
POISON_ROUNDS = 100              # release_unserved: event reads before a page that stays EAGAIN is given up


class RunEvents:
    """The events of a RunProcess's uffd (its ``table``, ``tree`` for slot references, ``stats``), and a
    fork child's first fault, which names it (``learn_pid``)."""

    async def handle(self, ev) -> None:
        """One event (the fault thread forwards every one, and waits: R2)."""
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
        the same slots (one more reference each: R5).  Pages in flight or CLEAN here are resident at the
        fork: the child has its own copy (write-protected, as here; its write finds no entry in its table and
        lifts it), and their slots stay ours.  Which process the child is comes with its first fault
        (THREAD_ID; the preload's atfork handler makes one at once)."""
        child_uffd = Userfaultfd.from_fd(fd)
        os.set_blocking(fd, False)         # not inherited from the parent's fcntl (RUN-DESIGN)
        # The bounds first (runpolicy): nothing is made for a child over one.  No await from the count to
        # RunProcess(), which makes it a member: the count stays true.
        refused = self.daemon.run_policy.process_refusal(self.uid, run_count(self.daemon, self.uid))
        if refused is None:
            try:
                child = type(self)(self.daemon.next_id(), None, None, child_uffd, tree=self.tree,
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
