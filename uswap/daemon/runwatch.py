"""Growth of a run's process that its faults do not explain (issue 12's budget slack, RUN-DESIGN).

Memory a program fills before the daemon registers it (a fresh ``mmap``, a ``brk`` extension) raises no
uffd message at all: the daemon learns of it only when it rescans /proc/PID/maps and counts pagemap.  On a
fixed tick that lag is budget slack (numpy filling a new array with huge pages: several MiB per ms).  A
``RssWatch`` reads the process's anonymous resident size from /proc/PID/statm (one ``pread`` on a kept fd:
the kernel's counters, no page table walk) every POLL; when it grew by more than the pages the daemon itself
faulted in since the last count, something filled memory behind the daemon's back, and the caller rescans
and counts now instead of at the next tick.

Invariant: ``grew`` never misses growth it can see; it may fire late (evictions and unmaps after a count
lower the RSS and mask growth of the same size until the next count, which the tick bounds) or needlessly
(the kernel's RSS counters are per-CPU batched, off by up to GROWTH pages): neither breaks anything, a
rescan is only a rescan.

Cost (measured, a sleeping program, 9 s): the daemon spent 19% of a CPU on the 1 ms polls and the 10 ms tick's
rescan and count; a tick that finds nothing faulted, grown or over the line now skips both and the process then
wakes once a tick (runprocess.IDLE_POLLS): 4.3%.
"""

from __future__ import annotations

import os

POLL = 0.001      # seconds between two RSS reads while the program faults nothing
GROWTH = 128      # pages of unexplained anonymous growth that trigger a rescan (above the counters' batching)


class RssWatch:
    def __init__(self, pid: int):
        self.fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
        self.anon_at = 0          # anonymous resident pages at the last count
        self.filled_at = 0        # the daemon's faulted-in pages at the last count

    def anon(self) -> int:
        """Anonymous resident pages: statm's resident minus its shared (file and shmem) pages; 0 once
        the process is gone (the caller's EOF check ends the run)."""
        try:
            fields = os.pread(self.fd, 128, 0).split()
            return int(fields[1]) - int(fields[2])
        except (OSError, IndexError, ValueError):
            return 0

    def settle(self, filled: int) -> None:
        """A count just happened: growth is measured from here."""
        self.anon_at, self.filled_at = self.anon(), filled

    def grew(self, filled: int) -> bool:
        """Whether the process grew by more than the ``filled - filled_at`` pages the daemon put in."""
        return self.anon() - self.anon_at > filled - self.filled_at + GROWTH

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
