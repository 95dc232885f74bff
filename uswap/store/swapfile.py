"""An open store: the activation checks passed, an exclusive lock held, slot I/O.

Slot N lives at file offset (N + 1) * page_size (page 0 is the header).  Every
transfer is O_DIRECT from page-aligned buffers, stays inside the slots the
header declares, and is a pure overwrite (the activation checks guarantee the
blocks are allocated and written).

Each slot written since the store was opened has its crc32c in memory, next to
nothing else: like the kernel's swap map, this state lives only as long as the
process that owns the store.  A read whose data does not match is an error
(EBADMSG): wrong data is never handed back.
"""

from __future__ import annotations

import array
import errno
import os

from uswap._core import lib
from uswap.core import AlignedBuffer, check
from uswap.store.checks import CheckReport, check_fd
from uswap.store.lock import StoreError, StoreUnusable, take_lock
from uswap.store.header import StoreHeader


class ChecksumError(OSError):
    def __init__(self, path: str, slot: int, expected: int, actual: int):
        self.slot = slot
        super().__init__(errno.EBADMSG, f"checksum mismatch in slot {slot}: expected {expected:#010x}, "
                                        f"read {actual:#010x}", path)


class SwapStore:
    """A checked, locked store file.  Use :meth:`open`; close when done."""

    def __init__(self, path: str, fd: int, header: StoreHeader, report: CheckReport):
        self.path = path
        self.fd = fd
        self.header = header
        self.report = report
        self.page_size = header.page_size
        self.slot_count = header.slot_count
        # Invariant: for every slot with _valid[slot] set, _crc[slot] is the
        # crc32c of what this process last wrote there.
        self._crc = array.array("I", bytes(4 * self.slot_count))
        self._valid = bytearray(self.slot_count)

    @classmethod
    def open(cls, path: str) -> "SwapStore":
        path = os.path.abspath(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise StoreError(errno.EINVAL, "filesystem does not support O_DIRECT", path) from None
            raise
        try:
            take_lock(fd, path)
            report = check_fd(fd, path, direct=True)
            if not report.usable:
                raise StoreUnusable(report)
            return cls(path, fd, report.header, report)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)  # drops the flock with the last reference

    def __enter__(self) -> "SwapStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _span(self, first: int, count: int, buf: AlignedBuffer, buf_page: int) -> tuple[int, int]:
        if count <= 0 or first < 0 or first + count > self.slot_count:
            raise ValueError(f"slots {first}..{first + count - 1} are outside the store's "
                             f"{self.slot_count} slots")
        if (buf_page + count) * self.page_size > buf.size or buf_page < 0:
            raise ValueError(f"buffer of {buf.size} bytes cannot hold {count} pages at page {buf_page}")
        return (first + 1) * self.page_size, count * self.page_size

    def write_slots(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """Write ``count`` pages from ``buf`` (starting at its page ``buf_page``) to contiguous slots."""
        offset, length = self._span(first, count, buf, buf_page)
        ptr = buf.ptr + buf_page * self.page_size
        for i in range(count):  # invalidate first: a failed write leaves nothing trusted
            self._valid[first + i] = 0
        n = check(lib.uswap_pwrite_full(self.fd, ptr, length, offset), self.path)
        if n != length:
            raise OSError(errno.EIO, f"short write at offset {offset}: {n} of {length} bytes", self.path)
        for i in range(count):
            self._crc[first + i] = lib.uswap_crc32c(0, ptr + i * self.page_size, self.page_size)
            self._valid[first + i] = 1

    def read_slots(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """Read contiguous slots into ``buf``; each must have been written since open, and match its crc."""
        offset, length = self._span(first, count, buf, buf_page)
        for i in range(count):
            if not self._valid[first + i]:
                raise ValueError(f"slot {first + i} holds nothing written since the store was opened")
        ptr = buf.ptr + buf_page * self.page_size
        n = check(lib.uswap_pread_full(self.fd, ptr, length, offset), self.path)
        if n != length:
            raise OSError(errno.EIO, f"short read at offset {offset}: {n} of {length} bytes", self.path)
        for i in range(count):
            actual = lib.uswap_crc32c(0, ptr + i * self.page_size, self.page_size)
            if actual != self._crc[first + i]:
                raise ChecksumError(self.path, first + i, self._crc[first + i], actual)

    def discard_slots(self, first: int, count: int) -> None:
        """Forget slots (their pages were freed); reading them is then an error."""
        for i in range(count):
            self._valid[first + i] = 0
