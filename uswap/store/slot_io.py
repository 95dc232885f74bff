"""How Python's slot I/O runs: ``sync`` in the event loop, ``async`` on worker threads.

Swap-ins from a local store are the fault engine's (C, its own thread); what
runs here is writeback and the faults the engine forwards.  ``sync`` mirrors
the kernel's ONLY_USE_SYNC_DIO: each transfer completes before anything else
happens in the event loop (lowest latency, but the loop serves nothing else
meanwhile; the engines go on serving faults).  ``async`` hands each writeback
batch to a bounded pool of threads running only C (uswap_wb_write: encode and
pwrite, no GIL), so the event loop goes on with forwarded faults, messages and
the next batch's choice while pages are written.

A remote store (nfs://) has no fd: its transfers wait on the network, so
``RemoteSlotIO`` hands reads and writes to the worker threads as well.

``write_batch(buf, slots, count)`` writes a reclaim batch: buffer page i to
slot ``slots[i]`` (-1: an all-zero page, not written), one write per run of
contiguous slots.
"""

from __future__ import annotations

import trio

from uswap._core import ffi, lib
from uswap.core import AlignedBuffer, check
from uswap.store.base import SlotIO


class SyncSlotIO(SlotIO):
    mode = "sync"
    overlapping = False     # writes complete before the next batch is chosen

    def __init__(self, store):      # a uswap.store.swapfile.SwapStore
        self.store = store
        self.codec_c = store.codec_c          # the store's codec, for C (engines and writeback)
        self.write_ios = 0
        self._ios = ffi.new("uint64_t *")

    def _write_batch(self, buf: AlignedBuffer, slots, count: int) -> None:
        self._ios[0] = 0
        try:
            check(lib.uswap_wb_write(self.store.fd, self.codec_c, buf.ptr, slots, count, self._ios), self.store.path)
        finally:
            self.write_ios += self._ios[0]

    async def write_batch(self, buf: AlignedBuffer, slots, count: int) -> None:
        self._write_batch(buf, slots, count)
        await trio.lowlevel.checkpoint()

    async def read(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        self.store.read_slots(first, count, buf, buf_page)
        await trio.lowlevel.checkpoint()

    async def write(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        self.store.write_slots(first, count, buf, buf_page)
        await trio.lowlevel.checkpoint()


class ThreadSlotIO(SyncSlotIO):
    mode = "async"
    overlapping = True      # writes overlap the choice of the next batches

    def __init__(self, store, workers: int = 4):
        super().__init__(store)
        self.limiter = trio.CapacityLimiter(workers)

    # Reads stay in the event loop: a swap-in is waited for by the faulting
    # thread either way, and a hand-off to a worker thread and back costs more
    # than the 4-32 KiB read itself (measured: docs/BENCHMARKS.md).

    async def write_batch(self, buf: AlignedBuffer, slots, count: int) -> None:
        # Not abandonable: the thread reads from a buffer we still own.
        await trio.to_thread.run_sync(self._write_batch, buf, slots, count, limiter=self.limiter)


class RemoteSlotIO(ThreadSlotIO):
    """A remote store's slot I/O (uswap.nfs.store.NfsStore): everything on worker threads, the event loop
    never waits for the server (which may be down for the whole of --nfs-timeout)."""
    mode = "nfs"

    async def read(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        await trio.to_thread.run_sync(self.store.read_slots, first, count, buf, buf_page, limiter=self.limiter)

    async def write(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        await trio.to_thread.run_sync(self.store.write_slots, first, count, buf, buf_page, limiter=self.limiter)
