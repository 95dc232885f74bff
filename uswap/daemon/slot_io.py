"""How slot I/O runs: ``sync`` in the event loop, ``async`` on worker threads.

``sync`` mirrors the kernel's ONLY_USE_SYNC_DIO: each transfer completes
before anything else happens (no hand-off, lowest latency for one fault, but
the daemon serves nothing else meanwhile).  ``async`` hands each writeback
write to a bounded pool of threads, so faults go on being served while pages
are written (the store's O_DIRECT pwrite releases the GIL); swap-in reads stay
synchronous, as a fault's read does in the kernel.
"""

from __future__ import annotations

import trio

from uswap.core import AlignedBuffer
from uswap.nfs.store import NfsStore
from uswap.store.swapfile import SwapStore


class SyncSlotIO:
    mode = "sync"

    def __init__(self, store: SwapStore):
        self.store = store

    async def read(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        self.store.read_slots(first, count, buf, buf_page)
        await trio.lowlevel.checkpoint()

    async def write(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        self.store.write_slots(first, count, buf, buf_page)
        await trio.lowlevel.checkpoint()


class ThreadSlotIO(SyncSlotIO):
    mode = "async"

    def __init__(self, store: SwapStore, workers: int = 4):
        super().__init__(store)
        self.limiter = trio.CapacityLimiter(workers)

    # Reads stay in the event loop: a swap-in is waited for by the faulting
    # thread either way, and a hand-off to a worker thread and back costs more
    # than the 4-32 KiB read itself (measured: docs/BENCHMARKS.md).

    async def write(self, first, count, buf, buf_page=0):
        # Not abandonable: the thread reads from a buffer we still own.
        await trio.to_thread.run_sync(self.store.write_slots, first, count, buf, buf_page, limiter=self.limiter)


def slot_io(mode: str, store):
    """The slot I/O for ``store``.  An NFS store is its own: its reads and writes
    are asynchronous by nature (libnfs on the event loop, several in flight),
    whatever ``--io`` says."""
    if isinstance(store, NfsStore):
        return store
    if mode == "sync":
        return SyncSlotIO(store)
    if mode == "async":
        return ThreadSlotIO(store)
    raise ValueError(f"unknown I/O mode {mode!r} (sync or async)")
