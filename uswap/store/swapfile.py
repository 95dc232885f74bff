"""An open store: the activation checks passed, an exclusive lock held, slot I/O.

Slot N lives at file offset (N + 1) * page_size (page 0 is the header).  Every
transfer is O_DIRECT from page-aligned buffers, stays inside the slots the
header declares, and is a pure overwrite (the activation checks guarantee the
blocks are allocated and written).

Each slot goes through the store's slot codec (uswap.store.checksums): sealed
with AES-256-GCM under a key only this process holds (uswap.store.sealing), or
crc32c only; either way wrong data is never handed back.

The store has one C view of its codec (``codec_c``), which the daemon's
engines and writeback use too; a daemon with a compressed pool
(uswap.daemon.pool) sets its ``pool``, and from then on every slot path,
these included, goes through the pool first (csrc/daemon/uswap_pool.h).
"""

from __future__ import annotations

import errno
import os

from uswap._core import ffi, lib
from uswap.core import AlignedBuffer, check
from uswap.store.base import SlotIO, Store, StoreOptions
from uswap.store.checks import CheckReport, check_fd
from uswap.store.lock import StoreError, StoreUnusable, take_lock
from uswap.store.header import StoreHeader
from uswap.store.checksums import ChecksumError
from uswap.store.sealing import slot_codec


def slot_span(header, first: int, count: int, buf: AlignedBuffer, buf_page: int) -> tuple[int, int]:
    """(offset, length) of slots first..first+count-1 in the store; ValueError outside it or the buffer.
    ``header``: anything with the store's ``slot_count`` and ``page_size`` (a StoreHeader, a store set)."""
    if count <= 0 or first < 0 or first + count > header.slot_count:
        raise ValueError(f"slots {first}..{first + count - 1} are outside the store's {header.slot_count} slots")
    if (buf_page + count) * header.page_size > buf.size or buf_page < 0:
        raise ValueError(f"buffer of {buf.size} bytes cannot hold {count} pages at page {buf_page}")
    return (first + 1) * header.page_size, count * header.page_size


def local_slot_io(store, mode: str) -> SlotIO:
    """A store with local fds: ``sync`` in the event loop, ``async`` writeback on worker threads
    (uswap.store.slot_io)."""
    from uswap.store.slot_io import SyncSlotIO, ThreadSlotIO
    modes = {"sync": SyncSlotIO, "async": ThreadSlotIO}
    if mode not in modes:
        raise ValueError(f"unknown I/O mode {mode!r} (sync or async)")
    return modes[mode](store)


class SwapStore(Store):
    """A checked, locked store file.  Use :meth:`open`; close when done."""

    def __init__(self, path: str, fd: int, header: StoreHeader, report: CheckReport, *, encrypt: bool = True,
                 own_codec: bool = True):
        self.path = path
        self.fd = fd
        self.header = header
        self.report = report
        self.page_size = header.page_size
        self.slot_count = header.slot_count
        self.codec = slot_codec(path, self.slot_count if own_codec else 0, self.page_size, encrypt=encrypt)
        self.codec_c = self.codec.c_view()   # the one C view of it: engines, writeback, the pool

    @classmethod
    def open(cls, path: str, *, encrypt: bool = True, own_codec: bool = True) -> "SwapStore":
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
            return cls(path, fd, report.header, report, encrypt=encrypt, own_codec=own_codec)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    async def open_for_use(cls, spec: str, options: StoreOptions) -> "SwapStore":
        return cls.open(spec, encrypt=options.encrypt, own_codec=options.own_codec)

    async def aclose(self) -> None:
        self.close()

    @property
    def local_fd(self) -> int:
        """The O_DIRECT fd the fault engine reads slots through."""
        return self.fd

    def slot_io(self, mode: str) -> SlotIO:
        """``sync``: in the event loop; ``async``: writeback on worker threads (uswap.store.slot_io)."""
        return local_slot_io(self, mode)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self.codec.close()
            os.close(fd)  # drops the flock with the last reference

    def __enter__(self) -> "SwapStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write_slots(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """Write ``count`` pages from ``buf`` (starting at its page ``buf_page``) to contiguous slots.

        The pages are the store's from then on: sealed in place when encryption is on."""
        offset, length = slot_span(self.header, first, count, buf, buf_page)
        ptr = buf.ptr + buf_page * self.page_size
        if self.codec_c.pool != ffi.NULL:
            # The pool keeps the pages that compress; the rest are encoded and written as below, in C.
            check(lib.uswap_pool_write_slots(self.codec_c, self.fd, ptr, first, count, ffi.NULL), self.path)
            return
        self.codec.encode(first, count, ptr)
        n = check(lib.uswap_pwrite_full(self.fd, ptr, length, offset), self.path)
        if n != length:
            raise OSError(errno.EIO, f"short write at offset {offset}: {n} of {length} bytes", self.path)
        self.codec.written(first, count)

    def read_slots(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """Read contiguous slots into ``buf``; each must have been written since open, and verify."""
        offset, length = slot_span(self.header, first, count, buf, buf_page)
        ptr = buf.ptr + buf_page * self.page_size
        if self.codec_c.pool != ffi.NULL:
            read_slots_through_c(self, first, count, ptr)
            return
        self.codec.require_written(first, count)
        n = check(lib.uswap_pread_full(self.fd, ptr, length, offset), self.path)
        if n != length:
            raise OSError(errno.EIO, f"short read at offset {offset}: {n} of {length} bytes", self.path)
        self.codec.decode(first, count, ptr)


def read_slots_through_c(store, first: int, count: int, ptr) -> None:
    """read_slots in C (uswap_pool_read_slots): the pages in the codec's compressed pool (if any) decompressed
    and checked (P2), the rest read from the store (its fd, or the codec's remote store) and decoded.  A page
    that fails its check raises ChecksumError (EBADMSG) as a store read's does, one never written raises
    ENODATA."""
    bad = ffi.new("int *", -1)
    ret = lib.uswap_pool_read_slots(store.codec_c, store.fd, ptr, first, count, ffi.NULL, bad)
    slot = first + max(bad[0], 0)
    if ret == -errno.EBADMSG:
        check_name = "crc32c" if store.codec.encryption == "off" else store.codec.encryption
        if store.codec_c.pool != ffi.NULL:
            failed = f"failed its check (the pool's crc32c, or the store's {check_name})"
        else:   # as the Python codecs say it (uswap.store.checksums, uswap.store.sealing)
            failed = f"failed authentication ({check_name})" if check_name != "crc32c" else "failed its crc32c check"
        raise ChecksumError(store.path, slot, f"slot {slot} {failed}: its data is corrupted, stale or replayed")
    if ret == -errno.ENODATA:
        raise OSError(errno.ENODATA, f"slot {slot} holds nothing written since the store was opened", store.path)
    check(ret, store.path)
