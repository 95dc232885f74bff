"""Who may start a run (`uswap run`, issue 12), and how many at once.

Serving a run hands the program the daemon's own /dev/userfaultfd fd (csrc/uswap_run.h, DEVFD): with it
a process makes *kernel-mode* userfaultfds, which the system may forbid unprivileged users
(/dev/userfaultfd is root's 0600 and vm.unprivileged_userfaultfd 0 by default: a known aid to kernel
exploits that need a kernel access to stall).  A process keeps that fd as long as it likes.  So runs are
served only to root, the daemon's own uid (who can open the device anyway) and the uids the operator adds
(``uswap daemon --run-users``); any other uid is refused with READY(-EPERM) before any fd is sent.

Each run costs the daemon four fds and ~2 MiB of locked buffers, and a run whose agent never answers a
DROP is kept (it may be stopped, not hostile): ``--user-max-runs`` bounds what one uid holds, like the
other per-uid limits (uswap.daemon.limits; the daemon's own uid is not limited).
"""

from __future__ import annotations

import errno
import os
import pwd
from dataclasses import dataclass

from uswap.protocol import ProtocolError

DEFAULT_MAX_RUNS = 16


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


@dataclass(frozen=True)
class RunPolicy:
    users: frozenset[int]              # --run-users
    max_runs: int = DEFAULT_MAX_RUNS   # --user-max-runs, per uid (the daemon's own uid is not limited)
    exempt_uid: int = -1

    @classmethod
    def default(cls) -> "RunPolicy":
        return cls(parse_run_users(None), exempt_uid=os.geteuid())

    def refusal(self, uid: int, running: int) -> ProtocolError | None:
        """Why ``uid``, which holds ``running`` run connections besides this one, may not start a run; None if it may."""
        if uid not in self.users:
            return ProtocolError(f"uid {uid} may not start runs (they get a /dev/userfaultfd fd): the daemon's "
                                 f"--run-users does not list it", errno.EPERM)
        if uid != self.exempt_uid and running >= self.max_runs:
            return ProtocolError(f"uid {uid} has {running} runs, the limit (--user-max-runs)", errno.EDQUOT)
        return None
