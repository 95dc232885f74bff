"""Who may start a run (`uswap run`, issue 12), and how many at once.

Serving a run hands the program the daemon's own /dev/userfaultfd fd (csrc/preload/uswap_run.h, DEVFD): with it
a process makes *kernel-mode* userfaultfds, which the system may forbid unprivileged users
(/dev/userfaultfd is root's 0600 and vm.unprivileged_userfaultfd 0 by default: a known aid to kernel
exploits that need a kernel access to stall).  A process keeps that fd as long as it likes.  So runs are
served only to root, the daemon's own uid (who can open the device anyway) and the uids the operator adds
(``uswap daemon --run-users``); any other uid is refused with READY(-EPERM) before any fd is sent.

Each process of a run costs the daemon, while it is served: a fault thread (RUN_PROCESS_THREADS, with a
256 KiB stack), up to RUN_PROCESS_FDS fds (its uffd, the thread's two eventfds, /proc/PID/mem, pagemap and
statm, its connection) and about RUN_PROCESS_LOCKED_KIB of locked memory (the stack, the thread's ring and
readahead buffers, Python's), plus its page table (16 bytes per page it has swapped out, which
--user-max-size bounds).  A fork child costs what a process that connected costs, and the kernel creates it
before the daemon hears of it (EVENT_FORK), so the bounds count processes, fork children included:

- ``--user-max-runs`` (default 16): processes one uid's runs may have served at once, and CONNECTs in their
  handshake; the daemon's own uid is not limited (like the other per-uid limits, uswap.daemon.limits).
- ``--max-run-processes`` (default 1024): the same for every uid together, the daemon's own included,
  lowered so that run processes take at most half of RLIMIT_NOFILE: the daemon never runs out of fds or
  threads for them.

A new process over a bound is refused before the daemon makes anything for it: a CONNECT gets READY(-EDQUOT)
(the whole uid, --user-max-runs) or READY(-EAGAIN) (the daemon, --max-run-processes); a fork child is not
served (uswap.daemon.runevents.RunEvents.refuse_fork) and its CONNECT, if the preload makes one, gets
READY(-EAGAIN).  A process that has exited is released at its next tick (uswap.daemon.runprocess.TICK); so that a
program that forks as soon as it reaped a child is not refused, one that has exited does not count against a
bound, but at most twice a bound are held, exited ones included.
"""

from __future__ import annotations

import errno
import os
import pwd
from dataclasses import dataclass

from uswap.protocol import ProtocolError

DEFAULT_MAX_RUNS = 16
DEFAULT_MAX_RUN_PROCESSES = 1024
RUN_PROCESS_THREADS = 1
RUN_PROCESS_FDS = 7
RUN_PROCESS_LOCKED_KIB = 600      # measured: 300 fork children, 180 MiB


def parse_run_users(text: str | None) -> frozenset[int]:
    """Who may start runs: root, the daemon's own uid, and ``--run-users`` (uids or user names, comma-separated;
    None: nobody more).  ValueError naming what is wrong."""
    uids = {0, os.geteuid()}
    if text is None:
        return frozenset(uids)
    for item in (x.strip() for x in text.split(",")):
        if not item:
            raise ValueError(f"--run-users {text!r}: an empty item (give uids or user names, comma-separated)")
        if item.isdigit():
            uids.add(int(item))
            continue
        try:
            uids.add(pwd.getpwnam(item).pw_uid)
        except KeyError:
            raise ValueError(f"--run-users: no user named {item!r}") from None
    return frozenset(uids)


def max_run_processes(asked: int, fd_limit: int) -> int:
    """``--max-run-processes`` lowered so that run processes hold at most half of ``fd_limit``
    (RLIMIT_NOFILE)."""
    return max(1, min(asked, fd_limit // 2 // RUN_PROCESS_FDS))


@dataclass(frozen=True)
class RunPolicy:
    users: frozenset[int]              # --run-users
    max_runs: int = DEFAULT_MAX_RUNS   # --user-max-runs, per uid (the daemon's own uid is not limited)
    exempt_uid: int = -1
    max_processes: int = DEFAULT_MAX_RUN_PROCESSES    # --max-run-processes (max_run_processes), every uid

    @classmethod
    def default(cls) -> "RunPolicy":
        return cls(parse_run_users(None), exempt_uid=os.geteuid())

    def refusal(self, uid: int, running: "RunCount | None" = None) -> ProtocolError | None:
        """Why ``uid`` may not start a run (its processes, those of every uid: ``running``, this one not in
        it; None: only whether the uid may run at all); None if it may."""
        if uid not in self.users:
            return ProtocolError(f"uid {uid} may not start runs (they get a /dev/userfaultfd fd): the daemon's "
                                 f"--run-users does not list it", errno.EPERM)
        return None if running is None else self.process_refusal(uid, running)

    def process_refusal(self, uid: int, running: "RunCount") -> ProtocolError | None:
        """Why one more process of ``uid``'s runs (a new run, a fork child) may not be served; None if it may."""
        if uid != self.exempt_uid and (running.uid_live >= self.max_runs or running.uid_held >= 2 * self.max_runs):
            return ProtocolError(f"uid {uid} has {running.uid_live} run processes, the limit (--user-max-runs "
                                 f"{self.max_runs})", errno.EDQUOT)
        if running.live >= self.max_processes or running.held >= 2 * self.max_processes:
            return ProtocolError(f"the daemon serves {running.live} run processes, its limit "
                                 f"(--max-run-processes {self.max_processes})", errno.EAGAIN)
        return None


@dataclass(frozen=True)
class RunCount:
    """Processes of runs the daemon holds (``held``: served, or in their handshake) and of those the ones that
    have not exited (``live``), of one uid and of every uid."""
    uid_live: int
    uid_held: int
    live: int
    held: int
