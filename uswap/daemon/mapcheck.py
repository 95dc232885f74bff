"""What a MAP request brings, checked before the daemon trusts any of it.

A client hands over two file descriptors and an address range.  Each is
hostile until proven otherwise (docs/SECURITY.md): the memfd must be a real
memfd, open read-write, the very object mapped at the address in the
client's memory, and unable to change size or gain seals afterwards; the
userfaultfd must carry only features the daemon handles and must cover the
range; neither may already serve another region.

Order matters: the memfd is sealed before its size is read, so the size
cannot change between the check and the use (no TOCTOU).  Every check that
touches an untrusted fd uses calls that cannot block on a filesystem the
client controls (readlink of /proc/self/fd, fcntl): a file on a hung FUSE
mount is refused before anything could wait on it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import trio

from uswap._core import ffi, lib
from uswap.core import check
from uswap.protocol import ProtocolError
from uswap.uffd import Feature

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
TMPFS_MAGIC = 0x01021994

# Features whose events or semantics the daemon does not handle.  FORK would
# send the daemon a new uffd on every fork of the client; REMAP/REMOVE/UNMAP
# are events it does not serve (the client would block in mremap/munmap);
# SIGBUS and WP_ASYNC resolve faults in the kernel behind the daemon's back
# (a clean page written without a WP fault would be dropped as clean).
REFUSED_FEATURES = (Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
                    | Feature.SIGBUS | Feature.WP_ASYNC)
KNOWN_FEATURES = Feature(sum(Feature))


def fd_target(fd: int) -> str:
    """What /proc says the fd is (never blocks on the file's filesystem)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def is_shmem(fd: int) -> bool:
    """A shmem/hugetlbfs file (only those answer F_GET_SEALS)."""
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        return True
    except OSError:
        return False


def uffd_features(fd: int) -> Feature:
    """The features negotiated on a userfaultfd, from /proc/self/fdinfo ("API:\\tapi:features:ioctls")."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("API:"):
                return Feature(int(line.split(":")[2], 16) & KNOWN_FEATURES)
    raise ProtocolError("the userfaultfd has not been set up with UFFDIO_API", errno.EINVAL)


def same_file(fd1: int, fd2: int) -> bool:
    """Both fds name one open file (kcmp KCMP_FILE)."""
    return check(lib.uswap_same_file(fd1, fd2)) == 1


def check_uffd(fd: int, in_use: list[int]) -> None:
    if fd_target(fd) != "anon_inode:[userfaultfd]":
        raise ProtocolError("the first descriptor is not a userfaultfd", errno.EBADF)
    extra = uffd_features(fd) & REFUSED_FEATURES
    if extra:
        names = ", ".join(f.name for f in Feature if f in extra)
        raise ProtocolError(f"the userfaultfd has features the daemon does not handle: {names}", errno.EINVAL)
    if any(same_file(fd, other) for other in in_use):
        raise ProtocolError("this userfaultfd already serves another region", errno.EBUSY)


def check_memfd(fd: int, length: int) -> tuple[int, int]:
    """A real memfd, read-write, sealed here against size changes; returns (st_dev, st_ino)."""
    if not is_shmem(fd) or not fd_target(fd).startswith("/memfd:"):
        raise ProtocolError("the second descriptor is not a memfd", errno.EBADF)
    magic = ffi.new("int64_t *")
    check(lib.uswap_fs_magic(fd, magic))
    if magic[0] != TMPFS_MAGIC:
        raise ProtocolError("the memfd is not on shmem (hugetlb memfds are not supported)", errno.EINVAL)
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise ProtocolError("the memfd is not open read-write", errno.EACCES)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        raise ProtocolError("the memfd is sealed against writes: the daemon could not evict its pages", errno.EPERM)
    wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    if seals & wanted != wanted:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, wanted)
        except PermissionError:
            raise ProtocolError("the memfd cannot be sealed against resizing (create it with MFD_ALLOW_SEALING)",
                                errno.EPERM) from None
    # Sealed: from here the size cannot change under us.
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError("the second descriptor is not a memfd", errno.EBADF)
    if st.st_size != length:
        raise ProtocolError(f"the memfd has {st.st_size} bytes, the region {length}", errno.EINVAL)
    return st.st_dev, st.st_ino


def check_mapping(pid: int, addr: int, length: int, memfd_id: tuple[int, int]) -> None:
    """The memfd is what the client maps at [addr, addr+length), shared, from offset 0.

    Read from /proc/PID/maps of the peer (SO_PEERCRED).  Every VMA that meets
    the range must map this memfd at the matching offset, and together they
    must cover it.
    """
    dev, ino = memfd_id
    end = addr + length
    covered = addr
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split()
                start_s, end_s = fields[0].split("-")
                start, stop = int(start_s, 16), int(end_s, 16)
                if stop <= addr or start >= end:
                    continue
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                same = (int(fields[4]) == ino and os.makedev(major, minor) == dev
                        and fields[1][3] == "s" and int(fields[2], 16) == start - addr)
                if not same or start > covered:
                    break
                covered = stop
    except (OSError, ValueError, IndexError):
        raise ProtocolError(f"cannot read the mappings of pid {pid}", errno.ESRCH) from None
    if covered < end:
        raise ProtocolError(f"the memfd is not what pid {pid} maps (shared, from offset 0) at {addr:#x}+{length}",
                            errno.EINVAL)


# Closing a file can wait on its filesystem (a FUSE file's FLUSH, a socket's
# SO_LINGER): fds the daemon did not ask for, or refused, are closed in a few
# threads of their own unless they are kinds whose close cannot block, so a
# hostile fd can stall at most its own connection's task.
_CLOSE_THREADS = trio.CapacityLimiter(4)


async def close_received(fds: list[int]) -> None:
    for fd in fds:
        target = fd_target(fd)
        if target.startswith(("anon_inode:", "pipe:")) or is_shmem(fd):
            os.close(fd)
        else:
            await trio.to_thread.run_sync(os.close, fd, limiter=_CLOSE_THREADS, abandon_on_cancel=True)
