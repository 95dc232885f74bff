"""The FUSE swap store's operations: fixed-size files swap0..swapN-1 over one store.

File i is slots [i * pages, (i + 1) * pages) of the store.  Reads and writes
must be page-aligned (the loop device's direct I/O always is); they become
slot I/O (O_DIRECT, or NFS) with crc32c checks.  Requests run concurrently
(every handler awaits its I/O); each owns a buffer from a pool allocated once
(:class:`BufferPool`) and its slots (:class:`SlotLocks`) until it ends.  A slot
never written since the mount reads as zeros without touching the disk (a
fresh swap device).  Files cannot be created, removed or resized.  Only
``FUSEError`` leaves a handler: store errors become EIO, which the kernel's
swap code reports as a failed swap write or read (see docs/DESIGN.md).

The hidden file ``.status`` holds the counters as JSON, for ``uswap status``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import pyfuse3
import trio

from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.store.base import Store

log = logging.getLogger("uswap.fuse")

MAX_IO = 1 << 20          # max_read/max_write we ask for; each I/O buffer is this big
IO_BUFFERS = 16           # requests doing slot I/O at once; FUSE's max_background is 12 (+ synchronous requests)
FRESH, WRITTEN, FAILED = 0, 1, 2  # per slot: never written (reads as zeros), holds data, last write did not succeed
STATUS_NAME = b".status"


@dataclass
class FuseStats:
    reads: int = 0
    writes: int = 0
    pages_read: int = 0      # slots read from the store (the kernel's pswpin, seen from here)
    pages_written: int = 0   # slots written (pswpout)
    zero_reads: int = 0      # pages read that were never written: zeros, no I/O
    read_errors: int = 0
    write_errors: int = 0


class BufferPool:
    """A bounded free list of I/O buffers: one per request while it does slot I/O.

    Invariant: a buffer belongs to exactly one request from acquire to release;
    no await while another request can see it.  Every handler awaits (an NFS
    store's reads and writes wait for the server; even a local store's I/O
    ends in a checkpoint), and other requests run meanwhile: one buffer shared
    across that await hands one request's data to another (security finding 8:
    blocks with another block's data, and checks of the wrong data: EIO).
    So a buffer leaves the free list in :meth:`borrow` and comes back only when
    the request's last use of it (the copy out of a read, the check data of a
    write) is done.  When every buffer is out, a request waits for one (FIFO); it
    never shares.  The buffers are allocated once, before the mount exists
    (mlockall'd, no allocation on the swap-out path).

    Cancellation gives a buffer back too: an NFS read cancelled in flight
    drops its late reply (uswap.nfs.connection), and libnfs 4.0 copies a
    WRITE's data when it queues it.
    """

    def __init__(self, count: int, size: int):
        self.size = size
        self._free = [AlignedBuffer(size) for _ in range(count)]
        self._available = trio.Semaphore(count)
        self.count = count
        self.most_in_use = 0     # for .status: how many requests did slot I/O at once
        self.waits = 0           # requests that found every buffer out and waited

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[AlignedBuffer]:
        if self._available.value == 0:
            self.waits += 1
        await self._available.acquire()
        buf = self._free.pop()
        self.most_in_use = max(self.most_in_use, self.count - len(self._free))
        try:
            yield buf
        finally:
            self._free.append(buf)
            self._available.release()

    def statistics(self) -> dict:
        return {"count": self.count, "in_use": self.count - len(self._free), "most_in_use": self.most_in_use,
                "waits": self.waits}


class SlotLocks:
    """One request at a time on a slot.

    The other state a request keeps across its awaits is the slot's: between
    a write's start and end the store does not trust the slot (it forgets the
    slot's check data at the start and records it at the end).  A read of that
    slot meanwhile, or a second write, would check against the wrong data or
    find the slot "not written" (a ValueError, which would end the mount).
    The kernel's swap never does that, but a loop device's other users may:
    such a request waits until the slot's current one ends.

    Invariant: a slot is held by at most one request, from :meth:`hold` until
    that request's I/O on it has ended and ``_slots`` says how it ended.  A
    span is taken whole or not at all (no await between the check and the
    take), so two requests never each hold part of what the other waits for.
    """

    def __init__(self, slot_count: int):
        self._held = bytearray(slot_count)
        self._released = trio.Event()

    @contextlib.asynccontextmanager
    async def hold(self, first: int, count: int) -> AsyncIterator[None]:
        while self._held.find(1, first, first + count) >= 0:
            await self._released.wait()
        self._held[first:first + count] = b"\1" * count
        try:
            yield
        finally:
            self._held[first:first + count] = bytes(count)
            self._released.set()            # every waiter checks its span again
            self._released = trio.Event()


class SwapStoreOps(pyfuse3.Operations):
    def __init__(self, store: Store, *, files: int, file_pages: int, io_buffers: int = IO_BUFFERS):
        super().__init__()
        if files * file_pages > store.slot_count:
            raise ValueError(f"{files} file(s) of {file_pages} pages need {files * file_pages} slots; "
                             f"the store has {store.slot_count}")
        self.store = store
        self.io = store.slot_io("sync")   # O_DIRECT in the event loop; an NFS store's own async I/O
        self.files = files
        self.file_pages = file_pages
        self.stats = FuseStats()
        self.started = time.time()
        self._slots = bytearray(store.slot_count)     # FRESH / WRITTEN / FAILED per slot
        self._buffers = BufferPool(io_buffers, MAX_IO)   # preallocated: the write path allocates nothing big
        self._slot_locks = SlotLocks(files * file_pages)
        self.uid, self.gid = os.getuid(), os.getgid()
        self._snapshots: dict[int, bytes] = {}       # open .status handles (fh > every inode)
        self._next_fh = 1 << 32

    # inodes: 1 root, 2..files+1 the swap files, files+2 .status
    def _file_index(self, inode: int) -> int:
        index = inode - 2
        if not 0 <= index < self.files:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return index

    @property
    def _status_inode(self) -> int:
        return self.files + 2

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_nlink = 1
        a.st_blksize = PAGE_SIZE
        now = int(self.started * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now
        a.attr_timeout = a.entry_timeout = 3600
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif inode == self._status_inode:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_size = len(self.status_json())
            a.attr_timeout = a.entry_timeout = 0
        else:
            self._file_index(inode)
            a.st_mode = stat.S_IFREG | 0o600      # swapped memory is secret
            a.st_size = self.file_pages * PAGE_SIZE
            a.st_blocks = a.st_size // 512          # fully allocated: no holes for swapon to refuse
        return a

    def status_json(self) -> bytes:
        return json.dumps({"store": self.store.path, "files": self.files, "file_bytes": self.file_pages * PAGE_SIZE,
                           **asdict(self.stats), "io_buffers": self._buffers.statistics(),
                           **self.store.status()}).encode()

    # -- namespace ---------------------------------------------------------------

    def _names(self) -> list[tuple[bytes, int]]:
        return [(f"swap{i}".encode(), i + 2) for i in range(self.files)] + [(STATUS_NAME, self._status_inode)]

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE:
            for entry, inode in self._names():
                if entry == name:
                    return self._attrs(inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        for i, (name, inode) in enumerate(self._names()):
            if i < start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode), i + 1):
                break

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = PAGE_SIZE
        s.f_blocks = self.files * self.file_pages
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.files + 1
        s.f_namemax = 255
        return s

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)  # fixed-size files, fixed ownership
        return self._attrs(inode)

    async def open(self, inode, flags, ctx):
        if inode == self._status_inode:
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise pyfuse3.FUSEError(errno.EACCES)
            # One snapshot per open: chunked reads of counters that move on
            # must still add up to one JSON document.
            self._next_fh += 1
            self._snapshots[self._next_fh] = self.status_json()
            return pyfuse3.FileInfo(fh=self._next_fh, direct_io=True)
        self._file_index(inode)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        # direct_io: no page cache for swap data (the kernel's own swap must not
        # recurse into the page cache of the file it swaps to).
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- data ----------------------------------------------------------------------

    def _span(self, fh: int, off: int, size: int) -> tuple[int, int]:
        """First slot and page count of an aligned request, clipped at the end of file."""
        index = self._file_index(fh)
        if off % PAGE_SIZE or size % PAGE_SIZE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        first = off // PAGE_SIZE
        count = max(0, min(size // PAGE_SIZE, self.file_pages - first))
        return index * self.file_pages + first, count

    async def release(self, fh):
        self._snapshots.pop(fh, None)

    async def read(self, fh, off, size):
        if fh in self._snapshots:
            return self._snapshots[fh][off:off + size]
        slot, count = self._span(fh, off, min(size, MAX_IO))
        self.stats.reads += 1
        out = bytearray(count * PAGE_SIZE)
        # Slots first, then a buffer (the order every request takes them in:
        # no request holding a buffer ever waits for slots).
        async with self._slot_locks.hold(slot, count), self._buffers.borrow() as io_buf:
            i = 0
            while i < count:
                state = self._slots[slot + i]
                if state == FRESH:
                    self.stats.zero_reads += 1
                    i += 1
                    continue
                run = 1
                while i + run < count and self._slots[slot + i + run] == WRITTEN and state == WRITTEN:
                    run += 1
                try:
                    if state == FAILED:  # never hand back what a failed write left behind
                        raise OSError(errno.EIO, "the last write of this slot failed")
                    await self.io.read(slot + i, run, io_buf)
                except OSError as e:
                    self.stats.read_errors += 1
                    log.error("read of slots %d..%d failed: %s", slot + i, slot + i + run - 1, e)
                    raise pyfuse3.FUSEError(errno.EIO) from None
                out[i * PAGE_SIZE:(i + run) * PAGE_SIZE] = io_buf.view[:run * PAGE_SIZE]
                self.stats.pages_read += run
                i += run
        return bytes(out)

    async def write(self, fh, off, buf):
        if len(buf) > MAX_IO:
            raise pyfuse3.FUSEError(errno.EINVAL)
        slot, count = self._span(fh, off, len(buf))
        if count * PAGE_SIZE < len(buf):
            raise pyfuse3.FUSEError(errno.ENOSPC)   # past the end: the files cannot grow
        self.stats.writes += 1
        async with self._slot_locks.hold(slot, count), self._buffers.borrow() as io_buf:
            io_buf.view[:len(buf)] = buf
            # Until the write has ended the slots hold nothing we can vouch for
            # (the store no longer trusts them): FAILED, also if cancelled.
            self._slots[slot:slot + count] = bytes([FAILED]) * count
            try:
                await self.io.write(slot, count, io_buf)
            except OSError as e:
                self.stats.write_errors += 1
                log.error("write of slots %d..%d failed: %s", slot, slot + count - 1, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            self._slots[slot:slot + count] = bytes([WRITTEN]) * count
        self.stats.pages_written += count
        return len(buf)
