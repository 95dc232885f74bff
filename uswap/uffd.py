"""Our userfaultfd binding (there is no package for it).

Shape after userfaultfd-rs: :meth:`Userfaultfd.open` negotiates features and
fails early naming the missing ones; one method per ioctl; events come out of
:meth:`Userfaultfd.read_events` as frozen dataclasses, read in batches into a
buffer the object reuses.  A fill ioctl that the kernel stopped part way
(EAGAIN) raises :class:`PartialFill`, which says how many bytes were done;
any other failure is a plain :class:`OSError`.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass
from typing import Union

from uswap._core import ffi, lib
from uswap.core import check


class Feature(enum.IntFlag):
    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    WP_UNPOPULATED = lib.UFFD_FEATURE_WP_UNPOPULATED
    POISON = lib.UFFD_FEATURE_POISON
    WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
    MOVE = lib.UFFD_FEATURE_MOVE


class RegisterMode(enum.IntFlag):
    MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
    WP = lib.UFFDIO_REGISTER_MODE_WP
    MINOR = lib.UFFDIO_REGISTER_MODE_MINOR


class CopyMode(enum.IntFlag):
    NONE = 0
    DONTWAKE = lib.UFFDIO_COPY_MODE_DONTWAKE
    WP = lib.UFFDIO_COPY_MODE_WP


class FaultFlag(enum.IntFlag):
    NONE = 0
    WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
    WP = lib.UFFD_PAGEFAULT_FLAG_WP
    MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR


class FeatureMissing(OSError):
    """The kernel lacks userfaultfd features that were asked for."""

    def __init__(self, missing: Feature):
        self.missing = missing
        names = ", ".join(f.name for f in Feature if f in missing)
        super().__init__(errno.EOPNOTSUPP, f"userfaultfd lacks features: {names}")


class PartialFill(OSError):
    """A fill ioctl stopped with EAGAIN after ``done`` bytes; retry the rest."""

    def __init__(self, op: str, done: int):
        self.done = done
        super().__init__(errno.EAGAIN, f"{op} stopped after {done} bytes")


@dataclass(frozen=True, slots=True)
class Pagefault:
    address: int
    flags: FaultFlag
    thread_id: int

    @property
    def is_write(self) -> bool:
        return bool(self.flags & FaultFlag.WRITE)

    @property
    def is_wp(self) -> bool:
        return bool(self.flags & FaultFlag.WP)

    @property
    def is_minor(self) -> bool:
        return bool(self.flags & FaultFlag.MINOR)


@dataclass(frozen=True, slots=True)
class Fork:
    uffd: int  # a new fd for the child's copy of the registered ranges


@dataclass(frozen=True, slots=True)
class Remap:
    old: int
    new: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """MADV_DONTNEED/MADV_REMOVE (or a hole punch) dropped [start, end)."""
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    start: int
    end: int


Event = Union[Pagefault, Fork, Remap, Remove, Unmap]

_cached_supported: Feature | None = None


def supported_features() -> Feature:
    """Every feature this kernel offers (probed once with a throwaway uffd)."""
    global _cached_supported
    if _cached_supported is None:
        fd = lib.uswap_uffd_open(lib.O_CLOEXEC)
        if fd == -errno.EPERM:   # unprivileged, vm.unprivileged_userfaultfd=0: user-mode-only uffds still work
            fd = lib.uswap_uffd_open(lib.O_CLOEXEC | lib.UFFD_USER_MODE_ONLY)
        check(fd)
        try:
            features = ffi.new("uint64_t *")
            ioctls = ffi.new("uint64_t *")
            check(lib.uswap_uffd_api(fd, 0, features, ioctls))
            _cached_supported = Feature(features[0] & sum(Feature))
        finally:
            os.close(fd)
    return _cached_supported


class Userfaultfd:
    """An open userfaultfd with its features negotiated.

    Addresses are plain integers.  The fd is non-blocking unless asked
    otherwise; with a blocking fd, :meth:`read_events` waits for an event.
    """

    EVENT_BATCH = 64

    def __init__(self, fd: int, features: Feature, ioctls: int):
        self.fd = fd
        self.features = features
        self.ioctls = ioctls
        self._events = ffi.new("struct uswap_uffd_event[]", self.EVENT_BATCH)
        self._done = ffi.new("int64_t *")
        self._u64 = ffi.new("uint64_t *")

    @classmethod
    def open(cls, features: Feature = Feature(0), *, nonblocking: bool = True,
             user_mode_only: bool = False) -> "Userfaultfd":
        missing = Feature(features & ~supported_features())
        if missing:
            raise FeatureMissing(missing)
        flags = lib.O_CLOEXEC | (lib.O_NONBLOCK if nonblocking else 0)
        if user_mode_only:
            flags |= lib.UFFD_USER_MODE_ONLY
        fd = check(lib.uswap_uffd_open(flags))
        try:
            got = ffi.new("uint64_t *")
            ioctls = ffi.new("uint64_t *")
            check(lib.uswap_uffd_api(fd, int(features), got, ioctls))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, Feature(got[0] & sum(Feature)), ioctls[0])

    @classmethod
    def from_fd(cls, fd: int) -> "Userfaultfd":
        """Wrap a uffd whose API handshake was done elsewhere (another process)."""
        return cls(fd, Feature(0), 0)

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def fileno(self) -> int:
        return self.fd

    def __enter__(self) -> "Userfaultfd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- ranges -----------------------------------------------------------

    def register(self, start: int, length: int, mode: RegisterMode) -> int:
        """Register a range; returns the bitmask of ioctls allowed on it."""
        check(lib.uswap_uffd_register(self.fd, start, length, int(mode), self._u64))
        return self._u64[0]

    def unregister(self, start: int, length: int) -> None:
        check(lib.uswap_uffd_unregister(self.fd, start, length))

    # -- resolving faults ---------------------------------------------------

    def _fill(self, op: str, ret: int) -> int:
        done = self._done[0]
        if ret == -errno.EAGAIN:
            raise PartialFill(op, done)
        check(ret)
        return done

    def copy(self, dst: int, src: int, length: int, mode: CopyMode = CopyMode.NONE) -> int:
        """UFFDIO_COPY; returns bytes copied.  EEXIST: the page is already there."""
        return self._fill("UFFDIO_COPY", lib.uswap_uffd_copy(self.fd, dst, src, length, int(mode), self._done))

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        mode = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0
        return self._fill("UFFDIO_ZEROPAGE", lib.uswap_uffd_zeropage(self.fd, start, length, mode, self._done))

    def continue_(self, start: int, length: int, *, dontwake: bool = False, wp: bool = False) -> int:
        mode = (lib.UFFDIO_CONTINUE_MODE_DONTWAKE if dontwake else 0) | (lib.UFFDIO_CONTINUE_MODE_WP if wp else 0)
        return self._fill("UFFDIO_CONTINUE", lib.uswap_uffd_continue(self.fd, start, length, mode, self._done))

    def poison(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """Install poison markers: a later access gets SIGBUS (this thread only)."""
        mode = lib.UFFDIO_POISON_MODE_DONTWAKE if dontwake else 0
        return self._fill("UFFDIO_POISON", lib.uswap_uffd_poison(self.fd, start, length, mode, self._done))

    def poison_evicted(self, start: int, length: int) -> int:
        """POISON a range a hole punch emptied, lifting uffd-wp markers it left first."""
        return self._fill("UFFDIO_POISON", lib.uswap_uffd_poison_evicted(self.fd, start, length, self._done))

    def move(self, dst: int, src: int, length: int, *, dontwake: bool = False,
             allow_src_holes: bool = False) -> int:
        mode = ((lib.UFFDIO_MOVE_MODE_DONTWAKE if dontwake else 0)
                | (lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0))
        return self._fill("UFFDIO_MOVE", lib.uswap_uffd_move(self.fd, dst, src, length, mode, self._done))

    def wake(self, start: int, length: int) -> None:
        check(lib.uswap_uffd_wake(self.fd, start, length))

    def write_protect(self, start: int, length: int, protect: bool = True, *, dontwake: bool = False) -> None:
        """Set (or, with protect=False, clear and wake) write protection."""
        mode = ((lib.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0)
                | (lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0))
        check(lib.uswap_uffd_writeprotect(self.fd, start, length, mode))

    # -- events -------------------------------------------------------------

    def read_events(self) -> list[Event]:
        """Every queued event, up to EVENT_BATCH; [] if none (non-blocking fd)."""
        n = lib.uswap_uffd_read_events(self.fd, self._events, self.EVENT_BATCH)
        if n == -errno.EAGAIN:
            return []
        check(n)
        return [_decode(self._events[i]) for i in range(n)]


def _decode(e) -> Event:
    kind = e.event
    if kind == lib.UFFD_EVENT_PAGEFAULT:
        return Pagefault(e.address, FaultFlag(e.flags), e.ptid)
    if kind == lib.UFFD_EVENT_FORK:
        return Fork(int(e.arg2))
    if kind == lib.UFFD_EVENT_REMAP:
        return Remap(e.address, e.arg2, e.arg3)
    if kind == lib.UFFD_EVENT_REMOVE:
        return Remove(e.address, e.arg2)
    if kind == lib.UFFD_EVENT_UNMAP:
        return Unmap(e.address, e.arg2)
    raise OSError(errno.EPROTO, f"unknown userfaultfd event {kind:#x}")
