"""Store errors and the store's exclusive lock.

One user at a time, like swapon's S_SWAPFILE: ``flock(LOCK_EX)`` on the open
file.  flock belongs to the open file description, so closing some other fd
of the same file (a check, a mkswap probe) never drops it.  The holder's PID
comes from /proc/locks, for messages.
"""

from __future__ import annotations

import errno
import fcntl
import os

class StoreError(OSError):
    """A store that cannot be used; the message says why."""


class StoreBusy(StoreError):
    def __init__(self, path: str, holder: int | None):
        self.holder = holder
        who = f"PID {holder}" if holder else "another process"
        super().__init__(errno.EBUSY, f"store is in use by {who}", path)


class StoreUnusable(StoreError):
    def __init__(self, report):  # a checks.CheckReport
        self.report = report
        super().__init__(errno.EINVAL, "store refused: " + "; ".join(report.refusals), report.path)


def lock_holder(path: str) -> int | None:
    """The PID holding a flock on ``path``, from /proc/locks (None if unknown).

    /proc/locks names files by the superblock's device, which for btrfs is not
    the st_dev that stat() reports, so the inode number decides and the device
    only breaks ties.
    """
    st = os.stat(path)
    candidates = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "WRITE":
                    continue
                major, minor, inode = fields[5].split(":")
                if int(inode) == st.st_ino:
                    same_dev = (int(major, 16), int(minor, 16)) == (os.major(st.st_dev), os.minor(st.st_dev))
                    candidates.append((not same_dev, int(fields[4])))
    except OSError:
        return None
    return min(candidates)[1] if candidates else None


def take_lock(fd: int, path: str) -> None:
    """Exclusive flock on the store: one user at a time, as swapon's S_SWAPFILE."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreBusy(path, lock_holder(path)) from None


def probe_lock(fd: int, path: str) -> int | None:
    """If another open file holds the store's lock, its PID (0 if unknown); else None."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return lock_holder(path) or 0
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
